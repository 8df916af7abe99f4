"""Training state <-> RUN/checkpoint/ (safetensors + JSON only, replaced atomically).

A checkpoint is a directory with
  model.safetensors   the USAE state_dict (weights and BatchNorm buffers)
  optim.safetensors   the optimiser's per-parameter tensors, flattened as "<param>.<name>"
  rng.safetensors     RNG states (torch global, the source-model generator, numpy) as uint8 tensors
  state.json          step, loader position, schedule counters, optimiser hyper-parameters...

It is first written to a temporary sibling directory, then swapped in with two renames
(checkpoint -> checkpoint.old, tmp -> checkpoint), so a crash or a full disk at any point
leaves either the previous or the new checkpoint whole; `load_checkpoint` falls back to
checkpoint.old when a crash hit between the renames. Nothing is ever unpickled: a file that
is not valid safetensors/JSON (a pickle, a torch.save archive...) is refused with
`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from usae.errors import UsaeError

CHECKPOINT_VERSION = 1


class CheckpointError(UsaeError, RuntimeError):
    """A checkpoint is missing, malformed, unsafe or does not fit the model."""


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns."""

    model: dict[str, torch.Tensor]
    """USAE state_dict."""
    optim: dict[str, Any]
    """Optimiser state_dict, ready for `optimizer.load_state_dict`."""
    rng: dict[str, torch.Tensor]
    """Named RNG states (uint8 tensors)."""
    state: dict[str, Any]
    """The JSON part (step, loader position, counters...)."""


# ---------------------------------------------------------------- optimiser (de)flattening
def flatten_optim(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_tensor(state: Any) -> torch.Tensor:
    """Python/numpy RNG state (JSON-able parts) -> uint8 tensor (bytes of its JSON)."""
    return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8).clone()


def tensor_to_rng(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.numpy().tobytes()).decode())


def numpy_rng_state(rng: np.random.Generator) -> torch.Tensor:
    return rng_to_tensor(rng.bit_generator.state)


def set_numpy_rng_state(rng: np.random.Generator, t: torch.Tensor) -> None:
    rng.bit_generator.state = tensor_to_rng(t)


# ---------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_files(tmp: Path, model: dict, optim: dict, rng: dict, state: dict) -> None:
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors")
    )
    opt_tensors, opt_meta = flatten_optim(optim)
    save_file(opt_tensors, str(tmp / "optim.safetensors"))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    full = {"checkpoint_version": CHECKPOINT_VERSION, **state, "optim": opt_meta}
    with open(tmp / "state.json", "w") as f:
        json.dump(full, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(ckpt_dir: Path, model: dict, optim: dict, rng: dict, state: dict) -> None:
    """Write a checkpoint atomically; on any error the previous checkpoint is left intact."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp{os.getpid()}")
    old = ckpt_dir.with_name(f"{ckpt_dir.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, model, optim, rng, state)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    _fsync_dir(ckpt_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Delete temporary checkpoint directories a killed writer left behind."""
    ckpt_dir = Path(ckpt_dir)
    for p in ckpt_dir.parent.glob(f".{ckpt_dir.name}.tmp*"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- reading
def safe_load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors.load_file that turns every failure into a clear CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({e}); usae never loads pickles or torch.save files"
        ) from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return obj


def resolve_checkpoint_dir(ckpt_dir: Path) -> Path:
    """The checkpoint directory to read (checkpoint.old if a crash hit between the renames)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "state.json").is_file():
        return ckpt_dir
    old = ckpt_dir.with_name(f"{ckpt_dir.name}.old")
    if (old / "state.json").is_file():
        return old
    raise CheckpointError(
        f"no checkpoint in {ckpt_dir.parent} (expected {ckpt_dir.name}/state.json)"
    )


def load_checkpoint(ckpt_dir: Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (tensors on CPU)."""
    d = resolve_checkpoint_dir(ckpt_dir)
    state = _read_json(d / "state.json")
    if state.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{d} has checkpoint_version {state.get('checkpoint_version')!r}, this usae reads {CHECKPOINT_VERSION}"
        )
    model = safe_load_safetensors(d / "model.safetensors")
    opt_tensors = safe_load_safetensors(d / "optim.safetensors")
    rng = safe_load_safetensors(d / "rng.safetensors")
    meta = state.pop("optim", None)
    if not isinstance(meta, dict) or "param_groups" not in meta:
        raise CheckpointError(f"{d}/state.json lacks the optimiser description")
    try:
        optim = unflatten_optim(opt_tensors, meta)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{d}/optim.safetensors has unexpected tensor names ({e})") from None
    return Checkpoint(model, optim, rng, state)
