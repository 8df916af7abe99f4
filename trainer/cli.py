"""Command line -> TrainConfig -> run_train (``usae train``), SynthConfig -> run_synth (``usae synth``).

The options are generated from `TrainConfig`'s fields (`usae.options.config_command`): their
help is the fields' docstrings, and a test checks every command against its config.
"""

from __future__ import annotations

import typer
from usae.trainer.config import TrainConfig
from usae.trainer.synth import SynthConfig

from usae.options import Opt, config_command, split_list


def train(cfg: TrainConfig) -> None:
    from usae.trainer.rundir import print_metrics
    from usae.trainer.train import run_train

    res = run_train(cfg)
    if res.metrics:
        print_metrics(res.metrics)
        typer.echo(f"run written to {res.run_dir} ({res.steps} steps)")


def synth(cfg: SynthConfig) -> None:
    from usae.trainer.synth import run_synth

    res = run_synth(cfg)
    typer.echo(
        f"wrote {res.path}: {res.n_images} images x {res.grid[0]}x{res.grid[1]} tokens, "
        f"{len(cfg.keys())} models, chunk {res.chunk_images} images; truth in {res.truth_path}"
    )


def _gain(text: str | None) -> tuple[float, float] | None:
    return None if not text else split_list(text, float, "--gain")


def register_synth(app: typer.Typer) -> None:
    """Add ``usae synth`` (options generated from `SynthConfig`)."""
    config_command(
        app, "synth", SynthConfig, synth, opts={"gain": Opt(parse=_gain, metavar="LO,HI")}
    )


def register(app: typer.Typer) -> None:
    """Add ``usae train`` and ``usae synth`` to the CLI."""
    register_synth(app)
    config_command(
        app, "train", TrainConfig, train,
        opts={
            "warmup_steps": Opt(flags=("--warmup-steps", "--warmup")),
            "stop_after": Opt(hidden=True),
        },
    )  # fmt: skip
