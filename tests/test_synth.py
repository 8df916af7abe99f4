"""usae synth: valid standard store, exact stats, ground truth consistent with the data,
cross-model alignment (and its shuffled control), CLI, and the recovery metric."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner
from usae.pipeline.store import RunningStats, Store, StoreError
from usae.trainer.model import USAE, ModelSpec
from usae.trainer.synth import SynthConfig, choose_grid, load_truth, recovery, register, run_synth

SMALL = dict(models=3, dims=(16, 24, 24), universal=6, specific=3, tokens=2400,
             tokens_per_image=6, active=3.0, noise=0.05, chunk_images=70)


def _dense(truth, i, n_rows):
    """Slow obvious densification of model i's CSR codes over global concept ids."""
    indptr, concept, value = truth.codes[i]
    z = np.zeros((n_rows, len(truth.rate)), np.float64)
    for r in range(n_rows):
        for c, v in zip(concept[indptr[r]:indptr[r + 1]], value[indptr[r]:indptr[r + 1]], strict=True):
            z[r, c] += v
    return z


def _all_rows(store, key):
    return store.read_rows(key, 0, store.n_rows).astype(np.float64)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "s.zarr"
    run_synth(SynthConfig(store=path, **SMALL), progress=False)
    return path


def test_store_is_valid_and_stats_exact(small):
    st_ = Store.open(small)
    assert st_.attrs["source"] == "synth" and st_.complete
    assert st_.backbones == ["m0", "m1", "m2"]
    assert st_.tokens_per_image == 6 and st_.grid[0] * st_.grid[1] == 6
    assert st_.n_images == 400 and st_.n_chunks == 6 and st_.valid.all()
    for k, d in zip(st_.backbones, (16, 24, 24), strict=True):
        assert st_.widths[k] == d
        x = _all_rows(st_, k)
        ref = RunningStats.of(x)
        s = st_.stats(k)
        assert s["count"] == st_.n_rows
        np.testing.assert_allclose(s["mean"], ref.mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s["m2"], ref.m2, rtol=1e-9)
        assert s["scalar_std"] == pytest.approx(x.std(), rel=1e-9)


def test_truth_consistent_with_tokens(small):
    st_, truth = Store.open(small), load_truth(small)
    u = truth.n_universal
    assert truth.backbones == ("m0", "m1", "m2") and u == 6 and truth.n_specific == (3, 3, 3)
    for i, k in enumerate(truth.backbones):
        dic = truth.dictionaries[i]
        assert dic.shape == (u + 3, st_.widths[k])
        np.testing.assert_allclose(np.linalg.norm(dic, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(truth.concept_ids[i][:u], np.arange(u))
        np.testing.assert_array_equal(truth.concept_ids[i][u:], u + 3 * i + np.arange(3))
        assert (truth.codes[i][2] > 0).all()  # non-negative (stored entries strictly positive)
        z = _dense(truth, i, st_.n_rows)[:, truth.concept_ids[i]]
        clean = (z @ dic.astype(np.float64)) * truth.scale[i] + truth.offset[i]
        resid = _all_rows(st_, k) - clean
        signal_rms = np.sqrt(((clean - truth.offset[i]) ** 2).mean())
        # residual is the planted noise: ~5% of the signal RMS (plus float16 rounding)
        assert 0.02 < np.sqrt((resid**2).mean()) / signal_rms < 0.08
    n_active = np.diff(truth.codes[0][0]).mean()
    assert 2.4 < n_active < 3.6  # about `active` concepts per token


def test_universal_concepts_fire_on_same_tokens(small):
    truth = load_truth(small)
    n = len(truth.codes[0][0]) - 1
    dense = [_dense(truth, i, n) for i in range(3)]
    u = truth.n_universal
    for i in (1, 2):
        np.testing.assert_array_equal(dense[0][:, :u] > 0, dense[i][:, :u] > 0)
        # magnitude = shared magnitude x a fixed per-model factor
        on = dense[0][:, :u] > 0
        ratio = np.where(on, dense[i][:, :u] / np.where(on, dense[0][:, :u], 1), np.nan)
        expect = truth.factors[i][:u] / truth.factors[0][:u]
        np.testing.assert_allclose(np.nanmax(ratio, 0), expect, rtol=1e-5)
        np.testing.assert_allclose(np.nanmin(ratio, 0), expect, rtol=1e-5)
    # specific concepts appear only in their own model
    for i in range(3):
        others = np.delete(np.arange(len(truth.rate)), truth.concept_ids[i])
        assert not dense[i][:, others].any()


def test_shuffle_alignment_control(tmp_path):
    path = tmp_path / "shuf.zarr"
    run_synth(SynthConfig(store=path, shuffle_alignment=True, **SMALL), progress=False)
    truth = load_truth(path)
    n = len(truth.codes[0][0]) - 1
    u = truth.n_universal
    on0, on1 = (_dense(truth, i, n)[:, :u] > 0 for i in (0, 1))
    # same firing counts per concept (a permutation within chunks), different tokens
    np.testing.assert_array_equal(on0.sum(0), on1.sum(0))
    # tokens are independent across models: co-firing at chance level, not identical
    joint, p0, p1 = (on0 & on1).mean(0), on0.mean(0), on1.mean(0)
    np.testing.assert_allclose(joint, p0 * p1, atol=0.03)
    assert (joint < 0.6 * p0).all()
    assert Store.open(path).attrs["extra"]["synth"]["shuffle_alignment"] is True


def test_deterministic_rerun_and_refusal(tmp_path, small):
    again = tmp_path / "again.zarr"
    run_synth(SynthConfig(store=again, **SMALL), progress=False)
    a, b = Store.open(small), Store.open(again)
    for k in a.backbones:
        for c in range(a.n_chunks):
            np.testing.assert_array_equal(a.read_chunk(k, c), b.read_chunk(k, c))
    run_synth(SynthConfig(store=again, **SMALL), progress=False)  # complete: a no-op
    with pytest.raises(StoreError, match="different"):
        run_synth(SynthConfig(store=again, **{**SMALL, "seed": 1}), progress=False)


def test_resume_after_interruption(tmp_path, small):
    path = tmp_path / "r.zarr"
    cfg = SynthConfig(store=path, **SMALL)
    run_synth(cfg, progress=False)
    # simulate a crash after chunk 2: drop later commit markers and the completion flag
    st_ = Store(path, mode="r+")
    for c in range(3, st_.n_chunks):
        (path / "_usae" / "commits" / f"c{c}.json").unlink()
    st_._root.attrs["complete"] = False
    (path / "_usae" / "truth.safetensors").unlink()
    run_synth(cfg, progress=False)
    a, b = Store.open(small), Store.open(path)
    for k in a.backbones:
        assert a.stats(k) == b.stats(k)
    assert load_truth(path).codes[1][1].tolist() == load_truth(small).codes[1][1].tolist()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    models=st.integers(1, 3), d=st.integers(2, 12), u=st.integers(0, 5), s=st.integers(0, 4),
    tokens=st.integers(1, 300), tpi=st.integers(1, 12), chunk=st.integers(0, 9),
    shuffle=st.booleans(), seed=st.integers(0, 1000),
)
def test_property_any_config(tmp_path_factory, models, d, u, s, tokens, tpi, chunk, shuffle, seed):
    if u + s == 0:
        u = 1
    tokens = max(tokens, tpi)
    path = tmp_path_factory.mktemp("p") / "s.zarr"
    cfg = SynthConfig(store=path, models=models, dims=(d,), universal=u, specific=s, tokens=tokens,
                      tokens_per_image=tpi, active=min(2.0, u + s), noise=0.0, seed=seed,
                      shuffle_alignment=shuffle, chunk_images=chunk, scale_offset=False)
    res = run_synth(cfg, progress=False)
    st_, truth = Store.open(path), load_truth(path)
    assert st_.n_images == -(-tokens // tpi) == res.n_images
    assert st_.n_rows == res.n_rows == len(truth.codes[0][0]) - 1
    for i, k in enumerate(st_.backbones):
        z = _dense(truth, i, st_.n_rows)[:, truth.concept_ids[i]]
        expect = (z @ truth.dictionaries[i].astype(np.float64)).astype(np.float16)
        np.testing.assert_allclose(_all_rows(st_, k), expect, atol=2e-3, rtol=2e-3)


def test_choose_grid():
    assert choose_grid(196) == (14, 14) and choose_grid(16) == (4, 4)
    assert choose_grid(6) == (2, 3) and choose_grid(7) == (1, 7) and choose_grid(1) == (1, 1)


def test_config_validation():
    bad = [dict(dims=(8, 8)), dict(names=("a", "a", "b")), dict(tokens=3, tokens_per_image=4),
           dict(active=0.0), dict(universal=0, specific=0)]
    for kw in bad:
        with pytest.raises(ValueError):
            SynthConfig(store=Path("x"), **kw).validate()


def _cli():
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command so Typer keeps sub-command names
        pass

    return app


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "c.zarr"
    r = runner.invoke(_cli(), ["synth", "--store", str(out), "--models", "2", "--dims", "8,12",
                               "--names", "a,b", "--universal", "4", "--specific", "2",
                               "--tokens", "400", "--tokens-per-image", "4", "--active", "2",
                               "--shuffle-alignment", "--seed", "3"])
    assert r.exit_code == 0, r.output
    st_ = Store.open(out)
    assert st_.backbones == ["a", "b"] and st_.widths == {"a": 8, "b": 12}
    syn = st_.attrs["extra"]["synth"]
    assert syn["shuffle_alignment"] and syn["seed"] == 3 and syn["universal"] == 4
    r = runner.invoke(_cli(), ["synth", "--store", str(tmp_path / "d.zarr"), "--dims", "8,x"])
    assert r.exit_code != 0 and "comma-separated" in r.output and "Traceback" not in r.output
    r = runner.invoke(_cli(), ["synth", "--store", str(tmp_path / "d.zarr"), "--dims", "8,8"])
    assert r.exit_code != 0 and "--dims" in r.output
    args = ["synth", "--store", str(out), "--models", "2", "--dims", "8,12", "--tokens", "400"]
    r = runner.invoke(_cli(), args)  # same path, other settings: refused, not overwritten
    assert r.exit_code == 1 and "different" in r.output and "Traceback" not in r.output


def test_cli_options_mirror_config():
    cmd = typer.main.get_command(_cli()).commands["synth"]
    opts = {p.name for p in cmd.params}
    assert opts == {f.name for f in dataclasses.fields(SynthConfig)}


# ---------------------------------------------------------------- recovery metric
def _slow_recovery(model, truth, thr):
    """Obvious loops: best learned concept by cosine averaged over models."""
    u, m = truth.n_universal, model.spec.concepts
    best = []
    for c in range(u):
        scores = []
        for k in range(m):
            cs = []
            for i, key in enumerate(truth.backbones):
                w = model.decoders[model.index(key)][k].detach().double().numpy()
                t = truth.dictionaries[i][c].astype(np.float64)
                cs.append(w @ t / np.linalg.norm(w) / np.linalg.norm(t))
            scores.append(np.mean(cs))
        best.append(max(scores))
    return np.array(best)


def _model_for(truth, concepts, k=3):
    widths = tuple(d.shape[1] for d in truth.dictionaries)
    spec = ModelSpec(backbones=tuple(reversed(truth.backbones)), widths=tuple(reversed(widths)),
                     mu=(0.0,) * len(widths), sigma=(1.0,) * len(widths), concepts=concepts, k=k)
    torch.manual_seed(0)
    return USAE(spec)


def test_recovery_metric(small):
    truth = load_truth(small)
    u = truth.n_universal
    model = _model_for(truth, concepts=20)  # backbone order reversed on purpose
    rec0 = recovery(model, truth)
    np.testing.assert_allclose(rec0.cos_u, _slow_recovery(model, truth, 0.9), atol=1e-5)
    assert rec0.rate < 0.5 and rec0.rate == pytest.approx((rec0.cos_u >= 0.9).mean())
    # plant the truth (scaled, since decoders are normalised at use) at shuffled positions
    perm = np.random.default_rng(0).permutation(20)
    with torch.no_grad():
        for i, key in enumerate(truth.backbones):
            dec = model.decoders[model.index(key)]
            dec[perm[:u]] = torch.from_numpy(truth.dictionaries[i][:u]) * 3.0
    rec = recovery(model, truth)
    assert rec.rate == 1.0 and rec.mean_cos == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(rec.match_u, perm[:u])
    np.testing.assert_allclose(rec.cos_u, _slow_recovery(model, truth, 0.9), atol=1e-5)
    assert rec.per_model_cos_ui.shape == (u, 3) and (rec.per_model_cos_ui > 0.999).all()
    # universal directions planted in DIFFERENT learned concepts per model: not universal
    with torch.no_grad():
        dec = model.decoders[model.index(truth.backbones[1])]
        dec[perm[:u]] = dec[np.roll(perm[:u], 1)].clone()
    rec2 = recovery(model, truth)
    assert rec2.rate == 0.0 and (rec2.per_model_cos_ui > 0.999).all()
