"""Trained run + store -> a report directory's data (`usae analyze`): concepts.parquet,
metrics.json, figures/*.png and thumbs/<k>/ (top images and their token maps as small JPEGs); then the render
step (``usae.analysis.render``) turns that data into index.html and concepts/<k>.html.

When the run's backbones include several layers of one model (store groups ``model@layer``),
the pass also counts pairwise co-fires and the report gains the layer-alignment view
(``metrics.layer_alignment``: shared concepts between every two (model, layer) groups).

One streaming pass over the store computes every metric (``usae.analysis.metrics``, the
definitions of docs/method.md); only the images shown for the top concepts and the gallery's
(the most important concepts of each member set) are read a second time, to draw their token
maps. Photos come from --manifest, else from the store's record (``usae.analysis.photos``).

Compatibility rules between the run and the store (decided here, documented in the CLI help):
- a backbone of the run missing from the store, or a width that differs: refused;
- a store whose fingerprint differs from the one the run was trained on: analysed with a
  warning (evaluating on another dataset is legitimate), and ``--images auto`` then means
  every valid image, since the run's held-out rule only applies to its own store.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from usae.analysis import figures, membership
from usae.analysis import labels as lb
from usae.analysis import metrics as mx
from usae.analysis.photos import ImageSourceError, load_picture, manifest_for
from usae.analysis.photos import image_paths as manifest_paths
from usae.analysis.render import print_summary, render_report, thumb_file
from usae.pipeline.store import Store, StoreError
from usae.trainer.evaluate import Reconstruction, reconstruction
from usae.trainer.model import USAE, load_run

from usae.errors import UsaeError
from usae.runtime import (
    atomic_path,
    atomic_write,
    check_device_name,
    heldout_images,
    progress_bar,
    resolve_device,
    resolve_dtype,
    torch_dtype,
)

ImageChoice = Literal["auto", "holdout", "train", "all"]
AnalyzeDtype = Literal["auto", "fp32", "bf16", "fp64"]
LayerChoice = Literal["auto", "on", "off"]
MemberRule = Literal["need", "fit", "gain"]


class AnalyzeError(UsaeError, RuntimeError):
    """The analysis cannot run (incompatible run/store, bad option, unreadable input)."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """Universal-concept metrics, figures and an HTML report (REPORT/index.html).

    Refuses a store that lacks one of the run's backbones or has other widths; a store with
    another fingerprint than the run's training store is analysed with a warning (and
    --images auto then evaluates every valid image).
    """

    run: str
    """Run directory written by `usae train`."""
    store: str
    """Activation store (S.zarr) to evaluate on."""
    out: str
    """Report directory to write (created; existing report files are replaced)."""
    baseline: str = ""
    """Run directory of an --independent run: match its dictionaries to the USAE's."""
    images: ImageChoice = "auto"
    """Images to evaluate: holdout, train, all, or auto (holdout when the run held some out)."""
    tau: float = 0.1
    """A concept fires on a token when its code is > tau."""
    batch_tokens: int = 4096
    """Tokens encoded per batch."""
    device: str = "cpu"
    """Torch device: auto (CUDA when available), cpu, cuda or cuda:N."""
    dtype: AnalyzeDtype = "fp32"
    """Encoder compute dtype: fp32, bf16, fp64, or auto (bf16 where it is fast, else fp32); error sums are float64 always."""
    top_concepts: int = 12
    """Concepts given a page with images: the N most important and the N most universal."""
    top_images: int = 6
    """Top activating images kept per concept."""
    image_score: Literal["max", "mean"] = "max"
    """Score of an image for a concept: max or mean of its tokens' codes (averaged over backbones)."""
    image_root: str = ""
    """Folder the manifest's paths are relative to (default: the store's record, else the manifest's folder)."""
    manifest: str = ""
    """Manifest (parquet/csv with image_id, path) of the photos to show (default: the one the store records)."""
    gallery: int = 6
    """Index-page gallery: the N most important concepts of each member set (all, each subset, each backbone alone); 0: none."""
    maximize: str = ""
    """Folder of `usae maximize` outputs (<k>/panel.png) to show (default: REPORT/maximize)."""
    match_top: int = 100
    """Baseline matching is also summarised over the N most co-firing concepts."""
    layer_alignment: LayerChoice = "auto"
    """Concepts shared between every two backbones (pairwise co-fires, a heatmap): auto (when several layers of one model are present), on, off."""
    share_threshold: float = 0.5
    """Layer alignment: a concept is shared by two backbones when co-fires / min(their fires) >= this."""
    share_min_fires: int = 10
    """Layer alignment: only concepts firing at least this often in both backbones can be shared."""
    label_column: str = "label"
    """Manifest column of image labels (else the store's label array) for concept labels and sparse probing; "" = off."""
    label_top_images: int = 20
    """Labels: a concept's top labels are counted over its N top activating images."""
    probe_images: int = 10_000
    """Labels: at most N labelled images probed (a stable hash sample); memory ~ N x distinct concepts per image x 8 bytes per backbone."""
    probe_labels: int = 50
    """Labels: the N most frequent labels are probed."""
    member_rule: MemberRule = "need"
    """Which backbones a concept lives in: need (default: backbone i's held-out reconstruction needs the concept, its contribution explaining >= 0.5 of i's activation along its direction, or >= 0.25 x that share where it is needed most; the gain rule for a concept no backbone needs), fit (backbone i's activations follow the concept's code along its direction, tested per backbone; right on planted data, not on real-feature twins) or gain (decoder gain >= 0.25 x the concept's largest; energies without gains)."""

    def __post_init__(self) -> None:
        checks = [
            (
                self.images in ImageChoice.__args__,
                f"--images must be one of {', '.join(ImageChoice.__args__)}",
            ),
            (self.tau >= 0, "--tau must be >= 0"),
            (self.batch_tokens >= 1, "--batch-tokens must be >= 1"),
            (
                self.dtype in AnalyzeDtype.__args__,
                f"--dtype must be one of {', '.join(AnalyzeDtype.__args__)}",
            ),
            (
                self.top_concepts >= 0 and self.top_images >= 0 and self.gallery >= 0,
                "--top-concepts, --top-images and --gallery must be >= 0",
            ),
            (self.image_score in ("max", "mean"), "--image-score must be max or mean"),
            (self.match_top >= 1, "--match-top must be >= 1"),
            (
                self.layer_alignment in LayerChoice.__args__,
                f"--layer-alignment must be one of {', '.join(LayerChoice.__args__)}",
            ),
            (0 < self.share_threshold <= 1, "--share-threshold must be in (0, 1]"),
            (self.share_min_fires >= 1, "--share-min-fires must be >= 1"),
            (
                min(self.label_top_images, self.probe_images, self.probe_labels) >= 1,
                "--label-top-images, --probe-images and --probe-labels must be >= 1",
            ),
            (
                self.member_rule in MemberRule.__args__,
                f"--member-rule must be one of {', '.join(MemberRule.__args__)}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise AnalyzeError(msg)
        check_device_name(self.device)


class AnalyzeResult(NamedTuple):
    """What ``run_analyze`` wrote and found."""

    out: Path
    metrics: dict
    concepts: pd.DataFrame


# ---------------------------------------------------------------- loading and checks
class Inputs(NamedTuple):
    model: USAE
    run_cfg: dict
    store: Store
    keys: list[str]
    groups: list[mx.Group]
    """(model, layer) of each backbone: the store group's spec record, else its key (``@``)."""
    same_store: bool
    """The store is the one the run was trained on (same fingerprint, or none recorded)."""
    warnings: list[str]


def load_inputs(cfg: AnalyzeConfig) -> Inputs:
    """Load run and store; refuse mismatched backbones/widths, warn on another fingerprint."""
    try:
        model, run_cfg = load_run(cfg.run)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        raise AnalyzeError(f"cannot load run {cfg.run}: {e}") from None
    try:
        store = Store.open(cfg.store)
    except StoreError as e:
        raise AnalyzeError(str(e)) from None
    keys = list(model.spec.backbones)
    missing = [k for k in keys if k not in store.backbones]
    if missing:
        raise AnalyzeError(
            f"the run was trained on backbones {keys} but the store {cfg.store} lacks {missing} "
            f"(it has {store.backbones})"
        )
    bad = [
        f"{k}: run {w}, store {store.widths[k]}"
        for k, w in zip(keys, model.spec.widths, strict=True)
        if store.widths[k] != w
    ]
    if bad:
        raise AnalyzeError(f"activation widths differ between run and store ({'; '.join(bad)})")
    notes = []
    run_fp = (run_cfg.get("store") or {}).get("fingerprint")
    same_store = not run_fp or run_fp == store.attrs.get("fingerprint")
    if not same_store:
        notes.append(
            f"store fingerprint {store.attrs.get('fingerprint')} differs from the run's training store "
            f"({run_fp}): evaluating on other data"
        )
    return Inputs(model, run_cfg, store, keys, backbone_groups(store, keys), same_store, notes)


def backbone_groups(store: Store, keys: Sequence[str]) -> list[mx.Group]:
    """(model, layer) of each store group: its spec record's ``model_key`` and ``layer`` when
    recorded (`usae extract`), else parsed from the key (``registry.split_layers``)."""
    from usae.pipeline.registry import split_layers

    out = []
    for k in keys:
        spec = store.spec(k)
        model, layer = split_layers(k)
        if spec.get("model_key"):
            model, layer = str(spec["model_key"]), spec.get("layer")
        out.append(mx.Group(k, model, None if layer is None else int(layer)))
    return out


def wants_layer_alignment(cfg: AnalyzeConfig, inp: Inputs) -> bool:
    """Pairwise co-fires are counted only when asked (on) or, in auto, for layers of one model."""
    if len(inp.keys) < 2 or cfg.layer_alignment == "off":
        return False
    return cfg.layer_alignment == "on" or mx.has_layers(inp.groups)


def holdout_fraction(run_cfg: dict) -> float:
    return float((run_cfg.get("train") or {}).get("holdout", 0.0) or 0.0)


def select_images(
    store: Store, run_cfg: dict, which: str, same_store: bool
) -> tuple[np.ndarray, str]:
    """Boolean mask over images to evaluate, and the resolved choice.

    Held-out images are those of the run's rule (``usae.runtime.heldout_images``, the
    trainer's): the store's split when it has one (split != "train"), else a stable hash of
    the image id with the run's holdout fraction.
    """
    frac = holdout_fraction(run_cfg)
    if which == "auto":
        which = "holdout" if frac > 0 and same_store else "all"
    valid = store.valid
    if which == "all":
        if not valid.any():
            raise AnalyzeError(f"{store.path} holds no valid image")
        return valid, which
    if frac <= 0:
        raise AnalyzeError(f"--images {which}: the run held no images out (holdout fraction 0)")
    held = heldout_images(store, frac)
    mask = valid & (held if which == "holdout" else ~held)
    if not mask.any():
        raise AnalyzeError(f"--images {which} selects no valid image of {store.path}")
    return mask, which


# ---------------------------------------------------------------- the analysis
def run_analyze(cfg: AnalyzeConfig, progress: bool = True) -> AnalyzeResult:
    """Stream the store once, compute every metric, write the report's data, then render it."""
    device = resolve_device(cfg.device)
    dtype = torch_dtype(resolve_dtype(cfg.dtype, device))
    inp = load_inputs(cfg)
    mask, which = select_images(inp.store, inp.run_cfg, cfg.images, inp.same_store)
    notes = list(inp.warnings)
    manifest = image_manifest(cfg, inp.store, notes)
    paths = manifest_paths(manifest)
    out = Path(cfg.out)
    for sub in ("figures", "concepts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_rows = int(mask.sum()) * inp.store.tokens_per_image
    pairwise = wants_layer_alignment(cfg, inp)
    labels = image_labels(cfg, inp.store, manifest)
    ps, maxima = None, None
    if labels is not None:  # the probed images' per-image max codes, kept sparse in the pass
        ps = lb.probe_set(mask, labels, inp.store.image_ids, cfg.probe_images)
        maxima = lb.MaximaCollector(ps.images_n, inp.model.n_models, inp.model.spec.concepts)
    with progress_bar(progress) as bar:
        task = bar.add_task("analyze (tokens)", total=n_rows)
        sums = mx.stream_sums(
            inp.model, inp.store, inp.keys, mask, tau=cfg.tau, batch_tokens=cfg.batch_tokens,
            top_images=max(cfg.top_images, cfg.label_top_images if labels else 0),
            image_score=cfg.image_score, dtype=dtype, device=device,
            on_batch=lambda n: bar.advance(task, n), pairwise=pairwise, image_maxima=maxima,
        )  # fmt: skip
    label_cols = lb.top_labels(sums.top_image_mg, labels, cfg.label_top_images)
    sums = dataclasses.replace(  # the report shows --top-images of the images kept
        sums, top_score_mg=sums.top_score_mg[:, : cfg.top_images],
        top_image_mg=sums.top_image_mg[:, : cfg.top_images],
    )  # fmt: skip
    with (
        torch.no_grad()
    ):  # decoder row norms: each concept's gain in each backbone (1 without gains)
        gains = np.stack(
            [inp.model.gain(j).double().cpu().numpy() for j in range(inp.model.n_models)]
        )
    rec, table = reconstruction(sums), mx.concept_table(sums, gains)
    if inp.model.spec.independent:
        notes.append(
            "independent SAEs: concept k of one backbone is unrelated to concept k of another, "
            "so firing entropy and co-fires do not measure universality here"
        )
    base = baseline_matching(cfg, inp, table, notes)
    top = mx.select_top_concepts(table, cfg.top_concepts)
    shared = membership.sharing(inp.model, inp.keys, table, gains, cfg.member_rule)
    df = pd.concat([concept_frame(inp.keys, table, base, shared), label_cols], axis=1)
    gallery = gallery_sets(df, inp.keys, cfg.gallery)
    shown = list(dict.fromkeys(top["importance"] + top["universality"]))
    shown += [k for g in gallery for k in g["concepts"] if k not in shown]
    tops = top_images(inp, sums, shown, out, dtype, device, paths)
    metrics = summary_metrics(cfg, inp, which, sums, rec, table, base, top, tops, notes)
    metrics["gallery"] = gallery
    metrics["photos"] = paths is not None
    rule = cfg.member_rule  # without gains, need and gain both read energies
    rule = rule if inp.model.spec.gains or rule == "fit" else "energy"
    metrics["membership"] = membership.membership_summary(shared, rule)
    metrics["labels"] = None
    if labels is not None:
        metrics["labels"] = lb.labels_entry(
            labels, ps, maxima.matrices(), inp.keys, top_images=cfg.label_top_images,
            max_labels=cfg.probe_labels,
        )  # fmt: skip
    figures.write_figures(out / "figures", inp.keys, rec, table, metrics)
    layer_png = out / "figures" / "layer_alignment.png"
    if metrics["layer_alignment"] is not None:
        figures.draw_layer_alignment(layer_png, metrics["layer_alignment"])
    else:
        layer_png.unlink(missing_ok=True)  # a previous report's figure would be stale
    with atomic_path(out / "concepts.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    clean = _clean(metrics)
    atomic_write(out / "metrics.json", json.dumps(clean, indent=1, allow_nan=False))
    render_report(out, cfg.maximize or None)
    if progress:
        print_summary(clean)
    return AnalyzeResult(out, metrics, df)


# ---------------------------------------------------------------- tables and scalar findings
def baseline_matching(
    cfg: AnalyzeConfig, inp: Inputs, table: mx.ConceptTable, notes: list[str]
) -> dict | None:
    """Hungarian matching of each backbone's USAE dictionary to the --baseline run's."""
    if not cfg.baseline:
        return None
    try:
        base, _ = load_run(cfg.baseline)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        raise AnalyzeError(f"cannot load baseline run {cfg.baseline}: {e}") from None
    if not base.spec.independent:
        notes.append(f"baseline {cfg.baseline} is not an --independent run; matched anyway")
    top = np.argsort(-table.cofires_m, kind="stable")[: cfg.match_top]
    out: dict[str, Any] = {"per_backbone": {}, "cosine": {}, "partner": {}}
    for i, key in enumerate(inp.keys):
        if key not in base.spec.backbones:
            raise AnalyzeError(
                f"baseline run has no backbone {key!r} (it has {list(base.spec.backbones)})"
            )
        j = base.spec.backbones.index(key)
        if base.spec.widths[j] != inp.model.spec.widths[i]:
            raise AnalyzeError(
                f"baseline width of {key!r} is {base.spec.widths[j]}, the run's {inp.model.spec.widths[i]}"
            )
        with torch.no_grad():
            a = inp.model.decoder_weight(i).detach().double().cpu().numpy()
            b = base.decoder_weight(j).detach().double().cpu().numpy()
        match = mx.match_dictionaries(a, b)
        out["cosine"][key], out["partner"][key] = match.cosine_m, match.partner_m
        out["per_backbone"][key] = {
            "all": mx.matching_summary(match.cosine_m),
            f"top{cfg.match_top}_cofiring": mx.matching_summary(match.cosine_m, top),
        }
    return out


def concept_frame(
    keys: Sequence[str], t: mx.ConceptTable, base: dict | None, sh: membership.Sharing | None = None
) -> pd.DataFrame:
    """One row per concept with every per-backbone statistic."""
    rank = np.empty_like(t.importance_m, dtype=np.int64)
    rank[np.argsort(-t.importance_m, kind="stable")] = np.arange(1, len(rank) + 1)
    cols: dict[str, Any] = {
        "concept": np.arange(len(t.importance_m)),
        "importance": t.importance_m,
        "importance_rank": rank,
        "firing_entropy": t.firing_entropy_m,
        "cofires": t.cofires_m,
        "union_fires": t.union_m,
        "cofire_iou": t.iou_m,
        "dead": t.dead_m,
    }
    if sh is not None:
        cols["members"] = sh.labels
        cols["duplicate_of"] = sh.duplicate_of
    for i, k in enumerate(keys):
        if sh is not None:
            cols[f"member_{k}"] = sh.members_mk[i]
        cols[f"fires_{k}"] = t.fires_mm[i]
        cols[f"energy_{k}"] = t.energy_mm[i]
        cols[f"cfp_{k}"] = t.cfp_mm[i]
        if t.fit_corr_mm is not None:
            cols[f"fit_corr_{k}"] = t.fit_corr_mm[i]
            cols[f"fit_beta_{k}"] = t.fit_beta_mm[i]
            cols[f"fit_slope_{k}"] = t.fit_slope_mm[i]
            cols[f"fit_n_{k}"] = t.fit_n_mm[i].astype(np.int64)
            cols[f"need_{k}"] = t.fit_need_mm[i]
        if base is not None:
            cols[f"match_cosine_{k}"] = base["cosine"][k]
            cols[f"match_partner_{k}"] = base["partner"][k]
    return pd.DataFrame(cols)


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0}
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "share_above_0.9": float((x > 0.9).mean()),
        "share_below_0.1": float((x < 0.1).mean()),
    }


def summary_metrics(
    cfg,
    inp: Inputs,
    which: str,
    s: mx.Sums,
    rec: Reconstruction,
    t: mx.ConceptTable,
    base: dict | None,
    top: dict,
    tops: dict[int, list[TopImage]],
    notes: list[str],
) -> dict:
    """The scalar findings written to metrics.json."""
    keys = inp.keys
    by_imp = np.argsort(-t.importance_m, kind="stable")
    n_top = min(100, int((~t.dead_m).sum()))
    corr = {
        name: mx.cofire_vs_importance(t.cofires_m, t.importance_m, lo)._asdict()
        for name, lo in (("all", 0), ("cofires_ge_1000", 1000))
    }
    n_img = s.n_tokens // max(inp.store.tokens_per_image, 1)
    return {
        "schema_version": 1,
        "run": str(cfg.run),
        "store": str(cfg.store),
        "baseline": cfg.baseline or None,
        "store_fingerprint": inp.store.attrs.get("fingerprint"),
        "run_store_fingerprint": (inp.run_cfg.get("store") or {}).get("fingerprint"),
        "independent": inp.model.spec.independent,
        "training": training_entry(inp.run_cfg),
        "images": which,
        "n_images": int(n_img),
        "n_tokens": int(s.n_tokens),
        "tau": cfg.tau,
        "backbones": keys,
        "concepts": int(inp.model.spec.concepts),
        "k": int(inp.model.spec.k),
        "r2": rec.r2.tolist(),
        "r2_channel": rec.r2_channel.tolist(),
        "mse": rec.mse.tolist(),
        "r2_self": {k: float(rec.r2[i, i]) for i, k in enumerate(keys)},
        "l0": {k: float(rec.l0[i]) for i, k in enumerate(keys)},
        "dead": int(t.dead_m.sum()),
        "dead_share": float(t.dead_m.mean()),
        "firing_entropy": _stats(t.firing_entropy_m),
        "cofire_proportion_top100": {
            k: float(np.nanmean(t.cfp_mm[i, by_imp[:n_top]])) if n_top else None
            for i, k in enumerate(keys)
        },
        "cofire_vs_importance": corr,
        "baseline_matching": None if base is None else base["per_backbone"],
        "layer_alignment": layer_entry(cfg, inp, s, rec),
        "top_concepts": top,
        "top_images": {str(k): [t._asdict() for t in items] for k, items in tops.items()},
        "image_failures": image_failures(tops),
        "warnings": notes,
        "config": asdict(cfg),
    }


def training_entry(run_cfg: dict) -> dict | None:
    """How the run was trained, as its config.json says (what a reader of the findings needs:
    the recipe, the mode, the start, the steps; None when the config records no training)."""
    from usae.trainer.config import TrainConfig

    train = run_cfg.get("train") or {}
    if not train:
        return None
    t = TrainConfig.from_dict(train).resolved()  # the same reading of old configs as resuming
    return {"recipe": t.recipe, "mode": t.mode, "init": t.init, "steps": train.get("steps"),
            "agree_weight": t.agree_weight, "backbones": list(t.backbones)}  # fmt: skip


def layer_entry(cfg: AnalyzeConfig, inp: Inputs, s: mx.Sums, rec: Reconstruction) -> dict | None:
    """metrics.json's ``layer_alignment`` (None when the pairwise co-fires were not counted):
    ``metrics.layer_alignment`` plus the cross-model R2 in the same group order."""
    if s.pair_cofires_mmm is None:
        return None
    entry = mx.layer_alignment(
        inp.groups, s.pair_cofires_mmm, cfg.share_threshold, cfg.share_min_fires
    )
    order = [inp.keys.index(g["key"]) for g in entry["groups"]]
    entry["r2"] = rec.r2[np.ix_(order, order)].tolist()
    entry["layers_present"] = mx.has_layers(inp.groups)
    return entry


def _clean(o: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


# ---------------------------------------------------------------- labels
def image_labels(
    cfg: AnalyzeConfig, store: Store, manifest: pd.DataFrame | None
) -> lb.Labels | None:
    """Each store image's label: the ONE place labels come from. ``--label-column`` of the
    manifest (``--manifest``, else the store's recorded one), else the store's ``label`` array;
    None when off, absent or a single class. A column named explicitly and found nowhere is an
    error."""
    if not cfg.label_column:
        return None
    arr = store.labels
    from_store = None if arr is None else pd.Series(arr, index=list(store.image_ids))
    try:
        found = lb.label_table(manifest, from_store, cfg.label_column)
    except lb.LabelError as e:
        raise AnalyzeError(str(e)) from None
    if found is None:
        return None
    table, source = found
    return lb.encode_labels(table, store.image_ids, cfg.label_column, source)


# ---------------------------------------------------------------- top images
class TopImage(NamedTuple):
    """One top activating image of a concept."""

    image_index: int
    image_id: str
    score: float
    failure: str | None
    """Why the picture could not be shown (None: shown, or no manifest)."""


def image_manifest(cfg: AnalyzeConfig, store: Store, notes: list[str]) -> pd.DataFrame | None:
    """The manifest, from --manifest or the store's record (None: none, with a warning in
    ``notes`` when the recorded one moved). Refuses an unreadable --manifest."""
    try:
        return manifest_for(cfg.manifest, cfg.image_root, store, notes)
    except ImageSourceError as e:
        raise AnalyzeError(str(e)) from None


def top_images(
    inp: Inputs,
    s: mx.Sums,
    shown: Sequence[int],
    out: Path,
    dtype: torch.dtype,
    device: torch.device,
    paths: dict | None,
) -> dict[int, list[TopImage]]:
    """Top images of the shown concepts; each one's photo and token map per backbone are
    written as thumbnails under out/thumbs/<k>/ (``render.thumb_file`` names them)."""
    per: dict[int, list[int]] = {k: [int(g) for g in s.top_image_mg[k] if g >= 0] for k in shown}
    images = sorted({g for gs in per.values() for g in gs})
    maps = mx.token_maps(
        inp.model, inp.store, inp.keys, images, list(shown), dtype=dtype, device=device
    )
    row_of = {g: n for n, g in enumerate(images)}
    ids = inp.store.image_ids
    pictures = {g: load_picture(paths, str(ids[g])) for g in images}
    clear_thumbs(out)
    tops: dict[int, list[TopImage]] = {}
    for c, k in enumerate(shown):
        tops[k] = [
            TopImage(g, str(ids[g]), float(s.top_score_mg[k][n]), pictures[g][1])
            for n, g in enumerate(per[k])
        ]
        for n, t in enumerate(tops[k]):
            figures.write_thumbs(
                out, pictures[t.image_index][0], maps[row_of[t.image_index], c], inp.keys,
                photo=thumb_file(k, n), heat={key: thumb_file(k, n, key) for key in inp.keys},
            )  # fmt: skip
    return tops


def clear_thumbs(out: Path) -> None:
    """Remove the thumbnails (and top-image panels of older reports) a previous analysis left."""
    import shutil

    shutil.rmtree(out / "thumbs", ignore_errors=True)
    for old in (out / "images").glob("*.png"):
        if old.stem.isdigit():
            old.unlink()


def gallery_sets(df: pd.DataFrame, keys: Sequence[str], n: int) -> list[dict]:
    """The index page's gallery: for each member set (all backbones, then each subset that
    occurs, larger first, then each backbone alone), its n most important concepts:
    [{members, concepts}] (concepts may be empty for a backbone alone; none when n = 0 or
    the frame has no ``members``)."""
    if n <= 0 or "members" not in df.columns:
        return []
    labels = df["members"].astype(str).to_numpy()
    found = {lab for lab in labels if lab}
    alone = list(keys)
    pos = {k: i for i, k in enumerate(keys)}

    def rank(lab: str) -> tuple:  # all, then larger sets, then in backbone order
        parts = [] if lab == "all" else lab.split("+")
        return (lab != "all", -len(parts), [pos.get(p, len(pos)) for p in parts])

    multi = sorted((lab for lab in found if lab not in alone), key=rank)
    order = np.argsort(-df["importance"].to_numpy(np.float64), kind="stable")
    out = []
    for lab in multi + alone:
        ks = [int(df["concept"].iat[r]) for r in order if labels[r] == lab][:n]
        out.append({"members": lab, "concepts": ks})
    return out


def image_failures(tops: dict[int, list[TopImage]]) -> list[dict]:
    """Each top image that could not be shown, once: {image_id, reason}."""
    seen: dict[str, str] = {}
    for items in tops.values():
        for t in items:
            if t.failure and t.image_id not in seen:
                seen[t.image_id] = t.failure
    return [{"image_id": i, "reason": r} for i, r in seen.items()]
