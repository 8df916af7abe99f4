"""Store + trained USAE -> universal-concept metrics, in ONE streaming pass over the store.

Every token of the evaluated images is encoded once per backbone (BatchNorm in eval mode) and
folded into float64/int64 accumulators whose size depends on the model only (concepts,
widths, backbones), never on the number of tokens: codes are never held densely across the
dataset. The metrics follow usae-spec.md section 4:

- cross-model reconstruction R2[i][j] (backbone j rebuilt from backbone i's codes) with a
  SCALAR mean (the paper's definition) and a per-channel variant, MSE, L0 per backbone, on
  standardised activations;
- per concept and backbone: fire counts (code > tau), energy ||mean_tokens(z_ik) D_i[k]||;
  per concept: co-fires (fires for ALL backbones on the same token, each backbone encoding its
  own activations), firing entropy, co-fire proportion and IoU, importance, dead;
- the top images of every concept (bounded top-K per concept), whose token maps are re-read
  for the concepts shown in the report (``token_maps``);
- USAE vs independent SAEs: Hungarian matching of decoder rows (``match_dictionaries``).

Tensor names carry shape suffixes: b tokens of a batch, d width, m concepts, k top-k,
n images, g images kept per concept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from usae.pipeline.store import Store
from usae.trainer.model import STD_EPS, USAE, Codes

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- accumulators
@dataclass
class Sums:
    """Raw streaming sums (float64 / int64); everything reported is derived from these."""

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
    fires_mm: np.ndarray
    """(M, m) tokens on which concept k fires (code > tau) for backbone i."""
    sum_z_mm: np.ndarray
    """(M, m) sum over tokens of the code z_ik (float64)."""
    cofires_m: np.ndarray
    """(m,) tokens on which concept k fires for every backbone."""
    union_m: np.ndarray
    """(m,) tokens on which concept k fires for at least one backbone."""
    top_score_mg: np.ndarray
    """(m, g) best image scores per concept, descending (-inf: empty slot)."""
    top_image_mg: np.ndarray
    """(m, g) image indices (store order) of those scores (-1: empty slot)."""


class _Accumulator:
    """Folds encoded batches into ``Sums``; torch tensors on the analysis device.

    Speed: codes of backbone i decode into all its targets with ONE embedding_bag over the
    concatenated decoders, in the model's compute dtype (bf16 gathers are ~5x faster than
    float32 on CPU); errors are taken against the float32/64 inputs and squared in place.
    """

    def __init__(self, model: USAE, tau: float, top_images: int, image_score: str, device: torch.device):
        spec = model.spec
        self.m, self.n_models, self.tau = spec.concepts, len(spec.widths), tau
        self.image_score = image_score
        self.g = top_images
        self.widths = list(spec.widths)
        self.rows = 256
        """Rows per block of the error sums: small enough for the CPU cache."""
        compute = next(model.parameters()).dtype
        self.targets = [[j for j in range(self.n_models) if _decodes(spec, i, j)] for i in range(self.n_models)]
        with torch.no_grad():
            dec = [model.decoder_weight(j).detach().to(compute) for j in range(self.n_models)]
        self.dec_cat = [torch.cat([dec[j] for j in t], dim=1).contiguous() for t in self.targets]
        f64 = dict(dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.sum_x = torch.zeros(sum(self.widths), **f64)
        self.sum_x2 = torch.zeros(sum(self.widths), **f64)
        self.sse = [torch.zeros(w.shape[1], **f64) for w in self.dec_cat]
        self.active = torch.zeros(self.n_models, dtype=torch.int64, device=device)
        self.fires = torch.zeros(self.n_models, self.m, dtype=torch.int64, device=device)
        self.sum_z = torch.zeros(self.n_models, self.m, **f64)
        self.cofires = torch.zeros(self.m + 1, dtype=torch.int64, device=device)  # [m]: not fired
        self.union = torch.zeros(self.m + 1, dtype=torch.int64, device=device)
        self.top_key = torch.full((self.m, self.g), -1, dtype=torch.int64, device=device)

    def add_batch(self, x_bD: Tensor, codes: Sequence[Codes]) -> None:
        """One batch: standardised inputs side by side (float32/64) and each backbone's codes."""
        self.n_tokens += x_bD.shape[0]
        x_list = torch.split(x_bD, self.widths, dim=1)
        xhat = [F.embedding_bag(c.indices_bk, w, per_sample_weights=c.values_bk.to(w.dtype), mode="sum")
                for c, w in zip(codes, self.dec_cat, strict=True)]
        for r0 in range(0, x_bD.shape[0], self.rows):  # row blocks that stay in cache
            r1 = r0 + self.rows
            x_cat = x_bD[r0:r1]
            self.sum_x += colsum64(x_cat)
            self.sum_x2 += colsum64(x_cat * x_cat)
            for i, t in enumerate(self.targets):
                x_t = x_cat if len(t) == self.n_models else torch.cat([x_list[j][r0:r1] for j in t], 1)
                err = torch.sub(x_t, xhat[i][r0:r1])  # promotes to the inputs' float32/64
                self.sse[i] += colsum64(err.mul_(err))
        fired_list = []
        for i, c in enumerate(codes):
            vals, idx = c.values_bk.reshape(-1), c.indices_bk.reshape(-1)
            fired = vals > self.tau
            self.active[i] += int((vals > 0).sum())
            self.fires[i].index_add_(0, idx, fired.to(torch.int64))  # no boolean indexing: no sync
            self.sum_z[i].index_add_(0, idx, vals.to(torch.float64))
            fired_list.append(torch.where(fired.view_as(c.indices_bk), c.indices_bk, self.m))
        self._add_cofires(fired_list)

    def _add_cofires(self, fired_list: list[Tensor]) -> None:
        """Co-fires and unions from the fired concept ids per token (sentinel m = not fired).

        Each backbone holds a concept at most once per token, so after sorting a token's
        M*k ids, concept c fired for all M backbones iff the M ids starting at its first
        occurrence are all c.
        """
        s_bn = torch.sort(torch.cat(fired_list, dim=1), dim=1).values
        n_models = self.n_models
        first = torch.ones_like(s_bn, dtype=torch.bool)
        first[:, 1:] = s_bn[:, 1:] != s_bn[:, :-1]
        self.union.index_add_(0, s_bn.reshape(-1), first.reshape(-1).to(torch.int64))  # slot m: sentinel
        run = s_bn[:, : s_bn.shape[1] - n_models + 1]
        all_m = run == s_bn[:, n_models - 1 :]
        self.cofires.index_add_(0, run.reshape(-1), all_m.reshape(-1).to(torch.int64))

    def add_image_scores(self, codes: Sequence[Codes], local_img_b: Tensor, buf_mnm: Tensor) -> None:
        """Per backbone, per image of the chunk: max (or sum) over its tokens of each concept."""
        m = self.m
        for i, c in enumerate(codes):
            flat = (local_img_b[:, None] * m + c.indices_bk).reshape(-1)
            vals = c.values_bk.float().reshape(-1)
            if self.image_score == "max":  # codes are >= 0, so the zero start is neutral
                buf_mnm[i].view(-1).scatter_reduce_(0, flat, vals, reduce="amax")
            else:
                buf_mnm[i].view(-1).index_add_(0, flat, vals)

    def merge_images(self, buf_mnm: Tensor, image_index_n: Tensor, tokens_per_image: int) -> None:
        """Score = mean over backbones; keep the best g images per concept.

        Candidates are ranked by one int64 key: the float32 score's bit pattern (ordered like
        the score for positive floats) in the high 32 bits, and 2^32 - 1 - image index in the
        low ones, so ties go to the lower image index and the result does not depend on the
        chunking. Key -1: empty slot (scores <= 0 are never kept).
        """
        buf_nm = buf_mnm.mean(0)
        if self.image_score == "mean":
            buf_nm = buf_nm / tokens_per_image
        score_mn = buf_nm.T.contiguous().float()
        bits = score_mn.view(torch.int32).to(torch.int64)
        key = (bits << 32) | (0xFFFFFFFF - image_index_n.to(torch.int64))[None, :]
        key = torch.where(score_mn > 0, key, torch.full_like(key, -1))
        cand = torch.cat([self.top_key, key], dim=1)
        self.top_key = torch.topk(cand, self.g, dim=1, sorted=True).values if self.g else self.top_key

    def top_images(self) -> tuple[Tensor, Tensor]:
        """(scores, image indices) of the kept images, (m, g); -inf / -1 in empty slots."""
        empty = self.top_key < 0
        score = (self.top_key >> 32).to(torch.int32).view(torch.float32)
        image = 0xFFFFFFFF - (self.top_key & 0xFFFFFFFF)
        return torch.where(empty, -math.inf, score), torch.where(empty, -1, image)

    def sums(self) -> Sums:
        def np_(t):
            return t.cpu().numpy()

        bounds = np.cumsum([0, *self.widths])
        per = lambda v, j: v[bounds[j] : bounds[j + 1]]  # noqa: E731
        sse: list[list[np.ndarray | None]] = [[None] * self.n_models for _ in range(self.n_models)]
        for i, t in enumerate(self.targets):
            off = np.cumsum([0, *[self.widths[j] for j in t]])
            for n, j in enumerate(t):
                sse[i][j] = np_(self.sse[i][off[n] : off[n + 1]])
        score, image = self.top_images()
        return Sums(
            n_tokens=self.n_tokens,
            sum_x=[np_(per(self.sum_x, j)) for j in range(self.n_models)],
            sum_x2=[np_(per(self.sum_x2, j)) for j in range(self.n_models)],
            sse=sse,
            active=np_(self.active),
            fires_mm=np_(self.fires),
            sum_z_mm=np_(self.sum_z),
            cofires_m=np_(self.cofires[: self.m]),
            union_m=np_(self.union[: self.m]),
            top_score_mg=np_(score),
            top_image_mg=np_(image),
        )


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


def _decodes(spec, i: int, j: int) -> bool:
    """Codes of backbone i decode into backbone j (independent runs: only i == j)."""
    return i == j or not spec.independent


# ---------------------------------------------------------------- the streaming pass
def encode_batch(model: USAE, acts: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Codes]]:
    """Raw activations of each backbone -> standardised inputs side by side (b, sum d_i) in
    float32 (float64 in float64 mode) and the TopK codes of each backbone (eval mode).

    ``model`` must already be in ``dtype`` except its mu/sigma buffers (see ``prepare_model``).
    Standardisation is ``model.standardize``'s formula, written into column slices of one
    buffer so the error sums can read row blocks of all backbones without a copy.
    """
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    b = acts[0].shape[0]
    x_bD = torch.empty(b, sum(model.spec.widths), dtype=exact, device=acts[0].device)
    codes, off = [], 0
    for i, a_bd in enumerate(acts):
        x_bd = x_bD[:, off : off + a_bd.shape[1]]
        off += a_bd.shape[1]
        x_bd.copy_(a_bd).sub_(model.mu[i]).div_(model.sigma[i] + STD_EPS)
        codes.append(model.encode(i, x_bd.to(dtype)))
    return x_bD, codes


def prepare_model(model: USAE, dtype: torch.dtype, device: str | torch.device) -> USAE:
    """Move the model (in place) to device/dtype, eval mode; mu/sigma stay at >= float32."""
    model = model.to(device=device, dtype=dtype).eval()
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    model.mu = model.mu.to(exact)
    model.sigma = model.sigma.to(exact)
    return model


def iter_batches(store: Store, keys: Sequence[str], image_mask_n: np.ndarray, batch_tokens: int):
    """Yield (chunk, rows of each backbone as float16 tensors, local image index per row).

    Reads each chunk once per backbone (direct file read), keeps the evaluated rows only and
    slices them into batches of at most ``batch_tokens`` rows. The last item of each chunk is
    marked so callers can merge per-chunk state.
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


@torch.no_grad()
def stream_sums(
    model: USAE,
    store: Store,
    keys: Sequence[str],
    image_mask_n: np.ndarray,
    *,
    tau: float = 0.1,
    batch_tokens: int = 4096,
    top_images: int = 8,
    image_score: str = "max",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Sums:
    """One pass over the evaluated rows of the store -> ``Sums`` (memory independent of N).

    ``keys[i]`` is the store key of the model's backbone i; ``image_mask_n`` selects the
    images (store order) to evaluate; ``on_batch(rows)`` is called after every batch.
    """
    if image_score not in ("max", "mean"):
        raise ValueError(f"image_score must be 'max' or 'mean', got {image_score!r}")
    device = torch.device(device)
    model = prepare_model(model, dtype, device)
    acc = _Accumulator(model, tau, top_images, image_score, device)
    ci_images = store.chunk_images
    buf_mnm = torch.zeros(model.n_models, ci_images, model.spec.concepts, dtype=torch.float32, device=device)
    for ci, acts, local_img_b, last in iter_batches(store, keys, image_mask_n, batch_tokens):
        acts = [a.to(device) for a in acts]
        x_bD, codes = encode_batch(model, acts, dtype)
        acc.add_batch(x_bD, codes)
        acc.add_image_scores(codes, local_img_b.to(device), buf_mnm)
        if last:
            a, b = store.chunk_images_range(ci)
            sel = np.flatnonzero(image_mask_n[a:b])
            part = buf_mnm[:, : b - a] if len(sel) == b - a else buf_mnm[:, sel]
            acc.merge_images(part, torch.as_tensor(a + sel, device=device), store.tokens_per_image)
            buf_mnm.zero_()
        if on_batch is not None:
            on_batch(acts[0].shape[0])
    return acc.sums()


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


def reconstruction(s: Sums) -> Reconstruction:
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


class ConceptTable(NamedTuple):
    """Per-concept statistics ((M, m) arrays are per backbone)."""

    fires_mm: np.ndarray
    energy_mm: np.ndarray
    """||mean_tokens(z_ik) * D_i[k]||_2 over ALL evaluated tokens."""
    cofires_m: np.ndarray
    union_m: np.ndarray
    firing_entropy_m: np.ndarray
    """-sum_i p_ik log2 p_ik / log2 M, p_ik = fires_ik / sum_i fires_ik (NaN: never fires or M < 2)."""
    cfp_mm: np.ndarray
    """cofires_k / fires_ik (NaN where fires_ik = 0)."""
    iou_m: np.ndarray
    """cofires_k / union_k (NaN where union_k = 0)."""
    importance_m: np.ndarray
    """Energy summed over backbones."""
    dead_m: np.ndarray
    """True where the concept never fires for any backbone."""


def concept_table(s: Sums, decoder_norms_mm: np.ndarray | None = None) -> ConceptTable:
    """Concept statistics from the sums; ``decoder_norms_mm`` (M, m) defaults to unit rows."""
    n_models, m = s.fires_mm.shape
    norms = np.ones((n_models, m)) if decoder_norms_mm is None else decoder_norms_mm
    energy = np.abs(s.sum_z_mm / max(s.n_tokens, 1)) * norms
    total = s.fires_mm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = s.fires_mm / total
        plogp = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
        fe = -plogp.sum(0) / math.log2(n_models) if n_models > 1 else np.full(m, np.nan)
        fe = np.where(total > 0, fe, np.nan)
        cfp = np.where(s.fires_mm > 0, s.cofires_m / s.fires_mm, np.nan)
        iou = np.where(s.union_m > 0, s.cofires_m / s.union_m, np.nan)
    return ConceptTable(
        fires_mm=s.fires_mm,
        energy_mm=energy,
        cofires_m=s.cofires_m,
        union_m=s.union_m,
        firing_entropy_m=fe,
        cfp_mm=cfp,
        iou_m=iou,
        importance_m=energy.sum(0),
        dead_m=total == 0,
    )


class Correlation(NamedTuple):
    """Pearson r and least-squares slope of log10 co-fires on log10 importance."""

    r: float
    slope: float
    n: int


def cofire_vs_importance(cofires_m: np.ndarray, importance_m: np.ndarray, min_cofires: int = 0) -> Correlation:
    """Over concepts with positive co-fires and importance (and >= ``min_cofires`` co-fires)."""
    ok = (cofires_m > 0) & (importance_m > 0) & (cofires_m >= min_cofires)
    n = int(ok.sum())
    if n < 3:
        return Correlation(float("nan"), float("nan"), n)
    x, y = np.log10(importance_m[ok]), np.log10(cofires_m[ok].astype(np.float64))
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(float("nan"), float("nan"), n)
    r = float(np.corrcoef(x, y)[0, 1])
    slope = float(np.polyfit(x, y, 1)[0])
    return Correlation(r, slope, n)


# ---------------------------------------------------------------- baseline matching
class Matching(NamedTuple):
    """Hungarian matching of one backbone's USAE dictionary to its independent SAE's."""

    partner_m: np.ndarray
    """(m,) matched independent concept per USAE concept (-1: unmatched when sizes differ)."""
    cosine_m: np.ndarray
    """(m,) cosine of the matched pair (NaN: unmatched)."""


def match_dictionaries(usae_md: np.ndarray, indep_md: np.ndarray) -> Matching:
    """Maximise the summed cosine between matched decoder rows (scipy linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment

    a = usae_md / np.maximum(np.linalg.norm(usae_md, axis=1, keepdims=True), 1e-12)
    b = indep_md / np.maximum(np.linalg.norm(indep_md, axis=1, keepdims=True), 1e-12)
    cos = a.astype(np.float64) @ b.astype(np.float64).T
    rows, cols = linear_sum_assignment(cos, maximize=True)
    partner = np.full(a.shape[0], -1, dtype=np.int64)
    cosine = np.full(a.shape[0], np.nan)
    partner[rows] = cols
    cosine[rows] = cos[rows, cols]
    return Matching(partner, cosine)


def matching_summary(cosine_m: np.ndarray, subset: np.ndarray | None = None, threshold: float = 0.5) -> dict:
    """Share of (matched) concepts with cosine > threshold and the mean cosine."""
    c = cosine_m if subset is None else cosine_m[subset]
    c = c[np.isfinite(c)]
    if c.size == 0:
        return {"n": 0, "share_matched": float("nan"), "mean_cosine": float("nan")}
    return {"n": int(c.size), "share_matched": float((c > threshold).mean()), "mean_cosine": float(c.mean())}


# ---------------------------------------------------------------- concept selection and token maps
def select_top_concepts(table: ConceptTable, n: int) -> dict[str, list[int]]:
    """The n most important concepts, and the n most universal (highest FE, then co-fires)."""
    alive = np.flatnonzero(~table.dead_m)
    by_imp = alive[np.argsort(-table.importance_m[alive], kind="stable")][:n]
    fe = np.nan_to_num(table.firing_entropy_m[alive], nan=-1.0)
    by_fe = alive[np.lexsort((-table.cofires_m[alive], -fe))][:n]
    return {"importance": [int(k) for k in by_imp], "universality": [int(k) for k in by_fe]}


@torch.no_grad()
def token_maps(
    model: USAE,
    store: Store,
    keys: Sequence[str],
    images: Sequence[int],
    concepts: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Float[np.ndarray, "n c M h w"]:
    """Per-token code of each concept for each backbone on the given images, on the store grid.

    Re-reads only those images' rows (small contiguous reads).
    """
    gh, gw = store.grid
    t = store.tokens_per_image
    out = np.zeros((len(images), len(concepts), len(keys), gh, gw), dtype=np.float32)
    if not images or not concepts:
        return out
    model = prepare_model(model, dtype, device)
    cidx = torch.as_tensor(list(concepts), device=device)
    for n, g in enumerate(images):
        acts = [torch.from_numpy(store.read_rows(k, g * t, (g + 1) * t)).to(device) for k in keys]
        _, codes = encode_batch(model, acts, dtype)
        for i, c in enumerate(codes):
            z_tm = model.dense_codes(c).float()[:, cidx]
            out[n, :, i] = z_tm.T.reshape(len(concepts), gh, gw).cpu().numpy()
    return out
