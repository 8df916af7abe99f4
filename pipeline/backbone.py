"""A backbone spec -> the vision model itself: images in [0, 1] -> patch tokens on a common
grid (+ prefix tokens), at one or several depths from ONE forward pass.

`load_backbone` builds the model named by a `usae.pipeline.registry.BackboneSpec` (timm or
open_clip, random init or a weights file: `usae.pipeline.weights` reads files, the local hub
cache and the hub), and `Backbone` runs it: squash-resize, normalise, timm's
`forward_intermediates` (or an open_clip tower's), prefix tokens split off, the native grid
resampled to the common grid. Fully differentiable: extraction runs it under no_grad,
activation maximisation through it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from usae.pipeline import weights as weight_files
from usae.pipeline.registry import BackboneSpec, RegistryError


class Activations(NamedTuple):
    """Output of `Backbone.forward` (one per layer from `Backbone.forward_layers`)."""

    patch_btd: Tensor
    """Patch tokens on the requested grid, (batch, grid_h * grid_w, width), row-major."""
    prefix_bpd: Tensor
    """Prefix tokens (CLS/registers), (batch, prefix_tokens, width); prefix_tokens may be 0."""


# ---------------------------------------------------------------- building models
def _tiny_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """The same architecture shrunk for tests: 2 blocks of width 64 (a CNN: 1 block per stage)."""
    if spec.feature_map:
        n = len(spec.layer_widths)
        return {"depths": (1,) * n, "dims": tuple(64 >> (n - 1 - i) for i in range(n))}
    return {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _build_model(spec: BackboneSpec, tiny: bool) -> nn.Module:
    """The bare model with fresh (random) parameters; `tiny` shrinks depth and width."""
    if spec.source == "timm":
        import timm

        kw: dict[str, Any] = {"pretrained": False}
        if not spec.feature_map:
            kw["img_size"] = spec.img_size
        if tiny:
            kw.update(_tiny_kwargs(spec))
        return timm.create_model(spec.name, **kw)
    if spec.source == "open_clip":
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = open_clip.get_model_config(spec.name.partition("/")[0])
        vcfg = dict(cfg["vision_cfg"])
        embed_dim = cfg["embed_dim"]
        if tiny:
            vcfg.update(width=64, layers=2, head_width=32)
            embed_dim = 64
        quick = bool(
            cfg.get("quick_gelu", False)
            or weight_files.open_clip_pretrained(spec).get("quick_gelu", False)
        )
        return _build_vision_tower(embed_dim, CLIPVisionCfg(**vcfg), quick_gelu=quick)
    raise RegistryError(f"unknown backbone source {spec.source!r}")


def _depth(model: nn.Module, source: str) -> int:
    """Number of layers a name can ask for: timm's feature_info entries (blocks, CNN stages)."""
    return len(model.feature_info) if source == "timm" else len(model.transformer.resblocks)


def _model_spec(spec: BackboneSpec, model: nn.Module) -> BackboneSpec:
    """The spec with the widths of the model as built (a tiny model is narrower)."""
    if spec.source == "open_clip":
        return replace(spec, width=int(model.transformer.width))
    if spec.feature_map:
        widths = tuple(int(f["num_chs"]) for f in model.feature_info)
        return replace(spec, width=widths[-1], layer_widths=widths)
    return replace(spec, width=int(getattr(model, "embed_dim", model.num_features)))


# Layer tensors of one forward pass: {layer: (patch tokens on the native grid, prefix tokens,
# native grid)}; layer None is the last block after the final norm.
_Layers = dict[int | None, tuple[Tensor, Tensor, tuple[int, int]]]


def _take(layers: Sequence[int | None], depth: int) -> tuple[list[int], bool]:
    """Layers -> (block indices for forward_intermediates, whether the final output is needed)."""
    blocks = sorted({i for i in layers if i is not None})
    final = None in layers
    return (blocks or [depth - 1]), final


def _timm_token_layers(m: nn.Module, x: Tensor, layers, spec: BackboneSpec, depth: int) -> _Layers:
    """timm ViT-like model (ViT, Eva, ...) -> every asked layer from one forward_intermediates."""
    blocks, final = _take(layers, depth)
    p = spec.prefix_tokens
    out = m.forward_intermediates(
        x, indices=blocks, return_prefix_tokens=p > 0, norm=False, stop_early=not final,
        output_fmt="NLC", intermediates_only=not final,
    )  # fmt: skip
    last, inter = out if final else (None, out)
    grid = spec.native_grid
    res: _Layers = {}
    for i, y in zip(blocks, inter, strict=True):
        patch, prefix = y if p > 0 else (y, y[:, :0])
        res[i] = (patch, prefix, grid)
    if final:  # all blocks + final norm: what forward_features gives
        res[None] = (last[:, p:], last[:, :p], grid)
    return res


def _timm_map_layers(m: nn.Module, x: Tensor, layers, spec: BackboneSpec, depth: int) -> _Layers:
    """timm CNN -> every asked stage's NCHW map as (b, h*w, c) tokens (no prefix), one pass."""
    blocks, final = _take(layers, depth)
    out = m.forward_intermediates(
        x, indices=blocks, norm=False, stop_early=not final, intermediates_only=not final
    )
    last, inter = out if final else (None, out)
    maps = dict(zip(blocks, inter, strict=True))
    if final:
        maps[None] = last  # forward_features (the last stage + the model's norm_pre)
    res: _Layers = {}
    for i, y_bchw in maps.items():
        tokens_btc = y_bchw.flatten(2).transpose(1, 2)
        res[i] = (tokens_btc, tokens_btc[:, :0], (int(y_bchw.shape[-2]), int(y_bchw.shape[-1])))
    return res


def _open_clip_layers(m: nn.Module, x: Tensor, layers, spec: BackboneSpec, depth: int) -> _Layers:
    """open_clip ViT tower -> every asked layer (None: all blocks + ln_post), CLS first."""
    blocks, final = _take(layers, depth)
    last, inter = m.transformer.forward_intermediates(
        m._embeds(x), indices=blocks, stop_early=not final
    )
    res: _Layers = {
        i: (y[:, 1:], y[:, :1], spec.native_grid) for i, y in zip(blocks, inter, strict=True)
    }
    if final:
        y = m.ln_post(last)
        res[None] = (y[:, 1:], y[:, :1], spec.native_grid)
    return res


def _layer_fn(spec: BackboneSpec):
    if spec.source == "open_clip":
        return _open_clip_layers
    return _timm_map_layers if spec.feature_map else _timm_token_layers


# ---------------------------------------------------------------- the module
class Backbone(nn.Module):
    """A frozen vision model: [0, 1] RGB images -> patch tokens on a common grid (+ prefix),
    at each of its `layers` from one forward pass."""

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        *,
        layers: Sequence[int | None],
        identity: dict,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.spec = spec
        self.model = model
        self.layers = tuple(layers)
        self.layer = self.layers[0] if len(self.layers) == 1 else None
        self.depth = _depth(model, spec.source)
        self.identity = identity
        self.dtype = dtype
        self.width = spec.width_at(self.layers[0])
        self._layers_of = _layer_fn(spec)
        self.register_buffer(
            "mean_c",
            torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "std_c", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def train(self, mode: bool = True) -> Backbone:  # always inference behaviour (no dropout)
        return super().train(False)

    def layer_identity(self, layer: int | None) -> dict:
        """The identity of this backbone read at one of its layers (what a store group records)."""
        ident = {k: v for k, v in self.identity.items() if k != "layers"}
        return {**ident, "layer": layer}

    def preprocess(self, images_b3hw: Float[Tensor, "b 3 h w"]) -> Tensor:
        """Squash-resize to img_size (skipped when already that size), normalise, cast."""
        x = images_b3hw
        if not x.is_floating_point():
            raise TypeError("Backbone expects float images in [0, 1], got dtype " + str(x.dtype))
        s = self.spec.img_size
        if tuple(x.shape[-2:]) != (s, s):
            x = resize_square(x, s, self.spec.interpolation)
        x = (x.float() - self.mean_c) / self.std_c
        return x.to(self.dtype)

    def forward_layers(
        self, images_b3hw: Float[Tensor, "b 3 h w"], grid: tuple[int, int] = (14, 14)
    ) -> list[Activations]:
        """Images -> the activations of every layer in `layers` (that order), one forward pass."""
        got = self._layers_of(
            self.model, self.preprocess(images_b3hw), self.layers, self.spec, self.depth
        )
        out = []
        for layer in self.layers:
            patch_btd, prefix_bpd, native = got[layer]
            out.append(Activations(resample_grid(patch_btd, native, grid), prefix_bpd))
        return out

    def forward(
        self, images_b3hw: Float[Tensor, "b 3 h w"], grid: tuple[int, int] = (14, 14)
    ) -> Activations:
        """Images -> the activations of the backbone's one layer (several: `forward_layers`)."""
        if len(self.layers) != 1:
            raise ValueError(f"{self.spec.key} has layers {self.layers}: use forward_layers")
        return self.forward_layers(images_b3hw, grid)[0]


def resize_square(x_b3hw: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Squash-resize to size x size with an antialiased filter, clamped to [0, 1]."""
    x = F.interpolate(
        x_b3hw.float(), size=(size, size), mode=mode, antialias=True, align_corners=False
    )
    return x.clamp(0.0, 1.0)


def resample_grid(patch_btd: Tensor, native: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Patch tokens on the native grid -> `grid` (bilinear, antialiased); same dtype out."""
    b, t, d = patch_btd.shape
    if t != native[0] * native[1]:
        raise ValueError(f"expected {native[0]}x{native[1]} patch tokens, got {t}")
    if tuple(native) == tuple(grid):
        return patch_btd
    x_bdhw = patch_btd.float().transpose(1, 2).reshape(b, d, native[0], native[1])
    x_bdhw = F.interpolate(
        x_bdhw, size=tuple(grid), mode="bilinear", antialias=True, align_corners=False
    )
    return x_bdhw.reshape(b, d, grid[0] * grid[1]).transpose(1, 2).to(patch_btd.dtype)


def load_backbone(
    spec: BackboneSpec,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    layer: int | None = None,
    layers: Sequence[int | None] | None = None,
    tiny: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    offline: bool | None = None,
) -> Backbone:
    """Build a backbone with weights from `weights`, the local cache, or a seeded random init.

    Without a file or random init the weights come from the local hub cache, else the hub
    (`usae.pipeline.hub.fetch_weights`; `offline`, None = `HF_HUB_OFFLINE`, never downloads).
    Raises `usae.pipeline.weights.WeightsUnavailable` (in seconds) when none applies. `tiny` (tests)
    keeps img_size and patch size but uses 2 blocks of width 64 (hub weights must fit it).
    `layer` is the one layer to give (None: last block + final norm); `layers` (instead of it)
    several, all from one forward pass (`Backbone.forward_layers`).
    """
    if layers is None:
        layers = (layer,)
    elif layer is not None:
        raise ValueError("give layer or layers, not both")
    layers = tuple(layers)
    if not layers or len(set(layers)) != len(layers):
        raise RegistryError(f"{spec.key}: give distinct layers, got {layers}")
    cached = hub = None  # usae-weights: the hub's file (cache, else downloaded; tiny: a test hub's)
    if weights is None and not random_init:
        hub = weight_files.pretrained_weights(spec, offline=offline)
        cached = hub.path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # seeded init: identical weights for the same seed, every run
        model = _build_model(spec, tiny)
    if weights is not None:
        file, origin, source = (
            Path(weights),
            f"weights file {weights}",
            f"file:{Path(weights).name}",
        )
    elif cached is not None:
        file, origin, source = cached, f"cached weights {cached}", f"cache:{cached.name}"
    else:
        file, origin, source = None, "", "random-init"
    if file is not None:
        weight_files.load_state(spec, model, weight_files.read_state_file(file), origin)
        file_info = hub.record() if hub else weight_files.file_record(file)  # usae-weights
    depth = _depth(model, spec.source)
    for i in layers:
        if i is not None and not 0 <= i < depth:
            raise RegistryError(
                f"layer {i} is out of range for {spec.key} ({depth} blocks, 0-based: 0..{depth - 1})"
            )
    model.eval().requires_grad_(False)
    identity = {
        "weights": source,
        "sha256": weight_files.state_sha256(model),
        "random_init": weights is None and cached is None,
        "seed": seed if (weights is None and cached is None) else None,
        "layer": layers[0] if len(layers) == 1 else None,
        "tiny": tiny,
        "file": file_info if file is not None else None,  # usae-weights: repo, revision, sha256
    }
    if len(layers) > 1:
        identity["layers"] = list(layers)
    bb = Backbone(
        _model_spec(spec, model), model.to(dtype), layers=layers, identity=identity, dtype=dtype
    )
    return bb.to(device)
