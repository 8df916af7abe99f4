"""int8 store vs float16 on the same planted data: bytes, loader rows/s, held-out R2 and planted
recovery -> a table and a JSON file.

One `usae synth` store (float16) is converted chunk by chunk to int8 (`convert_store`:
per-chunk, per-channel absmax scales, the float16 statistics carried over); the same USAE
(paper mode, same seed) is trained on each; R2 is the trainer's held-out R2, and the int8 run
is also evaluated on the float16 store's held-out rows ("R2 on fp16 rows"). The loader rates
are host batches from the page cache, float16 and int8 side by side, median of --repeats.

    python benchmarks/int8.py                     # ~2 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from usae.pipeline.store import Store, convert_store
from usae.trainer.inputs import image_masks
from usae.trainer.loader import ChunkLoader
from usae.trainer.model import load_run
from usae.trainer.synth import SynthConfig, run_synth
from usae.trainer.train import TrainConfig, evaluate, run_train
from usae.trainer.truth import load_truth, recovery


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "backbones").rglob("*") if f.is_file())


def loader_rows_per_s(path: Path, batch_tokens: int, batches: int) -> float:
    st = Store.open(path)
    with ChunkLoader(st, st.backbones, batch_tokens, seed=0) as ld:
        it = iter(ld)
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            del b
        return batches * batch_tokens / (time.perf_counter() - t0)


def train(store: Path, out: Path, a) -> dict:
    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        concepts=a.concepts,
        k=int(round(a.active)),
        lr=a.lr,
        lr_min=a.lr / 10,
        batch_tokens=a.batch_tokens,
        steps=a.steps,
        warmup_steps=100,
        holdout=0.1,
        dtype="fp32",
        device="cpu",
        log_every=500,
        ckpt_every=0,
        seed=a.seed,
    )
    t0 = time.perf_counter()
    res = run_train(cfg)
    model, _ = load_run(res.run_dir)
    rec = recovery(model, load_truth(store))
    r2 = np.array(
        [[np.nan if v is None else v for v in row] for row in res.metrics["r2_matrix"]], float
    )
    return {
        "train_s": time.perf_counter() - t0,
        "universal_rate": rec.rate,
        "mean_best_cos": rec.mean_cos,
        "specific_rate": rec.specific_rate,
        "self_r2": float(np.nanmean(np.diag(r2))),
        "cross_r2": float(np.nanmean(r2[~np.eye(len(r2), dtype=bool)])),
        "r2_matrix": r2.tolist(),
        "model": model,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="48,64,64")
    ap.add_argument("--universal", type=int, default=24)
    ap.add_argument("--specific", type=int, default=12)
    ap.add_argument("--active", type=float, default=4.0)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--concepts", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/int8.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dims = tuple(int(d) for d in a.dims.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "f16.zarr"
        run_synth(
            SynthConfig(
                store=f16,
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
        q8 = convert_store(f16, Path(tmp) / "int8.zarr").path
        s16, s8 = Store.open(f16), Store.open(q8)
        assert all(s16.stats(k) == s8.stats(k) for k in s16.backbones)
        rates: dict[str, list[float]] = {"float16": [], "int8": []}
        for _ in range(a.repeats):  # side by side
            for name, p in (("float16", f16), ("int8", q8)):
                rates[name].append(loader_rows_per_s(p, a.batch_tokens, 40))
        runs = {
            name: train(p, Path(tmp) / f"run_{name}", a)
            for name, p in (("float16", f16), ("int8", q8))
        }
        _, held = image_masks(s16, 0.1)
        ev = evaluate(runs["int8"].pop("model"), s16, s16.backbones, held, a.batch_tokens)
        runs["float16"].pop("model")
        runs["int8"]["self_r2_on_fp16_rows"] = float(np.nanmean(np.diag(ev.r2_ij)))
        rows = {
            name: {
                "bytes": store_bytes(p),
                "loader_rows_per_s": statistics.median(rates[name]),
                "loader_rows_per_s_all": rates[name],
                **runs[name],
            }
            for name, p in (("float16", f16), ("int8", q8))
        }
    d = {
        k: rows["int8"][k] - rows["float16"][k]
        for k in ("self_r2", "cross_r2", "universal_rate", "mean_best_cos")
    }
    print(
        f"\nint8 vs float16 store: dims {a.dims}, {a.tokens} tokens, m={a.concepts}, {a.steps} steps x "
        f"{a.batch_tokens} tokens, paper mode, fp32 training"
    )
    print(
        f"{'store':8} {'bytes':>10} {'rows/s':>9} {'self R2':>8} {'cross R2':>8} {'universal':>9} {'mean cos':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:8} {r['bytes']:10d} {r['loader_rows_per_s']:9.0f} {r['self_r2']:8.4f} {r['cross_r2']:8.4f} "
            f"{r['universal_rate']:9.2f} {r['mean_best_cos']:8.4f}"
        )
    print(
        "int8 - float16: "
        + ", ".join(f"{k} {v:+.4f}" for k, v in d.items())
        + f"; int8 model on fp16 held-out rows: self R2 {rows['int8']['self_r2_on_fp16_rows']:.4f}; "
        f"bytes x{rows['int8']['bytes'] / rows['float16']['bytes']:.3f}, rows/s x"
        f"{rows['int8']['loader_rows_per_s'] / rows['float16']['loader_rows_per_s']:.2f}"
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows, "int8_minus_fp16": d}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
