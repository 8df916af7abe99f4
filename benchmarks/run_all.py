"""All benchmarks, one after another (`make bench`): each prints its table and writes its JSON.

Each benchmark measures a RATIO side by side in one run (median of >= 3 repeats); absolute
times on a shared machine drift. Pass benchmark names to run only those:
    python benchmarks/run_all.py store_write loader
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# name -> extra arguments (the scripts' defaults otherwise)
BENCHMARKS = {
    "store_write": ["--images", "512", "--repeats", "5"],
    "loader": [],
    "train_step": [],
    "train_memory": [],
    "planted": [],
    "analyze": [],
    "extract": ["--images", "64", "--repeats", "3"],
    "maximize": [],
    "manifest_images": [],
    "int8": [],
    "extract_layers": [],  # extract.py with 4 layers of one backbone (SCRIPTS)
    "recovery": [],  # slow: 18 trainings of 3000 steps (reused from bench_out/ when present)
    "twins": [],
    "labels": [],
    "explain": [],
}
SCRIPTS = {
    "extract_layers": (
        "extract",
        [
            "--images",
            "64",
            "--repeats",
            "3",
            "--backbones",
            "dinov2",
            "--layers",
            "3,6,9,11",
            "--out",
            "benchmarks/extract_layers.json",
        ],
    ),
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names or list(BENCHMARKS):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        script, args = SCRIPTS.get(name, (name, BENCHMARKS[name]))
        rc = subprocess.call([sys.executable, str(HERE / f"{script}.py"), *args])
        print(f"--- {name}: exit {rc}, {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
