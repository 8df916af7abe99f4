"""Activation store -> an endless stream of shuffled, cross-model aligned token batches.

How the stream of epoch ``e`` is defined (docs/contracts.md, "Loader"):

1. the chunks holding at least one selected row are put in a random order drawn from (seed, e);
2. consecutive groups of ``buffer_chunks`` chunks form blocks; the selected rows of a block
   (valid images, and images in the ``images`` mask) are shuffled with a permutation drawn
   from (seed, e, block): one permutation for all backbones, so row r of every backbone's
   batch is the same image and token;
   - ``shuffle="images"`` (default): the block's selected IMAGES are permuted (a permutation
     drawn from (seed, e, block) on its own stream) and each image contributes its rows in
     token order: the paper's batches of whole images (32 x 196 tokens);
   - ``shuffle="tokens"``: the block's rows are permuted one by one;
3. the epoch's stream is the concatenation of the shuffled blocks; batch n is stream rows
   [n*B, (n+1)*B) (a batch may span two blocks, an image may be split across two batches;
   the last partial batch is dropped);
4. with ``world_size`` W, rank r receives rows [r*B/W, (r+1)*B/W) of every global batch (for
   ``shuffle="tokens"``, of the batch in the order below).

Everything is a function of (seed, epoch, block), so resuming at (epoch, step) only needs the
per-chunk row counts: no data is read to skip ahead.

Order inside a batch (``shuffle="tokens"``): which rows form a batch is the shuffle above; a
batch's rows from one block come ordered by their place in the block (chunk by chunk, ascending
in each chunk), and rank r receives rows [r*B/W, (r+1)*B/W) of the batch in that order. A
training step treats a batch as a set (its losses and BatchNorm statistics are sums over rows),
so this costs nothing, and it turns the gather into a forward sweep through each chunk.
``shuffle="images"`` keeps stream order.

Reading: whole chunk files or contiguous parts of them, never a random row gather through
zarr. A reader thread makes the chunks of the stream available ahead of the batcher, at most
``chunks_out`` at a time (a block and ``prefetch`` chunks; up to 16 ahead when that costs no
memory), in one of three ways (``ChunkLoader.read_mode``):

- "pread" (images on a raw store): the chunk files are opened (and, unless they are in the page
  cache, the OS asked to read them ahead); each (image, token range) piece of a batch is then
  read with ``os.preadv`` at its byte offset straight into the batch buffer: one copy from
  the page cache, as a plain file read, no chunk pool, no row gather;
- "map" (tokens on a raw store): the chunk files are memory-mapped (``Store.map_chunk``) and
  each batch's rows gathered from the mapped pages (one copy, no chunk pool);
- "pool" (a store that is not raw, e.g. compressed): each chunk is decoded
  (``Store.read_chunk``) into a slot of a fixed chunk pool and rows gathered from there.

A batcher thread cuts the stream into batches and fills each rank window straight into the
batch buffers. A window is cut into runs (an image or a piece of one; for tokens, a chunk's
rows in the window), and the (run, backbone) copies are shared out to ``gather_threads``
threads (default: 2 where there are 2 cores), each taking the next copy as it becomes free, so
all finish together (numpy's gathers and ``os.preadv`` release the GIL). One finished batch
waits for the trainer. Memory is bounded by the chunk pool (none with "pread" and "map": mapped
pages are the page cache's, only the block's are mapped) and a few batches, whatever the store
size.

int8 stores (``Store.is_int8``): chunks are read, and batches gathered, as int8 codes (half
the bytes of float16); each batch also carries the store chunk of every row, and is
dequantised (code * the chunk's per-channel scale) on the device when one is given, else on the
host in the batcher thread (float32 batches).

The device feed (``device=`` given): each batch is copied to the device by the loader, on a
side CUDA stream from pinned host buffers (non_blocking), one batch ahead: the copy (and the
int8 dequantisation) of batch n+1 runs while the trainer computes on batch n, and batch n's
host buffers go back to the batcher only once its copy has completed (a pinned buffer refilled
under an unfinished copy would corrupt the batch). On a CPU device the same code runs without
streams or pinning (the "copy" is the host tensor itself).

Batch buffers are recycled, but only once nothing outside the loader references them any more
(their reference count is back to the loader's own): a fresh multi-MB array per batch costs
page faults that made gathering ~4x slower, and a batch kept by the caller is never
overwritten. The fewer buffers in use, the more of them stay in the CPU cache:

- a trainer that waits for its batches (faster than the loader) and drops each before asking
  for the next, as ``usae train`` does, gets the same buffers refilled every time: the batcher
  waits for that request (it comes at once) instead of filling another set (~1.2x faster);
- otherwise two sets are in rotation (the trainer's batch and the one being filled; the
  batcher waits for the trainer to drop its previous batch; three in rotation: ~0.8x the speed
  of two), and a trainer that keeps its batches gets new sets.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from usae.pipeline.store import Store, StoreError

_ROTATION = 2  # batch buffers in rotation: one with the trainer, one being filled (see the module docstring)
_SPARE_BATCHES = 6  # batch buffers kept for reuse once the trainer drops them
# how long the batcher waits for a fast trainer to ask for its next batch (see `_new_out`)
_AGAIN_S = 2e-3
# a window of fewer bytes is gathered by the batcher alone (waking a helper costs
# more than it gains there: with the work split in even halves, 2 threads on 2048-token batches were 0.9x of 1)
_MIN_SPLIT_BYTES = 4 << 20
# chunks per shuffle block when not given: a block is what a batch is drawn from, so the more chunks
# the closer batches are to a uniform sample of the store (a store keeps its manifest's order, often
# sorted by folder, i.e. by class); they cost memory only when decoded into a pool
DEFAULT_BUFFER_CHUNKS = {"pread": 64, "map": 16, "pool": 4}
_AHEAD = 16  # chunks opened/mapped ahead of the batcher at most (beyond prefetch) when that costs no memory
_POLL_S = 0.05  # how often blocked worker threads look at the stop flag
SHUFFLES = ("tokens", "images")


class Batch(NamedTuple):
    """One batch of aligned token activations."""

    acts: list[Float[Tensor, "b d"]]
    """(b, d_i) per backbone, in the loader's ``backbones`` order; row r is the same image and
    token in every backbone. float16 from a float16 store, float32 (dequantised) from an int8
    store; on the loader's ``device`` when one is given, else on the host."""
    epoch: int
    """Epoch this batch belongs to."""
    step: int
    """Index of the batch within its epoch (0-based)."""
    chunks: Tensor | None = None
    """int8 stores: (b,) store chunk of each row (whose scales dequantised it); else None."""


class _Block(NamedTuple):
    """One shuffle block of an epoch: its chunks and where it sits in the epoch's stream."""

    chunks: np.ndarray
    """Chunk ids, in stream order."""
    start: int
    """Stream position of the block's first row."""
    rows: int
    """Selected rows in the block."""


class _Stop(Exception):
    """Raised inside worker threads when the loader is being shut down."""


class ChunkLoader:
    """Shuffled, aligned, resumable batches of token rows read whole-chunk from a Store."""

    def __init__(
        self,
        store: Store | str | Path,
        backbones: Sequence[str],
        batch_tokens: int,
        *,
        images: np.ndarray | None = None,
        seed: int = 0,
        buffer_chunks: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        pin_memory: bool = False,
        shuffle: str = "images",
        gather_threads: int | None = None,
        device: str | torch.device | None = None,
    ):
        self.store = store if isinstance(store, Store) else Store.open(store)
        self.backbones = list(backbones)
        self.batch_tokens, self.seed = int(batch_tokens), int(seed)
        self.buffer_chunks, self.prefetch = (
            int(buffer_chunks or 0),
            int(prefetch),
        )  # 0: chosen by read_mode
        self.rank, self.world_size, self.pin_memory = int(rank), int(world_size), bool(pin_memory)
        self.shuffle = shuffle
        self.gather_threads = (
            min(2, os.cpu_count() or 1) if gather_threads is None else int(gather_threads)
        )
        self.device = None if device is None else torch.device(device)
        """Where batches are delivered (the device feed, module docstring); None: on the host."""
        self._check_args()
        if not self.buffer_chunks:
            self.buffer_chunks = DEFAULT_BUFFER_CHUNKS[self.read_mode]
        if self.read_mode == "pread":
            _check_open_files(self.chunks_out * len(self.backbones))
        st = self.store
        self._row_bytes = sum(st.dtypes[k].itemsize * st.widths[k] for k in self.backbones)
        self.int8 = any(st.is_int8(k) for k in self.backbones)
        """Whether batches are gathered as int8 codes (and dequantised by the loader)."""
        if self.int8 and not all(st.is_int8(k) for k in self.backbones):
            raise ValueError(
                "the backbones mix int8 and float16 tokens: convert the store to one dtype"
            )
        self._scales = [torch.from_numpy(st.scales(k)) for k in self.backbones] if self.int8 else []
        self._dev_scales: list[Tensor] | None = None
        self._t = st.tokens_per_image
        self._chunk_rows = st.chunk_images * self._t
        selected = st.valid
        if images is not None:
            images = np.asarray(images, dtype=bool)
            if images.shape != (st.n_images,):
                raise ValueError(
                    f"images mask has shape {images.shape}, the store has {st.n_images} images"
                )
            selected = selected & images
        self._selected = selected
        self._count = np.array(
            [
                int(selected[slice(*st.chunk_images_range(c))].sum()) * self._t
                for c in range(st.n_chunks)
            ],
            dtype=np.int64,
        )
        self._active = np.flatnonzero(self._count)
        self.tokens_per_epoch = int(self._count.sum())
        self.batches_per_epoch = self.tokens_per_epoch // self.batch_tokens
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"batch of {self.batch_tokens} tokens is larger than the {self.tokens_per_epoch} "
                "selected tokens of the store: lower the batch size"
            )
        self._epoch, self._step = 0, 0
        self._workers: _Workers | None = None
        self._buffers: tuple[dict, list] | None = (
            None  # (chunk pool, spare batches) of a finished iteration
        )

    def _check_args(self) -> None:
        missing = [k for k in self.backbones if k not in self.store.backbones]
        if missing or not self.backbones:
            raise ValueError(
                f"backbones {missing or '[]'} not in the store (it has {self.store.backbones})"
            )
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.batch_tokens < 1 or self.batch_tokens % self.world_size:
            raise ValueError(
                f"batch_tokens {self.batch_tokens} must be a positive multiple of world_size {self.world_size}"
            )
        if self.buffer_chunks < 0 or self.prefetch < 0:
            raise ValueError(
                "buffer_chunks must be >= 0 (0 or None: chosen by the read mode) and prefetch >= 0"
            )
        if self.gather_threads < 1:
            raise ValueError(f"gather_threads must be >= 1, got {self.gather_threads}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} asked for, but CUDA is not available")

    # ------------------------------------------------------------ the stream's definition
    def epoch_blocks(self, epoch: int) -> list[_Block]:
        """Shuffle blocks of an epoch (chunk order drawn from (seed, epoch))."""
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(self._active)
        blocks, start = [], 0
        for b0 in range(0, len(order), self.buffer_chunks):
            chunks = order[b0 : b0 + self.buffer_chunks]
            rows = int(self._count[chunks].sum())
            blocks.append(_Block(chunks, start, rows))
            start += rows
        return blocks

    def block_permutation(self, epoch: int, block: int, rows: int) -> np.ndarray:
        """The shuffle of one block's selected rows, drawn from (seed, epoch, block)."""
        return np.random.default_rng([self.seed, 1, epoch, block]).permutation(rows)

    def block_image_permutation(self, epoch: int, block: int, n_images: int) -> np.ndarray:
        """The shuffle of one block's selected images (shuffle="images"), drawn from (seed, epoch, block)."""
        return np.random.default_rng([self.seed, 2, epoch, block]).permutation(n_images)

    @property
    def read_mode(self) -> str:
        """How chunks are read: "pread" (images on a raw store: each image piece is read from
        its chunk file straight into the batch), "map" (tokens on a raw store: rows are gathered
        from the memory-mapped chunk files) or "pool" (a store that is not raw: chunks are
        decoded into a fixed chunk pool and rows gathered from it)."""
        if not all(self.store._direct[k] for k in self.backbones):
            return "pool"
        return "pread" if self.shuffle == "images" and hasattr(os, "preadv") else "map"

    @property
    def chunks_out(self) -> int:
        """Chunks read, mapped or opened at once at most: a block and those read ahead of it."""
        if self.read_mode == "pool":
            return self.buffer_chunks + self.prefetch
        return self.buffer_chunks + max(self.prefetch, min(self.buffer_chunks, _AHEAD))

    @property
    def reads_direct(self) -> bool:
        """True when rows come from the chunk files without a chunk pool (a raw store)."""
        return self.read_mode != "pool"

    def chunk_selected_rows(self, chunk: int) -> np.ndarray:
        """Selected row offsets inside a chunk, ascending."""
        a, b = self.store.chunk_images_range(chunk)
        imgs = np.flatnonzero(self._selected[a:b])
        return (imgs[:, None] * self._t + np.arange(self._t)).reshape(-1)

    @property
    def pinned_buffers(self) -> bool:
        """Whether batches are gathered straight into pinned (page-locked) host buffers: with
        pin_memory on a device feed (which holds each buffer until its copy is done), where
        CUDA is there to pin them."""
        return self.pin_memory and self.device is not None and _can_pin()

    @property
    def local_batch_tokens(self) -> int:
        """Rows per batch on this rank."""
        return self.batch_tokens // self.world_size

    # ------------------------------------------------------------ position
    def state_dict(self) -> dict:
        """Position of the next batch to be yielded."""
        return {"epoch": self._epoch, "step": self._step}

    def load_state_dict(self, d: dict) -> None:
        """Resume at a position from state_dict(); a running iteration is stopped."""
        self.close()
        epoch, step = int(d["epoch"]), int(d["step"])
        if epoch < 0 or step < 0:
            raise ValueError(f"bad loader state {d}")
        epoch += step // self.batches_per_epoch
        self._epoch, self._step = epoch, step % self.batches_per_epoch

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        self.close()
        workers = _Workers(self, self._epoch, self._step, self._buffers)
        self._workers, self._buffers = workers, None
        if self.device is None:
            feed = None
        else:
            if self._dev_scales is None:
                self._dev_scales = [s.to(self.device) for s in self._scales]
            feed = _device_batches(workers.next_batch, self.device, self._dev_scales)
        try:
            while True:
                # host batches straight from the workers (a generator in between would keep the
                # batch alive while the trainer holds it, and its buffers could not be refilled)
                batch = workers.next_batch() if feed is None else next(feed)
                nxt = batch.step + 1
                self._epoch, self._step = (
                    (batch.epoch + 1, 0) if nxt == self.batches_per_epoch else (batch.epoch, nxt)
                )
                yield batch
                del (
                    batch
                )  # the trainer holds the only reference: its buffer can be reused once it drops it
        finally:
            if feed is not None:
                feed.close()  # drops the batch it holds ahead (after its copy) before the workers stop
            if self._workers is workers:
                self.close()
            else:
                workers.stop()

    def close(self) -> None:
        """Stop the worker threads of a running iteration (the position is kept)."""
        if self._workers is not None:
            w, self._workers = self._workers, None
            if w.stop():  # threads gone: the next iteration reuses the (already paged-in) buffers
                self._buffers = (w.pool, w._spare)

    def __enter__(self) -> ChunkLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _device_batches(
    next_batch: Callable[[], Batch], device: torch.device, scales: list[Tensor]
) -> Iterator[Batch]:
    """Host batches -> batches on `device`, one ahead (module docstring, "The device feed").

    The copy of batch n+1 (and its dequantisation) is issued on a side stream before batch n is
    handed over, so it overlaps the trainer's work on batch n; the consumer's stream waits for
    batch n's copy (an event), its tensors are marked as used there (``record_stream``), and the
    host batch is released only once its copy has completed."""
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device=device) if cuda else None

    def issue(hb: Batch) -> tuple[Batch, Batch, torch.cuda.Event | None]:
        with torch.cuda.stream(stream) if cuda else nullcontext():
            acts = [a.to(device, non_blocking=True) for a in hb.acts]
            chunks = None
            if hb.chunks is not None:
                chunks = hb.chunks.to(
                    device, non_blocking=True, copy=True
                )  # the host buffer goes back
                acts = _dequantize(acts, chunks, scales)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record(stream)
        return hb, Batch(acts, hb.epoch, hb.step, chunks), event

    cur = issue(next_batch())
    while True:
        nxt = issue(next_batch())  # its copy runs while the consumer works on `cur`
        hb, db, event = cur
        del cur
        if cuda:
            here = torch.cuda.current_stream(device)
            here.wait_event(event)
            for t in [*db.acts, *([] if db.chunks is None else [db.chunks])]:
                t.record_stream(here)
        yield db
        del db
        if event is not None:
            event.synchronize()  # done long ago (the consumer's stream waited for it): cheap
        del hb, event  # the host buffers may be refilled now
        cur = nxt


def _dequantize(codes: list[Tensor], chunks: Tensor, scales: list[Tensor]) -> list[Tensor]:
    """float32 rows = int8 codes * the per-channel scales of each row's chunk (same device as
    the codes; on the CPU through numpy, ~6x faster than torch's small CPU ops here)."""
    if chunks.device.type == "cpu":
        out = []
        for q, s in zip(codes, scales, strict=True):
            rows = np.take(s.numpy(), chunks.numpy(), axis=0)
            out.append(torch.from_numpy(np.multiply(rows, q.numpy(), out=rows)))
        return out
    idx = chunks.long()
    return [q.float().mul_(s.index_select(0, idx)) for q, s in zip(codes, scales, strict=True)]


def _can_pin() -> bool:
    """Whether page-locked host memory can be allocated (a CUDA device is there)."""
    return torch.cuda.is_available()


def _pinned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A page-locked host array (owned by a pinned torch tensor, kept alive by the array)."""
    return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], pin_memory=True).numpy()


def _pin_copy(t: Tensor) -> Tensor:
    """A pinned copy of a host tensor (from PyTorch's caching host allocator, which keeps the block
    until any copy from it has completed: safe whatever the consumer does with it)."""
    return t.pin_memory()


_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
}
_CHUNK = "\0chunk"  # batch buffer key of the rows' store chunks (int8 stores)


def _check_open_files(n: int) -> None:
    """Refuse up front, rather than fail mid-run, when n open files would crowd the process's limit."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and n > soft // 2:
        raise ValueError(
            f"reading whole images keeps up to {n} chunk files open, over half this process's limit of "
            f"{soft} open files: lower buffer_chunks or raise the limit (ulimit -n)"
        )


def _refs(a: np.ndarray) -> int:
    return sys.getrefcount(a)


class _Source(NamedTuple):
    """One chunk of the stream, available to the batcher."""

    slot: int
    """Its slot among the `chunks_out` the reader may have out at once."""
    chunk: int
    """Its chunk id (-1: a slot not yet used)."""
    data: dict[str, np.ndarray | int | None]
    """Per backbone: the chunk's (rows, d) float16 rows (a pool slot, or a mapping of the chunk
    file), or an open descriptor of the chunk file for ``os.preadv`` (None: never written, zeros)."""

    def release(self) -> None:
        """Close the descriptors; mapped rows are unmapped once the last reference goes."""
        for v in self.data.values():
            if isinstance(v, int):
                os.close(v)
        self.data.clear()


class _Share:
    """Units of work shared by several threads: each takes the next unit as it becomes free (so
    all finish together, whenever each started), `wait` returns once every unit is done and
    raises the first error of any of them."""

    def __init__(self, units: list):
        self._units = iter(units)
        self._busy = 0
        self._done = threading.Condition(threading.Lock())
        self._error: BaseException | None = None

    def work(self, fn, *args) -> None:
        """Run fn(*args, *unit) for units until none is left (or one failed)."""
        while True:
            with self._done:
                unit = None if self._error else next(self._units, None)
                if unit is None:
                    return
                self._busy += 1
            try:
                fn(*args, *unit)
            except BaseException as e:  # noqa: BLE001 - raised by wait()
                self._error = self._error or e
            finally:
                with self._done:
                    self._busy -= 1
                    if not self._busy:
                        self._done.notify_all()

    def wait(self) -> None:
        """Once every unit taken is done and none is left (call after `work`): the first error."""
        with self._done:
            while self._busy:
                self._done.wait()
        if self._error is not None:
            raise self._error


class _Open(NamedTuple):
    """A block being cut into batches."""

    sources: list[_Source]
    """The block's chunks, in block order."""
    chunk_of: np.ndarray | list[int]
    """shuffle="tokens": position in the block of the chunk holding each selected row;
    shuffle="images": of each image, in stream order (a list: read a piece at a time)."""
    row_of: np.ndarray | list[int]
    """shuffle="tokens": row inside its chunk of each selected row; shuffle="images": first
    row inside its chunk of each image, in stream order (a list)."""
    order: np.ndarray | None
    """shuffle="tokens": stream order of the block's selected rows (indices into them, taken
    chunk by chunk); None for shuffle="images" (``chunk_of`` and ``row_of`` are in stream order)."""


class _Workers:
    """Reader + batcher threads (and helper gather threads) for one iteration, from (epoch, step).

    The reader makes each chunk of the stream available as one (rows, d) float16 array per
    backbone, at most ``chunks_out`` chunks at a time: mapped over the chunk file
    on a raw store (no copy), read into a slot of a fixed chunk pool otherwise; for
    shuffle="images" on a raw store, only opened (each image piece is then read with
    ``os.preadv`` straight into the batch). The batcher cuts the stream into batches and
    gathers each rank window's rows straight into the batch buffers, its copies shared out to
    ``gather_threads`` threads (`_Share`).
    """

    def __init__(
        self, loader: ChunkLoader, epoch: int, step: int, buffers: tuple[dict, list] | None
    ):
        self.ld = loader
        st = loader.store
        self.how = loader.read_mode
        n_slots = (
            loader.chunks_out
        )  # a mapped or opened chunk costs no memory until read: more are ahead
        if buffers is None:
            buffers = ({}, [])
        self.pool: dict[str, np.ndarray] = buffers[0]
        if self.how == "pool" and not self.pool:
            self.pool = {
                k: np.empty((n_slots, loader._chunk_rows, st.widths[k]), st.dtypes[k])
                for k in loader.backbones
            }
        self._spare: list[tuple[dict[str, np.ndarray], int]] = buffers[
            1
        ]  # (buffers, idle refcount)
        self.free: queue.Queue = (
            queue.Queue()
        )  # slots back from the batcher, with the chunk the reader releases
        for s in range(n_slots):
            self.free.put(_Source(s, -1, {}))
        self.ready: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._n_put = 0  # batches handed to the queue
        self._taken = 0  # batches the trainer has taken
        self._waiting_for = -1  # the batch the trainer waits for (or last waited for)
        self._asked = threading.Condition(
            threading.Lock()
        )  # notified when the trainer asks for a batch
        self._helpers = (
            ThreadPoolExecutor(loader.gather_threads - 1, thread_name_prefix="usae-loader-gather")
            if loader.gather_threads > 1
            else None
        )
        self.threads = [
            threading.Thread(
                target=self._guard,
                args=(self._read, self.ready, epoch, step),
                daemon=True,
                name="usae-loader-read",
            ),
            threading.Thread(
                target=self._guard,
                args=(self._batch, self.out, epoch, step),
                daemon=True,
                name="usae-loader-batch",
            ),
        ]
        for t in self.threads:
            t.start()

    # -------------------------------------------------------- plumbing
    def _put(self, q: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stop

    def _get(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                item = q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item
        raise _Stop

    def _guard(self, fn, errors_to: queue.Queue, epoch: int, step: int) -> None:
        try:
            fn(epoch, step)
        except _Stop:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            try:
                self._put(errors_to, e)
            except _Stop:
                pass

    def next_batch(self) -> Batch:
        with self._asked:  # the batcher may be waiting to see whether the previous batch comes back
            self._waiting_for = (
                self._taken
            )  # not yet put: the batcher must not wait for a buffer to come back
            self._asked.notify()
        batch = self._get(self.out)
        self._taken += 1
        return batch

    def stop(self) -> bool:
        """Stop the threads; True when they have all ended (mapped chunks are released then)."""
        self._stop.set()
        with self._asked:
            self._asked.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)
        done = not any(t.is_alive() for t in self.threads)
        if done:
            for q in (
                self.free,
                self.ready,
                self.out,
            ):  # chunks read or mapped, batches nobody will take
                while not q.empty():
                    item = q.get_nowait()
                    if isinstance(item, _Source):
                        item.release()
        return done

    def _start_block(self, blocks: list[_Block], step: int) -> int:
        pos = step * self.ld.batch_tokens
        return next(i for i, b in enumerate(blocks) if b.start <= pos < b.start + b.rows)

    def _epochs(self, epoch: int, step: int):
        """(epoch, first step, blocks, first block) from the start position onwards, forever."""
        while True:
            blocks = self.ld.epoch_blocks(epoch)
            yield epoch, step, blocks, self._start_block(blocks, step)
            epoch, step = epoch + 1, 0

    # -------------------------------------------------------- reader thread
    def _read(self, epoch: int, step: int) -> None:
        st = self.ld.store
        for _, _, blocks, b0 in self._epochs(epoch, step):
            for blk in blocks[b0:]:
                for c in blk.chunks.tolist():
                    done = self._get(self.free)
                    done.release()  # the chunk the batcher is finished with: released here, off its path
                    slot = done.slot
                    del done
                    src = _Source(slot, c, {})
                    try:
                        for k in self.ld.backbones:
                            if self.how == "pread":
                                src.data[k] = st.open_chunk(k, c)
                            elif self.how == "map":
                                src.data[k] = st.map_chunk(k, c)
                            else:
                                r0, r1 = st.chunk_rows(c)
                                src.data[k] = st.read_chunk(
                                    k, c, out=self.pool[k][slot, : r1 - r0], codes=True
                                )
                        self._put(self.ready, src)
                    except BaseException:
                        src.release()
                        raise
                    del src

    # -------------------------------------------------------- batcher thread
    def _batch(self, epoch: int, step: int) -> None:
        """Cut the stream into batches: this rank's window of each, gathered block by block.

        The part of a batch that comes from one block (a segment) is put in batch order by
        `_segment` (sorted for shuffle="tokens"), then this rank's window of it is gathered.
        """
        ld = self.ld
        bsz, lo = ld.batch_tokens, ld.rank * ld.local_batch_tokens
        hi = lo + ld.local_batch_tokens
        for ep, step0, blocks, b0 in self._epochs(epoch, step):
            pos, filled, out = step0 * bsz, 0, self._new_out()
            for bi in range(b0, len(blocks)):
                blk = blocks[bi]
                ctx = self._open_block(ep, bi, blk)
                try:
                    off = pos + filled - blk.start  # first unconsumed row of this block
                    while off < blk.rows:
                        take = min(bsz - filled, blk.rows - off)
                        w0, w1 = max(lo, filled), min(hi, filled + take)
                        if w1 > w0:  # part of this rank's window
                            self._fill(
                                ctx,
                                self._segment(ctx, off, off + take)[w0 - filled : w1 - filled],
                                out,
                                w0 - lo,
                            )
                        filled, off = filled + take, off + take
                        if filled == bsz:
                            eager = (
                                self._waiting_for >= self._n_put
                            )  # the trainer waits for this batch
                            self._put(self.out, self._finish(out, ep, pos // bsz))
                            self._n_put += 1
                            pos, filled, out = pos + bsz, 0, self._new_out(out if eager else None)
                finally:
                    while ctx.sources:
                        self.free.put(ctx.sources.pop())
                    del ctx

    def _open_block(self, epoch: int, bi: int, blk: _Block) -> _Open:
        """The block's chunks from the reader and where each of its selected rows is."""
        sources: list[_Source] = []
        try:
            for _ in blk.chunks:
                sources.append(self._get(self.ready))
        except (
            BaseException
        ):  # stopped while the block was arriving: nobody else will release these
            for src in sources:
                src.release()
            raise
        ld = self.ld
        if ld.shuffle == "images":  # per image, in stream order: its chunk and first row
            st = ld.store
            imgs = [
                np.flatnonzero(ld._selected[slice(*st.chunk_images_range(c))])
                for c in blk.chunks.tolist()
            ]
            chunk_of = np.repeat(np.arange(len(imgs)), [len(i) for i in imgs])
            perm = ld.block_image_permutation(epoch, bi, len(chunk_of))
            return _Open(
                sources,
                chunk_of[perm].tolist(),
                (np.concatenate(imgs)[perm] * ld._t).tolist(),
                None,
            )
        rows = [ld.chunk_selected_rows(int(c)) for c in blk.chunks]
        chunk_of = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        return _Open(
            sources, chunk_of, np.concatenate(rows), ld.block_permutation(epoch, bi, blk.rows)
        )

    def _segment(self, ctx: _Open, s0: int, s1: int) -> np.ndarray | range:
        """Stream rows [s0, s1) of a block in batch order: for shuffle="tokens", the block's
        selected rows (indices into them), sorted; for shuffle="images", the stream positions."""
        if ctx.order is None:
            return range(s0, s1)
        return np.sort(ctx.order[s0:s1])

    def _fill(
        self, ctx: _Open, rows: np.ndarray | range, out: dict[str, np.ndarray], o: int
    ) -> None:
        """Gather block rows `rows` (see `_segment`) into batch rows o.. of `out`, run by run and
        backbone by backbone, the runs shared out to the gather threads as each becomes free."""
        runs = self._runs(ctx, rows, o)
        if self.ld.int8:  # the store chunk of each row, for its dequantisation
            for j, a, b, _ in runs:
                out[_CHUNK][a:b] = ctx.sources[j].chunk
        units = [(k, *run) for run in runs for k in self.ld.backbones]
        if self._helpers is None or len(rows) * self.ld._row_bytes < _MIN_SPLIT_BYTES:
            for u in units:
                self._copy(ctx, out, *u)
            return
        share = _Share(units)
        for _ in range(self.ld.gather_threads - 1):
            self._helpers.submit(share.work, self._copy, ctx, out)
        share.work(self._copy, ctx, out)
        share.wait()

    def _runs(self, ctx: _Open, rows: np.ndarray | range, o: int) -> list[tuple]:
        """(chunk in block, first batch row, end batch row, chunk rows) of each run of `rows`: a
        run is consecutive batch rows from one chunk (for images, a whole image or a piece of one;
        for tokens, the chunk's share of the segment, ascending); chunk rows are the first row when
        they are contiguous, else their array."""
        if isinstance(rows, range):  # images: stream positions -> pieces of images
            t, runs, s = self.ld._t, [], rows.start
            while s < rows.stop:
                i, r = divmod(s, t)
                n = min(t - r, rows.stop - s)
                runs.append((ctx.chunk_of[i], o, o + n, ctx.row_of[i] + r))
                s, o = s + n, o + n
            return runs
        if not len(rows):
            return []
        chunk, row = ctx.chunk_of[rows], ctx.row_of[rows]
        cuts = [0, *(np.flatnonzero(chunk[1:] != chunk[:-1]) + 1).tolist(), len(rows)]
        runs = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            r, r0 = row[a:b], int(row[a])
            runs.append((int(chunk[a]), o + a, o + b, r0 if int(r[-1]) - r0 == b - a - 1 else r))
        return runs

    def _copy(
        self,
        ctx: _Open,
        out: dict[str, np.ndarray],
        k: str,
        j: int,
        a: int,
        b: int,
        r: int | np.ndarray,
    ) -> None:
        """Rows `r` of block chunk j of backbone k (see `_runs`) into batch rows [a, b) of out[k]."""
        dst, src = out[k][a:b], ctx.sources[j].data[k]
        if src is None:  # a chunk never written: zeros
            dst[:] = 0
        elif self.how == "pread":  # r is the first row: one read straight into the batch
            rb = dst.shape[1] * dst.itemsize
            if os.preadv(src, (dst,), r * rb) != (b - a) * rb:
                f = self.ld.store.chunk_file(k, ctx.sources[j].chunk)
                raise StoreError(
                    f"chunk file {f} is truncated (rows {r}..{r + b - a} not all there)"
                )
        elif isinstance(r, int):  # contiguous rows: a plain copy
            dst[:] = src[r : r + b - a]
        else:  # mode="clip": no bounds-checking copy of the output (3-4x slower)
            np.take(src, r, axis=0, out=dst, mode="clip")

    def _new_out(self, again: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Batch buffers: a spare set nobody references any more, else a new one.

        `again`, the set just handed to a trainer that was waiting for it (it is faster than the
        loader), is filled again if the trainer drops it before it asks for the next batch: one
        set then stays in the CPU cache (~1.2x faster than two in rotation on this machine's 2
        cores). Otherwise, once `_ROTATION` sets are in use, wait for the trainer to drop one
        (it does right after taking the next batch) rather than allocate: the fewer buffers in
        rotation, the more of them stay in the CPU cache (3 in rotation: ~0.8x the speed of 2).
        A trainer that keeps its batches and waits for one not yet made gets a new set.
        """
        if again is not None:
            with self._asked:
                self._asked.wait_for(
                    lambda: self._waiting_for >= self._n_put or self._stop.is_set(), _AGAIN_S
                )
            idle = next(
                (i for bufs, i in self._spare if bufs is again), 0
            )  # 0: not a spare, never reused
            if all(_refs(a) <= idle for a in again.values()):
                return again
        delay = 2e-5
        while True:
            for bufs, idle in self._spare:
                if all(_refs(a) <= idle for a in bufs.values()):
                    return bufs
            if len(self._spare) < _ROTATION or self._waiting_for >= self._n_put:
                break
            if self._stop.wait(delay):
                raise _Stop
            delay = min(2 * delay, 2e-3)
        n, widths, dtypes = self.ld.local_batch_tokens, self.ld.store.widths, self.ld.store.dtypes
        empty = _pinned_empty if self.ld.pinned_buffers else np.empty
        bufs = {k: empty((n, widths[k]), dtypes[k]) for k in self.ld.backbones}
        if self.ld.int8:
            bufs[_CHUNK] = empty((n,), np.int32)
        if len(self._spare) < _SPARE_BATCHES:
            self._spare.append((bufs, max(_refs(a) for a in bufs.values())))
        return bufs

    def _finish(self, out: dict[str, np.ndarray], epoch: int, step: int) -> Batch:
        ld = self.ld
        acts = [torch.from_numpy(out[k]) for k in ld.backbones]
        chunks = torch.from_numpy(out[_CHUNK]) if ld.int8 else None
        if ld.device is None:  # batches stay on the host
            if chunks is not None:  # dequantised here; the codes' buffers are free again
                chunks = chunks.clone()
                acts = _dequantize(acts, chunks, ld._scales)
            if ld.pin_memory and _can_pin():
                acts = [_pin_copy(a) for a in acts]
        return Batch(acts, epoch, step, chunks)
