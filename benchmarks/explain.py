"""`usae explain` images/s against `usae extract` images/s on the same images -> table on stdout
+ JSON beside this file (`python benchmarks/explain.py [--images 48] [--repeats 3]`).

Demo photos, one full-size DINOv2 ViT-S/14 (random init, as the demo without weights), the
default grid. Extract writes a store of the images; a short run is trained on it; explain then
runs the same backbone over the same images and encodes them, with and without thumbnails and
its page. Runs are interleaved, median of --repeats each; only the ratios are meant to be
compared (absolute times drift on shared machines). One torch thread.
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

import torch
from usae.analysis.explain import ExplainConfig, run_explain
from usae.pipeline.demo_images import build_demo_images
from usae.pipeline.extract import ExtractConfig, run_extract
from usae.trainer.train import TrainConfig, run_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbone", default="dinov2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = build_demo_images(tmp / "demo", n=args.images, show_progress=False)

        def extract(store: Path) -> float:
            shutil.rmtree(store, ignore_errors=True)
            cfg = ExtractConfig(
                manifest=manifest, store=store, backbones=(args.backbone,), random_init=True,
                device="cpu", progress=False,
            )  # fmt: skip
            t0 = time.perf_counter()
            run_extract(cfg)
            return time.perf_counter() - t0

        extract(tmp / "s.zarr")
        run_train(TrainConfig(store=str(tmp / "s.zarr"), out=str(tmp / "run"), concepts=1536, k=32,
                              steps=20, holdout=0.0, device="cpu", log_every=10, ckpt_every=0))  # fmt: skip

        def explain(thumbs: bool) -> float:
            out = tmp / f"ex{int(thumbs)}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = ExplainConfig(
                run=tmp / "run", images=manifest, out=out, thumbs=thumbs, progress=False
            )
            t0 = time.perf_counter()
            run_explain(cfg)
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"extract": [], "explain": [], "explain --no-thumbs": []}
        for _ in range(args.repeats):
            times["extract"].append(extract(tmp / "s2.zarr"))
            times["explain"].append(explain(True))
            times["explain --no-thumbs"].append(explain(False))
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: args.images / v for k, v in med.items()}
    print(f"{'command':>20} {'median s':>9} {'images/s':>9} {'vs extract':>11}")
    for k in times:
        print(f"{k:>20} {med[k]:>9.2f} {rate[k]:>9.2f} {rate[k] / rate['extract']:>11.2f}")
    res = {
        "images": args.images, "backbone": args.backbone, "repeats": args.repeats, "threads": 1,
        "median_seconds": med, "images_per_second": rate,
        "ratio_to_extract": {k: rate[k] / rate["extract"] for k in rate}, "times": times,
    }  # fmt: skip
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
