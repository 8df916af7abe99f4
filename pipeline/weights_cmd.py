"""`usae weights fetch` / `usae weights list`: their configs, run functions and table.

fetch: backbone names -> their pretrained weights in the HF cache (`usae.pipeline.hub`), for
clusters whose compute nodes are offline (fetch on a login node, run anywhere); list: what the
cache holds for every registry entry, with size and sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from usae.pipeline.hub import WeightsFile, cached_weights, fetch_weights, hub_source
from usae.pipeline.weights import WeightsUnavailable

if TYPE_CHECKING:
    from usae.pipeline.registry import BackboneSpec


# ---------------------------------------------------------------- `usae weights fetch / list`
@dataclass(frozen=True)
class WeightsFetchConfig:
    """`usae weights fetch`: download backbones' pretrained weights into the HF cache."""

    backbones: tuple[str, ...] = ("dinov2", "siglip", "vit")
    """Backbones whose weights to fetch: registry keys, timm:<model.tag>, open_clip:<model>/<pretrained>, or "all" (every registry entry)."""
    timeout: float | None = None
    """Seconds the hub may take to answer each request before the fetch gives up (default: HF_HUB_ETAG_TIMEOUT when set, else 5)."""
    progress: bool = True
    """Show a download progress bar."""


@dataclass(frozen=True)
class WeightsListConfig:
    """`usae weights list`: what the local cache holds for each backbone (no network)."""

    backbones: tuple[str, ...] = ("all",)
    """Backbones to look up; "all" = every registry entry."""
    verify: bool = True
    """Hash each cached file and flag one whose content differs from the sha256 it was stored under."""
    json: bool = False
    """Print JSON instead of a table."""


@dataclass(frozen=True)
class WeightsRow:
    """One backbone's weights, as `usae weights fetch` / `usae weights list` report them."""

    key: str
    model: str
    """source:name, e.g. timm:vit_small_patch14_dinov2.lvd142m."""
    repo_id: str | None
    revision: str | None
    """Revision asked for (main unless the library pins one)."""
    status: str
    """cached, downloaded, missing, damaged, failed, no-hub (the library names no hub repo)."""
    file: WeightsFile | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        f = self.file
        return {
            "key": self.key, "model": self.model, "repo_id": self.repo_id,
            "revision": self.revision, "status": self.status,
            "commit": f.revision if f else None, "filename": f.filename if f else None,
            "size": f.size if f else None, "sha256": f.sha256 if f else None,
            "path": str(f.path) if f else None, "origin": f.origin if f else None,
            "error": self.error,
        }  # fmt: skip


def _specs(names: tuple[str, ...]) -> list[BackboneSpec]:
    from usae.pipeline.registry import REGISTRY, resolve

    out: list[BackboneSpec] = []
    for n in names:
        out += list(REGISTRY.values()) if n.strip() == "all" else [resolve(n)]
    return list({s.key: s for s in out}.values())


def _row(
    spec: BackboneSpec, status: str, file: WeightsFile | None = None, error: str | None = None
):
    src = hub_source(spec)
    return WeightsRow(
        spec.key, f"{spec.source}:{spec.name}", src.repo_id if src else None,
        src.revision if src else None, status, file, error,
    )  # fmt: skip


def run_weights_fetch(cfg: WeightsFetchConfig) -> list[WeightsRow]:
    """Fetch each backbone's weights (the cache first); raises `WeightsUnavailable` after trying
    them all when any could not be had (the message lists which and why)."""
    if not cfg.backbones:
        raise WeightsUnavailable("give at least one backbone")
    rows = []
    for spec in _specs(cfg.backbones):
        try:
            hit = fetch_weights(spec, timeout=cfg.timeout, progress=cfg.progress)
        except WeightsUnavailable as e:
            rows.append(_row(spec, "failed", error=str(e)))
        else:
            rows.append(_row(spec, "downloaded" if hit.downloaded else "cached", hit))
    bad = [r for r in rows if r.file is None]
    if bad:
        e = WeightsUnavailable("; ".join(f"{r.key}: {r.error}" for r in bad))
        e.rows = rows  # type: ignore[attr-defined]  # what was fetched before, for the CLI table
        raise e
    return rows


def run_weights_list(cfg: WeightsListConfig) -> list[WeightsRow]:
    """What the local cache holds for each backbone. Never touches the network."""
    rows = []
    for spec in _specs(cfg.backbones or ("all",)):
        src = hub_source(spec)
        if src is None:
            rows.append(_row(spec, "no-hub"))
            continue
        try:
            hit = cached_weights(spec, verify=cfg.verify)
        except WeightsUnavailable as e:
            rows.append(_row(spec, "damaged", error=str(e)))
            continue
        rows.append(_row(spec, "cached", hit) if hit else _row(spec, "missing"))
    return rows


def weights_table(rows: list[WeightsRow], title: str):
    """A rich table of `rows` (sizes in MB, hashes shortened)."""
    from rich.table import Table

    t = Table(title=title)
    for c in ("backbone", "status", "repo", "commit", "file", "size", "sha256"):
        t.add_column(c, justify="right" if c == "size" else "left", overflow="fold")
    style = {"cached": "green", "downloaded": "green", "missing": "yellow"}
    for r in rows:
        f = r.file
        t.add_row(
            r.key, f"[{style.get(r.status, 'red')}]{r.status}[/]", r.repo_id or "-",
            (f.revision or "-")[:12] if f else "-", f.filename if f else "-",
            f"{f.size / 1e6:.1f} MB" if f else "-", f"{f.sha256[:16]}…" if f else "-",
        )  # fmt: skip
    return t
