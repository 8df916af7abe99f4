"""Generator settings -> a planted-concept activation store (``usae synth``) and its ground truth.

The store has the standard layout (``usae.pipeline.store``, source="synth"), so every later
stage reads it like an extracted one. The generator plants:

- U universal concepts: each has its own random unit direction in EVERY model's space and fires
  on the same token in all models, with magnitude = shared magnitude x a fixed per-model factor;
- S specific concepts per model: a direction in that model's space only;
- sparse non-negative codes: concept c fires on a token with probability ``rate[c]`` (about
  ``active`` concepts per token and model), magnitudes lognormal;
- gaussian noise per model, and (optionally) a per-model scalar scale and offset so that the
  trainer's standardisation matters.

Model i's tokens are ``x_i = scale_i * (z_i @ D_i + noise_i) + offset_i``.
With ``shuffle_alignment`` (a control) each model's codes are permuted across the tokens of
each chunk, so a token no longer shows the same concepts in every model.

Ground truth, ``S.zarr/_usae/truth.safetensors`` (read it with :func:`load_truth`):

| tensor | shape | meaning |
|---|---|---|
| ``dictionary.<key>`` | (U+S_i, d_i) f32 | unit directions of model i, universal rows first |
| ``concept_ids.<key>`` | (U+S_i,) i64 | global concept id of each row: 0..U-1 universal, then
  model 0's specific ids, model 1's, ... |
| ``factor.<key>`` | (U+S_i,) f32 | per-model magnitude factor (1 for specific concepts) |
| ``rate`` | (U+sum S_i,) f32 | firing probability of each global concept |
| ``scale``, ``offset`` | (M,) f32 | per-model scalar scale and offset |
| ``codes.<key>.indptr/.concept/.value`` | CSR over rows | per-token code z_i (only when
  ``save_codes``): row r's active global ids and magnitudes are
  ``concept[indptr[r]:indptr[r+1]]``, ``value[...]`` |

Metadata (strings): ``format`` = "usae-synth-truth", ``version``, ``backbones`` (JSON list),
``n_universal``, ``n_specific`` (JSON list), ``config`` (JSON of the SynthConfig).

:func:`recovery` scores a trained USAE against this truth (the planted-recovery metric).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from usae.pipeline.store import BackboneLayout, Store, StoreError

if TYPE_CHECKING:
    import typer
    from usae.trainer.model import USAE

TRUTH_FILE = "truth.safetensors"
TRUTH_FORMAT = "usae-synth-truth"
TRUTH_VERSION = 1
_MAG_SIGMA = 0.4  # lognormal sigma of concept magnitudes (median 1)
_CHUNK_BYTES = 16 * 2**20  # target chunk size of the widest backbone when chunk_images=0


@dataclass(frozen=True)
class SynthConfig:
    """Settings of ``usae synth``: a planted-concept store with known ground truth."""

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

    def widths(self) -> tuple[int, ...]:
        if len(self.dims) == 1:
            return tuple(self.dims) * self.models
        return tuple(self.dims)

    def keys(self) -> tuple[str, ...]:
        return tuple(self.names) if self.names else tuple(f"m{i}" for i in range(self.models))

    def n_images(self) -> int:
        return -(-self.tokens // self.tokens_per_image)

    def validate(self) -> None:
        """Raise ValueError with a user-facing message on inconsistent settings."""
        if self.models < 1:
            raise ValueError("--models must be >= 1")
        if len(self.dims) not in (1, self.models):
            raise ValueError(f"--dims has {len(self.dims)} values, expected 1 or --models={self.models}")
        if self.names is not None and len(self.names) != self.models:
            raise ValueError(f"--names has {len(self.names)} values, expected --models={self.models}")
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ValueError("--names must be distinct")
        if min(self.widths()) < 1 or self.universal < 0 or self.specific < 0:
            raise ValueError("--dims must be >= 1, --universal and --specific >= 0")
        if self.universal + self.specific < 1:
            raise ValueError("need at least one concept (--universal + --specific >= 1)")
        if self.tokens_per_image < 1 or self.tokens < self.tokens_per_image:
            raise ValueError("need --tokens >= --tokens-per-image >= 1")
        if not 0 < self.active <= self.universal + self.specific:
            raise ValueError("--active must be in (0, universal + specific]")
        if self.noise < 0 or self.chunk_images < 0:
            raise ValueError("--noise and --chunk-images must be >= 0")


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


class Truth(NamedTuple):
    """Ground truth of a synth store (see the module docstring for the file layout)."""

    backbones: tuple[str, ...]
    """Backbone keys, store order."""
    n_universal: int
    """U; rows [0, U) of each dictionary are the universal concepts."""
    n_specific: tuple[int, ...]
    """S_i per model."""
    dictionaries: list[np.ndarray]
    """Per model (U+S_i, d_i) unit directions, universal rows first."""
    concept_ids: list[np.ndarray]
    """Per model (U+S_i,) global concept ids of the dictionary rows."""
    factors: list[np.ndarray]
    """Per model (U+S_i,) magnitude factors."""
    rate: np.ndarray
    """(U + sum S_i,) firing probability per global concept."""
    scale: np.ndarray
    """(M,) per-model scale."""
    offset: np.ndarray
    """(M,) per-model offset."""
    codes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None
    """Per model CSR (indptr, concept, value) of the per-token codes, or None if not saved."""
    config: dict
    """The SynthConfig that made the store, as a dict."""

    def active_sets(self, i: int, rows: np.ndarray | None = None) -> list[frozenset[int]]:
        """Global ids of the concepts active on each row (all rows, or `rows`) for model i."""
        if self.codes is None:
            raise ValueError("this synth store was written without --save-codes")
        indptr, concept, _ = self.codes[i]
        rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows)
        return [frozenset(concept[indptr[r] : indptr[r + 1]].tolist()) for r in rows]


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


def choose_grid(t: int) -> tuple[int, int]:
    """(h, w) with h * w = t and h the largest divisor <= sqrt(t)."""
    h = max(d for d in range(1, math.isqrt(t) + 1) if t % d == 0)
    return h, t // h


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def make_plan(cfg: SynthConfig) -> _Plan:
    """Draw dictionaries, rates, factors and per-model scale/offset from the seed."""
    rng = np.random.default_rng([cfg.seed, 1])
    m, u, s = cfg.models, cfg.universal, cfg.specific
    n_global = u + m * s
    w = rng.uniform(0.5, 1.5, size=n_global)
    rate = np.clip(cfg.active / (u + s) * w, 0.0, 1.0)
    e_mag2 = math.exp(2 * _MAG_SIGMA**2)  # E[m^2] of lognormal(0, sigma)
    dicts, ids, factors, noise_std = [], [], [], []
    for i, d in enumerate(cfg.widths()):
        dicts.append(_unit_rows(rng, u + s, d).astype(np.float32))
        ids.append(np.concatenate([np.arange(u), u + i * s + np.arange(s)]).astype(np.int64))
        f = np.concatenate([rng.uniform(0.5, 1.5, size=u), np.ones(s)]).astype(np.float32)
        factors.append(f)
        signal_ms = float((rate[ids[-1]] * e_mag2 * f.astype(np.float64) ** 2).sum()) / d
        noise_std.append(cfg.noise * math.sqrt(signal_ms))
    if cfg.scale_offset:
        scale = np.exp(rng.uniform(math.log(0.5), math.log(4.0), size=m))
        offset = rng.uniform(-0.5, 0.5, size=m)
    else:
        scale, offset = np.ones(m), np.zeros(m)
    return _Plan(dicts, ids, factors, rate.astype(np.float32), scale.astype(np.float32),
                 offset.astype(np.float32), np.asarray(noise_std, np.float32))


class _ChunkCodes(NamedTuple):
    codes_rm: list[np.ndarray]
    """Per model dense codes over that model's dictionary rows (rows, U+S_i), float32."""


def chunk_codes(cfg: SynthConfig, plan: _Plan, chunk: int, rows: int) -> _ChunkCodes:
    """Codes of one chunk (deterministic in (seed, chunk)); universal ones shared by all models."""
    rng = np.random.default_rng([cfg.seed, 2, chunk])
    u, s = cfg.universal, cfg.specific
    fire_u = rng.random((rows, u)) < plan.rate[:u]
    mag_u = np.where(fire_u, rng.lognormal(0.0, _MAG_SIGMA, size=(rows, u)), 0.0)
    out = []
    for i in range(cfg.models):
        spec_ids = plan.concept_ids[i][u:]
        fire_s = rng.random((rows, s)) < plan.rate[spec_ids]
        mag_s = np.where(fire_s, rng.lognormal(0.0, _MAG_SIGMA, size=(rows, s)), 0.0)
        z = np.concatenate([mag_u, mag_s], axis=1) * plan.factors[i]
        if cfg.shuffle_alignment:
            z = z[rng.permutation(rows)]
        out.append(z.astype(np.float32))
    return _ChunkCodes(out)


def chunk_tokens(cfg: SynthConfig, plan: _Plan, chunk: int, codes: _ChunkCodes) -> list[np.ndarray]:
    """Token activations of one chunk per model, float32 (rows, d_i)."""
    rng = np.random.default_rng([cfg.seed, 3, chunk])
    out = []
    for i, z in enumerate(codes.codes_rm):
        x = z @ plan.dictionaries[i]
        x += rng.standard_normal(x.shape, dtype=np.float32) * plan.noise_std[i]
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


def _fingerprint_of(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d.pop("store")
    d["generator"] = "usae-synth-1"
    return d


def _config_json(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["store"] = str(cfg.store)
    return d


def run_synth(cfg: SynthConfig, progress: bool = True) -> SynthResult:
    """Write the planted-concept store chunk by chunk (resumable), finalize it, save the truth."""
    from rich.progress import Progress

    cfg.validate()
    keys, widths = cfg.keys(), cfg.widths()
    n_images, ci = cfg.n_images(), _chunk_images(cfg)
    grid = choose_grid(cfg.tokens_per_image)
    layouts = [BackboneLayout(k, d, 0, {"source": "synth", "width": d, "model_index": i})
               for i, (k, d) in enumerate(zip(keys, widths, strict=True))]
    st = Store.create(
        cfg.store, [f"synth{i:08d}" for i in range(n_images)], layouts, grid=grid, chunk_images=ci,
        source="synth", fingerprint_of=_fingerprint_of(cfg), extra={"synth": _config_json(cfg)},
    )
    plan = make_plan(cfg)
    done = st.committed_chunks()
    csr: list[list[tuple]] = [[] for _ in keys]
    with Progress(disable=not progress) as bar:
        task = bar.add_task("synth: writing chunks", total=st.n_chunks)
        for c in range(st.n_chunks):
            r0, r1 = st.chunk_rows(c)
            codes = chunk_codes(cfg, plan, c, r1 - r0)
            if cfg.save_codes:
                for i, z in enumerate(codes.codes_rm):
                    csr[i].append(_to_csr(z, plan.concept_ids[i]))
            if c not in done and not st.complete:
                a, b = st.chunk_images_range(c)
                toks = chunk_tokens(cfg, plan, c, codes)
                st.write_chunk(c, dict(zip(keys, toks, strict=True)), np.ones(b - a, dtype=bool))
            bar.advance(task)
    if not st.complete:
        st.finalize()
    truth_path = _save_truth(cfg, plan, csr if cfg.save_codes else None)
    return SynthResult(Path(cfg.store), truth_path, n_images, n_images * cfg.tokens_per_image, grid, ci)


def _save_truth(cfg: SynthConfig, plan: _Plan, csr: list[list[tuple]] | None) -> Path:
    import torch
    from safetensors.torch import save_file

    keys = cfg.keys()
    t: dict[str, torch.Tensor] = {
        "rate": torch.from_numpy(plan.rate),
        "scale": torch.from_numpy(plan.scale),
        "offset": torch.from_numpy(plan.offset),
    }
    for i, k in enumerate(keys):
        t[f"dictionary.{k}"] = torch.from_numpy(plan.dictionaries[i])
        t[f"concept_ids.{k}"] = torch.from_numpy(plan.concept_ids[i])
        t[f"factor.{k}"] = torch.from_numpy(plan.factors[i])
        if csr is not None:
            counts = np.concatenate([p[0] for p in csr[i]])
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            t[f"codes.{k}.indptr"] = torch.from_numpy(indptr)
            t[f"codes.{k}.concept"] = torch.from_numpy(np.concatenate([p[1] for p in csr[i]]))
            t[f"codes.{k}.value"] = torch.from_numpy(np.concatenate([p[2] for p in csr[i]]))
    meta = {
        "format": TRUTH_FORMAT,
        "version": str(TRUTH_VERSION),
        "backbones": json.dumps(list(keys)),
        "n_universal": str(cfg.universal),
        "n_specific": json.dumps([cfg.specific] * cfg.models),
        "config": json.dumps(_config_json(cfg)),
    }
    path = Path(cfg.store) / "_usae" / TRUTH_FILE
    tmp = path.with_name(f".{TRUTH_FILE}.tmp")
    save_file(t, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_truth(store_path: str | Path) -> Truth:
    """Read the ground truth of a synth store."""
    from safetensors import safe_open

    path = Path(store_path) / "_usae" / TRUTH_FILE
    if not path.exists():
        raise StoreError(f"{store_path} has no ground truth ({path.name}); is it a `usae synth` store?")
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TRUTH_FORMAT:
            raise StoreError(f"{path} is not a usae synth truth file")
        keys = tuple(json.loads(meta["backbones"]))
        names = set(f.keys())
        get = f.get_tensor
        has_codes = all(f"codes.{k}.indptr" in names for k in keys)
        return Truth(
            backbones=keys,
            n_universal=int(meta["n_universal"]),
            n_specific=tuple(json.loads(meta["n_specific"])),
            dictionaries=[get(f"dictionary.{k}") for k in keys],
            concept_ids=[get(f"concept_ids.{k}") for k in keys],
            factors=[get(f"factor.{k}") for k in keys],
            rate=get("rate"),
            scale=get("scale"),
            offset=get("offset"),
            codes=[(get(f"codes.{k}.indptr"), get(f"codes.{k}.concept"), get(f"codes.{k}.value"))
                   for k in keys] if has_codes else None,
            config=json.loads(meta["config"]),
        )


# ---------------------------------------------------------------- recovery metric
class Recovery(NamedTuple):
    """How well a trained USAE's decoders recover the planted concepts."""

    rate: float
    """Share of universal concepts whose best shared match has cosine >= threshold."""
    mean_cos: float
    """Mean over universal concepts of the best shared cosine."""
    cos_u: np.ndarray
    """(U,) best over learned concepts k of the cosine averaged over models."""
    match_u: np.ndarray
    """(U,) the learned concept k achieving cos_u."""
    per_model_cos_ui: np.ndarray
    """(U, M) best cosine per model separately (a learned concept may differ per model)."""
    specific_rate: float
    """Share of specific concepts matched at >= threshold by some learned concept of their model."""
    threshold: float
    """The cosine threshold used."""


def recovery(model: USAE, truth: Truth, threshold: float = 0.9) -> Recovery:
    """Best-match decoder cosine of every planted concept (universal: one concept for all models)."""
    import torch

    pos = [model.spec.backbones.index(k) for k in truth.backbones]
    u = truth.n_universal
    with torch.no_grad():
        learned = [model.decoder_weight(j).float().cpu().numpy() for j in pos]
    cos_mu = [learned[i] @ truth.dictionaries[i][:u].T for i in range(len(pos))]  # (m, U) each
    shared_mu = np.mean(cos_mu, axis=0)
    match_u = shared_mu.argmax(axis=0) if u else np.zeros(0, np.int64)
    cos_u = shared_mu.max(axis=0) if u else np.zeros(0)
    per_model = np.stack([c.max(axis=0) for c in cos_mu], axis=1) if u else np.zeros((0, len(pos)))
    spec_hits = []
    for i in range(len(pos)):
        spec = truth.dictionaries[i][u:]
        if len(spec):
            spec_hits.append((learned[i] @ spec.T).max(axis=0) >= threshold)
    spec_all = np.concatenate(spec_hits) if spec_hits else np.zeros(0, bool)
    return Recovery(
        rate=float((cos_u >= threshold).mean()) if u else float("nan"),
        mean_cos=float(cos_u.mean()) if u else float("nan"),
        cos_u=cos_u,
        match_u=match_u,
        per_model_cos_ui=per_model,
        specific_rate=float(spec_all.mean()) if len(spec_all) else float("nan"),
        threshold=threshold,
    )


# ---------------------------------------------------------------- CLI
def _ints(text: str, what: str) -> tuple[int, ...]:
    import typer

    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise typer.BadParameter(f"{what} is empty")
    return vals


def register(app: typer.Typer) -> None:
    """Add ``usae synth`` to the CLI."""
    import typer

    d = SynthConfig(store=Path("."))

    @app.command("synth")
    def synth_cmd(
        store: Path = typer.Option(..., help="Output store path (S.zarr)."),
        models: int = typer.Option(d.models, help="Number of models (backbone groups)."),
        dims: str = typer.Option(",".join(map(str, d.dims)), help="Width of each model, comma-separated (one value = all)."),
        names: str = typer.Option("", help="Backbone keys, comma-separated (default m0,m1,...)."),
        universal: int = typer.Option(d.universal, help="Universal concepts (shared by all models)."),
        specific: int = typer.Option(d.specific, help="Specific concepts per model."),
        tokens: int = typer.Option(d.tokens, help="Total tokens (rounded up to whole images)."),
        tokens_per_image: int = typer.Option(d.tokens_per_image, help="Tokens per image (grid_h * grid_w)."),
        active: float = typer.Option(d.active, help="Expected active concepts per token and model."),
        noise: float = typer.Option(d.noise, help="Noise std relative to the signal's per-channel RMS."),
        seed: int = typer.Option(d.seed, help="Generator seed."),
        shuffle_alignment: bool = typer.Option(d.shuffle_alignment, help="Control: destroy token alignment across models."),
        chunk_images: int = typer.Option(d.chunk_images, help="Images per store chunk (0 = ~16 MB chunks)."),
        scale_offset: bool = typer.Option(d.scale_offset, help="Random per-model scalar scale and offset."),
        save_codes: bool = typer.Option(d.save_codes, help="Save per-token codes in the truth file."),
    ) -> None:
        """Write a planted-concept store with known universal/specific concepts (ground truth in _usae/)."""
        cfg = SynthConfig(
            store=store, models=models, dims=_ints(dims, "--dims"),
            names=tuple(n.strip() for n in names.split(",")) if names.strip() else None,
            universal=universal, specific=specific, tokens=tokens, tokens_per_image=tokens_per_image,
            active=active, noise=noise, seed=seed, shuffle_alignment=shuffle_alignment,
            chunk_images=chunk_images, scale_offset=scale_offset, save_codes=save_codes,
        )
        try:
            cfg.validate()
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        try:
            res = run_synth(cfg)
        except StoreError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(1) from None
        typer.echo(
            f"wrote {res.path}: {res.n_images} images x {res.grid[0]}x{res.grid[1]} tokens, "
            f"{len(cfg.keys())} models, chunk {res.chunk_images} images; truth in {res.truth_path}"
        )
