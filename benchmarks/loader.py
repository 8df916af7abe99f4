"""Loader throughput: ChunkLoader rows/s (both shuffle modes) vs plain numpy reads of the same chunk
files, and vs what a training step consumes -> a table and a JSON file.

Measured side by side in one process (interleaved, median of --repeats), data in the page cache:

1. numpy alone: read every chunk file of every backbone (random chunk order, --passes times),
   rows/s = store rows / time; no shuffle, no alignment, no batches. Two ways:
   - into one reused numpy array per backbone (``f.readinto(array)``): the fastest plain read,
     the copy from the page cache into memory that stays in the CPU cache. THE BASELINE.
   - ``np.fromfile`` (a new array per chunk): as fast when the allocator hands back the same
     warm memory, up to ~3x slower when each array is fresh memory to fault in (a new process).
2. ChunkLoader, once per variant of --shuffles (images, the default: whole images read piece
   by piece with preadv straight into the batch; tokens: rows gathered from the memory-mapped
   chunk files; "images:1": one gather thread): shuffled, aligned batches of --batch-tokens
   rows of all backbones, steady state = epochs 2 .. --passes + 1 of one iterator (the first,
   with start-up, is shown too); rows/s = delivered rows / time.  The consumer drops each batch
   before asking for the next, as `usae train` does, so the loader refills the same, cache-warm
   buffers; a "/hold" variant (e.g. "images/hold") holds the previous batch meanwhile, as the
   loop variable of ``for batch in loader`` does, and gets two buffers in rotation.
   Target: loader / numpy (reused array) >= 0.8, given as the ratio of the medians and as the
   median of the per-repeat ratios.
   Both are also given per CPU second of the process (time.process_time, all threads): on a
   shared, oversubscribed machine wall-clock rates mostly measure the scheduler, CPU-time
   rates measure the work done.
   Also: whole chunk files read into two alternating batch-sized buffers (no shuffle), a
   bound for a loader that alternates two batch buffers (numpy above reuses one cache-hot one).
   Then (unless --no-reread) the store's files are evicted from the page cache and read back
   in, the state of a store extracted earlier and read again for training, and numpy, the
   two-buffer bound and the loaders are measured again: a just-written store's page cache can
   read ~1.5-2x faster on this machine, which moves every ratio against plain reads.
3. Training step (usae.trainer.train.train_step, bf16 when the CPU has it) at --concepts/--k
   on in-memory batches: tokens/s.  Target: loader rows/s / train tokens/s >= 10.
4. The same training steps fed by the loader (one iteration kept open, each mode) vs fed from
   memory: the share of step throughput kept (1.0 = the loader costs the trainer nothing).

    python benchmarks/loader.py                       # ~3-4 minutes on 2 cores
    python benchmarks/loader.py --images 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer.config import TrainConfig
from usae.trainer.loader import ChunkLoader
from usae.trainer.model import ModelSpec
from usae.trainer.state import new_state
from usae.trainer.train import StepContext, train_step

from usae.runtime import autocast_dtype


def make_store(
    path: Path, n_images: int, widths: tuple[int, ...], tpi: int, chunk_images: int
) -> Store:
    """A store of random float16 tokens (content is irrelevant to reading speed)."""
    keys = [f"m{j}" for j in range(len(widths))]
    side = int(np.sqrt(tpi))
    st = Store.create(
        path,
        [f"i{i}" for i in range(n_images)],
        [BackboneLayout(k, d) for k, d in zip(keys, widths, strict=True)],
        grid=(side, tpi // side),
        chunk_images=chunk_images,
        source="synth",
        fingerprint_of={"bench": n_images, "w": widths, "t": tpi},
    )
    rng = np.random.default_rng(0)
    for c in range(st.n_chunks):
        r0, r1 = st.chunk_rows(c)
        a, b = st.chunk_images_range(c)
        toks = {
            k: rng.standard_normal((r1 - r0, d), dtype=np.float32).astype(np.float16)
            for k, d in zip(keys, widths, strict=True)
        }
        st.write_chunk(c, toks, np.ones(b - a, bool))
    st.finalize()
    return Store.open(path)


class Rate(NamedTuple):
    """Rows per wall-clock second and per CPU second of this process (all its threads)."""

    wall: float
    cpu: float


def numpy_into(st: Store, seed: int, passes: int = 1) -> Rate:
    """Read every chunk file of every backbone into one reused numpy array per backbone, `passes`
    times (random chunk order): the fastest plain read."""
    rows = st.chunk_images * st.tokens_per_image
    bufs = {k: np.empty((rows, st.widths[k]), np.float16) for k in st.backbones}
    rng = np.random.default_rng(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for c in rng.permutation(st.n_chunks):
            for k in st.backbones:
                with open(st.chunk_file(k, int(c)), "rb", buffering=0) as f:
                    assert f.readinto(bufs[k]) > 0
    n = st.n_rows * passes
    return Rate(n / (time.perf_counter() - t0), n / (time.process_time() - c0))


def numpy_read(st: Store, seed: int, passes: int = 1) -> Rate:
    """Read every chunk file of every backbone with np.fromfile, `passes` times (random chunk order)."""
    rng = np.random.default_rng(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for c in rng.permutation(st.n_chunks):
            for k in st.backbones:
                x = np.fromfile(st.chunk_file(k, int(c)), dtype=np.float16).reshape(
                    -1, st.widths[k]
                )
                assert x.shape[0] > 0
    n = st.n_rows * passes
    return Rate(n / (time.perf_counter() - t0), n / (time.process_time() - c0))


def into_two_buffers(st: Store, seed: int, passes: int, batch_tokens: int) -> Rate:
    """Whole chunk files read (readinto) into two alternating batch-sized buffers per backbone.

    No shuffle: the cost of writing into buffers as large as a loader's batches, which stay
    less in the CPU cache than np.fromfile's reused ~chunk-sized one (the images loader's ceiling).
    """
    rows = max(batch_tokens, st.chunk_images * st.tokens_per_image)
    bufs = [{k: np.zeros((rows, st.widths[k]), np.float16) for k in st.backbones} for _ in range(2)]
    rng, n = np.random.default_rng(seed), 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for c in rng.permutation(st.n_chunks):
            r0, r1 = st.chunk_rows(int(c))
            out = bufs[n % 2]
            for k in st.backbones:
                st.read_chunk(k, int(c), out=out[k][: r1 - r0])
            n += 1
    rows_read = st.n_rows * passes
    return Rate(rows_read / (time.perf_counter() - t0), rows_read / (time.process_time() - c0))


def make_loader(a, st: Store, variant: str, seed: int) -> ChunkLoader:
    """The loader of a variant: "images", "images:2" (shuffle mode, gather threads) or
    "images/hold" (see `loader_epoch`), with the command line's batch, block and prefetch (0 for
    blocks or threads: the loader's default)."""
    mode, _, threads = variant.split("/")[0].partition(":")
    return ChunkLoader(
        st,
        st.backbones,
        a.batch_tokens,
        seed=seed,
        buffer_chunks=a.buffer_chunks or None,
        prefetch=a.prefetch,
        shuffle=mode,
        gather_threads=int(threads or a.gather_threads) or None,
    )


def loader_epoch(ld: ChunkLoader, passes: int = 1, hold: bool = False) -> tuple[Rate, float]:
    """(steady-state Rate over epochs 2 .. passes+1, wall rows/s of the 1st epoch from a cold start).

    A training run iterates epoch after epoch with one loader: its chunk pool and batch
    buffers are paged in during the first epoch (the cold figure includes that and the
    thread start); the steady figure is the next `passes` epochs. The consumer drops each batch
    before it asks for the next, as `usae train` does; with `hold` it still holds it then (as
    the loop variable of ``for batch in loader`` does), so the loader cannot refill it at once.
    """
    it = iter(ld)
    rates = []
    for epochs in (1, passes):
        t0, c0 = time.perf_counter(), time.process_time()
        n, b = 0, None
        for _ in range(ld.batches_per_epoch * epochs):
            if hold:
                b = next(it)  # the previous batch stays referenced until next() returns
                n += b.acts[0].shape[0]
            else:
                n += next(it).acts[0].shape[0]
        del b
        rates.append(Rate(n / (time.perf_counter() - t0), n / (time.process_time() - c0)))
    ld.close()
    return rates[1], rates[0].wall


def train_setup(st: Store, concepts: int, k: int, batch_tokens: int):
    widths = tuple(st.widths[key] for key in st.backbones)
    spec = ModelSpec(
        tuple(st.backbones), widths, (0.0,) * len(widths), (1.0,) * len(widths), concepts, k
    )
    cfg = TrainConfig(lr=3e-4, batch_tokens=batch_tokens, recipe="paper")
    amp = autocast_dtype("bf16", "cpu")
    torch.manual_seed(0)
    state = new_state(spec, cfg, torch.device("cpu"))
    return state, StepContext(cfg, 10**6, 0, 1, amp), amp


def train_steps(state, ctx, batches) -> float:
    """Seconds for len(batches) training steps on float16 batches (converted like the trainer)."""
    t0 = time.perf_counter()
    for acts in batches:
        train_step(state, ctx, [a.float() for a in acts])
    return time.perf_counter() - t0


def train_from_loader(state, ctx, it, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(state, ctx, [a.float() for a in next(it).acts])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="images in the store")
    ap.add_argument("--tokens-per-image", type=int, default=196)
    ap.add_argument("--widths", default="384,768,768")
    ap.add_argument(
        "--chunk-images", type=int, default=32, help="images per chunk (~10 MB at width 768)"
    )
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument(
        "--buffer-chunks", type=int, default=0, help="0: the loader's default for each read mode"
    )
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument(
        "--gather-threads",
        type=int,
        default=0,
        help="0: the loader's default (2 where there are 2 cores)",
    )
    ap.add_argument("--concepts", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=4, help="timed training steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--passes",
        type=int,
        default=4,
        help="passes over the store per timed read (numpy and loader)",
    )
    ap.add_argument("--store", default="", help="reuse/create the store here (default: a temp dir)")
    ap.add_argument(
        "--no-reread",
        dest="reread",
        action="store_false",
        help="skip the second round on the store evicted from the page cache and read back",
    )
    ap.add_argument(
        "--shuffles",
        default="images,images/hold,tokens",
        help="loader variants to measure side by side: a shuffle mode, mode:threads (e.g. images:1), "
        "and /hold for a consumer that holds the previous batch (e.g. images/hold)",
    )
    ap.add_argument("--out", default="benchmarks/loader.json")
    a = ap.parse_args()
    widths = tuple(int(w) for w in a.widths.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.store) if a.store else Path(tmp) / "bench.zarr"
        st = (
            Store.open(path)
            if (path / "zarr.json").exists()
            else make_store(path, a.images, widths, a.tokens_per_image, a.chunk_images)
        )
        numpy_read(st, 0)  # page cache warm-up
        res = measure(a, st)
        if a.reread and hasattr(os, "posix_fadvise"):
            read_back(st)
            res |= measure_reads(a, st, "_reread")
        report(a, st, res)


def read_back(st: Store) -> None:
    """Evict the store's chunk files from the page cache and read them back in: the state of a
    store extracted earlier and read again for training (a just-written store's page cache can
    read ~1.5-2x faster on this machine)."""
    for c in range(st.n_chunks):
        for k in st.backbones:
            fd = os.open(st.chunk_file(k, c), os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not evicted
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    numpy_into(st, 0)


def measure_reads(a, st: Store, suffix: str) -> dict[str, list[float]]:
    """numpy, the two-buffer bound and each loader variant (steady state), side by side."""
    out: dict[str, list[float]] = {f"{k}{suffix}": [] for k in ("numpy", "two_buffers")}
    for m in a.shuffles.split(","):
        out[f"loader_{m}{suffix}"] = []
    for r in range(a.repeats):
        out[f"numpy{suffix}"].append(numpy_into(st, r, a.passes).wall)
        out[f"two_buffers{suffix}"].append(into_two_buffers(st, r, a.passes, a.batch_tokens).wall)
        for m in a.shuffles.split(","):
            steady, _ = loader_epoch(make_loader(a, st, m, r), a.passes, m.endswith("/hold"))
            out[f"loader_{m}{suffix}"].append(steady.wall)
    return out


def measure(a, st: Store) -> dict[str, list[float]]:
    modes = a.shuffles.split(",")
    out: dict[str, list[float]] = {
        "numpy": [],
        "numpy_cpu": [],
        "fromfile": [],
        "two_buffers": [],
        "train": [],
    }
    for m in modes:
        out |= {
            f"loader_{m}": [],
            f"loader_{m}_cpu": [],
            f"loader_{m}_cold": [],
            f"train_fed_{m}": [],
        }
    state, ctx, amp = train_setup(st, a.concepts, a.k, a.batch_tokens)
    warm = ChunkLoader(st, st.backbones, a.batch_tokens, seed=99)
    mem_batches = [b.acts for _, b in zip(range(a.train_steps + 1), warm, strict=False)]
    warm.close()
    train_steps(state, ctx, mem_batches[:1])  # warm-up
    for r in range(a.repeats):  # interleaved, side by side
        npy = numpy_into(st, r, a.passes)
        out["numpy"].append(npy.wall)
        out["numpy_cpu"].append(npy.cpu)
        out["fromfile"].append(numpy_read(st, r, a.passes).wall)
        out["two_buffers"].append(into_two_buffers(st, r, a.passes, a.batch_tokens).wall)
        for m in modes:
            steady, cold = loader_epoch(make_loader(a, st, m, r), a.passes, m.endswith("/hold"))
            out[f"loader_{m}"].append(steady.wall)
            out[f"loader_{m}_cpu"].append(steady.cpu)
            out[f"loader_{m}_cold"].append(cold)
        out["train"].append(
            a.batch_tokens * a.train_steps / train_steps(state, ctx, mem_batches[1:])
        )
        for m in modes:
            ld = make_loader(a, st, m, r)
            it = iter(ld)
            next(it)  # threads started, first block read
            out[f"train_fed_{m}"].append(
                a.batch_tokens * a.train_steps / train_from_loader(state, ctx, it, a.train_steps)
            )
            ld.close()
    out["amp"] = [str(amp)]  # type: ignore[list-item]
    return out


def report(a, st: Store, res: dict) -> None:
    modes = a.shuffles.split(",")
    med = {k: statistics.median(v) for k, v in res.items() if k != "amp"}

    def paired(
        a: str, b: str
    ) -> float:  # each repeat measures both side by side: robust to drift between repeats
        return statistics.median(x / y for x, y in zip(res[a], res[b], strict=True))

    rows = [
        ("numpy, all chunk files into a reused array", med["numpy"], "rows/s"),
        ("  per CPU second of the process", med["numpy_cpu"], "rows/cpu-s"),
        ("numpy np.fromfile (a new array per chunk)", med["fromfile"], "rows/s"),
        ("whole chunks into 2 batch-sized buffers", med["two_buffers"], "rows/s"),
        ("training step (in-memory batches)", med["train"], "tokens/s"),
    ]
    ratios = {
        "np.fromfile / numpy into a reused array": med["fromfile"] / med["numpy"],
        "whole chunks into 2 batch-sized buffers / numpy": med["two_buffers"] / med["numpy"],
    }
    for m in modes:
        ld = make_loader(a, st, m, 0)
        how = f"{ld.read_mode}, {ld.buffer_chunks}-chunk blocks, {ld.gather_threads} threads"
        rows += [
            (f"ChunkLoader shuffle={m} ({how})", med[f"loader_{m}"], "rows/s"),
            ("  1st epoch (thread start, paging in buffers)", med[f"loader_{m}_cold"], "rows/s"),
            ("  per CPU second (all threads)", med[f"loader_{m}_cpu"], "rows/cpu-s"),
            ("  training step fed by it", med[f"train_fed_{m}"], "tokens/s"),
        ]
        ratios |= {
            f"{m}: loader / numpy (target >= 0.8)": med[f"loader_{m}"] / med["numpy"],
            f"{m}:   median of the per-repeat ratios": paired(f"loader_{m}", "numpy"),
            f"{m}:   / two alternating buffers": med[f"loader_{m}"] / med["two_buffers"],
            f"{m}:   same per CPU second": med[f"loader_{m}_cpu"] / med["numpy_cpu"],
            f"{m}: loader / training step (target >= 10)": med[f"loader_{m}"] / med["train"],
            f"{m}: fed / in-memory training (1.0 = free)": med[f"train_fed_{m}"] / med["train"],
        }
    if "numpy_reread" in med:
        rows.append(("store read back into the page cache: numpy", med["numpy_reread"], "rows/s"))
        ratios["read back: 2-buffer bound / numpy"] = (
            med["two_buffers_reread"] / med["numpy_reread"]
        )
        for m in modes:
            rows.append((f"  ChunkLoader shuffle={m}", med[f"loader_{m}_reread"], "rows/s"))
            ratios[f"read back: {m}: loader / numpy (target >= 0.8)"] = (
                med[f"loader_{m}_reread"] / med["numpy_reread"]
            )
            ratios[f"read back: {m}:   median of the per-repeat ratios"] = paired(
                f"loader_{m}_reread", "numpy_reread"
            )
    if {"tokens", "images"} <= set(modes):
        ratios["images / tokens loader"] = med["loader_images"] / med["loader_tokens"]
    gib = st.n_rows * sum(st.widths.values()) * 2 / 2**30
    print(
        f"\nloader benchmark (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): {st.n_images} images x {st.tokens_per_image} tokens, widths "
        f"{[st.widths[k] for k in st.backbones]} ({gib:.2f} GiB), {st.n_chunks} chunks, batch "
        f"{a.batch_tokens}, buffer {a.buffer_chunks}, prefetch {a.prefetch}; train m={a.concepts} "
        f"k={a.k} amp={res['amp'][0]}; median of {a.repeats}, {torch.get_num_threads()} torch threads"
    )
    for name, v, unit in rows:
        print(f"  {name:46} {v:14,.0f} {unit}")
    for name, v in ratios.items():
        print(f"  {name:46} {v:14.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(a), "median": med, "ratios": ratios, "raw": res}, indent=1)
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
