"""Trained USAE run + concept ids -> one optimised image per backbone and concept (`usae
maximize`: coordinated activation maximisation, docs/method.md).

The stage: which concepts (``--concept K``, or the ``--top N`` most important of a report's
concepts.parquet), the run's backbones (``usae.analysis.backbones``), the optimisation of each
concept (``usae.analysis.objective`` over the images of ``usae.analysis.canvas``) and its files.

Output (DIR/<k>/): ``<backbone>.png`` (the full canvas per backbone), ``panel.png`` (side by
side, labelled; first the concept's top photo when a report lists its top images and the
photos are found: --manifest, else the store's record, ``usae.analysis.photos``), ``objective.png`` and ``objective.json`` (curve per backbone and final values
against random-phase images with the same spectrum); DIR/config.json holds the resolved config.
When DIR is a report's ``maximize/`` folder (REPORT/metrics.json beside it), the report's HTML
is rendered again so its concept pages show the panels (render only: nothing is recomputed).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from usae.analysis.backbones import BackboneError, Target, load_targets, open_run
from usae.analysis.objective import Final, Maximizer
from usae.analysis.render import render_report
from usae.trainer.model import USAE

from usae.errors import UsaeError
from usae.runtime import (
    atomic_path,
    atomic_write,
    atomic_write_json,
    check_device_name,
    config_json,
    progress_bar,
    resolve_device,
)


class MaximizeError(UsaeError, RuntimeError):
    """A user-facing problem with the run, its store or the requested concepts."""


@dataclass(frozen=True)
class MaximizeConfig:
    """Coordinated activation maximisation: one image per backbone for each concept."""

    run: Path
    """Run directory written by `usae train` (config.json + model.safetensors)."""
    out: Path
    """Output directory; concept k goes to OUT/<k>/."""
    concepts: tuple[int, ...] = ()
    """Concept ids to maximise."""
    top: int = 0
    """Also maximise the N most important concepts of --report (0: none)."""
    report: Path | None = None
    """Report directory of `usae analyze` (its concepts.parquet ranks concepts for --top)."""
    store: Path | None = None
    """Store to read backbone specs and grid from (default: the path recorded in the run)."""
    weights: tuple[str, ...] = ()
    """KEY=FILE weights for backbones whose weights came from a file."""
    steps: int = 1000
    """Optimisation steps per concept."""
    lr: float = 1.0
    """NAdam learning rate on the Fourier phases (peak of the schedule)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule: "cosine" (decay to lr/100 over the steps) or "constant"."""
    canvas: int = 512
    """Side of the square image being optimised (pixels)."""
    crops: int = 6
    """Random crops per backbone and step."""
    crop_scale: tuple[float, float] = (0.20, 0.25)
    """Range of the crops' area as a fraction of the canvas area."""
    noise: float = 0.05
    """Std of the Gaussian noise added to every crop."""
    seed: int = 0
    """Seed of phases, crops and noise (same seed, same images)."""
    device: str = "auto"
    """Torch device for backbones and optimisation: auto (CUDA when available), cpu, cuda, cuda:N."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Backbone compute dtype: auto (the dtype the store was extracted with), fp32, bf16 or fp16."""
    manifest: Path | None = None
    """Manifest of the photos: the panel starts with the concept's top photo from the report (default: the one the store records)."""
    image_root: Path | None = None
    """Folder the manifest's paths are relative to (default: the store's record, else the manifest's folder)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MaximizeError(f"--steps must be >= 1, got {self.steps}")
        if self.canvas < 16:
            raise MaximizeError(f"--canvas must be >= 16 pixels, got {self.canvas}")
        if self.crops < 1:
            raise MaximizeError(f"--crops must be >= 1, got {self.crops}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise MaximizeError(
                f"--crop-scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}"
            )
        if self.noise < 0:
            raise MaximizeError(f"--noise must be >= 0, got {self.noise}")
        if self.schedule not in ("cosine", "constant"):
            raise MaximizeError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise MaximizeError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        check_device_name(self.device)
        if self.top and self.report is None:
            raise MaximizeError(
                "--top needs --report (the report whose concepts.parquet ranks concepts)"
            )
        if not self.concepts and not self.top:
            raise MaximizeError(
                "nothing to do: give --concept K (repeatable) or --top N --report REPORT"
            )


# ---------------------------------------------------------------- outputs
def _safe(name: str) -> str:
    """A backbone key as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "backbone"


def _figure(width_in: float, height_in: float):
    """A matplotlib figure that does not touch pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


class Photo(NamedTuple):
    """A concept's top activating photo, shown first in its panel."""

    image_id: str
    picture: np.ndarray
    """RGB uint8 (H, W, 3)."""


def save_panel(
    path: Path,
    k: int,
    keys: Sequence[str],
    images: Sequence[np.ndarray],
    finals: Sequence[Final],
    photo: Photo | None = None,
) -> None:
    """The images side by side, each labelled with its backbone and final objective (after
    the concept's top photo, when given)."""
    n = len(images) + (photo is not None)
    fig = _figure(3.2 * n, 3.6)
    if photo is not None:
        ax = fig.add_subplot(1, n, 1)
        ax.imshow(photo.picture, interpolation="lanczos")
        ax.set_title(f"top image\n{photo.image_id}", fontsize=9)
        ax.set_axis_off()
    for j, (key, img, fin) in enumerate(zip(keys, images, finals, strict=True)):
        ax = fig.add_subplot(1, n, j + 1 + (photo is not None))
        ax.imshow(img, interpolation="lanczos")
        ax.set_title(
            f"{key}\nobjective {fin.crops:.3g} (random {fin.random_crops:.3g})", fontsize=9
        )
        ax.set_axis_off()
    fig.suptitle(f"concept {k}", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


def save_curve(path: Path, k: int, keys: Sequence[str], curve_sb: np.ndarray) -> None:
    """Objective per step, one line per backbone."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(1, curve_sb.shape[0] + 1)
    for j, key in enumerate(keys):
        ax.plot(steps, curve_sb[:, j], label=key, linewidth=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("token mean of ReLU(pre) on the step's crops")
    ax.set_title(f"concept {k}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


class ConceptResult(NamedTuple):
    """What one concept's maximisation produced."""

    concept: int
    """Concept id k."""
    dir: Path
    """OUT/<k>/."""
    images: dict[str, Path]
    """Backbone key -> PNG of its full canvas."""
    curve: dict[str, list[float]]
    """Backbone key -> objective per step."""
    final: dict[str, Final]
    """Backbone key -> final objective and random-phase baselines."""


def write_concept(
    out: Path,
    k: int,
    mx: Maximizer,
    curve_sb: np.ndarray,
    finals: list[Final],
    photo: Photo | None = None,
) -> ConceptResult:
    """Write OUT/<k>/: one PNG per backbone, panel.png, objective.png, objective.json."""
    from PIL import Image

    d = out / str(k)
    d.mkdir(parents=True, exist_ok=True)
    keys = [t.key for t in mx.targets]
    canv = mx.canvases()
    paths = {}
    for key, img in zip(keys, canv, strict=True):
        paths[key] = d / f"{_safe(key)}.png"
        atomic_write(paths[key], lambda f, img=img: Image.fromarray(img).save(f, format="PNG"))
    save_panel(d / "panel.png", k, keys, canv, finals, photo)
    save_curve(d / "objective.png", k, keys, curve_sb)
    curve = {key: curve_sb[:, j].tolist() for j, key in enumerate(keys)}
    final = dict(zip(keys, finals, strict=True))
    blob = {
        "concept": k,
        "backbones": keys,
        "images": {key: p.name for key, p in paths.items()},
        "steps": int(curve_sb.shape[0]),
        "curve": curve,
        "final": {key: f._asdict() for key, f in final.items()},
        "photo": None if photo is None else photo.image_id,
    }
    atomic_write_json(d / "objective.json", blob, indent=1)
    return ConceptResult(k, d, paths, curve, final)


# ---------------------------------------------------------------- inputs
def select_concepts(cfg: MaximizeConfig, m: int) -> list[int]:
    """--concept ids, then the --top N most important of --report; checked against m, deduplicated."""
    ks = [int(k) for k in cfg.concepts]
    if cfg.top:
        ks += top_concepts(Path(cfg.report), cfg.top)  # type: ignore[arg-type]
    bad = [k for k in ks if not 0 <= k < m]
    if bad:
        raise MaximizeError(f"unknown concept id(s) {bad}: this run has {m} concepts (0..{m - 1})")
    return list(dict.fromkeys(ks))


def top_concepts(report: Path, n: int) -> list[int]:
    """The n concepts with the highest importance in REPORT/concepts.parquet."""
    import pandas as pd

    path = report / "concepts.parquet"
    if not path.exists():
        raise MaximizeError(f"{report} holds no concepts.parquet (is it a `usae analyze` report?)")
    df = pd.read_parquet(path)
    if "importance" not in df.columns:
        raise MaximizeError(f"{path} has no 'importance' column")
    ids = df["concept"] if "concept" in df.columns else pd.Series(df.index, index=df.index)
    order = np.argsort(-df["importance"].to_numpy(np.float64), kind="stable")
    return [int(ids.iloc[j]) for j in order[:n]]


def report_dir(cfg: MaximizeConfig) -> Path | None:
    """The report whose top images the panels show: --report, else OUT's parent when OUT is a
    report's maximize/ folder; None when there is none."""
    out = Path(cfg.out)
    for rep in (cfg.report, out.parent if out.name == "maximize" else None):
        if rep is not None and (Path(rep) / "metrics.json").is_file():
            return Path(rep)
    return None


def top_photos(cfg: MaximizeConfig, store: Any, ks: Sequence[int], notes: list[str]) -> dict:
    """concept -> its top photo (the first of the report's top images that loads), for the
    concepts the report lists; {} without a report or photos (a moved record: a note)."""
    import json

    from usae.analysis.photos import ImageSourceError, image_paths, load_picture, manifest_for

    rep = report_dir(cfg)
    if rep is None:
        return {}
    tops = json.loads((rep / "metrics.json").read_text()).get("top_images") or {}
    if not any(str(k) in tops for k in ks):
        return {}
    try:
        paths = image_paths(manifest_for(cfg.manifest, cfg.image_root, store, notes))
    except ImageSourceError as e:
        raise MaximizeError(str(e)) from None
    found = {}
    for k in ks:
        for t in tops.get(str(k), []) if paths else []:
            pic, _ = load_picture(paths, str(t["image_id"]))
            if pic is not None:
                found[k] = Photo(str(t["image_id"]), pic)
                break
    return found


# ---------------------------------------------------------------- run
class MaximizeResult(NamedTuple):
    """Everything `usae maximize` wrote."""

    out: Path
    """Output directory."""
    concepts: list[ConceptResult]
    """One entry per maximised concept, in the order run."""
    report: Path | None
    """index.html of the report rendered again (OUT is REPORT/maximize), else None."""


def run_maximize(cfg: MaximizeConfig, progress: bool = True) -> MaximizeResult:
    """Load the run, its store's backbones, and maximise every requested concept."""
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))
    device = cfg.device
    torch.manual_seed(cfg.seed)
    try:
        model, run_cfg, store = open_run(cfg.run, cfg.store, device)
    except BackboneError as e:
        raise MaximizeError(str(e)) from e
    ks = select_concepts(cfg, model.spec.concepts)
    try:
        targets = load_targets(model, run_cfg, store, cfg.weights, device, cfg.dtype)
    except BackboneError as e:
        raise MaximizeError(str(e)) from e
    for p in model.parameters():
        p.requires_grad_(False)
    notes: list[str] = []
    photos = top_photos(cfg, store, ks, notes)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config_json(cfg), indent=1)
    results = []
    with progress_bar(progress) as bar:
        for k in ks:
            results.append(maximize_one(model, targets, k, cfg, store.grid, bar, photos.get(k)))
    report = out.parent
    rendered = (
        render_report(report, out)
        if out.name == "maximize" and (report / "metrics.json").is_file()
        else None
    )
    return MaximizeResult(out, results, rendered)


def maximize_one(
    model: USAE,
    targets: Sequence[Target],
    k: int,
    cfg: MaximizeConfig,
    grid,
    bar,
    photo: Photo | None = None,
) -> ConceptResult:
    """Optimise concept k's images, evaluate them and write OUT/<k>/."""
    mx = Maximizer(model, targets, k, cfg, grid)
    curve_sb = np.zeros((cfg.steps, len(targets)))
    task = bar.add_task(f"concept {k}", total=cfg.steps)
    for s in range(cfg.steps):
        curve_sb[s] = mx.step()
        bar.update(task, advance=1, description=f"concept {k}: {np.round(curve_sb[s], 3).tolist()}")
    return write_concept(Path(cfg.out), k, mx, curve_sb, mx.evaluate(), photo)
