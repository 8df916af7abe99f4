"""Command line -> the analysis stage: `usae analyze`, `usae maximize`, `usae compare` and
`usae explain`.

Both commands are generated from their frozen configs (``usae.options.config_command``): one
option per field, help = the field's docstring, ``Literal`` fields as choices. The run
functions are imported when a command runs, so `usae --help` stays fast.
"""

from __future__ import annotations

import typer
from usae.analysis.compare import CompareConfig
from usae.analysis.explain import ExplainConfig
from usae.analysis.maximize import MaximizeConfig
from usae.analysis.report import AnalyzeConfig

from usae.options import Opt, config_command


def _analyze(cfg: AnalyzeConfig) -> None:
    from usae.analysis.report import run_analyze

    res = run_analyze(cfg)
    typer.echo(f"report: {res.out / 'index.html'}")


def _maximize(cfg: MaximizeConfig) -> None:
    from usae.analysis.maximize import run_maximize

    res = run_maximize(cfg)
    for c in res.concepts:
        vals = ", ".join(
            f"{k} {f.crops:.3g} (random {f.random_crops:.3g})" for k, f in c.final.items()
        )
        typer.echo(f"concept {c.concept}: {vals} -> {c.dir / 'panel.png'}")
    if res.report is not None:
        typer.echo(f"report: {res.report}")


def _compare(cfg: CompareConfig) -> None:
    from usae.analysis.compare import run_compare

    res = run_compare(cfg)
    s = res.summary
    for k, v in s["per_model"].items():
        vals = ", ".join(f"cos >= {t:g} {v[f'matched_{t:g}']:.3f}" for t in s["thresholds"])
        typer.echo(f"{k} alone: {v['n']} concepts of A, matched {vals}")
    if s["joint"]:
        a = s["joint"]["a"]
        vals = ", ".join(
            f"cos >= {t:g} {a['all_live'][f'matched_{t:g}']:.3f}" for t in s["thresholds"]
        )
        typer.echo(
            f"jointly ({s['joint_rule']}): {a['live']} live concepts of A ({a['dead']} dead), matched {vals}"
        )
    secs = ", ".join(f"{k} {v:.2f} s" for k, v in s["assignment_seconds"].items())
    typer.echo(f"assignments: {secs}")
    typer.echo(f"report: {res.out / 'index.html'}")


def _explain(cfg: ExplainConfig) -> None:
    from usae.analysis.explain import run_explain

    res = run_explain(cfg)
    rate = res.n_images / res.seconds if res.seconds > 0 else float("nan")
    typer.echo(
        f"explained {res.explained} of {res.n_images} images ({len(res.failures)} skipped), "
        f"{rate:.1f} images/s"
    )
    typer.echo(f"codes: {res.out / 'codes.parquet'}")
    if res.index is not None:
        typer.echo(f"page: {res.index}")


EXPLAIN_OPTS = {
    "weights": Opt(multiple=True, parse=tuple, extra_help="Repeatable.", metavar="KEY=FILE"),
}
"""`--weights KEY=FILE` repeats, as for maximize."""

COMPARE_OPTS = {
    "run_a": Opt(argument=True, metavar="RUN_A"),
    "run_b": Opt(argument=True, metavar="RUN_B"),
}
"""The two runs are positional: `usae compare RUN_A RUN_B --out DIR`."""

MAXIMIZE_OPTS = {
    "concepts": Opt(flags=("--concept",), multiple=True, parse=lambda v: tuple(int(x) for x in v),
                    extra_help="Repeatable.", metavar="K"),
    "weights": Opt(multiple=True, parse=tuple, extra_help="Repeatable.", metavar="KEY=FILE"),
}  # fmt: skip
"""`--concept K` (singular, repeatable) fills the `concepts` field; `--weights` repeats too."""


def register(app: typer.Typer) -> None:
    """Add `usae analyze`, `usae maximize`, `usae compare` and `usae explain` to the app."""
    config_command(app, "analyze", AnalyzeConfig, _analyze)
    register_maximize(app)
    config_command(app, "compare", CompareConfig, _compare, opts=COMPARE_OPTS)
    config_command(app, "explain", ExplainConfig, _explain, opts=EXPLAIN_OPTS)


def register_maximize(app: typer.Typer) -> None:
    """Add `usae maximize` alone (tests build an app with only this command)."""
    config_command(app, "maximize", MaximizeConfig, _maximize, opts=MAXIMIZE_OPTS)
