"""Per-concept, per-model statistics -> the set of models each learned concept lives in.

Pure numpy, calibrated on planted truth (`usae synth --groups ...`, benchmarks/recovery.py).
A concept lives in model i when model i's share of it, relative to the model where it is
strongest, passes a threshold:

- with per-model decoder gains (a recipe that learns them): the gain ratio g_ik / max_i g_ik;
  a concept absent from a model has its gain driven towards 0 there, while planted strengths
  differ by at most ~4x between member models;
- without gains: the energy ratio e_ik / max_i e_ik (energy = || mean_tokens(z_ik) D_i[k] ||,
  codes from model i's own tokens), which BatchNorm does not equalise the way it equalises
  fire counts.
Dead concepts (no fires anywhere) live nowhere. Fire counts per model are NOT a default veto:
on planted truth ~8% of (recovered concept, member model) pairs never fire from that model's
own encoder (the model routes the concept to a duplicate learned concept) while its decoder
row and gain are right; a veto (``fire_ratio`` > 0) turned 100% into 85% correct member sets.
"""

from __future__ import annotations

import numpy as np

GAIN_RATIO = 0.25
"""Member when g_ik >= GAIN_RATIO * max_i g_ik. Calibrated with benchmarks/recovery.py (recipe fid,
3000 steps) on planted m2, m3, m3hard, m5: over recovered concepts, members' ratios >= 0.274
(1st percentile 0.33), non-members' <= 0.282 (99th percentile 0.21); 0.25 gave 98.9-100% correct
member sets on each store (0.2: 94.6-100%, 0.3: 97.8-100%)."""
ENERGY_RATIO = 0.25
"""Member when e_ik >= ENERGY_RATIO * max_i e_ik, for models without gains."""
FIRE_RATIO = 0.0
"""Never a member where the concept fires on < FIRE_RATIO x its most-firing model's count (0: off)."""


def member_matrix(
    fires_mk: np.ndarray,
    energy_mk: np.ndarray,
    gain_mk: np.ndarray | None = None,
    *,
    gain_ratio: float = GAIN_RATIO,
    energy_ratio: float = ENERGY_RATIO,
    fire_ratio: float = FIRE_RATIO,
) -> np.ndarray:
    """(M, m) bool member matrix from per-model fire counts, energies and (optional) decoder gains.

    fires_mk: (M, m) tokens on which concept k fires when model i is the source.
    energy_mk: (M, m) || mean_tokens(z_ik) * decoder row_ik || (row with its gain, if any).
    gain_mk: (M, m) per-model decoder gains (>= 0), or None for unit-norm decoders.
    """
    fires = np.asarray(fires_mk, np.float64)
    energy = np.asarray(energy_mk, np.float64)
    if fires.shape != energy.shape or fires.ndim != 2:
        raise ValueError(f"fires {fires.shape} and energy {energy.shape} must both be (M, m)")
    if gain_mk is not None:
        score = np.asarray(gain_mk, np.float64)
        if score.shape != fires.shape:
            raise ValueError(f"gain {score.shape} must be (M, m) like fires {fires.shape}")
        thr = gain_ratio
    else:
        score, thr = energy, energy_ratio
    live = fires.max(0) > 0
    rel = score / np.maximum(score.max(0, keepdims=True), 1e-30)
    fired = (
        fires >= fire_ratio * fires.max(0, keepdims=True)
        if fire_ratio > 0
        else np.ones(fires.shape, bool)
    )
    return (rel >= thr) & fired & live[None, :]


def twin_agreement(
    dec_i_md: np.ndarray,
    dec_j_md: np.ndarray,
    firing_entropy_m: np.ndarray,
    dead_m: np.ndarray,
    members_mk: np.ndarray,
    i: int,
    j: int,
) -> dict:
    """What two identical backbones i and j must show (the twins check): over the live concepts,
    the share at firing entropy >= 0.9, the median cosine between each concept's two decoder
    rows, and the share called a member of both."""
    live = ~np.asarray(dead_m, bool)
    a = dec_i_md / np.maximum(np.linalg.norm(dec_i_md, axis=1, keepdims=True), 1e-12)
    b = dec_j_md / np.maximum(np.linalg.norm(dec_j_md, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(1)[live]
    fe = np.asarray(firing_entropy_m)[live]
    both = (np.asarray(members_mk)[i] & np.asarray(members_mk)[j])[live]
    return {
        "live": int(live.sum()),
        "fe_share": float(np.mean(fe >= 0.9)) if live.any() else float("nan"),
        "median_cos": float(np.median(cos)) if live.any() else float("nan"),
        "both_share": float(np.mean(both)) if live.any() else float("nan"),
    }
