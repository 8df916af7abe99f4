"""A run's training state <-> its checkpoint: model, optimiser, schedule, RNGs and counters.

Everything that changes while training lives in `TrainState`, and all of it is checkpointed,
so a resumed run continues bit for bit (fp32 on CPU). The optimiser is one AdamW with one
parameter group per backbone, which is the same as one AdamW per backbone (AdamW is
per-parameter), and lets the reference mode step and schedule each backbone alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from usae.trainer import checkpoint as ckpt
from usae.trainer.config import TrainConfig, TrainError
from usae.trainer.model import USAE, ModelSpec


@dataclass
class TrainState:
    """Everything that changes during training (all of it is checkpointed)."""

    model: USAE
    opt: torch.optim.AdamW
    gen: torch.Generator
    """Draws the source backbone of each step (same seed on every rank)."""
    step: int = 0
    group_steps: list[int] = field(default_factory=list)
    """Schedule position of each backbone (reference mode: advances only when picked)."""
    tokens: int = 0
    """Global training tokens seen."""
    last_fired_mt: Tensor | None = None
    """(M, m) token count at which each concept was last selected from backbone i."""
    self_r2: list[float | None] = field(default_factory=list)
    """Latest training-batch R2 of each backbone from its own codes."""
    log_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """Sum and count of step losses since the last metrics line."""


class RowAdamW(torch.optim.Optimizer):
    """AdamW whose second moment is shared along a parameter's channel axis, so the update of
    a backbone's parameters does not depend on the basis of its activations.

    Each parameter has a kind (the group's "moments", parallel to its params):
    "row"   (m, d): one second moment per row (concept), the mean of g^2 over its d channels;
    "all"   (d,):   one second moment for the whole vector (the decoder bias);
    "coord" any:    per coordinate, as AdamW (concept-indexed vectors: biases, BN, gains).
    Under x -> x Q (Q orthogonal) a backbone's gradients are the old ones times Q, their row
    norms unchanged, so the update is the old one times Q (AdamW's per-channel moments are not).
    Update, bias-corrected as AdamW's: p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)."""

    def __init__(self, groups, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 (no closure: the trainer calls step() alone)
        for g in self.param_groups:
            b1, b2 = g["betas"]
            kinds = g.get("moments") or ["coord"] * len(g["params"])
            for p, kind in zip(g["params"], kinds, strict=True):
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    shape = {"row": (p.shape[0], 1), "all": (1,) * p.dim()}.get(kind, p.shape)
                    st["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                st["step"] += 1
                t = float(st["step"])
                grad = p.grad
                g2 = grad.square()
                if kind == "row":
                    g2 = g2.mean(dim=1, keepdim=True)
                elif kind == "all":
                    g2 = g2.mean().reshape(st["exp_avg_sq"].shape)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).add_(g2, alpha=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(g["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / (1 - b1**t))


def make_optimizer(model: USAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """One parameter group per backbone (= one optimiser per backbone): AdamW, or `RowAdamW`
    (cfg.optimizer) with per-concept second moments for the encoder and decoder rows."""
    groups = []
    for j in range(model.n_models):
        enc, bn = model.encoders[j], model.bns[j]
        params = [enc.weight, enc.bias, bn.weight, bn.bias, model.decoders[j]]
        moments = ["row", "coord", "coord", "coord", "row"]
        if model.spec.gains:
            params.append(model.gains[j])
            moments.append("coord")
        if model.spec.decoder_bias:
            params.append(model.dec_bias[j])
            moments.append("all")
        group = {"params": params, "lr": cfg.lr}
        if cfg.optimizer_name() == "rowadamw":
            group["moments"] = moments
        groups.append(group)
    if cfg.optimizer_name() == "rowadamw":
        return RowAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(
    t: int, total: int, warmup: int, lr: float, lr_min: float, schedule: str = "cosine"
) -> float:
    """Linear warm-up over `warmup` steps, then
    cosine: cosine decay from lr to lr_min at step `total` (the paper's);
    tail: constant lr, then a linear decay to 0 over the last 10% of the steps (short runs:
    a cosine spends most of a short run at a fraction of the peak)."""
    if t < warmup:
        return lr * (t + 1) / warmup
    if schedule == "tail":
        span = max(1, total // 10)
        return lr * min(1.0, max(0.0, (total - t) / span))
    p = min(1.0, (t - warmup) / max(1, total - warmup))
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * p))


def new_state(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = USAE(spec).to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(spec.backbones)
    dead = torch.zeros(n, spec.concepts, dtype=torch.long, device=device)
    return TrainState(model, make_optimizer(model, cfg), gen, 0, [0] * n, 0, dead, [None] * n)


def save_state(ckpt_dir: Path, s: TrainState, loader, resume_hint: str) -> None:
    """Atomic checkpoint; a failed write (disk full...) leaves the previous one intact."""
    rng = {
        "gen": s.gen.get_state(),
        "torch": torch.get_rng_state(),
        "last_fired": s.last_fired_mt.cpu(),
    }
    js = {
        "step": s.step,
        "tokens": s.tokens,
        "group_steps": s.group_steps,
        "self_r2": s.self_r2,
        "log_loss": s.log_loss,
        "loader": loader.state_dict(),
    }
    try:
        ckpt.save_checkpoint(ckpt_dir, s.model.state_dict(), s.opt.state_dict(), rng, js)
    except OSError as e:
        raise TrainError(
            f"could not write the checkpoint at step {s.step} ({e}); the previous checkpoint in "
            f"{ckpt_dir} is intact, resume from it with {resume_hint}"
        ) from None


def restore_state(ckpt_dir: Path, s: TrainState, loader) -> None:
    c = ckpt.load_checkpoint(ckpt_dir)
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
        raise ckpt.CheckpointError(
            f"checkpoint in {ckpt_dir} does not fit this run ({e})"
        ) from None
