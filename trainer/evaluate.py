"""Store rows + trained USAE -> cross-model reconstruction (R2, per-channel R2, MSE, L0), streamed.

The one streaming reconstruction routine of the project: the trainer's held-out evaluation
calls ``stream_reconstruction``; the analysis pass composes ``ReconstructionAccumulator`` into
its own one-pass accumulator, so both report the same numbers from the same sums. The
definitions are those of docs/method.md (metrics): R2 of backbone j rebuilt from backbone i's
codes is 1 - mean((x - x_hat)^2) / mean((x - mean(x))^2) with a SCALAR mean(x), on
standardised activations, BatchNorm in eval mode.

Memory does not depend on the number of tokens: every batch is folded into float64/int64
sums whose size depends on the model only (widths, backbones, concepts).

Tensor names carry shape suffixes: b tokens of a batch, d width, D all widths side by side,
k top-k, m concepts, M backbones, n images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from usae.pipeline.store import Store
from usae.trainer.model import STD_EPS, USAE, Codes


# ---------------------------------------------------------------- reading and encoding
def iter_batches(
    store: Store, keys: Sequence[str], image_mask_n: np.ndarray, batch_tokens: int
) -> Iterator[tuple[int, list[Tensor], Tensor, bool]]:
    """Yield (chunk, rows of each backbone as float16 tensors, local image index per row, last).

    Reads each chunk once per backbone (direct file read), keeps the rows of the selected
    images only and slices them into batches of at most ``batch_tokens`` rows; ``last`` marks
    the final batch of a chunk so callers can merge per-chunk state.
    """
    t = store.tokens_per_image
    for ci in range(store.n_chunks):
        a, b = store.chunk_images_range(ci)
        img_mask = image_mask_n[a:b]
        if not img_mask.any():
            continue
        row_mask = np.repeat(img_mask, t)
        local_img = np.repeat(np.arange(b - a), t)[row_mask]
        chunk = [torch.from_numpy(store.read_chunk(k, ci)[row_mask]) for k in keys]
        rows = chunk[0].shape[0]
        starts = list(range(0, rows, batch_tokens))
        for s in starts:
            e = min(s + batch_tokens, rows)
            yield ci, [c[s:e] for c in chunk], torch.from_numpy(local_img[s:e]), s == starts[-1]


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the inputs and error terms: float64 in float64 mode, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_model(model: USAE, dtype: torch.dtype, device: str | torch.device) -> USAE:
    """Move the model (in place) to device/dtype, eval mode; mu/sigma stay at >= float32."""
    model = model.to(device=device, dtype=dtype).eval()
    model.mu = model.mu.to(exact_dtype(dtype))
    model.sigma = model.sigma.to(exact_dtype(dtype))
    return model


def encode_batch(
    model: USAE, acts: Sequence[Tensor], dtype: torch.dtype
) -> tuple[Tensor, list[Codes]]:
    """Raw activations of each backbone -> standardised inputs side by side (b, D) in float32
    (float64 in float64 mode) and the TopK codes of each backbone (eval mode).

    ``model`` must already be in ``dtype`` except its mu/sigma buffers (``prepare_model``).
    Standardisation is ``model.standardize``'s formula, written into column slices of one
    buffer so the error sums can read row blocks of all backbones without a copy.
    """
    b = acts[0].shape[0]
    x_bD = torch.empty(b, sum(model.spec.widths), dtype=exact_dtype(dtype), device=acts[0].device)
    codes, off = [], 0
    for i, a_bd in enumerate(acts):
        x_bd = x_bD[:, off : off + a_bd.shape[1]]
        off += a_bd.shape[1]
        x_bd.copy_(a_bd).sub_(model.mu[i]).div_(model.sigma[i] + STD_EPS)
        codes.append(model.encode(i, x_bd.to(dtype)))
    return x_bD, codes


def colsum64(v_bd: Tensor, block: int = 64) -> Tensor:
    """Column sums as float64. In float32, rows are first summed in float32 blocks of ``block``
    (a few ulps of float32, far below the model's own rounding) and the block sums in float64:
    converting every element to float64 would cost more than the rest of the metrics."""
    if v_bd.dtype == torch.float64:
        return v_bd.sum(0)
    b, d = v_bd.shape
    nb = b // block
    out = v_bd[: nb * block].reshape(nb, block, d).sum(1).to(torch.float64).sum(0)
    if b > nb * block:
        out += v_bd[nb * block :].to(torch.float64).sum(0)
    return out


def decodes(spec, i: int, j: int) -> bool:
    """Codes of backbone i decode into backbone j (independent runs: only i == j)."""
    return i == j or not spec.independent


# ---------------------------------------------------------------- sums and their accumulator
@dataclass
class ReconstructionSums:
    """Raw streaming sums (float64 / int64) the reconstruction metrics are derived from."""

    n_tokens: int
    """Tokens evaluated (each seen by every backbone)."""
    sum_x: list[np.ndarray]
    """Per target backbone j: sum over tokens of standardised x_j, per channel (d_j,)."""
    sum_x2: list[np.ndarray]
    """Per target backbone j: sum over tokens of x_j^2, per channel (d_j,)."""
    sse: list[list[np.ndarray | None]]
    """sse[i][j]: per-channel sum of squared errors of x_j rebuilt from codes of i (None: not decoded)."""
    active: np.ndarray
    """(M,) number of nonzero codes per backbone (for L0)."""


class ReconstructionAccumulator:
    """Folds encoded batches into ``ReconstructionSums``; torch tensors on the model's device.

    Speed: codes of backbone i decode into all its targets with ONE embedding_bag over the
    concatenated decoders, in the model's compute dtype (bf16 gathers are ~5x faster than
    float32 on CPU); errors are taken against the float32/64 inputs and squared in place, in
    row blocks that stay in the CPU cache.
    """

    rows = 256
    """Rows per block of the error sums: small enough for the CPU cache."""

    def __init__(self, model: USAE, device: torch.device, track_alive: bool = False):
        spec = model.spec
        self.n_models, self.widths = len(spec.widths), list(spec.widths)
        compute = next(model.parameters()).dtype
        self.targets = [
            [j for j in range(self.n_models) if decodes(spec, i, j)] for i in range(self.n_models)
        ]
        with torch.no_grad():
            dec = [model.decoder_weight(j).detach().to(compute) for j in range(self.n_models)]
        self.dec_cat = [torch.cat([dec[j] for j in t], dim=1).contiguous() for t in self.targets]
        self.bias_cat = None
        if spec.decoder_bias:  # x_hat_j = Z D_j + b_j
            with torch.no_grad():
                self.bias_cat = [
                    torch.cat([model.bias(j).detach().to(compute) for j in t]) for t in self.targets
                ]
        f64 = dict(dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.sum_x = torch.zeros(sum(self.widths), **f64)
        self.sum_x2 = torch.zeros(sum(self.widths), **f64)
        self.sse = [torch.zeros(w.shape[1], **f64) for w in self.dec_cat]
        self.active = torch.zeros(self.n_models, dtype=torch.int64, device=device)
        self.alive_m = (
            torch.zeros(spec.concepts, dtype=torch.bool, device=device) if track_alive else None
        )
        """Concepts with a nonzero code on some token for some backbone (tracked on request)."""

    def add(self, x_bD: Tensor, codes: Sequence[Codes]) -> None:
        """One batch: standardised inputs side by side (float32/64) and each backbone's codes."""
        self.n_tokens += x_bD.shape[0]
        x_list = torch.split(x_bD, self.widths, dim=1)
        xhat = [
            F.embedding_bag(c.indices_bk, w, per_sample_weights=c.values_bk.to(w.dtype), mode="sum")
            for c, w in zip(codes, self.dec_cat, strict=True)
        ]
        if self.bias_cat is not None:
            xhat = [h + b for h, b in zip(xhat, self.bias_cat, strict=True)]
        for r0 in range(0, x_bD.shape[0], self.rows):
            r1 = r0 + self.rows
            x_cat = x_bD[r0:r1]
            self.sum_x += colsum64(x_cat)
            self.sum_x2 += colsum64(x_cat * x_cat)
            for i, t in enumerate(self.targets):
                x_t = (
                    x_cat
                    if len(t) == self.n_models
                    else torch.cat([x_list[j][r0:r1] for j in t], 1)
                )
                err = torch.sub(x_t, xhat[i][r0:r1])  # promotes to the inputs' float32/64
                self.sse[i] += colsum64(err.mul_(err))
        for i, c in enumerate(codes):
            pos = c.values_bk > 0
            self.active[i] += pos.sum()
            if self.alive_m is not None:
                self.alive_m.index_fill_(0, c.indices_bk[pos], True)

    def sums(self) -> ReconstructionSums:
        bounds = np.cumsum([0, *self.widths])
        sum_x, sum_x2 = self.sum_x.cpu().numpy(), self.sum_x2.cpu().numpy()
        sse: list[list[np.ndarray | None]] = [[None] * self.n_models for _ in range(self.n_models)]
        for i, t in enumerate(self.targets):
            off = np.cumsum([0, *[self.widths[j] for j in t]])
            s = self.sse[i].cpu().numpy()
            for n, j in enumerate(t):
                sse[i][j] = s[off[n] : off[n + 1]]
        return ReconstructionSums(
            n_tokens=self.n_tokens,
            sum_x=[sum_x[bounds[j] : bounds[j + 1]] for j in range(self.n_models)],
            sum_x2=[sum_x2[bounds[j] : bounds[j + 1]] for j in range(self.n_models)],
            sse=sse,
            active=self.active.cpu().numpy(),
        )


# ---------------------------------------------------------------- derived metrics
class Reconstruction(NamedTuple):
    """Cross-model reconstruction, [i][j] = backbone j rebuilt from backbone i's codes (NaN: n/a)."""

    r2: np.ndarray
    """(M, M) R2 with a scalar mean: 1 - mean((x - xhat)^2) / mean((x - mean(x))^2)."""
    r2_channel: np.ndarray
    """(M, M) R2 with per-channel means: 1 - sum SSE_c / sum SS_c (variance-weighted)."""
    mse: np.ndarray
    """(M, M) mean squared error per element (standardised units)."""
    l0: np.ndarray
    """(M,) mean number of nonzero codes per token."""


def reconstruction(s: ReconstructionSums) -> Reconstruction:
    """The reconstruction metrics of the sums (NaN everywhere when no token was seen)."""
    n_models = len(s.sum_x)
    r2 = np.full((n_models, n_models), np.nan)
    r2c, mse = r2.copy(), r2.copy()
    n = s.n_tokens
    for j in range(n_models):
        d = s.sum_x[j].shape[0]
        mean = s.sum_x[j].sum() / (n * d) if n else np.nan
        var = s.sum_x2[j].sum() / (n * d) - mean * mean if n else np.nan
        ss_c = (s.sum_x2[j] - s.sum_x[j] ** 2 / n).sum() if n else np.nan
        for i in range(n_models):
            if s.sse[i][j] is None or n == 0:
                continue
            sse = s.sse[i][j].sum()
            mse[i, j] = sse / (n * d)
            r2[i, j] = 1.0 - mse[i, j] / var if var > 0 else np.nan
            r2c[i, j] = 1.0 - sse / ss_c if ss_c > 0 else np.nan
    l0 = s.active / n if n else np.full(n_models, np.nan)
    return Reconstruction(r2, r2c, mse, l0)


# ---------------------------------------------------------------- the trainer's entry point
class StreamedReconstruction(NamedTuple):
    """What ``stream_reconstruction`` measured on the selected images."""

    reconstruction: Reconstruction
    """R2 (scalar mean), per-channel R2, MSE (M, M) and L0 (M,)."""
    n_tokens: int
    """Tokens evaluated (0: no image selected; every metric is then NaN)."""
    alive_m: np.ndarray
    """(m,) bool: the concept had a nonzero code on some token for some backbone."""
    dead_share: float
    """Share of concepts that never had a nonzero code (NaN when no token was seen)."""


@torch.no_grad()
def stream_reconstruction(
    model: USAE,
    store: Store,
    keys: Sequence[str],
    image_mask_n: np.ndarray,
    *,
    batch_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> StreamedReconstruction:
    """One pass over the rows of the selected images -> reconstruction metrics and dead share.

    ``keys[i]`` is the store key of the model's backbone i; ``image_mask_n`` selects images
    (store order). The caller's model is left as it was (device, dtype, train/eval mode): when
    it is already on ``device`` in ``dtype`` it is used in eval mode and switched back, else a
    converted copy is evaluated.
    """
    device = torch.device(device)
    param = next(model.parameters())
    same = param.device == device and param.dtype == dtype and model.mu.dtype == exact_dtype(dtype)
    was_training = model.training
    work = model if same else prepare_model(copy.deepcopy(model), dtype, device)
    work.eval()
    try:
        acc = ReconstructionAccumulator(work, device, track_alive=True)
        for _, acts, _, _ in iter_batches(store, keys, image_mask_n, batch_tokens):
            x_bD, codes = encode_batch(work, [a.to(device) for a in acts], dtype)
            acc.add(x_bD, codes)
    finally:
        model.train(was_training)
    alive = acc.alive_m.cpu().numpy()
    dead = float(1.0 - alive.mean()) if acc.n_tokens else float("nan")
    return StreamedReconstruction(reconstruction(acc.sums()), acc.n_tokens, alive, dead)
