"""Activation store -> trained USAE run directory (`usae train`, usae-spec.md sections 2-3).

Each step draws a source backbone i (seeded; the same on every DDP rank), encodes its
standardised tokens into TopK codes Z, and minimises

    sum over target backbones j of  rec(x_j, Z D_j) + aux_weight * rec(x_j - Z D_j, A D_j)

where A keeps the top m/2 of the non-selected positive pre-activations ReLU(pre) - Z.
The gradient flows through the residual and through A into the encoder (no detach).

Two readings of the update (``--update``):
  paper      one optimiser; the summed loss trains encoder i and EVERY decoder, so the
             cross-reconstructions shape all decoders; one lr schedule over all steps.
  reference  one AdamW per backbone and only backbone i's steps: decoders j != i are
             detached (they learn only when their own backbone is the source), and each
             backbone's lr schedule advances only when it is picked (it ends near
             lr * 0.75 for three backbones, not at lr_min).
``--independent`` trains one separate SAE per backbone (codes of i decode only into i);
every step trains ALL backbones on their own tokens, each with its own gradient-norm clip,
so the SAEs never interact; ``--update`` does not apply.

Implementation: the sparse reconstruction Z D uses embedding_bag over the k selected rows
of the concatenated decoders (one gather for all targets); the aux codes are half dense,
so they are decoded with one (bf16 when asked) matmul against the same concatenation.
Under DDP (torchrun) BatchNorm statistics are all-reduced over the global batch with a
differentiable all_reduce and gradients are averaged, so an update equals the
single-process update on the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from usae.pipeline.store import Store, holdout_mask
from usae.trainer import checkpoint as ckpt
from usae.trainer.loader import SHUFFLES, ChunkLoader
from usae.trainer.model import USAE, Codes, ModelSpec

from usae.errors import UsaeError

CONFIG_SCHEMA_VERSION = 1


class TrainError(UsaeError, RuntimeError):
    """Training cannot start or cannot go on (bad input, non-finite loss, disk full...)."""


class SimulatedKill(RuntimeError):
    """Raised by `stop_after` to stop a run as abruptly as a kill (tests of --resume)."""


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    """Everything `usae train` needs; the resolved copy is written to RUN/config.json."""

    store: str = ""
    """Path of the activation store (S.zarr)."""
    out: str = ""
    """Run directory to create (must not hold another run)."""
    backbones: tuple[str, ...] = ()
    """Subset of the store's backbones, in this order (empty: all)."""
    concepts: int = 0
    """Concepts m in the shared code (0: 8 x the largest width)."""
    k: int = 32
    """Active concepts per token (TopK)."""
    loss: str = "l1"
    """Reconstruction loss: l1 (mean absolute error) or l2 (mean squared error)."""
    aux_weight: float = 0.1
    """Weight of the auxiliary loss on the non-selected pre-activations."""
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    lr_min: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 1e-5
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    batch_tokens: int = 6272
    """Tokens per global batch (32 images x 196 tokens)."""
    steps: int = 0
    """Optimiser steps (0: derived from epochs)."""
    epochs: float = 30.0
    """Epochs over the training images (used when steps is 0)."""
    warmup_steps: int = -1
    """Linear warm-up steps (-1: one epoch)."""
    update: str = "paper"
    """paper: summed loss trains encoder i and every decoder; reference: only backbone i steps."""
    independent: bool = False
    """One independent SAE per backbone (codes never cross backbones)."""
    holdout: float = 0.1
    """Fraction of images held out for the final metrics (the store's split when it has one)."""
    seed: int = 0
    """Seed of the initialisation, the source-backbone draws and the loader's shuffle."""
    dtype: str = "bf16"
    """Matmul precision: bf16 (autocast where the device supports it) or fp32."""
    device: str = "auto"
    """auto, cpu or cuda."""
    log_every: int = 50
    """Append a line to metrics.jsonl every this many steps."""
    ckpt_every: int = 1000
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    dead_window_tokens: int = 1_000_000
    """A concept is dead when it was not selected for this many training tokens."""
    buffer_chunks: int = 0
    """Chunks shuffled together by the loader (a batch is drawn from them); 0: chosen by how the store is read, 64 for whole-image batches from a raw store, 16 for token batches from a raw store, 4 when chunks are decoded into a memory pool (a compressed store)."""
    shuffle: str = "images"
    """images (default): batches of whole images in shuffled order, as the paper's 32 x 196-token batches, each image read straight from its chunk file into the batch; tokens: single rows shuffled within a buffer of chunks (more images per batch, about half the loader's speed)."""
    resume: str = ""
    """Continue the run in this directory (its config.json wins over other options)."""
    stop_after: int = 0
    """Testing aid: stop abruptly after this many steps, as if killed (0: never)."""

    def __post_init__(self) -> None:
        checks = [
            (self.loss in ("l1", "l2"), f"loss must be l1 or l2, got {self.loss!r}"),
            (self.update in ("paper", "reference"), f"update must be paper or reference, got {self.update!r}"),
            (self.dtype in ("bf16", "fp32"), f"dtype must be bf16 or fp32, got {self.dtype!r}"),
            (self.shuffle in SHUFFLES, f"shuffle must be {' or '.join(SHUFFLES)}, got {self.shuffle!r}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"bad device {self.device!r}"),
            (self.k > 0, "k must be positive"),
            (self.batch_tokens > 0, "batch_tokens must be positive"),
            (self.buffer_chunks >= 0, "buffer_chunks must be >= 0 (0: chosen by how the store is read)"),
            (0.0 <= self.holdout < 1.0, "holdout must be in [0, 1)"),
            (self.steps >= 0 and self.epochs > 0, "steps must be >= 0 and epochs > 0"),
            (self.log_every > 0 and self.ckpt_every >= 0, "log_every must be > 0, ckpt_every >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbones"] = list(self.backbones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["backbones"] = tuple(kw.get("backbones", ()))
        return cls(**kw)


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run directory (docs/contracts.md)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"


# ---------------------------------------------------------------- the step math
class LossParts(NamedTuple):
    """One source backbone's loss and what the metrics need."""

    loss: Tensor
    """Scalar: sum of rec + aux_weight * aux over the targets (with graph)."""
    rec_j: list[Tensor]
    """Reconstruction loss per target (detached)."""
    aux_j: list[Tensor]
    """Auxiliary loss per target (detached)."""
    r2_j: list[Tensor] | None
    """R2 of each target from the source's codes on this batch (when asked; from source_loss:
    the sums of `_r2_sums`, turned into R2 over the global batch by train_step)."""
    codes: Codes
    """The source's codes."""


def batch_norm_local(bn: nn.BatchNorm1d, h_bm: Tensor) -> Tensor:
    """Training-mode BatchNorm over this process's batch (updates running statistics)."""
    bn.num_batches_tracked.add_(1)
    return F.batch_norm(h_bm, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is also an all_reduce(SUM): the gradient of the sum of
    every rank's loss with respect to each rank's contribution."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ARG004 - autograd signature
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ARG004
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def batch_norm_global(bn: nn.BatchNorm1d, h_bm: Tensor) -> Tensor:
    """Training-mode BatchNorm with statistics over the GLOBAL batch of all DDP ranks.

    SyncBatchNorm does not run on CPU; this all-reduces sum and centred sum of squares with a
    differentiable all_reduce, so gradients see the global statistics as well.
    """
    all_reduce = _SumOverRanks.apply
    n = torch.tensor([float(h_bm.shape[0])], device=h_bm.device, dtype=h_bm.dtype)
    dist.all_reduce(n)
    mean_m = all_reduce(h_bm.sum(0)) / n
    var_m = all_reduce((h_bm - mean_m).square().sum(0)) / n
    with torch.no_grad():
        mom = bn.momentum
        bn.running_mean.mul_(1 - mom).add_(mean_m.detach(), alpha=mom)
        bn.running_var.mul_(1 - mom).add_(var_m.detach() * (n / (n - 1).clamp_min(1)), alpha=mom)
        bn.num_batches_tracked.add_(1)
    return (h_bm - mean_m) * torch.rsqrt(var_m + bn.eps) * bn.weight + bn.bias


class AuxSelection(NamedTuple):
    """Which entries of ReLU(pre) are aux codes: the n largest of ReLU(pre) - Z per row."""

    idx_bk: Tensor
    """TopK indices (never aux codes)."""
    rows: Tensor | None
    """Rows with more than n positive non-selected entries (None: no such row)."""
    low_rm: Tensor | None
    """For those rows, True where an entry is below their n-th largest non-selected value."""


def aux_selection(act_bm: Tensor, idx_bk: Tensor, n: int) -> AuxSelection:
    """Find the aux codes by selection (kthvalue), not sorting: same set as
    torch.topk(ReLU(pre) - Z, n) up to ties at the threshold. A row with at most n positive
    non-selected entries keeps all of them (topk would only add zeros, which decode to 0 and
    get no gradient through the ReLU), so only the other rows need a threshold."""
    m = act_bm.shape[1]
    with torch.no_grad():
        pos = torch.count_nonzero(act_bm, dim=1) - torch.count_nonzero(act_bm.gather(1, idx_bk), dim=1)
        over = pos > n
        if n >= m or not bool(over.any()):
            return AuxSelection(idx_bk, None, None)
        rows = over.nonzero().squeeze(1)
        sub = act_bm[rows].scatter(1, idx_bk[rows], 0)
        thr = torch.kthvalue(sub, m - n + 1, dim=1).values
        return AuxSelection(idx_bk, rows, sub < thr[:, None])


def mask_to_aux_(a_bm: Tensor, sel: AuxSelection) -> Tensor:
    """Zero, in place, the entries of a (b, m) tensor that are not aux codes, except entries
    where ReLU(pre) is 0 (left as they are: ReLU's backward zeroes their gradient anyway)."""
    a_bm.scatter_(1, sel.idx_bk, 0)
    if sel.rows is not None:
        a_bm[sel.rows] = a_bm[sel.rows].masked_fill_(sel.low_rm, 0)
    return a_bm


class _AuxDecode(torch.autograd.Function):
    """(aux codes of act) @ dec in `dtype`: one cast pass and sparse masking forward, the same
    masking of the gradient backward; the masked (b, m) copy is made once."""

    @staticmethod
    def forward(ctx, act_bm: Tensor, dec_md: Tensor, sel: AuxSelection, dtype: torch.dtype) -> Tensor:
        a = mask_to_aux_(act_bm.to(dtype, copy=True), sel)
        d = dec_md.to(dtype)
        ctx.save_for_backward(a, d)
        ctx.sel, ctx.dtypes = sel, (act_bm.dtype, dec_md.dtype)
        return (a @ d).to(act_bm.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, d = ctx.saved_tensors
        g = g.to(a.dtype)
        ga = gd = None
        if ctx.needs_input_grad[0]:
            ga = mask_to_aux_(g @ d.T, ctx.sel).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gd = (a.T @ g).to(ctx.dtypes[1])
        return ga, gd, None, None


def _err(e: Tensor, kind: str) -> Tensor:
    return e.abs().mean() if kind == "l1" else e.square().mean()


def _r2_sums(x_bd: Tensor, resid_bd: Tensor) -> Tensor:
    """(sum resid^2, sum x, sum x^2, n) in float64: R2 sums that add up over ranks."""
    x = x_bd.double()
    return torch.stack([resid_bd.double().square().sum(), x.sum(), x.square().sum(),
                        torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])


def _r2_from_sums(s_4: Tensor) -> Tensor:
    n = s_4[3]
    return 1 - (s_4[0] / n) / (s_4[2] / n - (s_4[1] / n).square())


def _reduce_metrics(parts: list[LossParts], world: int) -> list[LossParts]:
    """Per-backbone losses and R2 over the GLOBAL batch (a logged step only)."""
    out = []
    for p in parts:
        rec, aux, sums = torch.stack(p.rec_j), torch.stack(p.aux_j), torch.stack(p.r2_j)
        if world > 1:
            for t in (rec, aux, sums):
                dist.all_reduce(t)
            rec, aux = rec / world, aux / world
        out.append(p._replace(rec_j=list(rec), aux_j=list(aux), r2_j=[_r2_from_sums(x) for x in sums]))
    return out


def source_loss(
    model: USAE,
    i: int,
    x_list: Sequence[Float[Tensor, "b _"]],
    targets: Sequence[int],
    *,
    loss: str,
    aux_weight: float,
    detach: Sequence[int] = (),
    bn_fn: Callable[[nn.BatchNorm1d, Tensor], Tensor] = batch_norm_local,
    amp: torch.dtype | None = None,
    with_r2: bool = False,
) -> LossParts:
    """Loss of one source backbone i over the target backbones (standardised inputs x_list).

    detach: targets whose decoders get no gradient (the reference update's other backbones).
    amp: autocast dtype for the encoder and aux matmuls (None: fp32).
    """
    dev = x_list[i].device.type
    ac = torch.autocast(dev, dtype=amp) if amp is not None else nullcontext()
    with ac:
        h_bm = model.encoders[i](x_list[i])
    pre_bm = bn_fn(model.bns[i], h_bm.to(x_list[i].dtype))
    act_bm = F.relu(pre_bm)
    vals_bk, idx_bk = torch.topk(act_bm, model.spec.k, dim=1, sorted=False)
    sel = aux_selection(act_bm, idx_bk, model.spec.concepts // 2)
    dec = [model.decoder_weight(j) for j in targets]
    dec = [w.detach() if j in detach else w for j, w in zip(targets, dec, strict=True)]
    d_cat = torch.cat(dec, dim=1) if len(dec) > 1 else dec[0]
    xhat = F.embedding_bag(idx_bk, d_cat, per_sample_weights=vals_bk, mode="sum")
    auxhat = _AuxDecode.apply(act_bm, d_cat, sel, amp or act_bm.dtype)
    x_cat = torch.cat([x_list[j] for j in targets], dim=1) if len(targets) > 1 else x_list[targets[0]]
    resid = x_cat - xhat
    aux_err = resid - auxhat.to(resid.dtype)
    widths = [x_list[j].shape[1] for j in targets]
    rec_j = [_err(r, loss) for r in resid.split(widths, dim=1)]
    aux_j = [_err(a, loss) for a in aux_err.split(widths, dim=1)]
    total = torch.stack(rec_j).sum() + aux_weight * torch.stack(aux_j).sum()
    r2 = None
    if with_r2:
        with torch.no_grad():
            r2 = [_r2_sums(x_list[j], r) for j, r in zip(targets, resid.detach().split(widths, dim=1), strict=True)]
    codes = Codes(vals_bk.detach(), idx_bk, pre_bm.detach())
    return LossParts(total, [r.detach() for r in rec_j], [a.detach() for a in aux_j], r2, codes)


# ---------------------------------------------------------------- optimiser and schedule
def make_optimizer(model: USAE, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one parameter group per backbone (= one AdamW per backbone: AdamW is per-parameter)."""
    groups = []
    for j in range(model.n_models):
        params = [*model.encoders[j].parameters(), *model.bns[j].parameters(), model.decoders[j]]
        groups.append({"params": params, "lr": cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(t: int, total: int, warmup: int, lr: float, lr_min: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from lr to lr_min at step `total`."""
    if t < warmup:
        return lr * (t + 1) / warmup
    p = min(1.0, (t - warmup) / max(1, total - warmup))
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * p))


def average_gradients(params: Sequence[Tensor], world: int) -> None:
    """Average gradients over DDP ranks (every rank holds grads for the same parameters)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off : off + g.numel()].view_as(g))
        off += g.numel()


# ---------------------------------------------------------------- training state and step
@dataclass
class TrainState:
    """Everything that changes during training (all of it is checkpointed)."""

    model: USAE
    opt: torch.optim.AdamW
    gen: torch.Generator
    """Draws the source backbone of each step (same seed on every rank)."""
    step: int = 0
    group_steps: list[int] = field(default_factory=list)
    """Schedule position of each backbone (reference update: advances only when picked)."""
    tokens: int = 0
    """Global training tokens seen."""
    last_fired_mt: Tensor | None = None
    """(M, m) token count at which each concept was last selected from backbone i."""
    self_r2: list[float | None] = field(default_factory=list)
    log_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """Sum and count of step losses since the last metrics line."""


class StepOut(NamedTuple):
    loss: float
    sources: list[int]
    parts: list[LossParts]
    lrs: list[float]


@dataclass(frozen=True)
class StepContext:
    """Fixed settings of the step function."""

    cfg: TrainConfig
    total_steps: int
    warmup: int
    world: int
    amp: torch.dtype | None


def _set_lrs(st: TrainState, ctx: StepContext, stepping: Sequence[int]) -> list[float]:
    cfg = ctx.cfg
    lrs = []
    for j, g in enumerate(st.opt.param_groups):
        t = st.group_steps[j] if (cfg.update == "reference" and not cfg.independent) else st.step
        g["lr"] = lr_at(t, ctx.total_steps, ctx.warmup, cfg.lr, cfg.lr_min)
        lrs.append(g["lr"])
    for j in stepping:
        st.group_steps[j] += 1
    return lrs


def _clip(st: TrainState, ctx: StepContext) -> None:
    """Gradient-norm clip over the parameters that step: all of them (paper), those of the
    source backbone (reference: the others have no gradient), or each SAE alone (independent)."""
    if ctx.cfg.grad_clip <= 0:
        return
    if ctx.cfg.independent:  # each SAE its own clip: the SAEs never interact
        for g in st.opt.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                torch.nn.utils.clip_grad_norm_(ps, ctx.cfg.grad_clip)
        return
    ps = [p for p in st.model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(ps, ctx.cfg.grad_clip)


def train_step(st: TrainState, ctx: StepContext, x_list: list[Tensor], with_r2: bool = False) -> StepOut:
    """One optimiser step on a batch of standardised tokens (x_list: one tensor per backbone)."""
    cfg, model = ctx.cfg, st.model
    n = model.n_models
    bn_fn = batch_norm_global if ctx.world > 1 else batch_norm_local
    kw = dict(loss=cfg.loss, aux_weight=cfg.aux_weight, bn_fn=bn_fn, amp=ctx.amp, with_r2=with_r2)
    st.opt.zero_grad(set_to_none=True)
    if cfg.independent:
        sources = list(range(n))
        parts = [source_loss(model, i, x_list, [i], **kw) for i in sources]
    else:
        i = int(torch.randint(n, (1,), generator=st.gen).item())
        sources = [i]
        detach = [j for j in range(n) if j != i] if cfg.update == "reference" else []
        parts = [source_loss(model, i, x_list, list(range(n)), detach=detach, **kw)]
    loss = torch.stack([p.loss for p in parts]).sum()
    loss.backward()
    loss_val = loss.detach()
    if ctx.world > 1:
        dist.all_reduce(loss_val)
        loss_val /= ctx.world
    loss_f = float(loss_val)
    if not math.isfinite(loss_f):
        raise TrainError(f"loss became non-finite ({loss_f}) at step {st.step + 1}")
    average_gradients(list(model.parameters()), ctx.world)
    _clip(st, ctx)
    stepping = sources if (cfg.update == "reference" and not cfg.independent) else range(n)
    lrs = _set_lrs(st, ctx, stepping)
    st.opt.step()
    st.step += 1
    st.tokens += cfg.batch_tokens
    if with_r2:
        parts = _reduce_metrics(parts, ctx.world)
    return StepOut(loss_f, sources, parts, lrs)


# ---------------------------------------------------------------- input checks and setup
class Dist(NamedTuple):
    rank: int
    world: int
    device: torch.device
    owns_group: bool
    """True when run_train initialised the process group (and must destroy it)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda asked for, but no CUDA device is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")


def init_distributed(device: str) -> Dist:
    """Single process, or DDP from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1:
        return Dist(0, 1, dev, False)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it, else None (fp32)."""
    if name != "bf16":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    cpu = getattr(torch, "cpu", None)
    ok = any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if ok else None


def open_store(cfg: TrainConfig) -> tuple[Store, list[str]]:
    """Open the store and check everything the trainer relies on (clear errors, no tracebacks)."""
    if not cfg.store:
        raise TrainError("no --store given")
    if not Path(cfg.store).exists():
        raise TrainError(f"store {cfg.store} does not exist")
    st = Store.open(cfg.store)  # StoreError: not a store, other schema, incomplete
    keys = list(cfg.backbones) or list(st.backbones)
    missing = [k for k in keys if k not in st.backbones]
    if missing:
        raise TrainError(f"backbone(s) {missing} not in the store (it has {st.backbones})")
    if len(set(keys)) != len(keys):
        raise TrainError(f"backbones listed twice: {keys}")
    _check_rows_agree(st, keys)
    return st, keys


def _check_rows_agree(st: Store, keys: Sequence[str]) -> None:
    """Every backbone must hold the same rows (same images, same tokens) as the image table."""
    import zarr

    expect = st.n_images * st.tokens_per_image
    counts = {}
    for k in keys:
        shape = zarr.open_array(str(st.path / "backbones" / k / "tokens"), mode="r").shape
        if shape[0] != expect:
            raise TrainError(
                f"backbone {k!r} has {shape[0]} token rows, but the store's {st.n_images} image ids "
                f"x {st.tokens_per_image} tokens make {expect}: the backbones disagree on images/rows"
            )
        counts[k] = int(st.stats(k)["count"])
    if len(set(counts.values())) > 1:
        raise TrainError(f"backbones disagree on the number of valid rows: {counts}")


def image_masks(st: Store, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) boolean masks over images; held-out from the split when the store has one."""
    valid = st.valid
    held = np.zeros(st.n_images, dtype=bool)
    if holdout > 0:
        split = st.split
        held = split != "train" if split is not None else holdout_mask(list(st.image_ids), holdout)
    return valid & ~held, valid & held


def model_spec(st: Store, keys: Sequence[str], cfg: TrainConfig) -> ModelSpec:
    widths = tuple(st.widths[k] for k in keys)
    stats = [st.stats(k) for k in keys]
    for k, s in zip(keys, stats, strict=True):
        if not (math.isfinite(s["scalar_mean"]) and math.isfinite(s["scalar_std"])):
            raise_non_finite(st, k)  # the statistics saw NaN/inf: name the chunk
    return ModelSpec(
        backbones=tuple(keys),
        widths=widths,
        mu=tuple(float(s["scalar_mean"]) for s in stats),
        sigma=tuple(float(s["scalar_std"]) for s in stats),
        concepts=cfg.concepts or 8 * max(widths),
        k=cfg.k,
        independent=cfg.independent,
    )


def make_loader(st: Store, keys: Sequence[str], cfg: TrainConfig, images: np.ndarray, d: Dist):
    if cfg.batch_tokens % d.world:
        raise TrainError(f"batch_tokens {cfg.batch_tokens} is not divisible by the {d.world} DDP processes")
    try:
        return ChunkLoader(
            st, list(keys), cfg.batch_tokens, images=images, seed=cfg.seed,
            buffer_chunks=cfg.buffer_chunks or None, rank=d.rank, world_size=d.world, shuffle=cfg.shuffle,
        )
    except ValueError as e:
        raise TrainError(f"cannot load batches from {st.path}: {e}") from None


def check_finite(st: Store, keys: Sequence[str], acts: Sequence[Tensor], train_images: np.ndarray,
                 world: int = 1) -> None:
    """Stop with the backbone and chunk when a batch holds NaN/inf activations (on any rank)."""
    bad = next((j for j, a in enumerate(acts) if not bool(torch.isfinite(a).all())), -1)
    if world > 1:  # every rank must stop together, not hang in the next all_reduce
        flag = torch.tensor([bad + 1], dtype=torch.long, device=acts[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = int(flag) - 1
    if bad < 0:
        return
    raise_non_finite(st, keys[bad], train_images)


def raise_non_finite(st: Store, key: str, images: np.ndarray | None = None) -> None:
    """Find the first store chunk of `key` with NaN/inf on the given images and stop with it."""
    rows = np.repeat(st.valid if images is None else images, st.tokens_per_image)
    for c in range(st.n_chunks):
        r0, r1 = st.chunk_rows(c)
        if not np.isfinite(st.read_chunk(key, c)[rows[r0:r1]]).all():
            raise TrainError(f"non-finite activations (NaN/inf) in backbone {key!r}, store chunk {c} (rows {r0}..{r1})")
    raise TrainError(f"non-finite activations (NaN/inf) in backbone {key!r}")


# ---------------------------------------------------------------- held-out evaluation
class EvalResult(NamedTuple):
    """Held-out metrics (BatchNorm in eval mode), streamed over the held-out images."""

    r2_ij: np.ndarray
    """(M, M) R2 of backbone j reconstructed from backbone i's codes (NaN where not decoded)."""
    l0_i: np.ndarray
    """(M,) mean active concepts per token from each source."""
    dead: float
    """Share of concepts never selected (value > 0) on the held-out tokens."""
    tokens: int
    """Held-out tokens evaluated."""


@torch.no_grad()
def evaluate(model: USAE, st: Store, keys: Sequence[str], images: np.ndarray, batch_tokens: int,
             amp: torch.dtype | None = None) -> EvalResult:
    """Cross-model R2 = 1 - mean((x - xhat)^2) / mean((x - mean(x))^2), scalar mean(x), streamed."""
    was_training = model.training
    model.eval()
    n_m, dev = model.n_models, next(model.parameters()).device
    sse = np.zeros((n_m, n_m))
    s1, s2, cnt, l0 = np.zeros(n_m), np.zeros(n_m), 0, np.zeros(n_m)
    fired = torch.zeros(model.spec.concepts, dtype=torch.bool, device=dev)
    rows_ok = np.repeat(images, st.tokens_per_image)
    for c in range(st.n_chunks):
        r0, r1 = st.chunk_rows(c)
        sel = rows_ok[r0:r1]
        if not sel.any():
            continue
        chunk = [torch.from_numpy(st.read_chunk(k, c)[sel]) for k in keys]
        for b0 in range(0, int(sel.sum()), batch_tokens):
            x = [model.standardize(j, a[b0 : b0 + batch_tokens].to(dev).float()) for j, a in enumerate(chunk)]
            cnt += x[0].shape[0]
            for j in range(n_m):
                s1[j] += float(x[j].double().sum())
                s2[j] += float(x[j].double().square().sum())
            for i in range(n_m):
                with torch.autocast(dev.type, dtype=amp) if amp is not None else nullcontext():
                    h = model.encoders[i](x[i])
                pre = model.bns[i](h.float())  # eval mode: running statistics
                vals, idx = torch.topk(F.relu(pre), model.spec.k, dim=1, sorted=False)
                codes = Codes(vals, idx, pre)
                pos = codes.values_bk > 0
                l0[i] += float(pos.sum())
                fired[codes.indices_bk[pos]] = True
                for j in [i] if model.spec.independent else range(n_m):
                    sse[i, j] += float((x[j] - model.decode(j, codes)).double().square().sum())
    model.train(was_training)
    if cnt == 0:
        nan = np.full((n_m, n_m), np.nan)
        return EvalResult(nan, np.full(n_m, np.nan), float("nan"), 0)
    d = np.asarray(model.spec.widths, dtype=np.float64)
    var = s2 / (cnt * d) - (s1 / (cnt * d)) ** 2
    r2 = 1 - (sse / (cnt * d[None, :])) / var[None, :]
    if model.spec.independent:
        r2[~np.eye(n_m, dtype=bool)] = np.nan
    return EvalResult(r2, l0 / cnt, float(1 - fired.float().mean()), cnt)


# ---------------------------------------------------------------- the run
class TrainResult(NamedTuple):
    run_dir: Path
    steps: int
    """Steps done in total."""
    loss: float
    """Loss of the last step."""
    metrics: dict
    """The final metrics.json content."""


def _read_config(paths: RunPaths) -> dict:
    try:
        obj = json.loads(paths.config.read_text())
    except FileNotFoundError:
        raise TrainError(f"{paths.root} is not a usae run directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{paths.config} is not valid JSON ({e})") from None
    if obj.get("schema_version") != CONFIG_SCHEMA_VERSION:
        raise TrainError(f"{paths.config} has schema_version {obj.get('schema_version')!r}, expected 1")
    return obj


def resolve_run(cfg: TrainConfig) -> tuple[TrainConfig, RunPaths, bool]:
    """(config to use, paths, resuming?). --resume takes the run's own config."""
    if cfg.resume:
        paths = RunPaths(Path(cfg.resume))
        stored = TrainConfig.from_dict(_read_config(paths)["train"])
        return replace(stored, resume=cfg.resume, out=cfg.resume, stop_after=cfg.stop_after), paths, True
    if not cfg.out:
        raise TrainError("give --out RUN (a new run directory) or --resume RUN")
    paths = RunPaths(Path(cfg.out))
    if paths.config.exists():
        raise TrainError(f"{paths.root} already holds a run; continue it with --resume {paths.root} or pick another --out")
    return cfg, paths, False


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_config(paths: RunPaths, cfg: TrainConfig, spec: ModelSpec, st: Store) -> None:
    train = replace(cfg, resume="", stop_after=0).to_dict()
    store = {"path": str(st.path), "fingerprint": st.attrs.get("fingerprint"), "backbones": list(st.backbones)}
    paths.root.mkdir(parents=True, exist_ok=True)
    _write_json(paths.config, {"schema_version": CONFIG_SCHEMA_VERSION, "train": train,
                               "model": spec.to_dict(), "store": store})


def new_state(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = USAE(spec).to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(spec.backbones)
    return TrainState(model, make_optimizer(model, cfg), gen, 0, [0] * n, 0,
                      torch.zeros(n, spec.concepts, dtype=torch.long, device=device), [None] * n)


def save_state(paths: RunPaths, s: TrainState, loader) -> None:
    """Atomic checkpoint; a failed write (disk full...) leaves the previous one intact."""
    rng = {"gen": s.gen.get_state(), "torch": torch.get_rng_state(), "last_fired": s.last_fired_mt.cpu()}
    js = {"step": s.step, "tokens": s.tokens, "group_steps": s.group_steps, "self_r2": s.self_r2, "log_loss": s.log_loss,
          "loader": loader.state_dict()}
    try:
        ckpt.save_checkpoint(paths.checkpoint, s.model.state_dict(), s.opt.state_dict(), rng, js)
    except OSError as e:
        raise TrainError(
            f"could not write the checkpoint at step {s.step} ({e}); the previous checkpoint in "
            f"{paths.checkpoint} is intact, resume from it with --resume {paths.root}"
        ) from None


def restore_state(paths: RunPaths, s: TrainState, loader) -> None:
    c = ckpt.load_checkpoint(paths.checkpoint)
    try:
        s.model.load_state_dict(c.model)
        s.opt.load_state_dict(c.optim)
        s.gen.set_state(c.rng["gen"])
        torch.set_rng_state(c.rng["torch"])
        s.last_fired_mt.copy_(c.rng["last_fired"])
        s.step, s.tokens = int(c.state["step"]), int(c.state["tokens"])
        s.group_steps, s.self_r2 = list(c.state["group_steps"]), list(c.state["self_r2"])
        s.log_loss = [float(v) for v in c.state["log_loss"]]
        loader.load_state_dict(c.state["loader"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"checkpoint in {paths.checkpoint} does not fit this run ({e})") from None


def _trim_metrics(paths: RunPaths, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not paths.metrics_jsonl.exists():
        return
    lines = [ln for ln in paths.metrics_jsonl.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    paths.metrics_jsonl.write_text("".join(ln + "\n" for ln in keep))


class _Logger:
    """Accumulates per-step numbers and appends one JSON line per log interval (rank 0)."""

    def __init__(self, paths: RunPaths, keys: Sequence[str], cfg: TrainConfig, enabled: bool):
        self.paths, self.keys, self.cfg, self.enabled = paths, list(keys), cfg, enabled
        self.t0, self.tok0 = time.perf_counter(), 0

    def start(self, tokens: int) -> None:
        self.t0, self.tok0 = time.perf_counter(), tokens

    def log(self, s: TrainState, out: StepOut, epoch: int) -> dict | None:
        s.log_loss[0] += out.loss
        s.log_loss[1] += 1
        for p, i in zip(out.parts, out.sources, strict=True):
            pos = p.codes.values_bk > 0
            s.last_fired_mt[i, p.codes.indices_bk[pos]] = s.tokens
            if p.r2_j is not None:
                s.self_r2[i] = float(p.r2_j[0 if self.cfg.independent else i])
        if out.parts[0].r2_j is None:
            return None
        line = self._line(s, out, epoch)
        if self.enabled:
            with open(self.paths.metrics_jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")
        s.log_loss = [0.0, 0.0]
        self.start(s.tokens)
        return line

    def _line(self, s: TrainState, out: StepOut, epoch: int) -> dict:
        keys, window = self.keys, self.cfg.dead_window_tokens
        if self.cfg.independent:
            rec = {keys[i]: float(p.rec_j[0]) for i, p in zip(out.sources, out.parts, strict=True)}
            aux = {keys[i]: float(p.aux_j[0]) for i, p in zip(out.sources, out.parts, strict=True)}
            r2 = {keys[i]: float(p.r2_j[0]) for i, p in zip(out.sources, out.parts, strict=True)}
            dead = float(((s.tokens - s.last_fired_mt) >= window).float().mean())
            l0 = float(np.mean([float((p.codes.values_bk > 0).sum(1).float().mean()) for p in out.parts]))
        else:
            p = out.parts[0]
            rec = {k: float(v) for k, v in zip(keys, p.rec_j, strict=True)}
            aux = {k: float(v) for k, v in zip(keys, p.aux_j, strict=True)}
            r2 = {k: float(v) for k, v in zip(keys, p.r2_j, strict=True)}
            dead = float(((s.tokens - s.last_fired_mt.max(0).values) >= window).float().mean())
            l0 = float((p.codes.values_bk > 0).sum(1).float().mean())
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "step": s.step, "epoch": epoch, "tokens": s.tokens, "loss": s.log_loss[0] / max(s.log_loss[1], 1),
            "source": [keys[i] for i in out.sources], "rec": rec, "aux": aux, "r2_from_source": r2,
            "self_r2": dict(zip(keys, s.self_r2, strict=True)), "l0": l0, "dead_fraction": dead,
            "lr": dict(zip(keys, out.lrs, strict=True)), "tokens_per_s": (s.tokens - self.tok0) / dt,
        }


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


def _loop(cfg: TrainConfig, s: TrainState, ctx: StepContext, loader, st: Store, keys: list[str],
          paths: RunPaths, rank0: bool, train_images: np.ndarray) -> float:
    """Steps until cfg.steps; checkpoints every cfg.ckpt_every; returns the last loss."""
    logger = _Logger(paths, keys, cfg, rank0)
    it, last = iter(loader), float("nan")
    dev = next(s.model.parameters()).device
    with _progress(rank0) as bar:
        task = bar.add_task("train", total=ctx.total_steps, completed=s.step, info="")
        logger.start(s.tokens)
        while s.step < ctx.total_steps:
            batch = next(it)
            check_finite(st, keys, batch.acts, train_images, ctx.world)
            x = [s.model.standardize(j, a.to(dev, non_blocking=True).float()) for j, a in enumerate(batch.acts)]
            epoch = int(batch.epoch)
            del batch  # dropped before the step: the loader can refill the same, cache-warm buffers
            want = (s.step + 1) % cfg.log_every == 0 or s.step + 1 == ctx.total_steps
            try:
                out = train_step(s, ctx, x, with_r2=want)
            except TrainError as e:
                where = f"the last good checkpoint is in {paths.checkpoint}" if paths.checkpoint.exists() \
                    else "no checkpoint was written yet"
                raise TrainError(f"{e}; training stopped, {where}") from None
            last = out.loss
            line = logger.log(s, out, epoch)
            if line is not None:
                bar.update(task, info=f"loss {line['loss']:.4f} L0 {line['l0']:.1f}")
            bar.update(task, completed=s.step)
            if cfg.ckpt_every and s.step % cfg.ckpt_every == 0 and s.step < ctx.total_steps:
                _checkpoint(paths, s, loader, rank0, ctx.world)
            if cfg.stop_after and s.step >= cfg.stop_after:
                raise SimulatedKill(f"stopped at step {s.step} (stop_after)")
    return last


def _checkpoint(paths: RunPaths, s: TrainState, loader, rank0: bool, world: int) -> None:
    if rank0:
        save_state(paths, s, loader)
    if world > 1:
        dist.barrier()


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train a USAE on a store; writes the run directory (see docs/contracts.md)."""
    d = init_distributed(cfg.device)
    try:
        return _run(cfg, d)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, d: Dist) -> TrainResult:
    cfg, paths, resuming = resolve_run(cfg)
    st, keys = open_store(cfg)
    train_images, held_images = image_masks(st, cfg.holdout)
    if not train_images.any():
        raise TrainError("no training images left (all invalid or held out)")
    loader = make_loader(st, keys, cfg, train_images, d)
    try:
        return _train(cfg, d, st, keys, loader, paths, resuming, train_images, held_images)
    finally:
        loader.close()


def _train(cfg: TrainConfig, d: Dist, st: Store, keys: list[str], loader, paths: RunPaths, resuming: bool,
           train_images: np.ndarray, held_images: np.ndarray) -> TrainResult:
    spec = model_spec(st, keys, cfg)
    per_epoch = int(loader.batches_per_epoch)
    if per_epoch < 1:
        raise TrainError(f"the training images hold fewer tokens than one batch of {cfg.batch_tokens}")
    total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else per_epoch
    cfg = replace(cfg, backbones=tuple(keys), concepts=spec.concepts, steps=total, warmup_steps=warmup)
    rank0 = d.rank == 0
    if resuming:
        _check_same_store(paths, st)
    elif rank0:
        write_config(paths, cfg, spec, st)
    s = new_state(spec, cfg, d.device)
    if resuming and rank0:
        ckpt.remove_stale_temporaries(paths.checkpoint)
    if resuming and (paths.checkpoint.exists() or paths.checkpoint.with_name("checkpoint.old").exists()):
        restore_state(paths, s, loader)
        if rank0:
            _trim_metrics(paths, s.step)
    elif resuming and rank0:
        _trim_metrics(paths, 0)
    ctx = StepContext(cfg, total, warmup, d.world, amp_dtype(cfg.dtype, d.device))
    if cfg.dtype == "bf16" and ctx.amp is None and rank0:
        warnings.warn(f"{d.device} has no fast bf16 support: training in fp32", stacklevel=2)
    last = _loop(cfg, s, ctx, loader, st, keys, paths, rank0, train_images)
    metrics: dict = {}
    if rank0:
        _checkpoint(paths, s, loader, True, 1)
        _save_weights(paths, s.model)
        metrics = _final_metrics(s, st, keys, held_images, cfg, ctx, last)
        _write_json(paths.metrics_json, metrics)
    if d.world > 1:
        dist.barrier()
    return TrainResult(paths.root, s.step, last, metrics)


def _check_same_store(paths: RunPaths, st: Store) -> None:
    want = _read_config(paths)["store"].get("fingerprint")
    if want != st.attrs.get("fingerprint"):
        raise TrainError(f"the store {st.path} is not the one this run was trained on (fingerprint {want})")


def _save_weights(paths: RunPaths, model: USAE) -> None:
    from safetensors.torch import save_file

    tmp = paths.model.with_name(f".{paths.model.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, paths.model)


def _final_metrics(s: TrainState, st: Store, keys: list[str], held: np.ndarray, cfg: TrainConfig,
                   ctx: StepContext, last: float) -> dict:
    ev = evaluate(s.model, st, keys, held, cfg.batch_tokens, ctx.amp)
    def clean(x: float) -> float | None:
        return None if not math.isfinite(x) else float(x)
    return {
        "steps": s.step, "tokens": s.tokens, "train_loss_last": clean(last), "backbones": keys,
        "heldout_images": int(held.sum()), "heldout_tokens": ev.tokens,
        "r2_matrix": [[clean(v) for v in row] for row in ev.r2_ij],
        "self_r2": {k: clean(ev.r2_ij[i, i]) for i, k in enumerate(keys)},
        "l0": {k: clean(ev.l0_i[i]) for i, k in enumerate(keys)},
        "dead_fraction": clean(ev.dead),
    }


def print_metrics(metrics: dict) -> None:
    """The held-out cross-model R2 matrix as a table (rows: source codes, columns: target)."""
    from rich.console import Console
    from rich.table import Table

    keys = metrics["backbones"]
    t = Table(title=f"held-out R2 ({metrics['heldout_tokens']} tokens; row = codes from, column = reconstructed)")
    t.add_column("from \\ to")
    for k in keys:
        t.add_column(k, justify="right")
    for k, row in zip(keys, metrics["r2_matrix"], strict=True):
        t.add_row(k, *("-" if v is None else f"{v:.3f}" for v in row))
    Console().print(t)
