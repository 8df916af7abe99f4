"""Command line -> TrainConfig -> run_train (``usae train``); also registers ``usae synth``.

The options are generated from `TrainConfig`'s fields (`usae.options.config_command`): their
help is the fields' docstrings, and a test checks every command against its config.
"""

from __future__ import annotations

import typer
from usae.trainer.config import TrainConfig

from usae.options import Opt, config_command


def train(cfg: TrainConfig) -> None:
    from usae.trainer.rundir import print_metrics
    from usae.trainer.train import run_train

    res = run_train(cfg)
    if res.metrics:
        print_metrics(res.metrics)
        typer.echo(f"run written to {res.run_dir} ({res.steps} steps)")


def register(app: typer.Typer) -> None:
    """Add ``usae train`` and ``usae synth`` to the CLI."""
    from usae.trainer import synth

    synth.register(app)
    config_command(
        app, "train", TrainConfig, train,
        opts={
            "warmup_steps": Opt(flags=("--warmup-steps", "--warmup")),
            "stop_after": Opt(hidden=True),
        },
    )  # fmt: skip
