"""Trained run + store -> REPORT/ (`usae analyze`): concepts.parquet, metrics.json, figures,
top-image panels and a self-contained HTML report (index.html + concepts/<k>.html).

One streaming pass over the store computes every metric (``usae.analysis.metrics``); only
the images shown for the top concepts are read a second time, to draw their token maps.

Compatibility rules between the run and the store (decided here, documented in the CLI help):
- a backbone of the run missing from the store, or a width that differs: refused;
- a store whose fingerprint differs from the one the run was trained on: analysed with a
  warning (evaluating on another dataset is legitimate), and ``--images auto`` then means
  every valid image, since the run's held-out rule only applies to its own store.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from usae.analysis import metrics as mx
from usae.pipeline.store import Store, StoreError
from usae.trainer.model import USAE, load_run

from usae.errors import UsaeError
from usae.runtime import holdout_mask

IMAGE_CHOICES = ("auto", "holdout", "train", "all")


class AnalyzeError(UsaeError, RuntimeError):
    """The analysis cannot run (incompatible run/store, bad option, unreadable input)."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of ``usae analyze``."""

    run: str
    """Run directory written by `usae train`."""
    store: str
    """Activation store (S.zarr) to evaluate on."""
    out: str
    """Report directory to write (created; existing report files are replaced)."""
    baseline: str = ""
    """Run directory of an --independent run: match its dictionaries to the USAE's."""
    images: str = "auto"
    """Images to evaluate: holdout, train, all, or auto (holdout when the run held some out)."""
    tau: float = 0.1
    """A concept fires on a token when its code is > tau."""
    batch_tokens: int = 4096
    """Tokens encoded per batch."""
    device: str = "cpu"
    """Torch device (cpu, cuda, ...)."""
    dtype: str = "float32"
    """Encoder compute dtype: float32, bfloat16 or float64 (error sums are float64 always)."""
    top_concepts: int = 12
    """Concepts given a page with images: the N most important and the N most universal."""
    top_images: int = 6
    """Top activating images kept per concept."""
    image_score: str = "max"
    """Score of an image for a concept: max or mean of its tokens' codes (averaged over backbones)."""
    image_root: str = ""
    """Folder the manifest's paths are relative to (default: the manifest's folder)."""
    manifest: str = ""
    """Manifest (parquet/csv with image_id, path) to show the top images themselves."""
    maximize: str = ""
    """Folder of `usae maximize` outputs (<k>/panel.png) to show (default: REPORT/maximize)."""
    match_top: int = 100
    """Baseline matching is also summarised over the N most co-firing concepts."""

    def validate(self) -> None:
        checks = [
            (self.images in IMAGE_CHOICES, f"--images must be one of {', '.join(IMAGE_CHOICES)}"),
            (self.tau >= 0, "--tau must be >= 0"),
            (self.batch_tokens >= 1, "--batch-tokens must be >= 1"),
            (self.dtype in mx.DTYPES, f"--dtype must be one of {', '.join(mx.DTYPES)}"),
            (self.top_concepts >= 0 and self.top_images >= 0, "--top-concepts and --top-images must be >= 0"),
            (self.image_score in ("max", "mean"), "--image-score must be max or mean"),
            (self.match_top >= 1, "--match-top must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise AnalyzeError(msg)
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise AnalyzeError(f"--device {self.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AnalyzeError(f"--device {self.device}: CUDA is not available here; use --device cpu")


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
    bad = [f"{k}: run {w}, store {store.widths[k]}" for k, w in zip(keys, model.spec.widths, strict=True) if store.widths[k] != w]
    if bad:
        raise AnalyzeError(f"activation widths differ between run and store ({'; '.join(bad)})")
    notes = []
    run_fp = (run_cfg.get("store") or {}).get("fingerprint")
    if run_fp and run_fp != store.attrs.get("fingerprint"):
        notes.append(
            f"store fingerprint {store.attrs.get('fingerprint')} differs from the run's training store "
            f"({run_fp}): evaluating on other data"
        )
    return Inputs(model, run_cfg, store, keys, notes)


def holdout_fraction(run_cfg: dict) -> float:
    return float((run_cfg.get("train") or {}).get("holdout", 0.0) or 0.0)


def select_images(store: Store, run_cfg: dict, which: str, same_store: bool) -> tuple[np.ndarray, str]:
    """Boolean mask over images to evaluate, and the resolved choice.

    Held-out images are those of the run's rule: the store's split when it has one
    (split != "train"), else ``holdout_mask`` with the run's holdout fraction.
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
    split = store.split
    held = split != "train" if split is not None else holdout_mask(list(store.image_ids), frac)
    mask = valid & (held if which == "holdout" else ~held)
    if not mask.any():
        raise AnalyzeError(f"--images {which} selects no valid image of {store.path}")
    return mask, which


# ---------------------------------------------------------------- the analysis
def run_analyze(cfg: AnalyzeConfig, progress: bool = True) -> AnalyzeResult:
    """Stream the store once, compute every metric, write the report directory."""
    cfg.validate()
    inp = load_inputs(cfg)
    same = not any("fingerprint" in w for w in inp.warnings)
    mask, which = select_images(inp.store, inp.run_cfg, cfg.images, same)
    paths = image_paths(cfg)
    out = Path(cfg.out)
    for sub in ("figures", "concepts", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    dtype = mx.DTYPES[cfg.dtype]
    n_rows = int(mask.sum()) * inp.store.tokens_per_image
    with _bar(progress, n_rows, "analyze") as step:
        sums = mx.stream_sums(
            inp.model, inp.store, inp.keys, mask, tau=cfg.tau, batch_tokens=cfg.batch_tokens,
            top_images=cfg.top_images, image_score=cfg.image_score, dtype=dtype, device=cfg.device, on_batch=step,
        )  # fmt: skip
    rec, table = mx.reconstruction(sums), mx.concept_table(sums)
    notes = list(inp.warnings)
    if inp.model.spec.independent:
        notes.append("independent SAEs: concept k of one backbone is unrelated to concept k of another, "
                     "so firing entropy and co-fires do not measure universality here")
    base = baseline_matching(cfg, inp, table, notes)
    top = mx.select_top_concepts(table, cfg.top_concepts)
    shown = list(dict.fromkeys(top["importance"] + top["universality"]))
    df = concept_frame(inp.keys, table, base)
    metrics = summary_metrics(cfg, inp, which, sums, rec, table, base, top, notes)
    tops = top_image_panels(cfg, inp, sums, shown, out, dtype, paths, metrics)
    write_figures(out / "figures", inp.keys, rec, table, metrics)
    write_html(cfg, out, inp.keys, df, metrics, shown, tops)
    df.to_parquet(out / "concepts.parquet", index=False)
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=1, allow_nan=False))
    if progress:
        print_summary(metrics)
    return AnalyzeResult(out, metrics, df)


# ---------------------------------------------------------------- tables and scalar findings
def baseline_matching(cfg: AnalyzeConfig, inp: Inputs, table: mx.ConceptTable, notes: list[str]) -> dict | None:
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
            raise AnalyzeError(f"baseline run has no backbone {key!r} (it has {list(base.spec.backbones)})")
        j = base.spec.backbones.index(key)
        if base.spec.widths[j] != inp.model.spec.widths[i]:
            raise AnalyzeError(f"baseline width of {key!r} is {base.spec.widths[j]}, the run's {inp.model.spec.widths[i]}")
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


def concept_frame(keys: Sequence[str], t: mx.ConceptTable, base: dict | None) -> pd.DataFrame:
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
    for i, k in enumerate(keys):
        cols[f"fires_{k}"] = t.fires_mm[i]
        cols[f"energy_{k}"] = t.energy_mm[i]
        cols[f"cfp_{k}"] = t.cfp_mm[i]
        if base is not None:
            cols[f"match_cosine_{k}"] = base["cosine"][k]
            cols[f"match_partner_{k}"] = base["partner"][k]
    return pd.DataFrame(cols)


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
            "share_above_0.9": float((x > 0.9).mean()), "share_below_0.1": float((x < 0.1).mean())}


def summary_metrics(cfg, inp: Inputs, which: str, s: mx.Sums, rec: mx.Reconstruction, t: mx.ConceptTable,
                    base: dict | None, top: dict, notes: list[str]) -> dict:
    """The scalar findings written to metrics.json."""
    keys = inp.keys
    by_imp = np.argsort(-t.importance_m, kind="stable")
    n_top = min(100, int((~t.dead_m).sum()))
    corr = {name: mx.cofire_vs_importance(t.cofires_m, t.importance_m, lo)._asdict() for name, lo in (("all", 0), ("cofires_ge_1000", 1000))}
    n_img = s.n_tokens // max(inp.store.tokens_per_image, 1)
    return {
        "schema_version": 1,
        "run": str(cfg.run), "store": str(cfg.store), "baseline": cfg.baseline or None,
        "store_fingerprint": inp.store.attrs.get("fingerprint"),
        "run_store_fingerprint": (inp.run_cfg.get("store") or {}).get("fingerprint"),
        "independent": inp.model.spec.independent,
        "images": which, "n_images": int(n_img), "n_tokens": int(s.n_tokens), "tau": cfg.tau,
        "backbones": keys, "concepts": int(inp.model.spec.concepts), "k": int(inp.model.spec.k),
        "r2": rec.r2.tolist(), "r2_channel": rec.r2_channel.tolist(), "mse": rec.mse.tolist(),
        "r2_self": {k: float(rec.r2[i, i]) for i, k in enumerate(keys)},
        "l0": {k: float(rec.l0[i]) for i, k in enumerate(keys)},
        "dead": int(t.dead_m.sum()), "dead_share": float(t.dead_m.mean()),
        "firing_entropy": _stats(t.firing_entropy_m),
        "cofire_proportion_top100": {k: float(np.nanmean(t.cfp_mm[i, by_imp[:n_top]])) if n_top else None for i, k in enumerate(keys)},
        "cofire_vs_importance": corr,
        "baseline_matching": None if base is None else base["per_backbone"],
        "top_concepts": top, "top_images": {}, "image_failures": [],
        "warnings": notes, "config": asdict(cfg),
    }


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


# ---------------------------------------------------------------- progress and summary
class _bar:
    """Rich progress bar over tokens (a no-op when progress is off); yields a step function."""

    def __init__(self, show: bool, total: int, desc: str):
        self.show, self.total, self.desc = show, total, desc

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                          TimeRemainingColumn(), transient=False)
        self.p.start()
        task = self.p.add_task(self.desc, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.show:
            self.p.stop()
        return False


def print_summary(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = m["backbones"]
    tab = Table(title=f"usae analyze: {m['n_images']} images ({m['images']}), {m['n_tokens']} tokens")
    tab.add_column("codes from \\ R2 of")
    for k in keys:
        tab.add_column(k, justify="right")
    tab.add_column("L0", justify="right")
    for i, k in enumerate(keys):
        tab.add_row(k, *[_fmt(v) for v in m["r2"][i]], _fmt(m["l0"][k]))
    con = Console()
    con.print(tab)
    c = m["cofire_vs_importance"]
    fe = m["firing_entropy"]
    con.print(f"dead {m['dead']}/{m['concepts']}; firing entropy mean {_fmt(fe.get('mean'))}, "
              f"share > 0.9 {_fmt(fe.get('share_above_0.9'))}; co-fire vs importance r {_fmt(c['all']['r'])} "
              f"(>= 1000 co-fires: {_fmt(c['cofires_ge_1000']['r'])})", highlight=False)
    if m["baseline_matching"]:
        for k, v in m["baseline_matching"].items():
            con.print(f"baseline {k}: matched at cos > 0.5 {_fmt(v['all']['share_matched'])}, "
                      f"mean cosine {_fmt(v['all']['mean_cosine'])}", highlight=False)
    for w in m["warnings"]:
        con.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
    if m["image_failures"]:
        con.print(f"{len(m['image_failures'])} top images could not be loaded (placeholders shown)", style="yellow")


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


# ---------------------------------------------------------------- top images
class TopImage(NamedTuple):
    """One top activating image of a concept."""

    image_index: int
    image_id: str
    score: float
    failure: str | None
    """Why the picture could not be shown (None: shown, or no manifest)."""


def image_paths(cfg: AnalyzeConfig) -> dict[str, Any] | None:
    """image_id -> resolved path from --manifest (None without one). Refuses an unreadable manifest."""
    if not cfg.manifest:
        return None
    from usae.pipeline.manifest import ManifestError, read_manifest, resolve_path

    try:
        df = read_manifest(cfg.manifest, cfg.image_root or None)
    except (ManifestError, OSError, ValueError) as e:
        raise AnalyzeError(f"cannot read manifest {cfg.manifest}: {e}") from None
    root = df.attrs.get("image_root")
    return {str(i): resolve_path(root, str(p)) for i, p in zip(df["image_id"], df["path"], strict=True)}


def _load_picture(paths: dict | None, image_id: str) -> tuple[np.ndarray | None, str | None]:
    if paths is None:
        return None, None
    if image_id not in paths:
        return None, "not in the manifest"
    from usae.pipeline.images import ImageError, load_image

    try:
        return load_image(paths[image_id]), None
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - any unreadable picture becomes a placeholder
        return None, f"{type(e).__name__}: {e}"


def top_image_panels(cfg: AnalyzeConfig, inp: Inputs, s: mx.Sums, shown: Sequence[int], out: Path,
                     dtype: torch.dtype, paths: dict | None, metrics: dict) -> dict[int, list[TopImage]]:
    """Token maps of the shown concepts on their top images -> images/<k>.png, one row per image."""
    per: dict[int, list[int]] = {k: [int(g) for g in s.top_image_mg[k] if g >= 0] for k in shown}
    images = sorted({g for gs in per.values() for g in gs})
    maps = mx.token_maps(inp.model, inp.store, inp.keys, images, list(shown), dtype=dtype, device=cfg.device)
    row_of = {g: n for n, g in enumerate(images)}
    ids = inp.store.image_ids
    pictures = {g: _load_picture(paths, str(ids[g])) for g in images}
    tops: dict[int, list[TopImage]] = {}
    for c, k in enumerate(shown):
        items = [TopImage(g, str(ids[g]), float(s.top_score_mg[k][n]), pictures[g][1]) for n, g in enumerate(per[k])]
        tops[k] = items
        metrics["top_images"][str(k)] = [t._asdict() for t in items]
        if items:
            panel = [(t, pictures[t.image_index][0], maps[row_of[t.image_index], c]) for t in items]
            _draw_panel(out / "images" / f"{k}.png", k, inp.keys, panel)
    seen = set()
    for items in tops.values():
        for t in items:
            if t.failure and t.image_id not in seen:
                seen.add(t.image_id)
                metrics["image_failures"].append({"image_id": t.image_id, "reason": t.failure})
    return tops


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_panel(path: Path, k: int, keys: Sequence[str], rows: list) -> None:
    """Rows: (TopImage, picture or None, maps (M, h, w)); picture + one overlay per backbone."""
    plt = _plt()
    with_pic = any(p is not None or t.failure for t, p, _ in rows)
    ncol = len(keys) + int(with_pic)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.1 * ncol, 2.2 * len(rows)), squeeze=False)
    for r, (t, pic, maps) in enumerate(rows):
        vmax = max(float(maps.max()), 1e-6)  # one scale per image: backbones compare fairly
        sq = _square(pic) if pic is not None else None
        if with_pic:
            ax = axes[r, 0]
            if sq is not None:
                ax.imshow(sq)
            else:
                ax.set_facecolor("#ddd")
                ax.text(0.5, 0.5, "image unavailable\n" + _wrap(t.failure or ""), ha="center", va="center",
                        fontsize=7, transform=ax.transAxes)
            ax.set_title(f"{t.image_id}\nscore {t.score:.2f}", fontsize=8)
        for i, key in enumerate(keys):
            ax = axes[r, i + int(with_pic)]
            if sq is not None:
                ax.imshow(sq, extent=(0, 1, 1, 0))
            ax.imshow(maps[i], cmap="inferno", vmin=0, vmax=vmax, alpha=0.6 if sq is not None else 1.0,
                      extent=(0, 1, 1, 0), interpolation="bilinear" if sq is not None else "nearest")
            ax.set_title(key if with_pic else f"{key}\n{t.image_id}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"concept {k}: token codes per backbone", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _square(pic_hw3: np.ndarray, size: int = 224) -> np.ndarray:
    """Squash-resize like the backbones do, so the token grid lies on the picture."""
    from PIL import Image

    return np.asarray(Image.fromarray(pic_hw3).resize((size, size), Image.BICUBIC))


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:4])


# ---------------------------------------------------------------- figures
def write_figures(fig_dir: Path, keys: Sequence[str], rec: mx.Reconstruction, t: mx.ConceptTable, m: dict) -> None:
    plt = _plt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, draw in (("r2_matrix", _fig_r2), ("firing_entropy", _fig_fe), ("cofire_proportion", _fig_cfp),
                           ("cofire_vs_importance", _fig_scatter)):
            fig = draw(plt, keys, rec, t, m)
            fig.tight_layout()
            fig.savefig(fig_dir / f"{name}.png", dpi=90)
            plt.close(fig)


def _fig_r2(plt, keys, rec, t, m):
    n = len(keys)
    fig, ax = plt.subplots(figsize=(1.4 * n + 2.2, 1.2 * n + 1.6))
    im = ax.imshow(np.nan_to_num(rec.r2, nan=0.0), cmap="viridis", vmin=min(0.0, float(np.nanmin(rec.r2))), vmax=1.0)
    for i in range(n):
        for j in range(n):
            v = rec.r2[i, j]
            ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center",
                    color="white" if np.isfinite(v) and v < 0.6 else "black", fontsize=10)
    ax.set_xticks(range(n), keys)
    ax.set_yticks(range(n), keys)
    ax.set_xlabel("reconstructed backbone j")
    ax.set_ylabel("codes from backbone i")
    ax.set_title("cross-model R2 (scalar mean)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _fig_fe(plt, keys, rec, t, m):
    fig, ax = plt.subplots(figsize=(5, 3.2))
    fe = t.firing_entropy_m[np.isfinite(t.firing_entropy_m)]
    ax.hist(fe, bins=np.linspace(0, 1, 26), color="#4a7bb7")
    ax.set_xlabel("firing entropy (1 = fires evenly in all backbones)")
    ax.set_ylabel("concepts")
    ax.set_title(f"firing entropy of {fe.size} live concepts")
    return fig


def _fig_cfp(plt, keys, rec, t, m):
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    order = np.argsort(-t.importance_m, kind="stable")
    order = order[~t.dead_m[order]]
    rank = np.arange(1, len(order) + 1)
    for i, k in enumerate(keys):
        cfp = t.cfp_mm[i, order]
        ax.scatter(rank, cfp, s=6, alpha=0.35, label=k, color=f"C{i}")
        w = max(1, len(order) // 30)
        if len(order) >= w:
            smooth = pd.Series(cfp).rolling(w, min_periods=1, center=True).mean()
            ax.plot(rank, smooth, lw=1.5, color=f"C{i}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("importance rank")
    ax.set_ylabel("co-fire proportion")
    ax.set_title("co-fire proportion by importance rank")
    ax.legend(fontsize=7, markerscale=2)
    return fig


def _fig_scatter(plt, keys, rec, t, m):
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ok = (t.cofires_m > 0) & (t.importance_m > 0)
    x, y = np.log10(t.importance_m[ok]), np.log10(t.cofires_m[ok].astype(float))
    ax.scatter(x, y, s=6, alpha=0.5)
    c = m["cofire_vs_importance"]["all"]
    if ok.sum() >= 3 and np.isfinite(c["r"]):
        b = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, np.polyval(b, xs), color="crimson", label=f"fit: slope {b[0]:.2f}, r = {c['r']:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("log10 importance (energy summed over backbones)")
    ax.set_ylabel("log10 co-fires")
    ax.set_title(f"co-fires vs importance ({int(ok.sum())} concepts)")
    return fig


# ---------------------------------------------------------------- HTML
def _asset(name: str) -> str:
    return resources.files("usae.analysis").joinpath(name).read_text(encoding="utf-8")


def _page(title: str, body: str, script: bool = False) -> str:
    js = f"<script>\n{_asset('report.js')}\n</script>" if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>\n{_asset('report.css')}\n</style></head>\n"
            f"<body>\n{body}\n{js}\n</body></html>\n")


def _td(v: Any, fmt: str = "{:.3f}", link: str | None = None) -> str:
    """A table cell with its sort key in data-v (empty when missing)."""
    if v is None or (isinstance(v, float | np.floating) and not np.isfinite(v)):
        return '<td data-v="">n/a</td>'
    text = fmt.format(v)
    if link:
        text = f'<a href="{link}">{text}</a>'
    return f'<td data-v="{v}">{text}</td>'


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{html.escape(value)}</div><div class="l">{html.escape(label)}</div></div>'


def maximize_panels(cfg: AnalyzeConfig, out: Path) -> dict[int, str]:
    """concept -> relative path of its activation-maximisation panel (copied into REPORT/maximize)."""
    src = Path(cfg.maximize) if cfg.maximize else out / "maximize"
    found: dict[int, str] = {}
    if not src.is_dir():
        return found
    for d in sorted(src.iterdir()):
        if d.is_dir() and d.name.isdigit() and (d / "panel.png").is_file():
            dst = out / "maximize" / d.name / "panel.png"
            if dst.resolve() != (d / "panel.png").resolve():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / "panel.png", dst)
            found[int(d.name)] = f"maximize/{d.name}/panel.png"
    return found


def write_html(cfg: AnalyzeConfig, out: Path, keys: Sequence[str], df: pd.DataFrame, m: dict,
               shown: Sequence[int], tops: dict[int, list[TopImage]]) -> None:
    maxi = maximize_panels(cfg, out)
    pages = sorted(set(shown) | set(maxi))
    for old in (out / "concepts").glob("*.html"):
        old.unlink()
    for n, k in enumerate(pages):
        nav = (pages[n - 1] if n else None, pages[n + 1] if n + 1 < len(pages) else None)
        body = _concept_body(k, keys, df.iloc[k], tops.get(k, []), maxi.get(k), nav, out, m)
        (out / "concepts" / f"{k}.html").write_text(_page(f"concept {k}", body), encoding="utf-8")
    (out / "index.html").write_text(_page("usae report", _index_body(keys, df, m, set(pages)), script=True), encoding="utf-8")


def _index_body(keys: Sequence[str], df: pd.DataFrame, m: dict, pages: set[int]) -> str:
    esc = html.escape
    fe, corr = m["firing_entropy"], m["cofire_vs_importance"]
    cards = [_card(_fmt(m["r2_self"][k]), f"R2 {k} (self)") for k in keys]
    cards += [_card(_fmt(m["l0"][k], 1), f"L0 {k}") for k in keys]
    cards += [_card(f"{m['dead']} / {m['concepts']}", "dead concepts"),
              _card(_fmt(fe.get("mean")), "mean firing entropy"),
              _card(_fmt(corr["all"]["r"], 2), "r(log co-fires, log energy)"),
              _card(_fmt(corr["cofires_ge_1000"]["r"], 2), "same, >= 1000 co-fires")]
    for k, v in (m["baseline_matching"] or {}).items():
        cards.append(_card(_fmt(v["all"]["share_matched"]), f"{k}: share matched at cos > 0.5"))
    warn = "".join(f'<div class="warn">{esc(w)}</div>' for w in m["warnings"])
    if m["image_failures"]:
        items = "".join(f"<li>{esc(f['image_id'])}: {esc(f['reason'])}</li>" for f in m["image_failures"])
        warn += f'<div class="warn">Top images that could not be loaded (placeholders shown):<ul>{items}</ul></div>'
    r2 = "".join(f"<tr><th>{esc(k)}</th>" + "".join(_td(v) for v in m["r2"][i]) + "</tr>" for i, k in enumerate(keys))
    r2_table = f"<table><thead><tr><th>codes from \\ R2 of</th>{''.join(f'<th>{esc(k)}</th>' for k in keys)}</tr></thead><tbody>{r2}</tbody></table>"
    figs = "".join(f'<img src="figures/{f}.png" alt="{f}">' for f in ("r2_matrix", "firing_entropy", "cofire_proportion", "cofire_vs_importance"))
    return f"""<header><h1>USAE report</h1>
<div class="meta">run {esc(m['run'])} &middot; store {esc(m['store'])} &middot; {m['n_images']} images ({esc(m['images'])}),
{m['n_tokens']} tokens &middot; {m['concepts']} concepts, k = {m['k']} &middot; tau = {m['tau']}{' &middot; independent SAEs' if m['independent'] else ''}</div></header>
<div class="cards">{''.join(cards)}</div>{warn}
<h2>Cross-model reconstruction (R2, scalar mean)</h2>{r2_table}
<h2>Figures</h2><div class="figs">{figs}</div>
<h2>Concepts</h2><div class="controls">Click a column to sort. Concepts with a page are linked.
<label><input type="checkbox" id="hide-dead"> hide dead concepts</label></div>
<div class="scroll">{_concept_table(keys, df, pages)}</div>"""


def _concept_table(keys: Sequence[str], df: pd.DataFrame, pages: set[int]) -> str:
    cols = [("importance", "{:.4g}"), ("importance_rank", "{:d}"), ("firing_entropy", "{:.3f}"), ("cofires", "{:d}"),
            ("cofire_iou", "{:.3f}")]
    cols += [(f"{p}_{k}", f) for p, f in (("fires", "{:d}"), ("cfp", "{:.3f}"), ("energy", "{:.4g}")) for k in keys]
    cols += [(c, "{:.3f}") for c in df.columns if c.startswith("match_cosine_")]
    head = "<th>concept</th>" + "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    data = {c: df[c].to_numpy() for c, _ in cols}
    rows = []
    for r in range(len(df)):
        k = int(df["concept"].iat[r])
        cells = _td(k, "{:d}", f"concepts/{k}.html" if k in pages else None)
        cells += "".join(_td(_py(data[c][r]), f) for c, f in cols)
        rows.append(f'<tr{" class=dead" if df["dead"].iat[r] else ""}>{cells}</tr>')
    return f'<table class="sortable" id="concepts"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _concept_body(k: int, keys, row: pd.Series, tops: list[TopImage], maxi: str | None, nav, out: Path, m: dict) -> str:
    esc = html.escape
    links = '<a href="../index.html">&larr; all concepts</a>'
    links += f'<a href="{nav[0]}.html">previous ({nav[0]})</a>' if nav[0] is not None else ""
    links += f'<a href="{nav[1]}.html">next ({nav[1]})</a>' if nav[1] is not None else ""
    stats = "".join(f"<tr><th>{esc(k_)}</th>{_td(_py(row[f'fires_{k_}']), '{:d}')}{_td(_py(row[f'cfp_{k_}']))}"
                    f"{_td(_py(row[f'energy_{k_}']), '{:.4g}')}"
                    + (_td(_py(row[f"match_cosine_{k_}"])) if f"match_cosine_{k_}" in row else "") + "</tr>" for k_ in keys)
    mhead = "<th>matched cosine (independent SAE)</th>" if f"match_cosine_{keys[0]}" in row else ""
    cards = [_card(_fmt(_py(row["firing_entropy"])), "firing entropy"), _card(str(int(row["cofires"])), "co-fires"),
             _card(_fmt(_py(row["cofire_iou"])), "co-fire IoU"), _card(f"{_py(row['importance']):.4g}", "importance"),
             _card(f"#{int(row['importance_rank'])}", "importance rank")]
    parts = [f"<nav>{links}</nav><h1>Concept {k}</h1>", f'<div class="cards">{"".join(cards)}</div>',
             f"<table><thead><tr><th>backbone</th><th>fires</th><th>co-fire proportion</th><th>energy</th>{mhead}</tr></thead>"
             f"<tbody>{stats}</tbody></table>"]
    if tops and (out / "images" / f"{k}.png").exists():
        fails = [t for t in tops if t.failure]
        note = "".join(f'<div class="warn">image {esc(t.image_id)} unavailable: {esc(t.failure or "")}</div>' for t in fails)
        ids = ", ".join(f"{esc(t.image_id)} ({t.score:.3g})" for t in tops)
        parts.append(f'<h2>Top images and token maps per backbone</h2><div class="meta">{ids}</div>{note}'
                     f'<div class="panel"><img src="../images/{k}.png" alt="top images of concept {k}"></div>')
    elif not tops:
        parts.append("<h2>Top images</h2><p>This concept has no activating image in the evaluated set.</p>")
    if maxi:
        parts.append(f'<h2>Activation maximisation</h2><div class="panel"><img src="../{maxi}" alt="activation maximisation of concept {k}"></div>')
    return "\n".join(parts)
