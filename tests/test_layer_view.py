"""Layer alignment: sparse pairwise co-fires against a dense reference, shared concepts, the
group order, the metrics.json entry, the heatmap and the report section on layered stores.

Stores have groups with '@' (``a@0``, ``a@1``, ``b@0``), as `usae extract NAME@N,M` writes them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics import identity_bn_, planted, write_run, write_store
from usae.analysis import metrics as mx
from usae.analysis.report import AnalyzeConfig, AnalyzeError, backbone_groups, run_analyze
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer.model import USAE, Codes, ModelSpec, load_run


# ---------------------------------------------------------------- stores and references
def random_layered(tmp: Path, keys, n_images=9, grid=(2, 2), chunk=4, m=10, k=3, seed=0):
    """Random store with the given group keys + random USAE over them (codes overlap a lot)."""
    rng = np.random.default_rng(seed)
    widths = [5 + i for i in range(len(keys))]
    rows = n_images * grid[0] * grid[1]
    acts = [(rng.normal(size=(rows, d)) * 2 + 0.5).astype(np.float16) for d in widths]
    store = write_store(tmp / "s.zarr", acts, n_images, grid, chunk, keys=list(keys), seed=seed)
    torch.manual_seed(seed)
    spec = ModelSpec(
        tuple(keys), tuple(widths), (0.4,) * len(keys), (1.8,) * len(keys), concepts=m, k=k
    )
    model = USAE(spec)
    with torch.no_grad():
        for bn in model.bns:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return store, write_run(tmp / "run", model, store)


def dense_pairs(model: USAE, store: Store, mask: np.ndarray, tau: float) -> np.ndarray:
    """Slow, obvious: dense codes of every row, (fired_i & fired_j) summed over tokens."""
    model = model.double().eval()
    rows = np.repeat(mask, store.tokens_per_image)
    fired = []
    with torch.no_grad():
        for i, key in enumerate(model.spec.backbones):
            a = torch.from_numpy(store.read_rows(key, 0, store.n_rows)[rows]).double()
            z = model.dense_codes(model.encode(i, model.standardize(i, a))).numpy()
            fired.append(z > tau)
    n = len(fired)
    out = np.zeros((n, n, model.spec.concepts), dtype=np.int64)
    for i, j in itertools.product(range(n), repeat=2):
        out[i, j] = (fired[i] & fired[j]).sum(0)
    return out


def slow_shared(pairs: np.ndarray, threshold: float, min_fires: int) -> np.ndarray:
    """The definition, one concept at a time."""
    n, _, m = pairs.shape
    out = np.zeros((n, n), dtype=np.int64)
    for i, j, c in itertools.product(range(n), range(n), range(m)):
        fi, fj = pairs[i, i, c], pairs[j, j, c]
        if min(fi, fj) >= max(min_fires, 1) and pairs[i, j, c] / min(fi, fj) >= threshold:
            out[i, j] += 1
    return out


def _stream(store, run, mask=None, **kw):
    model, _ = load_run(run)
    mask = np.ones(store.n_images, bool) if mask is None else mask
    return mx.stream_sums(model, store, list(model.spec.backbones), mask, dtype=torch.float64, **kw)


# ---------------------------------------------------------------- pairwise co-fires
@pytest.mark.parametrize(
    "keys,batch",
    [(("a@0", "a@1"), 7), (("a@0", "a@1", "b@0"), 5), (("b", "a@2", "a@0", "c@1"), 16)],
)
def test_pairwise_cofires_equal_dense_reference(tmp_path, keys, batch):
    store, run = random_layered(tmp_path, keys, seed=len(keys))
    mask = np.arange(store.n_images) % 3 != 1
    on = _stream(store, run, mask, batch_tokens=batch, top_images=2, pairwise=True)
    ref = dense_pairs(load_run(run)[0], store, mask, 0.1)
    np.testing.assert_array_equal(on.pair_cofires_mmm, ref)
    n = len(keys)
    off_diag = ref[~np.eye(n, dtype=bool)]
    assert off_diag.sum() > 0 and (off_diag < ref.max()).any()  # not vacuous
    # counting pairs changes nothing else the pass computes
    off = _stream(store, run, mask, batch_tokens=batch, top_images=2)
    assert off.pair_cofires_mmm is None
    for f in ("fires_mm", "cofires_m", "union_m", "active", "top_image_mg", "sum_z_mm"):
        np.testing.assert_array_equal(getattr(on, f), getattr(off, f))
    np.testing.assert_array_equal(np.diagonal(on.pair_cofires_mmm).T, on.fires_mm)


def test_pairwise_constructed():
    """Hand-built codes (3 backbones, k=2, m=5) with non-fired slots and repeated sentinels."""
    spec = ModelSpec(("a@0", "a@1", "b"), (1, 1, 1), (0, 0, 0), (1, 1, 1), concepts=5, k=2)
    idx = [
        torch.tensor([[0, 1], [2, 3], [4, 0]]),
        torch.tensor([[1, 0], [2, 0], [3, 4]]),
        torch.tensor([[0, 3], [2, 1], [4, 1]]),
    ]
    val = [
        torch.tensor([[1.0, 1.0], [1.0, 0.05], [0.0, 0.0]]),
        torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
        torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),
    ]
    codes = [Codes(v, i, torch.zeros(3, 5)) for v, i in zip(val, idx, strict=True)]
    accs = []
    for pairwise in (False, True):
        acc = mx._Accumulator(USAE(spec), 0.1, 1, "max", torch.device("cpu"), pairwise=pairwise)
        acc.add_batch(torch.zeros(3, 3), codes)
        accs.append(acc.sums())
    p = accs[1].pair_cofires_mmm
    # token 0: a@0 {0,1}, a@1 {1,0}, b {0,3}; token 1: {2}, {2,0}, {2}; token 2: {}, {}, {4}
    np.testing.assert_array_equal(p[0, 1], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(p[0, 2], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(p[1, 2], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(p, p.transpose(1, 0, 2))
    np.testing.assert_array_equal(p[[0, 1, 2], [0, 1, 2]], accs[1].fires_mm)
    for f in ("cofires_m", "union_m", "fires_mm"):
        np.testing.assert_array_equal(getattr(accs[0], f), getattr(accs[1], f))
    np.testing.assert_array_equal(accs[1].cofires_m, [1, 0, 1, 0, 0])


# ---------------------------------------------------------------- shared concepts and groups
@pytest.mark.parametrize("threshold,min_fires", [(0.5, 1), (0.5, 4), (0.9, 2), (1.0, 1)])
def test_shared_concepts_equal_slow_definition(threshold, min_fires):
    rng = np.random.default_rng(int(threshold * 10) + min_fires)
    n, m = 4, 60
    fires = rng.integers(0, 9, size=(n, m))
    pairs = np.zeros((n, n, m), dtype=np.int64)
    for i, j in itertools.combinations(range(n), 2):
        pairs[i, j] = pairs[j, i] = rng.integers(0, np.minimum(fires[i], fires[j]) + 1)
    pairs[np.arange(n), np.arange(n)] = fires
    pairs[0, 1, :5] = pairs[1, 0, :5] = np.minimum(fires[0, :5], fires[1, :5])  # proportion 1
    fires[:, 5] = 4
    pairs[:, :, 5] = 2  # proportion exactly 0.5: counts at threshold 0.5
    pairs[np.arange(n), np.arange(n), 5] = 4
    got = mx.shared_concepts(pairs, threshold, min_fires)
    np.testing.assert_array_equal(got, slow_shared(pairs, threshold, min_fires))
    assert got[~np.eye(n, dtype=bool)].sum() > 0
    np.testing.assert_array_equal(np.diag(got), (fires >= max(min_fires, 1)).sum(1))


def test_group_order_and_best_depths():
    G = mx.Group
    groups = [G("b", "b", None), G("a@2", "a", 2), G("b@0", "b", 0), G("a@0", "a", 0)]
    assert mx.has_layers(groups) and not mx.has_layers(groups[:2])
    # shared counts come from a planted pairwise matrix: concept c fires on the same 10 tokens
    # for every group in its set, so groups i and j share exactly the concepts both hold
    sets = [{0, 1, 2, 3}, {1, 2, 3}, {0, 3}, {0, 1, 2, 3}, {1, 3}]  # concepts -> group indices
    pairs = np.zeros((4, 4, len(sets)), dtype=np.int64)
    for c, s in enumerate(sets):
        for i, j in itertools.product(s, repeat=2):
            pairs[i, j, c] = 10
    e = mx.layer_alignment(groups, pairs, 0.5, 10)
    assert [g["key"] for g in e["groups"]] == ["b@0", "b", "a@0", "a@2"]  # None last
    assert e["groups"][1] == {"key": "b", "model": "b", "layer": None}
    order = [2, 0, 3, 1]
    np.testing.assert_array_equal(e["shared"], slow_shared(pairs, 0.5, 10)[np.ix_(order, order)])
    best = {(b["key_a"], b["model_b"]): (b["key_b"], b["shared"]) for b in e["best"]}
    assert len(e["best"]) == 8  # 2 models x 2 models x 2 depths, same model: other depth
    sh = np.asarray(e["shared"])
    keys = [g["key"] for g in e["groups"]]
    for ia, ka in enumerate(keys):
        for mb in ("a", "b"):
            cand = [j for j, k in enumerate(keys) if k.split("@")[0] == mb and j != ia]
            top = max(cand, key=lambda j: (sh[ia, j], -j))
            assert best[(ka, mb)] == (keys[top], sh[ia, top])
    assert best[("a@0", "b")] == ("b@0", 3)  # tie with b (None): the shallower wins
    empty = mx.layer_alignment(groups, np.zeros_like(pairs), 0.5, 10)
    assert all(b["layer_b"] is None and b["shared"] == 0 for b in empty["best"])


def test_groups_from_store_spec_records(tmp_path):
    """The store's spec record (model_key, layer) wins over the key; without one, the key."""
    rng = np.random.default_rng(0)
    lay = [
        BackboneLayout("early", 3, 0, {"model_key": "vit", "layer": 3}),
        BackboneLayout("late", 3, 0, {"model_key": "vit", "layer": None}),
        BackboneLayout("d@7", 3),
    ]
    st = Store.create(tmp_path / "s.zarr", ["i0"], lay, grid=(1, 2), chunk_images=1,
                      source="synth", fingerprint_of={"n": 1})  # fmt: skip
    st.write_chunk(
        0, {x.key: rng.normal(size=(2, 3)).astype(np.float16) for x in lay}, np.ones(1, bool)
    )
    st.finalize()
    got = backbone_groups(Store.open(tmp_path / "s.zarr"), ["early", "late", "d@7"])
    assert got == [
        mx.Group("early", "vit", 3),
        mx.Group("late", "vit", None),
        mx.Group("d@7", "d", 7),
    ]


# ---------------------------------------------------------------- planted layered store, report
SETS = {  # concept -> groups it lives in (indices into LAYER_KEYS); concept 10 is dead
    0: (1, 3), 1: (1, 3), 2: (1, 3), 3: (1, 3),  # a@0 ~ b@1
    4: (4, 2), 5: (4, 2),  # a@1 ~ b@0
    6: (1, 2),  # a@0 ~ b@0
    7: (0, 1, 2, 3, 4),  # everywhere
    8: (4, 3),  # a@1 ~ b@1
    9: (1,),  # a@0 only
}  # fmt: skip
LAYER_KEYS = ("c", "a@0", "b@0", "b@1", "a@1")  # run order on purpose not the view's order


def planted_layers(tmp: Path, n_images=40, grid=(2, 3), seed=0) -> tuple[Store, Path]:
    """Concepts planted in given sets of groups (same value wherever they live), orthonormal
    dictionaries, exact encoders: pairwise co-fires equal fires inside a concept's set."""
    rng = np.random.default_rng(seed)
    n, m, d = len(LAYER_KEYS), len(SETS) + 1, 10
    rows = n_images * grid[0] * grid[1]
    codes = np.zeros((n, rows, m))
    for r in range(rows):
        for c in rng.choice(len(SETS), size=rng.integers(0, 3), replace=False):
            codes[list(SETS[c]), r, c] = rng.uniform(0.5, 2.0)
    spec = ModelSpec(LAYER_KEYS, (d,) * n, (0.0,) * n, (1.0 - 1e-5,) * n, concepts=m, k=4)
    model = USAE(spec)
    identity_bn_(model)
    acts = []
    with torch.no_grad():
        for i in range(n):
            own = [c for c, s in SETS.items() if i in s]
            q, _ = np.linalg.qr(rng.normal(size=(d, len(own))))
            dec = rng.normal(size=(m, d))
            dec[own] = q.T
            model.decoders[i].copy_(torch.tensor(dec))
            w, b = np.zeros((m, d)), np.full(m, -1.0)
            w[own], b[own] = q.T, 0.0
            model.encoders[i].weight.copy_(torch.tensor(w))
            model.encoders[i].bias.copy_(torch.tensor(b))
            x = codes[i] @ (dec / np.linalg.norm(dec, axis=1, keepdims=True))
            acts.append((x + 0.01 * rng.normal(size=(rows, d))).astype(np.float16))
    store = write_store(tmp / "l.zarr", acts, n_images, grid, 5, keys=list(LAYER_KEYS), seed=seed)
    return store, write_run(tmp / "lrun", model, store)


@pytest.fixture(scope="module")
def layered_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lay")
    store, run = planted_layers(tmp)
    cfg = AnalyzeConfig(run=str(run), store=str(store.path), out=str(tmp / "rep"),
                        top_concepts=2, top_images=2, share_min_fires=5, dtype="fp64")  # fmt: skip
    res = run_analyze(cfg, progress=False)
    return store, run, cfg, res


def test_layer_alignment_entry_on_planted_layers(layered_report):
    store, run, cfg, res = layered_report
    rep = Path(cfg.out)
    m = json.loads((rep / "metrics.json").read_text())
    e = m["layer_alignment"]
    keys = [g["key"] for g in e["groups"]]
    assert keys == ["c", "a@0", "a@1", "b@0", "b@1"]  # models as first seen in the run, layers up
    assert e["groups"][0] == {"key": "c", "model": "c", "layer": None}
    assert e["threshold"] == 0.5 and e["min_fires"] == 5 and e["layers_present"] is True
    # against the slow reference on dense codes
    order = [LAYER_KEYS.index(k) for k in keys]
    ref = dense_pairs(load_run(run)[0], store, np.ones(store.n_images, bool), cfg.tau)
    np.testing.assert_array_equal(e["shared"], slow_shared(ref, 0.5, 5)[np.ix_(order, order)])
    # against the planted truth: i and j share the concepts both hold
    truth = np.array([[sum(1 for s in SETS.values() if LAYER_KEYS.index(a) in s and LAYER_KEYS.index(b) in s)
                       for b in keys] for a in keys])  # fmt: skip
    np.testing.assert_array_equal(e["shared"], truth)
    best = {(b["key_a"], b["model_b"]): b["key_b"] for b in e["best"]}
    assert best[("a@0", "b")] == "b@1" and best[("a@1", "b")] == "b@0"
    assert best[("b@1", "a")] == "a@0" and best[("b@0", "a")] == "a@1"
    assert best[("a@0", "a")] == "a@1" and ("c", "c") not in best
    r2 = np.asarray(m["r2"], dtype=float)
    np.testing.assert_allclose(np.asarray(e["r2"], dtype=float), r2[np.ix_(order, order)])


def test_layer_alignment_figure_and_section(layered_report):
    _, _, cfg, _ = layered_report
    rep = Path(cfg.out)
    png = (rep / "figures" / "layer_alignment.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    page = (rep / "index.html").read_text()
    assert 'id="layer-alignment"' in page and 'src="figures/layer_alignment.png"' in page
    assert page.count('src="figures/r2_matrix.png"') == 2  # beside the heatmap, and in Figures
    assert 'id="layer-best"' in page and "<td>b@1</td>" in page


def test_no_layers_no_view_unless_asked(tmp_path):
    p = planted(tmp_path, n_images=8, chunk_images=4)  # backbones m0, m1, m2: no layers
    cfg = AnalyzeConfig(run=str(p.run), store=str(p.store.path), out=str(tmp_path / "o"),
                        top_concepts=1, top_images=1)  # fmt: skip
    res = run_analyze(cfg, progress=False)
    assert res.metrics["layer_alignment"] is None
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["layer_alignment"] is None
    assert "layer-alignment" not in (tmp_path / "o" / "index.html").read_text()
    assert not (tmp_path / "o" / "figures" / "layer_alignment.png").exists()
    on = run_analyze(
        dataclasses.replace(cfg, layer_alignment="on", share_min_fires=2), progress=False
    )
    e = on.metrics["layer_alignment"]
    assert e is not None and e["layers_present"] is False
    assert [g["key"] for g in e["groups"]] == ["m0", "m1", "m2"]
    assert np.asarray(e["shared"])[0, 1] >= len(p.universal)  # the planted universal concepts
    assert (tmp_path / "o" / "figures" / "layer_alignment.png").is_file()
    assert 'id="layer-alignment"' in (tmp_path / "o" / "index.html").read_text()
    run_analyze(cfg, progress=False)  # auto again into the same folder: the old figure goes
    assert not (tmp_path / "o" / "figures" / "layer_alignment.png").exists()


def test_layered_off_and_bad_options(layered_report, tmp_path):
    store, run, cfg, _ = layered_report
    off = run_analyze(dataclasses.replace(cfg, out=str(tmp_path / "o"), layer_alignment="off"),
                      progress=False)  # fmt: skip
    assert off.metrics["layer_alignment"] is None
    for bad, msg in (
        ({"layer_alignment": "yes"}, "--layer-alignment"),
        ({"share_threshold": 0.0}, "--share-threshold"),
        ({"share_min_fires": 0}, "--share-min-fires"),
    ):
        with pytest.raises(AnalyzeError, match=msg):
            dataclasses.replace(cfg, **bad)


def test_trained_run_over_layers(tmp_path):
    """A real (tiny) training run over groups a@0, a@1, b@0, analysed: the entry is the slow
    reference's on the held-out images."""
    from test_train import make_store
    from usae.trainer.config import TrainConfig
    from usae.trainer.train import run_train

    src = Store.open(make_store(tmp_path / "src.zarr", n=16, t=8, widths=(6, 8, 7), chunk=4))
    acts = [src.read_rows(k, 0, src.n_rows) for k in src.backbones]
    store = write_store(
        tmp_path / "l.zarr", acts, src.n_images, src.grid, 4, keys=["a@0", "a@1", "b@0"]
    )
    run_train(TrainConfig(store=str(store.path), out=str(tmp_path / "run"), batch_tokens=32,
                          steps=6, concepts=12, k=3, log_every=3, ckpt_every=0, holdout=0.25,
                          dtype="fp32", device="cpu", warmup_steps=1))  # fmt: skip
    cfg = AnalyzeConfig(run=str(tmp_path / "run"), store=str(store.path), out=str(tmp_path / "o"),
                        top_concepts=1, top_images=1, share_min_fires=2, dtype="fp64")  # fmt: skip
    res = run_analyze(cfg, progress=False)
    e = res.metrics["layer_alignment"]
    assert [g["key"] for g in e["groups"]] == ["a@0", "a@1", "b@0"]
    from usae.runtime import heldout_images

    mask = store.valid & heldout_images(store, 0.25)
    assert res.metrics["images"] == "holdout" and res.metrics["n_images"] == mask.sum()
    ref = dense_pairs(load_run(tmp_path / "run")[0], store, mask, cfg.tau)
    np.testing.assert_array_equal(e["shared"], slow_shared(ref, 0.5, 2))
    assert np.asarray(e["shared"]).sum() > 0
