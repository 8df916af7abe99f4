"""A run's store -> the run's backbones, rebuilt from the store's recorded spec and identity,
with the weights the store was extracted with (a weights sha256 that differs is refused).

Used by activation maximisation, the one analysis step that needs gradients through the
backbones (everything else reads the store).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from usae.trainer.model import USAE

from usae.errors import UsaeError
from usae.runtime import DTYPES


class BackboneError(UsaeError, RuntimeError):
    """A backbone of the run cannot be rebuilt as the store recorded it (spec, weights, store)."""


class Target(NamedTuple):
    """One backbone taking part: its position in the run and the loaded module."""

    key: str
    """Backbone key (store and run)."""
    index: int
    """Position i in the run's spec.backbones."""
    backbone: nn.Module
    """Differentiable Backbone (forward(images in [0, 1], grid) -> Activations)."""


def run_store_path(run: Path, run_cfg: dict, override: Path | None) -> Path:
    """The run's store: ``override`` (--store), else the path recorded in the run's config.json
    (as given, or relative to the run directory)."""
    if override is not None:
        return Path(override)
    rec = (run_cfg.get("store") or {}).get("path")
    if not rec:
        raise BackboneError(f"{run}/config.json records no store path; pass --store")
    for p in (Path(rec), Path(run) / rec):
        if p.exists():
            return p
    raise BackboneError(f"the run's store {rec} was not found (moved?); pass --store PATH")


def open_run(run: Path, store: Path | None, device: str):
    """(model, run config, store) of a run directory and its store (``store``, else the one the
    run records); every problem as a BackboneError with the reason."""
    from usae.pipeline.store import Store, StoreError
    from usae.trainer.checkpoint import CheckpointError
    from usae.trainer.model import load_run

    try:
        model, run_cfg = load_run(run, device=device)
    except (FileNotFoundError, CheckpointError) as e:
        raise BackboneError(str(e)) from e
    except (KeyError, ValueError) as e:  # config.json unreadable or incomplete
        raise BackboneError(
            f"{run}/config.json is not a usae run config ({type(e).__name__}: {e})"
        ) from e
    try:
        return model, run_cfg, Store.open(run_store_path(Path(run), run_cfg, store))
    except StoreError as e:
        raise BackboneError(str(e)) from e


def parse_weights(items: Sequence[str]) -> dict[str, Path]:
    """KEY=FILE pairs -> {key: path} (`usae.pipeline.weights.parse_weight_files`'s rules)."""
    from usae.pipeline.weights import parse_weight_files

    try:
        return {k: Path(f) for k, f in parse_weight_files(items)}
    except ValueError as e:
        raise BackboneError(f"--weights: {e}") from None


def _recorded(store, key: str) -> tuple[dict, dict]:
    """(spec fields, weights identity) recorded for a backbone in the store."""
    rec = store.spec(key)
    ident = rec.get("identity")
    return rec, dict(ident) if isinstance(ident, dict) else rec


def _spec_from_record(key: str, rec: dict):
    """The BackboneSpec the store recorded (all fields), else the registry's for its name."""
    from dataclasses import fields

    from usae.pipeline.registry import BackboneSpec, RegistryError, resolve

    names = [f.name for f in fields(BackboneSpec)]
    if all(n in rec for n in names if n != "interpolation"):
        kw = {n: rec[n] for n in names if n in rec}
        kw.update(key=key, mean=tuple(rec["mean"]), std=tuple(rec["std"]))
        return BackboneSpec(**kw)
    src, name = rec.get("source"), rec.get("name")
    if not src or not name:
        raise BackboneError(
            f"the store records no model name for backbone {key!r}; cannot rebuild it"
        )
    try:
        return resolve(f"{key}={src}:{name}")
    except RegistryError as e:
        raise BackboneError(f"backbone {key!r}: {e}") from e


def backbone_dtype(name: str, rec: dict) -> torch.dtype:
    """--dtype, or with "auto" the compute dtype the store records for the backbone (else fp32)."""
    if name == "auto":
        return DTYPES.get(str(rec.get("compute_dtype", "fp32")), torch.float32)
    return DTYPES[name]


def load_target(
    model: USAE, store, key: str, weights: Path | None, device: str, dtype: str
) -> Target:
    """Backbone `key` with the weights the store recorded (same seed / tiny flag, or a file)."""
    from usae.pipeline.backbone import load_backbone
    from usae.pipeline.registry import RegistryError
    from usae.pipeline.weights import WeightsUnavailable

    rec, ident = _recorded(store, key)
    spec = _spec_from_record(key, rec)
    want = ident.get("sha256")
    random_init = bool(ident.get("random_init", False)) and weights is None
    try:
        bb = load_backbone(
            spec, weights=weights, random_init=random_init, seed=int(ident.get("seed") or 0),
            layer=ident.get("layer"), tiny=bool(ident.get("tiny", False)),
            device=device, dtype=backbone_dtype(dtype, rec),
        )  # fmt: skip
    except (WeightsUnavailable, RegistryError) as e:
        raise BackboneError(
            f"the weights of backbone {key!r} ({spec.source}:{spec.name}, recorded as "
            f"{ident.get('weights', '?')}, sha256 {str(want)[:12]}...) cannot be had: {e}. "
            f"Pass --weights {key}=FILE with the weights the store was extracted with."
        ) from e
    got = bb.identity["sha256"]
    if want and got != want:
        raise BackboneError(
            f"backbone {key!r}: the loaded weights ({bb.identity['weights']}, sha256 {got[:12]}...) are not "
            f"the ones the store was extracted with (sha256 {want[:12]}...); pass --weights {key}=FILE "
            "with the right file"
        )
    if not want:
        raise BackboneError(
            f"the store records no weights sha256 for backbone {key!r}; cannot verify its weights"
        )
    return Target(key, model.index(key), bb)


def load_targets(
    model: USAE, run_cfg: dict, store, weight_files: Sequence[str], device: str, dtype: str
) -> list[Target]:
    """Every backbone of the run, checked against the store and loaded with matching weights.

    ``weight_files``: KEY=FILE items; ``dtype``: a runtime dtype name, or auto (the store's)."""
    keys = list(model.spec.backbones)
    weights = parse_weights(weight_files)
    extra = sorted(set(weights) - set(keys))
    if extra:
        raise BackboneError(
            f"--weights names backbone(s) {extra} that are not in the run (its backbones: {keys})"
        )
    missing = [k for k in keys if k not in store.backbones]
    if missing:
        raise BackboneError(
            f"backbone(s) {missing} of the run are missing from the store {store.path} "
            f"(it holds {store.backbones}); is --store the store the run was trained on?"
        )
    want_fp = (run_cfg.get("store") or {}).get("fingerprint")
    if want_fp and store.attrs.get("fingerprint") != want_fp:
        raise BackboneError(
            f"store {store.path} has fingerprint {store.attrs.get('fingerprint')}, the run was trained on "
            f"{want_fp}: not the run's store"
        )
    return [load_target(model, store, k, weights.get(k), device, dtype) for k in keys]
