"""The cost of labels and sparse probing in `usae analyze` -> table on stdout + JSON beside this
file (`python benchmarks/labels.py [--repeats 3] [--tokens 96000]`).

A planted store whose images carry 8 labels tied to planted concepts (`usae synth --labels 8`,
three models), a short run, then the same analysis with labels (the default `--label-column
label`: per-concept top labels, the best single concept per label with its held-out AUROC,
k = 1 and 5 sparse probes) and without them (`--label-column ""`), interleaved, median of
--repeats each; the ratio is their cost. One torch thread; only the ratio is meant to be
compared (absolute times drift on shared machines).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from usae.analysis.report import AnalyzeConfig, run_analyze
from usae.trainer.synth import SynthConfig, run_synth
from usae.trainer.train import TrainConfig, run_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96_000)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_synth(SynthConfig(store=tmp / "s.zarr", models=3, dims=(48, 64, 64), universal=16,
                              specific=8, tokens=args.tokens, tokens_per_image=16, active=3.0,
                              noise=0.05, seed=0, save_codes=False, labels=8), progress=False)  # fmt: skip
        run_train(TrainConfig(store=str(tmp / "s.zarr"), out=str(tmp / "run"), concepts=96, k=3,
                              steps=args.steps, batch_tokens=1024, holdout=0.1, dtype="fp32",
                              device="cpu", log_every=1000, ckpt_every=0))  # fmt: skip
        times: dict[str, list[float]] = {"labels": [], "no labels": []}
        for _ in range(args.repeats):
            for name, col in (("labels", "label"), ("no labels", "")):
                cfg = AnalyzeConfig(run=str(tmp / "run"), store=str(tmp / "s.zarr"),
                                    out=str(tmp / name.replace(" ", "_")), label_column=col)  # fmt: skip
                t0 = time.perf_counter()
                m = run_analyze(cfg, progress=False).metrics
                times[name].append(time.perf_counter() - t0)
                assert (m["labels"] is None) == (col == "")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["labels"] / med["no labels"]
    print(f"{'analyze':>10} {'median s':>9}")
    for k in times:
        print(f"{k:>10} {med[k]:>9.2f}")
    print(f"ratio (labels / no labels), median of {args.repeats}: {ratio:.2f}")
    res = {"tokens": args.tokens, "images": args.tokens // 16, "labels": 8, "repeats": args.repeats,
           "threads": 1, "median_seconds": med, "ratio": ratio, "times": times}  # fmt: skip
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
