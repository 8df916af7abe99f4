"""`usae train`'s settings -> the resolved config and the plan of each step.

`TrainConfig` is the one frozen description of a run (written to RUN/config.json). `Plan`
resolves its `mode` once into what a step does: which backbones are sources, which are
targets, which decoders get no gradient, which parameter groups step and how they are clipped.

The three modes (docs/method.md, section 3):
  paper        one source backbone i is drawn per step; its codes reconstruct EVERY backbone
               and the summed loss trains encoder i and every decoder; one lr schedule.
  reference    as in the authors' code: one AdamW per backbone and only backbone i steps, so
               decoders j != i are detached and each backbone's schedule advances only when it
               is picked (it ends near lr * 0.75 for three backbones, not at lr_min).
  independent  one separate SAE per backbone (the paper's baseline): every step trains every
               backbone on its own tokens, each with its own gradient-norm clip.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
from usae.trainer.loader import SHUFFLES
from usae.trainer.model import DECODER_INITS

from usae.errors import UsaeError
from usae.runtime import check_device_name

OPTIMIZERS = ("adamw", "rowadamw")
ENCODER_STARTS = ("token", "dual")
Mode = Literal["paper", "reference", "independent"]
MODES: tuple[str, ...] = ("paper", "reference", "independent")


@dataclass(frozen=True)
class TrainConfig:
    """Train a Universal SAE (or independent SAEs) on an activation store; writes a run directory."""

    store: str = ""
    """Activation store (S.zarr) to train on."""
    out: str = ""
    """New run directory to write (must not hold another run)."""
    backbones: tuple[str, ...] = ()
    """Subset of the store's backbones, in this order (empty: all)."""
    concepts: int = 0
    """Concepts m in the shared code (0: 8 x the largest width)."""
    k: int = 32
    """Active concepts per token (TopK)."""
    loss: Literal["l1", "l2"] = "l1"
    """Reconstruction loss: l1 (mean absolute error) or l2 (mean squared error)."""
    aux_weight: float = 0.1
    """Weight of the auxiliary loss on the non-selected pre-activations."""
    aux: Literal["paper", "dead"] = "paper"
    """Auxiliary loss: paper (the top m/2 non-selected codes rebuild the residual, a dense decode of half the concepts) or dead (AuxK as in Gao et al.: only concepts dead for dead_window_tokens, up to m/2 per token, rebuild the detached residual; a sparse decode)."""
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    lr_min: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 1e-5
    """AdamW weight decay."""
    optimizer: Literal["recipe", "adamw", "rowadamw"] = "recipe"
    """recipe: the recipe's; adamw (per-coordinate second moments); rowadamw: AdamW with one second moment per concept row of each encoder and decoder (and one per decoder bias), so a backbone's updates do not depend on the basis of its activations (docs/method.md section 8)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    batch_tokens: int = 6272
    """Tokens per global batch (32 images x 196 tokens)."""
    steps: int = 0
    """Optimiser steps (0: derived from epochs)."""
    epochs: float = 30.0
    """Epochs over the training images (used when steps is 0)."""
    warmup_steps: int = -1
    """Linear warm-up steps (-1: one epoch)."""
    agree_weight: float = -1.0
    """Weight of the code agreement (paper mode, M > 1): each source's rows are also encoded by a partner backbone (rotating each step) and the two codes' activations on the union of their TopK sets are pulled together, per concept as far as the gains call it present in both (-1: the recipe's; 0: off). docs/method.md section 8."""
    agree_start: float = -1.0
    """Fraction of the steps before the code agreement starts (it then rises to its weight over the next 10%; -1: the recipe's)."""
    gain_rate: float = -1.0
    """How much faster than the other parameters the per-model gains learn (gain = softplus(rate x g); -1: the recipe's; recipes without gains ignore it)."""
    init: Literal["recipe", "randn", "unit", "data"] = "recipe"
    """Start of the decoder rows (recipe: the recipe's): randn (the paper: norm ~sqrt(d)), unit (random unit rows), or data (concept c starts in every backbone, decoder and encoder row, at that backbone's activation of one same random training token; docs/method.md section 8)."""
    encoder_start: Literal["recipe", "token", "dual"] = "recipe"
    """With the data-aligned start (init data): token (each concept's encoder row is its seed token, as the encoder reads it, normalised: it first fires by cosine to that token) or dual (the fidelity recipe's: row c is token c times S, the ridge-regularised inverse second moment of the seed tokens, scaled so that its pre-activation on its own token is sqrt(x_c S x_c) times the backbone's token scale: two backbones that differ by an invertible linear map start with nearly the same pre-activations, exactly so without the ridge; docs/method.md section 8); recipe: the recipe's."""
    recipe: Literal["fidelity", "paper"] = "fidelity"
    """fidelity (default): decoder and encoder rows started at one same training token in every backbone, a learnable gain per concept and backbone, a decoder bias, the loss averaged over the targets, every backbone a source in every step (on its share of the batch), a constant lr with a short final decay, and from half of the steps a code agreement between the backbones' encoders; paper: the paper's recipe exactly (randn rows, no gains or bias, summed loss, one source per step, cosine decay). docs/method.md section 8."""
    mode: Mode = "paper"
    """paper: the source's codes rebuild every backbone and the summed loss trains every decoder; reference: one AdamW per backbone and only the source backbone steps (the authors' code); independent: one separate SAE per backbone (the paper's baseline)."""
    whiten: bool = False
    """Encoders read their input whitened ((x - b) times the regularised inverse square root of the training tokens' second moment, estimated at the start); decoders and the loss stay in the data's basis, so backbones that differ by an invertible linear map train alike (docs/method.md section 8)."""
    whiten_ridge: float = 0.01
    """With --whiten: the ridge added to the second moment's eigenvalues, relative to their mean (0.01: near-full whitening; larger amplifies weak directions less, at the cost of basis independence)."""
    holdout: float = 0.1
    """Fraction of images held out for the final metrics (the store's split when it has one)."""
    seed: int = 0
    """Seed of the initialisation, the source-backbone draws and the loader's shuffle."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Matmul precision: bf16 (autocast where the device has fast bf16, else fp32) or fp32."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N (under torchrun, cuda is the local rank's GPU)."""
    log_every: int = 50
    """Append a line to metrics.jsonl every this many steps."""
    ckpt_every: int = 1000
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    dead_window_tokens: int = 1_000_000
    """A concept is dead when it was not selected for this many training tokens."""
    buffer_chunks: int = 0
    """Chunks shuffled together by the loader (a batch is drawn from them); 0: chosen by how the store is read, 64 for whole-image batches from a raw store, 16 for token batches from a raw store, 4 when chunks are decoded into a memory pool (a compressed store)."""
    shuffle: Literal["images", "tokens"] = "images"
    """images (default): batches of whole images in shuffled order, as the paper's 32 x 196-token batches, each image read straight from its chunk file into the batch; tokens: single rows shuffled within a buffer of chunks (more images per batch, about half the loader's speed)."""
    resume: str = ""
    """Continue the run in this directory (its config.json wins over other options)."""
    stop_after: int = 0
    """Testing aid: stop abruptly after this many steps, as if killed (0: never)."""

    def __post_init__(self) -> None:
        check_device_name(self.device)
        checks = [
            (self.loss in ("l1", "l2"), f"loss must be l1 or l2, got {self.loss!r}"),
            (self.mode in MODES, f"mode must be {', '.join(MODES)}, got {self.mode!r}"),
            (self.aux in ("paper", "dead"), f"aux must be paper or dead, got {self.aux!r}"),
            (self.recipe in RECIPES, f"recipe must be {' or '.join(RECIPES)}, got {self.recipe!r}"),
            (self.dtype in ("bf16", "fp32"), f"dtype must be bf16 or fp32, got {self.dtype!r}"),
            (
                self.shuffle in SHUFFLES,
                f"shuffle must be {' or '.join(SHUFFLES)}, got {self.shuffle!r}",
            ),
            (
                self.init in ("recipe", *DECODER_INITS),
                f"init must be recipe, {', '.join(DECODER_INITS)}, got {self.init!r}",
            ),
            (
                self.encoder_start in ("recipe", *ENCODER_STARTS),
                f"encoder_start must be recipe, {', '.join(ENCODER_STARTS)}, got {self.encoder_start!r}",
            ),
            (
                self.encoder_start != "dual" or self.resolved_init() in ("data", None),
                "encoder_start dual needs the data-aligned start (init data), "
                f"not init {self.resolved_init()}",
            ),
            (self.k > 0, "k must be positive"),
            (
                self.optimizer in ("recipe", *OPTIMIZERS),
                f"optimizer must be recipe, {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
            ),
            (
                self.agree_weight >= 0 or self.agree_weight == -1.0,
                "agree_weight must be >= 0 (-1: the recipe's)",
            ),
            (
                0 <= self.agree_start <= 1 or self.agree_start == -1.0,
                "agree_start must be in [0, 1] (-1: the recipe's)",
            ),
            (
                self.gain_rate > 0 or self.gain_rate == -1.0,
                "gain_rate must be > 0 (-1: the recipe's)",
            ),
            (self.batch_tokens > 0, "batch_tokens must be positive"),
            (
                math.isfinite(self.whiten_ridge) and self.whiten_ridge > 0,
                "whiten_ridge must be > 0",
            ),
            (
                self.buffer_chunks >= 0,
                "buffer_chunks must be >= 0 (0: chosen by how the store is read)",
            ),
            (0.0 <= self.holdout < 1.0, "holdout must be in [0, 1)"),
            (self.steps >= 0 and self.epochs > 0, "steps must be >= 0 and epochs > 0"),
            (self.log_every > 0 and self.ckpt_every >= 0, "log_every must be > 0, ckpt_every >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbones"] = list(self.backbones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a config.json's "train" (also of runs written before `mode` replaced the
        `update` and `independent` options)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "mode" not in d:
            kw["mode"] = "independent" if d.get("independent") else d.get("update", "paper")
        kw.setdefault(
            "recipe", "paper"
        )  # runs written before recipes were trained with the paper's
        kw.setdefault("agree_weight", 0.0)  # and runs written before code agreement without it,
        kw.setdefault("gain_rate", 1.0)  # and before gain rates at the common rate,
        kw.setdefault("init", "unit" if kw["recipe"] == "fidelity" else "randn")  # and inits
        kw.setdefault("optimizer", "adamw")  # and before the optimizer was a choice, with AdamW
        kw.setdefault("encoder_start", "token")  # and data-aligned starts before it, by token
        kw["backbones"] = tuple(kw.get("backbones", ()))
        return cls(**kw)

    def resolved(self) -> TrainConfig:
        """This config with every "the recipe's" field (agree_weight, agree_start, gain_rate, init,
        encoder_start, optimizer) set from its recipe; gain_rate is 1 for a recipe without gains,
        and encoder_start is token for a start that is not data-aligned (it has no seed tokens)."""
        rc, init = RECIPES[self.recipe], self.resolved_init()
        rate = (self.gain_rate if self.gain_rate > 0 else rc.gain_rate) if rc.gains else 1.0
        start = rc.encoder_start if init == "data" else "token"
        return replace(
            self,
            agree_weight=self.agree_weight if self.agree_weight >= 0 else rc.agree,
            agree_start=self.agree_start if self.agree_start >= 0 else rc.agree_start,
            gain_rate=rate,
            init=init,
            encoder_start=start if self.encoder_start == "recipe" else self.encoder_start,
            optimizer=self.optimizer_name(),
        )

    def resolved_init(self) -> str | None:
        """randn, unit or data: the init field, or the recipe's (None for an unknown recipe)."""
        if self.init != "recipe":
            return self.init
        return RECIPES[self.recipe].decoder_init if self.recipe in RECIPES else None

    def optimizer_name(self) -> str:
        """adamw or rowadamw: the optimizer field, or the recipe's."""
        return RECIPES[self.recipe].optimizer if self.optimizer == "recipe" else self.optimizer


@dataclass(frozen=True)
class Recipe:
    """What a recipe sets (docs/method.md, sections 3 and 8)."""

    decoder_init: str
    """randn | unit | data: the decoder rows' start (`TrainConfig.init`)."""
    gains: bool
    """A learnable per-concept, per-backbone gain (so a concept can be absent from a backbone)."""
    decoder_bias: bool
    """A learnable per-channel decoder bias (per-channel offsets do not take a TopK slot)."""
    targets_mean: bool
    """Loss averaged over the target backbones (True) or summed (the paper)."""
    split_sources: bool
    """Every backbone is a source in every step, on its share of the batch (paper mode), instead
    of one source drawn per step."""
    schedule: str
    """cosine (the paper's) | tail (constant, then linear to 0 over the last 10%)."""
    agree: float = 0.0
    """Weight of the code agreement between each source and a partner backbone (0: off)."""
    agree_start: float = 0.5
    """Fraction of the steps before the agreement starts (`agreement_ramp`)."""
    gain_rate: float = 1.0
    """`ModelSpec.gain_rate`: how much faster than the other parameters the gains learn."""
    optimizer: str = "adamw"
    """adamw | rowadamw (`TrainConfig.optimizer`)."""
    encoder_start: str = "token"
    """token | dual: the data-aligned start's encoder rows (`TrainConfig.encoder_start`)."""


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("randn", False, False, False, False, "cosine"),
    "fidelity": Recipe(
        "data", True, True, True, True, "tail", agree=1.0, gain_rate=10.0, encoder_start="dual"
    ),
}


@dataclass(frozen=True)
class Plan:
    """What one step of `mode` does, for M backbones (resolved once from the config)."""

    mode: Mode
    n: int
    """Number of backbones M."""
    split: bool = False
    """Paper mode: every backbone a source on its share of the batch (the fidelity recipe)."""

    def sources(self, gen: torch.Generator) -> list[int]:
        """Source backbones of a step: one drawn uniformly (same draw on every rank), or all."""
        if self.mode == "independent" or self.split_batch:
            return list(range(self.n))
        return [int(torch.randint(self.n, (1,), generator=gen).item())]

    @property
    def split_batch(self) -> bool:
        """True: source i encodes only its share (1/M) of the batch's rows."""
        return self.split and self.mode == "paper" and self.n > 1

    def partner(self, i: int, step: int) -> int | None:
        """Backbone that also encodes source i's rows for the code agreement (paper mode, M > 1):
        i + 1 + (step mod (M - 1)), mod M, so over M - 1 steps each source meets every other."""
        if self.mode != "paper" or self.n < 2:
            return None
        return (i + 1 + step % (self.n - 1)) % self.n

    def targets(self, i: int) -> list[int]:
        """Backbones that source i's codes reconstruct."""
        return [i] if self.mode == "independent" else list(range(self.n))

    def detached(self, i: int) -> list[int]:
        """Targets whose decoders get no gradient when i is the source."""
        return [j for j in range(self.n) if j != i] if self.mode == "reference" else []

    def stepping(self, sources: list[int]) -> list[int]:
        """Parameter groups (one per backbone) whose optimiser steps."""
        return list(sources) if self.mode == "reference" else list(range(self.n))

    @property
    def schedule_per_group(self) -> bool:
        """True: each backbone's lr schedule advances only when its group steps."""
        return self.mode == "reference"

    @property
    def clip_per_group(self) -> bool:
        """True: each backbone's gradients are clipped alone (the SAEs never interact)."""
        return self.mode == "independent"

    @property
    def independent(self) -> bool:
        return self.mode == "independent"


class TrainError(UsaeError, RuntimeError):
    """Training cannot start or cannot go on (bad input, non-finite loss, disk full...)."""


class SimulatedKill(UsaeError, RuntimeError):
    """Raised by `stop_after` to stop a run as abruptly as a kill (tests of --resume)."""
