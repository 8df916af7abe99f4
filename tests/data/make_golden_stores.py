"""Tiny default-backbone stores -> digests of their activations (tests/data/golden_stores.json).

Run once with the code of commit c4705bd (before extraction moved to timm's
`forward_intermediates`); `tests/test_layers.py` rebuilds the same stores with the current code
and compares. Rerun only when the stored activations are meant to change:
    python tests/data/make_golden_stores.py
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from conftest import make_image_set  # noqa: E402
from usae.pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from usae.pipeline.store import Store  # noqa: E402

SETTINGS = {"default": None, "block0": 0, "block1": 1}  # name -> --layer


def store_digest(st: Store) -> dict:
    """Store -> {backbone: sha256 of its tokens, of its prefix, stats mean}."""
    out = {}
    for k in st.backbones:
        tok = hashlib.sha256(st.read_rows(k, 0, st.n_rows).tobytes()).hexdigest()
        pre = st.read_prefix(k, 0, st.n_images) if st.prefix_tokens[k] else None
        out[k] = {
            "tokens_sha256": tok,
            "prefix_sha256": None if pre is None else hashlib.sha256(pre.tobytes()).hexdigest(),
            "mean": [float(x) for x in np.asarray(st.stats(k)["mean"])],
        }
    return out


def build(folder: Path, layer: int | None) -> Store:
    """The golden settings at `layer` -> a store under folder."""
    images = make_image_set(folder / "data", 5, seed=2)
    cfg = ExtractConfig(
        manifest=images.manifest, store=folder / f"s{layer}.zarr", layer=layer, tiny=True,
        random_init=True, dtype="fp32", batch_size=2, chunk_images=3, progress=False,
    )  # fmt: skip
    run_extract(cfg)
    return Store.open(cfg.store)


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
           "machine": platform.machine(), "stores": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        for name, layer in SETTINGS.items():
            res["stores"][name] = store_digest(build(Path(d) / name, layer))
    (HERE / "golden_stores.json").write_text(json.dumps(res, indent=1) + "\n")
