"""The CLI as a whole: every command listed, options mirror config fields, the demo end to end."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import typer

from usae.cli import app

# command -> its config dataclass; every config field is a CLI option and vice versa
COMMANDS = {
    "extract": "usae.pipeline.extract:ExtractConfig",
    "manifest": "usae.pipeline.manifest:ManifestConfig",
    "synth": "usae.trainer.synth:SynthConfig",
    "train": "usae.trainer.train:TrainConfig",
    "analyze": "usae.analysis.report:AnalyzeConfig",
    "maximize": "usae.analysis.maximize:MaximizeConfig",
    "demo": "usae.demo:DemoConfig",
}
# an option named in the singular for a repeatable field
RENAMED = {("maximize", "concept"): "concepts"}


def _config(path: str):
    mod, cls = path.split(":")
    return getattr(importlib.import_module(mod), cls)


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "usae.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in [*COMMANDS, "info"]:
        assert f" {name} " in out, f"`usae --help` does not list {name}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_mirror_config_fields(name):
    cmd = typer.main.get_command(app).commands[name]
    opts = {RENAMED.get((name, p.name), p.name) for p in cmd.params}
    fields = {f.name for f in dataclasses.fields(_config(COMMANDS[name]))}
    assert opts == fields, f"{name}: only in config {sorted(fields - opts)}, only in CLI {sorted(opts - fields)}"
    for p in cmd.params:
        assert getattr(p, "help", None) or p.param_type_name == "argument", f"{name} --{p.name} has no help text"


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    """The README's main command, shrunk: photos -> store -> run -> report, then a re-run reuses it."""
    args = [sys.executable, "-m", "usae.cli", "demo", "--out", str(tmp_path / "d"), "--tiny", "--images", "24",
            "--steps", "8", "--batch-tokens", "512", "--concepts", "128", "--k", "4", "--maximize", "1",
            "--maximize-steps", "2"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM-INIT" in r.stderr and "Report:" in r.stderr
    d = tmp_path / "d"
    index = d / "report" / "index.html"
    assert index.exists() and "<table" in index.read_text()
    store_attrs = json.loads((d / "store.zarr" / "backbones" / "dinov2" / "zarr.json").read_text())["attributes"]
    assert json.dumps(store_attrs).count("random_init") and '"random_init": true' in json.dumps(store_attrs)
    metrics = json.loads((d / "report" / "metrics.json").read_text())
    assert metrics  # the report's scalar findings exist
    assert any((d / "report" / "maximize").rglob("panel.png"))
    # re-running reuses the finished store and run
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "reusing the finished run" in r2.stderr
