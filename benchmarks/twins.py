"""The demo's photos through one backbone stored twice (`dinov2` and `twin=dinov2`) -> what two
identical models must give: firing entropy near 1 for live concepts, the two decoder rows of a
concept at cosine near 1, and cross R2 equal to self R2 -> a table and a JSON file.

The data of the two twins are identical, so every concept is shared by definition; a recipe
that learns a concept twice (once per twin) or leaves one twin's decoder behind fails here.
Full-size backbones: real weights when they are in the local cache, else random init (said so).
With --transform rotate|affine the twin is the backbone's activations times a random map A
(`usae.trainer.synth.twin_store`, saved in the store's _usae/maps.safetensors): the same
information in another basis, so the twins no longer start equal and the check cannot pass by
symmetry; then each concept's first-twin row times A (renormalised) must match its second-twin
row (the mapped cosine).

    python benchmarks/twins.py                         # dinov2, 300 demo images, every recipe
    python benchmarks/twins.py --backbone vit --steps 600 --recipes fidelity
    python benchmarks/twins.py --recipes fidelity --transform rotate
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from usae.analysis.membership import twin_agreement
from usae.analysis.report import AnalyzeConfig, run_analyze
from usae.pipeline.demo_images import build_demo_images
from usae.pipeline.extract import ExtractConfig, run_extract
from usae.pipeline.hub import cached_weights
from usae.pipeline.registry import resolve
from usae.trainer.model import load_run
from usae.trainer.synth import load_maps, twin_store
from usae.trainer.train import TrainConfig, run_train

RECIPES = {
    "paper": dict(recipe="paper"),
    # the recipe before the code agreement, the gain rate and the data-aligned start
    "fidelity-noagree": dict(recipe="fidelity", init="unit", agree_weight=0.0, gain_rate=1.0),
    "fidelity-unit": dict(recipe="fidelity", init="unit"),  # before the data-aligned start
    "fidelity": dict(recipe="fidelity"),
    # the default with the token encoder start (the default before the dual start)
    "fidelity-token": dict(recipe="fidelity", encoder_start="token"),
    # measured with the token start, the default then (twins_*_rowadamw*.json):
    # per-concept second moments (RowAdamW): updates that do not depend on the basis
    "fidelity-rowadamw": dict(recipe="fidelity", optimizer="rowadamw", encoder_start="token"),
    # and encoders that read whitened inputs (affine maps then look like rotations to them)
    "fidelity-rowadamw-whiten": dict(
        recipe="fidelity", optimizer="rowadamw", whiten=True, encoder_start="token"
    ),
    # a shrunk whitening: weak directions amplified less (ridge 0.3 / 1 x the mean eigenvalue)
    **{
        f"fidelity-rowadamw-whiten{r:g}": dict(
            recipe="fidelity",
            optimizer="rowadamw",
            whiten=True,
            whiten_ridge=r,
            encoder_start="token",
        )
        for r in (0.3, 1.0)
    },
    "fidelity-adamw": dict(recipe="fidelity", optimizer="adamw", encoder_start="token"),
}


def twins_figures(run: Path, report: Path) -> dict:
    """Twin agreement of a run over the backbones (a, b) = the first two, from its report (with
    the mapped cosine when the store maps b from a)."""
    import pandas as pd

    model, cfg = load_run(run)
    maps, meta = load_maps(cfg["train"]["store"])
    b = model.spec.backbones[1]
    a_map = maps[b] if meta.get("of", {}).get(b) == model.spec.backbones[0] else None
    df = pd.read_parquet(report / "concepts.parquet")
    keys = model.spec.backbones
    members = np.stack([df[f"member_{k}"].to_numpy() for k in keys])
    with torch.no_grad():
        dec = [model.decoder_weight(j).double().numpy() for j in (0, 1)]
    out = twin_agreement(
        *dec, df["firing_entropy"].to_numpy(), df["dead"].to_numpy(), members, 0, 1, a_map
    )
    m = json.loads((report / "metrics.json").read_text())
    r2 = np.array(m["r2"], dtype=float)
    out.update(self_r2=float(np.mean(np.diag(r2))), cross_r2=float((r2[0, 1] + r2[1, 0]) / 2),
               duplicates=len(m["membership"]["duplicate_pairs"]))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument(
        "--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {list(RECIPES)}"
    )
    ap.add_argument("--transform", default="none", choices=("none", "rotate", "affine"))
    ap.add_argument("--root", default="bench_out/twins")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    tag = "" if a.transform == "none" else f"_{a.transform}"
    a.out = a.out or f"benchmarks/twins{tag}.json"
    torch.set_num_threads(1)
    root = Path(a.root)
    spec = resolve(a.backbone)
    hit = cached_weights(spec, verify=False)
    weights = ((spec.key, str(hit.path)), ("twin", str(hit.path))) if hit else ()
    print(
        f"{a.backbone}: {'pretrained weights from the cache' if hit else 'RANDOM-INIT (no cached weights)'}"
    )
    manifest = build_demo_images(root / "data", n=a.images, seed=0)
    store = root / "store.zarr"
    if a.transform == "none":
        run_extract(ExtractConfig(manifest=manifest, store=store, backbones=(a.backbone, f"twin={a.backbone}"),
                                  weights=weights, random_init=not hit, chunk_images=32, progress=False))  # fmt: skip
    else:
        one = root / "store-one.zarr"
        run_extract(ExtractConfig(manifest=manifest, store=one, backbones=(a.backbone,), weights=weights[:1],
                                  random_init=not hit, chunk_images=32, progress=False))  # fmt: skip
        store = twin_store(one, root / f"store{tag}.zarr", spec.key, transform=a.transform)
    rows = []
    for recipe in a.recipes.split(","):
        run, report = root / f"run_{recipe}{tag}", root / f"report_{recipe}{tag}"
        t0, cached = time.perf_counter(), (run / "metrics.json").exists()
        timed = run / "bench_wall.json"  # train + analyse time, kept for later invocations
        if not cached:
            run_train(TrainConfig(store=str(store), out=str(run), **RECIPES[recipe], concepts=1536, k=32, steps=a.steps,
                                  batch_tokens=2048, lr=1e-3, holdout=0.2, log_every=100, ckpt_every=0,
                                  warmup_steps=max(a.steps // 10, 1), buffer_chunks=2))  # fmt: skip
        run_analyze(
            AnalyzeConfig(run=str(run), store=str(store), out=str(report), top_concepts=0),
            progress=False,
        )
        if not cached:
            timed.write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
        wall = json.loads(timed.read_text())["wall_s"] if timed.exists() else None
        r = {"recipe": recipe, "transform": a.transform, "pretrained": bool(hit), "steps": a.steps, "wall_s": wall,
             **twins_figures(run, report)}  # fmt: skip
        rows.append(r)
        print(f"{recipe:16} live {r['live']:5d}  FE>=0.9 {r['fe_share']:.2f}  median twin cosine {r['median_cos']:.2f}  "
              f"mapped cosine >= 0.9 {r['mapped_cos_share']:.2f} (median {r['median_mapped_cos']:.2f})  "
              f"in both {r['both_share']:.2f}  duplicated pairs {r['duplicates']}  self R2 {r['self_r2']:.3f}  cross R2 {r['cross_r2']:.3f}", flush=True)  # fmt: skip
    Path(a.out).write_text(
        json.dumps(
            {"backbone": a.backbone, "images": a.images, "transform": a.transform, "rows": rows},
            indent=1,
        )
    )
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
