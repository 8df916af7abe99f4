"""Several depths of a model from one forward pass -> one store group per layer, each exactly
what a single-layer extraction of that layer gives; the default backbones still store what the
code before `forward_intermediates` stored; `usae train` runs over a store of layers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from usae.pipeline.backbone import load_backbone
from usae.pipeline.extract import ExtractConfig, ExtractError, run_extract
from usae.pipeline.registry import (
    RegistryError,
    join_layer_lists,
    layer_key,
    parse_backbone,
    resolve,
    split_layers,
)
from usae.pipeline.store import Store

torch.set_num_threads(1)
TINY = {"tiny": True, "random_init": True, "dtype": "fp32", "progress": False}
DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- names
def test_layer_names_parse() -> None:
    ref = parse_backbone("dinov2@3,6,9,11")
    assert ref.spec == resolve("dinov2") and ref.layers == (3, 6, 9, 11)
    assert parse_backbone("dinov2").layers is None
    d = parse_backbone("d=dinov2@3,6")
    assert d.spec.key == "d" and d.spec.name == resolve("dinov2").name and d.layers == (3, 6)
    assert parse_backbone("timm:vit_tiny_patch16_224.augreg_in21k@0").layers == (0,)
    assert layer_key("d", 6) == "d@6" and split_layers("d@6") == ("d", 6)
    assert split_layers("vit") == ("vit", None)
    # the CLI splits --backbones at commas: layer lists are joined back
    assert join_layer_lists(["dinov2@3", "6", "siglip", "vit@1", "2"]) == [
        "dinov2@3,6",
        "siglip",
        "vit@1,2",
    ]
    for bad in ("dinov2@", "dinov2@x", "dinov2@-1", "dinov2@3,3", "dinov2@3,,4"):
        with pytest.raises(RegistryError):
            parse_backbone(bad)
    with pytest.raises(RegistryError, match="alias"):
        resolve("a@b=dinov2")


def test_layers_out_of_range_are_refused(shared_image_set, tmp_path) -> None:
    with pytest.raises(RegistryError, match="out of range"):
        load_backbone(resolve("vit"), random_init=True, tiny=True, layers=(0, 2))
    cfg = ExtractConfig(
        shared_image_set.manifest, tmp_path / "x.zarr", backbones=("vit@0,5",), **TINY
    )
    with pytest.raises(RegistryError, match="out of range"):
        run_extract(cfg)
    cfg = ExtractConfig(
        shared_image_set.manifest, tmp_path / "y.zarr", backbones=("vit@0", "vit@1"), **TINY
    )
    with pytest.raises(ExtractError, match="unique"):
        run_extract(cfg)


# ---------------------------------------------------------------- one pass == one layer at a time
@pytest.fixture
def count_forward(monkeypatch):
    """Counts calls of timm ViTs' forward_intermediates (the one forward pass of a batch)."""
    calls = []
    orig = VisionTransformer.forward_intermediates

    def counted(self, *a, **kw):
        calls.append(kw.get("indices"))
        return orig(self, *a, **kw)

    monkeypatch.setattr(VisionTransformer, "forward_intermediates", counted)
    return calls


def test_multi_layer_store_is_each_single_layer_store(
    shared_image_set, tmp_path, count_forward
) -> None:
    """dinov2@0,1 + vit: each layer group holds byte for byte what dinov2@N alone stores, from
    one forward pass per batch; names without @ keep --layer."""
    base = dict(batch_size=5, chunk_images=4, **TINY)  # 12 images: batches of 5, 3 and 4 per chunk
    multi = ExtractConfig(
        shared_image_set.manifest,
        tmp_path / "m.zarr",
        backbones=("dinov2@0,1", "vit"),
        layer=1,
        **base,
    )
    run_extract(multi)
    n_batches = 3 * 1  # 3 chunks of 4 images, one batch each
    assert len(count_forward) == 2 * n_batches  # one pass of dinov2 and one of vit per batch
    assert sorted(map(tuple, count_forward)) == [(0, 1)] * n_batches + [(1,)] * n_batches
    st = Store.open(multi.store)
    assert st.backbones == ["dinov2@0", "dinov2@1", "vit"]
    for layer in (0, 1):
        key = f"dinov2@{layer}"
        one = ExtractConfig(
            shared_image_set.manifest, tmp_path / f"{layer}.zarr", backbones=(key,), **base
        )
        run_extract(one)
        single = Store.open(one.store)
        assert single.backbones == [key]
        for i in range(st.n_chunks):
            assert st.read_chunk(key, i).tobytes() == single.read_chunk(key, i).tobytes()
        np.testing.assert_array_equal(st.read_prefix(key, 0, 12), single.read_prefix(key, 0, 12))
        assert st.stats(key) == single.stats(key)
        rec = st.spec(key)
        assert rec == single.spec(key)  # the same record, whichever way the layer was extracted
        assert rec["layer"] == layer and rec["identity"]["layer"] == layer
        assert rec["model_key"] == "dinov2" and rec["key"] == key
    assert st.spec("vit")["layer"] == 1 and st.spec("vit")["model_key"] == "vit"  # --layer
    # against the backbone itself, one layer at a time, outside the pipeline
    bb = load_backbone(resolve("dinov2"), random_init=True, tiny=True, layer=1)
    from test_extract import direct_tokens

    patch, _ = direct_tokens(bb, shared_image_set.root / shared_image_set.paths[0])
    np.testing.assert_allclose(
        st.read_rows("dinov2@1", 0, 196).astype(np.float32),
        patch.astype(np.float32),
        atol=2e-3,
        rtol=2e-3,
    )


def test_cnn_layers_have_their_own_widths(shared_image_set, tmp_path) -> None:
    """ConvNeXt stages as layers: each group has that stage's width, no prefix, 14x14 tokens."""
    cfg = ExtractConfig(
        shared_image_set.manifest, tmp_path / "c.zarr", batch_size=6, chunk_images=6,
        backbones=("cnx=timm:convnext_tiny.fb_in22k@1,3", "cnx_final=timm:convnext_tiny.fb_in22k"), **TINY,
    )  # fmt: skip
    run_extract(cfg)
    st = Store.open(cfg.store)
    assert st.backbones == ["cnx@1", "cnx@3", "cnx_final"]
    assert st.widths == {"cnx@1": 16, "cnx@3": 64, "cnx_final": 64} or list(st.widths) == [
        16,
        64,
        64,
    ]
    assert all(st.prefix_tokens[k] == 0 for k in st.backbones)
    assert st.spec("cnx@1")["native_grid"] == [28, 28] and st.spec("cnx_final")["native_grid"] == [
        7,
        7,
    ]
    # layer 3 is the last stage: with ConvNeXt's identity norm_pre it is the default layer
    assert (
        st.read_rows("cnx@3", 0, st.n_rows).tobytes()
        == st.read_rows("cnx_final", 0, st.n_rows).tobytes()
    )


# ---------------------------------------------------------------- the defaults did not change
@pytest.mark.parametrize("setting", ["default", "block0", "block1"])
def test_default_backbones_store_what_the_previous_code_stored(tmp_path, setting) -> None:
    """Stores of the three defaults (tiny, seeded) against digests written by the code before
    extraction moved to forward_intermediates (tests/data/make_golden_stores.py)."""
    sys.path.insert(0, str(DATA))
    import make_golden_stores as golden

    want = json.loads((DATA / "golden_stores.json").read_text())
    got = golden.store_digest(golden.build(tmp_path, golden.SETTINGS[setting]))
    ref = want["stores"][setting]
    assert list(got) == list(ref) == ["dinov2", "siglip", "vit"]
    same_platform = (want["torch"], want["cpu"]) == (
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
    )
    for k in ref:
        if same_platform:  # same kernels: bit for bit
            assert got[k]["tokens_sha256"] == ref[k]["tokens_sha256"], k
            assert got[k]["prefix_sha256"] == ref[k]["prefix_sha256"], k
        np.testing.assert_allclose(got[k]["mean"], ref[k]["mean"], atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- training over layers
def test_train_runs_on_a_store_of_layers(shared_image_set, tmp_path) -> None:
    from usae.trainer.config import TrainConfig
    from usae.trainer.train import run_train

    cfg = ExtractConfig(
        shared_image_set.manifest, tmp_path / "l.zarr", backbones=("dinov2@0,1", "siglip@1"),
        batch_size=6, chunk_images=6, **TINY,
    )  # fmt: skip
    run_extract(cfg)
    res = run_train(
        TrainConfig(
            store=str(cfg.store),
            out=str(tmp_path / "run"),
            batch_tokens=196,
            steps=4,
            concepts=16,
            k=3,
            log_every=2,
            ckpt_every=0,
            holdout=0.2,
            dtype="fp32",
            device="cpu",
            warmup_steps=1,
        )  # fmt: skip
    )
    assert res.steps == 4 and np.isfinite(res.loss)
    keys = ["dinov2@0", "dinov2@1", "siglip@1"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["store"]["backbones"] == keys
    m = res.metrics
    assert m["backbones"] == keys and np.array(m["r2_matrix"], dtype=float).shape == (3, 3)
    assert set(m["self_r2"]) == set(keys) and all(v is not None for v in m["self_r2"].values())
