"""Activation store -> trained USAE run directory (`usae train`, docs/method.md section 3).

Reads top to bottom: `run_train` opens the store and the run directory, `train` runs the loop,
and the loop calls `train_step` (one optimiser update), `MetricsLog.write` and `save_state`.
What a step does in each mode (paper, reference, independent) is resolved once into a `Plan`
(trainer/config.py); the loss is trainer/objective.py; DDP helpers are trainer/distributed.py;
the run directory's files are trainer/rundir.py; the state and checkpoints trainer/state.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from usae.pipeline.store import Store
from usae.trainer import checkpoint as ckpt
from usae.trainer.config import RECIPES, Plan, SimulatedKill, TrainConfig, TrainError
from usae.trainer.distributed import (
    Dist,
    average_gradients,
    barrier,
    batch_norm_global,
    close_distributed,
    init_distributed,
    mean_over_ranks,
    reduce_metrics,
)
from usae.trainer.evaluate import stream_reconstruction
from usae.trainer.inputs import (
    check_finite,
    image_masks,
    make_loader,
    model_spec,
    open_store,
    seed_start,
    start_bias,
    start_whitening,
)
from usae.trainer.objective import (
    LossParts,
    agreement_ramp,
    batch_norm_local,
    merge_parts,
    source_loss,
)
from usae.trainer.rundir import (
    MetricsLog,
    RunPaths,
    check_same_store,
    has_checkpoint,
    resolve_run,
    trim_metrics,
    write_config,
)
from usae.trainer.state import TrainState, lr_at, new_state, restore_state, save_state

from usae.runtime import atomic_write_json, autocast_dtype, progress_bar

__all__ = [
    "TrainConfig",
    "TrainError",
    "SimulatedKill",
    "run_train",
    "train_step",
    "StepContext",
    "StepOut",
]


# ---------------------------------------------------------------- one optimiser step
@dataclass(frozen=True)
class StepContext:
    """Fixed settings of the step function."""

    cfg: TrainConfig
    total_steps: int
    warmup: int
    world: int
    amp: torch.dtype | None
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:  # "-1: the recipe's" fields resolved, whoever builds it
        object.__setattr__(self, "cfg", self.cfg.resolved())


class StepOut(NamedTuple):
    loss: float
    """The step's loss (mean over DDP ranks)."""
    sources: list[int]
    """Source backbones of the step."""
    parts: list[LossParts]
    """One per source (R2 over the global batch when asked)."""
    lrs: list[float]
    """Learning rate of each backbone's parameter group."""
    logged: list[LossParts] | None = None
    """What the metrics line reports (when asked): the parts, or with the batch split among
    the sources, the parts merged into one over the whole batch."""


def train_step(
    st: TrainState, ctx: StepContext, x_list: list[Tensor], with_r2: bool = False
) -> StepOut:
    """One optimiser step on a batch of standardised tokens (x_list: one tensor per backbone)."""
    cfg, model = ctx.cfg, st.model
    recipe = RECIPES[cfg.recipe]
    plan = Plan(cfg.mode, model.n_models, recipe.split_sources)
    bn_fn = batch_norm_global if ctx.world > 1 else batch_norm_local
    kw = dict(
        loss=cfg.loss,
        aux_weight=cfg.aux_weight,
        bn_fn=bn_fn,
        amp=ctx.amp,
        with_r2=with_r2,
        aux=cfg.aux,
        targets_mean=recipe.targets_mean,
    )
    st.opt.zero_grad(set_to_none=True)
    sources = plan.sources(st.gen)
    # split batch: source i encodes rows i, i+M, i+2M... (the same rows on any number of DDP
    # ranks when each rank's share is a multiple of M), weighted by its share of the rows
    shares = [[x[i :: plan.n] for x in x_list] if plan.split_batch else x_list for i in sources]
    weights = [xs[0].shape[0] / x_list[0].shape[0] for xs in shares]
    agree = cfg.agree_weight * agreement_ramp(st.step, ctx.total_steps, cfg.agree_start)
    partners = [plan.partner(i, st.step) if agree > 0 else None for i in sources]
    parts = [
        source_loss(
            model,
            i,
            xs,
            plan.targets(i),
            detach=plan.detached(i),
            dead_m=dead(st, cfg, i),
            partner=p,
            agree_weight=agree,
            **kw,
        )
        for i, xs, p in zip(sources, shares, partners, strict=True)
    ]
    loss = torch.stack([p.loss * w for p, w in zip(parts, weights, strict=True)]).sum()
    loss.backward()
    loss_f = float(mean_over_ranks(loss.detach(), ctx.world))
    if not math.isfinite(loss_f):
        raise TrainError(f"loss became non-finite ({loss_f}) at step {st.step + 1}")
    average_gradients(list(model.parameters()), ctx.world)
    clip_gradients(st, cfg.grad_clip, plan)
    lrs = set_lrs(st, ctx, plan, sources)
    st.opt.step()
    st.step += 1
    st.tokens += cfg.batch_tokens
    logged = None
    if with_r2:
        logged = reduce_metrics(
            [merge_parts(parts, weights)] if plan.split_batch else parts, ctx.world
        )
        parts = reduce_metrics(parts, ctx.world) if plan.split_batch else logged
    record(st, parts, sources, loss_f, plan)
    return StepOut(loss_f, sources, parts, lrs, logged)


def dead(st: TrainState, cfg: TrainConfig, i: int) -> Tensor | None:
    """(m,) concepts of source i not selected for dead_window_tokens (for --aux dead only)."""
    if cfg.aux != "dead":
        return None
    return (st.tokens - st.last_fired_mt[i]) >= cfg.dead_window_tokens


def clip_gradients(st: TrainState, max_norm: float, plan: Plan) -> None:
    """Gradient-norm clip over the parameters that step: all of them together (paper; in
    reference mode only the source's have gradients), or each backbone's SAE alone (independent)."""
    if max_norm <= 0:
        return
    groups = (
        [g["params"] for g in st.opt.param_groups]
        if plan.clip_per_group
        else [list(st.model.parameters())]
    )
    for params in groups:
        ps = [p for p in params if p.grad is not None]
        if ps:
            torch.nn.utils.clip_grad_norm_(ps, max_norm)


def set_lrs(st: TrainState, ctx: StepContext, plan: Plan, sources: list[int]) -> list[float]:
    """Set each group's lr from its schedule position; advance the groups that step."""
    lrs = []
    for j, g in enumerate(st.opt.param_groups):
        t = st.group_steps[j] if plan.schedule_per_group else st.step
        g["lr"] = lr_at(
            t,
            ctx.total_steps,
            ctx.warmup,
            ctx.cfg.lr,
            ctx.cfg.lr_min,
            RECIPES[ctx.cfg.recipe].schedule,
        )
        lrs.append(g["lr"])
    for j in plan.stepping(sources):
        st.group_steps[j] += 1
    return lrs


def record(
    st: TrainState, parts: list[LossParts], sources: list[int], loss: float, plan: Plan
) -> None:
    """Fold a step into the state's trackers: the token at which each concept last fired, the
    latest self-R2 of each source, and the loss window of the next metrics line."""
    st.log_loss[0] += loss
    st.log_loss[1] += 1
    for p, i in zip(parts, sources, strict=True):
        pos = p.codes.values_bk > 0
        st.last_fired_mt[i, p.codes.indices_bk[pos]] = st.tokens
        if p.r2_j is not None:
            st.self_r2[i] = float(p.r2_j[0 if plan.independent else i])


# ---------------------------------------------------------------- the loop
def train(
    cfg: TrainConfig,
    s: TrainState,
    ctx: StepContext,
    loader,
    st: Store,
    keys: list[str],
    paths: RunPaths,
    rank0: bool,
    train_images: np.ndarray,
) -> float:
    """Steps until cfg.steps, with metrics lines and checkpoints; returns the last loss."""
    log = MetricsLog(paths, keys, cfg, rank0)
    batches, last, dev = iter(loader), float("nan"), next(s.model.parameters()).device
    with progress_bar(rank0, info=True) as bar:
        task = bar.add_task("train", total=ctx.total_steps, completed=s.step, info="")
        log.start(s.tokens)
        while s.step < ctx.total_steps:
            batch = next(batches)
            check_finite(st, keys, batch.acts, train_images, ctx.world)
            x = [
                s.model.standardize(j, a.to(dev, non_blocking=True).float())
                for j, a in enumerate(batch.acts)
            ]
            epoch = int(batch.epoch)
            del batch  # dropped before the step: the loader can refill the same, cache-warm buffers
            logging = (s.step + 1) % cfg.log_every == 0 or s.step + 1 == ctx.total_steps
            try:
                out = train_step(s, ctx, x, with_r2=logging)
            except TrainError as e:
                where = (
                    f"the last good checkpoint is in {paths.checkpoint}"
                    if paths.checkpoint.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainError(f"{e}; training stopped, {where}") from None
            last = out.loss
            if logging:
                line = log.write(s, out, epoch)
                s.log_loss = [0.0, 0.0]
                bar.update(task, info=f"loss {line['loss']:.4f} L0 {line['l0']:.1f}")
            bar.update(task, completed=s.step)
            if cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and s.step < ctx.total_steps:
                checkpoint(paths, s, loader, rank0, ctx.world)
            if cfg.stop_after and s.step >= cfg.stop_after:
                raise SimulatedKill(f"stopped at step {s.step} (stop_after)")
    return last


def checkpoint(paths: RunPaths, s: TrainState, loader, rank0: bool, world: int) -> None:
    if rank0:
        save_state(paths.checkpoint, s, loader, paths.resume_hint)
    barrier(world)


# ---------------------------------------------------------------- the run
class TrainResult(NamedTuple):
    run_dir: Path
    steps: int
    """Steps done in total."""
    loss: float
    """Loss of the last step."""
    metrics: dict
    """The final metrics.json content."""


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train a USAE on a store; writes the run directory (see docs/contracts.md)."""
    d = init_distributed(cfg.device)
    try:
        cfg, paths, resuming = resolve_run(cfg)
        st, keys = open_store(cfg)
        train_images, held_images = image_masks(st, cfg.holdout)
        if not train_images.any():
            raise TrainError("no training images left (all invalid or held out)")
        loader = make_loader(st, keys, cfg, train_images, d)
        try:
            return _run(cfg, d, st, keys, loader, paths, resuming, train_images, held_images)
        finally:
            loader.close()
    finally:
        close_distributed(d)


def _run(
    cfg: TrainConfig,
    d: Dist,
    st: Store,
    keys: list[str],
    loader,
    paths: RunPaths,
    resuming: bool,
    train_images: np.ndarray,
    held_images: np.ndarray,
) -> TrainResult:
    spec = model_spec(st, keys, cfg)
    per_epoch = int(loader.batches_per_epoch)
    if per_epoch < 1:
        raise TrainError(
            f"the training images hold fewer tokens than one batch of {cfg.batch_tokens}"
        )
    total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else per_epoch
    cfg = replace(
        cfg.resolved(),
        backbones=tuple(keys),
        concepts=spec.concepts,
        steps=total,
        warmup_steps=warmup,
    )
    rank0 = d.rank == 0
    if resuming:
        check_same_store(paths, st)
    elif rank0:
        write_config(paths, cfg, spec, st)
    s = new_state(spec, cfg, d.device)
    start_bias(s.model, st, keys)  # resuming overwrites it with the checkpoint's
    restoring = resuming and has_checkpoint(paths)
    if not restoring:  # the checkpoint holds the whitening of a resumed run
        start_whitening(s.model, st, keys, train_images, cfg.seed, cfg.whiten_ridge)
    if spec.decoder_init == "data" and not restoring:  # read with the bias just set
        s.model.seed_from_tokens(
            *seed_start(st, keys, s.model, train_images, cfg.seed, cfg.encoder_start)
        )
    if resuming:
        if rank0:
            ckpt.remove_stale_temporaries(paths.checkpoint)
        if restoring:
            restore_state(paths.checkpoint, s, loader)
        if rank0:
            trim_metrics(paths, s.step)
    ctx = StepContext(cfg, total, warmup, d.world, autocast_dtype(cfg.dtype, d.device), d.device)
    if cfg.dtype == "bf16" and ctx.amp is None and rank0:
        warnings.warn(f"{d.device} has no fast bf16 support: training in fp32", stacklevel=2)
    last = train(cfg, s, ctx, loader, st, keys, paths, rank0, train_images)
    metrics: dict = {}
    if rank0:
        checkpoint(paths, s, loader, True, 1)
        s.model.save(paths.model)
        metrics = final_metrics(s, st, keys, held_images, cfg, ctx, last)
        atomic_write_json(paths.metrics_json, metrics, indent=1)
    barrier(d.world)
    return TrainResult(paths.root, s.step, last, metrics)


def final_metrics(
    s: TrainState,
    st: Store,
    keys: list[str],
    held: np.ndarray,
    cfg: TrainConfig,
    ctx: StepContext,
    last: float,
) -> dict:
    # the one streaming reconstruction of train and analysis; fp32 whatever the training dtype
    ev = stream_reconstruction(
        s.model, st, keys, held, batch_tokens=cfg.batch_tokens, device=ctx.device
    )
    r2, l0 = ev.reconstruction.r2, ev.reconstruction.l0

    def clean(x: float) -> float | None:
        return None if not math.isfinite(x) else float(x)

    return {
        "steps": s.step, "tokens": s.tokens, "train_loss_last": clean(last), "backbones": keys,
        "heldout_images": int(held.sum()), "heldout_tokens": ev.n_tokens,
        "r2_matrix": [[clean(v) for v in row] for row in r2],
        "self_r2": {k: clean(r2[i, i]) for i, k in enumerate(keys)},
        "l0": {k: clean(l0[i]) for i, k in enumerate(keys)},
        "dead_fraction": clean(ev.dead_share),
    }  # fmt: skip
