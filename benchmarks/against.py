"""This tree vs another commit: the benchmarks' own ratios, measured side by side in one run ->
a table and a JSON file.

Each benchmark already reports a ratio measured inside its own process (usae's training step
vs a dense fp32 step, the loader vs numpy reading the same chunk files, the analysis pass vs
encoding alone). This script runs each benchmark of BOTH trees alternately, `--repeats` times,
and compares the medians of those ratios, so a restructuring can be shown to cost nothing.

The other commit is checked out in a temporary git worktree and imported from there: a
temporary folder lays out its `usae/`, `pipeline/`, `trainer/` and `analysis/` folders as the
installed namespace (`usae.pipeline`, ...), put first on PYTHONPATH.

    python benchmarks/against.py --base 3dd38ae
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (script arguments, the ratio's key path in the script's JSON)
BENCHES = {
    "train_step": (
        [
            "--tokens",
            "2048",
            "--concepts",
            "6144",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
        ],
        ("rows", "usae fp32", "speedup"),
    ),
    "loader": (
        [
            "--images",
            "256",
            "--repeats",
            "3",
            "--shuffles",
            "images,tokens",
            "--train-steps",
            "1",
            "--no-reread",
        ],
        ("ratios", "images: loader / numpy (target >= 0.8)"),
    ),
    "analyze": (
        ["--tokens", "8192", "--repeats", "3", "--rss-tokens", "2048", "--dtype", "{fp32}"],
        ("throughput", "ratio_metrics_over_encode"),
    ),
}
LOADER_TOKENS = ("ratios", "tokens: loader / numpy (target >= 0.8)")


def namespace_dir(tree: Path, into: Path) -> Path:
    """A folder where `import usae.pipeline` finds tree/pipeline (as the install maps it)."""
    pkg = into / "usae"
    pkg.mkdir(parents=True)
    for f in (tree / "usae").iterdir():
        (pkg / f.name).symlink_to(f)
    for stage in ("pipeline", "trainer", "analysis"):
        (pkg / stage).symlink_to(tree / stage)
    return into


def pick(obj, path):
    if path[0] == "rows":  # a list of {"variant": name, ...}
        row = next(r for r in obj["rows"] if r["variant"] == path[1])
        return float(row[path[2]])
    for p in path:
        obj = obj[p]
    return float(obj)


def fp32_name(pypath: Path) -> str:
    """The tree's name of float32 for the analysis (older trees: "float32", now "fp32")."""
    probe = (
        "import usae.analysis.metrics as m; print('float32' if hasattr(m, 'DTYPES') else 'fp32')"
    )
    env = {**os.environ, "PYTHONPATH": str(pypath)}
    # run from the namespace folder: from another tree's root, `import usae` would find that tree
    r = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=pypath
    )
    return r.stdout.strip()


def run_bench(tree: Path, pypath: Path, name: str, out: Path) -> dict:
    args = [a.format(fp32=fp32_name(pypath)) for a in BENCHES[name][0]]
    env = {**os.environ, "PYTHONPATH": str(pypath), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(tree / "benchmarks" / f"{name}.py"), *args, "--out", str(out)]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed in {tree}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other commit (any git revision)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each benchmark per tree"
    )
    ap.add_argument("--only", default=",".join(BENCHES), help="benchmarks to run, comma-separated")
    ap.add_argument("--out", default="benchmarks/against.json")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="usae-against-"))
    base = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), a.base], check=True,
                   capture_output=True)  # fmt: skip
    trees = {
        "base": (base, namespace_dir(base, tmp / "ns-base")),
        "this": (ROOT, namespace_dir(ROOT, tmp / "ns-this")),
    }
    names = [n for n in a.only.split(",") if n]
    ratios: dict[str, dict[str, list[float]]] = {}
    try:
        for rep in range(a.repeats):
            for name in names:
                for label, (tree, pypath) in trees.items():  # side by side, alternating
                    res = run_bench(tree, pypath, name, tmp / f"{name}-{label}-{rep}.json")
                    ratios.setdefault(name, {}).setdefault(label, []).append(
                        pick(res, BENCHES[name][1])
                    )
                    if name == "loader":
                        ratios.setdefault("loader tokens", {}).setdefault(label, []).append(
                            pick(res, LOADER_TOKENS)
                        )
                    print(
                        f"repeat {rep + 1}: {name} {label} {ratios[name][label][-1]:.3f}",
                        flush=True,
                    )
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    print(f"\nratios of this tree vs {a.base} (median of {a.repeats} alternating runs each)")
    print(f"{'benchmark ratio':40} {'base':>8} {'this':>8} {'this/base':>10}")
    for name, by in ratios.items():
        mb, mt = statistics.median(by["base"]), statistics.median(by["this"])
        rows.append({"benchmark": name, "base": by["base"], "this": by["this"], "median_base": mb,
                     "median_this": mt, "this_over_base": mt / mb})  # fmt: skip
        print(f"{name:40} {mb:8.3f} {mt:8.3f} {mt / mb:10.3f}")
    Path(a.out).write_text(
        json.dumps({"base": a.base, "repeats": a.repeats, "rows": rows}, indent=1)
    )
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
