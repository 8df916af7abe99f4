"""Standardised tokens of the backbones -> one source backbone's loss (the step's objective).

For source backbone i with TopK codes Z and targets j (docs/method.md, section 3):

    sum over j of  rec(x_j, Z D_j) + aux_weight * rec(x_j - Z D_j, A D_j)

where A keeps the top m/2 of the non-selected positive pre-activations ReLU(pre) - Z. The
gradient flows through the residual and through A into the encoder (no detach).

Implementation: the sparse reconstruction Z D is one embedding_bag over the k selected rows of
the concatenated decoders (one gather for all targets); the aux codes are half dense, so they
are found by selection (kthvalue, not a sort) and decoded with one matmul (bf16 when asked)
against the same concatenation. Tests compare all of it with a slow dense float64 version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from usae.trainer.model import USAE, Codes


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
    the sums of `r2_sums`, turned into R2 over the global batch by train_step)."""
    codes: Codes
    """The source's codes."""
    agree: Tensor | None = None
    """Code agreement with the partner backbone (detached; None without one)."""


def batch_norm_local(bn: nn.BatchNorm1d, h_bm: Tensor, track: bool = True) -> Tensor:
    """Training-mode BatchNorm over this process's batch; `track` updates the running statistics
    (False: a second pass of the same encoder in one step, which must not count twice)."""
    if not track:
        return F.batch_norm(h_bm, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    bn.num_batches_tracked.add_(1)
    return F.batch_norm(
        h_bm, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps
    )


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
        pos = torch.count_nonzero(act_bm, dim=1) - torch.count_nonzero(
            act_bm.gather(1, idx_bk), dim=1
        )
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
    def forward(
        ctx, act_bm: Tensor, dec_md: Tensor, sel: AuxSelection, dtype: torch.dtype
    ) -> Tensor:
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


def r2_sums(x_bd: Tensor, resid_bd: Tensor) -> Tensor:
    """(sum resid^2, sum x, sum x^2, n) in float64: R2 sums that add up over ranks."""
    x = x_bd.double()
    return torch.stack(
        [
            resid_bd.double().square().sum(),
            x.sum(),
            x.square().sum(),
            torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
        ]
    )


def r2_from_sums(s_4: Tensor) -> Tensor:
    n = s_4[3]
    return 1 - (s_4[0] / n) / (s_4[2] / n - (s_4[1] / n).square())


def source_loss(
    model: USAE,
    i: int,
    x_list: Sequence[Float[Tensor, "b _"]],
    targets: Sequence[int],
    *,
    loss: str,
    aux_weight: float,
    detach: Sequence[int] = (),
    bn_fn: Callable[..., Tensor] = batch_norm_local,
    amp: torch.dtype | None = None,
    with_r2: bool = False,
    aux: str = "paper",
    dead_m: Tensor | None = None,
    targets_mean: bool = False,
    partner: int | None = None,
    agree_weight: float = 0.0,
) -> LossParts:
    """Loss of one source backbone i over the target backbones (standardised inputs x_list).

    detach: targets whose decoders get no gradient (the reference update's other backbones).
    amp: autocast dtype for the encoder and aux matmuls (None: fp32).
    aux: "paper" (the top m/2 non-selected codes rebuild the residual, gradient through both)
    or "dead" (`dead_aux`: AuxK over the dead concepts `dead_m` only, as in Gao et al.).
    targets_mean: the loss is the mean over the targets instead of their sum (the fidelity
    recipe: one learning rate then fits any number of backbones).
    partner: a second backbone that encodes the same rows; the loss adds agree_weight times the
    `code_agreement` of the two codes (not divided by the targets).
    """
    dev = x_list[i].device.type
    ac = torch.autocast(dev, dtype=amp) if amp is not None else nullcontext()
    with ac:
        h_bm = model.encoders[i](model.encoder_input(i, x_list[i]))
    pre_bm = bn_fn(model.bns[i], h_bm.to(x_list[i].dtype))
    act_bm = F.relu(pre_bm)
    vals_bk, idx_bk = torch.topk(act_bm, model.spec.k, dim=1, sorted=False)
    dec = [model.decoder_weight(j) for j in targets]
    dec = [w.detach() if j in detach else w for j, w in zip(targets, dec, strict=True)]
    d_cat = torch.cat(dec, dim=1) if len(dec) > 1 else dec[0]
    xhat = F.embedding_bag(idx_bk, d_cat, per_sample_weights=vals_bk, mode="sum")
    if model.spec.decoder_bias:  # detached targets: their bias gets no gradient either
        bias = [model.bias(j).detach() if j in detach else model.bias(j) for j in targets]
        xhat = xhat + torch.cat(bias)
    x_cat = (
        torch.cat([x_list[j] for j in targets], dim=1) if len(targets) > 1 else x_list[targets[0]]
    )
    resid = x_cat - xhat
    if aux == "dead":
        aux_err = resid.detach() - dead_aux(act_bm, idx_bk, d_cat, dead_m, model.spec.concepts // 2)
    else:
        sel = aux_selection(act_bm, idx_bk, model.spec.concepts // 2)
        auxhat = _AuxDecode.apply(act_bm, d_cat, sel, amp or act_bm.dtype)
        aux_err = resid - auxhat.to(resid.dtype)
    widths = [x_list[j].shape[1] for j in targets]
    rec_j = [_err(r, loss) for r in resid.split(widths, dim=1)]
    aux_j = [_err(a, loss) for a in aux_err.split(widths, dim=1)]
    total = torch.stack(rec_j).sum() + aux_weight * torch.stack(aux_j).sum()
    if targets_mean:
        total = total / len(targets)
    agree = None
    if partner is not None:
        agree = code_agreement(model, i, partner, act_bm, x_list[partner], bn_fn=bn_fn, amp=amp)
        total = total + agree_weight * agree
        agree = agree.detach()
    r2 = None
    if with_r2:
        with torch.no_grad():
            r2 = [
                r2_sums(x_list[j], r)
                for j, r in zip(targets, resid.detach().split(widths, dim=1), strict=True)
            ]
    codes = Codes(vals_bk.detach(), idx_bk, pre_bm.detach())
    return LossParts(
        total, [r.detach() for r in rec_j], [a.detach() for a in aux_j], r2, codes, agree
    )


def dead_aux(
    act_bm: Tensor, idx_bk: Tensor, d_cat: Tensor, dead_m: Tensor | None, k_aux: int
) -> Tensor:
    """AuxK over dead concepts (Gao et al. 2024): the decode of the k_aux largest positive
    pre-activations among the concepts in `dead_m` (not selected by TopK), which the caller
    fits to the DETACHED residual, so only those concepts learn from it. Only the dead
    concepts' columns are read: one (b, n_dead) @ (n_dead, d) product (a top-k_aux among them
    only when more than k_aux are dead), instead of the paper's masked dense decode over every
    concept. Zero when none is dead."""
    n_dead = 0 if dead_m is None else int(dead_m.sum())
    if n_dead == 0:
        return torch.zeros(act_bm.shape[0], d_cat.shape[1], dtype=d_cat.dtype, device=act_bm.device)
    dead_c = dead_m.nonzero().squeeze(1)
    selected = torch.zeros_like(act_bm, dtype=torch.bool).scatter_(1, idx_bk, True)
    cand = act_bm.index_select(1, dead_c).masked_fill(selected.index_select(1, dead_c), 0)
    if n_dead > k_aux:
        vals, pos = torch.topk(cand, k_aux, dim=1, sorted=False)
        cand = torch.zeros_like(cand).scatter(1, pos, vals)
    return cand.to(d_cat.dtype) @ d_cat.index_select(0, dead_c)


def merge_parts(parts: Sequence[LossParts], weights: Sequence[float]) -> LossParts:
    """Sources that each encoded a share of the batch -> one part over the whole batch (for the
    metrics line): losses weighted by the shares, R2 sums added, codes stacked."""
    rec = [
        sum(w * p.rec_j[t] for p, w in zip(parts, weights, strict=True))
        for t in range(len(parts[0].rec_j))
    ]
    aux = [
        sum(w * p.aux_j[t] for p, w in zip(parts, weights, strict=True))
        for t in range(len(parts[0].aux_j))
    ]
    r2 = None
    if parts[0].r2_j is not None:
        r2 = [sum(p.r2_j[t] for p in parts) for t in range(len(parts[0].r2_j))]
    codes = Codes(*(torch.cat([getattr(p.codes, f) for p in parts]) for f in Codes._fields))
    loss = sum(w * p.loss for p, w in zip(parts, weights, strict=True))
    agree = None
    if parts[0].agree is not None:
        agree = sum(w * p.agree for p, w in zip(parts, weights, strict=True))
    return LossParts(loss, rec, aux, r2, codes, agree)


AGREE_GAIN = (0.3, 0.6)
"""Agreement weight of a concept from its gain ratio r = min/max of the two backbones' gains:
0 up to r = 0.3, rising linearly to 1 at r = 0.6 (membership calls a backbone a member from
r = 0.25, `usae.analysis.membership.GAIN_RATIO`; planted non-members end below ~0.28)."""
AGREE_RAMP = 0.1
"""Fraction of the steps over which the agreement rises from 0 to its weight."""
AGREE_TOP = 2
"""The agreement covers the union of each code's top AGREE_TOP x k activations: the k concepts it
fires and the next k, so a concept at the edge of TopK (one that one encoder fires and the other
ranks just below its k-th) is pulled into agreement before it fires from one encoder only."""


def agreement_ramp(step: int, total: int, start: float) -> float:
    """Multiplier of the agreement weight at `step` of `total`: 0 before `start` x total steps
    (the gains must first tell members from non-members: every gain starts equal), then rising
    linearly to 1 over the next AGREE_RAMP x total steps. 0 while `total` is unresolved (0)."""
    if total <= 0:
        return 0.0
    return min(max((step / total - start) / AGREE_RAMP, 0.0), 1.0)


def agreement_weights(model: USAE, i: int, j: int) -> Tensor:
    """(m,) how much each concept must fire alike from backbones i and j, from the ratio of their
    gains (detached) through AGREE_GAIN: a concept the gains call absent from one of the two is
    not pulled into it (0), one they call present in both is pulled fully (1); ones without
    gains."""
    if not model.spec.gains:
        return torch.ones(model.spec.concepts, device=model.decoders[i].device)
    with torch.no_grad():
        gi, gj = model.gain(i), model.gain(j)
        r = torch.minimum(gi, gj) / torch.maximum(gi, gj).clamp_min(1e-12)
        lo, hi = AGREE_GAIN
        return ((r - lo) / (hi - lo)).clamp(0, 1)


def code_agreement(
    model: USAE,
    i: int,
    j: int,
    act_i_bm: Tensor,
    x_j_bd: Tensor,
    *,
    bn_fn: Callable[..., Tensor] = batch_norm_local,
    amp: torch.dtype | None = None,
) -> Tensor:
    """Code agreement of source i with partner j on the same tokens (docs/method.md section 8):

        mean over tokens of  (1/k) sum over c in S_i u S_j of  w_c |a_ic - a_jc|

    a = ReLU(BN(W x + b)) of each backbone's own activations of the token (the partner's BN on
    batch statistics, its running statistics untouched), S the indices of each code's top
    AGREE_TOP x k activations, w `agreement_weights`.
    Both encoders get the gradient: a concept that one selects and the other does not is pulled
    up in the one and down in the other, so two learned copies of one concept (each fired by a
    different backbone) cannot both survive, and identical backbones come to fire identically."""
    dev = x_j_bd.device.type
    ac = torch.autocast(dev, dtype=amp) if amp is not None else nullcontext()
    with ac:
        h_bm = model.encoders[j](model.encoder_input(j, x_j_bd))
    act_j = F.relu(bn_fn(model.bns[j], h_bm.to(x_j_bd.dtype), track=False))
    k = model.spec.k
    with torch.no_grad():
        top = min(AGREE_TOP * k, act_j.shape[1])
        idx_i = torch.topk(act_i_bm.detach(), top, dim=1, sorted=False).indices
        idx_j = torch.topk(act_j, top, dim=1, sorted=False).indices
        mask = torch.zeros_like(act_j).scatter_(1, idx_i, 1.0).scatter_(1, idx_j, 1.0)
        mask.mul_(agreement_weights(model, i, j))
    return ((act_i_bm - act_j).abs() * mask).sum() / (act_j.shape[0] * k)
