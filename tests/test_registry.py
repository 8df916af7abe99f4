"""Backbone registry: every entry builds (tiny, random init) and gives the promised tokens;
pinned specs match the real models; weights, layers, grid resampling, gradients."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from usae.pipeline.backbone import (
    Backbone,
    _build_model,
    load_backbone,
    resample_grid,
    resize_square,
)
from usae.pipeline.registry import REGISTRY, RegistryError, resolve
from usae.pipeline.weights import WeightsUnavailable

torch.set_num_threads(1)

# every registry entry (dinov3, siglip2, pe among them) + one example of each open-ended family
NAMES = [
    *REGISTRY,
    "timm:vit_tiny_patch16_224.augreg_in21k",
    "timm:eva02_base_patch14_224.mim_in22k",
    "timm:convnext_tiny.fb_in22k",
    "open_clip:ViT-B-16/openai",
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_entry_gives_aligned_tokens(name: str, dtype: torch.dtype) -> None:
    """Tiny random-init model: tokens on any grid at the default layer and at blocks 0 and 1,
    the three from one forward pass exactly as each alone; the default is forward_features."""
    spec = resolve(name)
    bb = load_backbone(spec, random_init=True, tiny=True, dtype=dtype, layers=(None, 0, 1))
    assert bb.spec.img_size == spec.img_size and bb.spec.patch_size == spec.patch_size
    assert bb.spec.prefix_tokens == spec.prefix_tokens
    images_b3hw = torch.rand(3, 3, 97, 131)  # odd size: squash-resized inside
    for grid in [(14, 14), (7, 9)]:
        for layer, acts in zip(bb.layers, bb.forward_layers(images_b3hw, grid), strict=True):
            width = bb.spec.width_at(layer)
            assert acts.patch_btd.shape == (3, grid[0] * grid[1], width)
            assert acts.prefix_bpd.shape == (3, spec.prefix_tokens, width)
            assert acts.patch_btd.dtype == dtype and acts.prefix_bpd.dtype == dtype
            assert (
                torch.isfinite(acts.patch_btd.float()).all()
                and torch.isfinite(acts.prefix_bpd.float()).all()
            )
    with torch.no_grad():
        together = bb.forward_layers(images_b3hw, (14, 14))
        for layer, acts in zip(bb.layers, together, strict=True):
            alone = load_backbone(spec, random_init=True, tiny=True, dtype=dtype, layer=layer)
            got = alone(images_b3hw, (14, 14))
            torch.testing.assert_close(acts.patch_btd, got.patch_btd, rtol=0, atol=0)
            torch.testing.assert_close(acts.prefix_bpd, got.prefix_bpd, rtol=0, atol=0)
        if spec.source == "timm":  # the default layer is what forward_features gives
            feats = alone.model.forward_features(alone.preprocess(images_b3hw))
            if spec.feature_map:
                feats = feats.flatten(2).transpose(1, 2)
            p = spec.prefix_tokens
            native = bb.forward_layers(images_b3hw, spec.native_grid)[0]
            torch.testing.assert_close(native.patch_btd, feats[:, p:], rtol=0, atol=0)
            torch.testing.assert_close(native.prefix_bpd, feats[:, :p], rtol=0, atol=0)
    # the native grid is what the model really produces
    native = bb.forward_layers(images_b3hw, spec.native_grid)[0].patch_btd
    assert native.shape[1] == spec.native_grid[0] * spec.native_grid[1]


@pytest.mark.parametrize("name", NAMES)
def test_pinned_spec_matches_full_model(name: str) -> None:
    """Width, patch, prefix count and input size of the spec are those of the real model."""
    spec = resolve(name)
    with torch.device("meta"):
        m = _build_model(spec, tiny=False)
    if spec.feature_map:
        assert tuple(f["num_chs"] for f in m.feature_info) == spec.layer_widths
        assert tuple(f["reduction"] for f in m.feature_info) == spec.layer_strides
        assert spec.width == spec.layer_widths[-1] and spec.prefix_tokens == 0
    elif spec.source == "timm":
        assert m.embed_dim == spec.width
        assert m.num_prefix_tokens == spec.prefix_tokens
        assert tuple(m.patch_embed.patch_size) == (spec.patch_size,) * 2
        assert tuple(m.patch_embed.grid_size) == spec.native_grid
    else:
        assert m.transformer.width == spec.width
        assert m.conv1.kernel_size == (spec.patch_size,) * 2
        assert (
            m.positional_embedding.shape[0]
            == spec.native_grid[0] * spec.native_grid[1] + spec.prefix_tokens
        )


def test_paper_defaults_are_pinned() -> None:
    assert resolve("dinov2").name == "vit_small_patch14_dinov2.lvd142m"
    assert resolve("dinov2").native_grid == (16, 16) and resolve("dinov2").mean == (
        0.485,
        0.456,
        0.406,
    )
    assert (
        resolve("siglip").name == "vit_base_patch16_siglip_224.webli"
        and resolve("siglip").prefix_tokens == 0
    )
    assert (
        resolve("vit").name == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
        and resolve("vit").std == (0.5,) * 3
    )
    assert resolve("mine=vit").key == "mine"
    with pytest.raises(RegistryError, match="unknown backbone"):
        resolve("resnet50")
    with pytest.raises(RegistryError, match="NCHW feature map"):
        resolve("timm:swin_tiny_patch4_window7_224.ms_in1k")  # its final features are NHWC


def test_new_leaders_are_pinned() -> None:
    """Tags, native grid and prefix (CLS + registers) of the entries added after the paper."""
    pinned = {
        "dinov3": ("vit_base_patch16_dinov3.lvd1689m", 256, (16, 16), 5),
        "siglip2": ("vit_base_patch16_siglip_224.v2_webli", 224, (14, 14), 0),
        "pe": ("vit_pe_core_base_patch16_224.fb", 224, (14, 14), 1),
    }
    for key, (name, size, grid, prefix) in pinned.items():
        spec = resolve(key)
        assert (spec.name, spec.img_size, spec.native_grid, spec.prefix_tokens) == (
            name,
            size,
            grid,
            prefix,
        )
        assert spec.width == 768
    assert resolve("dinov3").mean == (0.485, 0.456, 0.406) and resolve("pe").std == (0.5,) * 3
    cnx = resolve("timm:convnext_tiny.fb_in22k")
    assert cnx.feature_map and cnx.layer_widths == (96, 192, 384, 768)
    assert cnx.native_grid == (7, 7) and cnx.grid_at(0) == (56, 56) and cnx.width_at(1) == 192


def test_default_layer_is_forward_features_and_layer_n_is_block_n() -> None:
    bb = load_backbone(resolve("vit"), random_init=True, tiny=True)
    x_b3hw = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ref_btd = bb.model.forward_features(bb.preprocess(x_b3hw))
        acts = bb(x_b3hw, (14, 14))
        torch.testing.assert_close(acts.patch_btd, ref_btd[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(acts.prefix_bpd, ref_btd[:, :1], rtol=0, atol=0)
        seen = {}
        h = bb.model.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("b0", o))
        bb.model.forward_features(bb.preprocess(x_b3hw))
        h.remove()
        b0 = load_backbone(resolve("vit"), random_init=True, tiny=True, layer=0)
        torch.testing.assert_close(b0(x_b3hw).patch_btd, seen["b0"][:, 1:], rtol=0, atol=0)
    assert b0.identity["layer"] == 0
    with pytest.raises(RegistryError, match="out of range"):
        load_backbone(resolve("vit"), random_init=True, tiny=True, layer=2)


def test_open_clip_tokens_match_the_library() -> None:
    bb = load_backbone(resolve("open_clip:ViT-B-16/openai"), random_init=True, tiny=True)
    bb.model.output_tokens = True
    x_b3hw = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        _, tokens_btd = bb.model(bb.preprocess(x_b3hw))
        torch.testing.assert_close(bb(x_b3hw).patch_btd, tokens_btd, rtol=0, atol=0)


def test_random_init_is_seeded() -> None:
    a = load_backbone(resolve("dinov2"), random_init=True, tiny=True, seed=3)
    b = load_backbone(resolve("dinov2"), random_init=True, tiny=True, seed=3)
    c = load_backbone(resolve("dinov2"), random_init=True, tiny=True, seed=4)
    assert a.identity["sha256"] == b.identity["sha256"] != c.identity["sha256"]
    assert a.identity == {**b.identity}
    assert a.identity["random_init"] and a.identity["seed"] == 3 and a.identity["tiny"]
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(a(x).patch_btd, b(x).patch_btd, rtol=0, atol=0)


def test_missing_weights_fail_fast_naming_both_ways_out() -> None:
    for name in ("dinov2", "siglip", "vit", "open_clip:ViT-B-16/openai"):
        t0 = time.perf_counter()
        with pytest.raises(WeightsUnavailable) as e:
            load_backbone(resolve(name))
        assert time.perf_counter() - t0 < 2.0
        assert "--weights" in str(e.value) and "--random-init" in str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_weights_file_gives_that_model(tmp_path, fmt: str) -> None:
    src = load_backbone(resolve("siglip"), random_init=True, tiny=True, seed=11)
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    f = tmp_path / f"w.{fmt}"
    save_file(state, str(f)) if fmt == "safetensors" else torch.save(state, f)
    bb = load_backbone(resolve("siglip"), weights=f, tiny=True)
    assert bb.identity["sha256"] == src.identity["sha256"]
    assert bb.identity["weights"] == f"file:w.{fmt}" and not bb.identity["random_init"]
    x = torch.rand(2, 3, 150, 200)
    torch.testing.assert_close(bb(x).patch_btd, src(x).patch_btd, rtol=0, atol=0)


def test_weights_file_must_fit_and_must_not_run_code(tmp_path) -> None:
    wrong = load_backbone(resolve("vit"), random_init=True, tiny=True).model.state_dict()
    f = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(f))
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        load_backbone(resolve("dinov2"), weights=f, tiny=True)

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    g = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, g)
    with pytest.raises(WeightsUnavailable, match="safely"):
        load_backbone(resolve("vit"), weights=g, tiny=True)


def test_resample_grid_keeps_positions() -> None:
    """A linear ramp over the native grid stays the same ramp at the new token centres."""
    gy, gx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp_btd = torch.stack([gy, gx], -1).reshape(1, 256, 2)
    out = resample_grid(ramp_btd, (16, 16), (14, 14)).reshape(14, 14, 2)
    centres = (torch.arange(14.0) + 0.5) * 16 / 14 - 0.5  # output centres in input coordinates
    inner = slice(2, 12)  # away from the clamped borders
    # the antialias filter is sampled on the discrete grid: centres move by < 0.1 patch
    torch.testing.assert_close(
        out[inner, inner, 0], centres[inner, None].expand(10, 10), atol=0.1, rtol=0
    )
    torch.testing.assert_close(
        out[inner, inner, 1], centres[None, inner].expand(10, 10), atol=0.1, rtol=0
    )
    same = torch.randn(2, 196, 5)
    assert resample_grid(same, (14, 14), (14, 14)) is same
    with pytest.raises(ValueError):
        resample_grid(same, (16, 16), (14, 14))


def test_resize_skipped_at_input_size_and_gradients_flow() -> None:
    bb = load_backbone(resolve("dinov2"), random_init=True, tiny=True)
    x_b3hw = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(bb.preprocess(x_b3hw), (x_b3hw - bb.mean_c) / bb.std_c)
    big = torch.rand(1, 3, 300, 260, requires_grad=True)
    torch.testing.assert_close(bb.preprocess(big), bb.preprocess(resize_square(big, 224)))
    bb(big, (14, 14)).patch_btd.square().mean().backward()  # activation maximisation needs this
    assert big.grad is not None and big.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in bb.parameters())


def test_backbone_stays_in_eval_mode() -> None:
    bb: Backbone = load_backbone(replace(resolve("vit"), key="v"), random_init=True, tiny=True)
    bb.train()
    assert not bb.training and not bb.model.training


def test_pretrained_weights_come_from_the_local_hub_cache(tmp_path, monkeypatch) -> None:
    """A file in the HF hub cache layout is found and loaded without any network access."""
    import huggingface_hub.constants as hub_constants

    spec = resolve("timm:vit_tiny_patch16_224.augreg_in21k")
    src = load_backbone(spec, random_init=True, seed=5)
    snap = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in src.model.state_dict().items()},
        str(snap / "snapshots/abc123/model.safetensors"),
    )
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    bb = load_backbone(spec)
    assert bb.identity["weights"] == "cache:model.safetensors" and not bb.identity["random_init"]
    assert bb.identity["sha256"] == src.identity["sha256"] and bb.identity["seed"] is None
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(bb(x).patch_btd, src(x).patch_btd, rtol=0, atol=0)
