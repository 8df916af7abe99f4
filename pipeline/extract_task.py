"""Chunks of manifest rows -> backbone activations written and committed to the store: what one
extraction task does, in this process or on a Dask worker (`usae.pipeline.extract` schedules
the tasks).

A task owns whole chunks: it computes them and writes them itself (`Store.write_chunk` commits
each with a marker), so no activation data travels through a scheduler. Inside a task three
things overlap: a thread pool decodes and resizes the images of the current and the next
chunk, the task's thread runs the backbones, and a writer thread writes the previous chunk.
Backbones are loaded once per process (a module-level cache), not per task.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from usae.pipeline.backbone import Backbone, load_backbone, resize_square
from usae.pipeline.images import ImageError, load_image
from usae.pipeline.registry import BackboneSpec
from usae.pipeline.store import Store

from usae.errors import UsaeError
from usae.runtime import torch_dtype

# Test hook: seconds to sleep after computing each chunk, so that a test can kill a run
# between commits. Not a user setting.
_DELAY_ENV = "USAE_EXTRACT_TEST_CHUNK_DELAY"


class ExtractError(UsaeError, RuntimeError):
    """A user-facing extraction problem (bad option, too many failed images, ...)."""


@dataclass(frozen=True)
class ModelKey:
    """Everything that determines the loaded backbones (the per-process cache key)."""

    specs: tuple[BackboneSpec, ...]
    weights: tuple[tuple[str, str], ...]
    random_init: bool
    seed: int
    layer: int | None
    tiny: bool
    device: str
    dtype: str
    layers: tuple[tuple[int | None, ...], ...] = ()
    """Per spec, the layers read from its one forward pass (empty: `layer` for every spec)."""
    offline: bool | None = None
    """True: weights from the local cache only; None: as HF_HUB_OFFLINE says."""


@dataclass(frozen=True)
class TaskPlan:
    """What a task needs besides its images: picklable, sent once per task."""

    models: ModelKey
    identities: tuple[dict, ...]
    store: str
    grid: tuple[int, int]
    batch_size: int
    decode_threads: int
    torch_threads: int = 0
    sizes: tuple[int, ...] = field(default=())
    keys: tuple[tuple[str, ...], ...] = field(default=())
    """Per backbone, the store group of each of its layers (empty: its spec key)."""


# ---------------------------------------------------------------- backbones (once per process)
_CACHE: dict[ModelKey, list[Backbone]] = {}


def get_backbones(key: ModelKey) -> list[Backbone]:
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
                layers=key.layers[i] if key.layers else (key.layer,),
                tiny=key.tiny,
                device=key.device,
                dtype=torch_dtype(key.dtype),
                offline=key.offline,
            )
            for i, s in enumerate(key.specs)
        ]
    return _CACHE[key]


def spec_record(bb: Backbone, key: ModelKey, grid: tuple[int, int]) -> dict:
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


def layer_record(
    bb: Backbone, key: ModelKey, grid: tuple[int, int], layer: int | None, group: str
) -> dict:
    """The entry of one layer of a backbone in the store (group `group`): its `spec_record`
    read at that layer, the same whether the layer came alone or with others from one pass."""
    return {
        **spec_record(bb, key, grid),
        "key": group,
        "model_key": bb.spec.key,
        "layer": layer,
        "width": bb.spec.width_at(layer),
        "native_grid": list(bb.spec.grid_at(layer)),
        "identity": bb.layer_identity(layer),
    }


def group_keys(plan: TaskPlan, backbones: Sequence[Backbone]) -> list[tuple[str, ...]]:
    """Per backbone, the store groups of its layers (the spec key when the plan names none)."""
    return list(plan.keys) if plan.keys else [(b.spec.key,) for b in backbones]


# ---------------------------------------------------------------- decoding
class _Decoded(NamedTuple):
    images: dict[int, torch.Tensor] | None  # img_size -> (3, s, s) float in [0, 1]
    reason: str | None  # why decoding failed


def decode_image(path: str, sizes: Sequence[int]) -> _Decoded:
    """One image file -> one resized copy per input size, or the reason it failed."""
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


def compute_images(
    backbones: Sequence[Backbone],
    groups: Sequence[Sequence[str]],
    images: Sequence[tuple[str, str, str]],
    decoded: Sequence[Future],
    *,
    grid: tuple[int, int],
    batch_size: int,
    device: str | torch.device,
    on_images: Callable[[int], None] | None = None,
) -> _ChunkOut:
    """Run every backbone over the images (``decoded[j]``: a future of ``decode_image``), once
    per batch of ``batch_size`` for all of its layers; ``groups[b]`` names backbone b's layers.
    The patch tokens come back as float16 (n * T, d) per group, as a store holds them; failed
    images stay zero and invalid. The one forward path of `usae extract` and `usae explain`."""
    n, t = len(images), grid[0] * grid[1]
    tok_ntd, pre_npd = {}, {}
    for bb, keys in zip(backbones, groups, strict=True):
        for layer, k in zip(bb.layers, keys, strict=True):
            d = bb.spec.width_at(layer)
            tok_ntd[k] = np.zeros((n, t, d), np.float16)
            if bb.spec.prefix_tokens:
                pre_npd[k] = np.zeros((n, bb.spec.prefix_tokens, d), np.float16)
    valid = np.zeros(n, bool)
    failures: list[dict] = []
    for b0 in range(0, n, batch_size):
        idx, batch = [], []
        for j in range(b0, min(b0 + batch_size, n)):
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
                for bb, keys in zip(backbones, groups, strict=True):
                    x_b3hw = torch.stack([im[bb.spec.img_size] for im in batch]).to(
                        device, non_blocking=True
                    )
                    for k, acts in zip(keys, bb.forward_layers(x_b3hw, grid), strict=True):
                        tok_ntd[k][idx] = acts.patch_btd.to(torch.float16).cpu().numpy()
                        if k in pre_npd:
                            pre_npd[k][idx] = acts.prefix_bpd.to(torch.float16).cpu().numpy()
        if on_images is not None:
            on_images(min(b0 + batch_size, n) - b0)
    tokens = {k: v.reshape(n * t, -1) for k, v in tok_ntd.items()}
    return _ChunkOut(tokens, pre_npd, valid, failures)


class TaskResult(NamedTuple):
    """What one task reports back (counts only: the data went to the store)."""

    chunks: list[int]  # chunks this task committed
    images: int  # images computed
    failed: int  # images that failed to decode


def run_chunks(
    plan: TaskPlan,
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
            return [pool.submit(decode_image, f, plan.sizes) for _, f, _ in ims]

        pending: Future | None = None
        nxt = submit(work[0][1]) if work else []
        for w, (i, ims) in enumerate(work):
            cur, nxt = nxt, (submit(work[w + 1][1]) if w + 1 < len(work) else [])
            out = compute_images(
                backbones, group_keys(plan, backbones), ims, cur, grid=plan.grid,
                batch_size=plan.batch_size, device=plan.models.device, on_images=on_images,
            )  # fmt: skip
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
