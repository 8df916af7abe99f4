"""A synth store's ground truth <-> `Truth`, and a trained USAE scored against it.

`load_truth` reads ``S.zarr/_usae/truth.safetensors`` (its layout: `usae.trainer.synth`'s module
docstring; versions 1 and 2); `recovery` scores a model's decoders (the planted-recovery metric):
a planted concept is recovered when ONE learned concept's decoder rows reach the threshold
cosine with its direction in EVERY model it lives in, per group and per kind (universal,
subset-shared, specific), and a predicted member set per learned concept is scored too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from usae.pipeline.store import StoreError

if TYPE_CHECKING:
    from usae.trainer.model import USAE

TRUTH_FILE = "truth.safetensors"
TRUTH_FORMAT = "usae-synth-truth"
TRUTH_VERSION = 2


def group_label(members: tuple[int, ...], n_models: int) -> str:
    """A member set's name: "all", one index ("2": specific to model 2) or "0+1"."""
    return "all" if len(members) == n_models else "+".join(map(str, members))


class Truth(NamedTuple):
    """Ground truth of a synth store (see the module docstring for the file layout)."""

    backbones: tuple[str, ...]
    """Backbone keys, store order."""
    n_universal: int
    """U; rows [0, U) of each dictionary are the universal concepts."""
    n_specific: tuple[int, ...]
    """S_i per model."""
    dictionaries: list[np.ndarray]
    """Per model (U+S_i, d_i) unit directions, universal rows first."""
    concept_ids: list[np.ndarray]
    """Per model (U+S_i,) global concept ids of the dictionary rows."""
    factors: list[np.ndarray]
    """Per model (U+S_i,) magnitude factors."""
    rate: np.ndarray
    """(U + sum S_i,) firing probability per global concept."""
    scale: np.ndarray
    """(M,) per-model scale."""
    offset: np.ndarray
    """(M,) per-model offset."""
    codes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None
    """Per model CSR (indptr, concept, value) of the per-token codes, or None if not saved."""
    config: dict
    """The SynthConfig that made the store, as a dict."""
    members: np.ndarray | None = None
    """(C, M) bool: concept c lives in model i (rows = global concept ids)."""
    gains: np.ndarray | None = None
    """(C, M) per-model magnitude factor of each concept, 0 where it is absent."""
    group_id: np.ndarray | None = None
    """(C,) index into ``group_labels`` of each concept's group."""
    group_labels: tuple[str, ...] = ()
    """Label of each group: "all", or the member indices joined by "+" (e.g. "0+1", "2")."""
    channel_offsets: list[np.ndarray] | None = None
    """Per model (d_i,) per-channel offset o_i (before scale), zeros when not planted."""
    label_names: tuple[str, ...] = ()
    """Planted label names (``usae synth --labels``; empty without)."""
    label_concepts: np.ndarray | None = None
    """(L,) global id of the concept tied to each planted label."""
    image_labels: np.ndarray | None = None
    """(N,) true label index of each image (the store's label array may be shuffled)."""
    maps: dict[str, np.ndarray] | None = None
    """{key: A} for the models a --transform mapped (their data is the unmapped data times A)."""

    def direction(self, c: int, i: int) -> np.ndarray:
        """Unit direction of global concept c in model i (c must live in model i)."""
        row = np.flatnonzero(self.concept_ids[i] == c)
        if not len(row):
            raise KeyError(f"concept {c} does not live in model {i}")
        return self.dictionaries[i][row[0]]

    def active_sets(self, i: int, rows: np.ndarray | None = None) -> list[frozenset[int]]:
        """Global ids of the concepts active on each row (all rows, or `rows`) for model i."""
        if self.codes is None:
            raise ValueError("this synth store was written without --save-codes")
        indptr, concept, _ = self.codes[i]
        rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows)
        return [frozenset(concept[indptr[r] : indptr[r + 1]].tolist()) for r in rows]


def load_truth(store_path: str | Path) -> Truth:
    """Read the ground truth of a synth store (version 1 or 2)."""
    from safetensors import safe_open

    path = Path(store_path) / "_usae" / TRUTH_FILE
    if not path.exists():
        raise StoreError(
            f"{store_path} has no ground truth ({path.name}); is it a `usae synth` store?"
        )
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TRUTH_FORMAT:
            raise StoreError(f"{path} is not a usae synth truth file")
        if int(meta.get("version", "1")) > TRUTH_VERSION:
            raise StoreError(
                f"{path} has truth version {meta['version']}; this usae reads <= {TRUTH_VERSION}"
            )
        keys = tuple(json.loads(meta["backbones"]))
        names = set(f.keys())
        get = f.get_tensor
        has_codes = all(f"codes.{k}.indptr" in names for k in keys)
        ids = [get(f"concept_ids.{k}") for k in keys]
        factors = [get(f"factor.{k}") for k in keys]
        rate = get("rate")
        if "members" in names:
            members, gains, group_id = get("members").astype(bool), get("gain"), get("group_id")
            labels = tuple(g["label"] for g in json.loads(meta["groups"]))
            offsets = [get(f"channel_offset.{k}") for k in keys]
        else:  # version 1: universal ids first, then each model's specific ids
            members, gains = _members_from_rows(ids, factors, len(rate))
            group_id, labels = _groups_from_members(members)
            offsets = None
        return Truth(
            backbones=keys,
            n_universal=int(meta["n_universal"]),
            n_specific=tuple(json.loads(meta["n_specific"])),
            dictionaries=[get(f"dictionary.{k}") for k in keys],
            concept_ids=ids,
            factors=factors,
            rate=rate,
            scale=get("scale"),
            offset=get("offset"),
            codes=[
                (get(f"codes.{k}.indptr"), get(f"codes.{k}.concept"), get(f"codes.{k}.value"))
                for k in keys
            ]
            if has_codes
            else None,
            config=json.loads(meta["config"]),
            members=members,
            gains=gains,
            group_id=group_id,
            group_labels=labels,
            channel_offsets=offsets,
            label_names=tuple(json.loads(meta.get("labels", "[]"))),
            label_concepts=get("label_concept") if "label_concept" in names else None,
            image_labels=get("image_label") if "image_label" in names else None,
            maps={k: get(f"map.{k}") for k in keys if f"map.{k}" in names},
        )


def _members_from_rows(
    ids: list[np.ndarray], factors: list[np.ndarray], n_c: int
) -> tuple[np.ndarray, np.ndarray]:
    members, gains = np.zeros((n_c, len(ids)), bool), np.zeros((n_c, len(ids)), np.float32)
    for i, (c, f) in enumerate(zip(ids, factors, strict=True)):
        members[c, i], gains[c, i] = True, f
    return members, gains


def _groups_from_members(members: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Group = distinct member set, in order of first appearance."""
    labels: list[str] = []
    gid = np.zeros(len(members), np.int64)
    for c, row in enumerate(members):
        lab = group_label(tuple(np.flatnonzero(row).tolist()), members.shape[1])
        if lab not in labels:
            labels.append(lab)
        gid[c] = labels.index(lab)
    return gid, tuple(labels)


# ---------------------------------------------------------------- recovery metric
class Recovery(NamedTuple):
    """How well a trained USAE's decoders recover the planted concepts.

    The first seven fields are the original universal-only metric (cosine AVERAGED over models);
    the rest score every planted concept by its MIN cosine over the models it lives in.
    """

    rate: float
    """Share of universal concepts whose best shared match has cosine >= threshold."""
    mean_cos: float
    """Mean over universal concepts of the best shared cosine."""
    cos_u: np.ndarray
    """(U,) best over learned concepts k of the cosine averaged over models."""
    match_u: np.ndarray
    """(U,) the learned concept k achieving cos_u."""
    per_model_cos_ui: np.ndarray
    """(U, M) best cosine per model separately (a learned concept may differ per model)."""
    specific_rate: float
    """Share of specific concepts matched at >= threshold by some learned concept of their model."""
    threshold: float
    """The cosine threshold used."""
    cos_c: np.ndarray = np.zeros(0)
    """(C,) per planted concept: max over learned k of the min over its member models of the cosine."""
    match_c: np.ndarray = np.zeros(0, np.int64)
    """(C,) the learned concept achieving cos_c."""
    recovered_c: np.ndarray = np.zeros(0, bool)
    """(C,) cos_c >= threshold."""
    group_rate: dict | None = None
    """Group label ("all", "0+1", "2", ...) -> share of its concepts recovered."""
    kind_rate: dict | None = None
    """"universal" (all models), "subset" (2..M-1 models), "specific" (one model) -> share recovered."""
    member_ok_c: np.ndarray | None = None
    """(C,) predicted member set of match_c equals the planted one (None: no prediction given)."""
    membership_accuracy: float = float("nan")
    """Share of RECOVERED planted concepts whose matched concept's predicted member set is right."""
    kind_membership: dict | None = None
    """Kind -> membership accuracy over that kind's recovered concepts."""


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)


def _kind(n_members: int, n_models: int) -> str:
    return "universal" if n_members == n_models else ("specific" if n_members == 1 else "subset")


def recovery_from_decoders(
    decoders: list[np.ndarray],
    truth: Truth,
    threshold: float = 0.9,
    members_mk: np.ndarray | None = None,
) -> Recovery:
    """:func:`recovery` from decoder matrices (m, d_i) in ``truth.backbones`` order (any row scale).

    members_mk: (M, m) bool predicted member set of each learned concept (same model order).
    """
    n_models, u = len(truth.backbones), truth.n_universal
    learned = [_unit(d) for d in decoders]
    n_learn = learned[0].shape[0]
    # --- original universal metric: rows [0, U) of each dictionary are the universal concepts
    cos_mu = [learned[i] @ truth.dictionaries[i][:u].astype(np.float64).T for i in range(n_models)]
    shared_mu = np.mean(cos_mu, axis=0) if u else np.zeros((n_learn, 0))
    match_u = shared_mu.argmax(axis=0) if u else np.zeros(0, np.int64)
    cos_u = shared_mu.max(axis=0) if u else np.zeros(0)
    per_model = np.stack([c.max(axis=0) for c in cos_mu], axis=1) if u else np.zeros((0, n_models))
    # --- every planted concept: min over member models
    mem = truth.members
    n_c = mem.shape[0]
    worst_kc = np.full((n_learn, n_c), np.inf)
    for i in range(n_models):
        cos_kr = learned[i] @ truth.dictionaries[i].astype(np.float64).T
        worst_kc[:, truth.concept_ids[i]] = np.minimum(worst_kc[:, truth.concept_ids[i]], cos_kr)
    match_c = worst_kc.argmax(axis=0)
    cos_c = worst_kc[match_c, np.arange(n_c)]
    rec_c = cos_c >= threshold
    sizes = mem.sum(1)
    kinds = np.array([_kind(int(s), n_models) for s in sizes])
    specific = kinds == "specific"

    def share(mask: np.ndarray, ok: np.ndarray) -> float:
        return float(ok[mask].mean()) if mask.any() else float("nan")

    group_rate = {
        lab: share(truth.group_id == g, rec_c) for g, lab in enumerate(truth.group_labels)
    }
    kind_rate = {k: share(kinds == k, rec_c) for k in ("universal", "subset", "specific")}
    member_ok, acc, kind_mem = None, float("nan"), None
    if members_mk is not None:
        pred = np.asarray(members_mk, bool)
        if pred.shape != (n_models, n_learn):
            raise ValueError(f"members_mk must be (M={n_models}, m={n_learn}), got {pred.shape}")
        member_ok = (pred[:, match_c].T == mem).all(axis=1)
        acc = share(rec_c, member_ok)
        kind_mem = {
            k: share(rec_c & (kinds == k), member_ok) for k in ("universal", "subset", "specific")
        }
    return Recovery(
        rate=float((cos_u >= threshold).mean()) if u else float("nan"),
        mean_cos=float(cos_u.mean()) if u else float("nan"),
        cos_u=cos_u,
        match_u=match_u,
        per_model_cos_ui=per_model,
        specific_rate=share(specific, rec_c),
        threshold=threshold,
        cos_c=cos_c,
        match_c=match_c,
        recovered_c=rec_c,
        group_rate=group_rate,
        kind_rate=kind_rate,
        member_ok_c=member_ok,
        membership_accuracy=acc,
        kind_membership=kind_mem,
    )


def recovery(
    model: USAE, truth: Truth, threshold: float = 0.9, members_mk: np.ndarray | None = None
) -> Recovery:
    """Best-match decoder cosine of every planted concept (one learned concept for all its models).

    members_mk: optional (M, m) predicted member sets, models in ``truth.backbones`` order.
    """
    import torch

    pos = [model.spec.backbones.index(k) for k in truth.backbones]
    with torch.no_grad():
        learned = [model.decoder_weight(j).float().cpu().numpy() for j in pos]
    return recovery_from_decoders(learned, truth, threshold, members_mk)
