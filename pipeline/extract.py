"""Manifest of images + backbones -> activation store (`usae extract`).

Each image is decoded once, resized once per distinct backbone input size, and given to
every backbone; the patch tokens (resampled to the common grid) go to the store, one
chunk of `chunk_images` images at a time. This module resolves the settings, creates (or
reopens) the store and schedules tasks of whole chunks; what a task does is
`usae.pipeline.extract_task`. A re-run skips every committed chunk (resume after Ctrl-C,
SIGKILL or a lost worker gives the same store as an uninterrupted run).

Where it runs: in this process by default; `workers=N` starts a Dask LocalCluster of N
worker processes (threads x workers = cores); `scheduler=ADDRESS` uses an existing cluster
(every worker must see the store path and the images).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import pandas as pd
from usae.pipeline.extract_task import (
    ExtractError,
    ModelKey,
    TaskPlan,
    TaskResult,
    get_backbones,
    layer_record,
    run_chunks,
)
from usae.pipeline.images import has_scheme
from usae.pipeline.manifest import manifest_items, read_manifest
from usae.pipeline.registry import DEFAULT_BACKBONES, join_layer_lists, layer_key, parse_backbone
from usae.pipeline.store import BackboneLayout, Store

from usae.runtime import check_device_name, progress_bar, resolve_device, resolve_dtype

__all__ = [
    "ExtractConfig",
    "ExtractError",
    "ExtractSummary",
    "TooManyFailures",
    "prepare",
    "run_extract",
]


@dataclass(frozen=True)
class ExtractConfig:
    """`usae extract`: run backbones over the images of a manifest into an activation store."""

    manifest: Path
    """Manifest file (.parquet or .csv) listing image_id and path."""
    store: Path
    """Store to create or resume (a folder, conventionally S.zarr)."""
    image_root: Path | None = None
    """Folder the manifest paths are relative to (default: the manifest's folder)."""
    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    """Backbone names: dinov2, siglip, vit, dinov3, siglip2, pe, timm:<model.tag>, open_clip:<model>/<pretrained>;
    NAME@N or NAME@N,M,... stores those blocks, each as group NAME@N, from one forward pass."""
    layer: int | None = None
    """Block stored for names without @ (0-based); None = last block after the final norm."""
    grid: tuple[int, int] = (14, 14)
    """Common token grid (h, w) every backbone is resampled to."""
    weights: tuple[tuple[str, str], ...] = ()
    """(backbone key, weights file) pairs; a .safetensors or state-dict .pt/.pth file."""
    random_init: bool = False
    """Use seeded random weights for backbones without a weights file (pipeline tests only)."""
    offline: bool = False
    """Never touch the network: pretrained weights only from the local HF cache (as with HF_HUB_OFFLINE=1)."""
    store_dtype: Literal["float16", "int8"] = "float16"
    """Token dtype of the store: float16, or int8 codes with per-chunk, per-channel scales (half the bytes; exact statistics kept)."""
    seed: int = 0
    """Seed of the random init."""
    tiny: bool = False
    """Tiny backbones (2 blocks of width 64) for tests."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: auto (bf16 on CUDA and on CPUs with fast bf16, else fp32), bf16, fp32."""
    batch_size: int = 32
    """Images per forward pass."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    chunk_images: int = 64
    """Images per store chunk (the unit of writing and resuming)."""
    workers: int = 0
    """Dask LocalCluster worker processes; 0 = run in this process."""
    scheduler: str | None = None
    """Address of an existing Dask scheduler to run on (instead of workers)."""
    max_failures: float = 0.01
    """Largest tolerated fraction of images that fail to decode; above it the run fails."""
    decode_threads: int = 2
    """Threads that decode and resize images while the backbones run."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ExtractError("give at least one backbone")
        if self.grid[0] < 1 or self.grid[1] < 1:
            raise ExtractError(f"grid must be positive, got {self.grid}")
        if self.batch_size < 1 or self.chunk_images < 1:
            raise ExtractError("batch_size and chunk_images must be >= 1")
        if self.decode_threads < 1:
            raise ExtractError("decode_threads must be >= 1")
        if not 0.0 <= self.max_failures <= 1.0:
            raise ExtractError(f"max_failures is a fraction in [0, 1], got {self.max_failures}")
        if self.workers < 0:
            raise ExtractError("workers must be >= 0")
        if self.workers and self.scheduler:
            raise ExtractError(
                "give either workers (a local cluster) or scheduler (an existing one), not both"
            )
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ExtractError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        check_device_name(self.device)


class ExtractSummary(NamedTuple):
    """What `run_extract` did."""

    store: Path  # the store written
    n_images: int  # images in the manifest
    computed: int  # images computed by this run
    skipped: int  # images in chunks already committed before this run
    failed: int  # images that failed to decode (whole store)
    seconds: float  # wall time of this run
    backbones: tuple[str, ...]  # store keys, in order


# ---------------------------------------------------------------- orchestration
class _Prepared(NamedTuple):
    plan: TaskPlan
    store: Store
    items: list[tuple[str, str, str]]  # (image_id, file, manifest path) in store order
    todo: list[int]  # uncommitted chunks


def _manifest_items(cfg: ExtractConfig):
    df = read_manifest(cfg.manifest, cfg.image_root)
    items = manifest_items(df)
    split = list(df["split"]) if "split" in df.columns else None
    labels = None
    if "label" in df.columns:  # a missing label (NaN/None) is stored as ""
        labels = ["" if pd.isna(v) else str(v) for v in df["label"]]
    return items, split, labels, df.attrs["manifest_sha256"]


def image_source(manifest: str | os.PathLike, image_root: str | os.PathLike | None) -> dict:
    """The store's record of where its images are: each path as given and resolved (absolute;
    a URL stays as is); image_root "" when it defaulted to the manifest's folder."""

    def absolute(p: str | os.PathLike) -> str:
        return os.fspath(p) if has_scheme(p) else str(Path(p).expanduser().resolve())

    root = "" if image_root is None else os.fspath(image_root)
    if root:
        root_abs = absolute(root)
    elif has_scheme(manifest):
        root_abs = os.fspath(manifest).rsplit("/", 1)[0]
    else:
        root_abs = str(Path(absolute(manifest)).parent)
    return {"manifest": os.fspath(manifest), "manifest_abs": absolute(manifest),
            "image_root": root, "image_root_abs": root_abs}  # fmt: skip


def prepare(cfg: ExtractConfig) -> _Prepared:
    """Resolve backbones and weights, load them here (for their identity), create/open the store."""
    refs = [parse_backbone(n) for n in join_layer_lists(cfg.backbones)]
    specs = tuple(r.spec for r in refs)
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ExtractError(
            f"backbone keys must be unique, got {keys} (use alias=name to rename, NAME@N,M for several layers)"
        )
    unknown = sorted({k for k, _ in cfg.weights} - set(keys))
    if unknown:
        raise ExtractError(f"--weights names unknown backbone(s) {unknown}; backbones are {keys}")
    layers = tuple(r.layers if r.layers is not None else (cfg.layer,) for r in refs)
    groups = tuple(
        (r.spec.key,) if r.layers is None else tuple(layer_key(r.spec.key, i) for i in r.layers)
        for r in refs
    )
    device = resolve_device(cfg.device)
    mkey = ModelKey(
        specs, tuple(sorted(cfg.weights)), cfg.random_init, cfg.seed, cfg.layer, cfg.tiny,
        str(device), resolve_dtype(cfg.dtype, device), layers, True if cfg.offline else None,
    )  # fmt: skip
    items, split, labels, manifest_hash = _manifest_items(cfg)
    backbones = get_backbones(mkey)
    layouts = []
    for b, layers_b, keys_b in zip(backbones, layers, groups, strict=True):
        for layer, k in zip(layers_b, keys_b, strict=True):
            rec = layer_record(b, mkey, cfg.grid, layer, k)
            layouts.append(BackboneLayout(k, rec["width"], b.spec.prefix_tokens, rec))
    records = [lay.spec for lay in layouts]
    store = Store.create(
        cfg.store,
        [i for i, _, _ in items],
        layouts,
        store_dtype=cfg.store_dtype,
        grid=cfg.grid,
        chunk_images=cfg.chunk_images,
        source="extract",
        fingerprint_of={
            "manifest_sha256": manifest_hash,
            "backbones": records,
            "grid": list(cfg.grid),
            "layer": cfg.layer,
            "chunk_images": cfg.chunk_images,
            "dtype": mkey.dtype,
        },
        manifest_sha256=manifest_hash,
        split=split,
        labels=labels,
        extra={"extract": {"batch_size": cfg.batch_size, "device": str(device)}},
        image_source=image_source(cfg.manifest, cfg.image_root),
    )
    plan = TaskPlan(
        mkey, tuple(b.identity for b in backbones), str(cfg.store), tuple(cfg.grid), cfg.batch_size,
        cfg.decode_threads, sizes=tuple(sorted({b.spec.img_size for b in backbones})), keys=groups,
    )  # fmt: skip
    todo = sorted(set(range(store.n_chunks)) - store.committed_chunks())
    return _Prepared(plan, store, items, todo)


def _work(prep: _Prepared, chunks: Sequence[int]) -> list[tuple[int, list[tuple[str, str, str]]]]:
    out = []
    for i in chunks:
        a, b = prep.store.chunk_images_range(i)
        out.append((i, prep.items[a:b]))
    return out


def _run_local(prep: _Prepared, tick: Callable[[int], None]) -> TaskResult:
    return run_chunks(prep.plan, _work(prep, prep.todo), on_images=tick)


def _run_dask(prep: _Prepared, cfg: ExtractConfig, tick: Callable[[int], None]) -> TaskResult:
    """Tasks of whole chunks on a Dask cluster: local (workers=N) or existing (scheduler)."""
    from distributed import Client, LocalCluster, as_completed

    cores = os.cpu_count() or 1
    cluster = None
    if cfg.scheduler:
        client = Client(cfg.scheduler)
        plan = prep.plan
    else:
        per = max(1, cores // cfg.workers)
        cluster = LocalCluster(
            n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
        plan = TaskPlan(**{**prep.plan.__dict__, "torch_threads": per})
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or cfg.workers or 1)
        size = max(1, math.ceil(len(prep.todo) / (4 * n_workers)))
        groups = [prep.todo[g : g + size] for g in range(0, len(prep.todo), size)]
        futures = [client.submit(run_chunks, plan, _work(prep, g), pure=False) for g in groups]
        done, n_img, n_fail = [], 0, 0
        for fut in as_completed(futures):
            r = fut.result()
            done += r.chunks
            n_img, n_fail = n_img + r.images, n_fail + r.failed
            tick(r.images)
        return TaskResult(sorted(done), n_img, n_fail)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Extract (or finish extracting) the store described by `cfg`; returns what was done.

    Raises ExtractError when more than `max_failures` of the images failed (the store is
    still finalised, with those images masked invalid and listed in its failures).
    """
    t0 = time.perf_counter()
    prep = prepare(cfg)
    n_todo = sum(b - a for a, b in map(prep.store.chunk_images_range, prep.todo))
    with progress_bar(cfg.progress, info=True) as bar:
        task = bar.add_task("extract images", total=n_todo, info="")

        def tick(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, info=f"{speed:.1f} img/s" if speed else "")

        if prep.todo:
            _run_dask(prep, cfg, tick) if (cfg.workers or cfg.scheduler) else _run_local(prep, tick)
    store = Store(cfg.store, mode="r+")
    if not store.complete:
        store.finalize()
    failed = len(store.failures)
    summary = ExtractSummary(
        Path(cfg.store), store.n_images, n_todo, store.n_images - n_todo, failed,
        time.perf_counter() - t0, tuple(store.backbones),
    )  # fmt: skip
    if store.n_images and failed / store.n_images > cfg.max_failures:
        raise TooManyFailures(summary, cfg.max_failures)
    return summary


class TooManyFailures(ExtractError):
    """More images failed than `max_failures` allows (the store is complete nonetheless)."""

    def __init__(self, summary: ExtractSummary, limit: float):
        self.summary = summary
        super().__init__(
            f"{summary.failed} of {summary.n_images} images failed to decode "
            f"({summary.failed / summary.n_images:.1%} > max_failures {limit:.1%}); see `usae info {summary.store}`"
        )
