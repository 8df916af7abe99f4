"""Manifest of images + backbones -> activation store (`usae extract`).

Each image is decoded once, resized once per distinct backbone input size, and given to
every backbone; the patch tokens (resampled to the common grid) go to the store, one
chunk of `chunk_images` images at a time. A task owns whole chunks: it computes them and
writes them itself (`Store.write_chunk` commits each with a marker), so no activation data
ever travels through a Dask scheduler, and a re-run skips every committed chunk (resume
after Ctrl-C, SIGKILL or a lost worker gives the same store as an uninterrupted run).

Inside a task three things overlap: a thread pool decodes and resizes the images of the
current and the next chunk, the task's thread runs the backbones, and a writer thread
writes the previous chunk. Backbones are loaded once per process (module-level cache).

Where it runs: in this process by default; `workers=N` starts a Dask LocalCluster of N
worker processes (threads x workers = cores); `scheduler=ADDRESS` uses an existing cluster
(every worker must see the store path and the images).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from usae.pipeline.registry import (
    DEFAULT_BACKBONES,
    Backbone,
    BackboneSpec,
    load_backbone,
    resize_square,
    resolve,
)
from usae.pipeline.store import BackboneLayout, Store

from usae.errors import UsaeError

# Test hook: seconds to sleep after computing each chunk, so that a test can kill a run
# between commits. Not a user setting.
_DELAY_ENV = "USAE_EXTRACT_TEST_CHUNK_DELAY"


class ExtractError(UsaeError, RuntimeError):
    """A user-facing extraction problem (bad option, too many failed images, ...)."""


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
    """Backbone names: dinov2, siglip, vit, timm:<model.tag>, open_clip:<model>/<pretrained>."""
    layer: int | None = None
    """Block whose output is stored (0-based); None = last block after the final norm."""
    grid: tuple[int, int] = (14, 14)
    """Common token grid (h, w) every backbone is resampled to."""
    weights: tuple[tuple[str, str], ...] = ()
    """(backbone key, weights file) pairs; a .safetensors or state-dict .pt/.pth file."""
    random_init: bool = False
    """Use seeded random weights for backbones without a weights file (pipeline tests only)."""
    seed: int = 0
    """Seed of the random init."""
    tiny: bool = False
    """Tiny backbones (2 blocks of width 64) for tests."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on CUDA and on CPUs with bf16 support, else fp32), bf16, fp32."""
    batch_size: int = 32
    """Images per forward pass."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
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


class ExtractSummary(NamedTuple):
    """What `run_extract` did."""

    store: Path  # the store written
    n_images: int  # images in the manifest
    computed: int  # images computed by this run
    skipped: int  # images in chunks already committed before this run
    failed: int  # images that failed to decode (whole store)
    seconds: float  # wall time of this run
    backbones: tuple[str, ...]  # store keys, in order


# ---------------------------------------------------------------- resolved settings
@dataclass(frozen=True)
class _ModelKey:
    """Everything that determines the loaded backbones (the per-process cache key)."""

    specs: tuple[BackboneSpec, ...]
    weights: tuple[tuple[str, str], ...]
    random_init: bool
    seed: int
    layer: int | None
    tiny: bool
    device: str
    dtype: str


@dataclass(frozen=True)
class _Plan:
    """What a task needs besides its images: picklable, sent once per task."""

    models: _ModelKey
    identities: tuple[dict, ...]
    store: str
    grid: tuple[int, int]
    batch_size: int
    decode_threads: int
    torch_threads: int = 0
    sizes: tuple[int, ...] = field(default=())


def pick_dtype(name: str, device: str) -> str:
    """'auto' -> 'bf16' on CUDA or a CPU with native bf16 support, else 'fp32'."""
    if name in ("bf16", "fp32"):
        return name
    if name != "auto":
        raise ExtractError(f"dtype must be auto, bf16 or fp32, got {name!r}")
    if device.startswith("cuda"):
        return "bf16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except Exception:  # noqa: BLE001 - older builds without the probe
        return "fp32"


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ExtractError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda asked for, but no CUDA device is available")
    return name


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------- backbones (once per process)
_CACHE: dict[_ModelKey, list[Backbone]] = {}


def get_backbones(key: _ModelKey) -> list[Backbone]:
    """The backbones for `key`, loaded once per process and reused by every task."""
    if key not in _CACHE:
        _CACHE.clear()  # one configuration at a time: free the previous models
        files = dict(key.weights)
        _CACHE[key] = [
            load_backbone(
                s,
                weights=files.get(s.key),
                random_init=key.random_init,
                seed=key.seed,
                layer=key.layer,
                tiny=key.tiny,
                device=key.device,
                dtype=_DTYPES[key.dtype],
            )
            for s in key.specs
        ]
    return _CACHE[key]


def spec_record(bb: Backbone, key: _ModelKey, grid: tuple[int, int]) -> dict:
    """The backbone's entry in the store (group attribute `spec`, part of the fingerprint)."""
    return {
        **bb.spec.to_json(),
        "identity": dict(bb.identity),
        "layer": key.layer,
        "grid": list(grid),
        "compute_dtype": key.dtype,
        "random_init": bb.identity["random_init"],
        "seed": bb.identity["seed"],
    }


# ---------------------------------------------------------------- decoding
class _Decoded(NamedTuple):
    images: dict[int, torch.Tensor] | None  # img_size -> (3, s, s) float in [0, 1]
    reason: str | None  # why decoding failed


def _decode(path: str, sizes: Sequence[int]) -> _Decoded:
    """One image file -> one resized copy per input size, or the reason it failed."""
    from usae.pipeline.images import ImageError, load_image

    try:
        rgb_hw3 = load_image(path)
    except ImageError as e:
        return _Decoded(None, e.reason)
    except Exception as e:  # noqa: BLE001 - any other decoder failure is a failed image too
        return _Decoded(None, f"{type(e).__name__}: {e}")
    x_13hw = (
        torch.from_numpy(np.require(rgb_hw3, np.uint8, ["C", "W"]))
        .permute(2, 0, 1)[None]
        .float()
        .div_(255.0)
    )
    out = {}
    for s in sizes:
        out[s] = x_13hw[0] if tuple(x_13hw.shape[-2:]) == (s, s) else resize_square(x_13hw, s)[0]
    return _Decoded(out, None)


class _ChunkOut(NamedTuple):
    tokens: dict[str, np.ndarray]  # key -> (n * T, d) float16
    prefix: dict[str, np.ndarray]  # key -> (n, P, d) float16, only P > 0
    valid: np.ndarray  # (n,) bool
    failures: list[dict]  # {image_id, path, reason}


def _compute_chunk(
    plan: _Plan,
    backbones: Sequence[Backbone],
    images: Sequence[tuple[str, str, str]],
    decoded: Sequence[Future],
    on_images: Callable[[int], None] | None,
) -> _ChunkOut:
    """Run every backbone over one chunk's images (failed ones stay zero and invalid)."""
    n, t = len(images), plan.grid[0] * plan.grid[1]
    tok_ntd = {b.spec.key: np.zeros((n, t, b.spec.width), np.float16) for b in backbones}
    pre_npd = {
        b.spec.key: np.zeros((n, b.spec.prefix_tokens, b.spec.width), np.float16)
        for b in backbones
        if b.spec.prefix_tokens
    }
    valid = np.zeros(n, bool)
    failures: list[dict] = []
    device = plan.models.device
    for b0 in range(0, n, plan.batch_size):
        idx, batch = [], []
        for j in range(b0, min(b0 + plan.batch_size, n)):
            d = decoded[j].result()
            if d.images is None:
                failures.append(
                    {"image_id": images[j][0], "path": images[j][2], "reason": d.reason}
                )
            else:
                idx.append(j)
                batch.append(d.images)
        if idx:
            valid[idx] = True
            with torch.inference_mode():
                for bb in backbones:
                    x_b3hw = torch.stack([im[bb.spec.img_size] for im in batch]).to(
                        device, non_blocking=True
                    )
                    acts = bb(x_b3hw, plan.grid)
                    tok_ntd[bb.spec.key][idx] = acts.patch_btd.to(torch.float16).cpu().numpy()
                    if bb.spec.prefix_tokens:
                        pre_npd[bb.spec.key][idx] = acts.prefix_bpd.to(torch.float16).cpu().numpy()
        if on_images is not None:
            on_images(min(b0 + plan.batch_size, n) - b0)
    tokens = {k: v.reshape(n * t, -1) for k, v in tok_ntd.items()}
    return _ChunkOut(tokens, pre_npd, valid, failures)


class TaskResult(NamedTuple):
    """What one task reports back (counts only: the data went to the store)."""

    chunks: list[int]  # chunks this task committed
    images: int  # images computed
    failed: int  # images that failed to decode


def run_chunks(
    plan: _Plan,
    work: Sequence[tuple[int, Sequence[tuple[str, str, str]]]],
    on_images: Callable[[int], None] | None = None,
) -> TaskResult:
    """Compute and commit chunks: `work` = [(chunk index, [(image_id, file, manifest path)])].

    Decoding of the next chunk and writing of the previous one overlap with compute.
    Chunks committed meanwhile (e.g. by a worker that was thought lost) are skipped.
    """
    if plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
    backbones = get_backbones(plan.models)
    for bb, ident in zip(backbones, plan.identities, strict=True):
        if bb.identity["sha256"] != ident["sha256"]:
            raise ExtractError(
                f"backbone {bb.spec.key}: this worker's weights differ from the store's"
            )
    store = Store(plan.store, mode="r+")
    work = [(i, ims) for i, ims in work if not store.is_committed(i)]
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    done, n_img, n_fail = [], 0, 0
    with ThreadPoolExecutor(max(1, plan.decode_threads)) as pool, ThreadPoolExecutor(1) as writer:

        def submit(ims):
            return [pool.submit(_decode, f, plan.sizes) for _, f, _ in ims]

        pending: Future | None = None
        nxt = submit(work[0][1]) if work else []
        for w, (i, ims) in enumerate(work):
            cur, nxt = nxt, (submit(work[w + 1][1]) if w + 1 < len(work) else [])
            out = _compute_chunk(plan, backbones, ims, cur, on_images)
            if pending is not None:
                pending.result()
            pending = writer.submit(
                store.write_chunk,
                i,
                out.tokens,
                out.valid,
                prefix=out.prefix,
                failures=out.failures,
            )
            done.append(i)
            n_img, n_fail = n_img + len(ims), n_fail + len(out.failures)
            if delay:
                time.sleep(delay)
        if pending is not None:
            pending.result()
    return TaskResult(done, n_img, n_fail)


# ---------------------------------------------------------------- orchestration
class _Prepared(NamedTuple):
    plan: _Plan
    store: Store
    items: list[tuple[str, str, str]]  # (image_id, file, manifest path) in store order
    todo: list[int]  # uncommitted chunks


def _check(cfg: ExtractConfig) -> None:
    if not cfg.backbones:
        raise ExtractError("give at least one backbone")
    if cfg.grid[0] < 1 or cfg.grid[1] < 1:
        raise ExtractError(f"grid must be positive, got {cfg.grid}")
    if cfg.batch_size < 1 or cfg.chunk_images < 1:
        raise ExtractError("batch_size and chunk_images must be >= 1")
    if not 0.0 <= cfg.max_failures <= 1.0:
        raise ExtractError(f"max_failures is a fraction in [0, 1], got {cfg.max_failures}")
    if cfg.workers < 0:
        raise ExtractError("workers must be >= 0")
    if cfg.workers and cfg.scheduler:
        raise ExtractError(
            "give either workers (a local cluster) or scheduler (an existing one), not both"
        )


def _manifest_items(cfg: ExtractConfig):
    from usae.pipeline.manifest import read_manifest, resolve_path

    df = read_manifest(cfg.manifest, cfg.image_root)
    root = df.attrs["image_root"]
    items = [
        (str(i), os.fspath(resolve_path(root, p)), str(p))
        for i, p in zip(df["image_id"], df["path"], strict=True)
    ]
    split = list(df["split"]) if "split" in df.columns else None
    return items, split, df.attrs["manifest_sha256"]


def prepare(cfg: ExtractConfig) -> _Prepared:
    """Resolve backbones and weights, load them here (for their identity), create/open the store."""
    _check(cfg)
    specs = tuple(resolve(n) for n in cfg.backbones)
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ExtractError(f"backbone keys must be unique, got {keys} (use alias=name to rename)")
    unknown = sorted({k for k, _ in cfg.weights} - set(keys))
    if unknown:
        raise ExtractError(f"--weights names unknown backbone(s) {unknown}; backbones are {keys}")
    device = pick_device(cfg.device)
    mkey = _ModelKey(
        specs, tuple(sorted(cfg.weights)), cfg.random_init, cfg.seed, cfg.layer, cfg.tiny, device,
        pick_dtype(cfg.dtype, device),
    )  # fmt: skip
    items, split, manifest_hash = _manifest_items(cfg)
    backbones = get_backbones(mkey)
    records = [spec_record(b, mkey, cfg.grid) for b in backbones]
    layouts = [
        BackboneLayout(b.spec.key, b.spec.width, b.spec.prefix_tokens, r)
        for b, r in zip(backbones, records, strict=True)
    ]
    store = Store.create(
        cfg.store,
        [i for i, _, _ in items],
        layouts,
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
        extra={"extract": {"batch_size": cfg.batch_size, "device": device}},
    )
    plan = _Plan(
        mkey, tuple(b.identity for b in backbones), str(cfg.store), tuple(cfg.grid), cfg.batch_size,
        cfg.decode_threads, sizes=tuple(sorted({b.spec.img_size for b in backbones})),
    )  # fmt: skip
    todo = sorted(set(range(store.n_chunks)) - store.committed_chunks())
    return _Prepared(plan, store, items, todo)


def _work(prep: _Prepared, chunks: Sequence[int]) -> list[tuple[int, list[tuple[str, str, str]]]]:
    out = []
    for i in chunks:
        a, b = prep.store.chunk_images_range(i)
        out.append((i, prep.items[a:b]))
    return out


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]extract[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


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
        plan = _Plan(**{**prep.plan.__dict__, "torch_threads": per})
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
    with _progress(cfg.progress) as bar:
        task = bar.add_task("extract", total=n_todo, rate="")

        def tick(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f} img/s" if speed else "")

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
