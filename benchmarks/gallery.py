"""The gallery's cost in `usae analyze` -> table on stdout + JSON beside this file
(`python benchmarks/gallery.py DEMO_DIR`, DEMO_DIR from `usae demo --tiny --out DEMO_DIR`).

Times the demo's own analyze call (photos from the store's record, top 8 concepts, 6 images
each) with the default gallery (6 concepts per member set, their top images and token maps
as thumbnails; "extra concepts": those not already among the top concepts) and with --gallery 0 (the top concepts' thumbnails only), interleaved, median
of --repeats runs each; the ratio is the gallery's cost. Also the report's size on disk.
Absolute times drift on shared machines; only the ratio is meant to be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from usae.analysis.report import AnalyzeConfig, run_analyze


def _size(folder: Path) -> tuple[int, int]:
    files = [f for f in folder.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="folder written by `usae demo --tiny --out DIR`")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gallery", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    times: dict[int, list[float]] = {args.gallery: [], 0: []}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for g in times:
                out = Path(tmp) / f"g{g}"
                cfg = AnalyzeConfig(
                    run=str(args.demo / "run"), store=str(args.demo / "store.zarr"), out=str(out),
                    top_concepts=8, top_images=6, gallery=g,
                )  # fmt: skip
                t0 = time.perf_counter()
                m = run_analyze(cfg, progress=False).metrics
                times[g].append(time.perf_counter() - t0)
                top = set(m["top_concepts"]["importance"]) | set(m["top_concepts"]["universality"])
                extra = {k for s in m["gallery"] for k in s["concepts"]} - top
                sizes[g] = (*_size(out), len(extra))
    med = {g: statistics.median(v) for g, v in times.items()}
    ratio = med[args.gallery] / med[0]
    print(f"{'gallery':>8} {'median s':>9} {'report MB':>10} {'files':>6} {'extra concepts':>15}")
    for g in times:
        b, n, cards = sizes[g]
        print(f"{g:>8} {med[g]:>9.2f} {b / 1e6:>10.2f} {n:>6} {cards:>15}")
    print(f"ratio (gallery {args.gallery} / gallery 0), median of {args.repeats}: {ratio:.2f}")
    res = {
        "demo": str(args.demo),
        "repeats": args.repeats,
        "seconds": times,
        "median": med,
        "ratio": ratio,
        "report_bytes": {g: s[0] for g, s in sizes.items()},
        "report_files": {g: s[1] for g, s in sizes.items()},
        "extra_concepts": {g: s[2] for g, s in sizes.items()},
        "cpu_threads": 1,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
