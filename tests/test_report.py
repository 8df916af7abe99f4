"""`usae analyze` end to end: report files, CLI options, refusals, baseline matching, images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_metrics import planted, random_run, write_run, write_store
from typer.testing import CliRunner
from usae.analysis import metrics as mx
from usae.analysis.report import AnalyzeConfig, AnalyzeError, run_analyze
from usae.trainer.evaluate import reconstruction
from usae.trainer.model import USAE, load_run

from usae.cli import app
from usae.runtime import holdout_mask


def _analyze(*args: str):
    return CliRunner().invoke(app, ["analyze", *args])


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rep")
    p = planted(tmp, n_images=30, holdout=0.4)
    res = _analyze(
        "--run",
        str(p.run),
        "--store",
        str(p.store.path),
        "--out",
        str(tmp / "report"),
        "--top-concepts",
        "3",
        "--top-images",
        "2",
        "--dtype",
        "fp64",
    )
    assert res.exit_code == 0, res.output
    return p, tmp / "report", res.output


def test_report_files_and_contents(planted_report):
    p, rep, output = planted_report
    for f in (
        "index.html",
        "concepts.parquet",
        "metrics.json",
        "figures/r2_matrix.png",
        "figures/firing_entropy.png",
        "figures/cofire_proportion.png",
        "figures/cofire_vs_importance.png",
    ):
        assert (rep / f).is_file(), f
    m = json.loads(
        (rep / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    held = holdout_mask(list(p.store.image_ids), 0.4)
    assert m["images"] == "holdout" and m["n_images"] == held.sum()
    assert m["n_tokens"] == held.sum() * p.store.tokens_per_image
    # the report's numbers are the streamed metrics on exactly the held-out images
    model, _ = load_run(p.run)
    s = mx.stream_sums(
        model, p.store, list(model.spec.backbones), held, dtype=torch.float64, top_images=2
    )
    np.testing.assert_allclose(m["r2"], reconstruction(s).r2, rtol=1e-12)
    df = pd.read_parquet(rep / "concepts.parquet")
    assert len(df) == model.spec.concepts and list(df["concept"]) == list(
        range(model.spec.concepts)
    )
    for k in model.spec.backbones:
        assert {f"fires_{k}", f"energy_{k}", f"cfp_{k}"} <= set(df.columns)
    np.testing.assert_array_equal(df["cofires"], s.cofires_m)
    assert df["firing_entropy"][p.universal].min() > 0.97 and m["dead"] == 1
    shown = set(m["top_concepts"]["importance"]) | set(m["top_concepts"]["universality"])
    assert shown and all((rep / "concepts" / f"{k}.html").is_file() for k in shown)
    from usae.analysis.render import thumb_file

    for k in shown:  # no photos (no manifest): each top image's token maps, one per backbone
        for n in range(len(m["top_images"][str(k)])):
            assert not (rep / thumb_file(k, n)).exists()
            for key in model.spec.backbones:
                assert (rep / thumb_file(k, n, key)).is_file(), (k, n, key)
    page = (rep / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained
    assert 'class="sortable"' in page and page.count("<tr") >= model.spec.concepts
    assert "usae analyze" in output and "report:" in output


def test_cli_options_mirror_config_fields():
    import typer.main

    cmd = typer.main.get_command(app).commands["analyze"]
    opts = {p.name for p in cmd.params}
    assert opts == {f.name for f in dataclasses.fields(AnalyzeConfig)}
    assert all(p.help for p in cmd.params)


def test_refuses_mismatched_store(tmp_path):
    store, run = random_run(tmp_path, widths=(5, 7))
    rows = store.n_rows
    rng = np.random.default_rng(0)
    other = write_store(
        tmp_path / "w.zarr",
        [
            rng.normal(size=(rows, 5)).astype(np.float16),
            rng.normal(size=(rows, 6)).astype(np.float16),
        ],
        store.n_images,
        store.grid,
    )
    res = _analyze("--run", str(run), "--store", str(other.path), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "widths differ" in res.output and "Traceback" not in res.output
    one = write_store(
        tmp_path / "one.zarr",
        [rng.normal(size=(rows, 5)).astype(np.float16)],
        store.n_images,
        store.grid,
    )
    res = _analyze("--run", str(run), "--store", str(one.path), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "lacks ['m1']" in res.output
    res = _analyze(
        "--run",
        str(run),
        "--store",
        str(store.path),
        "--out",
        str(tmp_path / "o"),
        "--images",
        "holdout",
    )
    assert res.exit_code == 2 and "held no images out" in res.output
    res = _analyze(
        "--run", str(tmp_path / "nope"), "--store", str(store.path), "--out", str(tmp_path / "o")
    )
    assert res.exit_code == 2 and "cannot load run" in res.output
    res = _analyze(
        "--run",
        str(run),
        "--store",
        str(store.path),
        "--out",
        str(tmp_path / "o"),
        "--images",
        "some",
    )
    assert (
        res.exit_code == 2
        and "Invalid value for '--images'" in res.output
        and "'some' is not one of" in res.output
    )
    with pytest.raises(AnalyzeError, match="--images must be one of"):  # the config's own check
        AnalyzeConfig(run=str(run), store=str(store.path), out="o", images="some")


def test_other_fingerprint_warns_and_uses_all_images(tmp_path):
    store, run = random_run(tmp_path, seed=1)
    cfgj = json.loads((run / "config.json").read_text())
    cfgj["train"]["holdout"] = 0.5
    cfgj["store"]["fingerprint"] = "0123456789abcdef"
    (run / "config.json").write_text(json.dumps(cfgj))
    res = run_analyze(
        AnalyzeConfig(run=str(run), store=str(store.path), out=str(tmp_path / "o"), top_concepts=2),
        progress=False,
    )
    assert res.metrics["images"] == "all" and res.metrics["n_images"] == store.n_images
    assert any("fingerprint" in w for w in res.metrics["warnings"])
    assert "fingerprint" in (tmp_path / "o" / "index.html").read_text()


def test_baseline_matching_recovers_permuted_dictionary(tmp_path):
    p = planted(tmp_path, n_images=8)
    model, _ = load_run(p.run)
    perm = np.random.default_rng(0).permutation(model.spec.concepts)
    indep = USAE(dataclasses.replace(model.spec, independent=True))
    indep.load_state_dict(model.state_dict())
    with torch.no_grad():
        for d in indep.decoders:
            d.copy_(d[torch.as_tensor(perm)] * 2.0)
    base = write_run(tmp_path / "indep", indep, p.store)
    res = run_analyze(
        AnalyzeConfig(
            run=str(p.run),
            store=str(p.store.path),
            out=str(tmp_path / "o"),
            baseline=str(base),
            top_concepts=1,
            match_top=4,
        ),
        progress=False,
    )
    for k in model.spec.backbones:
        v = res.metrics["baseline_matching"][k]
        assert v["all"]["share_matched"] == 1.0 and v["all"]["mean_cosine"] == pytest.approx(1.0)
        assert v["top4_cofiring"]["n"] == 4
        np.testing.assert_array_equal(
            perm[res.concepts[f"match_partner_{k}"]], np.arange(model.spec.concepts)
        )
    assert "share matched" in (tmp_path / "o" / "index.html").read_text()


def test_top_images_from_manifest_with_a_broken_one(tmp_path):
    from PIL import Image
    from skimage import data

    p = planted(tmp_path, n_images=10, chunk_images=4)
    photo = data.astronaut()
    (tmp_path / "imgs").mkdir()
    rows = []
    for n, iid in enumerate(p.store.image_ids):
        name = f"{iid}.png"
        if n % 2:
            (tmp_path / "imgs" / name).write_bytes(b"not an image")  # every odd image is broken
        else:
            Image.fromarray(photo[n * 20 : n * 20 + 120, n * 30 : n * 30 + 160]).save(
                tmp_path / "imgs" / name
            )
        rows.append({"image_id": iid, "path": f"imgs/{name}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    maxi = tmp_path / "maxi" / "0"
    maxi.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(maxi / "panel.png")
    cfg = AnalyzeConfig(
        run=str(p.run),
        store=str(p.store.path),
        out=str(tmp_path / "o"),
        manifest=str(tmp_path / "manifest.csv"),
        top_concepts=2,
        top_images=4,
        maximize=str(tmp_path / "maxi"),
    )
    res = run_analyze(cfg, progress=False)
    fails = res.metrics["image_failures"]
    shown = {t["image_id"] for ts in res.metrics["top_images"].values() for t in ts}
    bad = {iid for n, iid in enumerate(p.store.image_ids) if n % 2}
    assert fails and {f["image_id"] for f in fails} == shown & bad
    assert all("not an image" in f["reason"] for f in fails)
    assert (tmp_path / "o" / "maximize" / "0" / "panel.png").is_file()
    page0 = (tmp_path / "o" / "concepts" / "0.html").read_text()
    assert "../maximize/0/panel.png" in page0 and "Activation maximisation" in page0
    with pytest.raises(AnalyzeError, match="manifest"):
        run_analyze(
            dataclasses.replace(cfg, manifest=str(tmp_path / "missing.csv")), progress=False
        )


def test_training_line_omits_an_unknown_step_count():
    from usae.analysis.render import _trained

    t = {"recipe": "fidelity", "mode": "paper", "init": "data"}
    assert _trained({"training": {**t, "steps": 600}}).endswith("init data, 600 steps")
    line = _trained({"training": {**t, "steps": None}})
    assert "None" not in line and line.endswith("init data")
    assert _trained({"training": None}) == ""
