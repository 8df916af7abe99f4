"""Generator settings -> a planted-concept activation store (``usae synth``) and its ground truth.

The store has the standard layout (``usae.pipeline.store``, source="synth"), so every later
stage reads it like an extracted one. The generator plants:

- concept groups, each living in a chosen subset of the models (``--groups``, below): a concept
  has its own random unit direction in every model it lives in and fires on the same tokens in
  all of them, with magnitude = shared magnitude x a fixed per-model gain;
- sparse non-negative codes: concept c fires on a token with probability ``rate[c]`` (about
  ``active`` concepts per token and model), magnitudes lognormal;
- gaussian noise per model, and (optionally) a per-model scalar scale and offset so that the
  trainer's standardisation matters.

Harder structure, all off by default (then the store is bit for bit what the first generator
wrote): per-model log-uniform gains (``--gain 0.5,2``), a dense per-channel offset vector per
model (``--channel-offset``), Zipf concept frequencies (``--zipf``) and anisotropic noise with a
power-law spectrum in a random basis (``--noise-decay``), and a random linear map of chosen
models' activations (``--transform rotate|affine``, below).

Model i's tokens are ``x_i = scale_i * (z_i @ D_i + noise_i + o_i) + offset_i``, with o_i the
per-channel offset (zero unless ``--channel-offset``).

Transform (``--transform``, for the models ``--transform-models``, default every model but the
first): model i's signal is drawn as above and then put through a random (d_i, d_i) map A_i
before the scale and offset, ``x_i = scale_i * ((z_i @ D_i + noise_i + o_i) @ A_i) + offset_i``:
the same information in another basis. ``rotate``: A = Q, a Haar-random orthogonal matrix.
``affine``: A = Q diag(s), the rotation then log-normal channel scales s_j = exp(sigma n_j)
(``--transform-sigma``), rescaled to mean s^2 = 1, so an invertible map that changes which
channels carry the power. The truth describes the mapped data: dictionary rows D_i A_i
renormalised, their norms moved into the factors (and so into the codes), o_i A_i. The map is
saved as ``map.<key>`` in the truth file and in ``_usae/maps.safetensors`` (`save_maps`).
With ``shuffle_alignment`` (a control) each model's codes are permuted across the tokens of
each chunk, so a token no longer shows the same concepts in every model.

Group spec (``--groups``), comma-separated ``SET:COUNT`` items:

| SET | concepts that live in |
|---|---|
| ``all`` | every model (universal) |
| ``only`` | one model: COUNT concepts specific to EACH model |
| ``0+2`` (indices joined by ``+``) | exactly those models (``1`` alone: specific to model 1) |

Example: ``all:32,0+1:12,1+2:12,only:12`` = 32 universal, 12 shared by models 0 and 1 only, 12 by
1 and 2 only, 12 specific to each model. Empty (the default) = ``all:U,only:S`` from
``--universal`` / ``--specific``. Global concept ids are in canonical order: ``all`` items, then
the subset items as written, then ``only`` (model 0's, model 1's, ...); a model's dictionary rows
are the concepts it lives in, in global id order (so universal rows come first).

Ground truth, ``S.zarr/_usae/truth.safetensors`` (read it with :func:`load_truth`):

| tensor | shape | meaning |
|---|---|---|
| ``dictionary.<key>`` | (n_i, d_i) f32 | unit directions of model i, global id order |
| ``concept_ids.<key>`` | (n_i,) i64 | global concept id of each row |
| ``factor.<key>`` | (n_i,) f32 | per-model magnitude factor (gain) of each row |
| ``rate`` | (C,) f32 | firing probability of each global concept |
| ``scale``, ``offset`` | (M,) f32 | per-model scalar scale and offset |
| ``members`` | (C, M) u8 | 1 where concept c lives in model i (version 2) |
| ``gain`` | (C, M) f32 | per-model magnitude factor, 0 where c is absent (version 2) |
| ``group_id`` | (C,) i64 | index of c's group in the ``groups`` metadata (version 2) |
| ``channel_offset.<key>`` | (d_i,) f32 | o_i, the per-channel offset before scale (version 2) |
| ``label_concept`` | (L,) i64 | the universal concept tied to each planted label (``--labels``) |
| ``image_label`` | (N,) i64 | each image's true label (the store's ``label`` array is permuted with ``--shuffle-labels``) |
| ``map.<key>`` | (d_i, d_i) f32 | A_i, only for the models a ``--transform`` mapped |
| ``codes.<key>.indptr/.concept/.value`` | CSR over rows | per-token code z_i (only when
  ``save_codes``): row r's active global ids and magnitudes are
  ``concept[indptr[r]:indptr[r+1]]``, ``value[...]`` |

Planted labels (``--labels L``, off by default): each image gets one of L labels (uniform), and
label l is tied to universal concept l (the first L universal ids): that concept fires on
``--label-tokens`` of the tokens of every image of label l and, on images of other labels, on a
token with probability ``LABEL_STRAY / T`` (rare); no other concept depends on the label, so the
label is visible only through its concept. The store gets a ``label`` array of names
(``label0``...); ``--shuffle-labels`` permutes that array across images (a control).

Metadata (strings): ``format`` = "usae-synth-truth", ``version``, ``backbones`` (JSON list),
``n_universal``, ``n_specific`` (JSON list: concepts living in model i alone), ``config`` (JSON of
the SynthConfig), ``groups`` (JSON list of {"label", "members"}; version 2), ``labels`` (JSON list of the planted
label names; only with ``--labels``). Version-1 files
(no members/gain) still load: their members and gains are derived from concept ids and factors.

:func:`recovery` (`usae.trainer.truth`) scores a trained USAE against this truth (the
planted-recovery metric), per group, and scores a predicted member set per learned concept.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer.truth import TRUTH_FILE, TRUTH_FORMAT, TRUTH_VERSION, group_label

from usae.runtime import atomic_path, progress_bar

if TYPE_CHECKING:
    pass

TRANSFORMS = ("none", "rotate", "affine")
_MAG_SIGMA = 0.4  # lognormal sigma of concept magnitudes (median 1)
_CHUNK_BYTES = 16 * 2**20  # target chunk size of the widest backbone when chunk_images=0


@dataclass(frozen=True)
class SynthConfig:
    """A planted-concept store with known ground truth, in the standard store layout."""

    store: Path
    """Output store path (S.zarr); an existing store with other settings is refused."""
    models: int = 3
    """Number of models (backbone groups) M."""
    dims: tuple[int, ...] = (384, 768, 768)
    """Width of each model (one value is broadcast to all models)."""
    names: tuple[str, ...] | None = None
    """Backbone keys; default m0, m1, ..."""
    universal: int = 64
    """U, universal concepts (a direction in every model, fire together)."""
    specific: int = 32
    """S, specific concepts per model (a direction in one model only)."""
    tokens: int = 200_000
    """Total tokens (rows); rounded up to whole images."""
    tokens_per_image: int = 16
    """Tokens per image T (the grid is chosen with grid_h * grid_w = T)."""
    active: float = 4.0
    """Expected active concepts per token and model."""
    noise: float = 0.05
    """Gaussian noise std relative to the clean signal's per-channel RMS."""
    seed: int = 0
    """Seed of the generator (dictionaries, rates, codes, noise)."""
    shuffle_alignment: bool = False
    """Control: permute each model's codes across tokens, destroying cross-model alignment."""
    chunk_images: int = 0
    """Images per store chunk; 0 = about 16 MB chunks for the widest model."""
    scale_offset: bool = True
    """Give each model a random scalar scale and offset (so standardisation matters)."""
    save_codes: bool = True
    """Save the per-token codes in the truth file (CSR; ~12 bytes per active concept)."""
    groups: str = ""
    """Concept groups by member set, e.g. "all:32,0+1:12,only:12" (module docstring); "" = all:U,only:S."""
    gain: tuple[float, float] | None = None
    """(lo, hi): per-model gain of every concept, log-uniform in [lo, hi] (replaces the 0.5-1.5 factors)."""
    channel_offset: float = 0.0
    """Std of a dense per-channel offset vector per model, relative to the signal's per-channel RMS."""
    zipf: float = 0.0
    """Zipf exponent of concept frequencies (rate ~ 1/rank^zipf, random ranks); 0 = uniform 0.5-1.5 weights."""
    noise_decay: float = 0.0
    """Anisotropic noise: std of the j-th axis of a random basis ~ j^-noise_decay (same total power); 0 = isotropic."""
    labels: int = 0
    """Planted labels: each image gets one of N labels, each tied to one universal concept (module docstring); 0 = none."""
    label_tokens: float = 0.25
    """Labels: share of an image's tokens on which its label's concept fires."""
    shuffle_labels: bool = False
    """Control: the store's label array is permuted across images (the concepts still follow the true labels)."""
    transform: str = "none"
    """none, rotate (a random orthogonal map of a model's activations) or affine (a random rotation then log-normal channel scales); the truth is mapped alike (module docstring)."""
    transform_models: tuple[int, ...] = ()
    """Indices of the models that --transform maps (empty: every model but the first)."""
    transform_sigma: float = 0.5
    """Log-normal sigma of the affine map's channel scales."""

    def mapped_models(self) -> tuple[int, ...]:
        """Models whose activations --transform maps (none without one)."""
        if self.transform == "none":
            return ()
        return tuple(self.transform_models) or tuple(range(1, self.models))

    def widths(self) -> tuple[int, ...]:
        if len(self.dims) == 1:
            return tuple(self.dims) * self.models
        return tuple(self.dims)

    def keys(self) -> tuple[str, ...]:
        return tuple(self.names) if self.names else tuple(f"m{i}" for i in range(self.models))

    def n_images(self) -> int:
        return -(-self.tokens // self.tokens_per_image)

    def group_items(self) -> list[tuple[str, int]]:
        """The group spec as (SET, COUNT) items; the legacy spec when ``groups`` is empty."""
        return (
            parse_groups(self.groups)
            if self.groups.strip()
            else [("all", self.universal), ("only", self.specific)]
        )

    def is_legacy(self) -> bool:
        """True when no option of the extended generator is used (then the store is the first generator's)."""
        return (
            not self.groups.strip()
            and self.gain is None
            and self.channel_offset == 0
            and self.zipf == 0
            and self.noise_decay == 0
            and self.labels == 0
            and self.transform == "none"
        )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a user-facing message on inconsistent settings."""
        if self.models < 1:
            raise ValueError("--models must be >= 1")
        if len(self.dims) not in (1, self.models):
            raise ValueError(
                f"--dims has {len(self.dims)} values, expected 1 or --models={self.models}"
            )
        if self.names is not None and len(self.names) != self.models:
            raise ValueError(
                f"--names has {len(self.names)} values, expected --models={self.models}"
            )
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ValueError("--names must be distinct")
        if min(self.widths()) < 1 or self.universal < 0 or self.specific < 0:
            raise ValueError("--dims must be >= 1, --universal and --specific >= 0")
        groups = make_groups(self.group_items(), self.models)  # raises on a bad spec
        n_c = sum(len(g.ids) for g in groups)
        if n_c < 1:
            raise ValueError(
                "need at least one concept (--universal + --specific >= 1, or --groups)"
            )
        if self.tokens_per_image < 1 or self.tokens < self.tokens_per_image:
            raise ValueError("need --tokens >= --tokens-per-image >= 1")
        per_model = [sum(len(g.ids) for g in groups if i in g.members) for i in range(self.models)]
        if not 0 < self.active <= float(np.mean(per_model)):
            raise ValueError("--active must be in (0, concepts per model]")
        if self.noise < 0 or self.chunk_images < 0:
            raise ValueError("--noise and --chunk-images must be >= 0")
        if self.gain is not None and not (len(self.gain) == 2 and 0 < self.gain[0] <= self.gain[1]):
            raise ValueError(f"--gain must be LO,HI with 0 < LO <= HI, got {self.gain}")
        if min(self.channel_offset, self.zipf, self.noise_decay) < 0:
            raise ValueError("--channel-offset, --zipf and --noise-decay must be >= 0")
        n_univ = sum(
            len(g.ids) for g in groups if len(g.members) == self.models and not g.per_model
        )
        if self.labels < 0 or self.labels == 1 or self.labels > n_univ:
            raise ValueError(
                f"--labels must be 0 or in [2, {n_univ}] (one universal concept per label), got {self.labels}"
            )
        if self.labels and not 0 < self.label_tokens <= 1:
            raise ValueError("--label-tokens must be in (0, 1]")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"--transform must be {', '.join(TRANSFORMS)}, got {self.transform!r}")
        bad = [i for i in self.transform_models if not 0 <= i < self.models]
        if bad or len(set(self.transform_models)) != len(self.transform_models):
            raise ValueError(
                f"--transform-models must be distinct indices in [0, {self.models}), got {self.transform_models}"
            )
        if self.transform_sigma < 0:
            raise ValueError("--transform-sigma must be >= 0")


class SynthResult(NamedTuple):
    """What ``run_synth`` wrote."""

    path: Path
    """The store."""
    truth_path: Path
    """The ground-truth safetensors file."""
    n_images: int
    """Images in the store."""
    n_rows: int
    """Token rows per backbone."""
    grid: tuple[int, int]
    """(grid_h, grid_w), grid_h * grid_w = tokens per image."""
    chunk_images: int
    """Images per chunk."""


# ---------------------------------------------------------------- group spec
class Group(NamedTuple):
    """One concept group: the models its concepts live in and their global ids."""

    label: str
    """"all", or the member indices joined by "+"."""
    members: tuple[int, ...]
    """Model indices the concepts live in (sorted)."""
    ids: tuple[int, ...]
    """Global concept ids of the group (consecutive)."""
    per_model: bool
    """True for an ``only`` block: codes are drawn per model (legacy specific concepts)."""


def parse_groups(text: str) -> list[tuple[str, int]]:
    """``"all:32,0+1:12,only:12"`` -> [("all", 32), ("0+1", 12), ("only", 12)] (syntax checks only)."""
    items = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        head, sep, count = item.rpartition(":")
        head = head.strip().lower()
        if not sep or not head:
            raise ValueError(
                f"--groups item {item!r} must be SET:COUNT (SET = all, only or indices like 0+1)"
            )
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--groups item {item!r}: COUNT must be an integer") from None
        if n < 0:
            raise ValueError(f"--groups item {item!r}: COUNT must be >= 0")
        if head not in ("all", "only"):
            try:
                idx = [int(x) for x in head.split("+")]
            except ValueError:
                raise ValueError(
                    f"--groups item {item!r}: SET must be all, only or model indices joined by +"
                ) from None
            if len(set(idx)) != len(idx) or min(idx) < 0:
                raise ValueError(f"--groups item {item!r}: model indices must be distinct and >= 0")
            head = "+".join(str(i) for i in sorted(idx))
        items.append((head, n))
    if not items:
        raise ValueError("--groups is empty")
    return items


def make_groups(items: list[tuple[str, int]], n_models: int) -> list[Group]:
    """Expand parsed items into groups with global ids in canonical order: all, subsets, only."""
    every = tuple(range(n_models))
    for head, _ in items:
        if head not in ("all", "only") and max(int(x) for x in head.split("+")) >= n_models:
            raise ValueError(f"--groups set {head!r} names a model >= --models={n_models}")
    ordered = [(every, n, False) for h, n in items if h == "all"]
    ordered += [
        (tuple(int(x) for x in h.split("+")), n, False)
        for h, n in items
        if h not in ("all", "only")
    ]
    n_only = sum(n for h, n in items if h == "only")
    ordered += [((i,), n_only, True) for i in range(n_models)] if n_only else []
    groups, c = [], 0
    for members, n, per_model in ordered:
        if n:
            label = str(members[0]) if per_model else group_label(members, n_models)
            groups.append(Group(label, members, tuple(range(c, c + n)), per_model))
        c += n
    return groups


# ---------------------------------------------------------------- generator
class _Plan(NamedTuple):
    """Everything fixed before the first token: directions, rates, factors, scales."""

    dictionaries: list[np.ndarray]
    concept_ids: list[np.ndarray]
    factors: list[np.ndarray]
    rate: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    noise_std: np.ndarray
    groups: list[Group]
    shared_ids: np.ndarray
    """Global ids whose codes are drawn once for all member models (every non-``only`` group)."""
    members: np.ndarray
    """(C, M) bool."""
    channel_offsets: list[np.ndarray]
    """Per model (d_i,) f32 per-channel offset (zeros when off)."""
    noise_basis: list[np.ndarray | None]
    """Per model (d_i, d_i) f32: noise = eps @ basis (spectrum x orthogonal); None = isotropic."""
    maps: list[np.ndarray | None] = []
    """Per model (d_i, d_i) f32 A_i of --transform (None: not mapped)."""


def choose_grid(t: int) -> tuple[int, int]:
    """(h, w) with h * w = t and h the largest divisor <= sqrt(t)."""
    h = max(d for d in range(1, math.isqrt(t) + 1) if t % d == 0)
    return h, t // h


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def _extra_rng(cfg: SynthConfig, what: int) -> np.random.Generator:
    """Stream of one extended option: never touches the legacy streams, so defaults stay bit-exact."""
    return np.random.default_rng([cfg.seed, 4, what])


def _zipf_weights(cfg: SynthConfig, n: int) -> np.ndarray:
    """Weights ~ 1/rank^zipf over a random ranking, normalised to mean 1."""
    rank = _extra_rng(cfg, 0).permutation(n) + 1.0
    w = rank**-cfg.zipf
    return w / w.mean()


def _noise_basis(rng: np.random.Generator, d: int, decay: float) -> np.ndarray:
    """diag(s) @ Q with Q random orthogonal and s_j ~ j^-decay, mean s^2 = 1 (noise power unchanged)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q *= np.sign(np.diag(r))
    s = np.arange(1, d + 1, dtype=np.float64) ** -decay
    s /= np.sqrt((s**2).mean())
    return (s[:, None] * q.T).astype(np.float32)


def random_map(rng: np.random.Generator, d: int, kind: str, sigma: float = 0.5) -> np.ndarray:
    """A (d, d) float64 map for row vectors (x -> x @ A): rotate = Q, Haar-random orthogonal;
    affine = Q diag(s), s_j = exp(sigma n_j) rescaled to mean s^2 = 1 (invertible)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q *= np.sign(np.diag(r))
    if kind == "rotate":
        return q
    if kind != "affine":
        raise ValueError(f"transform must be rotate or affine, got {kind!r}")
    s = np.exp(sigma * rng.standard_normal(d))
    return q * (s / np.sqrt((s**2).mean()))[None, :]


def _map_plan(cfg: SynthConfig, plan: _Plan) -> _Plan:
    """The plan of the mapped data: model i's signal, noise and offset through A_i, the truth's
    rows renormalised with their norms moved into the factors (so the codes follow)."""
    rng = _extra_rng(cfg, 5)
    dicts, factors = list(plan.dictionaries), list(plan.factors)
    offsets, bases = list(plan.channel_offsets), list(plan.noise_basis)
    maps: list[np.ndarray | None] = [None] * cfg.models
    for i in cfg.mapped_models():
        d = cfg.widths()[i]
        a = random_map(rng, d, cfg.transform, cfg.transform_sigma)
        rows = dicts[i].astype(np.float64) @ a
        norm = np.linalg.norm(rows, axis=1).clip(1e-12)
        dicts[i] = (rows / norm[:, None]).astype(np.float32)
        factors[i] = (factors[i] * norm).astype(np.float32)
        offsets[i] = (offsets[i].astype(np.float64) @ a).astype(np.float32)
        basis = np.eye(d) if bases[i] is None else bases[i].astype(np.float64)
        bases[i] = (basis @ a).astype(np.float32)
        maps[i] = a.astype(np.float32)
    return plan._replace(
        dictionaries=dicts, factors=factors, channel_offsets=offsets, noise_basis=bases, maps=maps
    )


def make_plan(cfg: SynthConfig) -> _Plan:
    """Draw dictionaries, rates, factors and per-model scale/offset from the seed."""
    rng = np.random.default_rng([cfg.seed, 1])
    m = cfg.models
    groups = make_groups(cfg.group_items(), m)
    n_global = sum(len(g.ids) for g in groups)
    members = np.zeros((n_global, m), bool)
    for g in groups:
        members[np.asarray(g.ids)[:, None], np.asarray(g.members)[None, :]] = True
    shared = np.zeros(n_global, bool)
    for g in groups:
        shared[list(g.ids)] = not g.per_model
    n_per_model = members.sum(0)
    w = rng.uniform(0.5, 1.5, size=n_global)
    if cfg.zipf > 0:
        w = _zipf_weights(cfg, n_global)
    rate = np.clip(cfg.active / float(np.mean(n_per_model)) * w, 0.0, 1.0)
    if cfg.labels:  # a label's concept fires on its images' label tokens and rarely elsewhere
        rate[label_concepts(groups, cfg.labels, m)] = label_rate(cfg)
    e_mag2 = math.exp(2 * _MAG_SIGMA**2)  # E[m^2] of lognormal(0, sigma)
    dicts, ids, factors = [], [], []
    gain_rng = _extra_rng(cfg, 1)
    for i, d in enumerate(cfg.widths()):
        ids.append(np.flatnonzero(members[:, i]).astype(np.int64))
        dicts.append(_unit_rows(rng, len(ids[-1]), d).astype(np.float32))
        n_sh = int(shared[ids[-1]].sum())  # shared rows come first (canonical order)
        f = np.concatenate([rng.uniform(0.5, 1.5, size=n_sh), np.ones(len(ids[-1]) - n_sh)]).astype(
            np.float32
        )
        if cfg.gain is not None:
            lo, hi = math.log(cfg.gain[0]), math.log(cfg.gain[1])
            f = np.exp(gain_rng.uniform(lo, hi, size=len(ids[-1]))).astype(np.float32)
        factors.append(f)
    noise_std, offsets, bases = [], [], []
    off_rng, basis_rng = _extra_rng(cfg, 2), _extra_rng(cfg, 3)
    for i, d in enumerate(cfg.widths()):
        signal_ms = float((rate[ids[i]] * e_mag2 * factors[i].astype(np.float64) ** 2).sum()) / d
        noise_std.append(cfg.noise * math.sqrt(signal_ms))
        o = (
            off_rng.standard_normal(d) * cfg.channel_offset * math.sqrt(signal_ms)
            if cfg.channel_offset
            else np.zeros(d)
        )
        offsets.append(o.astype(np.float32))
        bases.append(_noise_basis(basis_rng, d, cfg.noise_decay) if cfg.noise_decay else None)
    if cfg.scale_offset:
        scale = np.exp(rng.uniform(math.log(0.5), math.log(4.0), size=m))
        offset = rng.uniform(-0.5, 0.5, size=m)
    else:
        scale, offset = np.ones(m), np.zeros(m)
    plan = _Plan(
        dicts,
        ids,
        factors,
        rate.astype(np.float32),
        scale.astype(np.float32),
        offset.astype(np.float32),
        np.asarray(noise_std, np.float32),
        groups,
        np.flatnonzero(shared),
        members,
        offsets,
        bases,
        [None] * m,
    )
    return _map_plan(cfg, plan) if cfg.transform != "none" else plan


class _ChunkCodes(NamedTuple):
    codes_rm: list[np.ndarray]
    """Per model dense codes over that model's dictionary rows (rows, n_i), float32."""


def chunk_codes(
    cfg: SynthConfig, plan: _Plan, chunk: int, rows: int, image_label_n: np.ndarray | None = None
) -> _ChunkCodes:
    """Codes of one chunk (deterministic in (seed, chunk)); a group's codes are shared by its models.

    ``image_label_n``: the true label of each of the chunk's images (``--labels``; required then).
    """
    rng = np.random.default_rng([cfg.seed, 2, chunk])
    sh = plan.shared_ids
    fire_u = rng.random((rows, len(sh))) < plan.rate[sh]
    mag_u = np.where(fire_u, rng.lognormal(0.0, _MAG_SIGMA, size=(rows, len(sh))), 0.0)
    col_of = {int(c): j for j, c in enumerate(sh)}
    if cfg.labels:
        _plant_labels(cfg, plan, chunk, mag_u, col_of, image_label_n)
    out = []
    for i in range(cfg.models):
        ids = plan.concept_ids[i]
        own_sh = [col_of[int(c)] for c in ids if int(c) in col_of]
        spec_ids = ids[len(own_sh) :]
        fire_s = rng.random((rows, len(spec_ids))) < plan.rate[spec_ids]
        mag_s = np.where(fire_s, rng.lognormal(0.0, _MAG_SIGMA, size=(rows, len(spec_ids))), 0.0)
        mine = mag_u if len(own_sh) == len(sh) else mag_u[:, own_sh]
        z = np.concatenate([mine, mag_s], axis=1) * plan.factors[i]
        if cfg.shuffle_alignment:
            z = z[rng.permutation(rows)]
        out.append(z.astype(np.float32))
    return _ChunkCodes(out)


# ---------------------------------------------------------------- planted labels
LABEL_STRAY = 0.05
"""Expected tokens per image of ANOTHER label on which a label's concept fires (rarely there)."""


def label_concepts(groups: list[Group], n_labels: int, n_models: int) -> np.ndarray:
    """Global id of the concept tied to each label: the first ``n_labels`` universal concepts."""
    univ = [c for g in groups if len(g.members) == n_models and not g.per_model for c in g.ids]
    return np.asarray(univ[:n_labels], dtype=np.int64)


def label_names(n_labels: int) -> list[str]:
    """Names of the planted labels: label0, label1, ... (zero-padded, so they sort in order)."""
    w = len(str(max(n_labels - 1, 0)))
    return [f"label{i:0{w}d}" for i in range(n_labels)]


def label_tokens_per_image(cfg: SynthConfig) -> int:
    return max(1, round(cfg.label_tokens * cfg.tokens_per_image))


def label_rate(cfg: SynthConfig) -> float:
    """Per-token firing probability of a label's concept, over the whole store (for the truth's rate)."""
    t, n = cfg.tokens_per_image, cfg.labels
    return (label_tokens_per_image(cfg) / t) / n + LABEL_STRAY / t * (1 - 1 / n)


def image_labels(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """(true, stored) label index of every image: true labels uniform over ``--labels``; stored =
    true, or a permutation of them across images with ``--shuffle-labels`` (the control)."""
    rng = _extra_rng(cfg, 5)
    true = rng.integers(0, cfg.labels, size=cfg.n_images()).astype(np.int64)
    stored = true[rng.permutation(len(true))] if cfg.shuffle_labels else true
    return true, stored


def _plant_labels(cfg, plan, chunk, mag_u, col_of, image_label_n) -> None:
    """Overwrite the label concepts' shared codes in place: label l's concept fires on
    ``label_tokens_per_image`` random tokens of every image of label l and, elsewhere, on a
    token with probability LABEL_STRAY / T; no other concept depends on the label."""
    t = cfg.tokens_per_image
    n_img = mag_u.shape[0] // t
    if image_label_n is None or len(image_label_n) != n_img:
        raise ValueError("planted labels need the label of each image of the chunk")
    rng = np.random.default_rng([cfg.seed, 6, chunk])
    order_nt = rng.random((n_img, t)).argsort(axis=1)
    on_nt = np.zeros((n_img, t), bool)
    on_nt[np.arange(n_img)[:, None], order_nt[:, : label_tokens_per_image(cfg)]] = True
    for lab, c in enumerate(label_concepts(plan.groups, cfg.labels, cfg.models)):
        fire = ((image_label_n == lab)[:, None] & on_nt).reshape(-1)
        fire |= rng.random(fire.shape[0]) < LABEL_STRAY / t
        mag = rng.lognormal(0.0, _MAG_SIGMA, size=fire.shape[0])
        mag_u[:, col_of[int(c)]] = np.where(fire, mag, 0.0)


def chunk_tokens(cfg: SynthConfig, plan: _Plan, chunk: int, codes: _ChunkCodes) -> list[np.ndarray]:
    """Token activations of one chunk per model, float32 (rows, d_i)."""
    rng = np.random.default_rng([cfg.seed, 3, chunk])
    out = []
    for i, z in enumerate(codes.codes_rm):
        x = z @ plan.dictionaries[i]
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        if plan.noise_basis[i] is not None:
            eps = eps @ plan.noise_basis[i]
        x += eps * plan.noise_std[i]
        if cfg.channel_offset or plan.maps[i] is not None:
            x += plan.channel_offsets[i]
        out.append(x * plan.scale[i] + plan.offset[i])
    return out


def _to_csr(z: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c = np.nonzero(z)
    counts = np.bincount(r, minlength=z.shape[0])
    return counts, ids[c].astype(np.int32), z[r, c].astype(np.float32)


# ---------------------------------------------------------------- run
def _chunk_images(cfg: SynthConfig) -> int:
    if cfg.chunk_images:
        return min(cfg.chunk_images, cfg.n_images())
    per_image = cfg.tokens_per_image * max(cfg.widths()) * 2
    return max(1, min(cfg.n_images(), _CHUNK_BYTES // per_image))


_EXTENDED = ("groups", "gain", "channel_offset", "zipf", "noise_decay", "labels", "label_tokens",
             "shuffle_labels", "transform", "transform_models", "transform_sigma")  # fmt: skip


def _fingerprint_of(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d.pop("store")
    default = SynthConfig(store=Path("."))
    for f in _EXTENDED:  # left out at their defaults: a store of the first generator still matches
        if getattr(cfg, f) == getattr(default, f):
            d.pop(f)
    d["generator"] = "usae-synth-1"
    return d


def _config_json(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["store"] = str(cfg.store)
    return d


def run_synth(cfg: SynthConfig, progress: bool = True) -> SynthResult:
    """Write the planted-concept store chunk by chunk (resumable), finalize it, save the truth."""

    cfg.validate()
    keys, widths = cfg.keys(), cfg.widths()
    n_images, ci = cfg.n_images(), _chunk_images(cfg)
    grid = choose_grid(cfg.tokens_per_image)
    layouts = [
        BackboneLayout(k, d, 0, {"source": "synth", "width": d, "model_index": i})
        for i, (k, d) in enumerate(zip(keys, widths, strict=True))
    ]
    st = Store.create(
        cfg.store,
        [f"synth{i:08d}" for i in range(n_images)],
        layouts,
        grid=grid,
        chunk_images=ci,
        source="synth",
        fingerprint_of=_fingerprint_of(cfg),
        extra={"synth": _config_json(cfg)},
        labels=_stored_labels(cfg),
    )
    plan = make_plan(cfg)
    true_labels = image_labels(cfg)[0] if cfg.labels else None
    done = st.committed_chunks()
    csr: list[list[tuple]] = [[] for _ in keys]
    with progress_bar(progress) as bar:
        task = bar.add_task("synth: writing chunks", total=st.n_chunks)
        for c in range(st.n_chunks):
            r0, r1 = st.chunk_rows(c)
            a, b = st.chunk_images_range(c)
            lab = None if true_labels is None else true_labels[a:b]
            codes = chunk_codes(cfg, plan, c, r1 - r0, lab)
            if cfg.save_codes:
                for i, z in enumerate(codes.codes_rm):
                    csr[i].append(_to_csr(z, plan.concept_ids[i]))
            if c not in done and not st.complete:
                toks = chunk_tokens(cfg, plan, c, codes)
                st.write_chunk(c, dict(zip(keys, toks, strict=True)), np.ones(b - a, dtype=bool))
            bar.advance(task)
    if not st.complete:
        st.finalize()
    truth_path = _save_truth(cfg, plan, csr if cfg.save_codes else None)
    maps = {k: a for k, a in zip(keys, plan.maps, strict=True) if a is not None}
    if maps:
        save_maps(cfg.store, maps, cfg.transform)
    return SynthResult(
        Path(cfg.store), truth_path, n_images, n_images * cfg.tokens_per_image, grid, ci
    )


def _stored_labels(cfg: SynthConfig) -> list[str] | None:
    """The store's ``label`` array (None without --labels)."""
    if not cfg.labels:
        return None
    names = label_names(cfg.labels)
    return [names[i] for i in image_labels(cfg)[1]]


def _save_truth(cfg: SynthConfig, plan: _Plan, csr: list[list[tuple]] | None) -> Path:
    import torch
    from safetensors.torch import save_file

    keys = cfg.keys()
    n_c, m = plan.members.shape
    gain = np.zeros((n_c, m), np.float32)
    group_id = np.zeros(n_c, np.int64)
    for gi, g in enumerate(plan.groups):
        group_id[list(g.ids)] = gi
    t: dict[str, torch.Tensor] = {
        "rate": torch.from_numpy(plan.rate),
        "scale": torch.from_numpy(plan.scale),
        "offset": torch.from_numpy(plan.offset),
        "members": torch.from_numpy(plan.members.astype(np.uint8)),
        "group_id": torch.from_numpy(group_id),
    }
    for i, k in enumerate(keys):
        gain[plan.concept_ids[i], i] = plan.factors[i]
        t[f"dictionary.{k}"] = torch.from_numpy(plan.dictionaries[i])
        t[f"concept_ids.{k}"] = torch.from_numpy(plan.concept_ids[i])
        t[f"factor.{k}"] = torch.from_numpy(plan.factors[i])
        t[f"channel_offset.{k}"] = torch.from_numpy(plan.channel_offsets[i])
        if plan.maps[i] is not None:
            t[f"map.{k}"] = torch.from_numpy(plan.maps[i])
        if csr is not None:
            counts = np.concatenate([p[0] for p in csr[i]])
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            t[f"codes.{k}.indptr"] = torch.from_numpy(indptr)
            t[f"codes.{k}.concept"] = torch.from_numpy(np.concatenate([p[1] for p in csr[i]]))
            t[f"codes.{k}.value"] = torch.from_numpy(np.concatenate([p[2] for p in csr[i]]))
    t["gain"] = torch.from_numpy(gain)
    if cfg.labels:
        t["label_concept"] = torch.from_numpy(label_concepts(plan.groups, cfg.labels, cfg.models))
        t["image_label"] = torch.from_numpy(image_labels(cfg)[0])
    every = tuple(range(m))
    n_univ = sum(len(g.ids) for g in plan.groups if g.members == every and not g.per_model)
    n_spec = [
        sum(len(g.ids) for g in plan.groups if g.members == (i,) and (g.per_model or m > 1))
        for i in range(m)
    ]
    meta = {
        "format": TRUTH_FORMAT,
        "version": str(TRUTH_VERSION),
        "backbones": json.dumps(list(keys)),
        "n_universal": str(n_univ),
        "n_specific": json.dumps(n_spec),
        "config": json.dumps(_config_json(cfg)),
        "groups": json.dumps([{"label": g.label, "members": list(g.members)} for g in plan.groups]),
    }
    if cfg.labels:
        meta["labels"] = json.dumps(label_names(cfg.labels))
    path = Path(cfg.store) / "_usae" / TRUTH_FILE
    with atomic_path(path) as tmp:
        save_file(t, str(tmp), metadata=meta)
    return path


# ---------------------------------------------------------------- maps of a store's backbones
MAPS_FILE = "maps.safetensors"
MAPS_FORMAT = "usae-maps"


def save_maps(store: str | Path, maps: dict[str, np.ndarray], transform: str, of=None) -> Path:
    """Write ``S.zarr/_usae/maps.safetensors``: ``map.<key>`` (d, d) f32 per mapped backbone, so
    that its activations are those of `of[key]` (a backbone of the store; None: the generator's
    unmapped data, before the scale and offset) times A, row vectors (x @ A)."""
    import torch
    from safetensors.torch import save_file

    t = {f"map.{k}": torch.from_numpy(np.ascontiguousarray(a, np.float32)) for k, a in maps.items()}
    meta = {"format": MAPS_FORMAT, "transform": transform, "of": json.dumps(of or {})}
    path = Path(store) / "_usae" / MAPS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(t, str(tmp), metadata=meta)
    return path


def load_maps(store: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """`save_maps`' file -> ({key: A}, metadata with "of" parsed); ({}, {}) when the store has none."""
    from safetensors import safe_open

    path = Path(store) / "_usae" / MAPS_FILE
    if not path.exists():
        return {}, {}
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        maps = {n.removeprefix("map."): f.get_tensor(n) for n in f.keys()}
    meta["of"] = json.loads(meta.get("of", "{}"))
    return maps, meta


def twin_store(
    src: str | Path,
    out: str | Path,
    key: str,
    twin: str = "twin",
    transform: str = "rotate",
    seed: int = 0,
    sigma: float = 0.5,
) -> Path:
    """A store holding backbone `key` of `src` twice: as `key`, and as `twin` = its activations
    (tokens and prefix tokens) times a `random_map` A (rotate or affine), the same information in
    another basis; A is saved with `save_maps` (of = {twin: key}). Rows, images, validity and
    split are the source's; an existing store of the same settings is returned as it is."""
    s = Store.open(src)
    out = Path(out)
    if (out / "_usae" / MAPS_FILE).exists() and Store.open(out).complete:
        return out
    d = s.widths[key]
    a = random_map(np.random.default_rng([seed, 6]), d, transform, sigma).astype(np.float32)
    spec = dict(s.spec(key))
    layouts = [BackboneLayout(b, d, s.prefix_tokens[key], spec) for b in (key, twin)]
    split = s.split
    st = Store.create(
        out,
        list(s.image_ids),
        layouts,
        grid=s.grid,
        chunk_images=s.chunk_images,
        source=s.attrs.get("source", "extract"),
        fingerprint_of={
            "twin_of": s.attrs["fingerprint"],
            "key": key,
            "transform": transform,
            "seed": seed,
            "sigma": sigma,
        },  # fmt: skip
        split=None if split is None else list(split),
        extra={**s.attrs.get("extra", {}), "maps": {twin: {"transform": transform, "of": key}}},
    )
    valid = s.valid
    for c in range(s.n_chunks):
        ia, ib = s.chunk_images_range(c)
        x = np.asarray(s.read_chunk(key, c), np.float32)
        p = s.read_prefix(key, ia, ib)
        prefix = None if p is None else {key: p, twin: np.asarray(p, np.float32) @ a}
        st.write_chunk(c, {key: x, twin: x @ a}, valid[ia:ib], prefix=prefix)
    save_maps(out, {twin: a}, transform, of={twin: key})
    st.finalize()
    return out
