"""Photos bundled in PyPI packages -> a finished report: the whole pipeline on an embedded default.

``usae demo`` builds a few hundred images from the photos that ship with scikit-image and
scikit-learn (random crops and flips), then runs the real stages on them: extract (the three
default backbones), train (the Universal SAE), analyze (metrics, figures, HTML report) and
coordinated activation maximisation for the top concepts, and prints the report's path.

Backbones use pretrained weights when they are in the local model cache; otherwise the demo
says so loudly and uses seeded random-init backbones (recorded in the store's attributes), so
it runs anywhere without a network. Re-running the same command reuses what is finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, NamedTuple

import typer
from rich.console import Console
from rich.panel import Panel

console = Console(stderr=True)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``usae demo``."""

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
    uses 2 x 768 rather than the paper's 8 x 768 (0), which needs ImageNet-scale data and
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


class DemoResult(NamedTuple):
    """Where the demo put its outputs."""

    report: Path
    store: Path
    run: Path
    pretrained: tuple[str, ...]
    """Backbones that ran with pretrained weights (the others were random-init)."""
    seconds: float


def _weights_plan(cfg: DemoConfig) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]:
    """(weights pairs for cached backbones, pretrained keys, random-init keys)."""
    from usae.pipeline.registry import resolve
    from usae.pipeline.weights import hub_cache_file

    pairs, pre, rnd = [], [], []
    for name in cfg.backbones:
        spec = resolve(name)
        f = None if (cfg.random_init or cfg.tiny) else hub_cache_file(spec)
        if f is None:
            rnd.append(spec.key)
        else:
            pairs.append((spec.key, str(f)))
            pre.append(spec.key)
    return tuple(pairs), tuple(pre), tuple(rnd)


def _say_weights(pre: tuple[str, ...], rnd: tuple[str, ...], forced: bool) -> None:
    if not rnd:
        console.print(f"[green]pretrained weights from the local cache for: {', '.join(pre)}")
        return
    why = "as asked" if forced else "no pretrained weights in the local model cache (nothing is downloaded)"
    console.print(
        Panel(
            f"RANDOM-INIT backbones for: {', '.join(rnd)} ({why}).\n"
            "The concepts found are those of untrained networks; the store records random_init=True.\n"
            "For real findings run `usae extract` with cached weights or --weights KEY=FILE.",
            title="usae demo: random-init backbones",
            border_style="yellow",
        )
    )


def _extract(cfg: DemoConfig, manifest: Path, store: Path, weights) -> None:
    from usae.pipeline.extract import ExtractConfig, run_extract

    console.rule("[bold]1/4 extract")
    s = run_extract(
        ExtractConfig(
            manifest=manifest, store=store, image_root=manifest.parent, backbones=tuple(cfg.backbones),
            weights=weights, random_init=True, seed=cfg.seed, tiny=cfg.tiny,
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
            store=str(store), out=str(run), concepts=cfg.concepts, k=cfg.k, steps=cfg.steps,
            batch_tokens=cfg.batch_tokens, lr=cfg.lr, seed=cfg.seed, holdout=0.2, log_every=25,
            ckpt_every=max(cfg.steps // 2, 1), warmup_steps=max(cfg.steps // 10, 1), buffer_chunks=2,
        )
    res = run_train(tc)
    print_metrics(res.metrics)


def _analyze(cfg: DemoConfig, manifest: Path, store: Path, run: Path, report: Path):
    from usae.analysis.report import AnalyzeConfig, run_analyze

    return run_analyze(
        AnalyzeConfig(run=str(run), store=str(store), out=str(report), manifest=str(manifest),
                      image_root=str(manifest.parent), top_concepts=8, top_images=6)
    )


def _maximize(cfg: DemoConfig, run: Path, report: Path, weights) -> None:
    from usae.analysis.maximize import MaximizeConfig, run_maximize

    console.rule("[bold]4/4 activation maximisation")
    run_maximize(
        MaximizeConfig(
            run=run, out=report / "maximize", top=cfg.maximize, report=report,
            weights=tuple(f"{k}={f}" for k, f in weights), steps=cfg.maximize_steps,
            canvas=256, crops=4, seed=cfg.seed,
        )
    )


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Images -> store -> run -> report, each stage resumed or reused when already done."""
    from usae.pipeline.demo_images import build_demo_images

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data, store, run, report = out / "data", out / "store.zarr", out / "run", out / "report"
    weights, pre, rnd = _weights_plan(cfg)
    _say_weights(pre, rnd, cfg.random_init or cfg.tiny)
    manifest = data / "manifest.csv"
    if not manifest.exists() or _demo_size(data) != cfg.images:
        manifest = build_demo_images(data, n=cfg.images, seed=cfg.seed)
        (data / "demo.json").write_text(json.dumps({"images": cfg.images, "seed": cfg.seed}))
    _extract(cfg, manifest, store, weights)
    _train(cfg, store, run)
    console.rule("[bold]3/4 analyze")
    _analyze(cfg, manifest, store, run, report)
    if cfg.maximize > 0:
        _maximize(cfg, run, report, weights)
        _analyze(cfg, manifest, store, run, report)  # re-render so concept pages show the panels
    res = DemoResult(report / "index.html", store, run, pre, time.perf_counter() - t0)
    console.print(Panel(f"Report: {res.report.resolve()}\nOpen it in a browser (works offline).",
                        title=f"usae demo done in {res.seconds:.0f}s", border_style="green"))
    return res


def _demo_size(data: Path) -> int:
    try:
        return int(json.loads((data / "demo.json").read_text())["images"])
    except (OSError, ValueError, KeyError):
        return -1


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = DemoConfig.out,
        images: Annotated[int, typer.Option(min=8, help="Demo images cut from the bundled photos.")] = DemoConfig.images,
        backbones: Annotated[str, typer.Option(help="Comma-separated backbone names.")] = ",".join(DemoConfig.backbones),
        random_init: Annotated[bool, typer.Option(help="Force random-init backbones even if weights are cached.")] = False,
        tiny: Annotated[bool, typer.Option(help="Tiny random-init backbones: a fast smoke run.")] = False,
        steps: Annotated[int, typer.Option(min=1, help="Training steps of the Universal SAE.")] = DemoConfig.steps,
        concepts: Annotated[int, typer.Option(min=0, help="Shared concepts (0 = 8 x widest backbone, the paper's).")] = DemoConfig.concepts,
        k: Annotated[int, typer.Option(min=1, help="Active concepts per token (TopK).")] = DemoConfig.k,
        batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per training step.")] = DemoConfig.batch_tokens,
        lr: Annotated[float, typer.Option(help="Peak learning rate.")] = DemoConfig.lr,
        maximize: Annotated[int, typer.Option(min=0, help="Concepts to render by activation maximisation.")] = DemoConfig.maximize,
        maximize_steps: Annotated[int, typer.Option(min=1, help="Steps per maximised concept.")] = DemoConfig.maximize_steps,
        seed: Annotated[int, typer.Option(help="Seed for images, random init and training.")] = 0,
    ) -> None:
        """Run the whole pipeline on photos bundled with scikit-image/scikit-learn and print the report's path."""
        cfg = DemoConfig(out=out, images=images, backbones=tuple(b.strip() for b in backbones.split(",") if b.strip()),
                         random_init=random_init, tiny=tiny, steps=steps, concepts=concepts, k=k,
                         batch_tokens=batch_tokens, lr=lr, maximize=maximize, maximize_steps=maximize_steps, seed=seed)
        try:
            run_demo(cfg)
        except Exception as e:  # noqa: BLE001 - the stages raise their own clear errors
            from usae.errors import user_error

            if not user_error(e):
                raise
            console.print(f"[red]usae demo failed:[/red] {e}")
            raise typer.Exit(1) from None


CONFIG_FIELDS = tuple(f.name for f in fields(DemoConfig))
