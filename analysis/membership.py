"""Per-concept, per-model statistics -> the set of models each learned concept lives in.

Pure numpy. Three rules (``MEMBER_RULES``; `usae analyze --member-rule`):

``need`` (the default, ``DEFAULT_RULE``): concept k lives in model i when model i's
reconstruction needs it, measured on model i alone: over the (held-out) tokens where k fires,
from every source model that decodes into i, the share of i's activation along k's unit decoder
direction that k's contribution explains (``metrics.FitStats.need_mm``: the loss that taking k
away adds, over the loss along its direction without it; 1 when the contribution is exactly
what the data has there, <= 0 when it explains nothing or moves the reconstruction away from
the data). k is a member where that share is >= ``NEED_SHARE``, or >= ``NEED_RELATIVE`` x its
share in the model that needs it most. The statistic is a share, so it does not depend on k's
strength in model i relative to the others (a weak member's contribution still explains its
own direction), nor on the model's scale: on planted truth members read 0.9-1.0 and absent
models <= 0.15 whatever the gains, offsets and Zipf exponent, which is why the two constants
matter little there (benchmarks/membership.py). It reads no centred correlation, the statistic
the ``fit`` rule fails on with real features (below): on a real-feature concept the code's
level (fires or not) carries the signal, which centring on the firing tokens removes. A live
concept no model needs (share <= 0 everywhere: its contribution does not help any model's
held-out reconstruction; 13-22% of the live concepts of the tiny real-feature twins) takes the
``gain`` rule's member set, and is counted in metrics.json (``needed_nowhere``). On a model
without gains the need rule takes the energy rule's sets (``need_applies``).

``fit`` (`--member-rule fit`): concept k lives in model i when model i's activations need it, tested
on model i alone: over the tokens where k fires (codes z > tau, from every source model that
decodes into i), the correlation between z and e, model i's activation along k's unit decoder
direction once every other concept and the decoder bias are taken away (the residual with k
put back), reaches ``FIT_CORR``, and is significant: its one-sided p-value (t = r sqrt(dof /
(1 - r^2)), Student's t with dof degrees of freedom) is <= ``FIT_ALPHA`` / (M m), a 5%
family-wise error over every (model, concept) test of the run. The correlation is taken
within sources (each source's codes centred on their own mean). With decoder gains, the model
must also use the concept where the data has it: the slope b of e on z (what the data says k
adds per unit code) is at most ``FIT_GAIN_SLACK`` x the learned gain g_ik. Members have
b / g = 0.54-1.04 on planted truth (the gain fits the data); a direction whose gain training
drove to ~0 can still pick up a weak link (r 0.35 at gain 0.03: b / g = 10), and then the
learned concept does not live there. Where
k is absent from model i, e does not follow its code whatever decoder gain was learned (r ~ 0,
spread 1/sqrt(n)); where it lives, e follows z (r near 1 less the noise along the direction),
whatever k's strength in model i relative to the others. The test is per model, so it reads no
ratio between models and no constant tied to the range of strengths a dataset happens to have.
The statistics are ``metrics.fit_stats`` of the analysis pass's fit sums (``Sums.fit_6mmm``).

The fit rule is right on planted stores but fails on real features: most live concepts of a
real-feature twin store fall below ``FIT_CORR`` in both twins and so live nowhere
(docs/recipes.md).

``gain`` (the rule before ``need``; calibrated on planted truth, `usae synth --groups ...`,
benchmarks/recovery.py): a concept lives in model i when model i's share of it, relative to
the model where it is strongest, passes a threshold:

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

from typing import NamedTuple

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
FIT_CORR = 0.3
"""Fit rule: member when the correlation of code and residual along the direction is >= this
(the code explains >= 9% of the variance along its direction: an effect size, which a large
evaluation set cannot pass by significance alone). Chosen on planted m3, m3hard (members >= 0.83,
absent <= 0.20) and lowered from 0.5 after h8hard (noise 0.1, member strengths 0.3-3) showed weak
members at 0.40 (benchmarks/membership.py)."""
FIT_ALPHA = 0.05
"""Fit rule: ... and significant at family-wise error FIT_ALPHA over the M x m tests (Bonferroni)."""
FIT_GAIN_SLACK = 2.0
"""Fit rule, models with gains: ... and the data's slope is <= FIT_GAIN_SLACK x the learned gain."""
NEED_SHARE = 0.5
"""Need rule: member where k's contribution explains >= this share of the activation along its
direction on its tokens (``metrics.FitStats.need_mm``) ..."""
NEED_RELATIVE = 0.25
"""... or >= this fraction of its need in the model that needs it most. Both chosen on planted
m3, m3hard, h3ext, h5hard, h8hard (any share in 0.2-0.5 and fraction in 0.25-0.5 gave the same
member sets there) and on the tiny real-feature twins (fraction 0.25: 94% of the live concepts
of an affine twin members of both, 0.5: 90%); then scored once on the held-out stores of
benchmarks/membership.py."""
DEFAULT_RULE = "need"
"""The member rule of `usae analyze` and `usae compare` unless told otherwise."""
MEMBER_RULES = ("need", "fit", "gain")
"""``need``: the reconstruction-need test; ``fit``: the per-model fit test; ``gain``: the gain
(or energy) ratio rule."""


def need_applies(rule: str, gains: bool) -> bool:
    """Whether the need rule decides: the rule asked for is ``need`` and the model learns gains.
    A model without gains (`--recipe paper`) has unit decoder rows that cannot express a
    concept's strength in each backbone, so its need reads a strength mismatch as absence (on
    the paper recipe's planted runs, benchmarks/recovery.py: 68-91% of member sets right,
    against 89-100% by energies); there the need rule takes the energy rule's sets."""
    return rule == "need" and gains


def needed_nowhere(need_mk: np.ndarray, fires_mk: np.ndarray) -> np.ndarray:
    """(m,) live concepts whose reconstruction need is <= 0 (or unread: NaN) in every model."""
    need = np.nan_to_num(np.asarray(need_mk, np.float64), nan=0.0)
    return (need.max(0) <= 0) & (np.asarray(fires_mk).max(0) > 0)


def need_members(
    need_mk: np.ndarray,
    fires_mk: np.ndarray,
    fallback_mk: np.ndarray,
    *,
    share: float = NEED_SHARE,
    relative: float = NEED_RELATIVE,
) -> np.ndarray:
    """(M, m) bool member matrix of the need rule (module docstring).

    need_mk: (M, m) reconstruction need (NaN: no codes read, counted as 0);
    fires_mk: (M, m) fire counts (a concept that never fires lives nowhere);
    fallback_mk: (M, m) the member sets used for a concept no model needs (need <= 0 in all).
    """
    need = np.nan_to_num(np.asarray(need_mk, np.float64), nan=0.0)
    fires = np.asarray(fires_mk, np.float64)
    fallback = np.asarray(fallback_mk, bool)
    if not (need.shape == fires.shape == fallback.shape) or need.ndim != 2:
        raise ValueError(
            f"need {need.shape}, fires {fires.shape}, fallback {fallback.shape} must all be (M, m)"
        )
    best = need.max(0, keepdims=True)
    ok = (need >= share) | (need >= relative * best)
    return (
        np.where(needed_nowhere(need, fires)[None, :], fallback, ok) & (fires.max(0) > 0)[None, :]
    )


def fit_members(
    fires_mk: np.ndarray,
    corr_mk: np.ndarray,
    dof_mk: np.ndarray,
    slope_mk: np.ndarray | None = None,
    gain_mk: np.ndarray | None = None,
    *,
    corr: float = FIT_CORR,
    alpha: float = FIT_ALPHA,
    gain_slack: float = FIT_GAIN_SLACK,
) -> np.ndarray:
    """(M, m) bool member matrix of the fit rule (module docstring).

    fires_mk: (M, m) fire counts (a concept that never fires lives nowhere);
    corr_mk: (M, m) correlation of code and residual along the direction (NaN: untestable);
    dof_mk: (M, m) its degrees of freedom (``metrics.FitStats.dof_mm``);
    slope_mk, gain_mk: (M, m) the data's slope and the learned gains (both or neither: without
    gains the slope is not checked).
    """
    fires = np.asarray(fires_mk, np.float64)
    r = np.asarray(corr_mk, np.float64)
    dof = np.asarray(dof_mk, np.float64)
    if not (fires.shape == r.shape == dof.shape) or fires.ndim != 2:
        raise ValueError(f"fires {fires.shape}, corr {r.shape}, dof {dof.shape} must all be (M, m)")
    from scipy import stats

    ok = np.isfinite(r) & (r >= corr) & (dof >= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(ok, r * np.sqrt(np.maximum(dof, 1) / np.maximum(1 - r * r, 1e-300)), 0.0)
    p = np.where(ok, stats.t.sf(t, np.maximum(dof, 1)), 1.0)
    ok &= p <= alpha / max(r.size, 1)
    if gain_mk is not None:
        if slope_mk is None:
            raise ValueError("the gain check needs the slopes")
        g, b = np.asarray(gain_mk, np.float64), np.asarray(slope_mk, np.float64)
        if g.shape != r.shape or b.shape != r.shape:
            raise ValueError(f"gain {g.shape} and slope {b.shape} must be (M, m) like {r.shape}")
        ok &= np.nan_to_num(b, nan=np.inf) <= gain_slack * g
    return ok & (fires.max(0) > 0)[None, :]


def members_of(rule: str, t, gain_mk: np.ndarray | None = None) -> np.ndarray:
    """(M, m) member matrix of a concept table (`usae.analysis.metrics.ConceptTable`) by rule
    ``need`` (needs the table's fit statistics; the gain rule for concepts no model needs, and
    for a model without gains: ``need_applies``), ``fit`` (the same statistics; with gains, the
    slope check too) or ``gain`` (gains when given, else energies). Pass ``gain_mk`` only for a
    model that learns gains."""
    if rule == "need" and gain_mk is None:
        return member_matrix(t.fires_mm, t.energy_mm)
    if rule == "need":
        if t.fit_need_mm is None:
            raise ValueError("the need rule needs the pass's fit sums (stream_sums(..., fit=True))")
        return need_members(
            t.fit_need_mm, t.fires_mm, member_matrix(t.fires_mm, t.energy_mm, gain_mk)
        )
    if rule == "fit":
        if t.fit_corr_mm is None:
            raise ValueError("the fit rule needs the pass's fit sums (stream_sums(..., fit=True))")
        slope = None if gain_mk is None else t.fit_slope_mm
        return fit_members(t.fires_mm, t.fit_corr_mm, t.fit_dof_mm, slope, gain_mk)
    if rule == "gain":
        return member_matrix(t.fires_mm, t.energy_mm, gain_mk)
    raise ValueError(f"member rule must be one of {MEMBER_RULES}, got {rule!r}")


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
    map_dd: np.ndarray | None = None,
    cosine: float = 0.9,
) -> dict:
    """What two identical backbones i and j must show (the twins check): over the live concepts,
    the share at firing entropy >= 0.9, the median cosine between each concept's two decoder
    rows, and the share called a member of both. With `map_dd` (j's activations are i's times
    A, row vectors: a twin in another basis) also the mapped cosine: i's row times A,
    renormalised, against j's row (its median and the share >= `cosine`); without a map the
    mapped cosine is the plain one."""
    live = ~np.asarray(dead_m, bool)

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(dec_i_md), unit(dec_j_md)
    cos = (a * b).sum(1)[live]
    mapped = cos if map_dd is None else (unit(a @ np.asarray(map_dd, a.dtype)) * b).sum(1)[live]
    fe = np.asarray(firing_entropy_m)[live]
    both = (np.asarray(members_mk)[i] & np.asarray(members_mk)[j])[live]

    def stat(f):
        return float(f()) if live.any() else float("nan")

    return {
        "live": int(live.sum()),
        "fe_share": stat(lambda: np.mean(fe >= 0.9)),
        "median_cos": stat(lambda: np.median(cos)),
        "median_mapped_cos": stat(lambda: np.median(mapped)),
        "mapped_cos_share": stat(lambda: np.mean(mapped >= cosine)),
        "both_share": stat(lambda: np.mean(both)),
    }


def member_labels(members_mk: np.ndarray, keys) -> list[str]:
    """Each concept's member set as text: "all", "dinov2+siglip", "vit", or "" (dead)."""
    keys = list(keys)
    out = []
    for col in np.asarray(members_mk, bool).T:
        if col.all() and len(keys) > 1:
            out.append("all")
        else:
            out.append("+".join(k for k, b in zip(keys, col, strict=True) if b))
    return out


DUPLICATE_COSINE = 0.9
"""Two concepts are the same direction when their decoder rows agree at this mean cosine."""


def duplicates(
    decoders: list[np.ndarray],
    members_mk: np.ndarray,
    fires_mk: np.ndarray,
    cosine: float = DUPLICATE_COSINE,
    block: int = 1024,
) -> np.ndarray:
    """Concepts learned twice: pairs (k, k2), k < k2, both live, whose decoder rows agree at mean
    cosine >= `cosine` over the models where both are members, while they fire from different
    models (their per-model firing profiles overlap by less than half: the same concept, reached
    through one model's encoder as k and another's as k2). Returns an (n, 2) int array."""
    members = np.asarray(members_mk, bool)
    fires = np.asarray(fires_mk, np.float64)
    live = fires.sum(0) > 0
    unit = [d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12) for d in decoders]
    prof = fires / np.maximum(fires.sum(0, keepdims=True), 1)  # (M, m) share of fires per model
    m = members.shape[1]
    out = []
    for a in range(0, m, block):
        b = min(a + block, m)
        num = np.zeros((b - a, m))
        den = np.zeros((b - a, m))
        for i, u in enumerate(unit):
            both = members[i, a:b, None] & members[i, None, :]
            num += np.where(both, u[a:b] @ u.T, 0.0)
            den += both
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_cos = np.where(den > 0, num / den, -1.0)
        overlap = np.minimum(prof[:, a:b, None], prof[:, None, :]).sum(0)  # 1: same firing profile
        hit = (mean_cos >= cosine) & (overlap < 0.5) & live[a:b, None] & live[None, :]
        rows, cols = np.nonzero(hit)
        keep = cols > rows + a
        out.extend(zip((rows + a)[keep].tolist(), cols[keep].tolist(), strict=True))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


# ---------------------------------------------------------------- a trained model's sharing
class Sharing(NamedTuple):
    """Which backbones each concept lives in (`usae.analysis.membership`)."""

    members_mk: np.ndarray
    """(M, m) bool: concept k lives in backbone i."""
    labels: list[str]
    """Each concept's member set as text ("all", "dinov2+siglip", "" when dead)."""
    duplicate_of: np.ndarray
    """(m,) the concept learned as the same direction but firing from other backbones (-1: none)."""
    pairs: np.ndarray
    """(n, 2) the duplicate pairs."""
    needed_nowhere_m: np.ndarray
    """(m,) bool: live, and no model's reconstruction needs it (need rule only: its member set is
    the gain rule's)."""


def sharing(model, keys, t, gains: np.ndarray, rule: str = DEFAULT_RULE) -> Sharing:
    """A trained USAE and its concept table (`usae.analysis.metrics.ConceptTable`) -> member
    sets by ``rule`` (``members_of``: the need or fit test, or the decoder gains of models that
    learn them, else the energies), and the concepts learned twice (same decoder direction, firing
    from different backbones)."""
    import torch

    members = members_of(rule, t, gains if model.spec.gains else None)
    with torch.no_grad():
        dec = [model.decoder_weight(j).float().cpu().numpy() for j in range(model.n_models)]
    pairs = (
        duplicates(dec, members, t.fires_mm)
        if not model.spec.independent
        else np.zeros((0, 2), int)
    )
    dup = np.full(members.shape[1], -1, dtype=np.int64)
    for a, b in pairs:
        dup[a] = b if dup[a] < 0 else dup[a]
        dup[b] = a if dup[b] < 0 else dup[b]
    nowhere = (
        needed_nowhere(t.fit_need_mm, t.fires_mm)
        if need_applies(rule, model.spec.gains)
        else np.zeros(members.shape[1], bool)
    )
    return Sharing(members, member_labels(members, keys), dup, pairs, nowhere)


def membership_summary(sh: Sharing, rule: str) -> dict:
    """metrics.json's ``membership``: concepts per member set, and the duplicate pairs."""
    labels: dict[str, int] = {}
    for lab in sh.labels:
        if lab:
            labels[lab] = labels.get(lab, 0) + 1
    return {
        "rule": rule,
        "by_set": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
        "in_all": int(sum(lab == "all" for lab in sh.labels)),
        "duplicate_pairs": sh.pairs.tolist(),
        "needed_nowhere": int(sh.needed_nowhere_m.sum()),
    }
