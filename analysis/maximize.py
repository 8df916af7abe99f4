"""Trained USAE run + concept ids -> one optimised image per backbone (coordinated activation
maximisation, usae-spec.md section 6).

For concept k, every backbone i of the run gets its own image, optimised so that k's pre-TopK
activation ReLU(BN_i(W_i x_i))[k], averaged over tokens, is maximal. x_i is the backbone's
activation computed exactly as extraction computes it (``Backbone.forward`` with the store's
grid: the backbone's own resize, normalisation and grid resampling), standardised by the run
(``USAE.standardize``); BatchNorm is in eval mode. The images are independently parametrised
and jointly scheduled: one loop, the same crop boxes each step, one NAdam over all phases with
one learning-rate schedule (cosine decay from ``lr`` to ``lr/100`` by default).

Parametrisation (MaCo, Fel et al. 2023): each image is
``sigmoid(CONTRAST * C @ standardise(irfft2(A * exp(i * phase))))`` on a square canvas, where
only ``phase`` is optimised. ``A`` is a fixed natural-image magnitude spectrum and ``C`` a fixed
3x3 colour matrix, both estimated (deterministically) from the real photos that ship with
scikit-image (astronaut, chelsea, coffee, rocket) and scikit-learn (china, flower):
``C`` is the PCA square root of the photos' RGB pixel covariance (C @ C.T = covariance), and ``A``
is the mean amplitude spectrum of the photos, square-cropped and resized to the canvas, in the
decorrelated colour basis ``C^-1 (rgb - mean)`` under a Hann window (so the photos' borders
add no spurious horizontal/vertical lines), averaged over left-right and up-down flips, with
the DC term set to zero. Each step takes ``crops`` random square crops covering
``crop_scale`` of the canvas area, resizes them (bilinear) to the backbone's input size, adds
Gaussian noise of std ``noise`` and clamps to [0, 1].

The quantity optimised is the token mean of a leaky ReLU (slope 0.01) of the pre-activation, so
a concept that starts silent on every token still gets a gradient; the objective recorded and
reported is the exact token mean of ReLU(pre).

Output (DIR/<k>/): ``<backbone>.png`` (the full canvas per backbone), ``panel.png`` (side by
side, labelled), ``objective.png`` and ``objective.json`` (curve per backbone and final values
against random-phase images with the same spectrum); DIR/config.json holds the resolved config.

Determinism: phases, crops and noise come from CPU generators seeded by (seed, k), so a concept's
images do not depend on the other concepts requested; on CPU two runs give identical PNGs. On
CUDA, grid_sample's backward accumulates with atomics, so the last bits may differ run to run.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from usae.trainer.model import USAE

from usae.errors import UsaeError

CONTRAST = 1.5
"""Gain between the unit-variance decorrelated image and the sigmoid's input."""
LEAK = 0.01
"""Negative slope of the optimised surrogate (a silent concept still gets a gradient)."""
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


class MaximizeError(UsaeError, RuntimeError):
    """A user-facing problem with the run, its store, its backbones or the requested concepts."""


@dataclass(frozen=True)
class MaximizeConfig:
    """Settings of `usae maximize`."""

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
    schedule: str = "cosine"
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
    dtype: str = "auto"
    """Backbone compute dtype: auto (the dtype the store was extracted with), float32, bfloat16, float16."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MaximizeError(f"--steps must be >= 1, got {self.steps}")
        if self.canvas < 16:
            raise MaximizeError(f"--canvas must be >= 16 pixels, got {self.canvas}")
        if self.crops < 1:
            raise MaximizeError(f"--crops must be >= 1, got {self.crops}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise MaximizeError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.noise < 0:
            raise MaximizeError(f"--noise must be >= 0, got {self.noise}")
        if self.schedule not in ("cosine", "constant"):
            raise MaximizeError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise MaximizeError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.top and self.report is None:
            raise MaximizeError("--top needs --report (the report whose concepts.parquet ranks concepts)")
        if not self.concepts and not self.top:
            raise MaximizeError("nothing to do: give --concept K (repeatable) or --top N --report REPORT")


# ---------------------------------------------------------------- natural-image priors
class Priors(NamedTuple):
    """Fixed parts of the parametrisation for one canvas size."""

    colour_33: np.ndarray
    """C: RGB = C @ decorrelated (C @ C.T = RGB pixel covariance of the photos)."""
    magnitude_3hf: np.ndarray
    """Mean amplitude spectrum (rfft2 layout) per decorrelated channel, DC = 0."""


def _photos() -> list[np.ndarray]:
    """Natural photos shipped inside scikit-image and scikit-learn, float RGB in [0, 1]."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    out += list(load_sample_images().images)
    return [np.asarray(p[..., :3], dtype=np.float64) / 255.0 for p in out]


def _square(photo_hw3: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, resized (bicubic) to size x size."""
    from PIL import Image

    h, w, _ = photo_hw3.shape
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    u8 = np.round(photo_hw3[y0 : y0 + s, x0 : x0 + s] * 255).astype(np.uint8)
    img = Image.fromarray(u8).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


@functools.lru_cache(maxsize=8)
def natural_priors(canvas: int) -> Priors:
    """Colour matrix and magnitude spectrum estimated from the bundled photos (deterministic)."""
    photos = [_square(p, canvas) for p in _photos()]
    pix_n3 = np.concatenate([p.reshape(-1, 3) for p in photos])
    mean_3 = pix_n3.mean(0)
    cov_33 = np.cov(pix_n3, rowvar=False)
    evals, evecs = np.linalg.eigh(cov_33)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    # Fix eigenvector signs (LAPACK may return either): largest component positive.
    evecs = evecs * np.sign(evecs[np.abs(evecs).argmax(0), np.arange(3)])
    colour_33 = evecs * np.sqrt(np.maximum(evals, 1e-12))
    inv_33 = np.linalg.inv(colour_33)
    mag = np.zeros((3, canvas, canvas // 2 + 1))
    # A Hann window keeps the photos' borders (the FFT sees them as edges) out of the spectrum.
    hann = np.hanning(canvas + 2)[1:-1]
    window_hw = np.outer(hann, hann)
    n = 0
    for p in photos:
        dec_3hw = np.einsum("cj,hwj->chw", inv_33, p - mean_3) * window_hw
        for view in (dec_3hw, dec_3hw[:, :, ::-1], dec_3hw[:, ::-1, :]):
            mag += np.abs(np.fft.rfft2(view, norm="ortho"))
            n += 1
    mag /= n
    mag[:, 0, 0] = 0.0
    # Scale C so every RGB logit has std <= 1 for unit-variance decorrelated channels.
    colour_33 = colour_33 / np.linalg.norm(colour_33, axis=1).max()
    return Priors(colour_33.astype(np.float32), mag.astype(np.float32))


class PhaseImages(nn.Module):
    """n independently parametrised images: optimised Fourier phases, fixed magnitude and colour."""

    def __init__(self, n: int, canvas: int, generator: torch.Generator):
        super().__init__()
        pri = natural_priors(canvas)
        self.canvas = canvas
        self.register_buffer("magnitude_3hf", torch.from_numpy(pri.magnitude_3hf.copy()))  # not the cache's
        self.register_buffer("colour_33", torch.from_numpy(pri.colour_33.copy()))
        shape = (n, *pri.magnitude_3hf.shape)
        self.phase_n3hf = nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * math.pi)

    def forward(self, j: int) -> Float[Tensor, "3 h w"]:
        """Image j in [0, 1], shape (3, canvas, canvas)."""
        spec_3hf = torch.polar(self.magnitude_3hf, self.phase_n3hf[j])
        z_3hw = torch.fft.irfft2(spec_3hf, s=(self.canvas, self.canvas), norm="ortho")
        z_3hw = z_3hw / z_3hw.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        logits_3hw = torch.einsum("rc,chw->rhw", self.colour_33, z_3hw)
        return torch.sigmoid(CONTRAST * logits_3hw)


# ---------------------------------------------------------------- crops
def sample_boxes(n: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """n square boxes as (half side, centre x, centre y) in [-1, 1] canvas coordinates."""
    area_n = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    half_n = area_n.sqrt()  # side fraction s = sqrt(area); half-extent in [-1, 1] units = s
    cx_n = (torch.rand(n, generator=generator) * 2 - 1) * (1 - half_n)
    cy_n = (torch.rand(n, generator=generator) * 2 - 1) * (1 - half_n)
    return torch.stack([half_n, cx_n, cy_n], dim=1)


def crop_resize(image_3hw: Tensor, boxes_n3: Tensor, size: int) -> Float[Tensor, "n 3 size size"]:
    """Bilinear crops of one image at the given boxes, each resized to size x size."""
    n = boxes_n3.shape[0]
    b = boxes_n3.to(device=image_3hw.device, dtype=image_3hw.dtype)
    zero = torch.zeros_like(b[:, 0])
    theta_n23 = torch.stack(
        [torch.stack([b[:, 0], zero, b[:, 1]], 1), torch.stack([zero, b[:, 0], b[:, 2]], 1)], 1
    )
    grid = F.affine_grid(theta_n23, [n, 3, size, size], align_corners=False)
    src = image_3hw.unsqueeze(0).expand(n, -1, -1, -1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- the objective
def concept_pre(model: USAE, i: int, k: int, acts_btd: Tensor) -> Float[Tensor, "b t"]:
    """Pre-activation BN_i(W_i x + b_i)[k] of raw activations (column k only, BN in eval mode).

    Equals ``model.encode_pre(i, model.standardize(i, acts))[..., k]`` without the other m-1
    columns (tests check the two agree).
    """
    if model.training:
        raise MaximizeError("the USAE must be in eval mode (BatchNorm running statistics)")
    lin, bn = model.encoders[i], model.bns[i]
    x_btd = model.standardize(i, acts_btd.to(lin.weight.dtype))
    lin_bt = x_btd @ lin.weight[k] + lin.bias[k]
    rm = bn.running_mean[k] if bn.running_mean is not None else 0.0
    rv = bn.running_var[k] if bn.running_var is not None else torch.ones((), device=lin_bt.device)
    gamma = bn.weight[k] if bn.weight is not None else 1.0
    beta = bn.bias[k] if bn.bias is not None else 0.0
    return (lin_bt - rm) * (gamma / torch.sqrt(rv + bn.eps)) + beta


def concept_objective(
    backbone: nn.Module, model: USAE, i: int, k: int, images_b3hw: Tensor, grid: tuple[int, int]
) -> Float[Tensor, " b"]:
    """Token mean of ReLU(pre)[k] per image, through the backbone's extraction path."""
    acts = backbone(images_b3hw, grid=grid)
    return F.relu(concept_pre(model, i, k, acts.patch_btd)).mean(dim=1)


# ---------------------------------------------------------------- the optimisation
class Target(NamedTuple):
    """One backbone taking part: its position in the run and the loaded module."""

    key: str
    """Backbone key (store and run)."""
    index: int
    """Position i in the run's spec.backbones."""
    backbone: nn.Module
    """Differentiable Backbone (forward(images in [0, 1], grid) -> Activations)."""


class Final(NamedTuple):
    """Objective of one backbone's finished image, next to random-phase images' values."""

    crops: float
    """Mean objective over fixed evaluation crops (no noise)."""
    full: float
    """Objective of the whole canvas as extraction would see it."""
    random_crops: float
    """Same crops, random-phase images with the same spectrum (mean over the images)."""
    random_full: float
    """Whole canvas, random-phase images with the same spectrum."""


def _concept_seed(seed: int, k: int, salt: int = 0) -> int:
    """Per-concept seed: concept k's images do not depend on which other concepts ran."""
    return (seed * 1_000_003 + k * 7919 + salt * 104_729) % (2**63)


class Maximizer:
    """Jointly scheduled optimisation of one image per target for concept k."""

    def __init__(self, model: USAE, targets: Sequence[Target], k: int, cfg: MaximizeConfig, grid):
        self.model, self.targets, self.k, self.cfg = model, list(targets), k, cfg
        self.grid = tuple(grid)
        self.gen = torch.Generator().manual_seed(_concept_seed(cfg.seed, k))
        self.device = _device(cfg.device)
        self.images = PhaseImages(len(self.targets), cfg.canvas, self.gen).to(self.device)
        self.opt = torch.optim.NAdam(self.images.parameters(), lr=cfg.lr)
        # Cosine decay to lr/100: large phase steps explore early, small ones settle the image.
        self.sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, cfg.steps, eta_min=cfg.lr * 0.01)
            if cfg.schedule == "cosine"
            else None
        )

    def _pre(self, t: Target, crops_b3hw: Tensor) -> Tensor:
        acts = t.backbone(crops_b3hw, grid=self.grid)
        return concept_pre(self.model, t.index, self.k, acts.patch_btd.float())

    def step(self) -> np.ndarray:
        """One NAdam step on every image; returns the objective per target on this step's crops."""
        boxes_n3 = sample_boxes(self.cfg.crops, self.cfg.crop_scale, self.gen)
        self.opt.zero_grad(set_to_none=True)
        out = np.zeros(len(self.targets))
        for j, t in enumerate(self.targets):
            size = int(t.backbone.spec.img_size)
            noise = torch.randn((self.cfg.crops, 3, size, size), generator=self.gen) * self.cfg.noise
            crops = crop_resize(self.images(j), boxes_n3, size)
            crops = (crops + noise.to(crops.device)).clamp(0.0, 1.0)
            pre_bt = self._pre(t, crops)
            # Backward per target: the images are independent, so this is the joint gradient
            # with one backbone's graph alive at a time.
            (-F.leaky_relu(pre_bt, LEAK).mean()).backward()
            out[j] = F.relu(pre_bt.detach()).mean().item()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return out

    @torch.no_grad()
    def evaluate(self, n_random: int = 4) -> list[Final]:
        """Final objective per target on fixed crops and the full canvas, with random-phase baselines."""
        eval_gen = torch.Generator().manual_seed(_concept_seed(self.cfg.seed, self.k, salt=1))
        boxes_n3 = sample_boxes(self.cfg.crops, self.cfg.crop_scale, eval_gen)
        rand = PhaseImages(n_random, self.cfg.canvas, eval_gen).to(self.device)
        finals = []
        for j, t in enumerate(self.targets):
            size = int(t.backbone.spec.img_size)

            def score(img_3hw: Tensor, size: int = size, t: Target = t) -> tuple[float, float]:
                c = F.relu(self._pre(t, crop_resize(img_3hw, boxes_n3, size))).mean().item()
                f = F.relu(self._pre(t, img_3hw.unsqueeze(0))).mean().item()
                return c, f

            c, f = score(self.images(j))
            rs = np.array([score(rand(r)) for r in range(n_random)])
            finals.append(Final(c, f, float(rs[:, 0].mean()), float(rs[:, 1].mean())))
        return finals

    @torch.no_grad()
    def canvases(self) -> list[np.ndarray]:
        """The current images as uint8 (canvas, canvas, 3) arrays, one per target."""
        out = []
        for j in range(len(self.targets)):
            img_hw3 = self.images(j).permute(1, 2, 0).float().cpu().numpy()
            out.append(np.round(img_hw3 * 255.0).clip(0, 255).astype(np.uint8))
        return out


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


def save_panel(path: Path, k: int, keys: Sequence[str], images: Sequence[np.ndarray], finals: Sequence[Final]) -> None:
    """The images side by side, each labelled with its backbone and final objective."""
    n = len(images)
    fig = _figure(3.2 * n, 3.6)
    for j, (key, img, fin) in enumerate(zip(keys, images, finals, strict=True)):
        ax = fig.add_subplot(1, n, j + 1)
        ax.imshow(img, interpolation="lanczos")
        ax.set_title(f"{key}\nobjective {fin.crops:.3g} (random {fin.random_crops:.3g})", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"concept {k}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


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
    fig.savefig(path)


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


def write_concept(out: Path, k: int, mx: Maximizer, curve_sb: np.ndarray, finals: list[Final]) -> ConceptResult:
    """Write OUT/<k>/: one PNG per backbone, panel.png, objective.png, objective.json."""
    from PIL import Image

    d = out / str(k)
    d.mkdir(parents=True, exist_ok=True)
    keys = [t.key for t in mx.targets]
    canv = mx.canvases()
    paths = {}
    for key, img in zip(keys, canv, strict=True):
        paths[key] = d / f"{_safe(key)}.png"
        Image.fromarray(img).save(paths[key])
    save_panel(d / "panel.png", k, keys, canv, finals)
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
    }
    (d / "objective.json").write_text(json.dumps(blob, indent=1))
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


def _store_path(run: Path, run_cfg: dict, override: Path | None) -> Path:
    """The run's store: --store, else the recorded path (as given, or relative to the run)."""
    if override is not None:
        return Path(override)
    rec = (run_cfg.get("store") or {}).get("path")
    if not rec:
        raise MaximizeError(f"{run}/config.json records no store path; pass --store")
    for p in (Path(rec), run / rec):
        if p.exists():
            return p
    raise MaximizeError(f"the run's store {rec} was not found (moved?); pass --store PATH")


def parse_weights(items: Sequence[str]) -> dict[str, Path]:
    """KEY=FILE pairs -> {key: path}."""
    out = {}
    for it in items:
        key, sep, file = it.partition("=")
        if not sep or not key or not file:
            raise MaximizeError(f"--weights expects KEY=FILE, got {it!r}")
        if not Path(file).exists():
            raise MaximizeError(f"--weights {key}: file {file} does not exist")
        out[key] = Path(file)
    return out


# ---------------------------------------------------------------- run
class MaximizeResult(NamedTuple):
    """Everything `usae maximize` wrote."""

    out: Path
    """Output directory."""
    concepts: list[ConceptResult]
    """One entry per maximised concept, in the order run."""


def _config_json(cfg: MaximizeConfig) -> dict[str, Any]:
    d = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def run_maximize(cfg: MaximizeConfig, progress: bool = True) -> MaximizeResult:
    """Load the run, its store's backbones, and maximise every requested concept."""
    from usae.pipeline.store import Store, StoreError
    from usae.trainer.checkpoint import CheckpointError
    from usae.trainer.model import load_run

    cfg = replace(cfg, device=_device(cfg.device))
    torch.manual_seed(cfg.seed)
    try:
        model, run_cfg = load_run(cfg.run, device=cfg.device)
    except (FileNotFoundError, CheckpointError) as e:
        raise MaximizeError(str(e)) from e
    except (KeyError, ValueError) as e:  # config.json unreadable or incomplete
        raise MaximizeError(f"{cfg.run}/config.json is not a usae run config ({type(e).__name__}: {e})") from e
    ks = select_concepts(cfg, model.spec.concepts)
    try:
        store = Store.open(_store_path(Path(cfg.run), run_cfg, cfg.store))
    except StoreError as e:
        raise MaximizeError(str(e)) from e
    targets = load_targets(model, run_cfg, store, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(json.dumps(_config_json(cfg), indent=1))
    results = []
    with _progress(progress) as bar:
        for k in ks:
            results.append(maximize_one(model, targets, k, cfg, store.grid, bar))
    return MaximizeResult(cfg.out, results)


def _device(name: str) -> str:
    """--device with "auto" resolved; a CUDA device that is not there is a clean error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MaximizeError(f"--device {name} asked for, but no CUDA device is available")
    return name


def maximize_one(model: USAE, targets: Sequence[Target], k: int, cfg: MaximizeConfig, grid, bar) -> ConceptResult:
    """Optimise concept k's images, evaluate them and write OUT/<k>/."""
    mx = Maximizer(model, targets, k, cfg, grid)
    curve_sb = np.zeros((cfg.steps, len(targets)))
    task = bar.add_task(f"concept {k}", total=cfg.steps) if bar is not None else None
    for s in range(cfg.steps):
        curve_sb[s] = mx.step()
        if bar is not None:
            bar.update(task, advance=1, description=f"concept {k}: {np.round(curve_sb[s], 3).tolist()}")
    return write_concept(cfg.out, k, mx, curve_sb, mx.evaluate())


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(show: bool):
    if not show:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


# ---------------------------------------------------------------- backbones of the run
def _recorded(store, key: str) -> tuple[dict, dict]:
    """(spec fields, weights identity) recorded for a backbone in the store."""
    rec = store.spec(key)
    ident = rec.get("identity")
    return rec, dict(ident) if isinstance(ident, dict) else rec


def _spec_from_record(key: str, rec: dict):
    """The BackboneSpec the store recorded (all fields), else the registry's for its name."""
    from dataclasses import fields

    from usae.pipeline.registry import BackboneSpec, RegistryError, resolve

    names = [f.name for f in fields(BackboneSpec)]
    if all(n in rec for n in names if n != "interpolation"):
        kw = {n: rec[n] for n in names if n in rec}
        kw.update(key=key, mean=tuple(rec["mean"]), std=tuple(rec["std"]))
        return BackboneSpec(**kw)
    src, name = rec.get("source"), rec.get("name")
    if not src or not name:
        raise MaximizeError(f"the store records no model name for backbone {key!r}; cannot rebuild it")
    try:
        return resolve(f"{key}={src}:{name}")
    except RegistryError as e:
        raise MaximizeError(f"backbone {key!r}: {e}") from e


def _dtype(name: str, rec: dict) -> torch.dtype:
    """--dtype, or with "auto" the compute dtype the store records for the backbone (else float32)."""
    if name == "auto":
        return DTYPES.get(str(rec.get("compute_dtype", "fp32")), torch.float32)
    return DTYPES[name]


def load_target(model: USAE, store, key: str, weights: Path | None, cfg: MaximizeConfig) -> Target:
    """Backbone `key` with the weights the store recorded (same seed / tiny flag, or a file)."""
    from usae.pipeline.registry import RegistryError, load_backbone
    from usae.pipeline.weights import WeightsUnavailable

    rec, ident = _recorded(store, key)
    spec = _spec_from_record(key, rec)
    want = ident.get("sha256")
    random_init = bool(ident.get("random_init", False)) and weights is None
    try:
        bb = load_backbone(
            spec, weights=weights, random_init=random_init, seed=int(ident.get("seed") or 0),
            layer=ident.get("layer"), tiny=bool(ident.get("tiny", False)),
            device=cfg.device, dtype=_dtype(cfg.dtype, rec),
        )  # fmt: skip
    except (WeightsUnavailable, RegistryError) as e:
        raise MaximizeError(
            f"the weights of backbone {key!r} ({spec.source}:{spec.name}, recorded as "
            f"{ident.get('weights', '?')}, sha256 {str(want)[:12]}...) cannot be had: {e}. "
            f"Pass --weights {key}=FILE with the weights the store was extracted with."
        ) from e
    got = bb.identity["sha256"]
    if want and got != want:
        raise MaximizeError(
            f"backbone {key!r}: the loaded weights ({bb.identity['weights']}, sha256 {got[:12]}...) are not "
            f"the ones the store was extracted with (sha256 {want[:12]}...); pass --weights {key}=FILE "
            "with the right file"
        )
    if not want:
        raise MaximizeError(f"the store records no weights sha256 for backbone {key!r}; cannot verify its weights")
    return Target(key, model.index(key), bb)


def load_targets(model: USAE, run_cfg: dict, store, cfg: MaximizeConfig) -> list[Target]:
    """Every backbone of the run, checked against the store and loaded with matching weights."""
    keys = list(model.spec.backbones)
    weights = parse_weights(cfg.weights)
    extra = sorted(set(weights) - set(keys))
    if extra:
        raise MaximizeError(f"--weights names backbone(s) {extra} that are not in the run (its backbones: {keys})")
    missing = [k for k in keys if k not in store.backbones]
    if missing:
        raise MaximizeError(
            f"backbone(s) {missing} of the run are missing from the store {store.path} "
            f"(it holds {store.backbones}); is --store the store the run was trained on?"
        )
    want_fp = (run_cfg.get("store") or {}).get("fingerprint")
    if want_fp and store.attrs.get("fingerprint") != want_fp:
        raise MaximizeError(
            f"store {store.path} has fingerprint {store.attrs.get('fingerprint')}, the run was trained on "
            f"{want_fp}: not the run's store"
        )
    return [load_target(model, store, k, weights.get(k), cfg) for k in keys]


# ---------------------------------------------------------------- CLI
def register(app) -> None:
    """Add `usae maximize` to the Typer app."""
    import typer

    @app.command("maximize")
    def maximize_cmd(
        run: Path = typer.Option(..., "--run", help="Run directory written by `usae train`."),
        out: Path = typer.Option(..., "--out", help="Output directory; concept k goes to OUT/<k>/."),
        concept: list[int] = typer.Option([], "--concept", help="Concept id to maximise (repeatable)."),
        top: int = typer.Option(0, "--top", help="Also maximise the N most important concepts of --report."),
        report: Path | None = typer.Option(None, "--report", help="`usae analyze` report ranking concepts for --top."),
        store: Path | None = typer.Option(None, "--store", help="Store with the backbone specs (default: the run's)."),
        weights: list[str] = typer.Option([], "--weights", help="KEY=FILE weights for a backbone (repeatable)."),
        steps: int = typer.Option(1000, "--steps", help="Optimisation steps per concept."),
        lr: float = typer.Option(1.0, "--lr", help="NAdam learning rate on the Fourier phases (peak)."),
        schedule: str = typer.Option("cosine", "--schedule", help="Learning-rate schedule: cosine (to lr/100) or constant."),
        canvas: int = typer.Option(512, "--canvas", help="Side of the optimised square image (pixels)."),
        crops: int = typer.Option(6, "--crops", help="Random crops per backbone and step."),
        crop_scale: tuple[float, float] = typer.Option(
            (0.20, 0.25), "--crop-scale", help="Min and max crop area as a fraction of the canvas area."
        ),
        noise: float = typer.Option(0.05, "--noise", help="Std of the Gaussian noise added to each crop."),
        seed: int = typer.Option(0, "--seed", help="Seed of phases, crops and noise."),
        device: str = typer.Option("auto", "--device", help="Torch device: auto (CUDA when available), cpu, cuda, cuda:N."),
        dtype: str = typer.Option(
            "auto", "--dtype", help="Backbone compute dtype: auto (the store's), float32, bfloat16, float16."
        ),
    ) -> None:
        """Coordinated activation maximisation: one image per backbone for each concept."""
        from rich.console import Console
        from usae.pipeline.store import StoreError

        try:
            cfg = MaximizeConfig(
                run=run, out=out, concepts=tuple(concept), top=top, report=report, store=store,
                weights=tuple(weights), steps=steps, lr=lr, schedule=schedule, canvas=canvas, crops=crops,
                crop_scale=tuple(crop_scale), noise=noise, seed=seed, device=device, dtype=dtype,
            )  # fmt: skip
            res = run_maximize(cfg)
        except (MaximizeError, StoreError) as e:
            Console(stderr=True, soft_wrap=True).print(f"error: {e}", style="red", markup=False, highlight=False)
            raise typer.Exit(2) from None
        for c in res.concepts:
            vals = ", ".join(f"{k} {f.crops:.3g} (random {f.random_crops:.3g})" for k, f in c.final.items())
            typer.echo(f"concept {c.concept}: {vals} -> {c.dir / 'panel.png'}")
