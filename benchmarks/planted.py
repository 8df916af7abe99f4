"""Planted-concept recovery at a larger scale: one `usae synth` store -> USAE runs with the paper
update, the reference update, independent SAEs, and a TopK k well above the planted number of
active concepts -> a table (recovery, best cosines, self/cross R2) and a JSON file.

Recovery (usae.trainer.truth.recovery): a planted universal concept is recovered when ONE learned
concept's decoder rows match its direction in every model (cosine averaged over models >= 0.9).
"per-model" counts (concept, model) pairs matched by any learned concept of that model alone,
which independent SAEs can reach without sharing concepts. R2 is the trainer's held-out R2
(BatchNorm in eval mode): "self" = mean of the diagonal, "cross" = mean off the diagonal.

    python benchmarks/planted.py                  # ~2 minutes on 2 idle cores, 4 runs
    python benchmarks/planted.py --steps 6000 --tokens 400000 --variants paper,reference
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from usae.trainer.model import load_run
from usae.trainer.synth import SynthConfig, run_synth
from usae.trainer.train import TrainConfig, run_train
from usae.trainer.truth import load_truth, recovery

# name -> TrainConfig overrides; "k" None = the planted number of active concepts. The paper's
# recipe throughout: this benchmark compares the update modes (benchmarks/recovery.py compares
# the recipes)
VARIANTS = {
    "paper": dict(mode="paper", recipe="paper"),
    "reference": dict(mode="reference", recipe="paper"),
    "independent": dict(mode="independent", recipe="paper"),
    "paper-k4x": dict(mode="paper", recipe="paper", k_mult=4),
}


def run_variant(name: str, a, store: Path, out: Path) -> dict:
    over = dict(VARIANTS[name])
    k = int(round(a.active)) * over.pop("k_mult", 1)
    cfg = TrainConfig(
        store=str(store),
        out=str(out / name),
        concepts=a.concepts,
        k=k,
        lr=a.lr,
        lr_min=a.lr / 10,
        batch_tokens=a.batch_tokens,
        steps=a.steps,
        warmup_steps=100,
        holdout=0.1,
        dtype=a.dtype,
        device="cpu",
        log_every=500,
        ckpt_every=0,
        seed=a.seed,
        **over,
    )
    t0 = time.perf_counter()
    res = run_train(cfg)
    dt = time.perf_counter() - t0
    model, _ = load_run(res.run_dir)
    rec = recovery(model, load_truth(store))
    r2 = np.array(
        [[np.nan if v is None else v for v in row] for row in res.metrics["r2_matrix"]], float
    )
    off = r2[~np.eye(len(r2), dtype=bool)]
    return {
        "variant": name,
        "k": k,
        "train_s": dt,
        "universal_rate": rec.rate,
        "mean_best_cos": rec.mean_cos,
        "min_best_cos": float(rec.cos_u.min()),
        "per_model_rate": float((rec.per_model_cos_ui >= rec.threshold).mean()),
        "specific_rate": rec.specific_rate,
        "self_r2": float(np.nanmean(np.diag(r2))),
        "cross_r2": float(np.nanmean(off)) if np.isfinite(off).any() else math.nan,
        "r2_matrix": r2.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="48,64,64", help="model widths")
    ap.add_argument("--universal", type=int, default=24)
    ap.add_argument("--specific", type=int, default=12)
    ap.add_argument(
        "--active", type=float, default=4.0, help="planted active concepts per token (= k)"
    )
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--concepts", type=int, default=128, help="learned concepts m")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="benchmarks/planted.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dims = tuple(int(d) for d in a.dims.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "planted.zarr"
        run_synth(
            SynthConfig(
                store=store,
                models=len(dims),
                dims=dims,
                universal=a.universal,
                specific=a.specific,
                tokens=a.tokens,
                active=a.active,
                seed=a.seed,
                save_codes=False,
            ),
            progress=False,
        )
        for name in a.variants.split(","):
            rows.append(run_variant(name.strip(), a, store, Path(tmp)))
            print_row(rows[-1], header=len(rows) == 1, a=a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"written {out}")


def print_row(r: dict, header: bool, a) -> None:
    if header:
        print(
            f"\nplanted recovery: dims {a.dims}, U={a.universal}, S={a.specific}/model, active {a.active}, "
            f"{a.tokens} tokens, m={a.concepts}, {a.steps} steps x {a.batch_tokens} tokens, lr {a.lr}"
        )
        print(
            f"{'variant':12} {'k':>3} {'universal':>9} {'mean cos':>8} {'min cos':>7} {'per-model':>9} "
            f"{'specific':>8} {'self R2':>7} {'cross R2':>8} {'train s':>7}"
        )
    print(
        f"{r['variant']:12} {r['k']:3d} {r['universal_rate']:9.2f} {r['mean_best_cos']:8.3f} "
        f"{r['min_best_cos']:7.3f} {r['per_model_rate']:9.2f} {r['specific_rate']:8.2f} "
        f"{r['self_r2']:7.3f} {r['cross_r2']:8.3f} {r['train_s']:7.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
