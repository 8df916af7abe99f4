"""Store + trained USAE -> universal-concept metrics, in ONE streaming pass over the store.

Every token of the evaluated images is encoded once per backbone (BatchNorm in eval mode) and
folded into float64/int64 accumulators whose size depends on the model only (concepts,
widths, backbones), never on the number of tokens: codes are never held densely across the
dataset. The metrics follow docs/method.md (metrics):

- cross-model reconstruction R2[i][j], MSE, L0: the trainer's streaming routine
  (``usae.trainer.evaluate``), composed into the same pass;
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
from usae.trainer.evaluate import (
    ReconstructionAccumulator,
    ReconstructionSums,
    decodes,
    encode_batch,
    exact_dtype,
    iter_batches,
    prepare_model,
)
from usae.trainer.model import USAE, Codes

ANALYSIS_DTYPES = ("fp32", "bf16", "fp64")
"""Encoder compute dtypes of the analysis (runtime names); error sums are float64 always."""
FIT_SUMS = ("n", "z", "zz", "e", "ee", "ze")
"""Order of the fit sums along the first axis of ``Sums.fit_6mmm``."""


# ---------------------------------------------------------------- accumulators
@dataclass
class Sums(ReconstructionSums):
    """Raw streaming sums (float64 / int64); everything reported is derived from these.

    The reconstruction sums (``ReconstructionSums``: n_tokens, sum_x, sum_x2, sse, active)
    plus the concept statistics below."""

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
    pair_cofires_mmm: np.ndarray | None = None
    """(M, M, m) tokens on which concept k fires for both backbone i and backbone j (symmetric;
    the diagonal is ``fires_mm``); None unless the pass was asked for it (``pairwise=True``)."""
    fit_6mmm: np.ndarray | None = None
    """(6, M, M, m) the fit sums of concept k from source backbone i in target backbone j
    (``FIT_SUMS`` order: count, sum z, sum z^2, sum e, sum e^2, sum z e) over the tokens where
    k fires from i (code z > tau) and i decodes into j, with e = <x_j - x_hat_j, u_jk> + z g_jk:
    target j's activation along k's unit decoder direction u_jk once every other concept's
    contribution (and the decoder bias) is taken away, i.e. the residual with k put back
    (g_jk: k's gain in j, 1 without gains); None unless ``fit=True``."""


class _Accumulator:
    """Folds encoded batches into ``Sums``: the reconstruction sums (``ReconstructionAccumulator``,
    shared with the trainer's evaluation) and the concept statistics, in the same pass."""

    def __init__(
        self,
        model: USAE,
        tau: float,
        top_images: int,
        image_score: str,
        device: torch.device,
        pairwise: bool = False,
        fit: bool = False,
    ):
        spec = model.spec
        self.m, self.n_models, self.tau = spec.concepts, len(spec.widths), tau
        self.image_score = image_score
        self.g = top_images
        self.rec = ReconstructionAccumulator(model, device)
        self.fires = torch.zeros(self.n_models, self.m, dtype=torch.int64, device=device)
        self.sum_z = torch.zeros(self.n_models, self.m, dtype=torch.float64, device=device)
        self.cofires = torch.zeros(self.m + 1, dtype=torch.int64, device=device)  # [m]: not fired
        self.union = torch.zeros(self.m + 1, dtype=torch.int64, device=device)
        self.top_key = torch.full((self.m, self.g), -1, dtype=torch.int64, device=device)
        self.pairs = (  # flat (M, M, m + 1), upper triangle i < j filled; [.., m]: not fired
            torch.zeros(self.n_models**2 * (self.m + 1), dtype=torch.int64, device=device)
            if pairwise and self.n_models > 1
            else None
        )
        self.fit = _FitAccumulator(model, tau, device) if fit else None

    def add_batch(self, x_bD: Tensor, codes: Sequence[Codes]) -> None:
        """One batch: standardised inputs side by side (float32/64) and each backbone's codes."""
        self.rec.add(x_bD, codes)
        if self.fit is not None:
            self.fit.add(x_bD, codes)
        fired_list = []
        for i, c in enumerate(codes):
            vals, idx = c.values_bk.reshape(-1), c.indices_bk.reshape(-1)
            fired = vals > self.tau
            self.fires[i].index_add_(0, idx, fired.to(torch.int64))  # no boolean indexing: no sync
            self.sum_z[i].index_add_(0, idx, vals.to(torch.float64))
            fired_list.append(torch.where(fired.view_as(c.indices_bk), c.indices_bk, self.m))
        if self.pairs is None:
            self._add_cofires(fired_list)
        else:
            self._add_cofires_pairs(fired_list)

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
        self.union.index_add_(
            0, s_bn.reshape(-1), first.reshape(-1).to(torch.int64)
        )  # slot m: sentinel
        run = s_bn[:, : s_bn.shape[1] - n_models + 1]
        all_m = run == s_bn[:, n_models - 1 :]
        self.cofires.index_add_(0, run.reshape(-1), all_m.reshape(-1).to(torch.int64))

    def _add_cofires_pairs(self, fired_list: list[Tensor]) -> None:
        """``_add_cofires`` plus the pairwise co-fires, sparse: O(b M^2 k), never (b, m) masks.

        Token-wise sort of the keys id * M + i (backbone i, sentinel id m = not fired): a
        concept's occurrences are then contiguous and ordered by backbone, so the pairs (i < j)
        for which it fired are exactly the positions p, p + d (d = 1..M-1) holding the same id.
        Each pair is counted at flat index (i * M + j) * (m + 1) + id; the sentinel column m
        takes the non-fired ones. The same sorted ids give the co-fires and unions.
        """
        n, m1 = self.n_models, self.m + 1
        key_bn = torch.cat([f * n + i for i, f in enumerate(fired_list)], dim=1)
        key_bn = torch.sort(key_bn, dim=1).values
        s_bn = torch.div(key_bn, n, rounding_mode="floor")
        who_bn = key_bn - s_bn * n
        first = torch.ones_like(s_bn, dtype=torch.bool)
        first[:, 1:] = s_bn[:, 1:] != s_bn[:, :-1]
        self.union.index_add_(0, s_bn.reshape(-1), first.reshape(-1).to(torch.int64))
        run = s_bn[:, : s_bn.shape[1] - n + 1]
        all_m = run == s_bn[:, n - 1 :]
        self.cofires.index_add_(0, run.reshape(-1), all_m.reshape(-1).to(torch.int64))
        width = s_bn.shape[1]
        for d in range(1, n):
            lo, hi = s_bn[:, : width - d], s_bn[:, d:]
            flat = (who_bn[:, : width - d] * n + who_bn[:, d:]) * m1 + lo
            self.pairs.index_add_(0, flat.reshape(-1), (lo == hi).reshape(-1).to(torch.int64))

    def add_image_scores(
        self, codes: Sequence[Codes], local_img_b: Tensor, buf_mnm: Tensor
    ) -> None:
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
        self.top_key = (
            torch.topk(cand, self.g, dim=1, sorted=True).values if self.g else self.top_key
        )

    def top_images(self) -> tuple[Tensor, Tensor]:
        """(scores, image indices) of the kept images, (m, g); -inf / -1 in empty slots."""
        empty = self.top_key < 0
        score = (self.top_key >> 32).to(torch.int32).view(torch.float32)
        image = 0xFFFFFFFF - (self.top_key & 0xFFFFFFFF)
        return torch.where(empty, -math.inf, score), torch.where(empty, -1, image)

    def sums(self) -> Sums:
        def np_(t):
            return t.cpu().numpy()

        score, image = self.top_images()
        pairs = None
        if self.pairs is not None:
            n = self.n_models
            up = np_(self.pairs).reshape(n, n, self.m + 1)[:, :, : self.m]
            pairs = up + up.transpose(1, 0, 2)  # lower triangle and diagonal of up are zero
            pairs[np.arange(n), np.arange(n)] = np_(self.fires)
        return Sums(
            **vars(self.rec.sums()),
            fires_mm=np_(self.fires),
            sum_z_mm=np_(self.sum_z),
            cofires_m=np_(self.cofires[: self.m]),
            union_m=np_(self.union[: self.m]),
            top_score_mg=np_(score),
            top_image_mg=np_(image),
            pair_cofires_mmm=pairs,
            fit_6mmm=None if self.fit is None else np_(self.fit.sums.permute(3, 0, 1, 2)),
        )


class _FitAccumulator:
    """The fit sums (``Sums.fit_6mmm``), sparse: per (source, target) one decode of the batch and
    one gather of the k active decoder rows per token, O(b k d) like the reconstruction itself.

    The projection e = <x_j - x_hat_j, u_jk> + z g_jk is taken in the inputs' float32/64 against
    unit rows in that dtype; x_hat_j is decoded in the model's compute dtype (as the
    reconstruction sums do)."""

    rows = 512
    """Rows per block of the gathered (rows, k, d) decoder rows."""

    def __init__(self, model: USAE, tau: float, device: torch.device):
        spec = model.spec
        self.tau = tau
        self.widths = list(spec.widths)
        self.targets = [
            [j for j in range(len(spec.widths)) if decodes(spec, i, j)]
            for i in range(len(spec.widths))
        ]
        compute = next(model.parameters()).dtype
        exact = exact_dtype(compute)
        with torch.no_grad():
            self.dec = [
                model.decoder_weight(j).detach().to(compute) for j in range(len(self.widths))
            ]
            gain = [model.gain(j).detach().double() for j in range(len(self.widths))]
            self.unit = [
                F.normalize(model.decoders[j].detach().double(), dim=1).to(exact)
                for j in range(len(self.widths))
            ]
            self.bias = [
                None if model.bias(j) is None else model.bias(j).detach().to(compute)
                for j in range(len(self.widths))
            ]
        self.gain = [g.to(exact) for g in gain]
        n = len(self.widths)
        self.sums = torch.zeros(n, n, spec.concepts, len(FIT_SUMS),
                                dtype=torch.float64, device=device)  # fmt: skip

    def add(self, x_bD: Tensor, codes: Sequence[Codes]) -> None:
        x_list = torch.split(x_bD, self.widths, dim=1)
        for i, c in enumerate(codes):
            pos = (c.values_bk > self.tau).reshape(-1)
            flat = c.indices_bk.reshape(-1)[pos]
            for j in self.targets[i]:
                e_bk = self._projection(x_list[j], c, j)
                z = c.values_bk.reshape(-1)[pos].to(torch.float64)
                e = e_bk.reshape(-1)[pos].to(torch.float64)
                terms = torch.stack([torch.ones_like(z), z, z * z, e, e * e, z * e], dim=1)
                self.sums[i, j].index_add_(0, flat, terms)

    def _projection(self, x_bd: Tensor, c: Codes, j: int) -> Tensor:
        """(b, k) e of each active code of the batch in target j (module-level docstring)."""
        w = self.dec[j]
        vals = c.values_bk.to(w.dtype)
        xhat = F.embedding_bag(c.indices_bk, w, per_sample_weights=vals, mode="sum")
        if self.bias[j] is not None:
            xhat = xhat + self.bias[j]
        out = torch.empty(c.indices_bk.shape, dtype=x_bd.dtype, device=x_bd.device)
        u, g = self.unit[j], self.gain[j]
        for r0 in range(0, x_bd.shape[0], self.rows):
            r1 = r0 + self.rows
            r_bd = torch.sub(x_bd[r0:r1], xhat[r0:r1])  # promotes to the inputs' float32/64
            idx = c.indices_bk[r0:r1]
            proj = torch.bmm(u[idx], r_bd.unsqueeze(2)).squeeze(2)  # (rows, k)
            out[r0:r1] = proj + c.values_bk[r0:r1].to(out.dtype) * g[idx]
        return out


# ---------------------------------------------------------------- the streaming pass
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
    pairwise: bool = False,
    image_maxima: Callable[[np.ndarray, Tensor], None] | None = None,
    fit: bool = True,
) -> Sums:
    """One pass over the evaluated rows of the store -> ``Sums`` (memory independent of N).

    ``keys[i]`` is the store key of the model's backbone i; ``image_mask_n`` selects the
    images (store order) to evaluate; ``on_batch(rows)`` is called after every batch;
    ``pairwise`` adds the (M, M, m) pairwise co-fires (``Sums.pair_cofires_mmm``), ``fit`` the
    fit sums of the member test (``Sums.fit_6mmm``);
    ``image_maxima(image_index_n, max_Mnm)`` is called once per chunk with the chunk's evaluated
    images (store indices) and, per backbone, each one's max over its tokens of every code
    (a device tensor, valid during the call only; ``usae.analysis.labels.MaximaCollector``).
    """
    if image_score not in ("max", "mean"):
        raise ValueError(f"image_score must be 'max' or 'mean', got {image_score!r}")
    device = torch.device(device)
    model = prepare_model(model, dtype, device)
    acc = _Accumulator(model, tau, top_images, image_score, device, pairwise, fit)
    ci_images = store.chunk_images
    buf_mnm = torch.zeros(
        model.n_models, ci_images, model.spec.concepts, dtype=torch.float32, device=device
    )
    max_mnm = None  # the per-image maxima: buf_mnm itself when the image score is the max
    if image_maxima is not None:
        max_mnm = buf_mnm if image_score == "max" else torch.zeros_like(buf_mnm)
    for ci, acts, local_img_b, last in iter_batches(store, keys, image_mask_n, batch_tokens):
        acts = [a.to(device) for a in acts]
        x_bD, codes = encode_batch(model, acts, dtype)
        acc.add_batch(x_bD, codes)
        acc.add_image_scores(codes, local_img_b.to(device), buf_mnm)
        if max_mnm is not None and max_mnm is not buf_mnm:
            scatter_image_max(codes, local_img_b.to(device), max_mnm)
        if last:
            a, b = store.chunk_images_range(ci)
            sel = np.flatnonzero(image_mask_n[a:b])
            part = buf_mnm[:, : b - a] if len(sel) == b - a else buf_mnm[:, sel]
            if image_maxima is not None:
                image_maxima(a + sel, max_mnm[:, : b - a] if len(sel) == b - a else max_mnm[:, sel])
            acc.merge_images(part, torch.as_tensor(a + sel, device=device), store.tokens_per_image)
            buf_mnm.zero_()
            if max_mnm is not None:
                max_mnm.zero_()
        if on_batch is not None:
            on_batch(acts[0].shape[0])
    return acc.sums()


def scatter_image_max(codes: Sequence[Codes], local_img_b: Tensor, buf_mnm: Tensor) -> None:
    """buf[i, image, k] = max(buf, codes of backbone i's tokens of that image) (codes >= 0)."""
    m = buf_mnm.shape[-1]
    for i, c in enumerate(codes):
        flat = (local_img_b[:, None] * m + c.indices_bk).reshape(-1)
        buf_mnm[i].view(-1).scatter_reduce_(0, flat, c.values_bk.float().reshape(-1), reduce="amax")


# ---------------------------------------------------------------- derived metrics
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
    fit_corr_mm: np.ndarray | None = None
    """(M, m) the member test's statistic (``fit_stats``): correlation (within sources), over the
    tokens where k fires, between its code and backbone i's activation along k's decoder
    direction once every other concept is taken away (NaN: fewer than 3 codes or no spread);
    None without fit sums."""
    fit_beta_mm: np.ndarray | None = None
    """(M, m) latent scaling: the least-squares amplitude (through 0) of that activation per unit
    code, standardised units (a learned gain that fits has fit_beta = gain); None without fit sums."""
    fit_n_mm: np.ndarray | None = None
    """(M, m) fired codes of k the test reads (pooled over the sources that decode into i)."""
    fit_dof_mm: np.ndarray | None = None
    """(M, m) degrees of freedom of fit_corr_mm (``FitStats.dof_mm``)."""
    fit_slope_mm: np.ndarray | None = None
    """(M, m) within-source slope of that activation on the code (``FitStats.slope_mm``)."""
    fit_need_mm: np.ndarray | None = None
    """(M, m) reconstruction need of k in backbone i (``FitStats.need_mm``): the share of i's
    activation along k's direction, on k's tokens, that k's contribution explains."""


class FitStats(NamedTuple):
    """The member test's statistics of every concept in every backbone, from ``Sums.fit_6mmm``."""

    n_mm: np.ndarray
    """(M, m) fired codes of k pooled over the sources that decode into the backbone."""
    corr_mm: np.ndarray
    """(M, m) within-source correlation (NaN: untestable)."""
    dof_mm: np.ndarray
    """(M, m) its degrees of freedom: n less one mean per source with codes, less 1."""
    beta_mm: np.ndarray
    """(M, m) least-squares amplitude through 0, sum z e / sum z^2 (NaN: no codes)."""
    slope_mm: np.ndarray
    """(M, m) within-source least-squares slope of e on z, cov / var_z (NaN where corr is)."""
    need_mm: np.ndarray
    """(M, m) reconstruction need: the share of the activation along k's direction, over the
    tokens where k fires, that k's contribution explains, 1 - sum (e - g z)^2 / sum e^2 =
    (2 g sum z e - g^2 sum z^2) / sum e^2: the loss that taking k away from the reconstruction
    adds, over the loss along its direction without k (<= 1; < 0 where k's contribution moves
    the reconstruction away from the data; NaN: no codes)."""


def fit_stats(fit_6mmm: np.ndarray, gain_mm: np.ndarray | None = None) -> FitStats:
    """(6, M, M, m) fit sums -> the member test's statistics per target backbone and concept
    (``gain_mm``: the (M, m) decoder gains the sums were taken with; ones without gains).

    The correlation is taken within sources (each source's codes and projections centred on
    their own means, then pooled): codes of k from different sources may differ in level, and
    a pooled correlation would read that difference as a link. NaN with < 3 codes or no spread.
    """
    n, sz, szz, se, see, sze = np.asarray(fit_6mmm, np.float64)  # each (M_src, M_tgt, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        nn = np.where(n > 0, n, 1.0)
        cov = (sze - sz * se / nn).sum(0)
        var_z = (szz - sz * sz / nn).sum(0)
        var_e = (see - se * se / nn).sum(0)
        n_t, szz_t, see_t, sze_t = n.sum(0), szz.sum(0), see.sum(0), sze.sum(0)
        dof = n_t - (n > 0).sum(0) - 1
        ok = (n_t >= 3) & (dof >= 1) & (var_z > 1e-12 * szz_t) & (var_e > 1e-12 * see_t)
        corr = np.where(ok, cov / np.sqrt(np.where(ok, var_z * var_e, 1.0)), np.nan)
        beta = np.where(szz_t > 0, sze_t / np.where(szz_t > 0, szz_t, 1.0), np.nan)
        slope = np.where(ok, cov / np.where(ok, var_z, 1.0), np.nan)
        g = np.ones_like(szz_t) if gain_mm is None else np.asarray(gain_mm, np.float64)
        has = see_t > 0
        need = np.where(has, (2 * g * sze_t - g * g * szz_t) / np.where(has, see_t, 1.0), np.nan)
    return FitStats(n_t, np.clip(corr, -1.0, 1.0), np.maximum(dof, 0), beta, slope, need)


def concept_table(s: Sums, decoder_norms_mm: np.ndarray | None = None) -> ConceptTable:
    """Concept statistics from the sums; ``decoder_norms_mm`` (M, m) defaults to unit rows."""
    n_models, m = s.fires_mm.shape
    norms = np.ones((n_models, m)) if decoder_norms_mm is None else decoder_norms_mm
    energy = np.abs(s.sum_z_mm / max(s.n_tokens, 1)) * norms
    total = s.fires_mm.sum(0)
    fit = None if s.fit_6mmm is None else fit_stats(s.fit_6mmm, decoder_norms_mm)
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
        fit_n_mm=None if fit is None else fit.n_mm,
        fit_corr_mm=None if fit is None else fit.corr_mm,
        fit_beta_mm=None if fit is None else fit.beta_mm,
        fit_dof_mm=None if fit is None else fit.dof_mm,
        fit_slope_mm=None if fit is None else fit.slope_mm,
        fit_need_mm=None if fit is None else fit.need_mm,
    )


class Correlation(NamedTuple):
    """Pearson r and least-squares slope of log10 co-fires on log10 importance."""

    r: float
    slope: float
    n: int


def cofire_vs_importance(
    cofires_m: np.ndarray, importance_m: np.ndarray, min_cofires: int = 0
) -> Correlation:
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


# ---------------------------------------------------------------- shared concepts, layer alignment
def shared_concepts(
    pair_cofires_mmm: np.ndarray, threshold: float = 0.5, min_fires: int = 10
) -> np.ndarray:
    """(M, M) number of concepts backbones i and j share, from the pairwise co-fires.

    Concept k is shared by i and j when it fires >= ``min_fires`` times (and at least once) for
    each, and its pairwise co-fire proportion cofire_ijk / min(fires_ik, fires_jk) (the overlap
    coefficient of the two firing sets) is >= ``threshold``. The diagonal is the number of
    concepts firing >= ``min_fires`` times for that backbone.
    """
    n = pair_cofires_mmm.shape[0]
    fires_mm = pair_cofires_mmm[np.arange(n), np.arange(n)]
    low = np.minimum(fires_mm[:, None, :], fires_mm[None, :, :])  # (M, M, m)
    ok = low >= max(int(min_fires), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        prop = pair_cofires_mmm / np.where(ok, low, 1)
    return (ok & (prop >= threshold)).sum(-1).astype(np.int64)


class Group(NamedTuple):
    """A backbone of the model as (model, layer): a store group such as ``dinov2@6``."""

    key: str
    model: str
    layer: int | None
    """Block index (None: the model's default output, ordered after every numbered layer)."""


def order_groups(groups: Sequence[Group]) -> list[int]:
    """Indices of ``groups`` grouped by model (models in first-seen order), layers ascending,
    None last."""
    first: dict[str, int] = {}
    for n, g in enumerate(groups):
        first.setdefault(g.model, n)
    return sorted(
        range(len(groups)),
        key=lambda n: (
            first[groups[n].model],
            groups[n].layer is None,
            groups[n].layer or 0,
            n,
        ),
    )


def has_layers(groups: Sequence[Group]) -> bool:
    """True when some model appears with more than one group (several of its layers)."""
    models = [g.model for g in groups]
    return len(set(models)) < len(models)


def layer_alignment(
    groups: Sequence[Group],
    pair_cofires_mmm: np.ndarray,
    threshold: float = 0.5,
    min_fires: int = 10,
) -> dict:
    """The layer-alignment view: shared concepts between every two (model, layer) groups.

    ``groups[i]`` describes backbone i of the model (the axes of ``pair_cofires_mmm``). Returns
    {groups: [{key, model, layer}] in ``order_groups`` order, threshold, min_fires, shared:
    (G, G) counts in that order, best: per ordered pair of models (A, B) and depth of A, the
    depth of B sharing most concepts with it (ties: the shallower; the depth itself excluded
    when A = B; layer_b None when none is shared)}.
    """
    order = order_groups(groups)
    gs = [groups[n] for n in order]
    shared = shared_concepts(pair_cofires_mmm, threshold, min_fires)[np.ix_(order, order)]
    models = list(dict.fromkeys(g.model for g in gs))
    rows = {mk: [n for n, g in enumerate(gs) if g.model == mk] for mk in models}
    best = []
    for a, b in ((a, b) for a in models for b in models):
        if a == b and len(rows[a]) < 2:
            continue
        for ia in rows[a]:
            cand = [ib for ib in rows[b] if ib != ia]
            vals = shared[ia, cand]
            top = cand[int(np.argmax(vals))]  # first maximum: the shallower depth
            best.append(
                {
                    "model_a": a,
                    "layer_a": gs[ia].layer,
                    "key_a": gs[ia].key,
                    "model_b": b,
                    "layer_b": gs[top].layer if vals.max() > 0 else None,
                    "key_b": gs[top].key if vals.max() > 0 else None,
                    "shared": int(vals.max()),
                }
            )
    return {
        "groups": [g._asdict() for g in gs],
        "threshold": float(threshold),
        "min_fires": int(min_fires),
        "shared": shared.tolist(),
        "best": best,
    }


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


def matching_summary(
    cosine_m: np.ndarray, subset: np.ndarray | None = None, threshold: float = 0.5
) -> dict:
    """Share of (matched) concepts with cosine > threshold and the mean cosine."""
    c = cosine_m if subset is None else cosine_m[subset]
    c = c[np.isfinite(c)]
    if c.size == 0:
        return {"n": 0, "share_matched": float("nan"), "mean_cosine": float("nan")}
    return {
        "n": int(c.size),
        "share_matched": float((c > threshold).mean()),
        "mean_cosine": float(c.mean()),
    }


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
