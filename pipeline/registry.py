"""Backbone name -> `BackboneSpec`: which model, pinned tag, preprocessing and token layout.
The model itself (building, forward, weights loading) is `usae.pipeline.backbone`.

Everything backbone-specific lives here: the exact timm/open_clip model and pretrained tag,
input size, patch size (a CNN's stride), prefix (CLS/register) tokens, mean/std, and how to
read a model's blocks. The rest of usae only sees `BackboneSpec` and `usae.pipeline.backbone`'s
`Backbone` and `Activations`.

Every model runs through one path: timm's `forward_intermediates` (any timm ViT-like model:
ViT, DINOv2/v3, SigLIP 1/2, EVA-02, Perception Encoder...; and CNN feature maps such as
ConvNeXt, whose NCHW maps become (b, h*w, c) tokens with no prefix), or an open_clip ViT tower's
`transformer.forward_intermediates`. Adding a backbone is one entry in `REGISTRY` (or, without
editing anything, the names ``timm:<model.tag>`` and ``open_clip:<model>/<pretrained>``).

Layers: a name may end in ``@N`` or ``@N,M,...`` (0-based block indices; a CNN's stage
indices). Layer None (no ``@``) is the last block after the final norm (`forward_features`);
layer N is block N's output without the final norm. A `Backbone` loaded with several layers
gives them all from ONE forward pass (`Backbone.forward_layers`); extraction stores each as its
own group ``<key>@<N>`` (`layer_key`).

Weights (`usae.pipeline.backbone.load_backbone`) come, in this order, from an explicit file,
the local HF cache, the hub (unless offline), or a seeded random init when asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from usae.errors import UsaeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
LAYER_SEP = "@"


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
    """Patch size in pixels (a CNN: the stride of its last stage); native grid img_size // it."""
    width: int
    """Token width d (of the default layer)."""
    prefix_tokens: int
    """Tokens before the patch tokens (CLS, registers); 0 for a CNN."""
    mean: tuple[float, float, float]
    """Per-channel mean used to normalise [0, 1] RGB input."""
    std: tuple[float, float, float]
    """Per-channel std used to normalise [0, 1] RGB input."""
    interpolation: str = "bicubic"
    """Resize filter (antialiased)."""
    feature_map: bool = False
    """A CNN: tokens are the positions of an NCHW feature map; layers are its stages."""
    layer_widths: tuple[int, ...] = field(default=())
    """CNN only: width of each stage's output (empty: every layer has `width`)."""
    layer_strides: tuple[int, ...] = field(default=())
    """CNN only: stride of each stage's output in pixels (empty: every layer has `patch_size`)."""

    def __post_init__(self) -> None:  # JSON gives lists: keep the spec hashable
        for name in ("mean", "std", "layer_widths", "layer_strides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def native_grid(self) -> tuple[int, int]:
        return self.grid_at(None)

    def grid_at(self, layer: int | None) -> tuple[int, int]:
        """Layer -> the native token grid (h, w) the model gives there."""
        stride = (
            self.patch_size
            if layer is None or not self.layer_strides
            else self.layer_strides[layer]
        )
        g = self.img_size // stride
        return (g, g)

    def width_at(self, layer: int | None) -> int:
        """Layer -> the token width there."""
        return self.width if layer is None or not self.layer_widths else self.layer_widths[layer]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("mean", "std", "layer_widths", "layer_strides"):
            d[name] = list(getattr(self, name))
        d["native_grid"] = list(self.native_grid)
        return d


# The paper's three backbones, then today's leaders; each pinned to an exact tag.
# fmt: off
REGISTRY: dict[str, BackboneSpec] = {
    "dinov2": BackboneSpec("dinov2", "timm", "vit_small_patch14_dinov2.lvd142m", 224, 14, 384, 1, IMAGENET_MEAN, IMAGENET_STD),
    "siglip": BackboneSpec("siglip", "timm", "vit_base_patch16_siglip_224.webli", 224, 16, 768, 0, HALF, HALF),
    "vit": BackboneSpec("vit", "timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 224, 16, 768, 1, HALF, HALF),
    # DINOv3 ViT-B/16 (an Eva with RoPE): CLS + 4 registers, pretrained at 256 px -> 16x16
    "dinov3": BackboneSpec("dinov3", "timm", "vit_base_patch16_dinov3.lvd1689m", 256, 16, 768, 5, IMAGENET_MEAN, IMAGENET_STD),
    # SigLIP 2 B/16 at 224: no CLS (attention-pool head), 14x14
    "siglip2": BackboneSpec("siglip2", "timm", "vit_base_patch16_siglip_224.v2_webli", 224, 16, 768, 0, HALF, HALF),
    # Perception Encoder Core B/16 (an Eva with RoPE): CLS, 14x14
    "pe": BackboneSpec("pe", "timm", "vit_pe_core_base_patch16_224.fb", 224, 16, 768, 1, HALF, HALF),
}
# fmt: on
DEFAULT_BACKBONES = ("dinov2", "siglip", "vit")


class BackboneRef(NamedTuple):
    """A parsed backbone name: the model and the layers asked for."""

    spec: BackboneSpec
    """The model (its key: the alias, else the registry key or a safe form of the name)."""
    layers: tuple[int, ...] | None
    """0-based block indices after "@", in the order given; None: no "@" (the default layer)."""


# ---------------------------------------------------------------- names -> specs
def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("._") or "backbone"


def layer_key(key: str, layer: int) -> str:
    """(backbone key, block index) -> the store group key of that layer, e.g. "dinov2@6"."""
    return f"{key}{LAYER_SEP}{layer}"


def split_layers(key: str) -> tuple[str, int | None]:
    """Store group key -> (backbone key, layer): "dinov2@6" -> ("dinov2", 6), "vit" -> ("vit", None)."""
    base, sep, layer = key.rpartition(LAYER_SEP)
    return (base, int(layer)) if sep and layer.isdigit() else (key, None)


def join_layer_lists(names: Sequence[str]) -> list[str]:
    """Names split at every comma -> names whose "@" layer lists are whole again.

    ("dinov2@3", "6", "siglip") -> ["dinov2@3,6", "siglip"]: the CLI splits --backbones at commas.
    """
    out: list[str] = []
    for n in (n.strip() for n in names):
        if n.isdigit() and out and LAYER_SEP in out[-1]:
            out[-1] = f"{out[-1]},{n}"
        elif n:
            out.append(n)
    return out


def _parse_layers(text: str, name: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise RegistryError(
            f"backbone {name!r}: after {LAYER_SEP!r} give 0-based block indices, e.g. dinov2@6 or dinov2@3,6,9"
        )
    layers = tuple(int(p) for p in parts)
    if len(set(layers)) != len(layers):
        raise RegistryError(f"backbone {name!r} names a layer twice")
    return layers


def parse_backbone(name: str) -> BackboneRef:
    """Backbone name with optional layers -> (spec, layers): "d=dinov2@3,6" -> (dinov2 keyed d, (3, 6))."""
    body, sep, layer_text = name.partition(LAYER_SEP)
    spec = resolve(body)
    return BackboneRef(spec, _parse_layers(layer_text, name) if sep else None)


def resolve(name: str) -> BackboneSpec:
    """Backbone name -> spec: a registry key, "timm:<model.tag>" or "open_clip:<model>/<pretrained>".

    An optional "alias=" prefix sets the key, e.g. "big=timm:vit_large_patch14_dinov2.lvd142m".
    Layers ("@N,...") are `parse_backbone`'s.
    """
    alias, body = name.split("=", 1) if "=" in name else (None, name)
    body = body.strip()
    if LAYER_SEP in body:
        raise RegistryError(
            f"backbone {name!r}: layers ({LAYER_SEP}N) are parsed by parse_backbone"
        )
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


def _is_token_model(m: nn.Module) -> bool:
    """A ViT-like timm model (patch embedding + prefix tokens), as opposed to a CNN."""
    return hasattr(m, "patch_embed") and hasattr(m, "num_prefix_tokens")


def _meta_model(model_name: str, **kw: Any) -> nn.Module:
    """timm model on the meta device (shapes only: no memory, no init cost)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False, **kw)
    except Exception:  # noqa: BLE001 - a model whose init needs real tensors: build it small
        try:
            return timm.create_model(model_name, pretrained=False, depth=1, **kw)
        except Exception as e:  # noqa: BLE001
            raise RegistryError(
                f"cannot build timm:{model_name} ({type(e).__name__}: {e})"
            ) from None


def _timm_spec(model_name: str) -> BackboneSpec:
    import timm

    if not timm.is_model(model_name):
        raise RegistryError(f"timm has no model {model_name!r} (timm {timm.__version__})")
    cfg = timm.models.get_pretrained_cfg(model_name)
    m = _meta_model(model_name)
    if not hasattr(m, "forward_intermediates"):
        raise RegistryError(
            f"timm:{model_name} ({type(m).__name__}) has no forward_intermediates; it cannot be read block by block"
        )
    size = tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else None
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    interp = (
        cfg.interpolation
        if cfg is not None and cfg.interpolation in ("bicubic", "bilinear")
        else "bicubic"
    )
    key = _safe_key(model_name)
    if _is_token_model(m):
        if size is not None and tuple(m.patch_embed.img_size) != size:
            m = _meta_model(model_name, img_size=size)  # the size it was trained at
        patch, img = m.patch_embed.patch_size, m.patch_embed.img_size
        if patch[0] != patch[1] or img[0] != img[1]:
            raise RegistryError(
                f"timm:{model_name} has a non-square patch or input ({patch}, {img})"
            )
        width = int(getattr(m, "embed_dim", m.num_features))
        return BackboneSpec(
            key, "timm", model_name, int(img[0]), int(patch[0]), width, int(m.num_prefix_tokens),
            mean, std, interp,
        )  # fmt: skip
    return _cnn_spec(m, key, model_name, size, mean, std, interp)


def _cnn_spec(m: nn.Module, key: str, model_name: str, size, mean, std, interp) -> BackboneSpec:
    """A timm CNN on meta -> its spec: the shapes of every stage from a meta forward pass."""
    if size is None or size[0] != size[1]:
        raise RegistryError(f"timm:{model_name} has no square pretrained input size ({size})")
    s = int(size[0])
    try:
        final, maps = m.forward_intermediates(
            torch.empty(1, 3, s, s, device="meta"), indices=list(range(len(m.feature_info)))
        )
    except Exception as e:  # noqa: BLE001
        raise RegistryError(
            f"timm:{model_name}: forward_intermediates failed ({type(e).__name__}: {e})"
        ) from None
    if final.ndim != 4 or tuple(final.shape) != tuple(maps[-1].shape):
        raise RegistryError(
            f"timm:{model_name} ({type(m).__name__}) does not end in an NCHW feature map "
            f"(final features {tuple(final.shape)}); not supported"
        )
    if any(f.shape[-1] != f.shape[-2] or s % f.shape[-1] for f in maps):
        raise RegistryError(f"timm:{model_name} gives non-square or uneven feature maps")
    widths = tuple(int(f.shape[1]) for f in maps)
    strides = tuple(s // int(f.shape[-1]) for f in maps)
    return BackboneSpec(
        key, "timm", model_name, s, strides[-1], widths[-1], 0, mean, std, interp,
        feature_map=True, layer_widths=widths, layer_strides=strides,
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
