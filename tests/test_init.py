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
    DUAL_RIDGE,
    SEED_COSINE,
    image_masks,
    inverse_second_moment,
    model_spec,
    open_store,
    seed_start,
    seed_tokens,
    spread_out,
    start_bias,
    whitening_matrix,
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
    cfg, st, keys, model, train, _ = _opened(store, tmp_path, concepts=40, encoder_start="token")
    rows = seed_tokens(st, keys, model, train, seed=0)
    model.seed_from_tokens(rows)
    for j, r in enumerate(rows):
        lin = model.encoders[j](r)  # before BatchNorm: |x_c| cos(x_c, row_c')
        assert (lin.argmax(1) == torch.arange(len(r))).all()


def test_dual_start_is_the_seed_token_through_the_inverse_second_moment(store, tmp_path):
    """encoder_start dual: the metric is (C + DUAL_RIDGE mean(eig C) I)^-1 of the seed tokens (a
    slow numpy reference), the encoder row is the token through it, scaled so that its
    pre-activation on its own token is sqrt(x_c S x_c) times rms|x| / sqrt(d), each seeded concept
    responds most to its own token by cosine in that metric, and without the ridge the rows are
    the least-squares inverse of the seed dictionary (codes x S X^T / n rebuild it)."""
    cfg, st, keys, model, train, _ = _opened(store, tmp_path, concepts=40, encoder_start="dual")
    assert cfg.encoder_start == "dual"
    rows, metrics = seed_start(st, keys, model, train, 0, "dual")
    assert all(
        torch.equal(a, b) for a, b in zip(rows, seed_tokens(st, keys, model, train, 0), strict=True)
    )
    model.seed_from_tokens(rows, metrics)
    for j, r in enumerate(rows):
        x = r.double().numpy()
        c = x.T @ x / len(x)
        lam = np.linalg.eigvalsh(c)
        slow = np.linalg.inv(c + DUAL_RIDGE * lam.mean() * np.eye(len(c)))
        np.testing.assert_allclose(metrics[j].double().numpy(), slow, rtol=1e-4, atol=1e-6)
        w = x @ slow
        own = np.einsum("nd,nd->n", x, w)
        scale = np.sqrt((x**2).sum(1).mean() / x.shape[1] / own)
        np.testing.assert_allclose(
            model.encoders[j].weight[: len(r)].detach().double().numpy(),
            w * scale[:, None],
            rtol=1e-4,
            atol=1e-5,
        )
        k = np.sqrt((x**2).sum(1).mean() / x.shape[1])
        pre = model.encoders[j](r).detach().double().diagonal().numpy()  # on its own token
        np.testing.assert_allclose(pre, np.sqrt(own) * k, rtol=1e-4)
        s = metrics[j].double()
        rd = r.double()
        cos_s = (rd @ s @ rd.T) / torch.outer(
            *(2 * [torch.einsum("nd,de,ne->n", rd, s, rd).sqrt()])
        )
        assert (cos_s.argmax(1) == torch.arange(len(r))).all()  # its own token, in the metric
        exact = inverse_second_moment(rd, 1e-12)
        y = torch.randn(5, rd.shape[1], dtype=torch.float64)
        codes = y @ exact @ rd.T / len(rd)  # the dual frame's codes of any input...
        assert torch.allclose(codes @ rd, y, atol=1e-6)  # ...rebuild it from the seeds
    _, none = seed_start(st, keys, model, train, 0, "token")
    assert none is None


def test_inverse_second_moment_is_the_whitening_squared():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [3, 1, 1, 0.1, 0.01]
    )
    p = whitening_matrix(x, 0.05)
    assert torch.allclose(inverse_second_moment(x, 0.05), p @ p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("start,ridge", [("dual", 1e-9), ("dual", None), ("token", None)])
def test_dual_start_gives_mapped_twins_the_same_pre_activations(
    tmp_path, monkeypatch, start, ridge
):
    """Twins b = a A (A invertible, not orthogonal) under the fidelity recipe at lr 0: the
    dual start gives every seeded concept the same pre-activations in both twins (exactly
    without the ridge, up to one factor per twin, rms|x| / sqrt(d); nearly with it) and the
    same decoder row through A; the token start (the control) does not."""
    from usae.trainer import inputs
    from usae.trainer.synth import random_map

    if ridge is not None:
        monkeypatch.setattr(inputs, "DUAL_RIDGE", ridge)
    a_dd = random_map(np.random.default_rng(1), 8, "affine", 0.7)
    path = write_twins(tmp_path / "t.zarr", width=8, a_dd=a_dd)
    cfg = small_cfg(
        path, tmp_path / "run", steps=1, lr=0.0, lr_min=0.0, concepts=40, encoder_start=start
    )
    run_train(cfg)
    w = weights(tmp_path / "run")
    st, keys = open_store(cfg)
    model = started(st, keys, cfg.resolved())
    x = [model.encoder_input(j, model.standardize(j, torch.from_numpy(np.concatenate(
        [st.read_chunk(k, c) for c in range(st.n_chunks)])).float())).double() for j, k in enumerate(keys)]  # fmt: skip
    pre = [x[j] @ w[f"encoders.{j}.weight"].double().T for j in range(2)]
    cos = F.cosine_similarity(pre[0], pre[1], dim=0)  # per concept, over the tokens
    mapped = F.cosine_similarity(
        w["decoders.0"].double() @ torch.from_numpy(a_dd), w["decoders.1"].double(), dim=1
    )
    assert (mapped > 1 - 1e-6).all()  # the decoders start mapped either way
    if start == "dual" and ridge:
        assert (cos > 1 - 1e-5).all(), cos.min()  # float32 rows
        ratio = pre[1].norm(dim=0) / pre[0].norm(dim=0)  # per concept: one factor per twin
        assert (ratio / ratio.median() - 1).abs().max() < 1e-3, ratio
    elif start == "dual":  # the ridge reads weak directions as the token start does
        assert cos.median() > 0.9 and cos.min() > 0.7, cos  # 0.93 and 0.75 here
    else:
        assert cos.median() < 0.9, cos  # 0.83 here, min 0.37


def write_twins(path: Path, n=16, t=8, width=6, seed=0, a_dd: np.ndarray | None = None) -> Path:
    """A store holding one backbone's tokens twice (as `a` and `b`); with a_dd (width, width),
    `b` is `a` times a_dd, and `a`'s channels are mixed by a rotation with scales 2 to 0.5."""
    fp = {"twins": seed} if a_dd is None else {"mapped": seed}
    st = Store.create(path, [f"img{i}" for i in range(n)],
                      [BackboneLayout("a", width), BackboneLayout("b", width)], grid=(2, t // 2),
                      chunk_images=4, source="synth", fingerprint_of=fp)  # fmt: skip
    rng = np.random.default_rng(seed)
    mix = None
    if a_dd is not None:
        mix = np.linalg.qr(rng.normal(size=(width, width)))[0] * np.geomspace(2, 0.5, width)
    for c in range(st.n_chunks):
        x = rng.normal(size=(4 * t, width))
        x = 1.0 + (x if mix is None else x @ mix)
        st.write_chunk(c, {"a": x, "b": x if a_dd is None else x @ a_dd}, np.ones(4, bool))
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


def test_config_encoder_start_resolves_to_the_recipe_and_old_runs_keep_theirs():
    assert TrainConfig(recipe="fidelity").resolved().encoder_start == "dual"
    assert TrainConfig(recipe="fidelity", encoder_start="token").resolved().encoder_start == "token"
    assert TrainConfig(recipe="paper").resolved().encoder_start == "token"
    assert TrainConfig(recipe="fidelity", init="unit").resolved().encoder_start == "token"
    assert TrainConfig(recipe="paper", init="data").resolved().encoder_start == "token"
    got = TrainConfig(recipe="paper", init="data", encoder_start="dual").resolved()
    assert got.encoder_start == "dual"
    assert (
        TrainConfig.from_dict({"recipe": "fidelity", "init": "data"}).resolved().encoder_start
        == "token"
    )
    with pytest.raises(ValueError, match="encoder_start dual needs the data-aligned start"):
        TrainConfig(recipe="fidelity", init="unit", encoder_start="dual")
    with pytest.raises(ValueError, match="encoder_start must be"):
        TrainConfig(encoder_start="pca")  # type: ignore[arg-type]


def test_config_init_resolves_to_the_recipe_and_old_runs_keep_theirs():
    assert TrainConfig(recipe="paper").resolved().init == "randn"
    assert TrainConfig(recipe="paper", init="data").resolved().init == "data"
    assert TrainConfig.from_dict({"recipe": "fidelity"}).init == "unit"
    assert TrainConfig.from_dict({}).init == "randn"
    with pytest.raises(ValueError, match="init must be"):
        TrainConfig(init="zeros")  # type: ignore[arg-type]
