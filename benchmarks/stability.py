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
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
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


def compare_pair(name: str, sa: int, sb: int, root: Path) -> dict:
    """`usae compare` of two seeds (member sets from a store pass over the held-out images);
    on a planted store also the planted concepts both recovered and matched to each other."""
    from usae.analysis.compare import CompareConfig, recovered_agreement, run_compare
    from usae.trainer.model import load_run
    from usae.trainer.truth import load_truth, recovery

    store, run_a, _ = train_seed(name, sa, root)
    _, run_b, _ = train_seed(name, sb, root)
    out = root / "compare" / f"{name}_{sa}_{sb}"
    res = run_compare(CompareConfig(run_a=str(run_a), run_b=str(run_b), out=str(out)))
    s = res.summary
    row = {"store": name, "seeds": [sa, sb], "per_model": s["per_model"], "joint": s["joint"],
           "assignment_seconds": s["assignment_seconds"]}  # fmt: skip
    if name != "demo-tiny":
        truth = load_truth(store)
        rec = [recovery(load_run(r)[0], truth) for r in (run_a, run_b)]
        row["planted"] = recovered_agreement(res.pairs["concept_b"].to_numpy(), *rec)
    return row


def _f(v) -> str:
    return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"


def print_row(r: dict) -> None:
    a = r["joint"]["a"]
    pl = r.get("planted")
    extra = (
        f"; planted recovered by both {pl['recovered_both']}/{pl['planted']}, matched to each other {pl['share']:.2f}"
        if pl
        else ""
    )
    print(f"{r['store']} seeds {r['seeds']}: live {a['live']} (dead {a['dead']}), joint matched "
          f"{a['all_live']['matched_0.7']:.2f} / {a['all_live']['matched_0.9']:.2f} at 0.7 / 0.9{extra}", flush=True)  # fmt: skip


def _mean(rows: list[dict], get) -> tuple[float, int]:
    """Mean over seed pairs and both sides (A's concepts, B's) of a share; n: concepts per side."""
    vals, ns = [], []
    for r in rows:
        for side in ("a", "b"):
            got = get(r["joint"][side])
            if got is not None:
                vals += [got[f"matched_{t}"] for t in ("0.7", "0.9")]
                ns.append(got["n"])
    if not vals:
        return (math.nan, math.nan), 0
    v = np.array(vals, dtype=float).reshape(-1, 2)
    return (float(v[:, 0].mean()), float(v[:, 1].mean())), int(round(np.mean(ns)))


def print_table(rows: list[dict]) -> None:
    """Share matched jointly at 0.7 / 0.9, mean over the seed pairs and both runs of each pair."""
    print(f"\n{'store':10} {'concepts':22} {'n':>5} {'@0.7':>5} {'@0.9':>5}")
    for name in dict.fromkeys(r["store"] for r in rows):
        rs = [r for r in rows if r["store"] == name]
        labels = list(
            dict.fromkeys(
                lab for r in rs for side in "ab" for lab in r["joint"][side]["by_members"]
            )
        )
        groups = [("every live concept", lambda d: d["all_live"])]
        groups += [
            (f"lives in {lab}", lambda d, lab=lab: d["by_members"].get(lab)) for lab in labels
        ]
        groups += [(f"importance decile {q}", lambda d, q=q: next((x for x in d["by_importance_decile"]
                                                                  if x["decile"] == q), None)) for q in range(1, 11)]  # fmt: skip
        for title, get in groups:
            (s7, s9), n = _mean(rs, get)
            print(f"{name:10} {title:22} {n:5d} {_f(s7)} {_f(s9)}")
        for k in rs[0]["per_model"]:
            v7 = np.mean([r["per_model"][k]["matched_0.7"] for r in rs])
            v9 = np.mean([r["per_model"][k]["matched_0.9"] for r in rs])
            print(f"{name:10} {k + ' alone':22} {rs[0]['per_model'][k]['n']:5d} {_f(v7)} {_f(v9)}")
        pl = [r["planted"] for r in rs if "planted" in r]
        if pl:
            print(f"{name:10} planted, both recovered: matched to each other {np.mean([p['share'] for p in pl]):.2f} "
                  f"(of {np.mean([p['recovered_both'] for p in pl]):.1f} / {pl[0]['planted']} per pair)")  # fmt: skip


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
    rows = []
    for name in a.stores.split(","):
        for sa, sb in itertools.combinations(seeds, 2):
            rows.append(compare_pair(name, sa, sb, root))
            print_row(rows[-1])
    Path(a.out).write_text(json.dumps({"demo_train": DEMO_TRAIN, "demo_images": DEMO_IMAGES, "rows": rows},
                                      indent=1, default=float))  # fmt: skip
    print_table(rows)
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
