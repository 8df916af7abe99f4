"""Command line -> the pipeline's stages: `usae manifest`, `usae extract`, `usae info`.

A thin layer: each command is generated from its stage's frozen config dataclass by
`usae.options.config_command` (one option per field, help = the field's docstring), builds
the config, calls the stage's ``run_*`` function and prints what it returned. A notebook
calls the same functions, e.g. ``run_extract(ExtractConfig(...))``.
"""

from __future__ import annotations

import json
import os

import typer
from rich.console import Console
from rich.table import Table
from usae.pipeline.extract import ExtractConfig, ExtractSummary, TooManyFailures, run_extract
from usae.pipeline.info import InfoConfig, info_tables, run_info
from usae.pipeline.manifest import ManifestConfig, ManifestResult, run_manifest
from usae.pipeline.weights import parse_weight_files

from usae.options import Opt, config_command, fail


# ---------------------------------------------------------------- parsing option text
def parse_grid(text: str) -> tuple[int, int]:
    """'14x14' (or '14', or '14,14') -> (14, 14)."""
    parts = str(text).lower().replace("*", "x").replace(",", "x").split("x")
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
    """['KEY=FILE', ...] -> ((key, file), ...) (`usae.pipeline.weights.parse_weight_files`)."""
    try:
        return parse_weight_files(items)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--weights") from None


# ---------------------------------------------------------------- extract
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


def extract(cfg: ExtractConfig) -> None:
    """Run the extraction and print its summary (Ctrl-C: the resume hint, exit 130)."""
    console = Console()
    try:
        summary = run_extract(cfg)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/yellow]: committed chunks are kept; re-run the same command to resume"
        )
        raise typer.Exit(130) from None
    except TooManyFailures as e:  # the store is complete: show what was done, then the error
        fail(e, details=_summary_table(e.summary))
    console.print(_summary_table(summary))


EXTRACT_OPTS = {
    "manifest": Opt(flags=("--manifest", "-m")),
    "store": Opt(flags=("--store", "-s")),
    "backbones": Opt(extra_help="Comma-separated."),
    "layer": Opt(extra_help="E.g. --layer 5 stores the output of the 6th block (no final norm)."),
    "grid": Opt(parse=parse_grid, metavar="HxW", show=lambda g: f"{g[0]}x{g[1]}"),
    "weights": Opt(
        flags=("--weights", "-w"),
        multiple=True,
        parse=parse_weights,
        metavar="KEY=FILE",
        extra_help="As KEY=FILE; repeatable.",
    ),
    "random_init": Opt(flags=("--random-init",)),
    "tiny": Opt(flags=("--tiny",), hidden=True),
}


# ---------------------------------------------------------------- info
def info(cfg: InfoConfig) -> None:
    """Print a store's description: JSON with ``--json``, else tables."""
    summary = run_info(cfg)
    if cfg.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    console = Console()
    for t in info_tables(summary, summary["failure_list"]):
        console.print(t)


# ---------------------------------------------------------------- manifest
def manifest(cfg: ManifestConfig) -> None:
    """Build and write the manifest, then say what was written."""
    res: ManifestResult = run_manifest(cfg)
    console = Console()
    console.print(
        f"wrote [bold]{res.path}[/bold]: {res.n_images} images, sha256 {res.manifest_sha256[:16]}…"
    )
    if res.splits:
        splits = ", ".join(f"{k or '(none)'}={v}" for k, v in sorted(res.splits.items()))
        console.print("splits: " + splits)
    if res.ids_with_extension:
        console.print(
            f"{res.ids_with_extension} files share a name with another extension: their ids keep it"
        )
    if res.skipped_symlinks:
        console.print(f"skipped {res.skipped_symlinks} symlink(s) pointing outside {cfg.image_dir}")
    if os.path.realpath(cfg.out.parent) != os.path.realpath(cfg.image_dir):
        console.print(
            f"note: paths are relative to {cfg.image_dir}; pass it as the image root when reading "
            f"this manifest (the default root is the manifest's folder, {cfg.out.parent})"
        )


MANIFEST_OPTS = {
    "image_dir": Opt(argument=True),
    "out": Opt(flags=("--out", "-o")),
    "hash_files": Opt(flags=("--hash/--no-hash",)),
    "extensions": Opt(extra_help="Comma-separated."),
}


def register(app: typer.Typer) -> None:
    """Add `manifest`, `extract`, `info` and `weights fetch|list` to the CLI."""
    config_command(
        app,
        "manifest",
        ManifestConfig,
        manifest,
        opts=MANIFEST_OPTS,
        help="Build a manifest (image_id, path, split, label, sha256) from a folder of images.",
    )
    config_command(
        app,
        "extract",
        ExtractConfig,
        extract,
        opts=EXTRACT_OPTS,
        help="Run backbones over the images of a manifest into an activation store (resumable).",
    )
    config_command(
        app,
        "info",
        InfoConfig,
        info,
        opts={"store": Opt(argument=True)},
        help="Describe an activation store: backbones, shapes, grid, weights, completeness, failures.",
    )
    register_weights(app)


# ---------------------------------------------------------------- weights (usae weights fetch/list)
def weights_fetch(cfg) -> None:
    """Fetch the weights, then show what the cache holds for them (failures: the table, exit 2)."""
    from usae.pipeline.weights import WeightsUnavailable
    from usae.pipeline.weights_cmd import run_weights_fetch, weights_table

    try:
        rows = run_weights_fetch(cfg)
    except WeightsUnavailable as e:
        rows = getattr(e, "rows", None)
        fail(e, details=weights_table(rows, "usae weights fetch") if rows else None)
    Console().print(weights_table(rows, "usae weights fetch"))


def weights_list(cfg) -> None:
    """Show what the local cache holds for each backbone (JSON with ``--json``)."""
    from usae.pipeline.hub import hub_cache_dir
    from usae.pipeline.weights_cmd import run_weights_list, weights_table

    rows = run_weights_list(cfg)
    if cfg.json:
        print(
            json.dumps(
                {"cache": str(hub_cache_dir()), "backbones": [r.to_json() for r in rows]}, indent=2
            )
        )
        return
    Console().print(weights_table(rows, f"usae weights list ({hub_cache_dir()})"))


def register_weights(app: typer.Typer) -> None:
    """Add `usae weights fetch` and `usae weights list` (a `weights` sub-command group)."""
    from usae.pipeline.weights_cmd import WeightsFetchConfig, WeightsListConfig

    sub = typer.Typer(
        name="weights",
        help="Pretrained backbone weights in the HF hub cache: fetch them (on a machine with network), list them.",
        no_args_is_help=True,
    )
    names = Opt(argument=True, metavar="BACKBONES", extra_help="Comma-separated.")
    config_command(
        sub,
        "fetch",
        WeightsFetchConfig,
        weights_fetch,
        opts={"backbones": names},
        help="Download backbones' pretrained weights into the HF cache (resumes; checks sha256).",
    )
    config_command(
        sub,
        "list",
        WeightsListConfig,
        weights_list,
        opts={"backbones": names},
        help="Show what the local HF cache holds for each backbone: revision, size, sha256 (no network).",
    )
    app.add_typer(sub, name="weights")
