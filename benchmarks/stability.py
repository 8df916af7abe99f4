"""Seeds of one recipe on one store -> do the seeds learn the same concepts? (`usae compare`)

Trains the default recipe (`--recipe fidelity`) with several seeds on two stores, compares every
pair of seeds (`usae.analysis.compare`: Hungarian matching of decoder rows, per model and
jointly) and prints the share of concepts matched at cosine >= 0.7 and >= 0.9, by member set
and by importance decile, with a JSON file beside this script:

- `m3hard`: the planted store of benchmarks/recovery.py (its store definition and training
  settings, reused), where a seed pair is also scored on the planted truth: of the planted
  concepts recovered by both runs (`usae.trainer.truth.recovery`), the share whose recovered
  learned concepts are matched TO EACH OTHER by the comparison;
- `demo-tiny`: real features of the demo's photos (96 images) through tiny random-init DINOv2,
  SigLIP and ViT (2 blocks of width 64 each), m = 256, k = 8, 1500 steps of 512 tokens.

    python benchmarks/stability.py                      # both stores, seeds 0,1,2
    python benchmarks/stability.py --stores m3hard --seeds 0,1
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _recovery_bench():
    """benchmarks/recovery.py as a module: its store definitions and training settings."""
    spec = importlib.util.spec_from_file_location("recovery_bench", HERE / "recovery.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DEMO_TRAIN = dict(concepts=256, k=8, steps=1500, batch_tokens=512, lr=3e-3, warmup_steps=50, holdout=0.2,
                  dtype="fp32", device="cpu", log_every=500, ckpt_every=0, buffer_chunks=2)  # fmt: skip
DEMO_IMAGES = 96


def demo_store(root: Path) -> Path:
    """The demo's photos through tiny random-init dinov2, siglip, vit (extracted once)."""
    from usae.pipeline.demo_images import build_demo_images
    from usae.pipeline.extract import ExtractConfig, run_extract

    store = root / "demo-tiny.zarr"
    if not (store / "zarr.json").exists():
        manifest = build_demo_images(root / "demo-data", n=DEMO_IMAGES, seed=0, show_progress=False)
        run_extract(ExtractConfig(manifest=manifest, store=store, backbones=("dinov2", "siglip", "vit"),
                                  tiny=True, random_init=True, chunk_images=16, progress=False))  # fmt: skip
    return store


def train_seed(store_name: str, seed: int, root: Path) -> tuple[Path, Path, float]:
    """(store, run, training seconds; NaN when trained by an earlier invocation)."""
    from usae.trainer.train import TrainConfig, run_train

    rb = _recovery_bench()
    if store_name == "demo-tiny":
        store, over = demo_store(root), DEMO_TRAIN
    else:
        store = rb.make_store(store_name, root)
        over = {**rb.COMMON, **rb.RECIPES["fidelity"], "steps": 3000}
    run = root / "runs" / f"{store_name}_seed{seed}"
    wall = math.nan
    if not (run / "metrics.json").exists():
        t0 = time.perf_counter()
        run_train(TrainConfig(store=str(store), out=str(run), **{**over, "seed": seed}))
        wall = time.perf_counter() - t0
    return store, run, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default="m3hard,demo-tiny")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", default="bench_out/stability")
    ap.add_argument("--out", default=str(HERE / "stability.json"))
    ap.add_argument("--train-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    for name in a.stores.split(","):
        for s in seeds:
            _, run, wall = train_seed(name, s, root)
            print(
                f"{name} seed {s}: {run} ({'cached' if math.isnan(wall) else f'{wall:.0f} s'})",
                flush=True,
            )
    if a.train_only:
        return


if __name__ == "__main__":
    main()
