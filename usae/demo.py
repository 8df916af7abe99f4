"""Photos bundled in PyPI packages -> a finished report: the whole pipeline on an embedded default.

``usae demo`` builds a few hundred images from the photos that ship with scikit-image and
scikit-learn (random crops and flips), then runs the real stages on them: extract (the three
default backbones), train (the Universal SAE), analyze (metrics, figures, HTML report) and
coordinated activation maximisation for the top concepts, and prints the report's path.

Backbones use pretrained weights: from the local HF cache, else downloaded from the hub (the
download is announced first). Offline, or when the hub cannot be reached, the demo says so
loudly and uses seeded random-init backbones (recorded in the store's attributes), so it runs
anywhere. Re-running the same command reuses what is finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import typer
from rich.console import Console
from rich.panel import Panel

from usae.errors import UsaeError
from usae.options import config_command

console = Console(stderr=True)


@dataclass(frozen=True)
class DemoConfig:
    """Run the whole pipeline on photos bundled with scikit-image/scikit-learn and print the report's path."""

    out: Path = Path("demo_out")
    """Folder for everything the demo writes (images, store, run, report)."""
    images: int = 300
    """Number of demo images cut from the bundled photos."""
    backbones: tuple[str, ...] = ("dinov2", "siglip", "vit")
    """Backbones to extract and align."""
    random_init: bool = False
    """Force random-init backbones even when pretrained weights are cached."""
    tiny: bool = False
    """Tiny random-init backbones (2 blocks of width 64): a fast smoke run of the pipeline."""
    steps: int = 250
    """Training steps of the Universal SAE."""
    concepts: int = 1536
    """Concepts in the shared space. The demo's 300 images give ~47k training tokens, so it
    uses 2 x 768 rather than the paper's 8 x 768 = 6144, which needs ImageNet-scale data and
    hours of CPU time."""
    k: int = 32
    """Active concepts per token (TopK)."""
    batch_tokens: int = 2048
    """Tokens per training step (the paper uses 6272 = 32 images x 196 tokens)."""
    lr: float = 1e-3
    """Peak learning rate (higher than the paper's 3e-4: the demo's run is short)."""
    maximize: int = 2
    """Concepts to render with coordinated activation maximisation (0 = skip)."""
    maximize_steps: int = 32
    """Optimisation steps per maximised concept (the paper uses ~1000 on a GPU)."""
    seed: int = 0
    """Seed for images, random-init backbones and training."""

    def __post_init__(self) -> None:
        checks = [
            (self.images >= 8, f"--images must be >= 8, got {self.images}"),
            (bool(self.backbones), "--backbones must name at least one backbone"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.concepts >= 0, f"--concepts must be >= 0, got {self.concepts}"),
            (self.k >= 1, f"--k must be >= 1, got {self.k}"),
            (self.batch_tokens >= 1, f"--batch-tokens must be >= 1, got {self.batch_tokens}"),
            (self.maximize >= 0, f"--maximize must be >= 0, got {self.maximize}"),
            (self.maximize_steps >= 1, f"--maximize-steps must be >= 1, got {self.maximize_steps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsaeError(msg)


class DemoResult(NamedTuple):
    """Where the demo put its outputs."""

    report: Path
    store: Path
    run: Path
    pretrained: tuple[str, ...]
    """Backbones that ran with pretrained weights (the others were random-init)."""
    seconds: float


class WeightsPlan(NamedTuple):
    pairs: tuple[tuple[str, str], ...]
    """(backbone key, weights file) of the backbones with pretrained weights."""
    pretrained: tuple[str, ...]
    random: tuple[str, ...]
    """Backbones that run with seeded random weights."""
    why: str
    """Why some backbones are random-init ("" when none is)."""


def _weights_plan(cfg: DemoConfig) -> WeightsPlan:
    """Pretrained weights from the local HF cache; those missing are downloaded from the hub
    (announced first) unless offline; whatever cannot be had runs random-init, loudly."""
    from usae.pipeline.hub import cached_weights, fetch_weights, hub_cache_dir, is_offline
    from usae.pipeline.registry import resolve
    from usae.pipeline.weights import WeightsUnavailable

    specs = [resolve(n) for n in cfg.backbones]
    if cfg.random_init or cfg.tiny:
        return WeightsPlan((), (), tuple(s.key for s in specs), "as asked")
    files = {s.key: cached_weights(s, verify=False) for s in specs}
    missing = [s for s in specs if files[s.key] is None]
    why = ""
    if missing and is_offline():
        why = "offline (HF_HUB_OFFLINE is set) and not in the local model cache"
    elif missing:
        console.print(
            f"downloading pretrained weights for {', '.join(s.key for s in missing)} from the Hugging Face hub "
            f"into {hub_cache_dir()} (about 1.2 GB for dinov2, siglip and vit; HF_HUB_OFFLINE=1 skips this)"
        )
        reasons = []
        for s in missing:
            try:
                files[s.key] = fetch_weights(s)
            except WeightsUnavailable as e:
                reasons.append(str(e))
        why = "could not download them: " + " | ".join(reasons) if reasons else ""
    pairs = tuple((k, str(f.path)) for k, f in files.items() if f is not None)
    rnd = tuple(k for k, f in files.items() if f is None)
    return WeightsPlan(pairs, tuple(k for k, _ in pairs), rnd, why)


def _say_weights(plan: WeightsPlan) -> None:
    if not plan.random:
        console.print(f"[green]pretrained weights for: {', '.join(plan.pretrained)}")
        return
    console.print(
        Panel(
            f"RANDOM-INIT backbones for: {', '.join(plan.random)} ({plan.why}).\n"
            "The concepts found are those of untrained networks; the store records random_init=True.\n"
            "For real findings fetch the weights (`usae weights fetch dinov2,siglip,vit` on a machine\n"
            "with network) or pass --weights KEY=FILE to `usae extract`.",
            title="usae demo: random-init backbones",
            border_style="yellow",
        )
    )


def _extract(cfg: DemoConfig, manifest: Path, store: Path, weights) -> None:
    from usae.pipeline.extract import ExtractConfig, run_extract

    console.rule("[bold]1/4 extract")
    s = run_extract(
        ExtractConfig(
            manifest=manifest,
            store=store,
            image_root=manifest.parent,
            backbones=tuple(cfg.backbones),
            weights=weights,
            random_init=True,
            seed=cfg.seed,
            tiny=cfg.tiny,
            chunk_images=32,
        )
    )
    console.print(f"store {s.store}: {s.n_images} images, {s.failed} failed, {s.seconds:.1f}s")


def _train(cfg: DemoConfig, store: Path, run: Path) -> None:
    from usae.trainer.rundir import print_metrics
    from usae.trainer.train import TrainConfig, run_train

    console.rule("[bold]2/4 train")
    if (run / "model.safetensors").exists():
        console.print(f"reusing the finished run {run}")
        return
    if (run / "config.json").exists():  # an interrupted demo run: continue it
        tc = TrainConfig(resume=str(run))
    else:
        tc = TrainConfig(
            store=str(store),
            out=str(run),
            concepts=cfg.concepts,
            k=cfg.k,
            steps=cfg.steps,
            batch_tokens=cfg.batch_tokens,
            lr=cfg.lr,
            seed=cfg.seed,
            holdout=0.2,
            log_every=25,
            ckpt_every=max(cfg.steps // 2, 1),
            warmup_steps=max(cfg.steps // 10, 1),
            buffer_chunks=2,
        )
    res = run_train(tc)
    print_metrics(res.metrics)


def _analyze(cfg: DemoConfig, store: Path, run: Path, report: Path):
    """The photos come from the store's record of its manifest (no --manifest needed)."""
    from usae.analysis.report import AnalyzeConfig, run_analyze

    console.rule("[bold]3/4 analyze")
    return run_analyze(
        AnalyzeConfig(run=str(run), store=str(store), out=str(report), top_concepts=8, top_images=6)
    )


def _maximize(cfg: DemoConfig, run: Path, report: Path, weights) -> None:
    """Panels into REPORT/maximize: maximize renders the report's pages again to show them."""
    from usae.analysis.maximize import MaximizeConfig, run_maximize

    console.rule("[bold]4/4 activation maximisation")
    run_maximize(
        MaximizeConfig(
            run=run, out=report / "maximize", top=cfg.maximize, report=report,
            weights=tuple(f"{k}={f}" for k, f in weights), steps=cfg.maximize_steps,
            canvas=256, crops=4, seed=cfg.seed,
        )
    )  # fmt: skip


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Images -> store -> run -> report, each stage resumed or reused when already done."""
    from usae.pipeline.demo_images import build_demo_images

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data, store, run, report = out / "data", out / "store.zarr", out / "run", out / "report"
    plan = _weights_plan(cfg)
    _say_weights(plan)
    weights = plan.pairs
    manifest = data / "manifest.csv"
    if not manifest.exists() or _demo_size(data) != cfg.images:
        manifest = build_demo_images(data, n=cfg.images, seed=cfg.seed)
        (data / "demo.json").write_text(json.dumps({"images": cfg.images, "seed": cfg.seed}))
    _extract(cfg, manifest, store, weights)
    _train(cfg, store, run)
    _analyze(cfg, store, run, report)
    if cfg.maximize > 0:
        _maximize(cfg, run, report, weights)
    res = DemoResult(report / "index.html", store, run, plan.pretrained, time.perf_counter() - t0)
    console.print(
        Panel(
            f"Report: {res.report.resolve()}\nOpen it in a browser (works offline).",
            title=f"usae demo done in {res.seconds:.0f}s",
            border_style="green",
        )
    )
    return res


def _demo_size(data: Path) -> int:
    try:
        return int(json.loads((data / "demo.json").read_text())["images"])
    except (OSError, ValueError, KeyError):
        return -1


def register(app: typer.Typer) -> None:
    """Add `usae demo` to the app (options generated from ``DemoConfig``)."""
    config_command(app, "demo", DemoConfig, run_demo)
