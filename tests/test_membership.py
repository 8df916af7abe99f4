"""analysis.membership: per-model statistics -> member sets (gain rule, energy rule, fire veto)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense_inputs_and_codes
from hypothesis import given, settings
from hypothesis import strategies as st
from usae.analysis.membership import member_matrix


def test_gain_rule_and_fire_veto():
    gain = np.array(
        [[1.0, 1.0, 0.0, 2.0, 0.3], [0.5, 0.01, 1.0, 1.9, 0.3], [0.3, 0.02, 1.0, 0.5, 0.3]]
    )
    fires = np.full((3, 5), 100.0)
    fires[2, 3] = 0.0  # never fires in model 2: vetoed whatever its gain
    fires[:, 4] = 0.0  # dead concept: lives nowhere
    energy = np.ones((3, 5))
    got = member_matrix(fires, energy, gain, fire_ratio=0.02)
    want = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [1, 0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(got, want)
    want[2, 3] = True  # default: no fire veto (a member may fire through a duplicate concept)
    np.testing.assert_array_equal(member_matrix(fires, energy, gain), want)


def test_energy_rule_without_gains():
    energy = np.array([[1.0, 0.1, 0.5], [0.9, 1.0, 0.05]])
    fires = np.ones((2, 3))
    np.testing.assert_array_equal(member_matrix(fires, energy), [[1, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(
        member_matrix(fires, energy, energy_ratio=0.05), [[1, 1, 1], [1, 1, 1]]
    )


def test_shapes_checked():
    with pytest.raises(ValueError):
        member_matrix(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        member_matrix(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 20), st.integers(0, 10_000))
def test_properties(n_models, m, seed):
    rng = np.random.default_rng(seed)
    fires = rng.integers(0, 50, (n_models, m)).astype(float)
    energy, gain = rng.random((n_models, m)), rng.random((n_models, m))
    for g in (None, gain):
        mem = member_matrix(fires, energy, g)
        assert mem.shape == (n_models, m) and mem.dtype == bool
        live = fires.max(0) > 0
        assert not mem[:, ~live].any()
        score = energy if g is None else g
        # every live concept lives at least in the model where it is strongest (if it fires there)
        top = score.argmax(0)
        assert mem[top[live], np.arange(m)[live]].all()
        # scale invariance per concept
        np.testing.assert_array_equal(
            mem, member_matrix(fires * 3, energy * 7, None if g is None else g * 5)
        )


# ---------------------------------------------------------------- labels, duplicates, twins
def test_member_labels():
    from usae.analysis.membership import member_labels

    members = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], bool)
    assert member_labels(members, ["a", "b", "c"]) == ["all", "a", "b", ""]


def slow_duplicates(decoders, members, fires, cosine=0.9):
    """Every pair written out: mean cosine over the models where both live, firing profiles."""
    m = members.shape[1]
    prof = fires / np.maximum(fires.sum(0, keepdims=True), 1)
    out = []
    for a in range(m):
        for b in range(a + 1, m):
            both = [i for i in range(len(decoders)) if members[i, a] and members[i, b]]
            if not both or fires[:, a].sum() == 0 or fires[:, b].sum() == 0:
                continue
            cos = np.mean(
                [
                    decoders[i][a]
                    @ decoders[i][b]
                    / np.linalg.norm(decoders[i][a])
                    / np.linalg.norm(decoders[i][b])
                    for i in both
                ]
            )
            if cos >= cosine and np.minimum(prof[:, a], prof[:, b]).sum() < 0.5:
                out.append((a, b))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 40), block=st.integers(1, 16))
def test_duplicates_match_slow(seed, m, block):
    from usae.analysis.membership import duplicates

    rng = np.random.default_rng(seed)
    dec = [rng.normal(size=(m, 6)) for _ in range(3)]
    for a, b in rng.integers(0, m, size=(m // 3, 2)):  # some concepts learned twice
        for d in dec:
            d[b] = d[a] * rng.uniform(0.5, 2) + 0.05 * rng.normal(size=6)
    members = rng.random((3, m)) < 0.8
    fires = rng.integers(0, 50, size=(3, m)).astype(float) * (rng.random((3, m)) < 0.6)
    got = [tuple(p) for p in duplicates(dec, members, fires, block=block).tolist()]
    assert got == slow_duplicates(dec, members, fires)


def test_duplicate_firing_from_different_models_is_found():
    from usae.analysis.membership import duplicates

    rng = np.random.default_rng(0)
    dec = [rng.normal(size=(4, 8)) for _ in range(2)]
    for d in dec:
        d[3] = d[1]  # concept 3 is concept 1 again
        d[2] = d[0]  # concept 2 is concept 0 again, but fires from the same model as 0
    fires = np.array(
        [[10, 10, 10, 0], [0, 0, 0, 10]], float
    )  # 1 fires from model 0, 3 from model 1
    members = np.ones((2, 4), bool)
    assert duplicates(dec, members, fires).tolist() == [[1, 3]]


# ---------------------------------------------------------------- the fit rule
def _random_gain_run(tmp, independent=False, seed=0, widths=(5, 7, 6), m=10, k=3):
    """Random store + random USAE with gains and a decoder bias (random BN statistics)."""
    import torch
    from test_metrics import write_run, write_store
    from usae.trainer.model import USAE, ModelSpec

    rng = np.random.default_rng(seed)
    n_images, grid = 13, (2, 2)
    rows = n_images * 4
    acts = [(rng.normal(size=(rows, d)) * 2 + 0.5).astype(np.float16) for d in widths]
    store = write_store(tmp / "g.zarr", acts, n_images, grid, 3, seed=seed)
    torch.manual_seed(seed)
    keys = tuple(f"m{i}" for i in range(len(widths)))
    spec = ModelSpec(keys, widths, (0.4,) * 3, (1.8,) * 3, concepts=m, k=k,
                     independent=independent, gains=True, decoder_bias=True)  # fmt: skip
    model = USAE(spec)
    with torch.no_grad():
        for j, bn in enumerate(model.bns):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
            model.gains[j].normal_(0, 1)
            model.dec_bias[j].normal_(0, 0.5)
    return store, write_run(tmp / "g_run", model, store)


def dense_fit_sums(model, store, mask, tau):
    """Slow, obvious: every row in memory, dense codes; the sums of ``Sums.fit_6mmm``."""
    import torch

    model = model.double().eval()
    n, m = model.n_models, model.spec.concepts
    xs, zs = dense_inputs_and_codes(model, store, mask)
    with torch.no_grad():
        dec = [model.decoder_weight(j).double().numpy() for j in range(n)]
        gain = [model.gain(j).double().numpy() for j in range(n)]
        bias = [model.bias(j).double().numpy() for j in range(n)]
    out = np.zeros((6, n, n, m))
    for i in range(n):
        for j in range(n):
            if model.spec.independent and i != j:
                continue
            unit = dec[j] / gain[j][:, None]
            e_all = (xs[j] - zs[i] @ dec[j] - bias[j]) @ unit.T + zs[i] * gain[j]
            for c in range(m):
                on = zs[i][:, c] > tau
                z, e = zs[i][on, c], e_all[on, c]
                out[:, i, j, c] = [on.sum(), z.sum(), z @ z, e.sum(), e @ e, z @ e]
    return out


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_fit_sums_equal_dense_reference(tmp_path, independent, batch):
    import torch
    from usae.analysis import metrics as mx
    from usae.trainer.model import load_run

    store, run = _random_gain_run(tmp_path, independent, seed=batch)
    mask = np.arange(store.n_images) % 4 != 2
    model, _ = load_run(run)
    s = mx.stream_sums(model, store, list(model.spec.backbones), mask, tau=0.1,
                       batch_tokens=batch, dtype=torch.float64)  # fmt: skip
    want = dense_fit_sums(load_run(run)[0], store, mask, 0.1)
    assert want[0].sum() > 20  # codes fired: the comparison is not vacuous
    np.testing.assert_allclose(s.fit_6mmm, want, rtol=1e-9, atol=1e-9)
    if independent:
        off = ~np.eye(3, dtype=bool)
        assert not s.fit_6mmm[:, off].any()
    assert (
        mx.stream_sums(model, store, list(model.spec.backbones), mask, fit=False).fit_6mmm is None
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_need_is_the_loss_change_without_the_concept(tmp_path, seed):
    """Reconstruction need against the slow, obvious computation: per target backbone and
    concept, the full-vector squared error of every reconstruction (each source whose codes
    decode into it) with the concept's contribution taken away, less the error with it, over
    the loss along the concept's unit direction without it, on the tokens where it fires."""
    import torch
    from usae.analysis import metrics as mx
    from usae.trainer.model import load_run

    store, run = _random_gain_run(tmp_path, seed=seed)
    mask = np.arange(store.n_images) % 3 != 1
    model, _ = load_run(run)
    s = mx.stream_sums(model, store, list(model.spec.backbones), mask, tau=0.1, dtype=torch.float64)
    with torch.no_grad():
        gains = np.stack([model.gain(j).double().numpy() for j in range(model.n_models)])
    got = mx.concept_table(s, gains).fit_need_mm
    model = load_run(run)[0].double().eval()
    xs, zs = dense_inputs_and_codes(model, store, mask)
    n, m = model.n_models, model.spec.concepts
    want = np.full((n, m), np.nan)
    with torch.no_grad():
        dec = [model.decoder_weight(j).double().numpy() for j in range(n)]
        bias = [model.bias(j).double().numpy() for j in range(n)]
    for j in range(n):
        for c in range(m):
            added = along = 0.0
            for i in range(n):
                on = zs[i][:, c] > 0.1
                r = xs[j][on] - zs[i][on] @ dec[j] - bias[j]  # with the concept
                r_without = r + np.outer(zs[i][on, c], dec[j][c])
                added += (r_without**2).sum() - (r**2).sum()
                along += ((r_without @ (dec[j][c] / np.linalg.norm(dec[j][c]))) ** 2).sum()
            if along > 0:
                want[j, c] = added / along
    assert np.isfinite(want).sum() > 10 and (want > 0).any() and (want < 0).any()
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9, equal_nan=True)


def test_need_rule():
    from usae.analysis.membership import need_members

    need = np.array([
        [0.9, 0.6, 0.2, -0.5, np.nan, 0.9],
        [0.1, 0.3, 0.11, -0.2, 0.05, 0.9],
        [0.6, 0.1, np.nan, -0.1, -1.0, 0.9],
    ])  # fmt: skip
    fires = np.ones((3, 6))
    fires[:, 5] = 0  # dead: lives nowhere
    fallback = np.zeros((3, 6), bool)
    fallback[1, 3] = True  # needed nowhere: the fallback decides
    want = [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    # col 0: 0.9 and 0.6 >= 0.5; col 1: 0.3 >= 0.5 x 0.6; col 2: 0.11 >= 0.1, NaN is 0;
    # col 4: only model 1 needs it
    np.testing.assert_array_equal(need_members(need, fires, fallback), want)
    np.testing.assert_array_equal(
        need_members(need, fires, fallback, share=0.95, relative=0.99)[:, :3],
        [[1, 1, 1], [0, 0, 0], [0, 0, 0]],
    )
    with pytest.raises(ValueError):
        need_members(need[:, :3], fires, fallback)


def slow_fit_stats(groups):
    """groups[i] = (z, e) arrays of one source: centred per source, pooled, correlated."""
    zc = np.concatenate([z - z.mean() for z, _ in groups if len(z)])
    ec = np.concatenate([e - e.mean() for z, e in groups if len(z)])
    n = sum(len(z) for z, _ in groups)
    dof = n - sum(len(z) > 0 for z, _ in groups) - 1
    zz = np.concatenate([z for z, _ in groups])
    ee = np.concatenate([e for _, e in groups])
    beta = zz @ ee / (zz @ zz)
    if n < 3 or dof < 1 or zc @ zc <= 1e-12 * (zz @ zz) or ec @ ec <= 1e-12 * (ee @ ee):
        return n, np.nan, max(dof, 0), beta
    return n, zc @ ec / np.sqrt((zc @ zc) * (ec @ ec)), dof, beta


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_src=st.integers(1, 4), slope=st.floats(-2, 2))
def test_fit_stats_match_slow(seed, n_src, slope):
    from usae.analysis.metrics import fit_stats

    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n_src):
        n = int(rng.integers(0, 12))
        z = rng.uniform(0.1, 3, n)
        groups.append((z, slope * z + rng.normal(rng.normal(0, 3), 0.5, n)))
    if sum(len(z) for z, _ in groups) == 0:
        groups[0] = (np.array([1.0]), np.array([2.0]))
    sums = np.zeros((6, n_src, 1, 1))
    for i, (z, e) in enumerate(groups):
        sums[:, i, 0, 0] = [len(z), z.sum(), z @ z, e.sum(), e @ e, z @ e]
    got = fit_stats(sums)
    n, r, dof, beta = slow_fit_stats(groups)
    assert got.n_mm[0, 0] == n and got.dof_mm[0, 0] == dof
    np.testing.assert_allclose(got.corr_mm[0, 0], r, rtol=1e-9, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(got.beta_mm[0, 0], beta, rtol=1e-9)


def test_fit_rule_thresholds():
    from scipy import stats
    from usae.analysis.membership import fit_members

    corr = np.array([[0.9, 0.35, 0.25, np.nan, 0.9], [0.2, -0.9, 0.99, 0.9, 0.9]])
    dof = np.array([[100, 100, 100, 100, 100], [100, 100, 100, 5, 100]])
    fires = np.ones((2, 5))
    fires[:, 4] = 0  # dead: lives nowhere
    # 10 tests: p <= 0.005. 0.35 on 100 dof: t = 3.7, p = 1.6e-4; 0.9 on 5 dof: p = 2.9e-3
    assert stats.t.sf(0.9 * np.sqrt(5 / (1 - 0.81)), 5) < 0.005
    want = [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
    np.testing.assert_array_equal(fit_members(fires, corr, dof), want)
    # the family-wise correction: more tests, a stricter bar
    assert not fit_members(np.ones((2, 500)), np.full((2, 500), 0.35), np.full((2, 500), 100)).any()
    assert fit_members(fires, corr, dof, alpha=1.0)[0, 1]
    # with gains: the data's slope must not exceed 2x the learned gain (a gain driven to ~0)
    slope = np.ones((2, 5))
    gain = np.array([[1.0, 0.49, 0.1, 1, 1], [1, 1, 0.6, 1, 1]])
    want_g = [[1, 0, 0, 0, 0], [0, 0, 1, 1, 0]]
    np.testing.assert_array_equal(fit_members(fires, corr, dof, slope, gain), want_g)
    with pytest.raises(ValueError):
        fit_members(fires, corr, dof[:, :3])


def _gain_oracle(tmp, store_path, spread_gain=1.0):
    """The planted dictionaries as a USAE with gains: each model's code is the concept's shared
    magnitude, each member row's gain its planted per-model strength; an absent row points in a
    random direction with gain ``spread_gain`` (a gain that training did not drive to 0)."""
    import torch
    from test_metrics import identity_bn_, write_run
    from usae.pipeline.store import Store
    from usae.trainer.model import USAE, ModelSpec
    from usae.trainer.truth import load_truth

    truth = load_truth(store_path)
    n, m = len(truth.backbones), int(truth.rate.shape[0])
    spec = ModelSpec(truth.backbones, tuple(int(d.shape[1]) for d in truth.dictionaries),
                     tuple(float(o) for o in truth.offset), tuple(float(s) - 1e-5 for s in truth.scale),
                     concepts=m, k=8, gains=True)  # fmt: skip
    model = USAE(spec)
    identity_bn_(model)
    g = np.full((n, m), spread_gain)
    with torch.no_grad():
        for i in range(n):
            ids = torch.as_tensor(truth.concept_ids[i])
            dct = torch.as_tensor(truth.dictionaries[i], dtype=torch.float32)
            f = torch.as_tensor(truth.factors[i], dtype=torch.float32)
            model.encoders[i].weight.zero_()
            model.encoders[i].bias.fill_(-1.0)  # concepts this model lacks never fire from it
            model.encoders[i].weight[ids] = torch.linalg.pinv(dct).T / f[:, None]
            model.encoders[i].bias[ids] = 0.0
            model.decoders[i][ids] = dct
            g[i, truth.concept_ids[i]] = truth.factors[i]
            model.gains[i].copy_(torch.as_tensor(np.log(np.expm1(g[i])), dtype=torch.float32))
    return Store.open(store_path), write_run(tmp / "oracle", model, Store.open(store_path)), truth


def test_fit_rule_right_where_the_gain_rule_is_fooled(tmp_path):
    """Planted strengths 0.15-3 between member models and absent rows whose gain stayed at 1:
    the gain ratio calls weak members absent and absent models members; the fit test is right
    on every concept, and the gain rule stays available."""
    import torch
    from usae.analysis import metrics as mx
    from usae.analysis.membership import member_matrix, members_of
    from usae.trainer.model import load_run
    from usae.trainer.synth import SynthConfig, run_synth

    cfg = SynthConfig(store=tmp_path / "s.zarr", models=3, dims=(160, 192, 176),
                      groups="all:8,0+1:4,1+2:4,only:4", tokens=6000, tokens_per_image=16,
                      active=2.0, noise=0.05, seed=3, gain=(0.15, 3.0), save_codes=False)  # fmt: skip
    run_synth(cfg, progress=False)
    torch.manual_seed(0)  # the absent rows' random directions
    store, run, truth = _gain_oracle(tmp_path, cfg.store)
    model, _ = load_run(run)
    s = mx.stream_sums(model, store, list(model.spec.backbones), store.valid, dtype=torch.float64)
    with torch.no_grad():
        gains = np.stack([model.gain(j).double().numpy() for j in range(3)])
    t = mx.concept_table(s, gains)
    want = truth.members.T
    fit, gain = members_of("fit", t), members_of("gain", t, gains)
    np.testing.assert_array_equal(gain, member_matrix(t.fires_mm, t.energy_mm, gains))
    assert (gain != want).any(0).mean() > 0.3  # the gain rule is fooled on many concepts
    assert (gain & ~want).any() and (~gain & want).any()  # in both directions
    np.testing.assert_array_equal(fit, want)
    assert np.nan_to_num(t.fit_corr_mm[~want]).max() < 0.3  # absent: no link, gain 1 or not
    np.testing.assert_array_equal(members_of("need", t, gains), want)
    assert np.nan_to_num(t.fit_need_mm[~want]).max() < 0  # an absent row at gain 1 only adds error
    # a model without gains: the need rule takes the energy rule's sets
    np.testing.assert_array_equal(members_of("need", t), member_matrix(t.fires_mm, t.energy_mm))


@pytest.mark.parametrize("rule", ["need", "fit", "gain"])
def test_analyze_member_rule_option(tmp_path, rule):
    """`usae analyze --member-rule`: every rule names the planted member sets of an exact USAE
    (universal concepts everywhere, specific ones in their model); the report records the rule
    and the fit statistics (the need among them)."""
    import json

    import pandas as pd
    from test_metrics import planted
    from usae.analysis.report import AnalyzeConfig, AnalyzeError, run_analyze

    p = planted(tmp_path, n_images=30)
    out = tmp_path / "rep"
    cfg = AnalyzeConfig(run=str(p.run), store=str(p.store.path), out=str(out), top_concepts=1,
                        top_images=1, dtype="fp64", member_rule=rule)  # fmt: skip
    run_analyze(cfg, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["membership"]["rule"] == ("fit" if rule == "fit" else "energy")  # no gains here
    assert m["membership"]["needed_nowhere"] == 0
    df = pd.read_parquet(out / "concepts.parquet")
    keys = ["m0", "m1", "m2"]
    assert {f"{c}_{k}" for k in keys for c in ("fit_corr", "fit_beta", "need")} <= set(df.columns)
    assert (df["members"][p.universal] == "all").all()
    for i, cs in p.specific.items():
        assert (df["members"][cs] == keys[i]).all(), (rule, df["members"][cs])
        assert (df[f"fit_corr_{keys[i]}"][cs] > 0.9).all()
        assert (df[f"need_{keys[i]}"][cs] > 0.9).all()
    assert df["members"][p.dead].tolist() == [""]
    with pytest.raises(AnalyzeError, match="member-rule"):
        AnalyzeConfig(run="r", store="s", out="o", member_rule="ratio")
