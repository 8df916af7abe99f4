"""Weights file, or the local hub cache -> a backbone's state dict, checked to fit; and the
identity of a model's weights (sha256 of its state dict).

Where pretrained weights come from, in this order: an explicit file (safetensors, or a torch
state dict loaded with ``weights_only``: a stranger's file cannot run code), the LOCAL hub
cache (HF hub or torch hub; never the network). When neither is there, `WeightsUnavailable`
names both ways out (``--weights KEY=FILE`` or ``--random-init``).
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

    Looks only at files on disk: never touches the network.
    """
    from huggingface_hub import try_to_load_from_cache

    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name)
        if cfg is None:
            return None
        repo, files, url = cfg.hf_hub_id, ("model.safetensors", "pytorch_model.bin"), cfg.url
    else:
        pcfg = open_clip_pretrained(spec)
        repo = (pcfg.get("hf_hub") or "").strip("/")
        files, url = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"), pcfg.get("url")
    if repo:
        for fname in files:
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    if url:
        f = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if f.is_file() and f.suffix in (".safetensors", ".pth", ".bin", ".pt"):
            return f
    return None


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


def missing_weights_message(spec: BackboneSpec) -> str:
    return (
        f"no weights for backbone {spec.key!r} ({spec.source}:{spec.name}): not in the local model cache "
        f"(HF hub cache / torch hub; nothing is downloaded here). Either pass "
        f"--weights {spec.key}=FILE (a .safetensors or state-dict .pt/.pth file) or --random-init "
        f"(random weights, for testing the pipeline only)."
    )


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
