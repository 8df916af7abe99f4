"""Streaming concept metrics: planted ground truth, a dense in-memory reference, chunking.

Also home of the small planted stores / runs that test_report.py and test_browser.py reuse.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import dense_inputs_and_codes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from scipy import stats as sstats
from usae.analysis import metrics as mx
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer.evaluate import reconstruction
from usae.trainer.model import USAE, Codes, ModelSpec, load_run


# ---------------------------------------------------------------- planted stores and runs
class Planted(NamedTuple):
    store: Store
    run: Path
    codes_mnc: np.ndarray
    """(M, rows, concepts) planted codes per backbone."""
    universal: list[int]
    specific: dict[int, list[int]]
    dead: list[int]


def write_store(
    path: Path,
    acts: list[np.ndarray],
    n_images: int,
    grid=(2, 3),
    chunk_images=3,
    keys=None,
    seed=0,
) -> Store:
    keys = keys or [f"m{i}" for i in range(len(acts))]
    layouts = [BackboneLayout(k, a.shape[1]) for k, a in zip(keys, acts, strict=True)]
    st_ = Store.create(
        path,
        [f"img{i:04d}" for i in range(n_images)],
        layouts,
        grid=grid,
        chunk_images=chunk_images,
        source="synth",
        fingerprint_of={"seed": seed, "chunk": chunk_images, "n": n_images},
    )
    t = grid[0] * grid[1]
    for ci in range(st_.n_chunks):
        r0, r1 = st_.chunk_rows(ci)
        a, b = st_.chunk_images_range(ci)
        st_.write_chunk(
            ci, {k: x[r0:r1] for k, x in zip(keys, acts, strict=True)}, np.ones(b - a, bool)
        )
    st_.finalize()
    assert st_.n_rows == n_images * t
    return Store.open(path)


def write_run(path: Path, model: USAE, store: Store, train: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "schema_version": 1,
        "train": train or {"holdout": 0.0},
        "model": model.spec.to_dict(),
        "store": {
            "path": str(store.path),
            "fingerprint": store.attrs["fingerprint"],
            "backbones": list(model.spec.backbones),
        },
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors")
    )
    return path


def identity_bn_(model: USAE) -> None:
    for bn in model.bns:
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.data.fill_(1.0)
        bn.bias.data.zero_()


def planted(
    tmp: Path,
    n_images=24,
    grid=(2, 3),
    chunk_images=5,
    widths=(16, 20, 18),
    n_universal=4,
    n_specific=3,
    seed=0,
    holdout=0.0,
    keys: tuple[str, ...] | None = None,
) -> Planted:
    """Orthonormal planted concepts; the USAE's encoders/decoders are the planted dictionaries.

    Concept ids: universal first, then the specific ones of each backbone, then one dead one.
    Each token has 0-2 universal concepts (same value in every backbone) and 0-1 specific one.
    ``keys``: backbone (store group) keys, default m0, m1, ...
    """
    rng = np.random.default_rng(seed)
    n_models = len(widths)
    universal = list(range(n_universal))
    specific = {
        i: list(range(n_universal + i * n_specific, n_universal + (i + 1) * n_specific))
        for i in range(n_models)
    }
    m = n_universal + n_models * n_specific + 1
    dead = [m - 1]
    rows = n_images * grid[0] * grid[1]
    codes = np.zeros((n_models, rows, m))
    for r in range(rows):
        for c in rng.choice(universal, size=rng.integers(0, 3), replace=False):
            codes[:, r, c] = rng.uniform(0.5, 2.0)
        for i in range(n_models):
            if rng.random() < 0.5:
                codes[i, r, rng.choice(specific[i])] = rng.uniform(0.5, 2.0)
    keys = tuple(keys or (f"m{i}" for i in range(n_models)))
    spec = ModelSpec(
        keys,
        tuple(widths),
        (0.0,) * n_models,
        (1.0 - 1e-5,) * n_models,
        concepts=m,
        k=4,
    )
    model = USAE(spec)
    identity_bn_(model)
    acts = []
    with torch.no_grad():
        for i, d in enumerate(widths):
            own = universal + specific[i]
            q, _ = np.linalg.qr(rng.normal(size=(d, len(own))))
            dec = rng.normal(size=(m, d))  # rows of concepts this backbone never uses: arbitrary
            dec[own] = q.T
            model.decoders[i].copy_(torch.tensor(dec))
            w = np.zeros((m, d))
            w[own] = q.T
            b = np.full(m, -1.0)
            b[own] = 0.0
            model.encoders[i].weight.copy_(torch.tensor(w))
            model.encoders[i].bias.copy_(torch.tensor(b))
            acts.append(
                (
                    codes[i] @ (dec / np.linalg.norm(dec, axis=1, keepdims=True))
                    + 0.01 * rng.normal(size=(rows, d))
                ).astype(np.float16)
            )
    store = write_store(tmp / "s.zarr", acts, n_images, grid, chunk_images, keys=keys, seed=seed)
    run = write_run(tmp / "run", model, store, {"holdout": holdout})
    return Planted(store, run, codes, universal, specific, dead)


def random_run(
    tmp: Path,
    n_images=11,
    grid=(2, 2),
    chunk_images=3,
    widths=(5, 7),
    m=12,
    k=3,
    seed=0,
    independent=False,
    name="r",
) -> tuple[Store, Path]:
    """Random store + random USAE (random BN statistics): for reference comparisons."""
    rng = np.random.default_rng(seed)
    rows = n_images * grid[0] * grid[1]
    acts = [(rng.normal(size=(rows, d)) * 2 + 0.5).astype(np.float16) for d in widths]
    store = write_store(tmp / f"{name}.zarr", acts, n_images, grid, chunk_images, seed=seed)
    torch.manual_seed(seed)
    spec = ModelSpec(
        tuple(f"m{i}" for i in range(len(widths))),
        tuple(widths),
        (0.4,) * len(widths),
        (1.8,) * len(widths),
        concepts=m,
        k=k,
        independent=independent,
    )
    model = USAE(spec)
    with torch.no_grad():
        for bn in model.bns:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    return store, write_run(tmp / f"{name}_run", model, store)


# ---------------------------------------------------------------- dense reference
def dense_reference(
    model: USAE, store: Store, image_mask: np.ndarray, tau: float, g: int, score: str = "max"
) -> dict:
    """Slow, obvious: every row in memory, dense codes, numpy formulas straight from the spec."""
    model = model.double().eval()
    t = store.tokens_per_image
    rows = np.repeat(image_mask, t)
    n_models, m = model.n_models, model.spec.concepts
    xs, zs = dense_inputs_and_codes(model, store, image_mask)
    dec = [model.decoder_weight(j).detach().double().numpy() for j in range(n_models)]
    r2 = np.full((n_models, n_models), np.nan)
    r2c, mse = r2.copy(), r2.copy()
    for i, j in itertools.product(range(n_models), repeat=2):
        if model.spec.independent and i != j:
            continue
        x, xh = xs[j], zs[i] @ dec[j]
        mse[i, j] = ((x - xh) ** 2).mean()
        r2[i, j] = 1 - mse[i, j] / ((x - x.mean()) ** 2).mean()
        r2c[i, j] = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    z = np.stack(zs)  # (M, N, m)
    fired = z > tau
    fires = fired.sum(1)
    energy = np.stack(
        [np.linalg.norm(z[i].mean(0)[:, None] * dec[i], axis=1) for i in range(n_models)]
    )
    cof = fired.all(0).sum(0)
    union = fired.any(0).sum(0)
    fe = np.full(m, np.nan)
    for c in range(m):
        tot = fires[:, c].sum()
        if tot:
            p = fires[:, c] / tot
            fe[c] = -sum(pi * math.log2(pi) for pi in p if pi > 0) / math.log2(n_models)
    # per-image scores, then (score desc, image asc)
    imgs = np.flatnonzero(image_mask)
    per = z.reshape(n_models, len(imgs), t, m)
    s_nm = (per.max(2) if score == "max" else per.mean(2)).mean(0)
    top = np.full((m, g), -1)
    for c in range(m):
        order = sorted(
            (i for i in range(len(imgs)) if s_nm[i, c] > 0), key=lambda i: (-s_nm[i, c], i)
        )[:g]
        top[c, : len(order)] = imgs[order]
    return dict(
        r2=r2,
        r2c=r2c,
        mse=mse,
        l0=(z > 0).sum(2).mean(1),
        fires=fires,
        energy=energy,
        cofires=cof,
        union=union,
        fe=fe,
        top=top,
        n=int(rows.sum()),
    )


def _stream(store: Store, run: Path, mask=None, **kw) -> tuple[USAE, mx.Sums]:
    model, _ = load_run(run)
    mask = np.ones(store.n_images, bool) if mask is None else mask
    return model, mx.stream_sums(
        model, store, list(model.spec.backbones), mask, dtype=torch.float64, **kw
    )


# ---------------------------------------------------------------- tests
def test_planted_concepts_recovered(tmp_path):
    p = planted(tmp_path)
    model, s = _stream(p.store, p.run, tau=0.1, batch_tokens=17)
    table = mx.concept_table(s)
    rec = reconstruction(s)
    fe = table.firing_entropy_m
    assert (fe[p.universal] > 0.97).all(), fe[p.universal]
    spec_ids = [c for cs in p.specific.values() for c in cs]
    assert (fe[spec_ids] < 0.03).all(), fe[spec_ids]
    planted_fires = (p.codes_mnc > 0.1).sum(1)
    planted_cof = (p.codes_mnc > 0.1).all(0).sum(0)
    np.testing.assert_allclose(table.fires_mm, planted_fires, atol=0.01 * planted_fires.max())
    np.testing.assert_allclose(table.cofires_m, planted_cof, atol=0.01 * planted_cof.max())
    assert planted_cof[p.universal].min() > 10  # the check above is not vacuous
    assert table.cofires_m[spec_ids].sum() == 0
    assert table.dead_m.sum() == 1 and table.dead_m[p.dead].all()
    np.testing.assert_allclose(table.cfp_mm[:, p.universal], 1.0, atol=0.01)
    assert np.diag(rec.r2).min() > 0.95  # the planted dictionary rebuilds each backbone
    assert (rec.r2 < 1.0).all()


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("score", ["max", "mean"])
def test_streaming_equals_dense_reference(tmp_path, independent, score):
    store, run = random_run(tmp_path, independent=independent, seed=3 + independent)
    mask = np.arange(store.n_images) % 3 != 1
    model, s = _stream(store, run, mask, tau=0.1, batch_tokens=5, top_images=3, image_score=score)
    ref = dense_reference(load_run(run)[0], store, mask, 0.1, 3, score)
    rec, table = reconstruction(s), mx.concept_table(s)
    assert s.n_tokens == ref["n"]
    for got, want in [
        (rec.r2, ref["r2"]),
        (rec.r2_channel, ref["r2c"]),
        (rec.mse, ref["mse"]),
        (rec.l0, ref["l0"]),
        (table.energy_mm, ref["energy"]),
        (table.firing_entropy_m, ref["fe"]),
    ]:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(table.fires_mm, ref["fires"])
    np.testing.assert_array_equal(table.cofires_m, ref["cofires"])
    np.testing.assert_array_equal(table.union_m, ref["union"])
    np.testing.assert_array_equal(s.top_image_mg, ref["top"])
    assert ref["fires"].sum() > 0 and ref["cofires"].sum() > 0
    if independent:
        assert np.isnan(rec.r2[0, 1]) and np.isfinite(rec.r2[1, 1])


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunk=st.integers(1, 7), batch=st.integers(1, 40), seed=st.integers(0, 3))
def test_chunking_does_not_change_results(tmp_path_factory, chunk, batch, seed):
    """Same data, another store chunking and batch size -> identical counts, equal sums."""
    tmp = tmp_path_factory.mktemp("ch")
    store_a, run = random_run(tmp, chunk_images=4, seed=seed, name="a")
    rows = [store_a.read_rows(k, 0, store_a.n_rows) for k in store_a.backbones]
    store_b = write_store(tmp / "b.zarr", rows, store_a.n_images, store_a.grid, chunk, seed=seed)
    mask = np.arange(store_a.n_images) % 4 != 0
    _, sa = _stream(store_a, run, mask, batch_tokens=16, top_images=4)
    _, sb = _stream(store_b, run, mask, batch_tokens=batch, top_images=4)
    for f in ("fires_mm", "cofires_m", "union_m", "active", "top_image_mg"):
        np.testing.assert_array_equal(getattr(sa, f), getattr(sb, f))
    assert sa.n_tokens == sb.n_tokens
    np.testing.assert_allclose(sa.sum_z_mm, sb.sum_z_mm, rtol=1e-12)
    for i, j in itertools.product(range(2), repeat=2):
        np.testing.assert_allclose(sa.sse[i][j], sb.sse[i][j], rtol=1e-12)


def test_cofires_dead_and_union_constructed():
    """Hand-built codes: 3 backbones, k=2, m=5, concept 4 never fires."""
    spec = ModelSpec(("a", "b", "c"), (1, 1, 1), (0, 0, 0), (1, 1, 1), concepts=5, k=2)
    acc = mx._Accumulator(
        USAE(spec), tau=0.1, top_images=1, image_score="max", device=torch.device("cpu")
    )
    idx = [
        torch.tensor([[0, 1], [2, 3]]),
        torch.tensor([[1, 0], [2, 0]]),
        torch.tensor([[0, 3], [2, 1]]),
    ]
    val = [
        torch.tensor([[1.0, 1.0], [1.0, 0.05]]),
        torch.ones(2, 2),
        torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
    ]
    codes = [Codes(v, i, torch.zeros(2, 5)) for v, i in zip(val, idx, strict=True)]
    acc.add_batch(torch.zeros(2, 3), codes)
    s = acc.sums()
    np.testing.assert_array_equal(
        s.cofires_m, [1, 0, 1, 0, 0]
    )  # token 0: concept 0; token 1: concept 2
    np.testing.assert_array_equal(s.union_m, [2, 1, 1, 1, 0])  # concept 3 fires on token 0 only (c)
    np.testing.assert_array_equal(s.fires_mm, [[1, 1, 1, 0, 0], [2, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    t = mx.concept_table(s)
    np.testing.assert_array_equal(t.dead_m, [False, False, False, False, True])
    np.testing.assert_allclose(t.firing_entropy_m[[2, 3]], [1.0, 0.0])
    np.testing.assert_allclose(t.cfp_mm[:, 0], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(t.iou_m[:3], [0.5, 0.0, 1.0])
    assert np.isnan(t.firing_entropy_m[4]) and np.isnan(t.iou_m[4])


def test_cofire_vs_importance_matches_scipy():
    rng = np.random.default_rng(0)
    imp = 10 ** rng.normal(size=200)
    cof = np.round(10 ** (2 + 0.8 * np.log10(imp) + 0.3 * rng.normal(size=200)))
    cof[:10] = 0
    imp[10:15] = 0
    got = mx.cofire_vs_importance(cof, imp)
    ok = (cof > 0) & (imp > 0)
    lr = sstats.linregress(np.log10(imp[ok]), np.log10(cof[ok]))
    assert got.n == ok.sum() == 185
    assert got.r == pytest.approx(lr.rvalue, abs=1e-12) and got.slope == pytest.approx(
        lr.slope, abs=1e-12
    )
    big = mx.cofire_vs_importance(cof, imp, min_cofires=100)
    assert big.n == ((cof >= 100) & ok).sum()
    assert math.isnan(mx.cofire_vs_importance(cof[:2], imp[:2]).r)


def test_match_dictionaries_brute_force():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 4))
    b = rng.normal(size=(5, 4))
    got = mx.match_dictionaries(a, b)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = an @ bn.T
    best = max(itertools.permutations(range(5)), key=lambda p: sum(cos[i, p[i]] for i in range(5)))
    np.testing.assert_array_equal(got.partner_m, best)
    perm = rng.permutation(5)
    exact = mx.match_dictionaries(a, 3.0 * a[perm])  # scale does not matter, permutation is found
    np.testing.assert_array_equal(perm[exact.partner_m], np.arange(5))
    np.testing.assert_allclose(exact.cosine_m, 1.0)
    summ = mx.matching_summary(np.array([0.9, 0.2, 0.6, np.nan]))
    assert summ == {
        "n": 3,
        "share_matched": pytest.approx(2 / 3),
        "mean_cosine": pytest.approx(1.7 / 3),
    }


def test_token_maps_match_codes(tmp_path):
    p = planted(tmp_path, n_images=6, chunk_images=4)
    model, _ = load_run(p.run)
    maps = mx.token_maps(
        model, p.store, list(model.spec.backbones), [1, 4], [0, 5], dtype=torch.float64
    )
    assert maps.shape == (2, 2, 3, 2, 3)
    t = p.store.tokens_per_image
    want = p.codes_mnc[:, 4 * t : 5 * t, 5].reshape(3, 2, 3)  # image 4, concept 5, every backbone
    np.testing.assert_allclose(maps[1, 1], np.where(want > 0, want, 0), atol=0.05)


def oracle_run(tmp: Path, store_path: Path, k: int) -> Path:
    """A USAE whose decoders are a synth store's planted dictionaries (encoders: their pseudo-inverse)."""
    from usae.trainer.truth import load_truth

    truth = load_truth(store_path)
    store = Store.open(store_path)
    n_models = len(truth.backbones)
    m = int(truth.rate.shape[0])
    spec = ModelSpec(
        truth.backbones,
        tuple(int(d.shape[1]) for d in truth.dictionaries),
        tuple(float(o) for o in truth.offset),
        tuple(float(s) - 1e-5 for s in truth.scale),
        concepts=m,
        k=k,
    )
    model = USAE(
        spec
    )  # x_i = scale_i (z D_i + noise) + offset_i, so standardising gives z D_i + noise
    identity_bn_(model)
    with torch.no_grad():
        for i in range(n_models):
            ids = torch.as_tensor(truth.concept_ids[i])
            dct = torch.as_tensor(truth.dictionaries[i], dtype=torch.float32)
            model.encoders[i].weight.zero_()
            model.encoders[i].bias.fill_(-1.0)  # concepts this model lacks never fire
            model.encoders[i].weight[ids] = torch.linalg.pinv(dct).T  # exact codes: pinv(D) D^T = I
            model.encoders[i].bias[ids] = 0.0
            model.decoders[i][ids] = dct
    return write_run(tmp / "oracle", model, store)


def test_synth_store_oracle(tmp_path):
    """On a `usae synth` store, the planted dictionaries as a USAE: FE ~1 for universal concepts,
    0 for specific ones, co-fires close to the planted co-occurrence."""
    from usae.trainer.synth import SynthConfig, run_synth
    from usae.trainer.truth import load_truth

    cfg = SynthConfig(
        store=tmp_path / "s.zarr",
        models=3,
        dims=(96, 128, 112),
        universal=6,
        specific=4,
        tokens=4000,
        tokens_per_image=16,
        active=2.0,
        noise=0.02,
        seed=1,
    )
    run_synth(cfg, progress=False)
    store = Store.open(cfg.store)
    run = oracle_run(tmp_path, cfg.store, k=5)
    truth = load_truth(cfg.store)
    _, s = _stream(store, run, tau=0.1, batch_tokens=1000)
    t = mx.concept_table(s)
    u = truth.n_universal
    fe = t.firing_entropy_m
    assert (fe[:u] > 0.97).all(), fe[:u]
    assert np.nan_to_num(fe[u:], nan=0.0).max() < 0.03, fe[u:]
    for i in range(3):
        _, concept, value = truth.codes[i]
        planted_i = np.bincount(concept[value > 0.1], minlength=len(truth.rate))
        np.testing.assert_allclose(t.fires_mm[i], planted_i, rtol=0.03, atol=3)
    _, concept, value = truth.codes[0]
    planted = np.bincount(concept[value > 0.1], minlength=len(truth.rate))
    # universal concepts fire on the same tokens in every model: their co-fires are their fires
    np.testing.assert_allclose(t.cofires_m[:u], planted[:u], rtol=0.05, atol=5)
    assert planted[:u].min() > 50
    assert t.cofires_m[u:].sum() <= 0.01 * t.cofires_m[:u].sum()
