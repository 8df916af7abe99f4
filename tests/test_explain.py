"""`usae explain` (usae.analysis.explain) on tiny random-init backbones, end to end.

The run comes from the real stages (demo photos -> `run_extract` -> `run_train`), so explain
rebuilds the backbones from what the store recorded. The central check: an image that is in
the training store gets, bitwise, the codes its stored tokens get from the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner
from usae.analysis import explain as ex
from usae.pipeline.backbone import load_backbone
from usae.pipeline.demo_images import build_demo_images
from usae.pipeline.extract import ExtractConfig, run_extract
from usae.pipeline.registry import resolve
from usae.pipeline.store import Store
from usae.trainer.evaluate import encode_batch, prepare_model
from usae.trainer.model import load_run
from usae.trainer.train import TrainConfig, run_train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KEYS = ("dinov2", "siglip")
GRID = (7, 7)
M = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(store, run, manifest) of a short run on 8 demo images (compute dtype: auto)."""
    base = tmp_path_factory.mktemp("ex")
    manifest = build_demo_images(base / "demo", n=8, seed=0, show_progress=False)
    store = base / "s.zarr"
    run_extract(
        ExtractConfig(
            manifest=manifest,
            store=store,
            backbones=KEYS,
            tiny=True,
            random_init=True,
            device="cpu",
            grid=GRID,
            chunk_images=4,
            batch_size=4,
            progress=False,
        )  # fmt: skip
    )
    run = base / "run"
    run_train(
        TrainConfig(
            store=str(store),
            out=str(run),
            concepts=M,
            k=4,
            steps=30,
            batch_tokens=98,
            warmup_steps=3,
            holdout=0.25,
            dtype="fp32",
            device="cpu",
            log_every=10,
            ckpt_every=0,
        )  # fmt: skip
    )
    return Store.open(store), run, manifest


@pytest.fixture(scope="module")
def images(trained, tmp_path_factory):
    """A folder: 3 of the store's images, 2 new ones, one corrupt file; and a manifest of it
    listing a missing file too."""
    store, _, manifest = trained
    folder = tmp_path_factory.mktemp("new") / "imgs"
    folder.mkdir()
    df = pd.read_csv(manifest)
    src = Path(manifest).parent
    for p in df["path"][:3]:
        shutil.copy(src / p, folder / Path(p).name)
    new = build_demo_images(folder.parent / "other", n=2, seed=7, show_progress=False)
    for p in pd.read_csv(new)["path"]:
        shutil.copy(new.parent / p, folder / f"new_{Path(p).name}")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    listed = pd.DataFrame(
        {
            "image_id": [Path(p).stem for p in sorted(os.listdir(folder))] + ["gone"],
            "path": [f"imgs/{p}" for p in sorted(os.listdir(folder))] + ["imgs/missing.png"],
        }
    )
    listed.to_csv(folder.parent / "list.csv", index=False)
    return folder, folder.parent / "list.csv", [Path(p).stem for p in df["path"][:3]]


@pytest.fixture(scope="module")
def explained(trained, images, tmp_path_factory):
    _, run, _ = trained
    out = tmp_path_factory.mktemp("ex_out") / "o"
    res = ex.run_explain(
        ex.ExplainConfig(run=run, images=images[1], out=out, top=3, progress=False)
    )
    return res, out


def _dense(df: pd.DataFrame, image_id: str, key: str, t: int) -> np.ndarray:
    g = df[(df.image_id == image_id) & (df.backbone == key)]
    z = np.zeros((t, M), np.float32)
    z[g.token.to_numpy(), g.concept.to_numpy()] = g.value.to_numpy()
    return z


def test_store_images_get_their_stored_codes_bitwise(trained, images, explained):
    store, run, _ = trained
    res, out = explained
    model, _ = load_run(run)
    model = prepare_model(model, torch.float32, "cpu")
    codes = pd.read_parquet(out / "codes.parquet")
    t, ids = store.tokens_per_image, list(store.image_ids)
    for iid in images[2]:
        r = ids.index(iid)
        acts = [torch.from_numpy(store.read_rows(k, r * t, (r + 1) * t)) for k in KEYS]
        with torch.no_grad():
            _, cs = encode_batch(model, acts, torch.float32)
            want = [model.dense_codes(c).float().numpy() for c in cs]
        for i, key in enumerate(KEYS):
            got = _dense(codes, iid, key, t)
            assert want[i].any()
            assert np.array_equal(got, want[i]), (iid, key, np.abs(got - want[i]).max())


def test_bad_and_missing_images_are_named_and_skipped(explained, images):
    res, out = explained
    s = json.loads((out / "explain.json").read_text())
    reasons = {f["image_id"]: f["reason"] for f in s["failures"]}
    assert set(reasons) == {"broken", "gone"}
    assert "not an image" in reasons["broken"]
    assert s["n_images"] == 7 and s["explained"] == 5 == res.explained
    explained_ids = {im["image_id"] for im in s["images"]}
    assert explained_ids == {Path(p).stem for p in os.listdir(images[0])} - {"broken"}
    page = (out / "index.html").read_text()
    assert "Skipped images (2)" in page and "broken" in page and "missing.png" in page


def test_top_concepts_follow_the_codes(trained, explained):
    """The slow, obvious version: each image's top list recomputed from codes.parquet."""
    store, run, _ = trained
    _, out = explained
    s = json.loads((out / "explain.json").read_text())
    codes = pd.read_parquet(out / "codes.parquet")
    t = store.tokens_per_image
    top = pd.read_parquet(out / "top.parquet")
    for im in s["images"]:
        z = {key: _dense(codes, im["image_id"], key, t) for key in KEYS}
        for key in KEYS:
            mx = z[key].max(0)
            want = [k for k in sorted(range(M), key=lambda k: (-mx[k], k)) if mx[k] > 0][:3]
            got = im["top"][key]
            assert [e["concept"] for e in got] == want
            for e in got:
                k = e["concept"]
                assert e["max"] == pytest.approx(float(mx[k]))
                assert e["tokens"] == int((z[key][:, k] > 0).sum())
                assert e["fires_in"] == [kk for kk in KEYS if z[kk][:, k].max() > 0]
            rows = top[(top.image_id == im["image_id"]) & (top.backbone == key)]
            assert list(rows["concept"]) == want and list(rows["rank"]) == list(range(len(want)))


def test_thumbnails_and_page(explained):
    from PIL import Image

    _, out = explained
    s = json.loads((out / "explain.json").read_text())
    page = (out / "index.html").read_text()
    for im in s["images"]:
        n = im["index"]
        photo = out / ex.thumb_dir(n) / "photo.jpg"
        assert Image.open(photo).size == (128, 128)
        assert f"{ex.thumb_dir(n)}/photo.jpg" in page
        for key in KEYS:
            for e in im["top"][key]:
                for kk in KEYS:
                    f = ex.token_map_file(n, e["concept"], kk)
                    assert (out / f).is_file() and f in page


def test_member_sets_from_gains_and_report(trained, tmp_path):
    from usae.analysis.membership import GAIN_RATIO

    _, run, _ = trained
    model, _ = load_run(run)
    labels, source = ex.member_sets(model, KEYS, None)
    with torch.no_grad():
        g = np.stack([model.gain(j).numpy() for j in range(2)])
    for k in range(M):
        keep = [KEYS[i] for i in range(2) if g[i, k] >= GAIN_RATIO * g[:, k].max()]
        assert labels[k] == ("all" if len(keep) == 2 else "+".join(keep))
    assert "gains" in source
    rep = tmp_path / "rep"
    rep.mkdir()
    pd.DataFrame({"concept": range(M), "members": ["siglip"] * M}).to_parquet(
        rep / "concepts.parquet"
    )
    assert ex.member_sets(model, KEYS, rep)[0] == ["siglip"] * M
    pd.DataFrame({"concept": range(5), "members": ["x"] * 5}).to_parquet(rep / "concepts.parquet")
    with pytest.raises(ex.ExplainError, match="not this run's report"):
        ex.member_sets(model, KEYS, rep)


def _cli(*args):
    from usae.cli import app

    return CliRunner().invoke(app, ["explain", *map(str, args)])


def test_cli_folder_single_file_and_errors(trained, images, tmp_path):
    _, run, _ = trained
    res = _cli(
        "--run",
        run,
        "--images",
        images[0],
        "--out",
        tmp_path / "o",
        "--no-thumbs",
        "--batch-size",
        2,
    )
    assert res.exit_code == 0, res.output
    assert "explained 5 of 6 images (1 skipped)" in res.output
    assert not (tmp_path / "o" / "index.html").exists()
    one = sorted(images[0].glob("new_*"))[0]
    res = _cli("--run", run, "--images", one, "--out", tmp_path / "one", "--top", 2)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "one" / "explain.json").read_text())
    assert [im["image_id"] for im in s["images"]] == [one.stem]
    (tmp_path / "x.safetensors").write_bytes(b"")
    other = load_backbone(resolve("dinov2"), random_init=True, seed=5, tiny=True)
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(wrong))
    for bad, needle in (
        (["--images", tmp_path / "nothing"], "no such folder"),
        (["--images", images[0], "--top", 0], "--top"),
        (
            ["--images", images[0], "--weights", f"vit={tmp_path / 'x.safetensors'}"],
            "not in the run",
        ),
        (
            ["--images", images[0], "--weights", f"dinov2={wrong}"],
            "not the ones the store was extracted with",
        ),
    ):
        res = _cli("--run", run, "--out", tmp_path / "b", *bad)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert needle in " ".join(res.output.split()), res.output
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"junk")
    res = _cli("--run", run, "--images", only_bad, "--out", tmp_path / "ob")
    assert res.exit_code == 2 and "none of the 1 images" in res.output, res.output
    assert (
        json.loads((tmp_path / "ob" / "explain.json").read_text())["failures"][0]["image_id"] == "x"
    )


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_page_in_headless_chromium(explained, tmp_path):
    from test_browser import BROKEN_IMAGES, LOADED, Browser, Page, chromium_path

    _, out = explained
    s = json.loads((out / "explain.json").read_text())
    b = Browser(chromium_path(), tmp_path / "profile")
    try:
        page = Page(b)
        page.goto((out / "index.html").resolve().as_uri())
        assert page.js("document.title") == "usae explain"
        assert page.js("document.querySelectorAll('section.eimage').length") == s["explained"]
        assert page.js(BROKEN_IMAGES) == []
        n_maps = sum(len(v) for im in s["images"] for v in im["top"].values()) * len(KEYS)
        assert page.js(LOADED.format(sel=".eimage .gcard img")) == n_maps
        assert page.js(LOADED.format(sel=".eimage .ephoto img")) == s["explained"]
        assert "broken" in page.js("document.querySelector('section.failures').textContent")
        assert page.errors() == []
    finally:
        b.close()
