"""Image labels -> what the concepts are: each concept's top labels, and sparse probing.

Labels are one categorical value per image (a manifest column, ``label`` by default, or the
store's ``label`` array); ``label_table`` is the one reading of them. From them:

- per concept, the labels of its top activating images (the streaming pass keeps the top N
  per concept, ``top_labels``): the most common label and its share among those of them that
  have a label, and a short text of the first few ("cat 67%, dog 17%");
- per label and backbone, from each image's max-over-tokens code of every concept (each
  backbone's encoder on its own tokens; ``MaximaCollector`` keeps them sparse, as scipy CSR,
  for at most ``probe_images`` images sampled by a stable hash of the image id):
  the best single concept as a detector of the label (one-vs-rest), CHOSEN on the probe's
  training images and its AUROC MEASURED on its held-out images, and k-sparse probes (the
  vision form of SAEBench's sparse probing): the k concepts with the largest Welch t
  statistic on the training images, a logistic regression on them (balanced class weights),
  its accuracy and balanced accuracy on the held-out images (``probe_labels``).

The probe's split is its own: a stable hash of the image id halves the probed images (salt
``PROBE_SALT``), whatever images the report evaluates, so a shuffled label is at chance.
Names carry shape suffixes: n images, m concepts, g images kept per concept, L labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from usae.errors import UsaeError

PROBE_SALT = "usae-probe"
"""Salt of the hash that samples the probed images and splits them into train / held out."""
SHOWN_LABELS = 3
"""Labels listed in ``labels_top`` per concept."""
CANDIDATES = 10
"""The best single concept is chosen by training AUROC among the top candidates by Welch t."""


class LabelError(UsaeError, ValueError):
    """The labels asked for cannot be read (a --label-column that is nowhere)."""


class Labels(NamedTuple):
    """Each store image's label, encoded."""

    codes_n: np.ndarray
    """(N,) int64 index into ``classes`` per store image; -1: unlabelled."""
    classes: tuple[str, ...]
    """Label names, sorted."""
    column: str
    source: str
    """Where they came from: "manifest" or "store"."""


# ---------------------------------------------------------------- reading
def label_table(
    manifest: pd.DataFrame | None, store_labels: pd.Series | None, column: str
) -> tuple[pd.Series, str] | None:
    """(image_id -> label, source) from the manifest's ``column``, else the store's ``label``
    array (``store_labels``: image_id -> label); None when labels are off (``column`` "") or
    the default column is nowhere. A column named explicitly and found nowhere is an error.
    Missing values ("" or NaN) are left out."""
    if not column:
        return None
    if manifest is not None and column in manifest.columns:
        s, source = pd.Series(manifest[column].to_numpy(), index=manifest["image_id"]), "manifest"
    elif column == "label" and store_labels is not None:
        s, source = store_labels, "store"
    elif column != "label":
        where = (
            f"the manifest has no column {column!r} (columns: {', '.join(map(str, manifest.columns))})"
            if manifest is not None
            else "no --manifest was given and the store holds only a `label` array"
        )
        raise LabelError(f"--label-column {column}: {where}")
    else:
        return None
    s = s[s.notna()].astype(str)
    s = s[s != ""]
    s.index = s.index.astype(str)
    return s, source


def encode_labels(
    table: pd.Series, image_ids: Sequence[str], column: str, source: str
) -> Labels | None:
    """The store's images' labels as codes; None when fewer than two classes are present."""
    classes = tuple(sorted(set(table.to_numpy().tolist())))
    if len(classes) < 2:
        return None
    code_of = {c: i for i, c in enumerate(classes)}
    lab = table.reindex(pd.Index([str(i) for i in image_ids]))
    codes = np.array([code_of.get(v, -1) if isinstance(v, str) else -1 for v in lab], np.int64)
    return Labels(codes, classes, column, source)


# ---------------------------------------------------------------- top labels per concept
def top_labels(
    top_image_mg: np.ndarray, labels: Labels | None, n_top: int, shown: int = SHOWN_LABELS
) -> pd.DataFrame:
    """Per concept, over its first ``n_top`` top images that have a label: ``label_top`` (the
    most common, ties to the first name; "" when none), ``label_share`` (its share; NaN when
    none), ``labels_top`` (the ``shown`` most common with their shares, "cat 67%, dog 17%")."""
    m = top_image_mg.shape[0]
    out = pd.DataFrame(
        {"label_top": [""] * m, "label_share": np.full(m, np.nan), "labels_top": [""] * m}
    )
    if labels is None or m == 0:
        return out
    g = top_image_mg[:, :n_top]
    lab_mg = np.where(g >= 0, labels.codes_n[np.clip(g, 0, None)], -1)
    rows, cols = np.nonzero(lab_mg >= 0)
    if not len(rows):
        return out
    pairs, counts = np.unique(np.stack([rows, lab_mg[rows, cols]], 1), axis=0, return_counts=True)
    n_lab = np.bincount(rows, minlength=m)
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per concept: most common first
    pairs, counts = pairs[order], counts[order]
    starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
    ends = np.r_[starts[1:], len(pairs)]
    top, share, text = (
        out["label_top"].to_list(),
        out["label_share"].to_numpy().copy(),
        out["labels_top"].to_list(),
    )
    for a, b in zip(starts, ends, strict=True):
        k = int(pairs[a, 0])
        top[k] = labels.classes[pairs[a, 1]]
        share[k] = counts[a] / n_lab[k]
        text[k] = ", ".join(
            f"{labels.classes[pairs[j, 1]]} {100 * counts[j] / n_lab[k]:.0f}%"
            for j in range(a, min(b, a + shown))
        )
    return pd.DataFrame({"label_top": top, "label_share": share, "labels_top": text})


# ---------------------------------------------------------------- probed images and features
def hash_unit(image_ids: Sequence[str], salt: str) -> np.ndarray:
    """A stable uniform number in [0, 1) per image id (blake2b of salt:id)."""
    out = np.empty(len(image_ids))
    for n, iid in enumerate(image_ids):
        h = hashlib.blake2b(f"{salt}:{iid}".encode(), digest_size=8).digest()
        out[n] = int.from_bytes(h, "little") / 2**64
    return out


class ProbeSet(NamedTuple):
    """The images probed: store indices (ascending) and the probe's held-out half."""

    images_n: np.ndarray
    test_n: np.ndarray
    """(n,) bool: held out (the AUROC and accuracies are measured there)."""
    n_labelled: int
    """Labelled images among those evaluated (before the cap)."""


def probe_set(mask_n: np.ndarray, labels: Labels, image_ids: Sequence[str], cap: int) -> ProbeSet:
    """The labelled evaluated images, at most ``cap`` of them (those with the smallest hash of
    their id: a deterministic sample whatever the store order), halved by a second hash."""
    cand = np.flatnonzero(np.asarray(mask_n, bool) & (labels.codes_n >= 0))
    ids = [str(image_ids[i]) for i in cand]
    if len(cand) > cap:
        keep = np.sort(np.argsort(hash_unit(ids, PROBE_SALT + ":sample"), kind="stable")[:cap])
        cand, ids = cand[keep], [ids[i] for i in keep]
    test = hash_unit(ids, PROBE_SALT + ":split") < 0.5
    return ProbeSet(cand, test, int((np.asarray(mask_n, bool) & (labels.codes_n >= 0)).sum()))


class MaximaCollector:
    """Called by the streaming pass with each chunk's per-image maxima (M, n, m) of the codes;
    keeps the non-zero ones of the probed images, per backbone, as a CSR matrix (n_probe, m)."""

    def __init__(self, images_n: np.ndarray, n_models: int, m: int):
        self.images_n, self.n_models, self.m = np.asarray(images_n, np.int64), n_models, m
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, image_index_n: np.ndarray, max_Mnm: torch.Tensor) -> None:
        idx = np.asarray(image_index_n, np.int64)
        pos = np.searchsorted(self.images_n, idx).clip(0, max(len(self.images_n) - 1, 0))
        hit = (self.images_n[pos] == idx) if len(self.images_n) else np.zeros(len(idx), bool)
        if not hit.any():
            return
        sub = max_Mnm[:, torch.as_tensor(np.flatnonzero(hit), device=max_Mnm.device)]
        nz = torch.nonzero(sub > 0)
        vals = sub[nz[:, 0], nz[:, 1], nz[:, 2]].float().cpu().numpy()
        nz = nz.cpu().numpy()
        self.parts.append((nz[:, 0], pos[hit][nz[:, 1]], nz[:, 2], vals))

    def matrices(self) -> list[sp.csr_matrix]:
        """Per backbone (n_probe, m) float32 CSR of the per-image max codes."""
        shape = (len(self.images_n), self.m)
        cat = [
            np.concatenate(p) if self.parts else np.zeros(0) for p in zip(*self.parts, strict=True)
        ]
        if not self.parts:
            return [sp.csr_matrix(shape, dtype=np.float32) for _ in range(self.n_models)]
        who, rows, cols, vals = cat
        return [
            sp.csr_matrix(
                (vals[who == i], (rows[who == i], cols[who == i])), shape=shape, dtype=np.float32
            )
            for i in range(self.n_models)
        ]


# ---------------------------------------------------------------- statistics
def auroc(scores_n: np.ndarray, y_n: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(y_n, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    r = rankdata(np.asarray(scores_n, np.float64))
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def welch_t(x_nm: sp.csr_matrix, y_nL: np.ndarray) -> np.ndarray:
    """(m, L) Welch t statistic of each concept's feature between images with label l and the
    others (sparse sums only: never a dense (n, m) matrix)."""
    y = sp.csr_matrix(np.asarray(y_nL, np.float64))
    n_pos = np.asarray(y.sum(0)).ravel()
    n_neg = x_nm.shape[0] - n_pos
    x = x_nm.astype(np.float64)
    s1 = (x.T @ y).toarray()
    s2 = (x.multiply(x).T @ y).toarray()
    tot1, tot2 = (
        np.asarray(x.sum(0)).ravel()[:, None],
        np.asarray(x.multiply(x).sum(0)).ravel()[:, None],
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        mp, mn = s1 / n_pos, (tot1 - s1) / n_neg
        vp = np.maximum(s2 / n_pos - mp**2, 0.0)
        vn = np.maximum((tot2 - s2) / n_neg - mn**2, 0.0)
        t = (mp - mn) / np.sqrt(vp / n_pos + vn / n_neg + 1e-12)
    return np.nan_to_num(t, nan=0.0)


def _top_by(score_m: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores, largest first (ties: lower index)."""
    return np.lexsort((np.arange(len(score_m)), -score_m))[:n]


def sparse_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> dict:
    """A logistic regression on a few features (standardised, balanced class weights) fitted on
    train, scored on the held-out images: {accuracy, balanced_accuracy}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-8
    clf = LogisticRegression(class_weight="balanced", max_iter=1000)
    clf.fit((x_tr - mu) / sd, y_tr)
    pred = clf.predict((x_te - mu) / sd)
    return {
        "accuracy": float((pred == y_te).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_te, pred)),
    }


# ---------------------------------------------------------------- the probe
def probe(
    x_list: Sequence[sp.csr_matrix],
    keys: Sequence[str],
    codes_n: np.ndarray,
    test_n: np.ndarray,
    classes: Sequence[str],
    *,
    ks: Sequence[int] = (1, 5),
    max_labels: int = 50,
    min_images: int = 5,
) -> list[dict]:
    """Per label (the ``max_labels`` most frequent among the probed images; ties by name), per
    backbone: best single concept (chosen on train, AUROC on the held-out images) and k-sparse
    probe scores. ``x_list[i]``: backbone i's (n, m) per-image max codes of the probed images,
    ``codes_n`` their labels, ``test_n`` the held-out half. A label with fewer than
    ``min_images`` positive or negative images in either half is listed without scores."""
    counts = np.bincount(codes_n, minlength=len(classes))
    order = [int(c) for c in np.lexsort((np.arange(len(classes)), -counts)) if counts[c] > 0][
        :max_labels
    ]
    tr, te = ~np.asarray(test_n, bool), np.asarray(test_n, bool)
    y_nL = codes_n[:, None] == np.asarray(order)[None, :]
    entries = []
    for col, c in enumerate(order):
        y = y_nL[:, col]
        n_tr, n_te = int(y[tr].sum()), int(y[te].sum())
        entries.append({
            "label": classes[c], "n_images": int(y.sum()), "n_train": n_tr, "n_test": n_te,
            "prevalence_test": float(y[te].mean()) if te.any() else float("nan"),
            "chance_accuracy": float(max(y[te].mean(), 1 - y[te].mean())) if te.any() else float("nan"),
            "models": {},
        })  # fmt: skip
    ok = [
        min(e["n_train"], e["n_test"], int(tr.sum()) - e["n_train"], int(te.sum()) - e["n_test"])
        >= min_images
        for e in entries
    ]
    if not any(ok):
        return entries
    for i, key in enumerate(keys):
        x_tr, x_te = x_list[i][tr].tocsc(), x_list[i][te].tocsc()
        t_mL = welch_t(x_list[i][tr], y_nL[tr])
        for col, e in enumerate(entries):
            if ok[col]:
                e["models"][key] = _probe_one(
                    x_tr, x_te, y_nL[tr, col], y_nL[te, col], t_mL[:, col], ks
                )
    return entries


def _probe_one(x_tr, x_te, y_tr, y_te, t_m, ks) -> dict:
    cand = _top_by(t_m, max(CANDIDATES, *ks))
    dense_tr = x_tr[:, cand].toarray()
    au_tr = np.array([auroc(dense_tr[:, j], y_tr) for j in range(min(CANDIDATES, len(cand)))])
    j = int(np.nanargmax(au_tr)) if np.isfinite(au_tr).any() else 0
    best = int(cand[j])
    out = {"best_concept": best, "auroc_train": float(au_tr[j]),
           "auroc": auroc(x_te[:, [best]].toarray().ravel(), y_te), "probe": {}}  # fmt: skip
    dense_te = x_te[:, cand].toarray()
    for k in ks:
        p = sparse_probe(dense_tr[:, :k], y_tr, dense_te[:, :k], y_te)
        out["probe"][str(k)] = {"concepts": [int(c) for c in cand[:k]], **p}
    return out


def labels_entry(
    labels: Labels,
    ps: ProbeSet,
    x_list: Sequence[sp.csr_matrix],
    keys: Sequence[str],
    *,
    top_images: int,
    max_labels: int,
    ks: Sequence[int] = (1, 5),
) -> dict:
    """metrics.json's ``labels``: the probe per label plus what it was run on and chance levels."""
    codes = labels.codes_n[ps.images_n]
    per = probe(x_list, keys, codes, ps.test_n, labels.classes, ks=ks, max_labels=max_labels)
    summary = {}
    for key in keys:
        got = [e["models"][key] for e in per if key in e["models"]]
        summary[key] = {
            "n_labels": len(got),
            "mean_auroc": _mean([g["auroc"] for g in got]),
            "mean_balanced_accuracy": {str(k): _mean([g["probe"][str(k)]["balanced_accuracy"] for g in got]) for k in ks},
        }  # fmt: skip
    return {
        "column": labels.column,
        "source": labels.source,
        "n_classes": len(labels.classes),
        "n_labelled": ps.n_labelled,
        "probe_images": len(ps.images_n),
        "sampled": len(ps.images_n) < ps.n_labelled,
        "train_images": int((~ps.test_n).sum()),
        "test_images": int(ps.test_n.sum()),
        "top_images": top_images,
        "ks": list(ks),
        "chance": {"auroc": 0.5, "balanced_accuracy": 0.5},
        "per_label": per,
        "summary": summary,
    }


def _mean(v: Sequence[float]) -> float:
    v = [x for x in v if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")
