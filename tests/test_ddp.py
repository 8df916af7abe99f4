"""`usae train` under torchrun (2 CPU processes, gloo) == one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import make_store, small_cfg, weights
from usae.trainer.train import run_train


def weights_init(store):
    """The initial weights of a run with the test configuration (same seed)."""
    from usae.pipeline.store import Store
    from usae.trainer.inputs import model_spec
    from usae.trainer.state import new_state

    st = Store.open(store)
    cfg = small_cfg(store, "unused")
    return new_state(model_spec(st, ["b0", "b1"], cfg), cfg, torch.device("cpu")).model.state_dict()


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_two_process_gloo_matches_single_process(tmp_path, mode):
    store = make_store(tmp_path / "s.zarr", n=32)
    cfg = small_cfg(store, tmp_path / "one", steps=6, ckpt_every=3, log_every=3, mode=mode)
    run_train(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "usae.cli",
        "train",
        "--store",
        str(store),
        "--out",
        str(tmp_path / "two"),
        "--steps",
        "6",
        "--ckpt-every",
        "3",
        "--log-every",
        "3",
        "--batch-tokens",
        "32",
        "--concepts",
        "16",
        "--k",
        "3",
        "--lr",
        "3e-3",
        "--holdout",
        "0.2",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--warmup-steps",
        "2",
        "--mode",
        mode,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        diff = float((w1[k].double() - w2[k].double()).abs().max())
        if k.startswith("encoders.") and k.endswith(".bias") or k.endswith("running_mean"):
            # The Linear bias sits right before BatchNorm, which removes it: its true gradient
            # is 0 and Adam turns float rounding noise into steps of up to lr (so does the
            # BN running mean, which tracks that bias). Bounded by lr * steps, not by rounding.
            assert diff <= 3e-3 * 6 + 1e-6, k
        else:
            assert diff <= 1e-6 * max(1.0, float(w1[k].abs().max())), (k, diff)
    assert not torch.equal(w1["decoders.0"], weights_init(store)["decoders.0"])
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for a, b in zip(sum(m1["r2_matrix"], []), sum(m2["r2_matrix"], []), strict=True):
        assert a == pytest.approx(b, abs=1e-2)  # eval-mode BN uses the running mean (see above)
    l1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    l2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2, strict=True):  # logged over the global batch, not rank 0's share
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for field in ("rec", "aux", "r2_from_source"):
            for k in a[field]:
                assert a[field][k] == pytest.approx(b[field][k], rel=1e-4, abs=1e-5), (field, k)
