"""Planted stores (`usae synth`) x training recipes (`usae train --recipe ...`) -> planted recovery
per kind of concept, member-set accuracy and held-out R2 -> one table and a JSON file.

Every run is the real trainer (`run_train`) on a planted store, scored against the planted truth:
a planted concept is recovered when ONE learned concept's decoder rows reach cosine >= 0.9 with
its direction in EVERY model it lives in (`usae.trainer.truth.recovery`); the member set of each
learned concept comes from the analysis (`usae.analysis.membership.members_of`, the default
need rule, on the held-out pass, as `usae analyze` computes it; benchmarks/membership.py
compares it with the fit and gain rules), and a recovered concept's
member set is right when it equals the planted one. R2 is the run's held-out R2 (metrics.json).

Store kinds: groups of concepts shared by all, by some or by one model (M = 2, 3, 5, 8), the
harder variants (per-model gains x0.5-2, per-channel offsets, Zipf frequencies, anisotropic
noise), and `twins`: one planted model stored twice, so every concept is shared by definition
(firing entropy should be ~1, the two decoder rows of a concept at cosine ~1, cross R2 = self R2).
Widths, group sizes and seeds differ from the tests'.

    python benchmarks/recovery.py                                   # the full table (slow)
    python benchmarks/recovery.py --stores m3hard,twins --recipes fidelity@0,fidelity@0.3,fidelity@0.5
    python benchmarks/recovery.py --stores m3hard --recipes paper,fidelity
    python benchmarks/recovery.py --stores m3shuffle --recipes fidelity   # control: shared -> 0
    python benchmarks/recovery.py --stores m3 --recipes fidelity --steps 0  # control: untrained
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from usae.analysis import metrics as mx
from usae.analysis.membership import DEFAULT_RULE, members_of, twin_agreement
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer.model import load_run
from usae.trainer.synth import SynthConfig, run_synth
from usae.trainer.train import TrainConfig, run_train
from usae.trainer.truth import load_truth, recovery

from usae.runtime import heldout_images

RECIPES = {
    "paper": dict(recipe="paper"),
    "fidelity": dict(recipe="fidelity"),
    # the default with the token encoder start (the default before the dual start)
    "fidelity-token": dict(recipe="fidelity", encoder_start="token"),
    # measured with the token start, the default then (recovery_rowadamw.json, recovery_auxdead.json):
    # per-coordinate AdamW (before RowAdamW), RowAdamW, and AuxK over dead concepts
    "fidelity-adamw": dict(recipe="fidelity", optimizer="adamw", encoder_start="token"),
    "fidelity-rowadamw": dict(recipe="fidelity", optimizer="rowadamw", encoder_start="token"),
    "paper+auxdead": dict(recipe="paper", aux="dead"),
    "fidelity+auxdead": dict(recipe="fidelity", aux="dead", encoder_start="token"),
    # the default started at random unit rows (the recipe before the data-aligned start)
    "fidelity-unit": dict(recipe="fidelity", init="unit"),
    # and also without its code agreement, gains at the common rate (the recipe before all three)
    "fidelity-noagree": dict(recipe="fidelity", init="unit", agree_weight=0.0, gain_rate=1.0),
    **{
        f"fidelity@{t:g}": dict(recipe="fidelity", agree_start=t, encoder_start="token")
        for t in (0.0, 0.3, 0.5, 0.6)
    },  # the agreement's start (chosen with the token start)
}
# the default and its token start at other seeds (run-to-run spread of a recovery figure)
RECIPES.update(
    {
        f"{r}-seed{s}": dict(RECIPES[r], seed=s)
        for r in ("fidelity", "fidelity-token")
        for s in (1, 2)
    }
)
COMMON = dict(concepts=256, k=4, lr=3e-3, lr_min=1e-6, batch_tokens=1024, warmup_steps=100, holdout=0.1,
              dtype="fp32", device="cpu", log_every=1000, ckpt_every=0, seed=0, dead_window_tokens=40 * 1024)  # fmt: skip

BASE = dict(tokens=80_000, tokens_per_image=16, active=3.0, noise=0.05, save_codes=False)
HARD = dict(gain=(0.5, 2.0), channel_offset=1.0, zipf=0.7, noise_decay=0.5)
STORES = {
    "m2": dict(models=2, dims=(128, 176), groups="all:40,only:16", seed=13),
    "m3": dict(models=3, dims=(112, 160, 144), groups="all:32,0+1:12,1+2:12,only:12", seed=11),
    "m3hard": dict(models=3, dims=(112, 160, 144), groups="all:32,0+1:12,1+2:12,only:12", seed=12, **HARD),
    "m5": dict(models=5, dims=(96, 128, 160, 112, 144), groups="all:28,0+1:10,2+3+4:10,1+3:10,only:8", seed=15),
    "m8": dict(models=8, dims=(96, 112, 128, 144, 160, 104, 136, 120),
               groups="all:24,0+1:8,2+3+4:8,5+6:8,1+7:8,0+3+5+7:8,only:6", seed=17),
    "m3shuffle": dict(models=3, dims=(112, 160, 144), groups="all:32,0+1:12,1+2:12,only:12", seed=11,
                      shuffle_alignment=True),
    "twins": dict(models=1, dims=(144,), groups="all:48", seed=19, **HARD),
}  # fmt: skip


def make_store(name: str, root: Path) -> Path:
    path = root / f"{name}.zarr"
    if (path / "_usae" / "truth.safetensors").exists() or (path / "twins.json").exists():
        return path
    if name != "twins":
        run_synth(SynthConfig(store=path, **{**BASE, **STORES[name]}), progress=False)
        return path
    one = root / "twins-one.zarr"  # one planted model, then the same rows stored twice
    run_synth(SynthConfig(store=one, **{**BASE, **STORES[name]}), progress=False)
    src = Store.open(one)
    (k,) = src.backbones
    twin = Store.create(path, list(src.image_ids), [BackboneLayout("a", src.widths[k]), BackboneLayout("b", src.widths[k])],
                        grid=src.grid, chunk_images=src.chunk_images, source="synth",
                        fingerprint_of={"twins_of": src.attrs["fingerprint"]})  # fmt: skip
    for c in range(src.n_chunks):
        x = src.read_chunk(k, c)
        a, b = src.chunk_images_range(c)
        twin.write_chunk(c, {"a": x, "b": x}, src.valid[a:b])
    twin.finalize()
    (path / "twins.json").write_text(json.dumps({"of": str(one)}))
    return path


def evaluate(run: Path, store: Path, twins: bool) -> dict:
    model, _ = load_run(run)
    st = Store.open(store)
    keys = list(model.spec.backbones)
    held = st.valid & heldout_images(st, COMMON["holdout"])
    sums = mx.stream_sums(model, st, keys, held, tau=0.1)
    with torch.no_grad():
        gains = (
            np.stack([model.gain(j).double().numpy() for j in range(model.n_models)])
            if model.spec.gains
            else None
        )
    table = mx.concept_table(sums, gains)
    r2 = np.array(json.loads((run / "metrics.json").read_text())["r2_matrix"], dtype=float)
    off = r2[~np.eye(len(keys), dtype=bool)]
    out = {"self_r2": float(np.nanmean(np.diag(r2))), "cross_r2": float(np.nanmean(off)) if off.size else math.nan,
           "dead": float((sums.fires_mm.sum(0) == 0).mean())}  # fmt: skip
    members = members_of(DEFAULT_RULE, table, gains)  # the analysis's default rule
    if twins:
        with torch.no_grad():
            dec = [model.decoder_weight(j).double().numpy() for j in (0, 1)]
        out.update(twin_agreement(*dec, table.firing_entropy_m, table.dead_m, members, 0, 1))
        return out
    rec = recovery(model, load_truth(store), members_mk=members)
    out.update(universal=rec.kind_rate.get("universal", math.nan), subset=rec.kind_rate.get("subset", math.nan),
               specific=rec.kind_rate.get("specific", math.nan), membership=rec.membership_accuracy,
               groups=rec.group_rate)  # fmt: skip
    return out


def run_one(recipe: str, store: str, root: Path, steps: int) -> dict:
    path = make_store(store, root)
    run = root / "runs" / f"{recipe}_{store}_{steps}"
    t0, timed = time.perf_counter(), run / "bench_wall.json"
    if not (run / "metrics.json").exists():
        over = {**COMMON, **RECIPES[recipe]}
        if steps == 0:  # control: an untrained model (one step at lr 0)
            over.update(lr=0.0, lr_min=0.0)
        run_train(TrainConfig(store=str(path), out=str(run), steps=max(steps, 1), **over))
        timed.write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    # the training time of a run trained by an earlier invocation is kept beside it (NaN: unknown)
    wall = json.loads(timed.read_text())["wall_s"] if timed.exists() else math.nan
    res = evaluate(run, path, store == "twins")
    return {"recipe": recipe, "store": store, "steps": steps, "wall_s": wall, **res}


def _f(v) -> str:
    return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stores",
        default="m2,m3,m3hard,m5,m8,twins",
        help=f"comma-separated subset of {list(STORES)}",
    )
    ap.add_argument(
        "--recipes",
        default="paper,fidelity-noagree,fidelity-unit,fidelity",
        help=f"comma-separated subset of {list(RECIPES)}",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=3000,
        help="optimiser steps of 1024 tokens (0: untrained control)",
    )
    ap.add_argument(
        "--root", default="bench_out/recovery", help="planted stores and runs (reused when present)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/recovery.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'recipe':17} {'store':10} {'univ':>5} {'subset':>6} {'spec':>5} {'member':>6} {'twinFE':>6} "
          f"{'twinCos':>7} {'selfR2':>6} {'crossR2':>7} {'steps':>5} {'wall_s':>6}")  # fmt: skip
    for s in a.stores.split(","):
        for rc in a.recipes.split(","):
            r = run_one(rc, s, root, a.steps)
            rows.append(r)
            print(f"{rc:17} {s:10} {_f(r.get('universal'))} {_f(r.get('subset')):>6} {_f(r.get('specific'))} "
                  f"{_f(r.get('membership')):>6} {_f(r.get('fe_share')):>6} {_f(r.get('median_cos')):>7} "
                  f"{_f(r['self_r2']):>6} {_f(r['cross_r2']):>7} {r['steps']:5d} {'cached' if math.isnan(r['wall_s']) else format(r['wall_s'], '6.0f'):>6}", flush=True)  # fmt: skip
            Path(a.out).write_text(
                json.dumps({"common": COMMON, "rows": rows}, indent=1, default=float)
            )
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
