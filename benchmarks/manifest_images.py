"""Benchmark: manifest path checking and robust image decoding, each against its plain
counterpart, timed alternately in one run (median of --repeats), reported as ratios.

1. Path-escape check of a manifest of --rows paths in --folders folders: the per-folder
   check used by `read_manifest` (`escaping_paths`) vs the one-path-at-a-time checker
   (`_PathChecker`, the obvious version it is tested against).
2. Decoding the demo images: `load_image` (size check, EXIF rotation, mode rules, alpha
   compositing, error reasons) vs a bare `Image.open(path).convert("RGB")`.

    python benchmarks/manifest_images.py --rows 100000 --folders 500 --images 150 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from usae.pipeline.demo_images import build_demo_images
from usae.pipeline.images import load_image
from usae.pipeline.manifest import _PathChecker, escaping_paths, read_manifest


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_paths(root: Path, rows: int, folders: int, repeats: int) -> dict:
    for f in range(folders):
        (root / f"c{f:04d}").mkdir(parents=True, exist_ok=True)
    paths = [f"c{i % folders:04d}/img{i:07d}.jpg" for i in range(rows)]
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(rows)], "path": paths})

    def one_by_one() -> list:
        check = _PathChecker(root)
        return [(i, w) for i, p in enumerate(paths) if (w := check(p))]

    assert escaping_paths(df, root) == one_by_one() == []
    fast, slow = [], []
    for _ in range(repeats):
        fast.append(_timed(lambda: escaping_paths(df, root)))
        slow.append(_timed(one_by_one))
    return {"rows": rows, "folders": folders, "per_folder_s": fast, "one_by_one_s": slow,
            "speedup": statistics.median(slow) / statistics.median(fast)}  # fmt: skip


def bench_decode(folder: Path, n: int, repeats: int) -> dict:
    df = read_manifest(build_demo_images(folder, n=n, seed=0, show_progress=False))
    files = [folder / p for p in df["path"]]

    def robust() -> None:
        for f in files:
            load_image(f)

    def bare() -> None:
        for f in files:
            with Image.open(f) as im:
                np.asarray(im.convert("RGB"))

    ours, plain = [], []
    for _ in range(repeats):
        ours.append(_timed(robust))
        plain.append(_timed(bare))
    return {"images": n, "load_image_s": ours, "bare_pil_s": plain,
            "overhead": statistics.median(ours) / statistics.median(plain)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--folders", type=int, default=500)
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/manifest_images.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = bench_paths(Path(tmp) / "root", a.rows, a.folders, a.repeats)
        decode = bench_decode(Path(tmp) / "demo", a.images, a.repeats)
    print(f"{'measurement':<48} {'median s':>10} {'ratio':>8}")
    print(
        f"{'path check, per folder (' + str(a.rows) + ' rows)':<48} {statistics.median(paths['per_folder_s']):>10.3f}"
    )
    print(
        f"{'path check, one by one':<48} {statistics.median(paths['one_by_one_s']):>10.3f} {paths['speedup']:>7.1f}x"
    )
    print(
        f"{'decode, bare PIL (' + str(a.images) + ' demo images)':<48} {statistics.median(decode['bare_pil_s']):>10.3f}"
    )
    print(
        f"{'decode, load_image':<48} {statistics.median(decode['load_image_s']):>10.3f} {decode['overhead']:>7.2f}x"
    )
    a.out.write_text(json.dumps({"repeats": a.repeats, "paths": paths, "decode": decode}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
