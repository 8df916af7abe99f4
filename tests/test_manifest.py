"""Manifests: folder -> table, table <-> Parquet/CSV, validation, content hash, CLI."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner
from usae.pipeline.cli import register
from usae.pipeline.manifest import (
    ManifestConfig,
    ManifestError,
    build_manifest,
    manifest_sha256,
    open_path,
    read_manifest,
    resolve_path,
    run_manifest,
    write_manifest,
)

from usae.errors import USER_ERROR_EXIT


def _touch(root: Path, rel: str, data: bytes | None = None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if data is not None else rel.encode())
    return p


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for rel in [
        "train/cat/001.jpg",
        "train/cat/002.JPG",
        "train/dog/001.png",
        "val/cat/003.jpg",
        "test/dog/004.webp",
        "misc/a.jpg",
        "misc/a.png",  # collides with misc/a.jpg -> both keep their extension
        "misc/a.jpg.png",  # its stem "misc/a.jpg" then collides too -> keeps extension
        "top.gif",
        "misc/notes.txt",  # not an image extension
        ".hidden/x.jpg",  # hidden folder
        "misc/.y.jpg",  # hidden file
    ]:
        _touch(root, rel)
    return root


def test_build_ids_paths_splits_hashes(tree: Path) -> None:
    df = build_manifest(tree, label_from_parent=True, show_progress=False)
    assert df["path"].tolist() == sorted(df["path"])  # deterministic order
    ids = dict(zip(df["path"], df["image_id"], strict=True))
    assert ids == {
        "misc/a.jpg": "misc/a.jpg",
        "misc/a.jpg.png": "misc/a.jpg.png",
        "misc/a.png": "misc/a.png",
        "test/dog/004.webp": "test/dog/004",
        "top.gif": "top",
        "train/cat/001.jpg": "train/cat/001",
        "train/cat/002.JPG": "train/cat/002",
        "train/dog/001.png": "train/dog/001",
        "val/cat/003.jpg": "val/cat/003",
    }
    split = dict(zip(df["path"], df["split"], strict=True))
    assert split["train/dog/001.png"] == "train" and split["val/cat/003.jpg"] == "val"
    assert (
        split["test/dog/004.webp"] == "test"
        and split["misc/a.jpg"] == ""
        and split["top.gif"] == ""
    )
    assert dict(zip(df["path"], df["label"], strict=True))["train/dog/001.png"] == "dog"
    for rel, digest in zip(df["path"], df["sha256"], strict=True):
        assert digest == hashlib.sha256(rel.encode()).hexdigest()
    assert df.attrs["ids_with_extension"] == 3
    # stable: the same folder gives the same table
    assert manifest_sha256(
        build_manifest(tree, label_from_parent=True, show_progress=False)
    ) == manifest_sha256(df)


def test_build_options(tree: Path) -> None:
    df = build_manifest(
        tree, split_from_dirs=False, hash_files=False, extensions=[".png"], show_progress=False
    )
    assert list(df.columns) == ["image_id", "path"]
    # a.png alone among .png files: no collision, so the stem id is used
    assert df["path"].tolist() == ["misc/a.jpg.png", "misc/a.png", "train/dog/001.png"]
    assert df["image_id"].tolist() == ["misc/a.jpg", "misc/a", "train/dog/001"]


def test_build_skips_symlinks_outside(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _touch(root, "in.jpg")
    outside = _touch(tmp_path, "secret.jpg")
    os.symlink(outside, root / "link.jpg")
    os.symlink(root / "in.jpg", root / "inner_link.jpg")
    df = build_manifest(root, show_progress=False)
    assert df["path"].tolist() == ["in.jpg", "inner_link.jpg"]
    assert df.attrs["skipped_symlinks"] == 1


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_read_roundtrip(tree: Path, suffix: str) -> None:
    df = build_manifest(tree, show_progress=False)
    out = write_manifest(df, tree / f"m{suffix}")
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, df.astype(str), check_like=False)
    assert back.attrs["image_root"] == str(tree)
    assert back.attrs["manifest_sha256"] == manifest_sha256(df)


def test_csv_and_parquet_hash_the_same(tree: Path) -> None:
    df = build_manifest(tree, show_progress=False)
    a = read_manifest(write_manifest(df, tree / "m.csv"))
    b = read_manifest(write_manifest(df, tree / "m.parquet"))
    assert a.attrs["manifest_sha256"] == b.attrs["manifest_sha256"]
    assert (tree / "m.csv").read_bytes() != (tree / "m.parquet").read_bytes()


def test_hash_content_rules() -> None:
    df = pd.DataFrame({"image_id": ["a", "b"], "path": ["a.jpg", "b.jpg"], "label": [1, 2]})
    h = manifest_sha256(df)
    assert h == manifest_sha256(df[["label", "path", "image_id"]])  # column order: no
    assert h == manifest_sha256(df.astype(str))  # dtype: no (content as text)
    assert h != manifest_sha256(df.iloc[::-1])  # row order: yes (it is the store's order)
    assert h != manifest_sha256(df.assign(label=[1, 3]))
    assert h != manifest_sha256(df.drop(columns="label"))
    # no ambiguity between cell boundaries
    x = pd.DataFrame({"image_id": ["a,b", "c"], "path": ["p", "q"]})
    y = pd.DataFrame({"image_id": ["a", "b,c"], "path": ["p", "q"]})
    assert manifest_sha256(x) != manifest_sha256(y)


def test_ids_read_as_strings(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image_id,path,label\n001,a.jpg,7\n2,b.jpg,\n")
    df = read_manifest(tmp_path / "m.csv")
    assert df["image_id"].tolist() == ["001", "2"]
    assert df["label"].tolist() == ["7", ""]
    pq = tmp_path / "n.parquet"
    pd.DataFrame({"image_id": [1, 2], "path": ["a.jpg", "b.jpg"]}).to_parquet(pq)
    assert read_manifest(pq)["image_id"].tolist() == ["1", "2"]


def test_duplicates_rejected_with_examples(tmp_path: Path) -> None:
    df = pd.DataFrame({"image_id": ["x", "y", "x", "z", "y", "x"], "path": list("abcdef")})
    (tmp_path / "m.csv").write_text(df.to_csv(index=False))
    with pytest.raises(ManifestError, match=r"2 duplicate image_id.*'x' x3.*'y' x2"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="duplicate"):
        write_manifest(df, tmp_path / "n.parquet")


def test_missing_columns_and_empty_values(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,path\na,a.jpg\n")
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['image_id'\]"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "e.csv").write_text("image_id,path\na,\nb,b.jpg\n")
    with pytest.raises(ManifestError, match="empty 'path'"):
        read_manifest(tmp_path / "e.csv")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match=r"\.parquet or \.csv"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "bad.parquet")


def _manifest_with(tmp_path: Path, paths: list[str]) -> Path:
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(paths))], "path": paths})
    return write_manifest(df, tmp_path / "root" / "m.parquet")


@pytest.mark.parametrize(
    "bad, why",
    [
        ("../x.jpg", "'..' leaves"),
        ("a/../../x.jpg", "'..' leaves"),
        ("ABS", "absolute path outside"),
        ("link/x.jpg", "symlink resolves outside"),
        ("filelink.jpg", "symlink resolves outside"),
        (
            "link/../x.jpg",
            "symlink resolves outside",
        ),  # '..' after a symlink: the OS follows the link first
    ],
)
def test_escaping_paths_rejected(tmp_path: Path, bad: str, why: str) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    _touch(outside, "x.jpg")
    root.mkdir()
    os.symlink(outside, root / "link")
    os.symlink(outside / "x.jpg", root / "filelink.jpg")
    bad = str(outside / "x.jpg") if bad == "ABS" else bad
    m = _manifest_with(tmp_path, ["ok.jpg", bad])
    with pytest.raises(ManifestError, match=f"1 path.*'i1'.*{why}"):
        read_manifest(m)


def test_allowed_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch(root, "sub/x.jpg")
    os.symlink(root / "sub", root / "inner")  # a symlink that stays inside is fine
    paths = [
        "sub/x.jpg",
        "sub/../sub/x.jpg",
        str(root / "sub" / "x.jpg"),
        "inner/x.jpg",
        "s3://bucket/k.jpg",
        "missing.jpg",
    ]
    df = read_manifest(_manifest_with(tmp_path, paths))
    assert df["path"].tolist() == paths
    # an explicit image root is used instead of the manifest's folder
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ManifestError, match="absolute path outside"):
        read_manifest(_manifest_with(tmp_path, [str(root / "sub" / "x.jpg")]), image_root=other)


def test_url_root_paths(tmp_path: Path) -> None:
    df = pd.DataFrame({"image_id": ["a", "b"], "path": ["x/a.jpg", "../b.jpg"]})
    m = write_manifest(df, tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="'b'.*leaves the image root"):
        read_manifest(m, image_root="memory://bucket/imgs")
    ok = read_manifest(
        write_manifest(df.iloc[:1], tmp_path / "ok.csv"), image_root="memory://bucket/imgs"
    )
    assert ok.attrs["image_root"] == "memory://bucket/imgs"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_at_a_url(tmp_path: Path, suffix: str) -> None:
    import fsspec

    df = pd.DataFrame({"image_id": ["a", "b"], "path": ["x/a.jpg", "b.jpg"], "label": [1, 2]})
    local = write_manifest(df, tmp_path / f"m{suffix}")
    fsspec.filesystem("memory").pipe(f"/usae-manifests/set/m{suffix}", local.read_bytes())
    back = read_manifest(f"memory://usae-manifests/set/m{suffix}")
    assert back.equals(read_manifest(local))
    assert back.attrs["image_root"] == "memory://usae-manifests/set"  # default: its folder
    assert back.attrs["manifest_sha256"] == manifest_sha256(df)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(f"memory://usae-manifests/set/missing{suffix}")


def test_resolve_and_open_path(tmp_path: Path) -> None:
    assert resolve_path(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    assert resolve_path(tmp_path, "/abs/b.jpg") == Path("/abs/b.jpg")
    assert resolve_path(tmp_path, "s3://b/k.jpg") == "s3://b/k.jpg"
    assert resolve_path("gs://bucket/root/", "a/b.jpg") == "gs://bucket/root/a/b.jpg"
    assert resolve_path(None, "a.jpg") == Path("a.jpg")
    _touch(tmp_path, "f.bin", b"local bytes")
    with open_path(resolve_path(tmp_path, "f.bin")) as fh:
        assert fh.read() == b"local bytes"
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/usae-test/root/f.bin", b"memory bytes")
    with open_path(resolve_path("memory://usae-test/root", "f.bin")) as fh:
        assert fh.read() == b"memory bytes"


# -------------------------------------------------------------- property: fast path check == slow rule
@pytest.fixture(scope="module")
def link_tree(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("links")
    root, outside = base / "root", base / "outside"
    _touch(root, "sub/x.jpg")
    _touch(root, "sub/deep/y.jpg")
    _touch(outside, "x.jpg")
    os.symlink(root / "sub", root / "link_in")
    os.symlink(root / "sub" / "deep", root / "link_deep")
    os.symlink(outside, root / "link_out")
    os.symlink(outside, root / "sub" / "link_out2")
    os.symlink(outside / "x.jpg", root / "filelink_out.jpg")
    os.symlink(root / "sub" / "x.jpg", root / "sub" / "filelink_in.jpg")
    return base


_PARTS = ["sub", "deep", "link_in", "link_deep", "link_out", "link_out2", "..", ".", "x.jpg", "y.jpg",
          "filelink_out.jpg", "filelink_in.jpg", "nope", "", "root"]  # fmt: skip


def _slow_escapes(root: Path, rel: str) -> bool:
    """The documented rule, obviously: lexically outside, or really (symlinks followed) outside."""
    joined = os.path.join(os.path.abspath(root), rel)
    lexical, real = os.path.normpath(joined), os.path.realpath(joined)
    r_abs, r_real = os.path.abspath(root), os.path.realpath(root)
    return not (lexical == r_abs or lexical.startswith(r_abs + os.sep)) or not (
        real == r_real or real.startswith(r_real + os.sep)
    )


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rels=st.lists(
        st.tuples(
            st.sampled_from(["", "ROOT/", "BASE/"]),
            st.lists(st.sampled_from(_PARTS), min_size=1, max_size=5),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_property_escape_check_matches_slow_rule(link_tree: Path, rels) -> None:
    from usae.pipeline.manifest import escaping_paths

    root = link_tree / "root"
    prefix = {"": "", "ROOT/": f"{root}/", "BASE/": f"{link_tree}/"}
    paths = [prefix[a] + "/".join(parts) for a, parts in rels]
    paths = [p or "x" for p in paths]
    df = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(paths))], "path": paths})
    got = {i for i, _ in escaping_paths(df, root)}
    assert got == {i for i, p in enumerate(paths) if _slow_escapes(root, p)}, paths


# -------------------------------------------------------------- property: write/read round trip
_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
_rows = st.lists(
    st.tuples(_text, _text, _text, st.one_of(st.none(), st.integers(-5, 5), _text)), max_size=12
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=_rows, fmt=st.sampled_from([".csv", ".parquet"]))
def test_property_write_read_roundtrip(tmp_path: Path, rows, fmt: str) -> None:
    ids = [f"id{i}:{r[0]}" for i, r in enumerate(rows)]  # unique and non-empty
    paths = [f"p{i}/{r[1]}".replace("..", "__") for i, r in enumerate(rows)]
    df = pd.DataFrame(
        {
            "image_id": ids,
            "path": paths,
            "split": [r[2] for r in rows],
            "label": [r[3] for r in rows],
        },
        columns=["image_id", "path", "split", "label"],
    )
    out = write_manifest(df, tmp_path / f"m{fmt}")
    back = read_manifest(out)
    expect_label = ["" if r[3] is None else str(r[3]) for r in rows]
    assert back["image_id"].tolist() == ids
    assert back["path"].tolist() == paths
    assert back["split"].tolist() == [r[2] for r in rows]
    assert back["label"].tolist() == expect_label
    assert list(back.columns) == ["image_id", "path", "split", "label"]
    assert back.attrs["manifest_sha256"] == manifest_sha256(df)
    # rewriting what was read gives the same bytes (a fixed point)
    again = write_manifest(back, tmp_path / f"again{fmt}")
    assert read_manifest(again).equals(back)


# -------------------------------------------------------------- command
def test_run_manifest_and_cli(tree: Path, tmp_path: Path) -> None:
    res = run_manifest(ManifestConfig(image_dir=tree, out=tree / "m.csv"))
    assert res.n_images == 9 and res.splits == {"train": 3, "val": 1, "test": 1, "": 4}
    assert res.manifest_sha256 == read_manifest(res.path).attrs["manifest_sha256"]

    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command so Typer keeps `manifest` as a subcommand
    def _noop() -> None: ...

    runner = CliRunner()

    def text(r) -> str:  # rich wraps long lines and draws boxes around errors
        return " ".join(re.sub("[\u2500-\u257f]", " ", r.output).split())

    r = runner.invoke(app, ["manifest", str(tree), "--out", str(tree / "m.parquet"), "--no-hash"])
    assert r.exit_code == 0, r.output
    assert "9 images" in text(r)
    df = read_manifest(tree / "m.parquet")
    assert "sha256" not in df.columns and len(df) == 9
    r = runner.invoke(
        app, ["manifest", str(tree), "--out", str(tmp_path / "m.csv"), "--extensions", ".png"]
    )
    assert r.exit_code == 0 and "image root" in text(r)  # manifest written outside the folder
    r = runner.invoke(app, ["manifest", str(tree / "nope"), "--out", str(tree / "x.csv")])
    assert r.exit_code != 0 and "not a folder" in text(r)
    r = runner.invoke(app, ["manifest", str(tree), "--out", str(tree / "x.json")])
    assert r.exit_code != 0 and ".parquet or .csv" in text(r)
    r = runner.invoke(
        app, ["manifest", str(tree), "--out", str(tree / "x.csv"), "--extensions", ".zzz"]
    )
    assert r.exit_code == USER_ERROR_EXIT and "no image files" in text(r)


def test_cli_options_mirror_config() -> None:
    import dataclasses

    app = typer.Typer(add_completion=False)
    register(app)
    cmd = typer.main.get_command(app).commands["manifest"]
    params = {p.name for p in cmd.params}
    assert params == {f.name for f in dataclasses.fields(ManifestConfig)}
    for p in cmd.params:
        assert getattr(p, "help", None) or p.name == "image_dir"


# -------------------------------------------------------------- demo images (real bundled photos)
def test_demo_images_offline_deterministic(tmp_path: Path, monkeypatch) -> None:
    import socket

    from usae.pipeline.demo_images import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, build_demo_images
    from usae.pipeline.images import load_image

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    n = len(SKIMAGE_PHOTOS) + len(SKLEARN_PHOTOS) + 5
    a = read_manifest(build_demo_images(tmp_path / "a", n=n, seed=0, show_progress=False))
    b = read_manifest(build_demo_images(tmp_path / "b", n=n, seed=0, show_progress=False))
    c = read_manifest(build_demo_images(tmp_path / "c", n=n, seed=1, show_progress=False))
    short = read_manifest(build_demo_images(tmp_path / "d", n=7, seed=0, show_progress=False))
    assert list(a.columns) == ["image_id", "path", "split", "label", "source", "sha256"]
    assert a.attrs["manifest_sha256"] == b.attrs["manifest_sha256"] != c.attrs["manifest_sha256"]
    pd.testing.assert_frame_equal(short, a.iloc[:7])  # image i does not depend on n
    assert set(a["source"]) == set(SKIMAGE_PHOTOS) | set(SKLEARN_PHOTOS)
    assert set(a["split"]) <= {"train", "val"} and (a["split"] == "train").sum() > n // 2
    for rel, digest in zip(a["path"], a["sha256"], strict=True):
        data = (tmp_path / "a" / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
        assert data == (tmp_path / "b" / rel).read_bytes()
        rgb = load_image(tmp_path / "a" / rel)
        assert rgb.shape[2] == 3 and 160 <= max(rgb.shape[:2]) <= 320 and rgb.std() > 1.0
    assert {Path(p).suffix for p in a["path"]} == {".jpg", ".png"}
    # data_manifests/example.csv is the start of this manifest (file bytes aside)
    example = read_manifest(
        Path(__file__).parents[1] / "data_manifests" / "example.csv", image_root=tmp_path / "a"
    )
    cols = ["image_id", "path", "split", "label", "source"]
    pd.testing.assert_frame_equal(example[cols], a[cols].iloc[: len(example)])


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(8, 2000),
    w=st.integers(8, 2000),
    seed=st.integers(0, 2**31),
    i=st.integers(0, 10**6),
)
def test_demo_crop_inside_photo(h: int, w: int, seed: int, i: int) -> None:
    from usae.pipeline.demo_images import draw_crop

    c = draw_crop(h, w, seed, i)
    assert 0 <= c.top and c.top + c.height <= h and 0 <= c.left and c.left + c.width <= w
    assert c.height >= 1 and c.width >= 1 and 160 <= c.long_side <= 320
    assert c == draw_crop(h, w, seed, i)
