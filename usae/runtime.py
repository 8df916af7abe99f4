"""What every stage shares at run time: devices, dtypes, the bf16 check, progress bars, atomic
writes and the held-out rule. One definition of each, so two stages never decide differently.

- Devices: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (`DEVICE_HELP`); ``resolve_device``.
- Dtypes: ``auto``, ``bf16``, ``fp16``, ``fp32``, ``fp64`` (`DTYPES`); a stage accepts the
  subset it can use. ``auto`` means bf16 where the device has fast bf16 (`fast_bf16`), else fp32.
- Atomic writes: a file appears whole or not at all (`atomic_path`, `atomic_write`).
- Held-out images: a stable hash of the image id, or the store's split (`heldout_images`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from usae.errors import UsaeError

# ---------------------------------------------------------------- devices
DeviceName = str
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(UsaeError, ValueError):
    """A device name outside the vocabulary, or a CUDA device that is not there."""


def check_device_name(name: str) -> str:
    """The name itself, if it is in the vocabulary (no hardware is probed)."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise DeviceError(f"device must be {DEVICE_HELP}, got {name!r}")
    return name


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available else CPU; a bare 'cuda' is this process's local rank."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name} asked for, but no CUDA device is available; use --device cpu"
        )
    return torch.device(name if ":" in name else f"cuda:{local_rank}")


# ---------------------------------------------------------------- dtypes
DtypeName = Literal["auto", "bf16", "fp16", "fp32", "fp64"]
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}


def fast_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively: a CUDA device with bf16, or a CPU with AVX512-BF16
    or AMX. Elsewhere bf16 is emulated and slower than fp32, so 'auto' and the trainer's bf16
    fall back to fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, p, lambda: False)()) for p in probes)


def check_dtype_name(name: str, allowed: Sequence[str]) -> str:
    if name not in allowed:
        raise UsaeError(f"dtype must be one of {', '.join(allowed)}, got {name!r}")
    return name


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where `fast_bf16`, else 'fp32'; other names unchanged."""
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if name not in DTYPES:
        raise UsaeError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def autocast_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a matmul precision: bf16 where it is fast, None (fp32) otherwise."""
    return torch.bfloat16 if name in ("bf16", "auto") and fast_bf16(device) else None


# ---------------------------------------------------------------- progress bars
def progress_bar(enabled: bool = True, *, info: bool = False, transient: bool = False):
    """The one progress bar of every stage: description, bar, done/total, an optional
    ``info`` text field (``task.fields['info']``) and the time left. Disabled: prints nothing."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        cols.append(TextColumn("{task.fields[info]}"))
    cols.append(TimeRemainingColumn())
    return Progress(*cols, disable=not enabled, transient=transient)


# ---------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it is renamed to `path`, on any error it
    is removed. Readers never see half a file, and a killed writer leaves only a dot-file.

    No fsync: a killed process cannot leave a file without its data, which is what resuming
    relies on; surviving a power cut as well would need an fsync per file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> None:
    """Write bytes, text, or whatever `data(file)` writes, atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)


def config_json(cfg: Any) -> dict:
    """A config dataclass as a JSON-ready dict (paths as text): what a command saves of its settings."""
    import dataclasses

    return {
        k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()
    }


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    atomic_write(path, json.dumps(obj, indent=indent))  # dumps uses the C encoder; dump does not


# ---------------------------------------------------------------- held-out images
HOLDOUT_SALT = "usae-holdout"


def holdout_mask(image_ids: Sequence[str], fraction: float, salt: str = HOLDOUT_SALT) -> np.ndarray:
    """Held-out flag per image from a stable hash of its id (the same answer in every stage,
    whatever the order or subset of ids)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    out = np.zeros(len(image_ids), dtype=bool)
    if fraction == 0.0:
        return out
    for i, iid in enumerate(image_ids):
        h = hashlib.blake2b(f"{salt}:{iid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2**64 < fraction
    return out


def heldout_images(store, fraction: float) -> np.ndarray:
    """The held-out rule of training and analysis, as a boolean mask over the store's images
    (valid or not): none when `fraction` is 0; else the store's split when it has one
    (split != "train"), else `holdout_mask` of the image ids."""
    if fraction <= 0:
        return np.zeros(store.n_images, dtype=bool)
    split = store.split
    if split is not None:
        return np.asarray(split != "train")
    return holdout_mask(list(store.image_ids), fraction)


# ---------------------------------------------------------------- terminal tables
def matrix_table(
    title: str,
    corner: str,
    keys: Sequence[str],
    rows: Sequence[Sequence[float | None]],
    extra: dict[str, Sequence[str]] | None = None,
):
    """A rich table of a backbone x backbone matrix (R2 from codes of row i of backbone j), with
    optional extra columns; None or NaN cells print as "-"."""
    from rich.table import Table

    def cell(v: float | None) -> str:
        return "-" if v is None or v != v else f"{v:.3f}"

    t = Table(title=title)
    t.add_column(corner)
    for k in keys:
        t.add_column(k, justify="right")
    for name in extra or {}:
        t.add_column(name, justify="right")
    for n, (k, row) in enumerate(zip(keys, rows, strict=True)):
        t.add_row(k, *(cell(v) for v in row), *(col[n] for col in (extra or {}).values()))
    return t
