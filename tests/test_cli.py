"""The CLI as a whole: every command listed and generated from its config, every user error ending
the same way, and the demo end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest
import typer

from usae.cli import app
from usae.errors import USER_ERROR_EXIT
from usae.options import config_params, field_docs, literal_choices


def _leaves(group, prefix: str = "") -> dict:
    out = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group of commands (usae weights ...)
            out.update(_leaves(cmd, f"{prefix}{name} "))
        else:
            out[f"{prefix}{name}"] = cmd
    return out


COMMANDS = _leaves(typer.main.get_command(app))


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "usae.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ["extract", "manifest", "info", "synth", "train", "analyze", "maximize", "demo"]:
        assert f" {name} " in out, f"`usae --help` does not list {name}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_generated_from_its_config(name):
    """One option (or argument) per config field, its help the field's docstring, Literal
    fields offered as their choices, and nothing else."""
    cb = COMMANDS[name].callback
    cls = getattr(cb, "config_class", None)
    assert cls is not None, (
        f"`usae {name}` is not generated from a config dataclass (usae.options.config_command)"
    )
    params = {p.name: p for p in COMMANDS[name].params}
    fields = {f.name for f in dataclasses.fields(cls)} - set(cb.config_exclude)
    assert set(params) == fields, (
        f"{name}: only in config {sorted(fields - set(params))}, only in CLI {sorted(set(params) - fields)}"
    )
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in fields:
        p = params[f]
        assert docs.get(f), f"{cls.__name__}.{f} has no docstring"
        if p.param_type_name == "option":
            assert p.help.startswith(docs[f]), f"{name} --{f}: help is not the field's docstring"
        choices = literal_choices(hints[f])
        if choices is not None:
            assert tuple(getattr(p.type_descriptor, "choices", ())) == choices, (
                f"{name} --{f} does not offer {choices}"
            )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_shown_default_types_back_to_the_default(name):
    """--help shows each default as the option is typed (a grid as 14x14, a list
    comma-separated): parsing the shown text gives the field's default back."""
    cb = COMMANDS[name].callback
    cls = cb.config_class
    defaults = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    for p in config_params(cls, cb.config_opts, cb.config_exclude):
        shown = getattr(p.info, "default", ...)
        if p.name not in defaults or shown in (..., None) or isinstance(shown, list):
            continue
        assert p.to_field(shown) == defaults[p.name], (name, p.name, shown)


def test_help_texts_describe_the_command():
    """A command's help opens with what it does, not with how its config is named."""
    for name, cmd in COMMANDS.items():
        assert not (cmd.help or "").startswith("Settings of"), (name, cmd.help)
    out = subprocess.run(
        [sys.executable, "-m", "usae.cli", "extract", "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert "[default: 14x14]" in out, out


# a user's error for every command: (arguments, text the message must hold)
USER_ERRORS = {
    "manifest": (["{tmp}/no-such-folder"], "not a folder"),
    "extract": (["--manifest", "{tmp}/none.csv", "--store", "{tmp}/s.zarr"], "none.csv"),
    "info": (["{tmp}/no-store.zarr"], "not a usae store"),
    "synth": (["--store", "{tmp}/s.zarr", "--models", "0"], "models"),
    "train": (["--store", "{tmp}/nope.zarr", "--out", "{tmp}/r"], "does not exist"),
    "analyze": (
        ["--run", "{tmp}/no-run", "--store", "{tmp}/nope.zarr", "--out", "{tmp}/rep"],
        "no-run",
    ),
    "maximize": (["--run", "{tmp}/no-run", "--out", "{tmp}/mx", "--concept", "1"], "no-run"),
    "explain": (["--run", "{tmp}/no-run", "--images", "{tmp}", "--out", "{tmp}/ex"], "no-run"),
    "compare": (["{tmp}/no-run-a", "{tmp}/no-run-b", "--out", "{tmp}/cmp"], "no-run-a"),
    "demo": (["--out", "{tmp}/d", "--backbones", "no-such-backbone", "--tiny"], "no-such-backbone"),
    "weights fetch": (["no-such-backbone"], "no-such-backbone"),
    "weights list": (["no-such-backbone"], "no-such-backbone"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_user_error_exits_with_one_code_and_no_traceback(name, tmp_path):
    from typer.testing import CliRunner

    assert name in USER_ERRORS, f"give `usae {name}` a user-error case"
    args, text = USER_ERRORS[name]
    r = CliRunner().invoke(app, [*name.split(), *(a.format(tmp=tmp_path) for a in args)])
    assert r.exit_code == USER_ERROR_EXIT, (r.exit_code, r.output, r.exception)
    assert text in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    """The README's main command, shrunk: photos -> store -> run -> report, then a re-run reuses it."""
    args = [
        sys.executable,
        "-m",
        "usae.cli",
        "demo",
        "--out",
        str(tmp_path / "d"),
        "--tiny",
        "--images",
        "24",
        "--steps",
        "8",
        "--batch-tokens",
        "512",
        "--concepts",
        "128",
        "--k",
        "4",
        "--maximize",
        "1",
        "--maximize-steps",
        "2",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM-INIT" in r.stderr and "Report:" in r.stderr
    d = tmp_path / "d"
    index = d / "report" / "index.html"
    assert index.exists() and "<table" in index.read_text()
    store_attrs = json.loads((d / "store.zarr" / "backbones" / "dinov2" / "zarr.json").read_text())[
        "attributes"
    ]
    assert json.dumps(store_attrs).count("random_init") and '"random_init": true' in json.dumps(
        store_attrs
    )
    metrics = json.loads((d / "report" / "metrics.json").read_text())
    # analyze was given no --manifest: the gallery's photos come from the store's record
    assert metrics["photos"] is True and metrics["image_failures"] == []
    k = metrics["gallery"][0]["concepts"][0]
    assert (d / "report" / "thumbs" / str(k) / "0.jpg").is_file()
    assert f'src="thumbs/{k}/0.jpg"' in index.read_text()
    # the findings say how they were trained: the default recipe, resolved as the run recorded it
    run_train = json.loads((d / "run" / "config.json").read_text())["train"]
    assert metrics["training"] == {
        "recipe": "fidelity", "mode": "paper", "init": "data", "steps": 8,
        "agree_weight": run_train["agree_weight"], "backbones": run_train["backbones"],
    }  # fmt: skip
    assert "recipe fidelity, mode paper, init data, 8 steps" in index.read_text()
    assert any((d / "report" / "maximize").rglob("panel.png"))
    # re-running reuses the finished store and run
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "reusing the finished run" in r2.stderr
