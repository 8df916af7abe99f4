"""The streaming reconstruction routine (usae.trainer.evaluate) against a slow dense float64 version."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics import dense_reference, random_run
from usae.pipeline.store import Store
from usae.trainer.evaluate import stream_reconstruction
from usae.trainer.model import USAE, load_run


def dense_reconstruction(model: USAE, store: Store, image_mask: np.ndarray) -> dict:
    """Slow, obvious: the dense float64 reference of the analysis tests (every selected row in
    memory, dense codes, the method's formulas in numpy); with tau = 0 its fire counts say which
    concepts ever had a nonzero code."""
    ref = dense_reference(model, store, image_mask, tau=0.0, g=1)
    alive = ref["fires"].sum(0) > 0
    return {**ref, "alive": alive, "dead": 1 - alive.mean()}


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("batch_tokens", [3, 1000])
def test_stream_reconstruction_equals_dense_reference(tmp_path, independent, batch_tokens):
    store, run = random_run(tmp_path, independent=independent, seed=5 + independent, m=40, k=2)
    mask = np.arange(store.n_images) % 3 != 0
    model, _ = load_run(run)
    got = stream_reconstruction(model, store, list(model.spec.backbones), mask, batch_tokens=batch_tokens,
                                dtype=torch.float64)  # fmt: skip
    ref = dense_reconstruction(load_run(run)[0], store, mask)
    rec = got.reconstruction
    assert got.n_tokens == ref["n"]
    for a, b in [
        (rec.r2, ref["r2"]),
        (rec.r2_channel, ref["r2c"]),
        (rec.mse, ref["mse"]),
        (rec.l0, ref["l0"]),
    ]:
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(got.alive_m, ref["alive"])
    assert got.dead_share == pytest.approx(ref["dead"]) and 0 < got.dead_share < 1  # not vacuous
    if independent:
        assert np.isnan(rec.r2[0, 1]) and np.isfinite(rec.r2[1, 1])


def test_float32_model_is_used_in_place_and_left_as_it_was(tmp_path):
    """The trainer's case: a float32 model in training mode is evaluated in eval mode (BatchNorm
    running statistics) and handed back in training mode, with unchanged parameters."""
    store, run = random_run(tmp_path, seed=2)
    model, _ = load_run(run)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = np.ones(store.n_images, bool)
    got = stream_reconstruction(model, store, list(model.spec.backbones), mask, batch_tokens=7)
    assert model.training and next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # BN running stats untouched
    ref = dense_reconstruction(load_run(run)[0], store, mask)
    np.testing.assert_allclose(got.reconstruction.r2, ref["r2"], rtol=1e-4, atol=1e-5)
    # another dtype works on a converted copy: the caller's model keeps its dtype
    stream_reconstruction(
        model, store, list(model.spec.backbones), mask, batch_tokens=7, dtype=torch.float64
    )
    assert next(model.parameters()).dtype == torch.float32 and model.mu.dtype == torch.float32


def test_no_image_selected_gives_nan(tmp_path):
    store, run = random_run(tmp_path, seed=1)
    model, _ = load_run(run)
    got = stream_reconstruction(
        model, store, list(model.spec.backbones), np.zeros(store.n_images, bool), batch_tokens=8
    )
    assert (
        got.n_tokens == 0
        and np.isnan(got.reconstruction.r2).all()
        and np.isnan(got.reconstruction.l0).all()
    )
    assert np.isnan(got.dead_share)
