"""The twins check on real features: the demo's photos through one tiny random-init backbone
stored twice. Identical models must give identical concepts: live concepts fire evenly from both
twins (firing entropy >= 0.9), each concept's two decoder rows at cosine ~1, every live concept a
member of both twins, and cross R2 equal to self R2.
(benchmarks/twins.py runs the same on the full-size backbones.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def twin_store(tmp_path_factory):
    from usae.pipeline.demo_images import build_demo_images
    from usae.pipeline.extract import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("twins")
    manifest = build_demo_images(root / "data", n=48, seed=0)
    store = root / "s.zarr"
    run_extract(ExtractConfig(manifest=manifest, store=store, backbones=("dinov2", "twin=dinov2"), tiny=True,
                              random_init=True, chunk_images=16, progress=False))  # fmt: skip
    return store


def twin_figures(store: Path, name: str, **over) -> dict:
    """Train the twins (the demo's settings scaled down) and analyse -> `twins_figures`."""
    from usae.analysis.report import AnalyzeConfig, run_analyze
    from usae.trainer.train import TrainConfig, run_train

    torch.set_num_threads(1)
    run, report = store.parent / f"run_{name}", store.parent / f"report_{name}"
    run_train(TrainConfig(store=str(store), out=str(run), concepts=128, k=8, steps=1200, batch_tokens=512, lr=3e-3,
                          warmup_steps=40, holdout=0.2, dtype="fp32", device="cpu", log_every=200, ckpt_every=0,
                          **over))  # fmt: skip
    run_analyze(
        AnalyzeConfig(run=str(run), store=str(store), out=str(report), top_concepts=0),
        progress=False,
    )
    spec = importlib.util.spec_from_file_location(
        "twins_bench", Path(__file__).parents[1] / "benchmarks" / "twins.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.twins_figures(run, report)


def test_identical_backbones_give_identical_concepts(twin_store):
    """The default recipe."""
    got = twin_figures(twin_store, "default")
    assert got["live"] > 20, got
    assert got["fe_share"] >= 0.9, got
    assert got["median_cos"] >= 0.9, got
    assert got["both_share"] >= 0.9, got
    assert got["duplicates"] == 0, got  # no concept learned twice, once per twin
    assert abs(got["cross_r2"] - got["self_r2"]) < 0.01, got


def test_without_code_agreement_twins_fire_apart(twin_store):
    """The control: the same recipe without its code agreement learns the same directions but
    fires many of them from one twin only, so the firing-entropy check above can fail."""
    got = twin_figures(twin_store, "noagree", agree_weight=0.0)
    assert got["median_cos"] >= 0.9, got
    assert got["fe_share"] < 0.8, got
