"""The GPU path, on every device there is: extraction, a training step against the CPU step,
resume, analysis, a maximize step, a one-process torchrun, and the loader's device feed.

Every test takes the `device` fixture: "cpu" always, "cuda" too when a GPU is there, so the
CPU-only CI runs each of these code paths (autocast falls back to fp32 there, the device feed
runs without streams, pinning is simulated). `USAE_TEST_DEVICE=cuda` (what benchmarks/gpu.py
sets with `pytest -m cuda`) keeps only the CUDA cases, and fails them where there is no GPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import make_store, small_cfg, weights
from usae.pipeline.store import Store, convert_store
from usae.trainer import loader as loader_mod
from usae.trainer.config import TrainConfig
from usae.trainer.loader import ChunkLoader
from usae.trainer.model import USAE, ModelSpec
from usae.trainer.objective import batch_norm_local, source_loss
from usae.trainer.state import new_state
from usae.trainer.train import StepContext, run_train, train_step

from usae.runtime import autocast_dtype

pytestmark = pytest.mark.cuda
torch.set_num_threads(1)

_ONLY = os.environ.get("USAE_TEST_DEVICE", "")
DEVICES = [_ONLY] if _ONLY else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("USAE_TEST_DEVICE asks for CUDA, but torch sees no GPU")
    return request.param


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("cuda") / "s.zarr", n=32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS difference of a to b."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- extraction
def test_extraction_on_device_matches_cpu_fp32(device, shared_image_set, tmp_path):
    from usae.pipeline.extract import ExtractConfig, run_extract

    kw = dict(
        manifest=shared_image_set.manifest,
        backbones=("vit", "dinov2"),
        tiny=True,
        random_init=True,
        progress=False,
        chunk_images=4,
        batch_size=4,
    )
    run_extract(ExtractConfig(store=tmp_path / "cpu.zarr", dtype="fp32", device="cpu", **kw))
    run_extract(ExtractConfig(store=tmp_path / "dev.zarr", dtype="bf16", device=device, **kw))
    a, b = Store.open(tmp_path / "cpu.zarr"), Store.open(tmp_path / "dev.zarr")
    assert a.n_images == b.n_images == len(shared_image_set.image_ids)
    for k in a.backbones:
        x, y = (torch.from_numpy(s.read_rows(k, 0, s.n_rows)).float() for s in (a, b))
        assert torch.isfinite(y).all()
        assert _rel(y, x) < 5e-2, k  # bf16 on a device with it, else fp32 (equal)
        assert b.stats(k)["count"] == a.stats(k)["count"]


# ---------------------------------------------------------------- one training step
def _spec(widths=(16, 24), m=64, k=4) -> ModelSpec:
    return ModelSpec(
        tuple(f"b{j}" for j in range(len(widths))),
        widths,
        (0.0,) * len(widths),
        (1.0,) * len(widths),
        m,
        k,
    )


def _batch(widths, b=256, seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lat = torch.relu(torch.randn(b, 8, generator=g))
    return [
        lat @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(b, d, generator=g) for d in widths
    ]


@pytest.mark.parametrize("aux", ["paper", "dead"])
def test_train_step_on_device_matches_cpu_step(device, aux):
    """The step on `device` in bf16 (autocast where the device has it) == the CPU fp32 step
    within bf16 tolerance: loss, R2, the gradient of every parameter, the updated weights."""
    spec, widths = _spec(), (16, 24)
    cfg = TrainConfig(lr=1e-3, dtype="bf16", aux=aux, dead_window_tokens=1)
    dev = torch.device(device)
    states = {d: new_state(spec, cfg, torch.device(d)) for d in ("cpu", device)}
    x = _batch(widths)
    amp = {"cpu": None, device: autocast_dtype("bf16", dev)}
    if dev.type == "cuda":
        assert amp[device] == torch.bfloat16
    # gradients of one source's loss, same weights
    g = {}
    for d, s in states.items():
        s.model.zero_grad(set_to_none=True)
        xs = [t.to(d) for t in x]
        dead_m = torch.ones(spec.concepts, dtype=torch.bool, device=d) if aux == "dead" else None
        p = source_loss(
            s.model,
            0,
            xs,
            [0, 1],
            detach=(),
            dead_m=dead_m,
            loss=cfg.loss,
            aux_weight=cfg.aux_weight,
            bn_fn=batch_norm_local,
            amp=amp[d],
            with_r2=True,
            aux=aux,
        )
        p.loss.backward()
        g[d] = {
            n: q.grad.detach().cpu().clone()
            for n, q in s.model.named_parameters()
            if q.grad is not None
        }
        g[d]["loss"] = p.loss.detach().cpu().reshape(1)
    assert g["cpu"].keys() == g[device].keys()
    for n in g["cpu"]:
        if n.startswith("encoders.") and n.endswith(".bias"):
            continue  # removed by the BatchNorm after it: its true gradient is 0, only rounding noise
        assert _rel(g[device][n], g["cpu"][n]) < 5e-2, n
    # whole optimiser steps
    outs = {}
    for d, s in states.items():
        s.model.zero_grad(set_to_none=True)
        ctx = StepContext(cfg, 100, 0, 1, amp[d])
        outs[d] = [
            train_step(s, ctx, [t.to(d) for t in _batch(widths, seed=i)], with_r2=True)
            for i in range(3)
        ]
    for a, b in zip(outs["cpu"], outs[device], strict=True):
        assert a.sources == b.sources
        assert b.loss == pytest.approx(a.loss, rel=3e-2)
        for pa, pb in zip(a.parts, b.parts, strict=True):
            assert float(pb.r2_j[0]) == pytest.approx(float(pa.r2_j[0]), abs=2e-2)
    wa, wb = states["cpu"].model.state_dict(), states[device].model.state_dict()
    torch.manual_seed(cfg.seed)  # new_state's seed: the initial weights
    w0 = USAE(spec).state_dict()
    for n in ("decoders.0", "decoders.1", "encoders.0.weight", "encoders.1.weight"):
        da, db = wa[n] - w0[n], wb[n].cpu() - w0[n]
        cos = float((da * db).sum() / (da.norm() * db.norm()))
        assert cos > 0.8, (
            n,
            cos,
        )  # Adam's first steps ~ lr * sign(grad): bf16 flips a few small ones


# ---------------------------------------------------------------- resume
def test_resume_on_device(device, store, tmp_path):
    from usae.trainer.train import SimulatedKill

    kw = dict(device=device, dtype="bf16", steps=10, ckpt_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no fast bf16 on this CPU: trains in fp32
        run_train(small_cfg(store, tmp_path / "a", **kw))
        with pytest.raises(SimulatedKill):
            run_train(small_cfg(store, tmp_path / "b", stop_after=6, **kw))
        assert run_train(TrainConfig(resume=str(tmp_path / "b"))).steps == 10
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for n in wa:
        if device == "cpu":
            assert torch.equal(wa[n], wb[n]), n
        elif n.startswith("encoders.") and n.endswith(".bias") or n.endswith("running_mean"):
            assert float((wa[n] - wb[n]).abs().max()) <= 3e-3 * 10 + 1e-6, n  # see test_ddp
        else:  # CUDA's scatter/index_add order is not fixed: float noise, not another run
            assert _rel(wb[n].float(), wa[n].float()) < 1e-2, n
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["steps"] == mb["steps"] == 10
    assert all(v is not None for v in ma["self_r2"].values())


# ---------------------------------------------------------------- analysis
def test_analysis_on_device_matches_cpu(device, store):
    from usae.analysis import metrics as mx
    from usae.trainer.evaluate import prepare_model, reconstruction

    st = Store.open(store)
    keys = list(st.backbones)
    spec = ModelSpec(
        tuple(keys),
        tuple(st.widths[k] for k in keys),
        tuple(st.stats(k)["scalar_mean"] for k in keys),
        tuple(st.stats(k)["scalar_std"] for k in keys),
        32,
        3,
    )
    torch.manual_seed(0)
    base = USAE(spec)
    out = {}
    for d in ("cpu", device):
        model = prepare_model(copy.deepcopy(base), torch.float32, d)
        s = mx.stream_sums(model, st, keys, st.valid, batch_tokens=64, device=d)
        out[d] = reconstruction(s)
    a, b = out["cpu"], out[device]
    for f in a._fields:
        va, vb = np.asarray(getattr(a, f), float), np.asarray(getattr(b, f), float)
        np.testing.assert_allclose(vb, va, rtol=1e-3, atol=1e-4, err_msg=f)


# ---------------------------------------------------------------- activation maximisation
def test_maximize_step_on_device(device, tmp_path):
    from usae.analysis.backbones import Target
    from usae.analysis.maximize import MaximizeConfig
    from usae.analysis.objective import Maximizer
    from usae.pipeline.backbone import load_backbone
    from usae.pipeline.registry import resolve

    dev = torch.device(device)
    bb = load_backbone(resolve("vit"), random_init=True, tiny=True, device=dev).eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    width = bb(torch.rand(1, 3, 32, 32, device=dev), grid=(2, 2)).patch_btd.shape[-1]
    spec = ModelSpec(("vit",), (width,), (0.0,), (1.0,), 16, 2)
    torch.manual_seed(0)
    model = USAE(spec).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = MaximizeConfig(
        run=tmp_path,
        out=tmp_path / "mx",
        steps=3,
        canvas=64,
        crops=2,
        device=device,
        lr=0.5,
        concepts=(3,),
    )
    m = Maximizer(model, [Target("vit", 0, bb)], 3, cfg, (2, 2))
    before = m.canvases()[0].copy()
    curve = np.array([m.step() for _ in range(cfg.steps)])
    assert np.isfinite(curve).all()
    assert not np.array_equal(before, m.canvases()[0])  # the images moved
    assert all(np.isfinite(list(f)).all() for f in m.evaluate(n_random=1))


# ---------------------------------------------------------------- torchrun, one process
_TORCHRUN_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from usae.trainer.distributed import batch_norm_global, init_distributed
from usae.trainer.objective import batch_norm_local
from usae.trainer.train import TrainConfig, run_train
cfg = TrainConfig(**json.loads(sys.argv[1]))
d = init_distributed(cfg.device)  # world 1: usae makes no process group; this script does
backend = "nccl" if d.device.type == "cuda" else "gloo"
if d.device.type == "cuda":
    torch.cuda.set_device(d.device)
dist.init_process_group(backend)
# the DDP step's collectives through that group: BatchNorm over the global batch (a
# differentiable all_reduce) == the local one for one rank, forward and backward
torch.manual_seed(0)
bn = torch.nn.BatchNorm1d(8).to(d.device)
h = torch.randn(64, 8, device=d.device, requires_grad=True)
w = torch.randn(64, 8, device=d.device)
out = []
for fn in (batch_norm_global, batch_norm_local):
    y = fn(bn, h)
    (g,) = torch.autograd.grad((y * w).sum(), h)
    out.append((y.detach(), g))
bn_diff = max(float((a - b).abs().max()) for a, b in zip(out[0], out[1]))
x = torch.ones(3, device=d.device)
dist.all_reduce(x)
res = run_train(cfg)
got = dist.get_backend()
dist.destroy_process_group()
print(json.dumps({"backend": got, "world": d.world, "sum": x.tolist(), "bn_diff": bn_diff, "steps": res.steps,
                  "device": str(d.device)}))
"""


def test_torchrun_one_process(device, store, tmp_path):
    """torchrun --nproc-per-node 1: a process group on NCCL (CUDA) or gloo (CPU) runs the DDP
    step's collectives (global BatchNorm forward and backward, all_reduce), and `usae train`
    runs to the end under torchrun's environment. (With one process usae itself makes no
    process group: its DDP path with NCCL needs two GPUs.)"""
    script = tmp_path / "one.py"
    script.write_text(_TORCHRUN_SCRIPT)
    cfg = dict(
        store=str(store),
        out=str(tmp_path / "run"),
        batch_tokens=32,
        steps=6,
        concepts=16,
        k=3,
        lr=3e-3,
        log_every=3,
        ckpt_every=3,
        holdout=0.2,
        dtype="bf16",
        device=device,
        warmup_steps=2,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        str(script),
        json.dumps(cfg),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["world"] == 1 and out["steps"] == 6 and out["sum"] == [1.0, 1.0, 1.0]
    assert out["backend"] == ("nccl" if device.startswith("cuda") else "gloo")
    assert out["device"].startswith(device) and out["bn_diff"] < 1e-5
    assert (tmp_path / "run" / "metrics.json").exists()


# ---------------------------------------------------------------- the loader's device feed
@pytest.fixture(scope="module")
def int8_store(store, tmp_path_factory) -> Path:
    return convert_store(store, tmp_path_factory.mktemp("cuda8") / "q.zarr").path


def _host_reference(path, shuffle, n, **kw):
    with ChunkLoader(path, ["b0", "b1"], 48, shuffle=shuffle, seed=2, **kw) as ld:
        it = iter(ld)
        return [[a.float().clone() for a in next(it).acts] for _ in range(n)], ld.state_dict()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("shuffle", ["images", "tokens"])
def test_device_feed_equals_host_batches(device, store, int8_store, dtype, shuffle, monkeypatch):
    """ChunkLoader(device=..., pin_memory=True): the same batches as the host loader, on the
    device (int8: dequantised there), the position right, and the batches a consumer keeps are
    never overwritten. Pinned buffers are simulated on a machine without CUDA."""
    path = store if dtype == "float16" else int8_store
    n = 8  # more than an epoch: 32 images x 8 tokens = 5 batches of 48
    ref, ref_state = _host_reference(path, shuffle, n)
    pinned = []
    if not torch.cuda.is_available():  # the pinned-buffer path, with plain memory standing in
        monkeypatch.setattr(loader_mod, "_can_pin", lambda: True)
        monkeypatch.setattr(
            loader_mod,
            "_pinned_empty",
            lambda shape, dt: pinned.append(shape) or np.empty(shape, dt),
        )
    with ChunkLoader(
        path, ["b0", "b1"], 48, shuffle=shuffle, seed=2, device=device, pin_memory=True
    ) as ld:
        assert ld.pinned_buffers
        it = iter(ld)
        kept = []
        for _ in range(n):
            b = next(it)
            assert all(a.device.type == torch.device(device).type for a in b.acts)
            assert all(
                a.dtype == (torch.float32 if dtype == "int8" else torch.float16) for a in b.acts
            )
            kept.append(b)
        for i, b in enumerate(kept):  # kept batches are intact, equal to the host loader's
            for a, r in zip(b.acts, ref[i], strict=True):
                torch.testing.assert_close(a.float().cpu(), r, rtol=0, atol=0)
        assert ld.state_dict() == ref_state
    if not torch.cuda.is_available():
        assert pinned  # the batches were gathered into "pinned" buffers
        n_sets = len(pinned) // (3 if dtype == "int8" else 2)
        assert n_sets <= n + 3  # kept batches: new sets; no more than that
        pinned.clear()
        with ChunkLoader(
            path, ["b0", "b1"], 48, shuffle=shuffle, seed=2, device=device, pin_memory=True
        ) as ld:
            it = iter(ld)
            for _ in range(3 * n):  # a consumer that drops each batch: the sets are recycled
                b = next(it)
                del b
        assert 0 < len(pinned) // (3 if dtype == "int8" else 2) <= 4


def test_host_pin_memory_copies_each_batch(store, monkeypatch):
    """pin_memory without a device feed: each batch is a pinned copy (the caching host
    allocator keeps it until any copy from it is done), the loader's buffers stay its own."""
    copies = []
    monkeypatch.setattr(loader_mod, "_can_pin", lambda: True)
    monkeypatch.setattr(loader_mod, "_pin_copy", lambda t: copies.append(t.shape) or t.clone())
    ref, _ = _host_reference(store, "images", 4)
    with ChunkLoader(store, ["b0", "b1"], 48, shuffle="images", seed=2, pin_memory=True) as ld:
        assert not ld.pinned_buffers
        it = iter(ld)
        got = [[a.float().clone() for a in next(it).acts] for _ in range(4)]
    assert len(copies) >= 8  # two backbones, at least 4 batches
    for g, r in zip(got, ref, strict=True):
        for a, b in zip(g, r, strict=True):
            assert torch.equal(a, b)
