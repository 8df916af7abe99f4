"""The bad-input corpus: files that are odd (decode to a documented picture) or broken (fail
with a clear reason), first through ``load_image``, then through the real ``usae extract``
mixed with good photos: every broken file becomes one row of the store's failures table
(image_id, path, reason) with its image masked invalid, every other image is valid with
finite tokens, and too many failures make the run exit non-zero."""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from usae.pipeline.images import ImageError, load_image
from usae.pipeline.manifest import write_manifest

from usae.errors import USER_ERROR_EXIT


class Case(NamedTuple):
    """One corpus file and what decoding it must give."""

    name: str  # file name (also the image id)
    write: Callable[[Path], None] | None  # writes the file at the given path (None: no file)
    shape: tuple[int, int] | None  # decoded (H, W) when it must decode
    reason: str | None  # regex the failure reason must match when it must fail


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _pil(im: Image.Image, **kw) -> Callable[[Path], None]:
    return lambda p: im.save(p, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gray_png(w: int, h: int) -> bytes:
    """A genuine all-black w x h grayscale PNG built row block by row block (tiny on disk)."""
    comp, row, idat = zlib.compressobj(9), b"\x00" * (w + 1), bytearray()
    for r0 in range(0, h, 256):
        idat += comp.compress(row * min(256, h - r0))
    idat += comp.flush()
    head = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")


def _claims(w: int, h: int) -> bytes:
    """A small PNG whose header claims w x h pixels (valid CRC)."""
    data = bytearray(_gray_png(16, 16))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _palette(transparent: bool) -> Image.Image:
    im = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) % 3, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    if transparent:
        im.info["transparency"] = 1
    return im


def _animated(fmt: str, **kw) -> Callable[[Path], None]:
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _pil(frames[0], format=fmt, save_all=True, append_images=frames[1:], duration=40, **kw)


def _exif_rotated() -> Callable[[Path], None]:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return _pil(Image.fromarray(_rgb(20, 40, 3)), format="JPEG", exif=exif.tobytes())


@functools.cache
def corpus() -> tuple[Case, ...]:
    """Every odd and broken input of the decoding contract (pipeline/images.py)."""
    jpg = _encoded(Image.fromarray(_rgb(64, 64, 1)), "JPEG", quality=90)
    png = _encoded(Image.fromarray(_rgb(64, 64, 2)), "PNG")
    u16 = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 109).astype(np.uint16)
    bad_crc = bytearray(png)
    bad_crc[bad_crc.index(b"IDAT") + 40] ^= 0xFF
    return (
        # odd but decodable
        Case(
            "cmyk.jpg",
            _pil(Image.new("CMYK", (16, 12), (10, 200, 50, 30)), format="JPEG"),
            (12, 16),
            None,
        ),
        Case("gray16.png", _pil(Image.fromarray(u16), format="PNG"), (20, 30), None),
        Case("gray16.tif", _pil(Image.fromarray(u16), format="TIFF"), (20, 30), None),
        Case(
            "palette_transparent.png",
            _pil(_palette(True), format="PNG", transparency=1),
            (6, 8),
            None,
        ),
        Case("palette.gif", _pil(_palette(False), format="GIF"), (6, 8), None),
        Case(
            "gray.png", _pil(Image.fromarray(_rgb(9, 7)[..., 0], "L"), format="PNG"), (9, 7), None
        ),
        Case(
            "gray_alpha.png", _pil(Image.new("LA", (5, 4), (200, 128)), format="PNG"), (4, 5), None
        ),
        Case(
            "rgba.png",
            _pil(Image.new("RGBA", (6, 5), (200, 100, 50, 128)), format="PNG"),
            (5, 6),
            None,
        ),
        Case("animated.gif", _animated("GIF"), (10, 12), None),
        Case("animated.webp", _animated("WEBP", lossless=True), (10, 12), None),
        Case("animated.png", _animated("PNG"), (10, 12), None),
        Case("exif_rot90.jpg", _exif_rotated(), (40, 20), None),
        Case(
            "one_pixel.png", _pil(Image.new("RGB", (1, 1), (1, 2, 3)), format="PNG"), (1, 1), None
        ),
        Case("no_iend.png", _bytes(png[:-12]), (64, 64), None),
        # broken: each must fail with a clear reason
        Case("missing.jpg", None, None, r"^file not found$"),
        Case("empty.jpg", _bytes(b""), None, r"^empty file \(0 bytes\)$"),
        Case("text.jpg", _bytes(b"just some text, not a JPEG\n" * 20), None, r"^not an image"),
        Case("folder.jpg", lambda p: p.mkdir(), None, r"directory"),
        Case("truncated.jpg", _bytes(jpg[: len(jpg) // 2]), None, r"^truncated file$"),
        Case("truncated.png", _bytes(png[: len(png) // 2]), None, r"^truncated file$"),
        Case("bad_crc.png", _bytes(bytes(bad_crc)), None, r"^(cannot decode|truncated file)"),
        Case(
            "bomb.png",
            _bytes(_gray_png(9000, 9000)),
            None,
            r"^too large: 9000x9000 = 81000000 pixels",
        ),
        Case("header_bomb.png", _bytes(_claims(100_000, 100_000)), None, r"^too large"),
    )


def write_corpus(folder: Path) -> tuple[Case, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    cases = corpus()
    for c in cases:
        if c.write is not None:
            c.write(folder / c.name)
    return cases


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad_inputs") / "corpus"
    write_corpus(d)
    return d


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.name)
def test_decode(corpus_dir: Path, case: Case) -> None:
    path = corpus_dir / case.name
    if case.reason is None:
        rgb = load_image(path)
        assert rgb.dtype == np.uint8 and rgb.shape == (*case.shape, 3)
        np.testing.assert_array_equal(rgb, load_image(path))  # deterministic
    else:
        with pytest.raises(ImageError) as ei:
            load_image(path)
        assert re.search(case.reason, ei.value.reason), ei.value.reason
        assert len(ei.value.reason) <= 200 and "\n" not in ei.value.reason


def test_decoded_content_spot_checks(corpus_dir: Path) -> None:
    assert load_image(corpus_dir / "rgba.png")[0, 0].tolist() == [100, 50, 25]  # on black
    assert load_image(corpus_dir / "gray_alpha.png")[0, 0].tolist() == [100, 100, 100]
    pal = load_image(corpus_dir / "palette_transparent.png")
    assert pal[0, :3].tolist() == [[255, 0, 0], [0, 0, 0], [0, 0, 255]]
    g16 = load_image(corpus_dir / "gray16.png")
    assert g16[19, 29, 0] == round(599 * 109 / 257) and g16.max() < 255  # scaled, not clipped
    assert np.all(load_image(corpus_dir / "animated.webp") == [255, 0, 0])


# ---------------------------------------------------------------- through the real extract
def _mixed_manifest(root: Path) -> tuple[Path, tuple[Case, ...]]:
    """8 good demo photos interleaved with the corpus, as one manifest at root."""
    from usae.pipeline.demo_images import build_demo_images
    from usae.pipeline.manifest import read_manifest

    good = read_manifest(
        build_demo_images(root, n=8, seed=3, manifest_name="good.csv", show_progress=False)
    )
    cases = write_corpus(root / "corpus")
    rows = [(f"bad/{c.name}", f"corpus/{c.name}") for c in cases]
    for k, (iid, p) in enumerate(zip(good["image_id"], good["path"], strict=True)):
        rows.insert(3 * k, (iid, p))
    return write_manifest(
        pd.DataFrame(rows, columns=["image_id", "path"]), root / "mixed.csv"
    ), cases


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Case, ...]]:
    return _mixed_manifest(tmp_path_factory.mktemp("mixed"))


def test_extract_records_every_failure(mixed, tmp_path: Path) -> None:
    import torch
    from usae.pipeline.extract import ExtractConfig, run_extract
    from usae.pipeline.manifest import read_manifest
    from usae.pipeline.store import Store

    torch.set_num_threads(1)
    manifest, cases = mixed
    df = read_manifest(manifest)
    cfg = ExtractConfig(
        manifest=manifest, store=tmp_path / "s.zarr", backbones=("dinov2", "siglip"), tiny=True,
        random_init=True, dtype="fp32", progress=False, max_failures=1.0, chunk_images=8, batch_size=8,
    )  # fmt: skip
    summary = run_extract(cfg)
    st = Store.open(cfg.store)
    bad = {f"bad/{c.name}": c for c in cases if c.reason is not None}
    assert summary.failed == len(bad) and list(st.image_ids) == df["image_id"].tolist()

    failures = {f["image_id"]: f for f in st.failures}
    assert set(failures) == set(bad)
    for iid, f in failures.items():
        assert f["path"] == f"corpus/{bad[iid].name}"
        assert re.search(bad[iid].reason, f["reason"]), (iid, f["reason"])
    expect_valid = np.array([iid not in bad for iid in df["image_id"]])
    np.testing.assert_array_equal(st.valid, expect_valid)

    t = st.tokens_per_image
    for key in st.backbones:
        rows = np.concatenate([st.read_chunk(key, i) for i in range(st.n_chunks)])
        per_image = rows.reshape(st.n_images, t, -1).astype(np.float32)
        assert np.isfinite(per_image).all(), key
        assert (per_image[expect_valid].std(axis=(1, 2)) > 0).all(), key  # real activations
        assert st.stats(key)["count"] == int(expect_valid.sum()) * t  # stats over valid rows only


def test_extract_exits_when_failures_exceed_max(mixed, tmp_path: Path) -> None:
    from typer.testing import CliRunner
    from usae.pipeline.store import Store

    from usae.cli import app

    manifest, cases = mixed
    n_bad = sum(c.reason is not None for c in cases)
    n_all = len(cases) + 8
    store = tmp_path / "s.zarr"
    args = ["extract", "--manifest", str(manifest), "--store", str(store), "--backbones", "dinov2",
            "--random-init", "--tiny", "--dtype", "fp32", "--no-progress", "--chunk-images", "16"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--max-failures", "0.2"])
    out = " ".join(re.sub("[\u2500-\u257f]", " ", r.output).split())
    assert n_bad / n_all > 0.2
    assert r.exit_code == USER_ERROR_EXIT, out
    assert f"{n_bad} of {n_all} images failed to decode" in out
    st = Store.open(store)  # the store is complete nonetheless, failures recorded
    assert len(st.failures) == n_bad and int(st.valid.sum()) == n_all - n_bad
    r = CliRunner().invoke(app, [*args, "--max-failures", "0.5"])  # same store: within the limit
    assert r.exit_code == 0, r.output


def test_corpus_covers_the_contract() -> None:
    names = {c.name for c in corpus()}
    # a guard against the corpus silently shrinking: each kind of input named in the contract
    for needed in ("missing", "empty", "text", "truncated.jpg", "truncated.png", "cmyk", "gray16",
                   "palette", "gray.png", "gray_alpha", "rgba", "animated.gif", "animated.webp",
                   "animated.png", "exif_rot90", "one_pixel", "bomb"):  # fmt: skip
        assert any(needed in n for n in names), needed
