"""Command line -> extraction stage: `usae extract`, `usae info` (and `usae manifest`).

A thin Typer layer: options mirror the fields of `ExtractConfig` (help text = the field's
docstring), the command builds the config and calls `run_extract`. A notebook calls the
same `run_extract(ExtractConfig(...))`.
"""

from __future__ import annotations

import ast
import inspect
import json
from functools import cache
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from usae.pipeline.extract import (
    ExtractConfig,
    ExtractError,
    ExtractSummary,
    TooManyFailures,
    run_extract,
)
from usae.pipeline.registry import RegistryError, WeightsUnavailable
from usae.pipeline.store import Store, StoreError


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under the fields of a dataclass (the single source of help text)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _doc(name: str, extra: str = "") -> str:
    return (field_docs(ExtractConfig)[name] + (" " + extra if extra else "")).strip()


def parse_grid(text: str) -> tuple[int, int]:
    """'14x14' (or '14') -> (14, 14)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(
            f"expected HxW such as 14x14, got {text!r}", param_hint="--grid"
        ) from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise typer.BadParameter(
            f"expected HxW with positive sizes, got {text!r}", param_hint="--grid"
        )
    return vals[0], vals[1]


def parse_weights(items: list[str]) -> tuple[tuple[str, str], ...]:
    """['KEY=FILE', ...] -> ((key, file), ...), each file checked to exist."""
    out = []
    for it in items:
        key, sep, file = it.partition("=")
        if not sep or not key or not file:
            raise typer.BadParameter(f"expected KEY=FILE, got {it!r}", param_hint="--weights")
        if not Path(file).is_file():
            raise typer.BadParameter(f"{file} does not exist", param_hint="--weights")
        out.append((key.strip(), file))
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise typer.BadParameter(
            f"one weights file per backbone, got {keys}", param_hint="--weights"
        )
    return tuple(out)


def _summary_table(s: ExtractSummary) -> Table:
    t = Table(title="usae extract", show_header=False)
    rate = s.computed / s.seconds if s.seconds > 0 else 0.0
    for k, v in (
        ("store", str(s.store)),
        ("backbones", ", ".join(s.backbones)),
        ("images", str(s.n_images)),
        ("computed now", str(s.computed)),
        ("already done", str(s.skipped)),
        ("failed", str(s.failed)),
        ("seconds", f"{s.seconds:.1f}"),
        ("images/s", f"{rate:.1f}"),
    ):
        t.add_row(k, v)
    return t


def extract_cmd(
    manifest: Path = typer.Option(..., "--manifest", "-m", help=_doc("manifest")),
    store: Path = typer.Option(..., "--store", "-s", help=_doc("store")),
    image_root: Path | None = typer.Option(None, help=_doc("image_root")),
    backbones: str = typer.Option(
        ",".join(ExtractConfig.backbones), help=_doc("backbones", "Comma-separated.")
    ),
    layer: int | None = typer.Option(
        None,
        help=_doc("layer", "E.g. --layer 5 stores the output of the 6th block (no final norm)."),
    ),
    grid: str = typer.Option("14x14", help=_doc("grid", "Written HxW.")),
    weights: list[str] = typer.Option(
        [], "--weights", "-w", help=_doc("weights", "As KEY=FILE; repeatable.")
    ),
    random_init: bool = typer.Option(False, "--random-init", help=_doc("random_init")),
    seed: int = typer.Option(ExtractConfig.seed, help=_doc("seed")),
    tiny: bool = typer.Option(False, "--tiny", hidden=True, help=_doc("tiny")),
    dtype: str = typer.Option(ExtractConfig.dtype, help=_doc("dtype")),
    batch_size: int = typer.Option(ExtractConfig.batch_size, min=1, help=_doc("batch_size")),
    device: str = typer.Option(ExtractConfig.device, help=_doc("device")),
    chunk_images: int = typer.Option(ExtractConfig.chunk_images, min=1, help=_doc("chunk_images")),
    workers: int = typer.Option(ExtractConfig.workers, min=0, help=_doc("workers")),
    scheduler: str | None = typer.Option(None, help=_doc("scheduler")),
    max_failures: float = typer.Option(
        ExtractConfig.max_failures, min=0.0, max=1.0, help=_doc("max_failures")
    ),
    decode_threads: int = typer.Option(
        ExtractConfig.decode_threads, min=1, help=_doc("decode_threads")
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_doc("progress")),
) -> None:
    """Run backbones over the images of a manifest into an activation store (resumable)."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise typer.BadParameter("choose auto, bf16 or fp32", param_hint="--dtype")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter("choose auto, cpu or cuda", param_hint="--device")
    cfg = ExtractConfig(
        manifest=manifest,
        store=store,
        image_root=image_root,
        backbones=tuple(b.strip() for b in backbones.split(",") if b.strip()),
        layer=layer,
        grid=parse_grid(grid),
        weights=parse_weights(weights),
        random_init=random_init,
        seed=seed,
        tiny=tiny,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        chunk_images=chunk_images,
        workers=workers,
        scheduler=scheduler,
        max_failures=max_failures,
        decode_threads=decode_threads,
        progress=progress,
    )
    from usae.pipeline.manifest import ManifestError

    console = Console()
    try:
        summary = run_extract(cfg)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/yellow]: committed chunks are kept; re-run the same command to resume"
        )
        raise typer.Exit(130) from None
    except TooManyFailures as e:
        console.print(_summary_table(e.summary))
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    except (ExtractError, RegistryError, WeightsUnavailable, StoreError, ManifestError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(_summary_table(summary))


# ---------------------------------------------------------------- info
def _weights_text(spec: dict) -> str:
    ident = spec.get("identity") or {}
    src = ident.get("weights", "?")
    sha = (ident.get("sha256") or "")[:12]
    seed = f" seed {ident.get('seed')}" if ident.get("random_init") else ""
    return f"{src}{seed} sha256 {sha}…" + (" (tiny)" if ident.get("tiny") else "")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def info_tables(summary: dict, failures: list[dict], max_failures_shown: int = 10) -> list[Table]:
    """Rich tables describing a store (what `usae info` prints)."""
    head = Table(title=f"store {summary['path']}", show_header=False)
    done = "[green]complete[/green]" if summary["complete"] else "[yellow]incomplete[/yellow]"
    for k, v in (
        ("source", str(summary["source"])),
        ("status", done),
        ("images", f"{summary['n_images']} ({summary['n_valid']} valid)"),
        (
            "grid",
            "x".join(map(str, summary["grid"])) + f" = {summary['tokens_per_image']} tokens/image",
        ),
        (
            "chunks",
            f"{summary['chunks_committed']} committed, {summary['chunk_images']} images each",
        ),
        ("failures", str(summary["failures"])),
    ):
        head.add_row(k, v)
    bb = Table(title="backbones")
    for col in ("key", "model", "tokens (+prefix)", "layer, dtype", "weights", "mean / std"):
        bb.add_column(col, overflow="fold")
    for key, b in summary["backbones"].items():
        spec = b["spec"]
        layer = "last+norm" if spec.get("layer") is None else f"block {spec['layer']}"
        bb.add_row(
            key,
            f"{spec.get('source', '?')}:{spec.get('name', '?')}",
            f"{b['rows']} x {b['width']} (+{b['prefix_tokens']}/image)",
            f"{layer}, {spec.get('compute_dtype', '-')}",
            _weights_text(spec),
            f"{_fmt(b['scalar_mean'])} / {_fmt(b['scalar_std'])}",
        )
    tables = [head, bb]
    if failures:
        ft = Table(
            title=f"failed images (first {min(len(failures), max_failures_shown)} of {len(failures)})"
        )
        for col in ("image_id", "path", "reason"):
            ft.add_column(col)
        for f in failures[:max_failures_shown]:
            ft.add_row(str(f.get("image_id")), str(f.get("path")), str(f.get("reason")))
        tables.append(ft)
    return tables


def info_cmd(
    store: Path = typer.Argument(..., help="Activation store to describe."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the summary as JSON instead of tables."
    ),
) -> None:
    """Describe an activation store: backbones, shapes, grid, weights, completeness, failures."""
    console = Console()
    try:
        st = Store.open(store, require_complete=False)
    except StoreError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    summary = st.summary()
    if as_json:
        print(json.dumps({**summary, "failure_list": st.failures}, indent=2, default=str))
        return
    for t in info_tables(summary, st.failures):
        console.print(t)


def register(app: typer.Typer) -> None:
    """Add `extract` and `info` (and `manifest`, when its module exists) to the CLI."""
    app.command("extract")(extract_cmd)
    app.command("info")(info_cmd)
    from usae.pipeline import manifest

    manifest.register(app)
