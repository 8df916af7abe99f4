"""Real photos bundled in PyPI packages -> a folder of a few hundred augmented demo images
plus their manifest (``manifest.csv``).

No download: the photos come from files that ship inside scikit-image (``skimage.data``;
only the ones bundled in the wheel, never those fetched through pooch) and scikit-learn
(``load_sample_images``: china, flower). Each demo image is a random crop of one photo
(area 10-100 % of the photo, aspect 1:2 to 2:1), flipped left-right half the time, resized
so its longer side is 160-320 px, and saved as JPEG (70 %) or PNG (30 %). Grayscale photos
stay grayscale files (the decoder expands them). Photos are used in turn (image i comes
from photo i mod #photos); every random choice of image i comes from ``(seed, i)``, so the
same seed gives the same files and the same manifest, and image i does not depend on n.

Manifest columns: image_id (``<source>_<i:04d>``), path (``images/<split>/<id>.<ext>``,
relative to the output folder), split (train, or val for about 20 %, drawn per image),
label and source (the photo's name), sha256 of the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from usae.pipeline.manifest import write_manifest

from usae.runtime import atomic_write, progress_bar

VAL_FRACTION = 0.2
MIN_SIDE, MAX_SIDE = 160, 320
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
)
SKLEARN_PHOTOS = ("china", "flower")


class Photo(NamedTuple):
    """One source photo."""

    name: str  # e.g. "astronaut"
    pixels: np.ndarray  # uint8 (H, W, 3) or (H, W)


def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn_photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    s = load_sample_images()
    return {Path(f).stem: img for f, img in zip(s.filenames, s.images, strict=True)}


def load_photos() -> list[Photo]:
    """The bundled photos, in a fixed order; raises RuntimeError naming any that is missing."""
    photos, missing = [], []
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append(Photo(name, np.asarray(_skimage_loader(name)(), dtype=np.uint8)))
        except Exception as e:  # noqa: BLE001 - report every missing photo at once
            missing.append(f"skimage.data.{name} ({type(e).__name__})")
    try:
        sk = _sklearn_photos()
        photos += [Photo(n, np.asarray(sk[n], dtype=np.uint8)) for n in SKLEARN_PHOTOS]
    except Exception as e:  # noqa: BLE001
        missing.append(f"sklearn sample images ({type(e).__name__}: {e})")
    if missing:
        raise RuntimeError(
            "demo photos not available offline: "
            + ", ".join(missing)
            + "; install scikit-image and scikit-learn wheels that bundle them"
        )
    return photos


class Crop(NamedTuple):
    """Augmentation of one demo image, all drawn from (seed, i)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool  # mirror left-right
    long_side: int  # output size of the longer side, px
    jpeg: bool  # JPEG (else PNG)
    quality: int  # JPEG quality
    val: bool  # in the val split


def draw_crop(h: int, w: int, seed: int, i: int) -> Crop:
    """Random crop of an h x w photo for image i (area 10-100 %, aspect 1:2-2:1)."""
    rng = np.random.default_rng([seed, i])
    area = rng.uniform(0.1, 1.0) * h * w
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
    cw = int(min(w, max(8, round(math.sqrt(area * aspect)))))
    ch = int(min(h, max(8, round(math.sqrt(area / aspect)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return Crop(
        top=top,
        left=left,
        height=ch,
        width=cw,
        flip=bool(rng.random() < 0.5),
        long_side=int(rng.integers(MIN_SIDE, MAX_SIDE + 1)),
        jpeg=bool(rng.random() < 0.7),
        quality=int(rng.integers(80, 96)),
        val=bool(rng.random() < VAL_FRACTION),
    )


def render(photo: np.ndarray, c: Crop) -> Image.Image:
    """Apply a Crop to a photo: crop, flip, resize (bicubic, longer side = c.long_side)."""
    px = photo[c.top : c.top + c.height, c.left : c.left + c.width]
    if c.flip:
        px = px[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(px))
    scale = c.long_side / max(c.height, c.width)
    size = (max(1, round(c.width * scale)), max(1, round(c.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC)


def _encode(im: Image.Image, c: Crop) -> bytes:
    b = io.BytesIO()
    if c.jpeg:
        im.save(b, "JPEG", quality=c.quality, optimize=False, progressive=False)
    else:
        im.save(b, "PNG", compress_level=6)
    return b.getvalue()


def build_demo_images(
    out_dir: str | os.PathLike,
    n: int = 300,
    seed: int = 0,
    *,
    manifest_name: str = "manifest.csv",
    show_progress: bool = True,
) -> Path:
    """Write n demo images under ``out_dir/images/`` and their manifest; returns its path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    photos = load_photos()
    rows = []
    with progress_bar(show_progress, transient=True) as bar:
        task = bar.add_task("demo images", total=n)
        for i in range(n):
            photo = photos[i % len(photos)]
            c = draw_crop(photo.pixels.shape[0], photo.pixels.shape[1], seed, i)
            data = _encode(render(photo.pixels, c), c)
            split = "val" if c.val else "train"
            image_id = f"{photo.name}_{i:04d}"
            rel = f"images/{split}/{image_id}.{'jpg' if c.jpeg else 'png'}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out / rel, data)
            rows.append(
                (image_id, rel, split, photo.name, photo.name, hashlib.sha256(data).hexdigest())
            )
            bar.advance(task)
    df = pd.DataFrame(rows, columns=["image_id", "path", "split", "label", "source", "sha256"])
    return write_manifest(df, out / manifest_name)
