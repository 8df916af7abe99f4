"""Image file (path, fsspec URL or binary file object) -> RGB uint8 array (H, W, 3), or an
``ImageError`` with a short human reason.

Extraction calls ``load_image`` once per manifest row; a failure becomes one row of the
store's failures table, so every way an image can be bad must end here as an ``ImageError``
(never a crash, never a silently wrong picture). The rules, all deterministic:

- Missing file, zero-byte file, a file that is not an image (e.g. text named ``.jpg``):
  rejected ("file not found", "empty file (0 bytes)", "not an image (unrecognised format)").
- Truncated files are rejected ("truncated file"). Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched, so a half-decoded (grey-filled)
  picture is never returned. A PNG that lacks only its IEND trailer still has all of its
  pixel data and decodes.
- Size: images with more than ``max_pixels`` pixels are rejected from the header alone,
  before any pixel is decoded (no huge allocation). Pillow's own decompression-bomb check
  (``PIL.Image.MAX_IMAGE_PIXELS``, ~89 Mpx, a process-wide setting this module leaves alone)
  still applies on top: above twice that limit Pillow refuses to open the file (rejected
  here with "too large (decompression bomb limit)"); between the two it emits its
  DecompressionBombWarning, which is not silenced (``warnings.catch_warnings`` is not
  thread-safe and decoding runs in threads), and which is a rejection too when warnings are
  turned into errors.
- Animated GIF / WebP / PNG and multi-page TIFF: the first frame.
- EXIF orientation is applied (``ImageOps.exif_transpose``): the array is the picture as a
  person sees it. Unreadable EXIF metadata is ignored (the pixels are still good).
- Colour modes: CMYK and YCbCr are converted to RGB; grayscale (L, 1) is repeated to 3
  channels; 16-bit and 32-bit integer grayscale (I;16*, I) are scaled from 0..65535 to
  0..255 by rounding ``v / 257`` (65535 -> 255, not clipped at 255); float (F) is taken as
  0..1 and scaled by 255; palette images (P, PA) are expanded, with their transparency.
- Transparency (RGBA, LA, PA, P with a transparent index, premultiplied modes): composited
  onto a fixed BLACK background, ``rgb * alpha / 255`` rounded to the nearest integer. Fully
  transparent pixels therefore become (0, 0, 0).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from usae.errors import UsaeError

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest accepted image (width * height), e.g. 8000 x 8000."""

BACKGROUND_RGB = (0, 0, 0)
"""Colour under transparent pixels (black). Fixed so that the same file decodes the same."""

ImageSource = str | os.PathLike | IO[bytes] | bytes


class ImageError(UsaeError, ValueError):
    """An image that cannot be used; ``reason`` is a short human-readable explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def has_scheme(path: str | os.PathLike) -> bool:
    """True for fsspec URLs such as ``s3://b/k.jpg`` or ``file:///x.png`` (not ``C:\\x``)."""
    s = os.fspath(path)
    head, sep, _ = s.partition("://")
    return bool(sep) and len(head) > 1 and head.replace("+", "").replace("-", "").isalnum()


@contextmanager
def _open_source(src: ImageSource) -> Iterator[IO[bytes]]:
    """A seekable binary file for any supported source; reasons for missing/empty files."""
    if isinstance(src, bytes | bytearray):
        if not src:
            raise ImageError("empty file (0 bytes)")
        yield io.BytesIO(src)
        return
    if not isinstance(src, str | os.PathLike):  # a file object: the caller owns it
        yield src
        return
    if has_scheme(src):
        yield io.BytesIO(_read_url(os.fspath(src)))
        return
    path = Path(src)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    if path.is_dir():
        raise ImageError("is a directory, not an image file")
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    with fh:
        yield fh


def _read_url(url: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Exception as e:  # noqa: BLE001 - any storage backend error is a per-image failure
        raise ImageError(
            f"cannot read {url.split('://')[0]} URL: {type(e).__name__}: {e}"
        ) from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data


def _decode_reason(e: BaseException) -> str:
    msg = str(e)
    if "truncated" in msg.lower() or isinstance(e, EOFError):
        return "truncated file"
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    return f"cannot decode: {type(e).__name__}: {msg}"[:200]


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")


def _first_frame(im: Image.Image, max_pixels: int) -> Image.Image:
    """Open -> size check -> decode frame 0 -> EXIF rotation, all failures as ImageError."""
    _check_size(im.size, max_pixels)
    try:
        im.load()  # Image.open leaves an animation on its first frame: decode only that one
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise ImageError(_decode_reason(e)) from None
    try:
        rotated = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - bad EXIF metadata: keep the (already decoded) pixels
        rotated = None
    return rotated if rotated is not None else im


def _gray_to_u8(im: Image.Image) -> np.ndarray:
    """I;16*, I (taken as 16-bit range) and F (taken as 0..1) -> uint8 (H, W)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    a = np.clip(a.astype(np.int64), 0, 65535)
    return ((a * 2 + 257) // 514).astype(np.uint8)  # round(a / 257), exact in integers


def _composite(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) on BACKGROUND_RGB, rounded to nearest."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    bg = np.asarray(BACKGROUND_RGB, dtype=np.uint32)
    out = (rgb * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        g = _gray_to_u8(im)
        return np.repeat(g[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        if has_alpha:
            return _composite(np.asarray(im.convert("RGBA")))
        return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - e.g. a mode Pillow cannot convert (LAB without ICC)
        raise ImageError(f"unsupported colour mode {mode}: {e}") from None


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image to RGB uint8 (H, W, 3), C-contiguous; raise ImageError(reason) if bad.

    ``src``: a local path, an fsspec URL (``scheme://...``), raw bytes or a binary file object.
    """
    with _open_source(src) as fh:
        try:
            im = Image.open(fh)
        except UnidentifiedImageError:
            raise ImageError("not an image (unrecognised format)") from None
        except (
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as e:  # warning: -W error
            raise ImageError(f"too large (decompression bomb limit): {e}"[:200]) from None
        except Exception as e:  # noqa: BLE001
            raise ImageError(_decode_reason(e)) from None
        with im:
            frame = _first_frame(im, max_pixels)
            rgb_hw3 = _to_rgb(frame)
    return np.ascontiguousarray(rgb_hw3, dtype=np.uint8)
