"""Backbone name -> vision model that maps images to patch tokens on a common grid.

Everything backbone-specific lives here: the exact timm/open_clip model and pretrained tag,
input size, patch size, prefix (CLS/register) tokens, mean/std, and how to run a model up
to a given block. The rest of usae only sees `BackboneSpec`, `Backbone` and `Activations`.

Adding a backbone is one entry in `REGISTRY` (or, without editing anything, the names
``timm:<model.tag>`` for any timm VisionTransformer and ``open_clip:<model>/<pretrained>``
for an open_clip ViT vision tower).

Weights come, in this order, from an explicit file (``weights=``), from the LOCAL hub cache
(never the network), or from a seeded random init when asked for (``random_init=True``).
If none applies, `load_backbone` fails at once with `WeightsUnavailable`, naming both ways out.
Reading weights files, finding them in the cache and hashing them is `usae.pipeline.weights`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from usae.pipeline import weights as weight_files

from usae.errors import UsaeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class RegistryError(UsaeError, ValueError):
    """An unknown backbone name or an unusable model."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: model, pinned tag, preprocessing and token layout."""

    key: str
    """Name of the backbone inside a store (its group name and `--weights KEY=FILE` key)."""
    source: str
    """Library that builds the model: "timm" or "open_clip"."""
    name: str
    """Exact model name with its pretrained tag (timm "model.tag", open_clip "model/pretrained")."""
    img_size: int
    """Square input size in pixels; images are squash-resized to it."""
    patch_size: int
    """Patch size in pixels; the native grid is img_size // patch_size per side."""
    width: int
    """Token width d."""
    prefix_tokens: int
    """Tokens before the patch tokens (CLS, registers)."""
    mean: tuple[float, float, float]
    """Per-channel mean used to normalise [0, 1] RGB input."""
    std: tuple[float, float, float]
    """Per-channel std used to normalise [0, 1] RGB input."""
    interpolation: str = "bicubic"
    """Resize filter (antialiased)."""

    @property
    def native_grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["native_grid"] = list(self.native_grid)
        return d


# The paper's three backbones, pinned to exact tags (docs/method.md).
REGISTRY: dict[str, BackboneSpec] = {
    "dinov2": BackboneSpec(
        "dinov2",
        "timm",
        "vit_small_patch14_dinov2.lvd142m",
        224,
        14,
        384,
        1,
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    "siglip": BackboneSpec(
        "siglip", "timm", "vit_base_patch16_siglip_224.webli", 224, 16, 768, 0, HALF, HALF
    ),
    "vit": BackboneSpec(
        "vit", "timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 224, 16, 768, 1, HALF, HALF
    ),
}
DEFAULT_BACKBONES = ("dinov2", "siglip", "vit")


class Activations(NamedTuple):
    """Output of `Backbone.forward`."""

    patch_btd: Tensor
    """Patch tokens on the requested grid, (batch, grid_h * grid_w, width), row-major."""
    prefix_bpd: Tensor
    """Prefix tokens (CLS/registers), (batch, prefix_tokens, width); prefix_tokens may be 0."""


# ---------------------------------------------------------------- names -> specs
def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._") or "backbone"


def resolve(name: str) -> BackboneSpec:
    """Backbone name -> spec: a registry key, "timm:<model.tag>" or "open_clip:<model>/<pretrained>".

    An optional "alias=" prefix sets the key, e.g. "big=timm:vit_large_patch14_dinov2.lvd142m".
    """
    alias, body = name.split("=", 1) if "=" in name else (None, name)
    body = body.strip()
    if body in REGISTRY:
        spec = REGISTRY[body]
    elif body.startswith("timm:"):
        spec = _timm_spec(body[len("timm:") :])
    elif body.startswith("open_clip:"):
        spec = _open_clip_spec(body[len("open_clip:") :])
    else:
        known = ", ".join(REGISTRY)
        raise RegistryError(
            f"unknown backbone {body!r}: use one of {known}, 'timm:<model.tag>' or 'open_clip:<model>/<pretrained>'"
        )
    if alias is not None:
        if _safe_key(alias) != alias:
            raise RegistryError(
                f"backbone alias {alias!r} may only contain letters, digits, '_', '.', '-'"
            )
        spec = replace(spec, key=alias)
    return spec


def _timm_spec(model_name: str) -> BackboneSpec:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(model_name):
        raise RegistryError(f"timm has no model {model_name!r} (timm {timm.__version__})")
    cfg = timm.models.get_pretrained_cfg(model_name)
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            m = timm.create_model(model_name, pretrained=False)
    except Exception:  # noqa: BLE001 - a model whose init needs real tensors: build it small
        try:
            m = timm.create_model(model_name, pretrained=False, depth=1)
        except Exception as e:  # noqa: BLE001
            raise RegistryError(
                f"cannot build timm:{model_name} ({type(e).__name__}: {e})"
            ) from None
    if not isinstance(m, VisionTransformer):
        raise RegistryError(
            f"timm:{model_name} is a {type(m).__name__}; only timm VisionTransformer models are supported"
        )
    patch = m.patch_embed.patch_size
    img = m.patch_embed.img_size
    if patch[0] != patch[1] or img[0] != img[1]:
        raise RegistryError(f"timm:{model_name} has a non-square patch or input ({patch}, {img})")
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    interp = (
        cfg.interpolation
        if cfg is not None and cfg.interpolation in ("bicubic", "bilinear")
        else "bicubic"
    )
    return BackboneSpec(
        _safe_key(model_name), "timm", model_name, int(img[0]), int(patch[0]), int(m.embed_dim),
        int(m.num_prefix_tokens), mean, std, interp,
    )  # fmt: skip


def _open_clip_spec(ref: str) -> BackboneSpec:
    import open_clip

    model, _, tag = ref.partition("/")
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise RegistryError(f"open_clip has no model config {model!r}")
    vcfg = cfg["vision_cfg"]
    if isinstance(vcfg.get("layers"), (tuple, list)) or vcfg.get("timm_model_name"):
        raise RegistryError(
            f"open_clip:{model} is not a plain ViT vision tower; only those are supported"
        )
    if vcfg.get("attentional_pool") or vcfg.get("final_ln_after_pool"):
        raise RegistryError(f"open_clip:{model} pools tokens before its final norm; not supported")
    pcfg = open_clip.get_pretrained_cfg(model, tag) if tag else {}
    if tag and not pcfg:
        raise RegistryError(f"open_clip has no pretrained tag {tag!r} for {model!r}")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    img = vcfg.get("image_size", 224)
    patch = vcfg.get("patch_size", 16)
    if isinstance(img, (tuple, list)) or isinstance(patch, (tuple, list)):
        raise RegistryError(f"open_clip:{model} has a non-square input or patch")
    return BackboneSpec(
        _safe_key(f"{model}_{tag}" if tag else model), "open_clip", ref, int(img), int(patch), int(vcfg["width"]),
        1,  # the class token
        tuple(pcfg.get("mean", OPENAI_DATASET_MEAN)), tuple(pcfg.get("std", OPENAI_DATASET_STD)),
        pcfg.get("interpolation", "bicubic"),
    )  # fmt: skip


# ---------------------------------------------------------------- building models
def _build_model(spec: BackboneSpec, tiny: bool) -> nn.Module:
    """The bare model with fresh (random) parameters; `tiny` shrinks depth and width."""
    if spec.source == "timm":
        import timm

        kw: dict[str, Any] = {"pretrained": False, "img_size": spec.img_size}
        if tiny:
            kw.update(depth=2, embed_dim=64, num_heads=2)
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
    return len(model.blocks) if source == "timm" else len(model.transformer.resblocks)


def _timm_tokens(m: nn.Module, x: Tensor, layer: int | None) -> Tensor:
    """timm ViT up to `layer` (None: all blocks + final norm, i.e. `forward_features`)."""
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    if layer is None:
        return m.norm(m.blocks(x))
    for blk in m.blocks[: layer + 1]:
        x = blk(x)
    return x


def _open_clip_tokens(m: nn.Module, x: Tensor, layer: int | None) -> Tensor:
    """open_clip VisionTransformer up to `layer` (None: all blocks + ln_post), CLS first."""
    x = m._embeds(x)
    tr = m.transformer
    if not getattr(tr, "batch_first", True):
        x = x.transpose(0, 1)
    blocks = tr.resblocks if layer is None else tr.resblocks[: layer + 1]
    for blk in blocks:
        x = blk(x)
    if not getattr(tr, "batch_first", True):
        x = x.transpose(0, 1)
    return m.ln_post(x) if layer is None else x


_TOKEN_FNS = {"timm": _timm_tokens, "open_clip": _open_clip_tokens}


# ---------------------------------------------------------------- the module
class Backbone(nn.Module):
    """A frozen vision model: [0, 1] RGB images -> patch tokens on a common grid (+ prefix)."""

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        *,
        layer: int | None,
        identity: dict,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.spec = spec
        self.model = model
        self.layer = layer
        self.identity = identity
        self.dtype = dtype
        self.width = int(model.embed_dim if spec.source == "timm" else model.transformer.width)
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

    def forward(
        self, images_b3hw: Float[Tensor, "b 3 h w"], grid: tuple[int, int] = (14, 14)
    ) -> Activations:
        tokens_btd = _TOKEN_FNS[self.spec.source](
            self.model, self.preprocess(images_b3hw), self.layer
        )
        p = self.spec.prefix_tokens
        prefix_bpd, patch_btd = tokens_btd[:, :p], tokens_btd[:, p:]
        return Activations(resample_grid(patch_btd, self.spec.native_grid, grid), prefix_bpd)


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
    """
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
    if layer is not None and not 0 <= layer < depth:
        raise RegistryError(
            f"layer {layer} is out of range for {spec.key} ({depth} blocks, 0-based: 0..{depth - 1})"
        )
    model.eval().requires_grad_(False)
    identity = {
        "weights": source,
        "sha256": weight_files.state_sha256(model),
        "random_init": weights is None and cached is None,
        "seed": seed if (weights is None and cached is None) else None,
        "layer": layer,
        "tiny": tiny,
        "file": file_info if file is not None else None,  # usae-weights: repo, revision, sha256
    }
    if tiny:
        spec = replace(spec, width=64)
    bb = Backbone(spec, model.to(dtype), layer=layer, identity=identity, dtype=dtype)
    return bb.to(device)
