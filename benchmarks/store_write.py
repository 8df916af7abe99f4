"""Benchmark: activation store write throughput vs writing the same bytes with numpy.

Store side: `Store.create`, then `Store.write_chunk` for every chunk of three backbone
groups (widths 384, 768, 768, the paper's backbones) and `finalize()`: zarr writes, the
per-chunk exact statistics and the commit markers. Raw side: the same float16 arrays
written chunk by chunk with `ndarray.tofile` to one flat file per backbone. The two are
timed alternately, `--repeats` times each, in the same folder; the ratio of median
throughputs is reported (target >= 0.7). As a breakdown, the statistics alone
(`RunningStats.of` on the valid rows, part of every chunk commit) and the zarr array writes
alone (no statistics, no markers) are timed too.

    python benchmarks/store_write.py --images 1024 --repeats 7 --dir /dev/shm

On a tmpfs (`--dir /dev/shm`) both sides measure software overhead; on a real disk the
kernel's writeback and discard (TRIM) stalls land on whichever write runs next and swing the
timings several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from usae.pipeline.store import BackboneLayout, RunningStats, Store

WIDTHS = {"dinov2": 384, "siglip": 768, "vit": 768}
T = 196


def make_chunks(n_images: int, chunk_images: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for a in range(0, n_images, chunk_images):
        rows = (min(a + chunk_images, n_images) - a) * T
        out.append(
            {
                k: rng.standard_normal((rows, d), dtype=np.float32).astype(np.float16)
                for k, d in WIDTHS.items()
            }
        )
    return out


def write_store(path: Path, chunks, n_images: int, chunk_images: int, stats=None) -> float:
    """The full commit path; with `stats` given (precomputed per chunk), the data path alone.

    Creating the empty store (a one-off per store, like choosing the raw file names) is not
    timed; every chunk commit and the final merge are.
    """
    st = Store.create(
        path, [f"im{i}" for i in range(n_images)], [BackboneLayout(k, d) for k, d in WIDTHS.items()],
        grid=(14, 14), chunk_images=chunk_images, source="benchmark", fingerprint_of={"bench": 1},
    )  # fmt: skip
    t0 = time.perf_counter()
    for i, ch in enumerate(chunks):
        st.write_chunk(
            i, ch, np.ones(ch["vit"].shape[0] // T, bool), stats=None if stats is None else stats[i]
        )
    st.finalize()
    return time.perf_counter() - t0


def write_raw(folder: Path, chunks) -> float:
    t0 = time.perf_counter()
    folder.mkdir()
    files = {k: open(folder / f"{k}.f16", "wb") for k in WIDTHS}
    try:
        for ch in chunks:
            for k, f in files.items():
                ch[k].tofile(f)
    finally:
        for f in files.values():
            f.close()
    return time.perf_counter() - t0


def write_zarr_only(path: Path, chunks, n_images: int, chunk_images: int) -> float:
    """The token arrays' zarr writes alone (no statistics, no markers): the I/O part of a commit."""
    import zarr

    Store.create(
        path, [f"im{i}" for i in range(n_images)], [BackboneLayout(k, d) for k, d in WIDTHS.items()],
        grid=(14, 14), chunk_images=chunk_images, source="benchmark", fingerprint_of={"bench": 1},
    )  # fmt: skip
    arrays = {k: zarr.open_array(str(path / "backbones" / k / "tokens"), mode="r+") for k in WIDTHS}
    t0 = time.perf_counter()
    r0 = 0
    for ch in chunks:
        r1 = r0 + ch["vit"].shape[0]
        for k, a in arrays.items():
            a[r0:r1] = ch[k]
        r0 = r1
    return time.perf_counter() - t0


def stats_only(chunks) -> float:
    t0 = time.perf_counter()
    for ch in chunks:
        for x in ch.values():
            RunningStats.of(x[np.ones(x.shape[0], bool)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--chunk-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--dir", type=Path, default=None, help="folder to write in (default: a temp folder)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/store_write.json"))
    args = ap.parse_args()
    chunks = make_chunks(args.images, args.chunk_images)
    nbytes = sum(x.nbytes for ch in chunks for x in ch.values())
    tmp = Path(tempfile.mkdtemp(prefix="usae-bench-store-", dir=args.dir))
    store_s, raw_s, stats_s, zarr_s, data_s = [], [], [], [], []
    pre = [{k: RunningStats.of(x) for k, x in ch.items()} for ch in chunks]
    try:
        for r in range(args.repeats):
            # Each timed write starts with no dirty pages in the kernel (os.sync()), so neither
            # side pays for the other's writeback: without this, timings swing 10x.
            os.sync()
            raw_s.append(write_raw(tmp / f"raw{r}", chunks))
            os.sync()
            store_s.append(write_store(tmp / f"s{r}.zarr", chunks, args.images, args.chunk_images))
            stats_s.append(stats_only(chunks))
            os.sync()
            data_s.append(
                write_store(tmp / f"d{r}.zarr", chunks, args.images, args.chunk_images, pre)
            )
            shutil.rmtree(tmp / f"d{r}.zarr")
            os.sync()
            zarr_s.append(
                write_zarr_only(tmp / f"z{r}.zarr", chunks, args.images, args.chunk_images)
            )
            shutil.rmtree(tmp / f"z{r}.zarr")
            shutil.rmtree(tmp / f"raw{r}")
            shutil.rmtree(tmp / f"s{r}.zarr")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = nbytes / 1e6
    med = {
        k: statistics.median(v)
        for k, v in (
            ("store", store_s),
            ("raw", raw_s),
            ("stats", stats_s),
            ("zarr", zarr_s),
            ("data", data_s),
        )
    }
    result = {
        "images": args.images,
        "chunk_images": args.chunk_images,
        "widths": WIDTHS,
        "megabytes": mb,
        "repeats": args.repeats,
        "store_s": store_s,
        "raw_numpy_s": raw_s,
        "stats_only_s": stats_s,
        "zarr_writes_only_s": zarr_s,
        "store_data_path_s": data_s,
        "ratio_store_data_path_over_raw": med["raw"] / med["data"],
        "store_mb_per_s": mb / med["store"],
        "raw_numpy_mb_per_s": mb / med["raw"],
        "ratio_store_over_raw": med["raw"] / med["store"],
        "ratio_zarr_writes_only_over_raw": med["raw"] / med["zarr"],
        "stats_share_of_store_time": med["stats"] / med["store"],
        "target_ratio": 0.7,
    }
    print(f"{'what':<34}{'median s':>10}{'MB/s':>10}")
    print(f"{'raw numpy tofile':<34}{med['raw']:>10.3f}{mb / med['raw']:>10.0f}")
    print(f"{'Store.write_chunk + finalize':<34}{med['store']:>10.3f}{mb / med['store']:>10.0f}")
    print(f"{'  data path (stats precomputed)':<34}{med['data']:>10.3f}{mb / med['data']:>10.0f}")
    print(f"{'  statistics alone (float64)':<34}{med['stats']:>10.3f}")
    print(f"{'  zarr array writes alone':<34}{med['zarr']:>10.3f}{mb / med['zarr']:>10.0f}")
    print(
        f"ratio store / raw = {result['ratio_store_over_raw']:.3f} (target >= 0.7), {mb:.0f} MB/run"
    )
    print(
        f"ratio store data path / raw = {result['ratio_store_data_path_over_raw']:.3f} (target >= 0.7)"
    )
    print(f"ratio zarr-python writes / raw = {result['ratio_zarr_writes_only_over_raw']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
