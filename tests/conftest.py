"""Shared test fixtures: small folders of real photos (random crops of scikit-image's bundled
pictures, varied sizes) with a manifest, for the extraction tests and the stages after it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# wide terminals for CliRunner: rich wraps error panels at the terminal width, and a message
# split over two lines of a box cannot be matched as one string
os.environ.setdefault("COLUMNS", "200")


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        im = getattr(data, name)()
        out.append(im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=2))
    return out


def write_photo_crops(
    folder: Path, n: int, seed: int = 0, min_side: int = 48, max_side: int = 260
) -> list[str]:
    """Write n PNG random crops (varied sizes and aspect ratios) of bundled photos; return file names."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        ph = photos[i % len(photos)]
        h = int(rng.integers(min_side, min(max_side, ph.shape[0]) + 1))
        w = int(rng.integers(min_side, min(max_side, ph.shape[1]) + 1))
        y = int(rng.integers(0, ph.shape[0] - h + 1))
        x = int(rng.integers(0, ph.shape[1] - w + 1))
        name = f"img{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(ph[y : y + h, x : x + w, :3])).save(folder / name)
        names.append(name)
    return names


class ImageSet(NamedTuple):
    """Images under root/images and root/manifest.csv (paths relative to root, the default image root)."""

    root: Path
    manifest: Path
    image_ids: list[str]
    paths: list[str]  # relative to root, in manifest order
    bad: list[str]  # image ids whose files are not decodable


def make_image_set(folder: Path, n: int, *, seed: int = 0, n_bad: int = 0) -> ImageSet:
    """n photo crops (+ n_bad undecodable files placed among them) and a manifest.csv beside them."""
    import pandas as pd

    root = folder / "images"
    names = write_photo_crops(root, n, seed)
    bad = []
    for j in range(n_bad):  # text files named like images, spread through the list
        name = f"img{j * 3:04d}_bad.jpg"
        (root / name).write_text("this is not an image")
        names.insert(min(j * 3 + 1, len(names)), name)
        bad.append(Path(name).stem)
    ids = [Path(p).stem for p in names]
    paths = [f"images/{p}" for p in names]
    manifest = folder / "manifest.csv"
    pd.DataFrame({"image_id": ids, "path": paths}).to_csv(manifest, index=False)
    return ImageSet(folder, manifest, ids, paths, bad)


@pytest.fixture
def image_set(tmp_path: Path) -> ImageSet:
    """9 photo crops + 1 undecodable file, with a manifest (fresh per test)."""
    return make_image_set(tmp_path / "data", 9, seed=0, n_bad=1)


@pytest.fixture(scope="session")
def shared_image_set(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    """12 photo crops with a manifest, shared read-only by the whole session."""
    return make_image_set(tmp_path_factory.mktemp("shared_images"), 12, seed=1)


@pytest.fixture
def photo_crops():
    """The `write_photo_crops(folder, n, seed)` helper, for tests that build their own folder."""
    return write_photo_crops


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    its numbers (and timings) do not depend on the machine's core count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense_inputs_and_codes(model, store, image_mask: np.ndarray):
    """Slow, obvious: per backbone, the standardised inputs and dense codes (numpy) of every
    token row of the selected images, all in memory (``model`` in float64 eval mode)."""
    import torch

    rows = np.repeat(image_mask, store.tokens_per_image)
    xs, zs = [], []
    with torch.no_grad():
        for i, key in enumerate(model.spec.backbones):
            a = torch.from_numpy(store.read_rows(key, 0, store.n_rows)[rows]).double()
            x = model.standardize(i, a)
            xs.append(x.numpy())
            zs.append(model.dense_codes(model.encode(i, x)).numpy())
    return xs, zs
