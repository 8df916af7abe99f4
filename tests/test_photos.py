"""Photos in the report: the store's record of its images (used without --manifest, overridden
by the flags, a moved folder warned about), the thumbnails, and the index page's gallery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image
from test_metrics import planted
from typer.testing import CliRunner
from usae.analysis import figures
from usae.analysis.photos import manifest_for
from usae.analysis.render import render_report, thumb_file
from usae.analysis.report import AnalyzeConfig, gallery_sets, run_analyze
from usae.pipeline.extract import image_source
from usae.pipeline.store import Store

from usae.cli import app


def _pictures(folder: Path, ids, colour=None) -> Path:
    """One PNG per image id under folder/imgs and folder/manifest.csv (paths relative to it);
    ``colour``: every picture that flat colour, else crops of a photo."""
    from skimage import data

    photo = data.astronaut()
    (folder / "imgs").mkdir(parents=True)
    for n, iid in enumerate(ids):
        pic = (
            np.full((40, 50, 3), colour, np.uint8)
            if colour is not None
            else photo[n * 9 : n * 9 + 120, n * 11 : n * 11 + 150]
        )
        Image.fromarray(np.ascontiguousarray(pic)).save(folder / "imgs" / f"{iid}.png")
    pd.DataFrame({"image_id": list(ids), "path": [f"imgs/{i}.png" for i in ids]}).to_csv(
        folder / "manifest.csv", index=False
    )
    return folder / "manifest.csv"


def _record(store: Store, manifest: Path, image_root: Path | None = None) -> Store:
    """Write the record `usae extract` writes (the same function, and the manifest's hash)
    onto a planted store."""
    from usae.pipeline.manifest import read_manifest

    attrs = zarr.open_group(str(store.path), mode="r+").attrs
    attrs["image_source"] = image_source(manifest, image_root)
    attrs["manifest_sha256"] = read_manifest(manifest).attrs["manifest_sha256"]
    return Store.open(store.path)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A planted run whose store records a manifest of photos (and that manifest)."""
    tmp = tmp_path_factory.mktemp("photos")
    p = planted(tmp, n_images=12, chunk_images=4)
    manifest = _pictures(tmp / "data", list(p.store.image_ids))
    return p, _record(p.store, manifest), manifest


def _cfg(p, store, out: Path, **kw) -> AnalyzeConfig:
    return AnalyzeConfig(
        run=str(p.run), store=str(store.path), out=str(out), top_concepts=2, top_images=3, **kw
    )


def _photo_thumbs(rep: Path) -> list[Path]:
    return [f for f in (rep / "thumbs").rglob("*.jpg") if "_" not in f.stem]


def test_analyze_without_flags_shows_the_recorded_photos(recorded, tmp_path):
    p, store, _ = recorded
    res = CliRunner().invoke(
        app,
        ["analyze", "--run", str(p.run), "--store", str(store.path), "--out", str(tmp_path / "r"),
         "--top-concepts", "2", "--top-images", "3"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["photos"] is True and m["warnings"] == [] and m["image_failures"] == []
    index = (tmp_path / "r" / "index.html").read_text()
    for g in m["gallery"]:
        for k in g["concepts"]:
            assert (tmp_path / "r" / thumb_file(k, 0)).is_file()
            assert f'src="{thumb_file(k, 0)}"' in index and f'href="concepts/{k}.html"' in index
            for key in m["backbones"]:
                assert f'src="{thumb_file(k, 0, key)}"' in index
            page = (tmp_path / "r" / "concepts" / f"{k}.html").read_text()
            assert f'src="../{thumb_file(k, 0)}"' in page
    assert "Photos unavailable" not in index


def test_flags_override_the_record(recorded, tmp_path):
    p, store, _ = recorded
    red = _pictures(tmp_path / "red", list(p.store.image_ids), colour=(250, 10, 10))
    res = run_analyze(_cfg(p, store, tmp_path / "r", manifest=str(red)), progress=False)
    assert res.metrics["photos"] and res.metrics["warnings"] == []
    shots = _photo_thumbs(tmp_path / "r")
    assert shots
    for f in shots:
        mean = np.asarray(Image.open(f)).reshape(-1, 3).mean(0)
        assert mean[0] > 200 and mean[1] < 40, (f, mean)
    # --image-root alone overrides the recorded root: the red folder's images, the record's table
    res = run_analyze(_cfg(p, store, tmp_path / "r2", image_root=str(red.parent)), progress=False)
    f = _photo_thumbs(tmp_path / "r2")[0]
    assert np.asarray(Image.open(f)).reshape(-1, 3).mean(0)[0] > 200


@pytest.mark.parametrize("what", ["manifest", "image_root"])
def test_moved_source_warns_and_the_report_is_written_without_photos(tmp_path, what):
    p = planted(tmp_path, n_images=8, chunk_images=4)
    manifest = _pictures(tmp_path / "data", list(p.store.image_ids))
    if what == "manifest":
        store = _record(p.store, manifest)
        shutil.move(tmp_path / "data", tmp_path / "elsewhere")
    else:  # the manifest stays, the image folder it was extracted with moves
        (tmp_path / "pics").mkdir()
        shutil.move(tmp_path / "data" / "imgs", tmp_path / "pics" / "imgs")
        store = _record(p.store, manifest, tmp_path / "pics")
        shutil.move(tmp_path / "pics", tmp_path / "pics2")
    res = CliRunner().invoke(
        app, ["analyze", "--run", str(p.run), "--store", str(store.path), "--out", str(tmp_path / "r")]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["photos"] is False and len(m["warnings"]) == 1
    assert "not found" in m["warnings"][0] and "\n" not in m["warnings"][0]
    assert "warning: the store's" in res.output
    assert _photo_thumbs(tmp_path / "r") == []
    assert list((tmp_path / "r" / "thumbs").rglob("*_*.jpg"))  # token maps on blank squares
    index = (tmp_path / "r" / "index.html").read_text()
    assert "Photos unavailable" in index and 'id="gallery"' in index


def test_a_store_without_the_record_works_as_before(tmp_path):
    p = planted(tmp_path, n_images=8, chunk_images=4)
    assert p.store.image_source is None
    res = run_analyze(_cfg(p, p.store, tmp_path / "r"), progress=False)
    assert res.metrics["photos"] is False and res.metrics["warnings"] == []
    notes: list[str] = []
    assert manifest_for("", "", p.store, notes) is None and notes == []


def test_manifest_for_returns_the_whole_table(tmp_path):
    p = planted(tmp_path, n_images=6, chunk_images=3)
    manifest = _pictures(tmp_path / "data", list(p.store.image_ids))
    df = pd.read_csv(manifest)
    df["label"] = [f"l{i % 2}" for i in range(len(df))]
    df.to_csv(manifest, index=False)
    store = _record(p.store, manifest)
    notes: list[str] = []
    got = manifest_for(None, None, store, notes)
    assert notes == [] and list(got["label"]) == list(df["label"])
    assert Path(got.attrs["image_root"]) == manifest.parent.resolve()
    df.iloc[:3].to_csv(manifest, index=False)  # the manifest was rewritten since extraction
    got = manifest_for(None, None, store, notes)
    assert len(got) == 3 and len(notes) == 1 and "changed since extraction" in notes[0]


# ---------------------------------------------------------------- gallery and thumbnails
def test_gallery_sets_order_and_top_n():
    df = pd.DataFrame(
        {
            "concept": range(9),
            "importance": [5.0, 1.0, 9.0, 3.0, 2.0, 8.0, 7.0, 4.0, 6.0],
            "members": ["all", "a", "all", "a+b", "", "b", "all", "a+b", "a"],
        }
    )
    got = gallery_sets(df, ["a", "b", "c"], 2)
    assert got == [
        {"members": "all", "concepts": [2, 6]},
        {"members": "a+b", "concepts": [7, 3]},
        {"members": "a", "concepts": [8, 1]},
        {"members": "b", "concepts": [5]},
        {"members": "c", "concepts": []},
    ]
    assert gallery_sets(df, ["a", "b", "c"], 0) == []
    assert gallery_sets(df.drop(columns="members"), ["a"], 3) == []


def test_token_map_without_photo_keeps_its_cells():
    v = np.zeros((14, 14), np.float32)
    v[2, 3] = 1.0
    img = figures.overlay(None, v).astype(float)
    cell = figures.THUMB / 14
    y0, x0 = int(2 * cell) + 1, int(3 * cell) + 1
    inside = img[y0 : int(3 * cell) - 1, x0 : int(4 * cell) - 1].mean((0, 1))
    assert np.abs(img[0, 0] - 0.9 * np.asarray(figures.BLANK) - 0).max() < 2  # 0: near blank
    assert inside.sum() > 3 * 200 and img[int(8 * cell), int(8 * cell)].sum() > 3 * 180
    assert np.abs(inside - np.array([252, 255, 164]) * 1.0).max() < 8  # inferno's top colour
    photo = np.full((figures.THUMB, figures.THUMB, 3), 100, np.uint8)
    over = figures.overlay(photo, np.zeros((14, 14), np.float32))
    assert np.abs(over.astype(float) - 85).max() < 2  # 0.85 photo + 0.15 inferno(0) (black)


def test_cards_show_labels_when_the_table_has_them(recorded, tmp_path):
    p, store, _ = recorded
    rep = tmp_path / "r"
    m = run_analyze(_cfg(p, store, rep), progress=False).metrics
    k0, k1 = m["gallery"][0]["concepts"][:2]
    df = pd.read_parquet(rep / "concepts.parquet")
    df["label_top"] = ""
    df["label_share"] = np.nan
    df.loc[k0, ["label_top", "label_share"]] = ["astronaut", 2 / 3]
    df.loc[k1, "label_top"] = "rocket"
    df.to_parquet(rep / "concepts.parquet", index=False)
    render_report(rep)
    index = (rep / "index.html").read_text()
    assert "astronaut (67%)" in index and ">rocket<" in index
    assert index.count('class="glabel"') == 2
    assert "astronaut (67%)" in (rep / "concepts" / f"{k0}.html").read_text()
