"""A store and a TrainConfig -> what training reads: checked backbones, image masks, the model
spec and the loader. Every problem with the input is a `TrainError` naming what is wrong."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from usae.pipeline.store import Store
from usae.trainer.config import RECIPES, TrainConfig, TrainError
from usae.trainer.distributed import Dist, max_over_ranks
from usae.trainer.loader import ChunkLoader
from usae.trainer.model import STD_EPS, USAE, ModelSpec

from usae.runtime import heldout_images


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
    check_rows_agree(st, keys)
    return st, keys


def check_rows_agree(st: Store, keys: Sequence[str]) -> None:
    """Every backbone must hold the same rows (same images, same tokens) as the image table."""
    expect = st.n_images * st.tokens_per_image
    counts = {}
    for k in keys:
        rows = st.token_rows(k)
        if rows != expect:
            raise TrainError(
                f"backbone {k!r} has {rows} token rows, but the store's {st.n_images} image ids "
                f"x {st.tokens_per_image} tokens make {expect}: the backbones disagree on images/rows"
            )
        counts[k] = int(st.stats(k)["count"])
    if len(set(counts.values())) > 1:
        raise TrainError(f"backbones disagree on the number of valid rows: {counts}")


def image_masks(st: Store, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) boolean masks over the valid images (`usae.runtime.heldout_images`)."""
    valid, held = st.valid, heldout_images(st, holdout)
    return valid & ~held, valid & held


def model_spec(st: Store, keys: Sequence[str], cfg: TrainConfig) -> ModelSpec:
    recipe = RECIPES[cfg.recipe]
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
        independent=cfg.mode == "independent",
        decoder_init=cfg.resolved().init,
        gains=recipe.gains,
        decoder_bias=recipe.decoder_bias,
        gain_rate=cfg.resolved().gain_rate,
        whiten=cfg.resolved().whiten,
    )


def channel_means(st: Store, keys: Sequence[str], spec: ModelSpec) -> list[torch.Tensor]:
    """Each backbone's exact per-channel mean in standardised units: where the decoder bias
    starts (the offsets are then fitted from the first step, not found by the codes)."""
    out = []
    for i, k in enumerate(keys):
        mean = torch.as_tensor(np.asarray(st.stats(k)["mean"], dtype=np.float64))
        out.append(((mean - spec.mu[i]) / (spec.sigma[i] + STD_EPS)).float())
    return out


@torch.no_grad()
def start_bias(model: USAE, st: Store, keys: Sequence[str]) -> None:
    """Set a model's decoder bias (when it has one) to `channel_means`: where training starts it."""
    if model.spec.decoder_bias:
        for b, mean in zip(model.dec_bias, channel_means(st, keys, model.spec), strict=True):
            b.copy_(mean)


SEED_CHUNKS = 32
"""Store chunks the data-aligned start draws its tokens from (a bounded read on any store)."""
SEED_POOL = 4
"""Candidate tokens per concept the data-aligned start reads (`seed_tokens`)."""
SEED_COSINE = 0.9
"""Two seeds closer than this (mean cosine over the backbones) would start one concept twice."""


def seed_tokens(
    st: Store, keys: Sequence[str], model: USAE, images: np.ndarray, seed: int
) -> list[Tensor]:
    """The data-aligned start's tokens (`USAE.seed_from_tokens`): up to m distinct training
    tokens as each backbone's encoder input (`model.encoder_input` of the standardised token, on
    the model's device: read with the decoder bias the model starts with); rows[j][c] is the same
    token in every backbone j.

    A pool of up to SEED_POOL x m tokens is drawn at random from up to SEED_CHUNKS random store
    chunks that hold training images, and `spread_out` keeps, in the pool's random order, each
    token whose mean cosine over the backbones to every token kept before is below SEED_COSINE:
    two near-identical seeds (common on backgrounds) would start one concept twice, and each
    backbone's encoder could then settle on a different one of the two. When fewer tokens pass,
    the rest of the m are the pool's others, in its order. Tokens that are non-finite or zero in
    some backbone are left out. Held-out images are never read, and the draw depends only on the
    store, the images and the seed (every DDP rank draws the same)."""
    rows = seed_pool(st, keys, model, images, seed)
    m, dev = model.spec.concepts, model.mu.device
    z = torch.cat([F.normalize(t, dim=1) for t in rows], 1) / math.sqrt(len(rows))
    kept = spread_out(z, SEED_COSINE, limit=m)
    rest = np.setdiff1d(np.arange(len(z)), kept, assume_unique=True)  # pool order
    pick = torch.from_numpy(np.concatenate([kept, rest])[:m]).to(dev)
    return [t[pick] for t in rows]


def seed_pool(
    st: Store, keys: Sequence[str], model: USAE, images: np.ndarray, seed: int
) -> list[Tensor]:
    """`seed_tokens`' pool: up to SEED_POOL x m random training tokens from up to SEED_CHUNKS
    random chunks, as each backbone's encoder input, finite and non-zero in every backbone."""
    tpi = st.tokens_per_image
    per_chunk = [images[slice(*st.chunk_images_range(c))] for c in range(st.n_chunks)]
    have = [c for c in range(st.n_chunks) if per_chunk[c].any()]
    rng = np.random.default_rng([seed, 0x5EED])
    chunks = np.sort(rng.choice(have, size=min(SEED_CHUNKS, len(have)), replace=False))
    # (chunk, local row) of every training token in the chosen chunks, then a random pool of them
    cand = np.concatenate(
        [
            np.stack([np.full(n, c), np.flatnonzero(np.repeat(per_chunk[c], tpi))], 1)
            for c in chunks
            for n in [int(per_chunk[c].sum()) * tpi]
        ]
    )
    m, dev = model.spec.concepts, model.mu.device
    pool = cand[rng.choice(len(cand), size=min(SEED_POOL * m, len(cand)), replace=False)]
    rows = []
    with torch.no_grad():
        for j, key in enumerate(keys):
            x = np.empty((len(pool), st.widths[key]), dtype=np.float32)
            for c in chunks:
                at = pool[:, 0] == c
                x[at] = st.read_chunk_rows(key, int(c), pool[at, 1])
            rows.append(model.encoder_input(j, model.standardize(j, torch.from_numpy(x).to(dev))))
    ok = torch.ones(len(pool), dtype=torch.bool, device=dev)
    for t in rows:
        ok &= torch.isfinite(t).all(1) & (t.norm(dim=1) > 1e-6)
    return [t[ok] for t in rows]


WHITEN_EPS = 1e-2
"""Whitening's ridge, relative to the mean eigenvalue of the second moment: directions weaker
than this are amplified at most 1/sqrt(WHITEN_EPS) times less than full whitening would."""


@torch.no_grad()
def start_whitening(
    model: USAE,
    st: Store,
    keys: Sequence[str],
    images: np.ndarray,
    seed: int,
    ridge: float = WHITEN_EPS,
) -> None:
    """Set `ModelSpec.whiten`'s P_j = (C_j + eps I)^(-1/2), C_j the second moment of backbone
    j's encoder input (standardised, less the decoder bias) over `seed_pool`'s tokens, eps =
    ridge (`TrainConfig.whiten_ridge`, default WHITEN_EPS) x mean eigenvalue of C_j. Under
    x -> x A (A invertible) C -> A^T C A, and the whitened inputs x P of the two differ by an
    orthogonal map (exactly when eps = 0)."""
    if not model.spec.whiten:
        return
    for j in range(model.n_models):
        model.whitening(j).copy_(torch.eye(model.spec.widths[j]))
    rows = seed_pool(st, keys, model, images, seed)
    for j, r in enumerate(rows):
        model.whitening(j).copy_(whitening_matrix(r, ridge).float())


def whitening_matrix(x_nd: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """(C + eps mean(eig C) I)^(-1/2), float64, with C = x^T x / n the second moment of the rows."""
    return moment_power(x_nd, eps, -0.5)


def inverse_second_moment(x_nd: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """(C + eps mean(eig C) I)^-1, float64: the dual encoder start's metric (`seed_start`)."""
    return moment_power(x_nd, eps, -1.0)


def moment_power(x_nd: Tensor, eps: float, power: float) -> Tensor:
    """(C + eps mean(eig C) I)^power, float64, C = x^T x / n the second moment of the rows."""
    x = x_nd.double()
    lam, v = torch.linalg.eigh(x.T @ x / max(len(x), 1))
    lam = lam.clamp_min(0)
    lam = lam + eps * lam.mean().clamp_min(1e-12)
    return (v * lam.pow(power)) @ v.T


DUAL_RIDGE = 1.0
"""The dual start's ridge, relative to the mean eigenvalue of the seed tokens' second moment:
directions stronger than the mean are damped as by the least-squares inverse, weaker ones are
read nearly as the token start reads them (the inverse would amplify them, noise with them)."""


def seed_start(
    st: Store,
    keys: Sequence[str],
    model: USAE,
    images: np.ndarray,
    seed: int,
    encoder_start: str,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """`USAE.seed_from_tokens`' arguments: `seed_tokens`' rows, and for the dual encoder start
    (`TrainConfig.encoder_start`) each backbone's `inverse_second_moment` S of those same rows,
    at ridge DUAL_RIDGE (None for the token start). Encoder row c is then x_c S: for
    an invertible A, S of X A is A^-1 S A^-T, so two backbones that differ by A start with the
    same pre-activations x S x_c (exactly at ridge 0, where x_c S is the least-squares inverse,
    the dual frame, of the dictionary of the n seed tokens X that the decoder starts at)."""
    rows = seed_tokens(st, keys, model, images, seed)
    if encoder_start != "dual":
        return rows, None
    return rows, [inverse_second_moment(r, DUAL_RIDGE).to(r.dtype) for r in rows]


def spread_out(z: Tensor, cosine: float, limit: int | None = None, block: int = 256) -> np.ndarray:
    """Greedy, in row order: the indices of the rows of z (z_a . z_b is their similarity) whose
    similarity to every row kept before is below `cosine`, the first `limit` of them. Blocks of
    rows are tested against the kept rows in one product, then among themselves."""
    kept: list[int] = []
    acc = z[:0]
    for s in range(0, len(z), block):
        blk = z[s : s + block]
        free = (
            (blk @ acc.T).amax(1) < cosine
            if len(acc)
            else torch.ones(len(blk), dtype=torch.bool, device=z.device)
        )
        idx = torch.nonzero(free).flatten()
        g = (blk[idx] @ blk[idx].T).cpu().numpy()
        mine: list[int] = []
        for a in range(len(idx)):
            if not mine or g[a, mine].max() < cosine:
                mine.append(a)
        new = idx[mine]
        kept.extend((new + s).tolist())
        acc = torch.cat([acc, blk[new]])
        if limit is not None and len(kept) >= limit:
            break
    return np.asarray(kept[:limit], dtype=np.int64)


def make_loader(
    st: Store, keys: Sequence[str], cfg: TrainConfig, images: np.ndarray, d: Dist
) -> ChunkLoader:
    if cfg.batch_tokens % d.world:
        raise TrainError(
            f"batch_tokens {cfg.batch_tokens} is not divisible by the {d.world} DDP processes"
        )
    try:
        return ChunkLoader(
            st, list(keys), cfg.batch_tokens, images=images, seed=cfg.seed,
            buffer_chunks=cfg.buffer_chunks or None, rank=d.rank, world_size=d.world, shuffle=cfg.shuffle,
            # on CUDA the loader copies each batch ahead, pinned and non_blocking on a side stream
            # (int8 batches are dequantised there); on the CPU batches stay on the host
            device=d.device if d.device.type == "cuda" else None, pin_memory=d.device.type == "cuda",
        )  # fmt: skip
    except ValueError as e:
        raise TrainError(f"cannot load batches from {st.path}: {e}") from None


def check_finite(
    st: Store, keys: Sequence[str], acts: Sequence[Tensor], train_images: np.ndarray, world: int = 1
) -> None:
    """Stop with the backbone and chunk when a batch holds NaN/inf activations (on any rank)."""
    bad = next((j for j, a in enumerate(acts) if not bool(torch.isfinite(a).all())), -1)
    # every rank must stop together, not hang in the next all_reduce
    bad = (
        int(max_over_ranks(torch.tensor([bad + 1], dtype=torch.long, device=acts[0].device), world))
        - 1
    )
    if bad >= 0:
        raise_non_finite(st, keys[bad], train_images)


def raise_non_finite(st: Store, key: str, images: np.ndarray | None = None) -> None:
    """Find the first store chunk of `key` with NaN/inf on the given images and stop with it."""
    rows = np.repeat(st.valid if images is None else images, st.tokens_per_image)
    for c in range(st.n_chunks):
        r0, r1 = st.chunk_rows(c)
        if not np.isfinite(st.read_chunk(key, c)[rows[r0:r1]]).all():
            raise TrainError(
                f"non-finite activations (NaN/inf) in backbone {key!r}, store chunk {c} (rows {r0}..{r1})"
            )
    raise TrainError(f"non-finite activations (NaN/inf) in backbone {key!r}")
