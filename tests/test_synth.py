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
from usae.trainer.cli import register_synth as register
from usae.trainer.model import USAE, ModelSpec
from usae.trainer.synth import SynthConfig, choose_grid, run_synth
from usae.trainer.truth import load_truth, recovery

SMALL = dict(
    models=3,
    dims=(16, 24, 24),
    universal=6,
    specific=3,
    tokens=2400,
    tokens_per_image=6,
    active=3.0,
    noise=0.05,
    chunk_images=70,
)


def _dense(truth, i, n_rows):
    """Slow obvious densification of model i's CSR codes over global concept ids."""
    indptr, concept, value = truth.codes[i]
    z = np.zeros((n_rows, len(truth.rate)), np.float64)
    for r in range(n_rows):
        for c, v in zip(
            concept[indptr[r] : indptr[r + 1]], value[indptr[r] : indptr[r + 1]], strict=True
        ):
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


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    models=st.integers(1, 3),
    d=st.integers(2, 12),
    u=st.integers(0, 5),
    s=st.integers(0, 4),
    tokens=st.integers(1, 300),
    tpi=st.integers(1, 12),
    chunk=st.integers(0, 9),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_any_config(tmp_path_factory, models, d, u, s, tokens, tpi, chunk, shuffle, seed):
    if u + s == 0:
        u = 1
    tokens = max(tokens, tpi)
    path = tmp_path_factory.mktemp("p") / "s.zarr"
    cfg = SynthConfig(
        store=path,
        models=models,
        dims=(d,),
        universal=u,
        specific=s,
        tokens=tokens,
        tokens_per_image=tpi,
        active=min(2.0, u + s),
        noise=0.0,
        seed=seed,
        shuffle_alignment=shuffle,
        chunk_images=chunk,
        scale_offset=False,
    )
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
    bad = [
        dict(dims=(8, 8)),
        dict(names=("a", "a", "b")),
        dict(tokens=3, tokens_per_image=4),
        dict(active=0.0),
        dict(universal=0, specific=0),
    ]
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
    r = runner.invoke(
        _cli(),
        [
            "synth",
            "--store",
            str(out),
            "--models",
            "2",
            "--dims",
            "8,12",
            "--names",
            "a,b",
            "--universal",
            "4",
            "--specific",
            "2",
            "--tokens",
            "400",
            "--tokens-per-image",
            "4",
            "--active",
            "2",
            "--shuffle-alignment",
            "--seed",
            "3",
        ],
    )
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
    assert r.exit_code == 2 and "different" in r.output and "Traceback" not in r.output


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
    spec = ModelSpec(
        backbones=tuple(reversed(truth.backbones)),
        widths=tuple(reversed(widths)),
        mu=(0.0,) * len(widths),
        sigma=(1.0,) * len(widths),
        concepts=concepts,
        k=k,
    )
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


# ---------------------------------------------------------------- extended generator
from usae.trainer.synth import make_groups, parse_groups  # noqa: E402
from usae.trainer.truth import recovery_from_decoders  # noqa: E402

GROUPED = dict(
    models=3,
    dims=(20, 28, 24),
    groups="all:5,0+1:3,1+2:2,only:2",
    tokens=3200,
    tokens_per_image=8,
    active=3.0,
    noise=0.05,
    chunk_images=90,
    seed=7,
    gain=(0.5, 2.0),
    channel_offset=1.0,
    zipf=0.8,
    noise_decay=0.7,
)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    path = tmp_path_factory.mktemp("grouped") / "g.zarr"
    run_synth(SynthConfig(store=path, **GROUPED), progress=False)
    return path


def test_parse_groups():
    assert parse_groups("all:32, 0+1:12,2+1:4,only:12") == [
        ("all", 32),
        ("0+1", 12),
        ("1+2", 4),
        ("only", 12),
    ]
    assert parse_groups("ALL:3,") == [("all", 3)]
    for bad in ["", "all", "all:x", "all:-1", "0+0:3", "a+b:2", ":3", "0+-1:2"]:
        with pytest.raises(ValueError):
            parse_groups(bad)
    g = make_groups(parse_groups("only:2,1+2:3,all:4"), 3)  # canonical order: all, subsets, only
    assert [x.label for x in g] == ["all", "1+2", "0", "1", "2"]
    assert [x.ids for x in g] == [(0, 1, 2, 3), (4, 5, 6), (7, 8), (9, 10), (11, 12)]
    assert [x.per_model for x in g] == [False, False, True, True, True]
    assert make_groups(parse_groups("0+1:2"), 2)[0].label == "all"  # every model = universal
    with pytest.raises(ValueError, match="--models"):
        make_groups(parse_groups("0+3:2"), 3)


def test_extended_validation():
    bad = [
        dict(groups="0+5:3"),
        dict(groups="all:x"),
        dict(gain=(2.0, 1.0)),
        dict(gain=(0.0, 1.0)),
        dict(channel_offset=-1.0),
        dict(zipf=-0.5),
        dict(noise_decay=-1.0),
        dict(groups="all:0,only:0"),
        dict(groups="all:2", active=3.0),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            SynthConfig(store=Path("x"), **kw).validate()
    SynthConfig(
        store=Path("x"), models=8, dims=(8,), groups="all:4,0+7:2,only:1", active=2.0
    ).validate()


def test_grouped_truth_round_trip(grouped):
    st_, truth = Store.open(grouped), load_truth(grouped)
    members = truth.members
    assert members.shape == (5 + 3 + 2 + 6, 3) and members.dtype == bool
    expect = np.zeros_like(members)
    expect[:5] = True
    expect[5:8, [0, 1]] = True
    expect[8:10, [1, 2]] = True
    for i in range(3):
        expect[10 + 2 * i : 12 + 2 * i, i] = True
    np.testing.assert_array_equal(members, expect)
    assert truth.group_labels == ("all", "0+1", "1+2", "0", "1", "2")
    np.testing.assert_array_equal(truth.group_id, [0] * 5 + [1] * 3 + [2] * 2 + [3, 3, 4, 4, 5, 5])
    assert truth.n_universal == 5 and truth.n_specific == (2, 2, 2)
    for i in range(3):
        np.testing.assert_array_equal(truth.concept_ids[i], np.flatnonzero(members[:, i]))
        np.testing.assert_array_equal(truth.gains[truth.concept_ids[i], i], truth.factors[i])
        assert (truth.gains[~members[:, i], i] == 0).all()
        f = truth.factors[i]
        assert (f >= 0.5 - 1e-6).all() and (f <= 2.0 + 1e-6).all() and f.max() / f.min() > 1.5
        assert truth.channel_offsets[i].shape == (st_.widths[truth.backbones[i]],)
        assert np.abs(truth.channel_offsets[i]).max() > 0
        np.testing.assert_allclose(
            truth.direction(int(truth.concept_ids[i][-1]), i), truth.dictionaries[i][-1]
        )
    with pytest.raises(KeyError):
        truth.direction(8, 0)  # concept 8 lives in models 1, 2
    assert truth.config["groups"] == GROUPED["groups"] and truth.config["gain"] == [0.5, 2.0]
    assert truth.rate.max() / truth.rate.min() > 5  # Zipf: heavy-tailed frequencies


def test_grouped_tokens_and_cofiring(grouped):
    st_, truth = Store.open(grouped), load_truth(grouped)
    n = st_.n_rows
    dense = [_dense(truth, i, n) for i in range(3)]
    for c in range(len(truth.rate)):
        mem = np.flatnonzero(truth.members[c])
        for i in range(3):
            if i not in mem:
                assert not dense[i][:, c].any()  # absent from model i: never fires there
        for i in mem[1:]:  # same tokens in every member, magnitude ratio = gain ratio
            on = dense[mem[0]][:, c] > 0
            np.testing.assert_array_equal(on, dense[i][:, c] > 0)
            ratio = dense[i][on, c] / dense[mem[0]][on, c]
            np.testing.assert_allclose(ratio, truth.gains[c, i] / truth.gains[c, mem[0]], rtol=1e-5)
    for i, k in enumerate(truth.backbones):
        z = dense[i][:, truth.concept_ids[i]]
        o = truth.channel_offsets[i].astype(np.float64)
        clean = (z @ truth.dictionaries[i].astype(np.float64) + o) * truth.scale[i] + truth.offset[
            i
        ]
        resid = (_all_rows(st_, k) - clean) / truth.scale[i]
        signal_rms = np.sqrt(((z @ truth.dictionaries[i].astype(np.float64)) ** 2).mean())
        # anisotropic noise keeps its total power (~5% of the signal RMS) but not its shape
        assert 0.03 < np.sqrt((resid**2).mean()) / signal_rms < 0.08
        ev = np.linalg.eigvalsh(np.cov(resid.T))
        assert ev.max() / ev.min() > 20  # noise_decay 0.7: far from isotropic


def test_version1_truth_still_loads(tmp_path, small):
    """A truth file without the version-2 tensors: members and gains derived from rows."""
    import shutil

    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "v1.zarr"
    shutil.copytree(small, path)
    f = path / "_usae" / "truth.safetensors"
    with safe_open(str(f), framework="np") as h:
        meta = dict(h.metadata())
    t = {
        k: v
        for k, v in load_file(str(f)).items()
        if k not in ("members", "gain", "group_id") and not k.startswith("channel_offset.")
    }
    meta["version"] = "1"
    meta.pop("groups")
    save_file(t, str(f), metadata=meta)
    old, new = load_truth(path), load_truth(small)
    np.testing.assert_array_equal(old.members, new.members)
    np.testing.assert_array_equal(old.gains, new.gains)
    assert old.group_labels == new.group_labels == ("all", "0", "1", "2")
    np.testing.assert_array_equal(old.group_id, new.group_id)
    assert old.channel_offsets is None


def test_recovery_groups_and_membership(grouped):
    truth = load_truth(grouped)
    rng = np.random.default_rng(1)
    n_c, m = len(truth.rate), 40
    perm = rng.permutation(m)[:n_c]
    decs = [rng.standard_normal((m, d.shape[1])) for d in truth.dictionaries]
    for i in range(3):
        decs[i][perm[truth.concept_ids[i]]] = truth.dictionaries[i] * 2.5  # any row scale
    pred = np.zeros((3, m), bool)
    pred[:, perm] = truth.members.T
    rec = recovery_from_decoders(decs, truth, members_mk=pred)
    assert rec.recovered_c.all() and (rec.cos_c > 0.999).all()
    np.testing.assert_array_equal(rec.match_c, perm)
    assert rec.kind_rate == {"universal": 1.0, "subset": 1.0, "specific": 1.0}
    assert rec.group_rate == {lab: 1.0 for lab in truth.group_labels}
    assert rec.membership_accuracy == 1.0 and rec.member_ok_c.all()
    # wrong member sets for the pair-shared group 1+2 (ids 8, 9): called universal
    bad = pred.copy()
    bad[:, perm[8:10]] = True
    rec_b = recovery_from_decoders(decs, truth, members_mk=bad)
    assert rec_b.membership_accuracy == pytest.approx(1 - 2 / n_c)
    assert (
        rec_b.kind_membership["subset"] == pytest.approx(3 / 5)
        and rec_b.kind_membership["universal"] == 1.0
    )
    # a concept matched in only one of its two models is not recovered (min over members)
    decs[2][perm[9]] = rng.standard_normal(decs[2].shape[1])
    rec_c = recovery_from_decoders(decs, truth)
    assert not rec_c.recovered_c[9] and rec_c.recovered_c[8]
    assert rec_c.group_rate["1+2"] == 0.5 and np.isnan(rec_c.membership_accuracy)
    assert rec_c.member_ok_c is None
    with pytest.raises(ValueError, match="members_mk"):
        recovery_from_decoders(decs, truth, members_mk=pred[:2])


def test_recovery_control_random_decoders(grouped):
    truth = load_truth(grouped)
    rng = np.random.default_rng(0)
    decs = [rng.standard_normal((64, d.shape[1])) for d in truth.dictionaries]
    rec = recovery_from_decoders(decs, truth, members_mk=np.ones((3, 64), bool))
    assert not rec.recovered_c.any() and rec.cos_c.max() < 0.7
    assert all(v == 0.0 for v in rec.kind_rate.values())
    assert np.isnan(rec.membership_accuracy)  # nothing recovered: nothing to score


def test_extended_defaults_keep_the_first_generator(tmp_path, small):
    """Extended options at their defaults leave store, fingerprint and truth as before."""
    from usae.pipeline.store import fingerprint

    first = dataclasses.asdict(
        SynthConfig(store=small, **SMALL)
    )  # the first generator's fingerprint dict
    for f in ("store", "groups", "gain", "channel_offset", "zipf", "noise_decay", "labels",
              "label_tokens", "shuffle_labels", "transform", "transform_models",
              "transform_sigma"):  # fmt: skip
        first.pop(f)
    assert Store.open(small).attrs["fingerprint"] == fingerprint(
        {**first, "generator": "usae-synth-1"}
    )
    same = tmp_path / "same.zarr"
    run_synth(SynthConfig(store=same, **{**SMALL, "groups": "all:6,only:3"}), progress=False)
    a, b = load_truth(small), load_truth(same)
    for i in range(3):  # the same spec written out: the same draws
        np.testing.assert_array_equal(a.dictionaries[i], b.dictionaries[i])
        np.testing.assert_array_equal(a.codes[i][1], b.codes[i][1])
    np.testing.assert_array_equal(a.rate, b.rate)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    models=st.integers(2, 8),
    d=st.integers(3, 10),
    n_all=st.integers(0, 3),
    n_only=st.integers(0, 2),
    n_sub=st.integers(0, 3),
    seed=st.integers(0, 1000),
    shuffle=st.booleans(),
    offset=st.sampled_from([0.0, 0.5]),
    zipf=st.sampled_from([0.0, 1.0]),
)
def test_property_grouped(
    tmp_path_factory, models, d, n_all, n_only, n_sub, seed, shuffle, offset, zipf
):
    sub = "+".join(str(i) for i in range(0, models, 2))
    groups = f"all:{n_all},{sub}:{n_sub},only:{n_only}"
    if n_all + n_only + n_sub == 0:
        groups = "all:1"
    path = tmp_path_factory.mktemp("pg") / "s.zarr"
    cfg = SynthConfig(
        store=path,
        models=models,
        dims=(d,),
        groups=groups,
        tokens=120,
        tokens_per_image=4,
        active=0.5,
        noise=0.0,
        seed=seed,
        shuffle_alignment=shuffle,
        chunk_images=7,
        scale_offset=False,
        gain=(0.5, 2.0),
        channel_offset=offset,
        zipf=zipf,
    )
    run_synth(cfg, progress=False)
    st_, truth = Store.open(path), load_truth(path)
    assert truth.members.shape == (len(truth.rate), models)
    assert truth.members.sum() == sum(len(c) for c in truth.concept_ids)
    for i, k in enumerate(st_.backbones):
        z = _dense(truth, i, st_.n_rows)[:, truth.concept_ids[i]]
        expect = z @ truth.dictionaries[i].astype(np.float64) + truth.channel_offsets[i]
        np.testing.assert_allclose(
            _all_rows(st_, k), expect.astype(np.float16), atol=3e-3, rtol=3e-3
        )


def test_cli_extended(tmp_path):
    runner = CliRunner()
    out = tmp_path / "e.zarr"
    r = runner.invoke(
        _cli(),
        [
            "synth",
            "--store",
            str(out),
            "--models",
            "4",
            "--dims",
            "8",
            "--groups",
            "all:3,0+3:2,only:1",
            "--gain",
            "0.5,2",
            "--channel-offset",
            "0.5",
            "--zipf",
            "1",
            "--noise-decay",
            "0.5",
            "--tokens",
            "320",
            "--active",
            "1.5",
        ],
    )
    assert r.exit_code == 0, r.output
    truth = load_truth(out)
    assert truth.group_labels == ("all", "0+3", "0", "1", "2", "3")
    assert tuple(truth.config["gain"]) == (0.5, 2.0)
    for bad in (["--groups", "0+9:2"], ["--gain", "2,1"], ["--gain", "a,b"]):
        r = runner.invoke(_cli(), ["synth", "--store", str(tmp_path / "f.zarr"), *bad])
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output


# ---------------------------------------------------------------- planted labels
LABELLED = dict(SMALL, universal=6, labels=4, label_tokens=0.5, chunk_images=70)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    for name, kw in (("l", {}), ("x", {"shuffle_labels": True}), ("n", {"labels": 0})):
        run_synth(SynthConfig(store=root / f"{name}.zarr", **{**LABELLED, **kw}), progress=False)
    return root


def test_labels_tied_to_their_concepts(labelled):
    from usae.trainer.synth import LABEL_STRAY, label_names

    st_, truth = Store.open(labelled / "l.zarr"), load_truth(labelled / "l.zarr")
    names = label_names(4)
    assert truth.label_names == tuple(names) and truth.label_concepts.tolist() == [0, 1, 2, 3]
    assert truth.members[truth.label_concepts].all()  # universal concepts
    assert list(st_.labels) == [names[i] for i in truth.image_labels]
    t, n = st_.tokens_per_image, st_.n_images
    assert 0.15 < np.bincount(truth.image_labels, minlength=4).min() / n
    for i in range(3):
        z = _dense(truth, i, st_.n_rows).reshape(n, t, -1)
        for lab, c in enumerate(truth.label_concepts):
            mine = truth.image_labels == lab
            on = (z[:, :, c] > 0).sum(1)
            assert (on[mine] >= 3).all()  # round(0.5 * 6) tokens of every image of the label
            assert (on[~mine] > 0).mean() < 3 * LABEL_STRAY  # and rarely elsewhere
    # the rate recorded is the planted one
    z0 = _dense(truth, 0, st_.n_rows)
    np.testing.assert_allclose((z0[:, :4] > 0).mean(0), truth.rate[:4], rtol=0.15)


def test_labels_visible_only_through_their_concept(labelled):
    """Every other concept's codes are those of the same store without labels."""
    a, b = load_truth(labelled / "l.zarr"), load_truth(labelled / "n.zarr")
    assert b.label_concepts is None and Store.open(labelled / "n.zarr").labels is None
    for i in range(3):
        rows = Store.open(labelled / "n.zarr").n_rows
        za, zb = _dense(a, i, rows), _dense(b, i, rows)
        np.testing.assert_array_equal(za[:, 4:], zb[:, 4:])
        assert not np.array_equal(za[:, :4], zb[:, :4])


def test_shuffled_labels_control(labelled):
    lab, shuf = Store.open(labelled / "l.zarr"), Store.open(labelled / "x.zarr")
    np.testing.assert_array_equal(_all_rows(lab, "m1"), _all_rows(shuf, "m1"))  # same data
    assert sorted(lab.labels) == sorted(shuf.labels) and (lab.labels != shuf.labels).mean() > 0.5
    t = load_truth(labelled / "x.zarr")
    assert [t.label_names[i] for i in t.image_labels] == list(
        lab.labels
    )  # the truth is the true one
    assert lab.attrs["fingerprint"] != shuf.attrs["fingerprint"]


def test_labels_validation_and_cli(tmp_path):
    for kw in (dict(labels=1), dict(labels=7), dict(labels=-1), dict(labels=2, label_tokens=0.0)):
        with pytest.raises(ValueError, match="--label"):
            SynthConfig(store=Path("x"), **{**SMALL, **kw})
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(_cli(), ["synth", "--store", str(out), "--dims", "8", "--universal", "3",
                                    "--tokens", "240", "--labels", "3", "--shuffle-labels"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert set(Store.open(out).labels) == {"label0", "label1", "label2"}


# ---------------------------------------------------------------- --transform
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["rotate", "affine"]),
    d=st.integers(2, 10),
    models=st.integers(2, 3),
    seed=st.integers(0, 1000),
    noise=st.sampled_from([0.0, 0.1]),
    chosen=st.sampled_from([(), (0,), (0, 1)]),
)
def test_transform_maps_data_and_truth(tmp_path_factory, kind, d, models, seed, noise, chosen):
    """A mapped store is the unmapped one times A (before scale and offset), and its mapped
    truth reproduces its own data: codes @ rows + mapped offset, exactly when noise is 0,
    else up to the unmapped residual times A."""
    root = tmp_path_factory.mktemp("tr")
    base = dict(models=models, dims=(d,), groups="all:3,only:2", tokens=120, tokens_per_image=4,
                active=2.0, noise=noise, seed=seed, channel_offset=0.5, noise_decay=0.3)  # fmt: skip
    run_synth(SynthConfig(store=root / "a.zarr", **base), progress=False)
    cfg = SynthConfig(store=root / "b.zarr", transform=kind, transform_models=chosen, **base)
    run_synth(cfg, progress=False)
    sa, sb = Store.open(root / "a.zarr"), Store.open(root / "b.zarr")
    ta, tb = load_truth(root / "a.zarr"), load_truth(root / "b.zarr")
    mapped = set(chosen or range(1, models))
    assert set(tb.maps) == {sb.backbones[i] for i in mapped}
    for i, k in enumerate(sb.backbones):
        xa, xb = _all_rows(sa, k), _all_rows(sb, k)
        sc, of = float(tb.scale[i]), float(tb.offset[i])
        a = tb.maps[k].astype(np.float64) if i in mapped else np.eye(d)
        if kind == "rotate":
            np.testing.assert_allclose(a @ a.T, np.eye(d), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(tb.dictionaries[i], axis=1), 1, atol=1e-5)
        tol = 2e-3 * max(1.0, np.abs(xb).max())  # float16 storage
        np.testing.assert_allclose(xb, ((xa - of) / sc) @ a * sc + of, atol=tol)
        n = sa.n_rows
        resid = {}
        for t, x in ((ta, xa), (tb, xb)):
            z = _dense(t, i, n)[:, t.concept_ids[i]]
            clean = z @ t.dictionaries[i].astype(np.float64) + t.channel_offsets[i]
            resid[id(t)] = (x - of) / sc - clean
        if noise == 0:
            assert np.abs(resid[id(tb)]).max() < tol / sc
        np.testing.assert_allclose(resid[id(tb)], resid[id(ta)] @ a, atol=2 * tol / sc)
        # the planted directions and gains map alike: row_b * factor_b = row_a * factor_a @ A
        ra = ta.dictionaries[i].astype(np.float64) * ta.factors[i][:, None]
        rb = tb.dictionaries[i].astype(np.float64) * tb.factors[i][:, None]
        np.testing.assert_allclose(rb, ra @ a, atol=1e-4)


def test_transform_validation_and_legacy(tmp_path):
    with pytest.raises(ValueError, match="--transform must be"):
        SynthConfig(store=tmp_path / "x", transform="shear")
    with pytest.raises(ValueError, match="--transform-models"):
        SynthConfig(
            store=tmp_path / "x", models=2, dims=(8,), transform="rotate", transform_models=(2,)
        )
    assert not SynthConfig(store=tmp_path / "x", transform="rotate").is_legacy()
    assert SynthConfig(store=tmp_path / "x", models=3).mapped_models() == ()
    assert SynthConfig(store=tmp_path / "x", transform="affine").mapped_models() == (1, 2)


def test_twin_store_maps_a_backbone(small, tmp_path):
    from usae.trainer.synth import load_maps, twin_store

    src = Store.open(small)
    out = twin_store(small, tmp_path / "t.zarr", "m1", transform="affine", seed=3)
    st_ = Store.open(out)
    assert st_.backbones == ["m1", "twin"] and st_.n_rows == src.n_rows
    maps, meta = load_maps(out)
    assert meta["of"] == {"twin": "m1"} and meta["transform"] == "affine"
    assert st_.attrs["extra"]["maps"] == {"twin": {"transform": "affine", "of": "m1"}}
    x, y = _all_rows(st_, "m1"), _all_rows(st_, "twin")
    np.testing.assert_array_equal(x, _all_rows(src, "m1"))
    np.testing.assert_allclose(y, x @ maps["twin"].astype(np.float64), atol=2e-3 * np.abs(y).max())
    assert twin_store(small, tmp_path / "t.zarr", "m1", transform="affine", seed=3) == out
