"""Image decoding: every colour mode, orientation and failure decodes to the documented
array or to a clear ImageError reason. Inputs are written with Pillow into tmp_path and the
expected pixels are computed independently (numpy), not by the code under test."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from usae.pipeline.images import BACKGROUND_RGB, ImageError, has_scheme, load_image


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def _reason(src, **kw) -> str:
    with pytest.raises(ImageError) as ei:
        load_image(src, **kw)
    return ei.value.reason


# ---------------------------------------------------------------- sources
def test_lossless_rgb_from_every_source(tmp_path: Path) -> None:
    x = _rgb()
    p = _save(Image.fromarray(x), tmp_path / "x.png")
    for src in (p, str(p), p.read_bytes(), io.BytesIO(p.read_bytes())):
        y = load_image(src)
        assert y.dtype == np.uint8 and y.shape == (24, 32, 3) and y.flags.c_contiguous
        np.testing.assert_array_equal(y, x)
    import fsspec

    fsspec.filesystem("memory").pipe("/usae-img-test/x.png", p.read_bytes())
    np.testing.assert_array_equal(load_image("memory://usae-img-test/x.png"), x)
    assert _reason("memory://usae-img-test/missing.png") == "file not found"


def test_deterministic(tmp_path: Path) -> None:
    p = _save(Image.fromarray(_rgb()), tmp_path / "x.jpg", quality=80)
    np.testing.assert_array_equal(load_image(p), load_image(p))


def test_has_scheme() -> None:
    assert has_scheme("s3://b/k.jpg") and has_scheme("file:///x.png") and has_scheme("gcs+x://a")
    assert (
        not has_scheme("a/b.jpg") and not has_scheme("C://x.jpg") and not has_scheme("/abs/x.png")
    )


# ---------------------------------------------------------------- failures
def test_missing_empty_directory_text(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg") == "file not found"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(tmp_path / "empty.jpg") == "empty file (0 bytes)"
    assert _reason(b"") == "empty file (0 bytes)"
    assert "directory" in _reason(tmp_path)
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 10)
    assert _reason(tmp_path / "notes.jpg") == "not an image (unrecognised format)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_rejected(tmp_path: Path, fmt: str, keep: float) -> None:
    b = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(b, fmt)
    data = b.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: int(len(data) * keep)])
    assert _reason(p) == "truncated file"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_png_without_only_its_trailer_decodes(tmp_path: Path) -> None:
    x = _rgb()
    b = io.BytesIO()
    Image.fromarray(x).save(b, "PNG")
    assert b.getvalue()[-12:-8] == b"\x00\x00\x00\x00" and b.getvalue()[-8:-4] == b"IEND"
    np.testing.assert_array_equal(load_image(b.getvalue()[:-12]), x)  # all pixel data present


def test_corrupt_png_crc(tmp_path: Path) -> None:
    b = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(b, "PNG")
    data = bytearray(b.getvalue())
    i = data.index(b"IDAT") + 40
    data[i] ^= 0xFF  # flip bits inside the compressed pixels
    r = _reason(bytes(data))
    assert r.startswith("cannot decode") or r == "truncated file"


def test_unconvertible_mode_is_a_reason(tmp_path: Path, monkeypatch) -> None:
    # Pillow 13 converts every mode it can open; a failing conversion must still be a reason
    p = _save(Image.new("CMYK", (4, 4)), tmp_path / "c.tif")

    def refuse(self, mode=None, *a, **k):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    assert _reason(p).startswith("unsupported colour mode CMYK")


# ---------------------------------------------------------------- size limits
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gray_png_bomb(w: int, h: int) -> bytes:
    """A genuine w x h all-black 8-bit grayscale PNG, compressed row block by row block."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)  # filter byte + pixels
    block = row * 256
    idat = bytearray()
    for r0 in range(0, h, 256):
        idat += comp.compress(block if h - r0 >= 256 else row * (h - r0))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", bytes(idat))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded (the size check must come first)."""

    def boom(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


def test_bomb_rejected_before_decoding(tmp_path: Path, no_pixel_decoding) -> None:
    data = _gray_png_bomb(10_000, 10_000)  # 100 Mpx (Pillow only warns), ~100 kB on disk
    assert len(data) < 1_000_000
    p = tmp_path / "bomb.png"
    p.write_bytes(data)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own, above ~89 Mpx
        r = _reason(p)  # default max_pixels (64 Mpx)
    assert r == "too large: 10000x10000 = 100000000 pixels > max_pixels 64000000"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # python -W error
        assert _reason(p).startswith("too large (decompression bomb limit)")
    huge = bytearray(_gray_png_bomb(16, 16))
    huge[16:24] = struct.pack(">II", 100_000, 100_000)  # header claims 10^10 pixels
    huge[29:33] = struct.pack(">I", zlib.crc32(bytes(huge[12:29])))
    assert _reason(bytes(huge), max_pixels=10**12).startswith(
        "too large (decompression bomb limit)"
    )


def test_max_pixels_configurable(tmp_path: Path) -> None:
    p = _save(Image.fromarray(_rgb(20, 30)), tmp_path / "x.png")
    assert load_image(p, max_pixels=600).shape == (20, 30, 3)
    assert _reason(p, max_pixels=599) == "too large: 30x20 = 600 pixels > max_pixels 599"


def test_tiny_image(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (1, 1), (9, 8, 7)), tmp_path / "one.png")
    np.testing.assert_array_equal(load_image(p), np.array([[[9, 8, 7]]], np.uint8))


# ---------------------------------------------------------------- colour modes
def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    g = _rgb()[..., 0]
    y = load_image(_save(Image.fromarray(g, "L"), tmp_path / "g.png"))
    np.testing.assert_array_equal(y, np.repeat(g[..., None], 3, axis=2))
    bits = g > 127
    y = load_image(_save(Image.fromarray(bits), tmp_path / "b.png"))
    np.testing.assert_array_equal(y[..., 1], np.where(bits, 255, 0))


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16bit_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    v = np.array(
        [[0, 128, 129, 385, 1000, 32768], [40000, 65278, 65279, 65534, 65535, 257]], np.uint16
    )
    im = Image.fromarray(v)
    assert im.mode == "I;16"
    y = load_image(_save(im, tmp_path / f"x16.{fmt}"))
    expect = np.floor(v.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round half up
    np.testing.assert_array_equal(y[..., 0], expect)
    np.testing.assert_array_equal(y[..., 2], expect)
    assert y[0, 4, 0] == 4 and y[1, 4, 0] == 255  # 1000 -> 4 (a clip would give 255)


def test_32bit_int_and_float(tmp_path: Path) -> None:
    v = np.array([[0, 257, 65535, 70000, -5]], np.int32)
    y = load_image(_save(Image.fromarray(v, "I"), tmp_path / "i32.tif"))
    np.testing.assert_array_equal(y[0, :, 0], [0, 1, 255, 255, 0])
    f = np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], np.float32)
    y = load_image(_save(Image.fromarray(f, "F"), tmp_path / "f.tif"))
    np.testing.assert_array_equal(y[0, :, 1], [0, 128, 255, 255, 0])


def test_cmyk(tmp_path: Path) -> None:
    c, m, yel, k = 10, 200, 50, 30  # Pillow's CMYK -> RGB: (255 - c) * (255 - k) / 255 per channel
    cmyk = Image.new("CMYK", (16, 16), (c, m, yel, k))
    expect = np.rint([(255 - v) * (255 - k) / 255 for v in (c, m, yel)])
    y = load_image(_save(cmyk, tmp_path / "c.tif"))
    np.testing.assert_allclose(y[0, 0], expect, atol=1)
    y = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))  # Adobe-inverted CMYK JPEG
    assert y.shape == (16, 16, 3)
    np.testing.assert_allclose(y.reshape(-1, 3).mean(0), expect, atol=4)


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    assert BACKGROUND_RGB == (0, 0, 0)
    px = np.array(
        [[[200, 100, 50, 128], [200, 100, 50, 0], [200, 100, 50, 255], [255, 255, 255, 1]]],
        np.uint8,
    )
    y = load_image(_save(Image.fromarray(px, "RGBA"), tmp_path / "a.png"))
    expect = np.floor(px[..., :3] * (px[..., 3:] / 255.0) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(y, expect)
    assert y[0, 0].tolist() == [100, 50, 25] and y[0, 1].tolist() == [0, 0, 0]


def test_la_composited(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[200, 128], [200, 255], [7, 0]]], np.uint8), "LA")
    y = load_image(_save(la, tmp_path / "la.png"))
    assert y[0].tolist() == [[100, 100, 100], [200, 200, 200], [0, 0, 0]]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency(tmp_path: Path, fmt: str) -> None:
    idx = np.array([[0, 1, 2, 1]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    y = load_image(_save(im, tmp_path / f"p.{fmt}", transparency=1))
    assert y[0].tolist() == [
        [255, 0, 0],
        [0, 0, 0],
        [0, 0, 255],
        [0, 0, 0],
    ]  # index 1 -> background
    y = load_image(_save(im, tmp_path / f"opaque.{fmt}"))
    assert y[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 0]]


# ---------------------------------------------------------------- frames and orientation
@pytest.mark.parametrize("fmt, kw", [("gif", {}), ("webp", {"lossless": True}), ("png", {})])
def test_animated_first_frame(tmp_path: Path, fmt: str, kw: dict) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (12, 10), c) for c in colours]
    p = _save(
        frames[0],
        tmp_path / f"anim.{fmt}",
        save_all=True,
        append_images=frames[1:],
        duration=50,
        **kw,
    )
    with Image.open(p) as im:
        assert getattr(im, "n_frames", 1) == 3  # really animated
    y = load_image(p)
    assert y.shape == (10, 12, 3)
    assert np.all(y == np.array(colours[0], np.uint8))


_ORIENT = {  # EXIF orientation -> how the stored array must be turned for display
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    6: lambda a: np.rot90(a, -1),  # stored rotated: turn 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(_ORIENT))
def test_exif_rotation_applied(tmp_path: Path, orientation: int) -> None:
    x = _rgb(20, 40, seed=orientation)
    im = Image.fromarray(x)
    exif = Image.Exif()
    exif[0x0112] = orientation
    y = load_image(_save(im, tmp_path / "o.png", exif=exif.tobytes()))
    np.testing.assert_array_equal(y, _ORIENT[orientation](x))
    y = load_image(_save(im, tmp_path / "o.jpg", exif=exif.tobytes(), quality=95))
    assert y.shape == _ORIENT[orientation](x).shape
    if orientation in (6, 8):
        assert y.shape == (40, 20, 3)


def test_broken_exif_ignored(tmp_path: Path) -> None:
    x = _rgb()
    p = _save(Image.fromarray(x), tmp_path / "e.png", exif=b"Exif\x00\x00garbage-not-tiff")
    np.testing.assert_array_equal(load_image(p), x)
