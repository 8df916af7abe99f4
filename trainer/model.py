"""Standardised token activations of M backbones <-> one shared TopK concept code (the USAE).

Per backbone i: encoder Linear(d_i -> m) -> BatchNorm1d(m) -> ReLU -> TopK(k), decoder
D_i (m, d_i) with unit-norm rows at every use and no bias (docs/method.md, section 2). Options
of `ModelSpec` (the fidelity recipe, docs/method.md section 8): unit-norm initial rows, a
learnable gain per concept and backbone (softplus, so a concept can be absent from a backbone
or differ in strength), and a per-channel decoder bias that the encoder subtracts.
The model owns its maths (`encode_pre` also for a slice of concepts, as activation
maximisation needs) and its file (`save`, `load`, `load_run`).
Backbones are addressed by their position i in ``spec.backbones``; nothing here branches on a
backbone's name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from usae.errors import UsaeError
from usae.runtime import atomic_path

STD_EPS = 1e-5
GAIN0 = math.log(math.e - 1)
"""Gain parameter whose softplus is 1."""
DECODER_INITS = ("randn", "unit", "data")
WEIGHTS_FILE = "model.safetensors"


class RunNotFound(UsaeError, FileNotFoundError):
    """A folder that holds no usae run (no config.json, or no weights)."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a USAE (stored in the run's config.json)."""

    backbones: tuple[str, ...]
    """Backbone keys, in store order; index i addresses backbone i."""
    widths: tuple[int, ...]
    """Activation width d_i of each backbone."""
    mu: tuple[float, ...]
    """Scalar mean of each backbone's activations (standardisation)."""
    sigma: tuple[float, ...]
    """Scalar std of each backbone's activations (standardisation)."""
    concepts: int
    """m, size of the shared concept space."""
    k: int
    """Active concepts per token (TopK)."""
    independent: bool = False
    """True: one separate SAE per backbone (the paper's baseline); codes never cross models."""
    decoder_init: str = "randn"
    """randn (the paper: rows of norm ~sqrt(d), normalised at use), unit (rows of norm 1), or data
    (unit rows that the trainer replaces before the first step: concept c starts in every backbone
    at that backbone's activation of one same training token, `USAE.seed_from_tokens`; how its
    encoder row starts is the trainer's `TrainConfig.encoder_start`)."""
    gains: bool = False
    """A learnable gain per concept and model, softplus(g_jk) >= 0 (starts at 1): decoder row =
    gain * unit row, so a concept can be weaker, stronger or absent (gain near 0) in a model."""
    decoder_bias: bool = False
    """A learnable per-channel bias b_j per model: subtracted before the encoder, added to the decode."""
    gain_rate: float = 1.0
    """gain = softplus(gain_rate * g_jk): under Adam the gains then move gain_rate times faster than
    the other parameters (every parameter moves ~lr per step), so a new concept's member set is
    settled soon after it forms (the fidelity recipe's code agreement reads the gains)."""
    whiten: bool = False
    """Encoder i reads its input whitened, (x - b_i) @ P_i with P_i a fixed symmetric
    (d_i, d_i) buffer ``white_<i>`` (`usae.trainer.inputs.start_whitening`: the regularised
    inverse square root of the training tokens' second moment); the decoder, the loss and the
    codes' meaning stay in the data's basis. Two backbones that differ by an invertible linear
    map then feed their encoders inputs that differ by a rotation only."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(
            backbones=tuple(d["backbones"]),
            widths=tuple(int(w) for w in d["widths"]),
            mu=tuple(float(x) for x in d["mu"]),
            sigma=tuple(float(x) for x in d["sigma"]),
            concepts=int(d["concepts"]),
            k=int(d["k"]),
            independent=bool(d.get("independent", False)),
            decoder_init=str(d.get("decoder_init", "randn")),
            gains=bool(d.get("gains", False)),
            decoder_bias=bool(d.get("decoder_bias", False)),
            gain_rate=float(d.get("gain_rate", 1.0)),
            whiten=bool(d.get("whiten", False)),
        )


class Codes(NamedTuple):
    """Sparse codes of a batch of tokens."""

    values_bk: Float[Tensor, "b k"]
    """Activations of the k selected concepts (>= 0)."""
    indices_bk: Int[Tensor, "b k"]
    """Concept ids of the k selected concepts."""
    pre_bm: Float[Tensor, "b m"]
    """Pre-activations BN(W x + b) before ReLU/TopK (used by the aux loss, analysis, maximisation)."""


class USAE(nn.Module):
    """Universal Sparse Autoencoder: per-backbone encoders/decoders around one TopK code."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        m = spec.concepts
        # With independent=True the same modules are simply never crossed; storage is identical.
        self.encoders = nn.ModuleList(nn.Linear(d, m) for d in spec.widths)
        self.bns = nn.ModuleList(nn.BatchNorm1d(m) for _ in spec.widths)
        rows = [torch.randn(m, d) for d in spec.widths]
        if spec.decoder_init in ("unit", "data"):
            rows = [F.normalize(r, dim=1) for r in rows]
        self.decoders = nn.ParameterList(nn.Parameter(r) for r in rows)
        if spec.gains:  # softplus(GAIN0) = 1: every concept starts at full strength everywhere
            self.gains = nn.ParameterList(
                nn.Parameter(torch.full((m,), GAIN0 / spec.gain_rate)) for _ in spec.widths
            )
        if spec.decoder_bias:
            self.dec_bias = nn.ParameterList(nn.Parameter(torch.zeros(d)) for d in spec.widths)
        if spec.whiten:
            for j, d in enumerate(spec.widths):
                self.register_buffer(f"white_{j}", torch.eye(d), persistent=True)
        self.register_buffer("mu", torch.tensor(spec.mu, dtype=torch.float32), persistent=True)
        self.register_buffer(
            "sigma", torch.tensor(spec.sigma, dtype=torch.float32), persistent=True
        )

    @property
    def n_models(self) -> int:
        return len(self.spec.backbones)

    def index(self, key: str) -> int:
        return self.spec.backbones.index(key)

    def standardize(self, i: int, acts_bd: Tensor) -> Float[Tensor, "b d"]:
        return (acts_bd - self.mu[i]) / (self.sigma[i] + STD_EPS)

    @torch.no_grad()
    def seed_from_tokens(self, rows: list[Tensor], metrics: list[Tensor] | None = None) -> None:
        """Data-aligned start: rows[j] (n, d_j) holds backbone j's encoder inputs (standardised,
        less the decoder bias) of the same n tokens in every backbone. Concept c < n starts with
        decoder row and encoder row rows[j][c] / |rows[j][c]| in every backbone j, and encoder bias
        0, so it first fires most for its own token; concepts c >= n keep their random start.
        Tokens are aligned across backbones, so two identical backbones start identical.
        With `ModelSpec.whiten` the decoder row is the token itself (the encoder input un-whitened).
        With metrics (the dual start), the encoder row is rows[j][c] @ metrics[j]: metrics[j]
        (d_j, d_j) symmetric, the regularised inverse second moment S_j of the rows
        (`usae.trainer.inputs.seed_start`), scaled so that its pre-activation on its own token
        is sqrt(x_c S_j x_c) k_j, k_j = rms_c |x_c| / sqrt(d_j) (so the typical one is the token
        start's |x_c|). Under x -> x A (A invertible) S -> A^-1 S A^-T: two backbones that
        differ by A start with the same pre-activations x S_j x_c, each concept at the same
        scale in both (up to k_j); a unit row would scale them by 1 / |x_c S_j|, which A
        changes, and BatchNorm hides that scale from the loss but not from the steps."""
        for j, r in enumerate(rows):
            n = r.shape[0]
            r = r.to(self.decoders[j].dtype)
            p = self.whitening(j)
            data = r if p is None else torch.linalg.solve(p.to(r.dtype), r.T).T  # P symmetric
            self.decoders[j][:n].copy_(F.normalize(data, dim=1))
            if metrics is None:
                enc = F.normalize(r, dim=1)
            else:
                enc = r @ metrics[j].to(r.dtype)
                own = (r * enc).sum(1, keepdim=True).clamp_min(1e-12)  # x_c S x_c > 0
                k = r.pow(2).sum(1).mean().div(r.shape[1]).sqrt()
                enc = enc * (own.rsqrt() * k)
            self.encoders[j].weight[:n].copy_(enc)
            self.encoders[j].bias[:n].zero_()

    def decoder_weight(self, j: int) -> Float[Tensor, "m d"]:
        """Decoder of backbone j: unit-norm rows (gradient flows through the norm), each times
        its concept's gain in backbone j when the model has gains."""
        d = self.decoders[j]
        w = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return w * self.gain(j)[:, None] if self.spec.gains else w

    def gain(self, j: int) -> Float[Tensor, " m"]:
        """softplus(gain_rate * g_j): each concept's strength in backbone j (ones without gains)."""
        if not self.spec.gains:
            return torch.ones(self.spec.concepts, device=self.decoders[j].device)
        return F.softplus(self.spec.gain_rate * self.gains[j])

    def bias(self, j: int) -> Float[Tensor, " d"] | None:
        """Backbone j's decoder bias (None without one)."""
        return self.dec_bias[j] if self.spec.decoder_bias else None

    def whitening(self, j: int) -> Tensor | None:
        """Backbone j's encoder-input whitening P_j (None without `ModelSpec.whiten`)."""
        return getattr(self, f"white_{j}") if self.spec.whiten else None

    def encoder_input(self, i: int, x_bd: Tensor) -> Tensor:
        """What encoder i reads: the standardised input, less the decoder bias when there is one,
        whitened (times P_i) with `ModelSpec.whiten`."""
        x_bd = x_bd - self.dec_bias[i] if self.spec.decoder_bias else x_bd
        p = self.whitening(i)
        return x_bd if p is None else x_bd @ p.to(x_bd.dtype)

    def encode_pre(
        self, i: int, x_bd: Float[Tensor, "... d"], concepts: Tensor | None = None
    ) -> Float[Tensor, "... c"]:
        """BN_i(W_i x + b_i) of standardised inputs, before ReLU/TopK: every concept, or only
        the columns `concepts` (a 1-d index tensor; eval mode only: BatchNorm uses its running
        statistics). Leading dimensions of `x` are kept."""
        lin, bn = self.encoders[i], self.bns[i]
        x_bd = self.encoder_input(i, x_bd)
        if concepts is None:
            lead = x_bd.shape[:-1]
            return bn(lin(x_bd.reshape(-1, x_bd.shape[-1]))).reshape(*lead, -1)
        if self.training:
            raise ValueError(
                "encode_pre for a slice of concepts needs eval mode (BatchNorm running statistics)"
            )
        h = F.linear(x_bd, lin.weight[concepts], lin.bias[concepts])
        scale = bn.weight[concepts] * torch.rsqrt(bn.running_var[concepts] + bn.eps)
        return (h - bn.running_mean[concepts]) * scale + bn.bias[concepts]

    def encode(self, i: int, x_bd: Float[Tensor, "b d"], k: int | None = None) -> Codes:
        pre = self.encode_pre(i, x_bd)
        vals, idx = torch.topk(F.relu(pre), k or self.spec.k, dim=-1, sorted=False)
        return Codes(vals, idx, pre)

    def decode(self, j: int, codes: Codes) -> Float[Tensor, "b d"]:
        """x_hat_j = Z @ D_j (+ b_j) with Z sparse: a weighted sum of k decoder rows per token."""
        w = self.decoder_weight(j)
        vals = codes.values_bk.to(w.dtype)
        out = F.embedding_bag(codes.indices_bk, w, per_sample_weights=vals, mode="sum")
        return out + self.dec_bias[j].to(out.dtype) if self.spec.decoder_bias else out

    def dense_codes(self, codes: Codes) -> Float[Tensor, "b m"]:
        z = torch.zeros(
            codes.pre_bm.shape, dtype=codes.values_bk.dtype, device=codes.values_bk.device
        )
        return z.scatter_(1, codes.indices_bk, codes.values_bk)

    def forward(self, i: int, acts_bd: Tensor) -> tuple[Codes, list[Tensor | None]]:
        """Encode raw activations of backbone i, decode into every backbone it may reach."""
        codes = self.encode(i, self.standardize(i, acts_bd))
        targets = [i] if self.spec.independent else range(self.n_models)
        out: list[Tensor | None] = [None] * self.n_models
        for j in targets:
            out[j] = self.decode(j, codes)
        return codes, out

    def save(self, path: str | Path) -> None:
        """Write the weights (state_dict) to a safetensors file, atomically."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp)
            )

    @classmethod
    def load(cls, spec: ModelSpec, path: str | Path) -> USAE:
        """A USAE of `spec` with the weights of a safetensors file (anything else is refused:
        a crafted file never runs code), in eval mode on the CPU."""
        from usae.trainer.checkpoint import CheckpointError, safe_load_safetensors

        model = cls(spec)
        try:
            model.load_state_dict(safe_load_safetensors(Path(path)))
        except RuntimeError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"{path} does not fit the model described by config.json ({e})"
            ) from None
        return model.eval()


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", weights: str = WEIGHTS_FILE
) -> tuple[USAE, dict]:
    """Rebuild a trained USAE from a run directory (config.json + safetensors, no pickle);
    the final weights, or the latest checkpoint's when the run has not finished."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise RunNotFound(f"{run_dir} is not a usae run directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    wpath = run_dir / weights
    if not wpath.exists():
        wpath = run_dir / "checkpoint" / WEIGHTS_FILE
    if not wpath.exists():
        raise RunNotFound(f"{run_dir} holds no weights ({weights} or checkpoint/{WEIGHTS_FILE})")
    model = USAE.load(ModelSpec.from_dict(cfg["model"]), wpath)
    return model.to(device).eval(), cfg
