"""Weights file, or the local hub cache -> a backbone's state dict, checked to fit; and the
identity of a model's weights (sha256 of its state dict).

Where pretrained weights come from, in this order: an explicit file (safetensors, or a torch
state dict loaded with ``weights_only``: a stranger's file cannot run code), the LOCAL hub
cache (HF hub or torch hub), else a download from the hub into that cache
(`usae.pipeline.hub`; never with ``HF_HUB_OFFLINE=1``). When none works, `WeightsUnavailable`
names the ways out (``usae weights fetch`` on a machine with network, ``--weights KEY=FILE``,
``--random-init``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from usae.errors import UsaeError

if TYPE_CHECKING:
    from usae.pipeline.registry import BackboneSpec


class WeightsUnavailable(UsaeError, RuntimeError):
    """No weights for a backbone: none in the local cache, no file given, no random init asked."""


# Parameters that feed only classification/pooling heads, never the tokens we extract.
_HEAD_PREFIXES = (
    "head.",
    "fc_norm.",
    "attn_pool.",
    "head_drop.",
    "proj",
    "text_projection",
    "logit_",
)


def open_clip_pretrained(spec: BackboneSpec) -> dict:
    """open_clip's pretrained config of the spec's tag ({} without a tag)."""
    import open_clip

    model, _, tag = spec.name.partition("/")
    return dict(open_clip.get_pretrained_cfg(model, tag) or {}) if tag else {}


def read_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A safetensors file or a torch state-dict file (loaded with weights_only: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailable(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code, TorchScript archives, junk
        raise WeightsUnavailable(
            f"{p} is not a plain state dict torch can load safely: {e}"
        ) from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsUnavailable(f"{p} does not hold a state dict of tensors")
    return dict(obj)


def hub_cache_file(spec: BackboneSpec) -> Path | None:
    """The backbone's pretrained weights in the LOCAL cache (HF hub or torch hub), or None.

    Looks only at files on disk: never touches the network (`usae.pipeline.hub.cached_weights`).
    """
    from usae.pipeline.hub import cached_weights

    hit = cached_weights(spec, verify=False)
    return None if hit is None else hit.path


def pretrained_weights(spec: BackboneSpec, *, offline: bool | None = None):
    """The backbone's pretrained weights file: the local cache, else the hub (unless offline).

    Returns a `usae.pipeline.hub.WeightsFile`; raises `WeightsUnavailable` naming the ways out.
    """
    from usae.pipeline.hub import fetch_weights

    return fetch_weights(spec, offline=offline)


def file_record(path: str | os.PathLike) -> dict:
    """What the store records about an explicit weights file: its name, size and sha256."""
    from usae.pipeline.hub import file_sha256

    p = Path(path)
    return {
        "origin": "file",
        "filename": p.name,
        "size": p.stat().st_size,
        "sha256": file_sha256(p),
    }


def _adapt_state(
    spec: BackboneSpec, model: nn.Module, state: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Checkpoint layout -> this model's (timm's own conversions, open_clip's visual. prefix)."""
    if spec.source == "timm":
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(state, model)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def load_state(spec: BackboneSpec, model: nn.Module, state: dict[str, Tensor], origin: str) -> None:
    try:
        res = model.load_state_dict(_adapt_state(spec, model, state), strict=False)
    except (RuntimeError, KeyError, ValueError) as e:  # shape mismatches, foreign layouts
        msg = str(e).strip().splitlines()
        raise WeightsUnavailable(
            f"{origin} does not fit {spec.source}:{spec.name} ({spec.key}): {msg[:3]}"
        ) from None
    missing = [k for k in res.missing_keys if not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in res.unexpected_keys if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise WeightsUnavailable(
            f"{origin} does not fit {spec.source}:{spec.name} ({spec.key}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def state_sha256(model: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtype, shape and raw bytes of each tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def missing_weights_message(spec: BackboneSpec, why: str = "not in the local cache") -> str:
    """Why a backbone has no weights, and the three ways out."""
    from usae.pipeline.hub import missing_weights_message as msg

    return msg(spec, why)


def parse_weight_files(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """['KEY=FILE', ...] -> ((key, file), ...), each file checked to exist, one per key.

    Raises ValueError naming the bad item (the CLI shows it as a usage error of --weights).
    """
    out = []
    for it in items:
        key, sep, file = it.partition("=")
        if not sep or not key or not file:
            raise ValueError(f"expected KEY=FILE, got {it!r}")
        if not Path(file).is_file():
            raise ValueError(f"{file} does not exist")
        out.append((key.strip(), file))
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"one weights file per backbone, got {keys}")
    return tuple(out)
