"""Report data -> PNG figures of a report: the four summary figures (REPORT/figures/), the
layer-alignment heatmap when computed (REPORT/figures/layer_alignment.png) and the top-image
thumbnails with token maps (REPORT/thumbs/<k>/, small JPEGs).

Drawing only: the numbers come from ``usae.analysis.metrics`` (docs/method.md, metrics). Every
file is written atomically, so a reader never sees half a PNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from usae.analysis import metrics as mx
from usae.trainer.evaluate import Reconstruction

from usae.runtime import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


# ---------------------------------------------------------------- top-image thumbnails
THUMB = 128
"""Side of a thumbnail (pixels): photos are squash-resized to it like the backbones resize
their input, so the token grid lies on the picture."""
BLANK = (236, 238, 242)
"""Background of a token map drawn without its photo."""


def write_thumbs(
    out: Path,
    pic_hw3: np.ndarray | None,
    maps_mhw: np.ndarray,
    keys: Sequence[str],
    *,
    photo: str | None,
    heat: dict[str, str],
) -> None:
    """One top image's thumbnails (JPEG, THUMB px): the photo to out/``photo`` (none without
    one, or with ``photo`` None), and each backbone's token map over it to out/``heat[key]`` (over a blank square
    without a photo). One colour scale per image, so the backbones compare fairly."""
    from PIL import Image

    sq = _squash(pic_hw3, THUMB) if pic_hw3 is not None else None
    vmax = max(float(maps_mhw.max()), 1e-6)
    if sq is not None and photo is not None:
        _save_jpeg(Image.fromarray(sq), out / photo)
    for i, key in enumerate(keys):
        _save_jpeg(Image.fromarray(overlay(sq, maps_mhw[i] / vmax)), out / heat[key])


def overlay(sq_hw3: np.ndarray | None, v_hw: np.ndarray) -> np.ndarray:
    """A token map (values in [0, 1] on the token grid) coloured with inferno and laid over
    the photo (upsampled bilinearly; the colour's opacity grows with the value) or over a
    blank square (token cells kept sharp). Returns (THUMB, THUMB, 3) uint8."""
    from matplotlib import colormaps
    from PIL import Image

    img = Image.fromarray(np.clip(v_hw, 0, 1).astype(np.float32), mode="F")
    resample = Image.BILINEAR if sq_hw3 is not None else Image.NEAREST
    v = np.clip(np.asarray(img.resize((THUMB, THUMB), resample)), 0, 1)
    rgb = colormaps["inferno"](v)[..., :3] * 255
    base = np.asarray(sq_hw3 if sq_hw3 is not None else np.broadcast_to(BLANK, rgb.shape), float)
    a = ((0.15 + 0.6 * v) if sq_hw3 is not None else (0.1 + 0.9 * v))[..., None]
    return np.clip(base * (1 - a) + rgb * a, 0, 255).astype(np.uint8)


def _save_jpeg(img: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=85)


def _squash(pic_hw3: np.ndarray, size: int = 224) -> np.ndarray:
    """Squash-resize like the backbones do, so the token grid lies on the picture."""
    from PIL import Image

    return np.asarray(Image.fromarray(pic_hw3).resize((size, size), Image.BICUBIC))


# ---------------------------------------------------------------- figures
def write_figures(
    fig_dir: Path, keys: Sequence[str], rec: Reconstruction, t: mx.ConceptTable, m: dict
) -> None:
    plt = pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, draw in (
            ("r2_matrix", _fig_r2),
            ("firing_entropy", _fig_fe),
            ("cofire_proportion", _fig_cfp),
            ("cofire_vs_importance", _fig_scatter),
        ):
            fig = draw(plt, keys, rec, t, m)
            fig.tight_layout()
            save_png(fig, fig_dir / f"{name}.png", 90)
            plt.close(fig)


def _fig_r2(plt, keys, rec, t, m):
    n = len(keys)
    fig, ax = plt.subplots(figsize=(1.4 * n + 2.2, 1.2 * n + 1.6))
    im = ax.imshow(
        np.nan_to_num(rec.r2, nan=0.0),
        cmap="viridis",
        vmin=min(0.0, float(np.nanmin(rec.r2))),
        vmax=1.0,
    )
    for i in range(n):
        for j in range(n):
            v = rec.r2[i, j]
            ax.text(
                j,
                i,
                "n/a" if not np.isfinite(v) else f"{v:.3f}",
                ha="center",
                va="center",
                color="white" if np.isfinite(v) and v < 0.6 else "black",
                fontsize=10,
            )
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
        ax.plot(
            xs, np.polyval(b, xs), color="crimson", label=f"fit: slope {b[0]:.2f}, r = {c['r']:.2f}"
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("log10 importance (energy summed over backbones)")
    ax.set_ylabel("log10 co-fires")
    ax.set_title(f"co-fires vs importance ({int(ok.sum())} concepts)")
    return fig


# ---------------------------------------------------------------- layer alignment
def draw_layer_alignment(path: Path, entry: dict) -> None:
    """metrics.json's ``layer_alignment`` -> heatmap of shared concepts, rows and columns the
    (model, layer) groups in the entry's order, annotated counts, lines between models, the
    best depth of each other model per row outlined."""
    plt = pyplot()
    keys = [g["key"] for g in entry["groups"]]
    shared = np.asarray(entry["shared"], dtype=np.float64)
    n = len(keys)
    size = max(3.2, 0.55 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    off = ~np.eye(n, dtype=bool)
    vmax = max(float(shared[off].max()) if n > 1 else 0.0, 1.0)  # the diagonal saturates
    im = ax.imshow(shared, cmap="magma", vmin=0, vmax=vmax)
    for i in range(n):
        for j in range(n):
            v = shared[i, j]
            ax.text(
                j,
                i,
                f"{int(v)}",
                ha="center",
                va="center",
                fontsize=8 if n <= 12 else 6,
                color="black" if v > 0.6 * vmax else "white",
                fontweight="bold" if i == j else "normal",
            )
    pos = {k: n_ for n_, k in enumerate(keys)}
    for b in entry["best"]:
        if b["key_b"] is not None and b["model_a"] != b["model_b"]:
            i, j = pos[b["key_a"]], pos[b["key_b"]]
            ax.add_patch(
                plt.Rectangle((j - 0.4, i - 0.4), 0.8, 0.8, fill=False, ec="#2fd0ff", lw=1.8)
            )
    models = [g["model"] for g in entry["groups"]]
    for n_ in range(1, n):
        if models[n_] != models[n_ - 1]:
            ax.axhline(n_ - 0.5, color="white", lw=2.5)
            ax.axvline(n_ - 0.5, color="white", lw=2.5)
    ax.set_xticks(range(n), keys, rotation=45, ha="right")
    ax.set_yticks(range(n), keys)
    ax.set_title(
        f"shared concepts (co-fire / min fires >= {entry['threshold']:g},\n"
        f">= {entry['min_fires']} fires each; outlined: best depth per row)",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="shared concepts (diagonal: live)")
    fig.tight_layout()
    save_png(fig, path, 90)
    plt.close(fig)
