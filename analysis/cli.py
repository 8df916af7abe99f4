"""Command line -> the analysis stage: `usae analyze` (and `usae maximize` when present).

A thin Typer layer: options mirror ``AnalyzeConfig`` fields (help texts are the fields'
docstrings), the command builds the config and calls ``run_analyze``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache
from pathlib import Path

import typer
from usae.analysis.report import AnalyzeConfig, AnalyzeError

DEFAULTS = AnalyzeConfig(run="", store="", out="")


@cache
def field_docs() -> dict[str, str]:
    """Docstring under each AnalyzeConfig field, used as the option's help text."""
    body = ast.parse(textwrap.dedent(inspect.getsource(AnalyzeConfig))).body[0].body  # type: ignore[attr-defined]
    out = {}
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            out[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return out


def _opt(name: str, required: bool = False):
    default = ... if required else getattr(DEFAULTS, name)
    return typer.Option(default, f"--{name.replace('_', '-')}", help=field_docs()[name])


def register(app: typer.Typer) -> None:
    """Add `usae analyze` (and `usae maximize` if its module exists) to the app."""

    @app.command("analyze")
    def analyze_cmd(
        run: Path = _opt("run", True),
        store: Path = _opt("store", True),
        out: Path = _opt("out", True),
        baseline: str = _opt("baseline"),
        images: str = _opt("images"),
        tau: float = _opt("tau"),
        batch_tokens: int = _opt("batch_tokens"),
        device: str = _opt("device"),
        dtype: str = _opt("dtype"),
        top_concepts: int = _opt("top_concepts"),
        top_images: int = _opt("top_images"),
        image_score: str = _opt("image_score"),
        image_root: str = _opt("image_root"),
        manifest: str = _opt("manifest"),
        maximize: str = _opt("maximize"),
        match_top: int = _opt("match_top"),
    ) -> None:
        """Universal-concept metrics, figures and an HTML report (REPORT/index.html).

        Refuses a store that lacks one of the run's backbones or has other widths; a store
        with another fingerprint than the run's training store is analysed with a warning
        (and --images auto then evaluates every valid image).
        """
        from rich.console import Console
        from usae.analysis.report import run_analyze

        cfg = AnalyzeConfig(
            run=str(run), store=str(store), out=str(out), baseline=baseline, images=images, tau=tau,
            batch_tokens=batch_tokens, device=device, dtype=dtype, top_concepts=top_concepts,
            top_images=top_images, image_score=image_score, image_root=image_root, manifest=manifest,
            maximize=maximize, match_top=match_top,
        )  # fmt: skip
        try:
            res = run_analyze(cfg)
        except AnalyzeError as e:
            Console(stderr=True, soft_wrap=True).print(f"error: {e}", style="red", markup=False, highlight=False)
            raise typer.Exit(2) from None
        typer.echo(f"report: {res.out / 'index.html'}")

    from usae.analysis import maximize

    maximize.register(app)
