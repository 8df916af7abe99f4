"""Concept labels and sparse probing (usae.analysis.labels): each piece against a slow obvious
version, the label sources and refusals, the report's files and pages, and end to end on a
planted store whose labels are tied to known concepts (and a shuffled-label control)."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics import planted, random_run
from usae.analysis import labels as lb
from usae.analysis import metrics as mx
from usae.analysis.report import AnalyzeConfig, AnalyzeError, run_analyze
from usae.trainer.model import load_run


# ---------------------------------------------------------------- statistics
def _auroc_pairs(s, y):
    pos, neg = s[y], s[~y]
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=30).filter(
        lambda v: len({b for _, b in v}) == 2
    )
)
def test_auroc_equals_pairwise_count(items):
    from sklearn.metrics import roc_auc_score

    s = np.array([a for a, _ in items], float)  # many ties
    y = np.array([b for _, b in items])
    assert lb.auroc(s, y) == pytest.approx(_auroc_pairs(s, y))
    assert lb.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_auroc_one_class_is_nan():
    assert np.isnan(lb.auroc(np.arange(3.0), np.ones(3, bool)))


def test_welch_t_matches_dense():
    rng = np.random.default_rng(0)
    x = rng.random((60, 9)) * (rng.random((60, 9)) < 0.4)
    codes = rng.integers(0, 3, 60)
    y = codes[:, None] == np.arange(3)[None]
    t = lb.welch_t(sp.csr_matrix(x), y)
    for c, lab in itertools.product(range(9), range(3)):
        a, b = x[y[:, lab], c], x[~y[:, lab], c]
        ref = (a.mean() - b.mean()) / np.sqrt(a.var() / len(a) + b.var() / len(b) + 1e-12)
        assert t[c, lab] == pytest.approx(ref, rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------- top labels
def test_top_labels_match_counter():
    rng = np.random.default_rng(1)
    classes = ("ant", "bee", "cat", "dog")
    codes = rng.integers(-1, 4, 40)  # -1: unlabelled
    labels = lb.Labels(codes, classes, "label", "store")
    top = rng.integers(-1, 40, (25, 8))  # -1: empty slot
    top[3] = -1
    out = lb.top_labels(top, labels, n_top=6)
    for k in range(25):
        names = [classes[codes[g]] for g in top[k, :6] if g >= 0 and codes[g] >= 0]
        if not names:
            assert out["label_top"][k] == "" and np.isnan(out["label_share"][k])
            assert out["labels_top"][k] == ""
            continue
        ranked = sorted(Counter(names).items(), key=lambda kv: (-kv[1], kv[0]))
        assert out["label_top"][k] == ranked[0][0]
        assert out["label_share"][k] == pytest.approx(ranked[0][1] / len(names))
        want = ", ".join(f"{n} {100 * c / len(names):.0f}%" for n, c in ranked[:3])
        assert out["labels_top"][k] == want


def test_top_labels_without_labels():
    out = lb.top_labels(np.zeros((4, 3), np.int64), None, 3)
    assert list(out["label_top"]) == [""] * 4 and out["label_share"].isna().all()


# ---------------------------------------------------------------- label sources
def _manifest(**cols):
    n = len(next(iter(cols.values())))
    return pd.DataFrame({"image_id": [f"i{n_}" for n_ in range(n)], "path": ["x"] * n, **cols})


def test_label_table_sources_and_refusals():
    man = _manifest(label=["a", None, "b"], kind=["x", "y", ""])
    store = pd.Series(["p", "q", "p"], index=["i0", "i1", "i2"])
    s, src = lb.label_table(man, store, "label")
    assert src == "manifest" and s.to_dict() == {"i0": "a", "i2": "b"}  # missing left out
    s, src = lb.label_table(man, store, "kind")
    assert s.to_dict() == {"i0": "x", "i1": "y"}
    s, src = lb.label_table(_manifest(other=[1, 2, 3]), store, "label")
    assert src == "store" and len(s) == 3  # the default column falls back to the store's array
    assert lb.label_table(None, None, "label") is None
    assert lb.label_table(man, store, "") is None
    with pytest.raises(lb.LabelError, match="no column 'nope'"):
        lb.label_table(man, store, "nope")
    with pytest.raises(lb.LabelError, match="no --manifest"):
        lb.label_table(None, store, "kind")


def test_encode_labels_single_class_is_none():
    s = pd.Series(["a", "a"], index=["i0", "i1"])
    assert lb.encode_labels(s, ["i0", "i1", "i2"], "label", "store") is None
    s = pd.Series(["b", "a"], index=["i0", "i1"])
    e = lb.encode_labels(s, ["i2", "i1", "i0"], "label", "store")
    assert e.classes == ("a", "b") and e.codes_n.tolist() == [-1, 0, 1]


def test_probe_set_is_a_stable_hash_sample():
    ids = [f"img{i}" for i in range(300)]
    codes = np.where(np.arange(300) % 7 == 0, -1, np.arange(300) % 3)
    labels = lb.Labels(codes, ("a", "b", "c"), "label", "store")
    mask = np.arange(300) % 5 != 0
    ps = lb.probe_set(mask, labels, ids, cap=100)
    assert len(ps.images_n) == 100 and ps.n_labelled == int((mask & (codes >= 0)).sum())
    assert np.all(np.diff(ps.images_n) > 0) and mask[ps.images_n].all()
    assert (codes[ps.images_n] >= 0).all() and 0.3 < ps.test_n.mean() < 0.7
    # the same images whatever the store order
    perm = np.random.default_rng(0).permutation(300)
    ps2 = lb.probe_set(
        mask[perm],
        lb.Labels(codes[perm], labels.classes, "label", "s"),
        [ids[i] for i in perm],
        100,
    )
    assert sorted(ids[i] for i in ps.images_n) == sorted(ids[perm[i]] for i in ps2.images_n)
    test1 = {ids[i] for i, t in zip(ps.images_n, ps.test_n, strict=True) if t}
    test2 = {ids[perm[i]] for i, t in zip(ps2.images_n, ps2.test_n, strict=True) if t}
    assert test1 == test2


# ---------------------------------------------------------------- features from the pass
@pytest.mark.parametrize("score", ["max", "mean"])
def test_collected_maxima_equal_dense_max_over_tokens(tmp_path, score):
    store, run = random_run(tmp_path, n_images=13, chunk_images=4, m=10, k=3)
    model, _ = load_run(run)
    mask = np.ones(13, bool)
    mask[[2, 7]] = False
    probe = np.array([0, 3, 4, 8, 12])
    col = lb.MaximaCollector(probe, model.n_models, model.spec.concepts)
    mx.stream_sums(model, store, list(model.spec.backbones), mask, dtype=torch.float64,
                   image_score=score, image_maxima=col, batch_tokens=5)  # fmt: skip
    xs = col.matrices()
    t = store.tokens_per_image
    m = model.double().eval()
    with torch.no_grad():
        for i, key in enumerate(model.spec.backbones):
            a = torch.from_numpy(store.read_rows(key, 0, store.n_rows)).double()
            z = m.dense_codes(m.encode(i, m.standardize(i, a))).numpy()
            ref = z.reshape(13, t, -1).max(1)[probe]
            np.testing.assert_allclose(xs[i].toarray(), ref, rtol=1e-6)
            assert sp.issparse(xs[i]) and xs[i].nnz == int((ref > 0).sum())


# ---------------------------------------------------------------- the probe on constructed features
def _features(n=600, m=40, n_labels=4, seed=0):
    """Concept l (< n_labels) is large on images of label l; the rest is noise."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_labels, n)
    x = rng.random((n, m)) * (rng.random((n, m)) < 0.3)
    x[np.arange(n), codes] += 1.0 + rng.random(n)
    return sp.csr_matrix(x), codes, rng.random(n) < 0.5


def test_probe_finds_the_planted_detector():
    x, codes, test = _features()
    per = lb.probe([x], ["m0"], codes, test, ("a", "b", "c", "d"))
    for e in per:
        r = e["models"]["m0"]
        assert r["best_concept"] == "abcd".index(e["label"]) and r["auroc"] > 0.95
        assert r["probe"]["1"]["concepts"][0] == r["best_concept"]
        assert r["probe"]["5"]["balanced_accuracy"] > 0.9 and len(r["probe"]["5"]["concepts"]) == 5


def test_probe_shuffled_labels_at_chance():
    x, codes, test = _features(n=4000, seed=1)
    shuffled = np.random.default_rng(2).permutation(codes)
    per = lb.probe([x], ["m0"], shuffled, test, ("a", "b", "c", "d"))
    au = [e["models"]["m0"]["auroc"] for e in per]
    assert abs(np.mean(au) - 0.5) < 0.03 and max(abs(a - 0.5) for a in au) < 0.06, au


def test_probe_skips_labels_too_rare():
    x, codes, test = _features(n=200)
    codes = codes.copy()
    codes[:] = np.where(codes == 3, 0, codes)
    codes[0] = 3  # one image of label d
    per = lb.probe([x], ["m0"], codes, test, ("a", "b", "c", "d"))
    rare = next(e for e in per if e["label"] == "d")
    assert rare["models"] == {} and rare["n_images"] == 1


# ---------------------------------------------------------------- the report
def _store_labels(store, names):
    store._root.create_array("label", shape=(len(names),), dtype=str, chunks=(len(names),))
    store._root["label"][:] = np.asarray(names, dtype=object)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The planted store of test_metrics with labels: image g has label "u<c>" when universal
    concept c is the largest of its max codes (so concept c detects label u<c>)."""
    tmp = tmp_path_factory.mktemp("lab")
    p = planted(tmp, n_images=60, chunk_images=7)
    t = p.store.tokens_per_image
    per_image = p.codes_mnc[0].reshape(60, t, -1).max(1)[:, p.universal]
    names = [f"u{int(c)}" for c in per_image.argmax(1)]
    from usae.pipeline.store import Store

    _store_labels(Store(p.store.path, mode="r+"), names)
    return p, names


def test_report_labels_files_and_page(labelled, tmp_path):
    p, names = labelled
    out = tmp_path / "rep"
    res = run_analyze(
        AnalyzeConfig(run=str(p.run), store=str(p.store.path), out=str(out), top_concepts=3,
                      label_top_images=10, dtype="fp64"), progress=False,
    )  # fmt: skip
    df = pd.read_parquet(out / "concepts.parquet")
    assert {"label_top", "label_share", "labels_top"} <= set(df.columns)
    assert pd.api.types.is_string_dtype(df["label_top"]) and df["label_share"].dtype == float
    m = json.loads((out / "metrics.json").read_text())
    lab = m["labels"]
    assert lab["source"] == "store" and lab["n_classes"] == len(set(names))
    assert lab["train_images"] + lab["test_images"] == lab["probe_images"] == 60
    assert lab["chance"]["auroc"] == 0.5
    for e in lab["per_label"]:
        for r in e["models"].values():
            assert r["auroc"] is None or 0 <= r["auroc"] <= 1
            assert set(r["probe"]) == {"1", "5"}
    html = (out / "index.html").read_text()
    assert 'id="labels"' in html and "AUROC" in html
    best = {r["best_concept"] for e in lab["per_label"] for r in e["models"].values()}
    pages = {int(f.stem) for f in (out / "concepts").glob("*.html")}
    for c in best & pages:
        assert f'href="concepts/{c}.html"' in html
    # the shown top images stay --top-images long though 10 were kept for the labels
    assert all(len(v) <= 6 for v in m["top_images"].values())
    # each universal concept's top images are mostly of its own label
    for c in p.universal:
        if df["label_top"][c]:
            assert df["label_top"][c] == f"u{c}", df.loc[c, ["label_top", "labels_top"]]
    assert res.metrics["labels"]["per_label"]


def test_report_without_labels(labelled, tmp_path):
    p, _ = labelled
    out = tmp_path / "rep"
    run_analyze(AnalyzeConfig(run=str(p.run), store=str(p.store.path), out=str(out),
                              label_column=""), progress=False)  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["labels"] is None and 'id="labels"' not in (out / "index.html").read_text()
    df = pd.read_parquet(out / "concepts.parquet")
    assert (df["label_top"] == "").all() and df["label_share"].isna().all()


def test_report_store_without_labels_and_bad_column(tmp_path):
    store, run = random_run(tmp_path)
    out = tmp_path / "rep"
    run_analyze(AnalyzeConfig(run=str(run), store=str(store.path), out=str(out)), progress=False)
    assert json.loads((out / "metrics.json").read_text())["labels"] is None
    with pytest.raises(AnalyzeError, match="--label-column species"):
        run_analyze(AnalyzeConfig(run=str(run), store=str(store.path), out=str(out),
                                  label_column="species"), progress=False)  # fmt: skip


def test_manifest_labels_and_cli_error(labelled, tmp_path):
    from typer.testing import CliRunner

    from usae.cli import app

    p, names = labelled
    ids = list(p.store.image_ids)
    man = tmp_path / "m.csv"
    pd.DataFrame({"image_id": ids, "path": [f"{i}.png" for i in ids], "species": names,
                  "label": ["one"] * len(ids)}).to_csv(man, index=False)  # fmt: skip
    out = tmp_path / "rep"
    common = ["analyze", "--run", str(p.run), "--store", str(p.store.path), "--out", str(out),
              "--manifest", str(man), "--top-concepts", "1", "--top-images", "1"]  # fmt: skip
    res = CliRunner().invoke(app, [*common, "--label-column", "species"])
    assert res.exit_code == 0, res.output
    lab = json.loads((out / "metrics.json").read_text())["labels"]
    assert lab["source"] == "manifest" and lab["column"] == "species"
    # the manifest's single-class label column: no labels section, nothing fails
    res = CliRunner().invoke(app, common)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["labels"] is None
    res = CliRunner().invoke(app, [*common, "--label-column", "nope"])
    assert res.exit_code == 2 and "no column 'nope'" in res.output


# ---------------------------------------------------------------- planted labels, trained
SYNTH = dict(models=3, dims=(48, 64, 64), universal=16, specific=8, tokens=24_000,
             tokens_per_image=16, active=3.0, noise=0.05, seed=0, save_codes=False, labels=8)  # fmt: skip
TRAIN = dict(concepts=96, k=3, lr=3e-3, lr_min=3e-4, batch_tokens=1024, warmup_steps=100,
             holdout=0.1, dtype="fp32", device="cpu", log_every=500, ckpt_every=0, seed=0)  # fmt: skip


@pytest.mark.slow
def test_planted_labels_found_by_their_concepts(tmp_path):
    from usae.trainer.synth import SynthConfig, run_synth
    from usae.trainer.train import TrainConfig, run_train
    from usae.trainer.truth import load_truth, recovery

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_synth(SynthConfig(store=tmp_path / "s.zarr", **SYNTH), progress=False)
        run_synth(
            SynthConfig(store=tmp_path / "x.zarr", shuffle_labels=True, **SYNTH), progress=False
        )
        res = run_train(
            TrainConfig(
                store=str(tmp_path / "s.zarr"), out=str(tmp_path / "run"), steps=1500, **TRAIN
            )
        )
        reports = {
            name: run_analyze(AnalyzeConfig(run=str(res.run_dir), store=str(tmp_path / f"{name}.zarr"),
                                            out=str(tmp_path / name), images="all", top_concepts=2),
                              progress=False).metrics["labels"]
            for name in ("s", "x")
        }  # fmt: skip
    finally:
        torch.set_num_threads(n)
    model, _ = load_run(res.run_dir)
    truth = load_truth(tmp_path / "s.zarr")
    rec = recovery(model, truth)
    planted_of = {
        name: int(c) for name, c in zip(truth.label_names, truth.label_concepts, strict=True)
    }
    for key in model.spec.backbones:
        per = reports["s"]["per_label"]
        hits = [
            e["models"][key]["best_concept"] == rec.match_c[planted_of[e["label"]]] for e in per
        ]
        assert len(per) == 8 and np.mean(hits) >= 0.9, (key, hits)
        assert min(e["models"][key]["auroc"] for e in per) > 0.9
        assert reports["s"]["summary"][key]["mean_balanced_accuracy"]["5"] > 0.9
        # the shuffled-label control: chance on the held-out images
        assert abs(reports["x"]["summary"][key]["mean_auroc"] - 0.5) < 0.05, reports["x"]["summary"]
