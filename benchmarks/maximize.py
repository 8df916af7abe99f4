"""Benchmark: `usae maximize` optimisation steps/s vs a bare forward+backward of the same backbone.

Per backbone and dtype, both sides use the same full-size backbone (random init: no weights
needed) on the same number of crops at the backbone's input size:

- maximize: one `Maximizer.step()` (render the canvas from its Fourier phases, colour and
  sigmoid, random crops resized to the input size, noise, backbone forward on the store's
  grid, the concept's pre-activation through a USAE with m = 8 x width, backward to the
  phases, NAdam + schedule step);
- bare: the backbone's forward on a fixed batch of crops that requires grad, and backward of
  the tokens' mean to that batch (the least any gradient-based maximisation must do).

Single steps of the two are timed alternately (the order swapped every pair, after one
warm-up step each), `--repeats` per side. Reported (target >= 0.8): the ratio of median
steps/s from wall time and from process CPU time, and the median over pairs of adjacent steps
of their wall-time ratio (adjacent steps share the machine's load: steadiest on a shared machine).

    python benchmarks/maximize.py --backbones dinov2,vit --dtypes bf16 --repeats 9 --out benchmarks/maximize.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from usae.analysis.backbones import Target
from usae.analysis.maximize import MaximizeConfig
from usae.analysis.objective import Maximizer
from usae.pipeline.backbone import load_backbone
from usae.pipeline.registry import resolve
from usae.trainer.model import USAE, ModelSpec

from usae.runtime import torch_dtype

GRID = (14, 14)


def make_sae(width: int, k: int = 32) -> USAE:
    """A random-init USAE over one backbone, m = 8 x width concepts (the paper's ratio)."""
    torch.manual_seed(0)
    model = USAE(ModelSpec(("bb",), (width,), (0.0,), (1.0,), 8 * width, k)).eval()
    return model.requires_grad_(False)


class Timing(NamedTuple):
    wall_s: float
    cpu_s: float


def timed(fn) -> Timing:
    """Wall and process-CPU seconds of one call (CPU time is less sensitive to other processes)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return Timing(time.perf_counter() - w0, time.process_time() - c0)


def bench(name: str, dtype: str, args) -> dict:
    bb = load_backbone(resolve(name), random_init=True, seed=0, dtype=torch_dtype(dtype))
    cfg = MaximizeConfig(run=Path("."), out=Path("."), concepts=(0,), steps=1000, canvas=args.canvas,
                         crops=args.crops, seed=0, dtype=dtype, device="cpu")  # fmt: skip
    mx = Maximizer(make_sae(bb.spec.width), [Target(name, 0, bb)], 0, cfg, GRID)
    size = bb.spec.img_size
    crops = torch.rand(
        args.crops, 3, size, size, generator=torch.Generator().manual_seed(0)
    ).requires_grad_(True)

    def bare() -> None:
        crops.grad = None
        bb(crops, grid=GRID).patch_btd.float().mean().backward()

    mx.step(), bare()  # warm-up
    t_mx, t_bare = [], []
    for r in range(args.repeats):  # alternate single steps, swapping the order each time
        for fn, acc in ((mx.step, t_mx), (bare, t_bare))[:: 1 if r % 2 == 0 else -1]:
            acc.append(timed(fn))
    med = {side: [statistics.median(getattr(t, f) for t in ts) for f in Timing._fields]
           for side, ts in (("mx", t_mx), ("bare", t_bare))}  # fmt: skip
    # Adjacent steps see the same machine load: the median of per-pair ratios is the steadiest.
    pair = statistics.median(b.wall_s / m.wall_s for m, b in zip(t_mx, t_bare, strict=True))
    return {
        "backbone": name, "dtype": dtype, "crops": args.crops, "canvas": args.canvas,
        "maximize_steps_per_s": 1 / med["mx"][0], "bare_steps_per_s": 1 / med["bare"][0],
        "ratio": med["bare"][0] / med["mx"][0], "ratio_cpu": med["bare"][1] / med["mx"][1],
        "ratio_pairs": pair,
        "maximize": [t._asdict() for t in t_mx], "bare": [t._asdict() for t in t_bare],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="dinov2,vit", help="comma-separated registry names")
    ap.add_argument(
        "--dtypes", default="bf16", help="comma-separated: bf16 (what --dtype auto uses here), fp32"
    )
    ap.add_argument("--crops", type=int, default=6, help="crops per step (the maximize default)")
    ap.add_argument("--canvas", type=int, default=512, help="canvas side (the maximize default)")
    ap.add_argument(
        "--repeats", type=int, default=9, help="alternating single-step timings per side (median)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/maximize.json"))
    args = ap.parse_args()
    rows = [bench(b, d, args) for b in args.backbones.split(",") for d in args.dtypes.split(",")]
    print(f"{'backbone':10} {'dtype':5} {'maximize steps/s':>17} {'bare fwd+bwd/s':>15} "
          f"{'ratio':>6} {'ratio(cpu)':>10} {'ratio(pairs)':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['backbone']:10} {r['dtype']:5} {r['maximize_steps_per_s']:17.3f} "
              f"{r['bare_steps_per_s']:15.3f} {r['ratio']:6.3f} {r['ratio_cpu']:10.3f} {r['ratio_pairs']:12.3f}")  # fmt: skip
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "grid": list(GRID)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "env": info, "rows": rows},
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
