"""Activation store -> an endless stream of shuffled, cross-model aligned token batches.

How the stream of epoch ``e`` is defined (docs/contracts.md, "Loader"):

1. the chunks holding at least one selected row are put in a random order drawn from (seed, e);
2. consecutive groups of ``buffer_chunks`` chunks form blocks; the selected rows of a block
   (valid images, and images in the ``images`` mask) are shuffled with a permutation drawn
   from (seed, e, block): one permutation for all backbones, so row r of every backbone's
   batch is the same image and token;
   - ``shuffle="tokens"`` (default): the block's rows are permuted one by one;
   - ``shuffle="images"``: the block's selected IMAGES are permuted (a permutation drawn from
     (seed, e, block) on its own stream) and each image contributes its rows in token order,
     as the paper's batches of whole images (32 x 196 tokens);
3. the epoch's stream is the concatenation of the shuffled blocks; batch n is stream rows
   [n*B, (n+1)*B) (a batch may span two blocks, an image may be split across two batches;
   the last partial batch is dropped);
4. with ``world_size`` W, rank r receives rows [r*B/W, (r+1)*B/W) of every global batch.

Everything is a function of (seed, epoch, block), so resuming at (epoch, step) only needs the
per-chunk row counts: no data is read to skip ahead.

Reading (tokens, or images on a store that is not raw): whole chunk files only
(``Store.read_chunk``, direct file reads that release the GIL; never a random row gather
through zarr). A reader thread reads chunks ahead into a fixed pool of ``buffer_chunks +
prefetch`` chunk slots; a batcher thread shuffles and gathers batches into a small queue.
Memory is bounded by that pool, whatever the store size.

Reading (images on a raw store): an image's rows are contiguous bytes of its chunk file, so
each (image, token range) piece of a batch is read with ``os.preadv`` at its byte offset
straight into the batch buffer (one copy from the page cache, as a plain file read; no chunk
pool, no row gather). One thread fills the next batch while one finished batch waits (two batch
buffers in rotation stay in the CPU cache better than more); the block's chunk files stay open
while the block is being read. ``prefetch`` (chunks) does not apply there; without ``os.preadv``
(Windows) the images stream is gathered from the chunk pool like the tokens one.

Batch buffers are recycled, but only once nothing outside the loader references them any more
(their reference count is back to the loader's own): a fresh multi-MB array per batch costs
page faults that made gathering ~4x slower, and a batch kept by the caller is never overwritten.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from usae.pipeline.store import Store, StoreError

_QUEUE_BATCHES = 4  # finished batches waiting for the trainer (small next to the chunk pool)
_SPARE_BATCHES = _QUEUE_BATCHES + 4  # batch buffers kept for reuse once the trainer drops them
# direct reads: one finished batch waits (a batch takes ~1 ms to read, a training step far longer); the
# fewer batch buffers in rotation, the more of them stay in the CPU cache (8 in rotation: 0.7x the speed of 2)
_DIRECT_QUEUE_BATCHES = 1
_POLL_S = 0.05  # how often blocked worker threads look at the stop flag
SHUFFLES = ("tokens", "images")


class Batch(NamedTuple):
    """One batch of aligned token activations."""

    acts: list[Float[Tensor, "b d"]]
    """float16 (b, d_i) per backbone, in the loader's ``backbones`` order; row r is the same
    image and token in every backbone."""
    epoch: int
    """Epoch this batch belongs to."""
    step: int
    """Index of the batch within its epoch (0-based)."""


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
        buffer_chunks: int = 4,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        pin_memory: bool = False,
        shuffle: str = "tokens",
    ):
        self.store = store if isinstance(store, Store) else Store.open(store)
        self.backbones = list(backbones)
        self.batch_tokens, self.seed = int(batch_tokens), int(seed)
        self.buffer_chunks, self.prefetch = int(buffer_chunks), int(prefetch)
        self.rank, self.world_size, self.pin_memory = int(rank), int(world_size), bool(pin_memory)
        self.shuffle = shuffle
        self._check_args()
        st = self.store
        self._t = st.tokens_per_image
        self._chunk_rows = st.chunk_images * self._t
        selected = st.valid
        if images is not None:
            images = np.asarray(images, dtype=bool)
            if images.shape != (st.n_images,):
                raise ValueError(f"images mask has shape {images.shape}, the store has {st.n_images} images")
            selected = selected & images
        self._selected = selected
        self._count = np.array(
            [int(selected[slice(*st.chunk_images_range(c))].sum()) * self._t for c in range(st.n_chunks)],
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
        self._buffers: tuple[dict, list] | None = None  # (chunk pool, spare batches) of a finished iteration

    def _check_args(self) -> None:
        missing = [k for k in self.backbones if k not in self.store.backbones]
        if missing or not self.backbones:
            raise ValueError(f"backbones {missing or '[]'} not in the store (it has {self.store.backbones})")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.batch_tokens < 1 or self.batch_tokens % self.world_size:
            raise ValueError(f"batch_tokens {self.batch_tokens} must be a positive multiple of world_size {self.world_size}")
        if self.buffer_chunks < 1 or self.prefetch < 0:
            raise ValueError("buffer_chunks must be >= 1 and prefetch >= 0")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")

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

    def block_order(self, epoch: int, block: int, rows: int) -> np.ndarray:
        """Stream order of a block's selected rows, as indices into those rows taken chunk by chunk."""
        if self.shuffle == "tokens":
            return self.block_permutation(epoch, block, rows)
        imgs = self.block_image_permutation(epoch, block, rows // self._t)
        return (imgs[:, None] * self._t + np.arange(self._t)).reshape(-1)

    def block_images(self, epoch: int, block: int, blk: _Block) -> tuple[np.ndarray, np.ndarray]:
        """(chunk id, first row inside that chunk) of each image of a block, in stream order (shuffle="images")."""
        chunk_ids, row0 = [], []
        for c in blk.chunks:
            a, b = self.store.chunk_images_range(int(c))
            imgs = np.flatnonzero(self._selected[a:b])
            chunk_ids.append(np.full(len(imgs), int(c), np.int64))
            row0.append(imgs.astype(np.int64) * self._t)
        perm = self.block_image_permutation(epoch, block, blk.rows // self._t)
        return np.concatenate(chunk_ids)[perm], np.concatenate(row0)[perm]

    @property
    def reads_direct(self) -> bool:
        """True when batches are read piece by piece straight from the chunk files (images on a raw store)."""
        return self.shuffle == "images" and hasattr(os, "preadv") and all(self.store._direct[k] for k in self.backbones)

    def chunk_selected_rows(self, chunk: int) -> np.ndarray:
        """Selected row offsets inside a chunk, ascending."""
        a, b = self.store.chunk_images_range(chunk)
        imgs = np.flatnonzero(self._selected[a:b])
        return (imgs[:, None] * self._t + np.arange(self._t)).reshape(-1)

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
        kind = _DirectWorkers if self.reads_direct else _Workers
        workers = kind(self, self._epoch, self._step, self._buffers)
        self._workers, self._buffers = workers, None
        try:
            while True:
                batch = workers.next_batch()
                nxt = batch.step + 1
                self._epoch, self._step = (batch.epoch + 1, 0) if nxt == self.batches_per_epoch else (batch.epoch, nxt)
                yield batch
                del batch  # the trainer holds the only reference: its buffer can be reused once it drops it
        finally:
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


def _refs(a: np.ndarray) -> int:
    return sys.getrefcount(a)


class _Workers:
    """Reader + batcher threads for one iteration, starting at (epoch, step)."""

    def __init__(self, loader: ChunkLoader, epoch: int, step: int, buffers: tuple[dict, list] | None):
        self.ld = loader
        st = loader.store
        n_slots = loader.buffer_chunks + loader.prefetch
        if buffers is None:
            pool = {k: np.empty((n_slots, loader._chunk_rows, st.widths[k]), np.float16) for k in loader.backbones}
            buffers = (pool, [])
        self.pool = buffers[0]
        self._spare: list[tuple[dict[str, np.ndarray], int]] = buffers[1]  # (buffers, idle refcount)
        self.free: queue.Queue = queue.Queue()
        for s in range(n_slots):
            self.free.put(s)
        self.ready: queue.Queue = queue.Queue()
        self.out: queue.Queue = queue.Queue(maxsize=_QUEUE_BATCHES)
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._guard, args=(self._read, self.ready, epoch, step), daemon=True, name="usae-loader-read"),
            threading.Thread(target=self._guard, args=(self._batch, self.out, epoch, step), daemon=True, name="usae-loader-batch"),
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
        return self._get(self.out)

    def stop(self) -> bool:
        """Stop the threads; True when they have all ended."""
        self._stop.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        return not any(t.is_alive() for t in self.threads)

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
                for c in blk.chunks:
                    slot = self._get(self.free)
                    r0, r1 = st.chunk_rows(int(c))
                    for k, pool in self.pool.items():
                        st.read_chunk(k, int(c), out=pool[slot, : r1 - r0])
                    self._put(self.ready, slot)

    # -------------------------------------------------------- batcher thread
    def _batch(self, epoch: int, step: int) -> None:
        """Cut the stream into batches: this rank's window of each, filled block by block.

        How a block's rows get into the batch is the workers' own business: `_open_block`
        prepares a block, `_fill` copies block stream rows [s0, s1) to batch rows from o on,
        `_close_block` releases the block.
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
                            self._fill(ctx, off + w0 - filled, off + w1 - filled, out, w0 - lo)
                        filled, off = filled + take, off + take
                        if filled == bsz:
                            self._put(self.out, self._finish(out, ep, pos // bsz))
                            pos, filled, out = pos + bsz, 0, self._new_out()
                finally:
                    self._close_block(ctx)

    def _open_block(self, epoch: int, bi: int, blk: _Block):
        """The block's chunks from the reader (pool slots) and its shuffled pool rows."""
        slots = [self._get(self.ready) for _ in blk.chunks]
        return slots, self._block_rows(epoch, bi, blk, slots)

    def _fill(self, ctx, s0: int, s1: int, out: dict[str, np.ndarray], o: int) -> None:
        # np.take, not torch.index_select: no intra-op thread pool shared with training
        idx = ctx[1][s0:s1]
        for k, pool in self.pool.items():
            np.take(pool.reshape(-1, pool.shape[2]), idx, axis=0, out=out[k][o : o + len(idx)], mode="clip")

    def _close_block(self, ctx) -> None:
        for s in ctx[0]:
            self.free.put(s)

    def _block_rows(self, epoch: int, bi: int, blk: _Block, slots: list[int]) -> np.ndarray:
        """Pool row (slot * chunk_rows + offset) of each stream row of the block, shuffled."""
        base = np.concatenate(
            [s * self.ld._chunk_rows + self.ld.chunk_selected_rows(int(c)) for c, s in zip(blk.chunks, slots, strict=True)]
        )
        return base[self.ld.block_order(epoch, bi, blk.rows)]

    def _new_out(self) -> dict[str, np.ndarray]:
        """Batch buffers: a spare set nobody references any more, else a new one."""
        for bufs, idle in self._spare:
            if all(_refs(a) <= idle for a in bufs.values()):
                return bufs
        n, widths = self.ld.local_batch_tokens, self.ld.store.widths
        bufs = {k: np.empty((n, widths[k]), np.float16) for k in self.ld.backbones}
        if len(self._spare) < _SPARE_BATCHES:
            self._spare.append((bufs, max(_refs(a) for a in bufs.values())))
        return bufs

    def _finish(self, out: dict[str, np.ndarray], epoch: int, step: int) -> Batch:
        acts = [torch.from_numpy(out[k]) for k in self.ld.backbones]
        if self.ld.pin_memory and torch.cuda.is_available():
            acts = [a.pin_memory() for a in acts]
        return Batch(acts, epoch, step)


class _DirectWorkers(_Workers):
    """One thread reading each batch's (image, token range) pieces straight from the chunk files."""

    def __init__(self, loader: ChunkLoader, epoch: int, step: int, buffers: tuple[dict, list] | None):
        self.ld = loader
        self.pool: dict[str, np.ndarray] = {}  # no chunk pool: pieces go straight into the batch
        self._spare = [] if buffers is None else buffers[1]
        self.out: queue.Queue = queue.Queue(maxsize=_DIRECT_QUEUE_BATCHES)
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._guard, args=(self._batch, self.out, epoch, step), daemon=True,
                                         name="usae-loader-direct")]
        self.threads[0].start()

    def _open_block(self, epoch: int, bi: int, blk: _Block):
        """The block's shuffled images (chunk, first row) and its chunk files, opened."""
        chunk_of, row0_of = self.ld.block_images(epoch, bi, blk)
        return self._open(blk.chunks), (chunk_of.tolist(), row0_of.tolist())

    def _fill(self, ctx, s0: int, s1: int, out: dict[str, np.ndarray], o: int) -> None:
        self._read_span(ctx[0], ctx[1], s0, s1, out, o)

    def _close_block(self, ctx) -> None:
        _close(ctx[0])

    def _open(self, chunks: np.ndarray) -> dict[str, dict[int, int | None]]:
        """Read-only descriptors of a block's chunk files per backbone (None: a chunk never written, all zeros)."""
        fds: dict[str, dict[int, int | None]] = {k: {} for k in self.ld.backbones}
        try:
            for c in chunks.tolist():
                for k in self.ld.backbones:
                    f = self.ld.store.chunk_file(k, c)
                    fds[k][c] = os.open(f, os.O_RDONLY) if f.exists() else None
        except BaseException:
            _close(fds)
            raise
        return fds

    def _read_span(self, fds: dict, images: tuple[list[int], list[int]], s0: int, s1: int,
                   out: dict[str, np.ndarray], o: int) -> None:
        """Block stream rows [s0, s1) into rows o.. of the batch buffers, one pread per image piece."""
        t, (img_chunk, img_row0) = self.ld._t, images
        pieces = []  # (chunk, first row in the chunk file, rows) of each image piece, in batch order
        for j in range(s0 // t, (s1 - 1) // t + 1):
            a, b = max(s0 - j * t, 0), min(s1 - j * t, t)  # token range of image j
            pieces.append((img_chunk[j], img_row0[j] + a, b - a))
        for k in self.ld.backbones:  # backbone by backbone: each batch array is written front to back
            mv, row_bytes, fd_of, dst = memoryview(out[k]).cast("B"), out[k].shape[1] * 2, fds[k], o
            for c, r, n in pieces:
                fd, nbytes = fd_of[c], n * row_bytes
                if fd is None:
                    out[k][dst : dst + n] = 0
                elif os.preadv(fd, (mv[dst * row_bytes : dst * row_bytes + nbytes],), r * row_bytes) != nbytes:
                    raise StoreError(f"chunk file {self.ld.store.chunk_file(k, c)} is truncated (row {r}, {n} rows)")
                dst += n
            del mv

def _close(fds: dict[str, dict[int, int | None]]) -> None:
    for per_chunk in fds.values():
        for fd in per_chunk.values():
            if fd is not None:
                os.close(fd)
