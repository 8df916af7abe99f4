"""The data-aligned start (`--init data`): `seed_tokens` draws aligned training tokens from the
store, `USAE.seed_from_tokens` starts each concept at one of them, and the trainer wires both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst
from test_train import make_store, small_cfg, weights
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer.config import TrainConfig
from usae.trainer.inputs import (
    SEED_COSINE,
    image_masks,
    model_spec,
    open_store,
    seed_tokens,
    spread_out,
    start_bias,
)
from usae.trainer.model import STD_EPS, USAE
from usae.trainer.train import run_train


def slow_tokens(st: Store, keys, spec, images: np.ndarray) -> list[np.ndarray]:
    """Every token of the given images, per backbone, as the encoder reads it (float64)."""
    rows = np.repeat(images, st.tokens_per_image)
    out = []
    for j, k in enumerate(keys):
        x = np.concatenate([st.read_chunk(k, c) for c in range(st.n_chunks)]).astype(np.float64)
        x = (x[rows] - spec.mu[j]) / (spec.sigma[j] + STD_EPS)
        if spec.decoder_bias:
            x = x - mean_of(st, k, spec, j)
        out.append(x)
    return out


def mean_of(st: Store, key: str, spec, j: int) -> np.ndarray:
    return (np.asarray(st.stats(key)["mean"], np.float64) - spec.mu[j]) / (spec.sigma[j] + STD_EPS)


def match(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index in `table` of each row of `rows` (-1 when none is within 1e-5)."""
    dist = np.abs(rows[:, None, :] - table[None, :, :]).max(-1)
    best = dist.argmin(1)
    return np.where(dist[np.arange(len(rows)), best] < 1e-5, best, -1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "s.zarr", n=24, t=8, chunk=4)


def started(st, keys, cfg) -> USAE:
    """A model as `usae train` starts it before the seeds: its decoder bias at the channel means."""
    model = USAE(model_spec(st, keys, cfg))
    start_bias(model, st, keys)
    return model


def _opened(store, out, **kw):
    cfg = small_cfg(store, out, init="data", **kw).resolved()
    st, keys = open_store(cfg)
    train, held = image_masks(st, cfg.holdout)
    return cfg, st, keys, started(st, keys, cfg), train, held


@pytest.mark.parametrize("recipe", ["fidelity", "paper"])
def test_seed_tokens_are_training_tokens_aligned_across_backbones(store, tmp_path, recipe):
    cfg, st, keys, model, train, held = _opened(store, tmp_path, recipe=recipe, concepts=40)
    rows = [t.double().numpy() for t in seed_tokens(st, keys, model, train, seed=3)]
    spec = model.spec
    assert len(rows[0]) == 40 and spec.decoder_bias == (recipe == "fidelity")
    ref = slow_tokens(st, keys, spec, train)
    at = [match(r, t) for r, t in zip(rows, ref, strict=True)]
    assert (at[0] >= 0).all() and len(set(at[0].tolist())) == 40  # distinct training tokens
    assert (at[0] == at[1]).all()  # the same token in every backbone
    assert (match(rows[0], slow_tokens(st, keys, spec, held)[0]) == -1).all()  # never held out


def slow_spread(z: np.ndarray, cosine: float, limit: int) -> list[int]:
    kept: list[int] = []
    for a in range(len(z)):
        if len(kept) < limit and all(float(z[a] @ z[b]) < cosine for b in kept):
            kept.append(a)
    return kept


@settings(max_examples=30, deadline=None)
@given(n=hst.integers(1, 300), d=hst.integers(2, 6), cosine=hst.floats(0.3, 0.99),
       limit=hst.integers(1, 300), block=hst.sampled_from([1, 7, 64]), seed=hst.integers(0, 99))  # fmt: skip
def test_spread_out_matches_the_one_by_one_greedy(n, d, cosine, limit, block, seed):
    z = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 0.5, dim=1)
    got = spread_out(z, cosine, limit=limit, block=block)
    assert got.tolist() == slow_spread(z.numpy(), cosine, limit)


def test_seeds_are_spread_out_and_the_rest_were_too_close(store, tmp_path):
    """The seeds start with tokens pairwise below SEED_COSINE (mean over the backbones); every
    later one is closer than that to one of them."""
    cfg, st, keys, model, train, _ = _opened(store, tmp_path, concepts=60)
    rows = seed_tokens(st, keys, model, train, seed=0)
    u = [F.normalize(t.double(), dim=1).numpy() for t in rows]
    sim = sum(a @ a.T for a in u) / len(u)  # mean cosine over the backbones
    np.fill_diagonal(sim, -1)
    n = next((c for c in range(len(sim)) if sim[c, :c].max(initial=-1) >= SEED_COSINE), len(sim))
    assert 5 < n < 60 == len(sim)  # both kinds occur on this store
    assert (sim[:n, :n] < SEED_COSINE).all()
    assert (sim[n:, :n].max(1) >= SEED_COSINE).all()


def test_seed_tokens_follow_the_seed(store, tmp_path):
    cfg, st, keys, model, train, _ = _opened(store, tmp_path)
    a, b, c = (seed_tokens(st, keys, model, train, seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_more_concepts_than_tokens_keeps_the_rest_random(store, tmp_path):
    cfg, st, keys, model, train, _ = _opened(store, tmp_path, concepts=500)
    rows = seed_tokens(st, keys, model, train, seed=0)
    n = int(train.sum()) * st.tokens_per_image
    assert len(rows[0]) == n < 500
    before = [d.detach().clone() for d in model.decoders]
    model.seed_from_tokens(rows)
    for j, r in enumerate(rows):
        assert torch.allclose(model.decoders[j][:n], F.normalize(r, dim=1))
        assert torch.equal(model.decoders[j][n:], before[j][n:])
        assert torch.equal(model.encoders[j].bias[:n], torch.zeros(n))


def test_each_seeded_concept_responds_most_to_its_own_token(store, tmp_path):
    cfg, st, keys, model, train, _ = _opened(store, tmp_path, concepts=40)
    rows = seed_tokens(st, keys, model, train, seed=0)
    model.seed_from_tokens(rows)
    for j, r in enumerate(rows):
        lin = model.encoders[j](r)  # before BatchNorm: |x_c| cos(x_c, row_c')
        assert (lin.argmax(1) == torch.arange(len(r))).all()


def write_twins(path: Path, n=16, t=8, width=6, seed=0) -> Path:
    """A store holding one backbone's tokens twice (as `a` and `b`)."""
    st = Store.create(path, [f"img{i}" for i in range(n)],
                      [BackboneLayout("a", width), BackboneLayout("b", width)], grid=(2, t // 2),
                      chunk_images=4, source="synth", fingerprint_of={"twins": seed})  # fmt: skip
    rng = np.random.default_rng(seed)
    for c in range(st.n_chunks):
        x = 1.0 + rng.normal(size=(4 * t, width))
        st.write_chunk(c, {"a": x, "b": x}, np.ones(4, bool))
    st.finalize()
    return path


def test_twins_start_identical_and_the_run_starts_at_the_seed(tmp_path):
    """A run with --init data at lr 0 keeps its start: the seed rows, identical in the twins."""
    path = write_twins(tmp_path / "t.zarr")
    cfg = small_cfg(path, tmp_path / "run", init="data", steps=1, lr=0.0, lr_min=0.0, concepts=40)
    run_train(cfg)
    w = weights(tmp_path / "run")
    for name in ("decoders.{}", "encoders.{}.weight", "encoders.{}.bias"):
        assert torch.equal(w[name.format(0)], w[name.format(1)]), name
    st, keys = open_store(cfg)
    rows = seed_tokens(
        st, keys, started(st, keys, cfg.resolved()), image_masks(st, cfg.holdout)[0], cfg.seed
    )
    assert torch.allclose(
        F.normalize(w["decoders.0"], dim=1), F.normalize(rows[0], dim=1), atol=1e-6
    )
    assert torch.equal(w["encoders.0.bias"], torch.zeros(40))


def test_config_init_resolves_to_the_recipe_and_old_runs_keep_theirs():
    assert TrainConfig(recipe="paper").resolved().init == "randn"
    assert TrainConfig(recipe="paper", init="data").resolved().init == "data"
    assert TrainConfig.from_dict({"recipe": "fidelity"}).init == "unit"
    assert TrainConfig.from_dict({}).init == "randn"
    with pytest.raises(ValueError, match="init must be"):
        TrainConfig(init="zeros")  # type: ignore[arg-type]
