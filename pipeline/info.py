"""Activation store -> its description (`usae info`): backbones, shapes, grid, weights,
completeness and failures, as plain data (``--json``) or rich tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from usae.pipeline.store import Store


@dataclass(frozen=True)
class InfoConfig:
    """`usae info`: describe an activation store (backbones, shapes, grid, weights, completeness,
    failures)."""

    store: Path
    """Activation store to describe."""
    json: bool = False
    """Print the summary as JSON instead of tables."""


def run_info(cfg: InfoConfig) -> dict:
    """The store's `Store.summary()` plus its failures (``failure_list``); complete or not.

    Raises StoreError when `cfg.store` is not a usae store."""
    st = Store.open(cfg.store, require_complete=False)
    return {**st.summary(), "failure_list": st.failures}


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
