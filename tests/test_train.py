"""Training step math vs a slow obvious implementation; run loop, run directory, resume, bad inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst
from usae.trainer.config import TrainConfig
from usae.trainer.model import USAE, ModelSpec
from usae.trainer.objective import aux_selection, mask_to_aux_, source_loss
from usae.trainer.state import TrainState, lr_at, make_optimizer
from usae.trainer.train import StepContext, train_step

torch.set_num_threads(1)


# ---------------------------------------------------------------- slow obvious versions
def slow_loss(model: USAE, i: int, x_list, targets, loss="l1", aux_weight=0.1):
    """The spec's formulas with dense codes, torch.topk and the nn.BatchNorm1d module."""
    pre = model.bns[i](model.encoders[i](x_list[i]))
    act = F.relu(pre)
    m = act.shape[1]
    v, ix = torch.topk(act, model.spec.k, dim=1)
    z = torch.zeros_like(act).scatter(1, ix, v)
    av, ai = torch.topk(act - z, m // 2, dim=1)
    a = torch.zeros_like(act).scatter(1, ai, av)
    err = (lambda e: e.abs().mean()) if loss == "l1" else (lambda e: (e**2).mean())
    total = 0.0
    for j in targets:
        d = model.decoders[j] / model.decoders[j].norm(dim=1, keepdim=True)
        r = x_list[j] - z @ d
        total = total + err(r) + aux_weight * err(r - a @ d)
    return total


def tiny(widths=(6, 10, 8), m=24, k=3, independent=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(
        tuple(f"b{j}" for j in range(len(widths))),
        widths,
        (0.0,) * len(widths),
        (1.0,) * len(widths),
        m,
        k,
        independent,
    )
    return USAE(spec).to(dtype).train()


def batch(widths, b=40, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=dtype) for d in widths]


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def assert_same_grads(model, slow):
    """Every parameter has a gradient in both or in neither, and they agree."""
    gf, gs = grads(model), grads(slow)
    for name in gf:
        if gs[name] is None:
            assert gf[name] is None, name
        else:
            assert torch.allclose(gf[name], gs[name], rtol=1e-8, atol=1e-12), name


# ---------------------------------------------------------------- keep_top
@settings(max_examples=40, deadline=None)
@given(
    rows=hst.integers(1, 6),
    m=hst.integers(2, 40),
    k=hst.integers(1, 5),
    shift=hst.floats(-1, 1),
    seed=hst.integers(0, 10_000),
)
def test_aux_mask_matches_topk_of_non_selected(rows, m, k, shift, seed):
    g = torch.Generator().manual_seed(seed)
    act = F.relu(torch.randn(rows, m, generator=g, dtype=torch.float64) + 2 * shift)
    k = min(k, m)
    v, ix = torch.topk(act, k, dim=1)
    z = torch.zeros_like(act).scatter(1, ix, v)
    n = m // 2
    av, ai = torch.topk(act - z, n, dim=1)
    want = torch.zeros_like(act).scatter(1, ai, av)
    got = mask_to_aux_(act.clone(), aux_selection(act, ix, n))
    assert torch.equal(got, want)


# ---------------------------------------------------------------- loss and gradients
@pytest.mark.parametrize("loss,beta", [("l1", 0.0), ("l2", 0.0), ("l1", 1.5)])
def test_paper_loss_and_grads_match_slow(loss, beta):
    model = tiny()
    with torch.no_grad():  # beta > 0: most pre-activations positive, the aux threshold path runs
        for bn in model.bns:
            bn.bias += beta
    slow = copy.deepcopy(model)
    x = batch(model.spec.widths)
    for i in range(3):
        model.zero_grad(set_to_none=True)
        slow.zero_grad(set_to_none=True)
        fast = source_loss(model, i, x, [0, 1, 2], loss=loss, aux_weight=0.1)
        ref = slow_loss(slow, i, x, [0, 1, 2], loss=loss)
        fast.loss.backward()
        ref.backward()
        assert torch.allclose(fast.loss, ref, rtol=1e-10, atol=1e-12)
        assert_same_grads(model, slow)
        # the BN running statistics moved the same way
        assert torch.allclose(model.bns[i].running_var, slow.bns[i].running_var)


def slow_dead_loss(model: USAE, i: int, x_list, targets, dead, aux_weight=0.1):
    """AuxK over dead concepts written out densely: the k_aux largest non-selected positive
    pre-activations among the dead concepts rebuild the detached residual."""
    pre = model.bns[i](model.encoders[i](x_list[i]))
    act = F.relu(pre)
    m = act.shape[1]
    v, ix = torch.topk(act, model.spec.k, dim=1)
    z = torch.zeros_like(act).scatter(1, ix, v)
    cand = (act - z) * dead.to(act.dtype)
    a = torch.zeros_like(act)
    if int(dead.sum()):
        av, ai = torch.topk(cand, min(m // 2, int(dead.sum())), dim=1)
        a = a.scatter(1, ai, av)
    total = 0.0
    for j in targets:
        d = model.decoders[j] / model.decoders[j].norm(dim=1, keepdim=True)
        r = x_list[j] - z @ d
        total = total + r.abs().mean() + aux_weight * (r.detach() - a @ d).abs().mean()
    return total


@pytest.mark.parametrize("n_dead", [0, 3, 20])
def test_dead_aux_loss_and_grads_match_slow(n_dead):
    model = tiny()
    with torch.no_grad():
        for bn in model.bns:
            bn.bias += 1.0  # most pre-activations positive: dead concepts have candidates
    slow = copy.deepcopy(model)
    x = batch(model.spec.widths)
    dead = torch.zeros(model.spec.concepts, dtype=torch.bool)
    dead[
        torch.randperm(model.spec.concepts, generator=torch.Generator().manual_seed(n_dead))[
            :n_dead
        ]
    ] = True
    fast = source_loss(model, 1, x, [0, 1, 2], loss="l1", aux_weight=0.1, aux="dead", dead_m=dead)
    ref = slow_dead_loss(slow, 1, x, [0, 1, 2], dead)
    fast.loss.backward()
    ref.backward()
    assert torch.allclose(fast.loss, ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(model, slow)
    if n_dead == 0:  # nothing dead: the aux term is the plain residual and trains nothing
        assert torch.allclose(torch.stack(fast.aux_j), torch.stack(fast.rec_j))


def test_reference_detaches_other_decoders_only():
    model = tiny()
    slow = copy.deepcopy(model)
    x = batch(model.spec.widths)
    i = 1
    fast = source_loss(model, i, x, [0, 1, 2], loss="l1", aux_weight=0.1, detach=[0, 2])
    fast.loss.backward()
    slow_loss(slow, i, x, [0, 1, 2]).backward()
    assert model.decoders[0].grad is None and model.decoders[2].grad is None
    assert model.encoders[0].weight.grad is None
    for mod_f, mod_s in [(model.encoders[1], slow.encoders[1]), (model.bns[1], slow.bns[1])]:
        for pf, ps in zip(mod_f.parameters(), mod_s.parameters(), strict=True):
            assert torch.allclose(pf.grad, ps.grad, rtol=1e-8, atol=1e-12)
    assert torch.allclose(model.decoders[1].grad, slow.decoders[1].grad, rtol=1e-8, atol=1e-12)


def test_r2_and_codes_reported():
    model = tiny()
    x = batch(model.spec.widths)
    from usae.trainer.distributed import reduce_metrics

    out = reduce_metrics(
        [source_loss(model, 0, x, [0, 1, 2], loss="l1", aux_weight=0.1, with_r2=True)], 1
    )[0]
    z = model.dense_codes(out.codes)
    for j in range(3):
        d = model.decoder_weight(j).detach()
        xx = x[j]
        want = 1 - ((xx - z @ d) ** 2).mean() / ((xx - xx.mean()) ** 2).mean()
        assert torch.allclose(out.r2_j[j], want)
    assert out.codes.indices_bk.shape == (40, 3)


# ---------------------------------------------------------------- full optimiser steps
def _ctx(cfg, total=10, warmup=3):
    return StepContext(cfg, total, warmup, 1, None)


def _state(model, cfg, seed=5):
    n = model.n_models
    return TrainState(
        model,
        make_optimizer(model, cfg),
        torch.Generator().manual_seed(seed),
        0,
        [0] * n,
        0,
        torch.zeros(n, model.spec.concepts, dtype=torch.long),
        [None] * n,
    )


def _slow_steps(model, cfg, xs, sources, total, warmup):
    """Slow update: one AdamW per backbone written out with explicit schedules."""
    n = model.n_models
    opts = [
        torch.optim.AdamW(
            [*model.encoders[j].parameters(), *model.bns[j].parameters(), model.decoders[j]],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        for j in range(n)
    ]
    picks = [0] * n
    for t, (x, i) in enumerate(zip(xs, sources, strict=True)):
        for o in opts:
            o.zero_grad(set_to_none=True)
        if cfg.mode == "independent":
            loss = sum(slow_loss(model, j, x, [j], cfg.loss, cfg.aux_weight) for j in range(n))
        else:
            loss = slow_loss(model, i, x, range(n), cfg.loss, cfg.aux_weight)
        loss.backward()
        if cfg.mode == "reference":
            for j in range(n):  # other backbones' optimisers do not step: their grads are dropped
                if j != i:
                    opts[j].zero_grad(set_to_none=True)
            ps = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(ps, cfg.grad_clip)
            opts[i].param_groups[0]["lr"] = lr_at(picks[i], total, warmup, cfg.lr, cfg.lr_min)
            picks[i] += 1
            opts[i].step()
            continue
        if cfg.mode == "independent":
            for o in opts:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in o.param_groups[0]["params"] if p.grad is not None], cfg.grad_clip
                )
        else:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], cfg.grad_clip
            )
        for o in opts:
            o.param_groups[0]["lr"] = lr_at(t, total, warmup, cfg.lr, cfg.lr_min)
            o.step()


@pytest.mark.parametrize("mode", ["paper", "reference", "independent"])
def test_train_steps_match_slow_update(mode):
    independent = mode == "independent"
    cfg = TrainConfig(lr=1e-2, lr_min=1e-4, mode=mode, grad_clip=0.05, recipe="paper")
    model = tiny(independent=independent)
    slow = copy.deepcopy(model)
    st = _state(model, cfg)
    xs = [batch(model.spec.widths, seed=s) for s in range(6)]
    sources = []
    for x in xs:
        out = train_step(st, _ctx(cfg), x)
        sources.append(out.sources[0])
        assert math.isfinite(out.loss)
    if not independent:
        assert len(set(sources)) > 1  # several backbones were drawn
    _slow_steps(slow, cfg, xs, sources, 10, 3)
    for (n, pf), ps in zip(model.named_parameters(), slow.parameters(), strict=True):
        assert torch.allclose(pf, ps, rtol=1e-7, atol=1e-9), n
    if mode == "reference":
        assert st.group_steps == [sources.count(j) for j in range(3)]


def test_source_draws_follow_seed():
    cfg = TrainConfig(recipe="paper")
    a, b = _state(tiny(), cfg, seed=3), _state(tiny(), cfg, seed=3)
    x = batch((6, 10, 8))
    sa = [train_step(a, _ctx(cfg), x).sources[0] for _ in range(8)]
    sb = [train_step(b, _ctx(cfg), x).sources[0] for _ in range(8)]
    assert sa == sb


def test_non_finite_loss_stops_before_the_update():
    from usae.trainer.train import TrainError

    model = tiny()
    st = _state(model, TrainConfig())
    before = copy.deepcopy(model.state_dict())
    x = batch(model.spec.widths)
    for a in x:
        a[0, 0] = float("inf")
    with pytest.raises(TrainError, match="non-finite"):
        train_step(st, _ctx(TrainConfig()), x)
    for kk, v in model.state_dict().items():
        if "running" not in kk and "num_batches" not in kk:
            assert torch.equal(v, before[kk]), kk


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 1e-3) == pytest.approx(1e-3)
    vals = [lr_at(t, 100, 10, 1.0, 0.0) for t in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))


def test_bf16_step_close_to_fp32():
    if torch.cpu._is_avx512_bf16_supported() is False and not torch.cuda.is_available():
        pytest.skip("no bf16 support")
    model = tiny(widths=(32, 48), m=64, k=4, dtype=torch.float32)
    x = batch((32, 48), b=256, dtype=torch.float32)
    f32 = source_loss(model, 0, x, [0, 1], loss="l1", aux_weight=0.1).loss.detach()
    bf = source_loss(
        model, 0, x, [0, 1], loss="l1", aux_weight=0.1, amp=torch.bfloat16
    ).loss.detach()
    assert abs(float(f32) - float(bf)) < 0.02 * float(f32)
    assert np.isfinite(float(bf))


# ---------------------------------------------------------------- run loop on tiny stores
from pathlib import Path  # noqa: E402

from usae.pipeline.store import BackboneLayout, Store, StoreError  # noqa: E402
from usae.trainer import checkpoint as ckpt  # noqa: E402
from usae.trainer.train import SimulatedKill, TrainError, run_train  # noqa: E402


def make_store(
    path, n=24, t=8, widths=(6, 10), chunk=4, seed=0, finalize=True, nan_at=None, split=None
):
    """A small complete store with correlated backbones (shared latent), the standard layout."""
    st = Store.create(
        path,
        [f"img{i}" for i in range(n)],
        [BackboneLayout(f"b{j}", w) for j, w in enumerate(widths)],
        grid=(2, t // 2),
        chunk_images=chunk,
        source="synth",
        fingerprint_of={"seed": seed, "n": n},
        split=split,
    )
    rng = np.random.default_rng(seed)
    mix = [rng.normal(size=(4, w)) for w in widths]
    for c in range(st.n_chunks):
        a, b = st.chunk_images_range(c)
        lat = np.maximum(rng.normal(size=((b - a) * t, 4)), 0)
        toks = {
            f"b{j}": 1.5 + lat @ mix[j] + 0.1 * rng.normal(size=(len(lat), w))
            for j, w in enumerate(widths)
        }
        if nan_at is not None and c == nan_at[1]:
            toks[nan_at[0]][3, 1] = np.nan
        st.write_chunk(c, toks, np.ones(b - a, bool))
    if finalize:
        st.finalize()
    return Path(path)


def small_cfg(store, out, **kw):
    base = dict(
        store=str(store),
        out=str(out),
        batch_tokens=32,
        steps=12,
        concepts=16,
        k=3,
        lr=3e-3,
        log_every=3,
        ckpt_every=4,
        holdout=0.2,
        dtype="fp32",
        device="cpu",
        warmup_steps=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(run):
    return ckpt.safe_load_safetensors(Path(run) / "model.safetensors")


def _metric_lines(run):
    lines = [
        __import__("json").loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()
    ]
    for ln in lines:
        ln.pop("tokens_per_s")
    return lines


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "s.zarr")


@pytest.mark.parametrize(
    "mode",
    [
        dict(mode="paper", recipe="paper"),
        dict(mode="paper"),
        dict(mode="reference"),
        dict(mode="independent"),
        dict(mode="paper", aux="dead", dead_window_tokens=64),
        dict(mode="paper", init="data"),
        dict(mode="paper", optimizer="rowadamw"),
        dict(mode="reference", optimizer="rowadamw"),
        dict(mode="paper", optimizer="rowadamw", whiten=True),
    ],
)
def test_resume_is_bitwise_identical(store, tmp_path, mode):
    full = run_train(small_cfg(store, tmp_path / "a", **mode))
    with pytest.raises(SimulatedKill):
        run_train(small_cfg(store, tmp_path / "b", stop_after=10, **mode))
    assert ckpt.load_checkpoint(tmp_path / "b" / "checkpoint").state["step"] == 8
    res = run_train(TrainConfig(resume=str(tmp_path / "b")))
    assert res.steps == full.steps == 12
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for kk in wa:
        assert torch.equal(wa[kk], wb[kk]), kk
    assert _metric_lines(tmp_path / "a") == _metric_lines(tmp_path / "b")
    assert res.metrics["r2_matrix"] == full.metrics["r2_matrix"]


def test_run_directory_contents(store, tmp_path):
    import json

    from usae.trainer.model import load_run

    res = run_train(small_cfg(store, tmp_path / "r"))
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (
        cfg["schema_version"] == 1
        and cfg["train"]["steps"] == 12
        and cfg["train"]["concepts"] == 16
    )
    assert cfg["store"]["fingerprint"] == Store.open(store).attrs["fingerprint"]
    model, _ = load_run(tmp_path / "r")
    assert model.spec.backbones == ("b0", "b1") and model.spec.concepts == 16
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [3, 6, 9, 12]
    for key in ("loss", "self_r2", "l0", "dead_fraction", "lr", "tokens_per_s", "rec", "aux"):
        assert key in lines[-1]
    m = res.metrics
    assert np.asarray(m["r2_matrix"]).shape == (2, 2) and m["heldout_tokens"] > 0
    # the R2 matrix agrees with a direct computation on the held-out rows
    st = Store.open(store)
    from usae.runtime import holdout_mask

    held = np.repeat(holdout_mask(list(st.image_ids), 0.2), st.tokens_per_image)
    x = [torch.from_numpy(st.read_rows(k, 0, st.n_rows)[held]).float() for k in ("b0", "b1")]
    with torch.no_grad():
        codes = model.encode(1, model.standardize(1, x[1]))
        x0 = model.standardize(0, x[0])
        xhat = model.decode(0, codes)
        want = 1 - ((x0 - xhat) ** 2).mean() / ((x0 - x0.mean()) ** 2).mean()
    assert m["r2_matrix"][1][0] == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_training_improves_reconstruction(store, tmp_path):
    res = run_train(
        small_cfg(store, tmp_path / "r", steps=150, ckpt_every=0, log_every=50, lr=1e-2, k=4)
    )
    assert min(res.metrics["self_r2"].values()) > 0.5


# ---------------------------------------------------------------- failures: checkpoints
def test_disk_full_keeps_previous_checkpoint(store, tmp_path, monkeypatch):
    import errno

    real = ckpt.save_file
    calls = {"n": 0}

    def flaky(tensors, filename, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # second checkpoint (3 files each), after a partial write
            real(tensors, filename, *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(TrainError, match="intact"):
        run_train(small_cfg(store, tmp_path / "b"))
    monkeypatch.setattr(ckpt, "save_file", real)
    assert ckpt.load_checkpoint(tmp_path / "b" / "checkpoint").state["step"] == 4
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "checkpoint",
        "config.json",
        "metrics.jsonl",
    ]
    run_train(TrainConfig(resume=str(tmp_path / "b")))
    run_train(small_cfg(store, tmp_path / "a"))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[kk], wb[kk]) for kk in wa)


def test_crash_between_renames_falls_back_to_old(store, tmp_path):
    import os

    run_train(small_cfg(store, tmp_path / "r", steps=8, stop_after=0))
    c = tmp_path / "r" / "checkpoint"
    os.replace(c, c.with_name("checkpoint.old"))  # the state right after the first rename
    assert ckpt.load_checkpoint(c).state["step"] == 8


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).with_name(".pwned"),))


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "garbage"])
def test_crafted_checkpoint_is_refused_without_running_code(store, tmp_path, kind):
    import pickle

    from usae.trainer.model import load_run

    run = tmp_path / "r"
    with pytest.raises(SimulatedKill):
        run_train(small_cfg(store, run, stop_after=5))
    target = run / "checkpoint" / "model.safetensors"
    marker = Path(__file__).with_name(".pwned")
    marker.unlink(missing_ok=True)
    if kind == "pickle":
        target.write_bytes(pickle.dumps({"w": _Evil()}))
    elif kind == "torch.save":
        torch.save({"w": _Evil()}, target)
    else:
        target.write_bytes(b"\xff" * 64)
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors"):
        run_train(TrainConfig(resume=str(run)))
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors"):
        load_run(run)  # no final model.safetensors: falls back to the checkpoint's
    assert not marker.exists()


def test_checkpoint_with_wrong_tensors_is_refused(store, tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "r"
    with pytest.raises(SimulatedKill):
        run_train(small_cfg(store, run, stop_after=5))
    save_file({"x": torch.zeros(2)}, str(run / "checkpoint" / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        run_train(TrainConfig(resume=str(run)))


@settings(max_examples=15, deadline=None)
@given(
    shapes=hst.lists(hst.tuples(hst.integers(1, 5), hst.integers(1, 4)), min_size=1, max_size=4),
    lr=hst.floats(1e-5, 1.0),
    step=hst.integers(0, 10**6),
    seed=hst.integers(0, 2**31),
)
def test_checkpoint_round_trip(tmp_path_factory, shapes, lr, step, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = torch.optim.AdamW(
        [{"params": params[:1], "lr": lr}, {"params": params[1:], "lr": lr / 2}]
    )
    for p in params[::2]:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    model = {f"p{i}": p.detach() for i, p in enumerate(params)}
    rng = {"gen": g.get_state(), "np": ckpt.numpy_rng_state(np.random.default_rng(seed))}
    d = tmp_path_factory.mktemp("c") / "checkpoint"
    ckpt.save_checkpoint(
        d, model, opt.state_dict(), rng, {"step": step, "loader": {"epoch": 1, "step": 2}}
    )
    ckpt.save_checkpoint(
        d, model, opt.state_dict(), rng, {"step": step + 1, "loader": {"epoch": 1, "step": 3}}
    )
    c = ckpt.load_checkpoint(d)
    assert c.state["step"] == step + 1 and c.state["loader"] == {"epoch": 1, "step": 3}
    assert all(torch.equal(c.model[k], v) for k, v in model.items())
    opt2 = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    opt2.load_state_dict(c.optim)
    a, b = opt.state_dict(), opt2.state_dict()
    assert (
        a["param_groups"] == [{**gg, "betas": tuple(gg["betas"])} for gg in b["param_groups"]]
        or a["param_groups"] == b["param_groups"]
    )
    for pid, st in a["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["state"][pid][name]), (pid, name)
    assert torch.equal(c.rng["gen"], g.get_state())
    r = np.random.default_rng(0)
    ckpt.set_numpy_rng_state(r, c.rng["np"])
    assert r.random() == np.random.default_rng(seed).random()
    assert [p.name for p in d.parent.iterdir()] == ["checkpoint"]


# ---------------------------------------------------------------- failures: inputs
def test_incomplete_store_refused(tmp_path):
    s = make_store(tmp_path / "s.zarr", finalize=False)
    with pytest.raises(StoreError, match="incomplete"):
        run_train(small_cfg(s, tmp_path / "r"))


def test_other_schema_refused(tmp_path):
    import json

    s = make_store(tmp_path / "s.zarr")
    meta = json.loads((s / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (s / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema_version"):
        run_train(small_cfg(s, tmp_path / "r"))


def test_missing_backbone_refused(store, tmp_path):
    with pytest.raises(TrainError, match="not in the store"):
        run_train(small_cfg(store, tmp_path / "r", backbones=("b0", "zz")))


def test_backbones_disagreeing_on_rows_refused(tmp_path):
    import json

    s = make_store(tmp_path / "s.zarr")
    p = s / "backbones" / "b1" / "tokens" / "zarr.json"
    meta = json.loads(p.read_text())
    meta["shape"][0] -= 8  # one image fewer in b1
    p.write_text(json.dumps(meta))
    with pytest.raises(TrainError, match="disagree"):
        run_train(small_cfg(s, tmp_path / "r"))
    s2 = make_store(tmp_path / "s2.zarr")
    g = s2 / "backbones" / "b0" / "zarr.json"
    meta = json.loads(g.read_text())
    meta["attributes"]["stats"]["count"] -= 8
    g.write_text(json.dumps(meta))
    with pytest.raises(TrainError, match="disagree"):
        run_train(small_cfg(s2, tmp_path / "r2"))


def test_nan_activations_name_backbone_and_chunk(tmp_path):
    s = make_store(tmp_path / "s.zarr", nan_at=("b1", 2))
    with pytest.raises(TrainError, match=r"'b1', store chunk 2"):
        run_train(small_cfg(s, tmp_path / "r", holdout=0.0, steps=40))
    # NaN written after the statistics were computed: caught in the batch, chunk named
    s2 = make_store(tmp_path / "s2.zarr")
    st = Store.open(s2)
    f = st.chunk_file("b0", 3)
    raw = np.fromfile(f, dtype=np.float16)
    raw[5] = np.inf
    raw.tofile(f)
    with pytest.raises(TrainError, match=r"'b0', store chunk 3"):
        run_train(small_cfg(s2, tmp_path / "r2", holdout=0.0, steps=40))


def test_non_finite_loss_keeps_last_good_checkpoint(store, tmp_path, monkeypatch):
    import usae.trainer.train as tr

    real = tr.source_loss
    count = {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        count["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if count["n"] == 7 else out

    monkeypatch.setattr(tr, "source_loss", poisoned)
    with pytest.raises(TrainError, match="non-finite.*step 7.*last good checkpoint"):
        run_train(small_cfg(store, tmp_path / "r", recipe="paper"))  # one source_loss per step
    assert ckpt.load_checkpoint(tmp_path / "r" / "checkpoint").state["step"] == 4


def test_existing_run_not_overwritten(store, tmp_path):
    run_train(small_cfg(store, tmp_path / "r", steps=2))
    with pytest.raises(TrainError, match="--resume"):
        run_train(small_cfg(store, tmp_path / "r", steps=2))


def test_resume_refuses_another_store(store, tmp_path):
    with pytest.raises(SimulatedKill):
        run_train(small_cfg(store, tmp_path / "r", stop_after=5))
    other = make_store(tmp_path / "o.zarr", seed=3)
    import json

    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["train"]["store"] = str(other)
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainError, match="not the one"):
        run_train(TrainConfig(resume=str(tmp_path / "r")))


# ---------------------------------------------------------------- CLI
def test_cli_end_to_end_and_errors(store, tmp_path):
    from typer.testing import CliRunner

    from usae.cli import app

    r = CliRunner().invoke(
        app,
        [
            "train",
            "--store",
            str(store),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "6",
            "--batch-tokens",
            "32",
            "--concepts",
            "16",
            "--k",
            "3",
            "--dtype",
            "fp32",
            "--warmup",
            "2",
            "--log-every",
            "2",
            "--mode",
            "reference",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "held-out R2" in r.output and (tmp_path / "r" / "model.safetensors").exists()
    import json

    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["mode"] == "reference"
    bad = CliRunner().invoke(
        app, ["train", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(
        app, ["train", "--store", str(store), "--out", str(tmp_path / "x"), "--loss", "l3"]
    )
    assert bad.exit_code == 2 and "'l3' is not one of 'l1', 'l2'" in bad.output


def test_cli_options_mirror_config_fields():
    import dataclasses
    import inspect

    import typer

    from usae.cli import app

    train_cmd = typer.main.get_command(app).commands["train"].callback
    assert set(inspect.signature(train_cmd).parameters) == {
        f.name for f in dataclasses.fields(TrainConfig)
    }


def test_config_of_a_run_written_before_mode_resumes():
    """config.json of runs from before `mode`: update/independent map onto it."""
    assert TrainConfig.from_dict({"update": "reference", "independent": False}).mode == "reference"
    assert TrainConfig.from_dict({"update": "paper", "independent": True}).mode == "independent"
    assert TrainConfig.from_dict({}).mode == "paper"


def test_sigkill_then_resume_is_bitwise_identical(store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = dict(steps=600, ckpt_every=10, log_every=50, concepts=8, k=2)
    run_train(small_cfg(store, tmp_path / "a", **args))
    cmd = [
        sys.executable,
        "-m",
        "usae.cli",
        "train",
        "--store",
        str(store),
        "--out",
        str(tmp_path / "b"),
        "--batch-tokens",
        "32",
        "--steps",
        "600",
        "--concepts",
        "8",
        "--k",
        "2",
        "--lr",
        "3e-3",
        "--log-every",
        "50",
        "--ckpt-every",
        "10",
        "--holdout",
        "0.2",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--warmup-steps",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "b" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "b" / "model.safetensors").exists()
    res = run_train(TrainConfig(resume=str(tmp_path / "b")))
    assert res.steps == 600
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[kk], wb[kk]) for kk in wa)
    assert not list((tmp_path / "b").glob(".checkpoint.tmp*"))


def test_epochs_subset_and_split_holdout(tmp_path):
    import json

    split = ["val" if i % 4 == 0 else "train" for i in range(24)]
    s = make_store(tmp_path / "s.zarr", split=split)
    res = run_train(
        small_cfg(
            s, tmp_path / "r", steps=0, epochs=2.0, warmup_steps=-1, backbones=("b1",), holdout=0.5
        )
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    per_epoch = 18 * 8 // 32  # 18 train images (the split wins over the 0.5 fraction) x 8 tokens
    assert cfg["steps"] == 2 * per_epoch == res.steps and cfg["warmup_steps"] == per_epoch
    assert cfg["backbones"] == ["b1"] and res.metrics["backbones"] == ["b1"]
    assert res.metrics["heldout_images"] == 6 and res.metrics["heldout_tokens"] == 48


# ---------------------------------------------------------------- the fidelity recipe
def slow_fidelity_loss(model: USAE, x_list, aux_weight=0.1):
    """The fidelity recipe's loss written out densely: source i encodes rows i, i+M, ... (less
    its decoder bias); decoder rows = unit rows x softplus gains, plus the bias; the loss of
    each source is the MEAN over targets, weighted by the source's share of the rows."""
    n, total = len(x_list), 0.0
    for i in range(n):
        xs = [x[i::n] for x in x_list]
        pre = model.bns[i](model.encoders[i](xs[i] - model.dec_bias[i]))
        act = F.relu(pre)
        m = act.shape[1]
        v, ix = torch.topk(act, model.spec.k, dim=1)
        z = torch.zeros_like(act).scatter(1, ix, v)
        av, ai = torch.topk(act - z, m // 2, dim=1)
        a = torch.zeros_like(act).scatter(1, ai, av)
        part = 0.0
        for j in range(n):
            d = F.normalize(model.decoders[j], dim=1) * F.softplus(model.gains[j])[:, None]
            r = xs[j] - (z @ d + model.dec_bias[j])
            part = part + r.abs().mean() + aux_weight * (r - a @ d).abs().mean()
        total = total + part / n * (xs[0].shape[0] / x_list[0].shape[0])
    return total


def assert_slow_fidelity_update(model, slow, out, ref, cfg, step):
    """The fast step's loss equals the slow loss `ref`, and its parameters equal one AdamW
    update of `slow` from `ref` (clipped, the tail schedule at `step` of 10, 3 warm-up steps)."""
    assert out.loss == pytest.approx(float(ref.detach()), rel=1e-10)
    opt = torch.optim.AdamW(slow.parameters(), lr=lr_at(step, 10, 3, 1e-2, cfg.lr_min, "tail"),
                            weight_decay=cfg.weight_decay)  # fmt: skip
    ref.backward()
    torch.nn.utils.clip_grad_norm_(
        [p for p in slow.parameters() if p.grad is not None], cfg.grad_clip
    )
    opt.step()
    for (name, pf), ps in zip(model.named_parameters(), slow.parameters(), strict=True):
        assert torch.allclose(pf, ps, rtol=1e-7, atol=1e-9), name


def fidelity_model(widths=(6, 10, 8), m=24, k=3, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(tuple(f"b{j}" for j in range(len(widths))), widths, (0.0,) * len(widths), (1.0,) * len(widths),
                     m, k, decoder_init="unit", gains=True, decoder_bias=True)  # fmt: skip
    model = USAE(spec).double().train()
    with torch.no_grad():  # gains and biases away from their start, so the test sees them
        for g in model.gains:
            g.add_(torch.randn_like(g))
        for b in model.dec_bias:
            b.add_(0.3 * torch.randn_like(b))
    return model


def test_fidelity_init_is_unit_rows_and_gains_of_one():
    model = USAE(ModelSpec(("a", "b"), (5, 7), (0.0, 0.0), (1.0, 1.0), 12, 2, decoder_init="unit", gains=True,
                           decoder_bias=True))  # fmt: skip
    for j in range(2):
        assert torch.allclose(model.decoders[j].norm(dim=1), torch.ones(12))
        assert torch.allclose(model.gain(j), torch.ones(12))
        assert torch.allclose(model.decoder_weight(j).norm(dim=1), torch.ones(12))


def test_fidelity_step_matches_slow_update():
    model = fidelity_model()
    slow = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, grad_clip=0.5, recipe="fidelity")
    st = _state(model, cfg)
    x = batch(model.spec.widths, b=42)  # 42 rows: shares of 14 per source
    out = train_step(st, _ctx(cfg), x)
    assert sorted(out.sources) == [0, 1, 2]
    ref = slow_fidelity_loss(slow, x)
    assert_slow_fidelity_update(model, slow, out, ref, cfg, 0)


def test_tail_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0, "tail") == pytest.approx(0.1)
    assert (
        lr_at(50, 100, 10, 1.0, 0.0, "tail") == 1.0 and lr_at(90, 100, 10, 1.0, 0.0, "tail") == 1.0
    )
    assert lr_at(95, 100, 10, 1.0, 0.0, "tail") == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.0, "tail") == 0.0


# ---------------------------------------------------------------- code agreement
def slow_agreement(model: USAE, i: int, p: int, xs, k: int):
    """Code agreement written out: both backbones encode the same rows (the partner's BatchNorm
    on batch statistics by hand, its running statistics untouched); over the union of the two
    two codes' top-2k sets, |a_i - a_p| weighted by the ratio of the two softplus gains (0 up to 0.3, 1 from
    0.6), summed, / (rows x k)."""
    act_i = F.relu(model.bns[i](model.encoders[i](xs[i] - model.dec_bias[i])))
    h = model.encoders[p](xs[p] - model.dec_bias[p])
    bn = model.bns[p]
    mean, var = h.mean(0), h.var(0, unbiased=False)
    act_p = F.relu((h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    gi, gp = F.softplus(model.gains[i]).detach(), F.softplus(model.gains[p]).detach()
    ratio = torch.minimum(gi, gp) / torch.maximum(gi, gp)
    w = torch.clamp((ratio - 0.3) / 0.3, 0.0, 1.0)  # 0 up to a gain ratio of 0.3, 1 from 0.6
    total = 0.0
    for r in range(act_i.shape[0]):  # each code's top 2k activations
        top_i, top_p = torch.topk(act_i[r], 2 * k).indices, torch.topk(act_p[r], 2 * k).indices
        union = set(top_i.tolist()) | set(top_p.tolist())
        for c in union:
            total = total + w[c] * (act_i[r, c] - act_p[r, c]).abs()
    return total / (act_i.shape[0] * k)


@pytest.mark.parametrize(
    ("step", "start", "ramp"), [(1, 0.0, 1.0), (2, 0.0, 1.0), (2, 0.15, 0.5), (3, 0.4, 0.0)]
)
def test_fidelity_step_with_agreement_matches_slow_update(step, start, ramp):
    """The fidelity step with code agreement: each source's loss plus agree_weight x ramp x its
    agreement with partner i + 1 + (step mod (M - 1)) on its own rows, the ramp rising from 0 at
    agree_start x total steps to 1 a tenth of the steps later; parameters and BatchNorm running
    statistics after the update as in the slow version."""
    model = fidelity_model()
    with torch.no_grad():  # gain ratios over the whole 0..1 range, so every weight is exercised
        for g in model.gains:
            g.copy_(torch.randn_like(g) * 2)
    slow = copy.deepcopy(model)
    cfg = TrainConfig(
        lr=1e-2, grad_clip=0.5, recipe="fidelity", agree_weight=0.7, agree_start=start
    )
    st = _state(model, cfg)
    st.step = step
    x = batch(model.spec.widths, b=42)
    out = train_step(st, _ctx(cfg), x)
    n = 3
    ref = slow_fidelity_loss(slow, x)
    for i in range(n):
        p = (i + 1 + step % (n - 1)) % n
        assert p != i
        if ramp > 0:
            agree = slow_agreement(slow, i, p, [xx[i::n] for xx in x], model.spec.k)
            ref = ref + 0.7 * ramp * agree / n
    assert_slow_fidelity_update(model, slow, out, ref, cfg, step)
    assert (out.parts[0].agree is not None) == (ramp > 0)


def test_agreement_partner_pass_leaves_running_statistics():
    """Only the source pass moves BatchNorm's running statistics: with agreement on or off they
    end the step the same."""
    model = fidelity_model()
    other = copy.deepcopy(model)
    x = batch(model.spec.widths, b=42)
    for mdl, w in ((model, 0.5), (other, 0.0)):
        cfg = TrainConfig(lr=1e-2, recipe="fidelity", agree_weight=w, agree_start=0.0)
        st = _state(mdl, cfg)
        st.step = 1
        assert (train_step(st, _ctx(cfg), x).parts[0].agree is not None) == (w > 0)
    for (name, a), b in zip(model.named_buffers(), other.buffers(), strict=True):
        if "running" in name or "num_batches" in name:
            assert torch.equal(a, b), name


def test_agreement_weights_spare_concepts_absent_from_one_backbone():
    """A concept whose gain is ~0 in the partner is not pulled into it; equal gains weigh 1;
    in between, 0 up to a gain ratio of 0.3 and 1 from 0.6, linear between."""
    from usae.trainer.objective import agreement_weights

    model = fidelity_model(widths=(5, 7), m=6, k=2)
    with torch.no_grad():
        model.gains[0].fill_(0.5413)  # softplus = 1
        model.gains[1].copy_(torch.tensor([0.5413, 0.5413, -20.0, 0.5413, 0.5413, 0.5413]))
    w = agreement_weights(model, 0, 1)
    assert w[2] < 1e-6 and torch.allclose(
        w[[0, 1, 3, 4, 5]], torch.ones(5, dtype=w.dtype), atol=1e-4
    )
    assert torch.equal(w, agreement_weights(model, 1, 0))
    with torch.no_grad():  # softplus^-1 of the gain ratios below (gains of backbone 0 are 1)
        ratios = torch.tensor([0.2, 0.3, 0.45, 0.6, 0.9, 1.0])
        model.gains[1].copy_(torch.log(torch.expm1(ratios)))
    got = agreement_weights(model, 0, 1)
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0], dtype=got.dtype)
    assert torch.allclose(got, want, atol=1e-3), got


def test_agreement_ramp():
    from usae.trainer.objective import agreement_ramp

    got = [agreement_ramp(s, 100, 0.4) for s in (0, 39, 40, 45, 50, 99)]
    assert got == pytest.approx([0, 0, 0, 0.5, 1, 1])
    assert agreement_ramp(5, 0, 0.0) == 0.0  # total not resolved


def test_partner_rotates_over_the_other_backbones():
    from usae.trainer.config import Plan

    plan = Plan("paper", 4, True)
    for i in range(4):
        assert sorted(plan.partner(i, s) for s in range(3)) == sorted(set(range(4)) - {i})
    assert Plan("reference", 3).partner(0, 0) is None and Plan("paper", 1).partner(0, 0) is None


def test_config_of_a_run_written_before_agreement_has_none():
    assert TrainConfig.from_dict({"recipe": "fidelity"}).agree_weight == 0.0
    assert TrainConfig.from_dict({"recipe": "fidelity"}).gain_rate == 1.0


# ---------------------------------------------------------------- gain rate
@pytest.mark.parametrize("rate", [1.0, 10.0])
def test_gain_rate_scales_the_gains_parameter(rate):
    """gain = softplus(rate * g), 1 at the start for any rate; one Adam step moves the gain
    ~rate times as far as the same step at rate 1; the spec keeps the rate, and a spec written
    before gain rates existed reads as 1."""
    spec = ModelSpec(("a", "b"), (5, 7), (0.0, 0.0), (1.0, 1.0), 12, 2, decoder_init="unit", gains=True,
                     gain_rate=rate)  # fmt: skip
    model = USAE(spec)
    assert torch.allclose(model.gain(0), torch.ones(12))
    assert torch.allclose(model.gain(1), F.softplus(rate * model.gains[1]))
    opt = torch.optim.Adam([model.gains[0]], lr=1e-3)
    (-model.gain(0).sum()).backward()
    opt.step()
    step = float((model.gain(0) - 1).mean().detach())
    assert step == pytest.approx(rate * 1e-3 * 0.632, rel=0.02)  # d softplus / dx at softplus = 1
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "gain_rate"}
    assert ModelSpec.from_dict(old).gain_rate == 1.0


def test_resume_keeps_the_gain_rate_the_run_was_written_with(store, tmp_path, monkeypatch):
    """A run trained at gain rate 1 (a fidelity run written before gain rates existed) resumes at
    rate 1 under a recipe whose rate is now 10: bitwise the run that never stopped."""
    from dataclasses import replace

    from usae.trainer.config import RECIPES

    fid = RECIPES["fidelity"]
    monkeypatch.setitem(RECIPES, "fidelity", replace(fid, gain_rate=1.0))
    run_train(small_cfg(store, tmp_path / "a"))
    with pytest.raises(SimulatedKill):
        run_train(small_cfg(store, tmp_path / "b", stop_after=10))
    monkeypatch.setitem(RECIPES, "fidelity", fid)
    assert fid.gain_rate != 1.0
    run_train(TrainConfig(resume=str(tmp_path / "b")))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for kk in wa:
        assert torch.equal(wa[kk], wb[kk]), kk


def test_whiten_ridge(store, tmp_path):
    """--whiten-ridge: P = (C + ridge mean(eig C) I)^(-1/2), so between two ridges P^-2 differs
    by a multiple of the identity (the same C), (ridge_b - ridge_a) x mean(eig C)."""
    ps = []
    for ridge in (0.01, 1.0):
        run_train(small_cfg(store, tmp_path / f"r{ridge}", optimizer="rowadamw", whiten=True,
                            whiten_ridge=ridge))  # fmt: skip
        ps.append(weights(tmp_path / f"r{ridge}")["white_0"].double())
    inv2 = [torch.linalg.inv(p @ p) for p in ps]
    diff = inv2[1] - inv2[0]
    shift = torch.diagonal(diff).mean()
    assert shift > 0
    torch.testing.assert_close(
        diff, shift * torch.eye(len(diff), dtype=diff.dtype), atol=1e-3 * shift, rtol=0
    )
    c_mean = torch.diagonal(inv2[0]).mean() / 1.01  # trace(C + 0.01 mean I) / d = 1.01 mean(eig C)
    torch.testing.assert_close(shift, 0.99 * c_mean, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="whiten_ridge"):
        TrainConfig(store=str(store), out=str(tmp_path / "x"), whiten_ridge=0.0)
