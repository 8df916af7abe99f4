"""A run directory <-> its files: config.json, metrics.jsonl, metrics.json, weights, checkpoint.

`RunPaths` builds every path of a run (docs/contracts.md, "Run directory"); `resolve_run`
decides between a new run and resuming one; `MetricsLog` writes one JSON line per logged step
and reads the training state without changing it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from usae.pipeline.store import Store
from usae.trainer.config import TrainConfig, TrainError
from usae.trainer.model import WEIGHTS_FILE, ModelSpec

from usae.runtime import atomic_write_json, matrix_table

CONFIG_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def model(self) -> Path:
        return self.root / WEIGHTS_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def old_checkpoint(self) -> Path:
        """Where the previous checkpoint sits while a new one is swapped in."""
        return self.root / "checkpoint.old"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def resume_hint(self) -> str:
        return f"--resume {self.root}"


def read_config(paths: RunPaths) -> dict:
    try:
        obj = json.loads(paths.config.read_text())
    except FileNotFoundError:
        raise TrainError(f"{paths.root} is not a usae run directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{paths.config} is not valid JSON ({e})") from None
    if obj.get("schema_version") != CONFIG_SCHEMA_VERSION:
        raise TrainError(
            f"{paths.config} has schema_version {obj.get('schema_version')!r}, expected 1"
        )
    return obj


def resolve_run(cfg: TrainConfig) -> tuple[TrainConfig, RunPaths, bool]:
    """(config to use, paths, resuming?). --resume takes the run's own config."""
    if cfg.resume:
        paths = RunPaths(Path(cfg.resume))
        stored = TrainConfig.from_dict(read_config(paths)["train"])
        return (
            replace(stored, resume=cfg.resume, out=cfg.resume, stop_after=cfg.stop_after),
            paths,
            True,
        )
    if not cfg.out:
        raise TrainError("give --out RUN (a new run directory) or --resume RUN")
    paths = RunPaths(Path(cfg.out))
    if paths.config.exists():
        raise TrainError(
            f"{paths.root} already holds a run; continue it with --resume {paths.root} or pick another --out"
        )
    return cfg, paths, False


def write_config(paths: RunPaths, cfg: TrainConfig, spec: ModelSpec, st: Store) -> None:
    train = replace(cfg, resume="", stop_after=0).to_dict()
    store = {
        "path": str(st.path),
        "fingerprint": st.attrs.get("fingerprint"),
        "backbones": list(st.backbones),
    }
    paths.root.mkdir(parents=True, exist_ok=True)
    obj = {
        "schema_version": CONFIG_SCHEMA_VERSION,
        "train": train,
        "model": spec.to_dict(),
        "store": store,
    }
    atomic_write_json(paths.config, obj, indent=1)


def check_same_store(paths: RunPaths, st: Store) -> None:
    want = read_config(paths)["store"].get("fingerprint")
    if want != st.attrs.get("fingerprint"):
        raise TrainError(
            f"the store {st.path} is not the one this run was trained on (fingerprint {want})"
        )


def has_checkpoint(paths: RunPaths) -> bool:
    return paths.checkpoint.exists() or paths.old_checkpoint.exists()


def trim_metrics(paths: RunPaths, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not paths.metrics_jsonl.exists():
        return
    lines = [ln for ln in paths.metrics_jsonl.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    paths.metrics_jsonl.write_text("".join(ln + "\n" for ln in keep))


class MetricsLog:
    """One JSON line per logged step in metrics.jsonl (written on rank 0 only). Reads the
    training state and the step's output; changes neither."""

    def __init__(self, paths: RunPaths, keys: Sequence[str], cfg: TrainConfig, enabled: bool):
        self.paths, self.keys, self.enabled = paths, list(keys), enabled
        self.window, self.independent = cfg.dead_window_tokens, cfg.mode == "independent"
        self.t0, self.tok0 = time.perf_counter(), 0

    def start(self, tokens: int) -> None:
        """Start timing the tokens/s of the next line."""
        self.t0, self.tok0 = time.perf_counter(), tokens

    def write(self, s, out, epoch: int) -> dict:
        line = self.line(s, out, epoch)
        if self.enabled:
            with open(self.paths.metrics_jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.start(s.tokens)
        return line

    def line(self, s, out, epoch: int) -> dict:
        keys = self.keys
        if self.independent:  # part i holds backbone i alone
            pairs = list(zip(out.sources, out.logged, strict=True))
            per = {
                name: {keys[i]: float(getattr(p, name)[0]) for i, p in pairs}
                for name in ("rec_j", "aux_j", "r2_j")
            }
            last = s.last_fired_mt
            l0 = sum(
                float((p.codes.values_bk > 0).sum(1).float().mean()) for p in out.logged
            ) / len(out.logged)
        else:  # one source (or the sources' shares merged), every target
            p = out.logged[0]
            per = {
                name: {k: float(v) for k, v in zip(keys, getattr(p, name), strict=True)}
                for name in ("rec_j", "aux_j", "r2_j")
            }
            last = s.last_fired_mt.max(0).values
            l0 = float((p.codes.values_bk > 0).sum(1).float().mean())
        dead = float(((s.tokens - last) >= self.window).float().mean())
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "step": s.step, "epoch": epoch, "tokens": s.tokens, "loss": s.log_loss[0] / max(s.log_loss[1], 1),
            "source": [keys[i] for i in out.sources], "rec": per["rec_j"], "aux": per["aux_j"],
            "r2_from_source": per["r2_j"], "self_r2": dict(zip(keys, s.self_r2, strict=True)), "l0": l0,
            "dead_fraction": dead, "lr": dict(zip(keys, out.lrs, strict=True)),
            "tokens_per_s": (s.tokens - self.tok0) / dt,
        }  # fmt: skip


def print_metrics(metrics: dict) -> None:
    """The held-out cross-model R2 matrix as a table (rows: source codes, columns: target)."""
    from rich.console import Console

    title = f"held-out R2 ({metrics['heldout_tokens']} tokens; row = codes from, column = reconstructed)"
    Console().print(matrix_table(title, "from \\ to", metrics["backbones"], metrics["r2_matrix"]))
