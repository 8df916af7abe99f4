"""Command line -> the stages' run functions. A thin Typer layer: every command builds the
stage's frozen config dataclass and calls its ``run_*`` function.

Each stage registers its commands in ``register(app)`` of its own cli module; this file
only assembles them, so a stage can be developed without touching the others.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="usae",
    help="Universal Sparse Autoencoders: one sparse concept space shared by several vision models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# module path -> registers commands on `app`
_COMMAND_MODULES = (
    "usae.pipeline.cli",
    "usae.trainer.cli",
    "usae.analysis.cli",
    "usae.demo",
)

for _mod in _COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
