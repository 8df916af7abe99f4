"""Training memory vs store size: `usae train` on a store and on one 8x larger -> peak RSS of each
(fresh subprocess per run, resource.getrusage maxrss), their ratio, a table and a JSON file.

The loader keeps a fixed pool of chunks and evaluation streams chunk by chunk, so peak RSS must
not follow the store size: target growth < 15%. Both runs use the same model, batch and number
of steps; sizes alternate, median of --repeats runs each.

    python benchmarks/train_memory.py                   # ~3-6 minutes on 2 cores
    python benchmarks/train_memory.py --tokens 200000 --factor 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from usae.trainer.train import TrainConfig, run_train
kw = json.loads(sys.argv[1])
res = run_train(TrainConfig(**kw))
print("RESULT", json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                            "steps": res.steps}))
"""


def make_store(path: Path, tokens: int, dims: str, chunk_images: int) -> None:
    from usae.trainer.synth import SynthConfig, run_synth

    widths = tuple(int(d) for d in dims.split(","))
    run_synth(
        SynthConfig(
            store=path,
            models=len(widths),
            dims=widths,
            tokens=tokens,
            tokens_per_image=16,
            chunk_images=chunk_images,
            save_codes=False,
        ),
        progress=False,
    )


def train_child(store: Path, out: Path, a) -> dict:
    kw = dict(
        store=str(store),
        out=str(out),
        concepts=a.concepts,
        k=a.k,
        batch_tokens=a.batch_tokens,
        steps=a.steps,
        warmup_steps=10,
        holdout=0.1,
        dtype="bf16",
        device="cpu",
        log_every=max(1, a.steps),
        ckpt_every=0,
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(kw)], capture_output=True, text=True
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"training subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=50_000, help="tokens of the small store")
    ap.add_argument("--factor", type=int, default=8, help="the large store has factor x tokens")
    ap.add_argument("--dims", default="384,768,768")
    ap.add_argument(
        "--chunk-images",
        type=int,
        default=128,
        help="images (16 tokens) per chunk: the small store must be larger than the loader's pool",
    )
    ap.add_argument("--concepts", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/train_memory.json")
    a = ap.parse_args()
    sizes = {"small": a.tokens, "large": a.tokens * a.factor}
    rss: dict[str, list[float]] = {s: [] for s in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {s: Path(tmp) / f"{s}.zarr" for s in sizes}
        for s, n in sizes.items():
            make_store(stores[s], n, a.dims, a.chunk_images)
        for r in range(a.repeats):
            for s in sizes:  # alternate sizes
                res = train_child(stores[s], Path(tmp) / f"run_{s}_{r}", a)
                rss[s].append(res["maxrss_kib"] / 1024)
    med = {s: statistics.median(v) for s, v in rss.items()}
    growth = med["large"] / med["small"] - 1
    gib = {s: n * sum(int(d) for d in a.dims.split(",")) * 2 / 2**30 for s, n in sizes.items()}
    print(
        f"\ntraining peak RSS vs store size ({a.chunk_images * 16} rows per chunk, m={a.concepts}, k={a.k}, batch {a.batch_tokens}, "
        f"{a.steps} steps, median of {a.repeats} subprocesses)"
    )
    print(f"{'store':6} {'tokens':>10} {'store GiB':>9} {'peak RSS MiB':>12}")
    for s, n in sizes.items():
        print(f"{s:6} {n:10d} {gib[s]:9.2f} {med[s]:12.0f}")
    print(f"growth {growth * 100:+.1f}% for a {a.factor}x larger store (target < 15%)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(a),
                "rss_mib": rss,
                "median_mib": med,
                "growth": growth,
                "store_gib": gib,
            },
            indent=1,
        )
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
