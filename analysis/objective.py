"""Images + backbones + trained USAE -> concept k's objective, and the jointly scheduled
optimisation of one image per backbone (docs/method.md, activation maximisation).

For concept k, every backbone i of the run gets its own image, optimised so that k's pre-TopK
activation ReLU(BN_i(W_i x_i))[k], averaged over tokens, is maximal. x_i is the backbone's
activation computed exactly as extraction computes it (``Backbone.forward`` with the store's
grid: the backbone's own resize, normalisation and grid resampling), standardised by the run;
the pre-activation is the model's own ``USAE.encode_pre`` for the one concept, BatchNorm in
eval mode. The images are independently parametrised (``usae.analysis.canvas``) and jointly
scheduled: one loop, the same crop boxes each step, one NAdam over all phases with one
learning-rate schedule (cosine decay from ``lr`` to ``lr/100`` by default). Each step takes
``crops`` random crops, adds Gaussian noise of std ``noise`` and clamps to [0, 1].

The quantity optimised is the token mean of a leaky ReLU (slope 0.01) of the pre-activation, so
a concept that starts silent on every token still gets a gradient; the objective recorded and
reported is the exact token mean of ReLU(pre).

Determinism: phases, crops and noise come from CPU generators seeded by (seed, k), so a concept's
images do not depend on the other concepts requested; on CPU two runs give identical PNGs. On
CUDA, grid_sample's backward accumulates with atomics, so the last bits may differ run to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from usae.analysis.backbones import Target
from usae.analysis.canvas import PhaseImages, crop_resize, sample_boxes
from usae.trainer.model import USAE

from usae.runtime import resolve_device

if TYPE_CHECKING:
    from usae.analysis.maximize import MaximizeConfig

LEAK = 0.01
"""Negative slope of the optimised surrogate (a silent concept still gets a gradient)."""


# ---------------------------------------------------------------- the objective
def concept_pre(model: USAE, i: int, k: int, acts_btd: Tensor) -> Float[Tensor, "b t"]:
    """Pre-activation BN_i(W_i x + b_i)[k] of raw activations (column k only; the model refuses
    training mode, since BatchNorm must use its running statistics)."""
    param = model.encoders[i].weight
    x_btd = model.standardize(i, acts_btd.to(param.dtype))
    return model.encode_pre(i, x_btd, concepts=torch.tensor([k], device=param.device))[..., 0]


def concept_objective(
    backbone: nn.Module, model: USAE, i: int, k: int, images_b3hw: Tensor, grid: tuple[int, int]
) -> Float[Tensor, " b"]:
    """Token mean of ReLU(pre)[k] per image, through the backbone's extraction path."""
    acts = backbone(images_b3hw, grid=grid)
    return F.relu(concept_pre(model, i, k, acts.patch_btd)).mean(dim=1)


# ---------------------------------------------------------------- the optimisation
class Final(NamedTuple):
    """Objective of one backbone's finished image, next to random-phase images' values."""

    crops: float
    """Mean objective over fixed evaluation crops (no noise)."""
    full: float
    """Objective of the whole canvas as extraction would see it."""
    random_crops: float
    """Same crops, random-phase images with the same spectrum (mean over the images)."""
    random_full: float
    """Whole canvas, random-phase images with the same spectrum."""


def _concept_seed(seed: int, k: int, salt: int = 0) -> int:
    """Per-concept seed: concept k's images do not depend on which other concepts ran."""
    return (seed * 1_000_003 + k * 7919 + salt * 104_729) % (2**63)


class Maximizer:
    """Jointly scheduled optimisation of one image per target for concept k."""

    def __init__(self, model: USAE, targets: Sequence[Target], k: int, cfg: "MaximizeConfig", grid):
        self.model, self.targets, self.k, self.cfg = model, list(targets), k, cfg
        self.grid = tuple(grid)
        self.gen = torch.Generator().manual_seed(_concept_seed(cfg.seed, k))
        self.device = resolve_device(cfg.device)
        self.images = PhaseImages(len(self.targets), cfg.canvas, self.gen).to(self.device)
        self.opt = torch.optim.NAdam(self.images.parameters(), lr=cfg.lr)
        # Cosine decay to lr/100: large phase steps explore early, small ones settle the image.
        self.sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, cfg.steps, eta_min=cfg.lr * 0.01)
            if cfg.schedule == "cosine"
            else None
        )

    def _pre(self, t: Target, crops_b3hw: Tensor) -> Tensor:
        acts = t.backbone(crops_b3hw, grid=self.grid)
        return concept_pre(self.model, t.index, self.k, acts.patch_btd.float())

    def step(self) -> np.ndarray:
        """One NAdam step on every image; returns the objective per target on this step's crops."""
        boxes_n3 = sample_boxes(self.cfg.crops, self.cfg.crop_scale, self.gen)
        self.opt.zero_grad(set_to_none=True)
        out = np.zeros(len(self.targets))
        for j, t in enumerate(self.targets):
            size = int(t.backbone.spec.img_size)
            noise = (
                torch.randn((self.cfg.crops, 3, size, size), generator=self.gen) * self.cfg.noise
            )
            crops = crop_resize(self.images(j), boxes_n3, size)
            crops = (crops + noise.to(crops.device)).clamp(0.0, 1.0)
            pre_bt = self._pre(t, crops)
            # Backward per target: the images are independent, so this is the joint gradient
            # with one backbone's graph alive at a time.
            (-F.leaky_relu(pre_bt, LEAK).mean()).backward()
            out[j] = F.relu(pre_bt.detach()).mean().item()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return out

    @torch.no_grad()
    def evaluate(self, n_random: int = 4) -> list[Final]:
        """Final objective per target on fixed crops and the full canvas, with random-phase baselines."""
        eval_gen = torch.Generator().manual_seed(_concept_seed(self.cfg.seed, self.k, salt=1))
        boxes_n3 = sample_boxes(self.cfg.crops, self.cfg.crop_scale, eval_gen)
        rand = PhaseImages(n_random, self.cfg.canvas, eval_gen).to(self.device)
        finals = []
        for j, t in enumerate(self.targets):
            size = int(t.backbone.spec.img_size)

            def score(img_3hw: Tensor, size: int = size, t: Target = t) -> tuple[float, float]:
                c = F.relu(self._pre(t, crop_resize(img_3hw, boxes_n3, size))).mean().item()
                f = F.relu(self._pre(t, img_3hw.unsqueeze(0))).mean().item()
                return c, f

            c, f = score(self.images(j))
            rs = np.array([score(rand(r)) for r in range(n_random)])
            finals.append(Final(c, f, float(rs[:, 0].mean()), float(rs[:, 1].mean())))
        return finals

    @torch.no_grad()
    def canvases(self) -> list[np.ndarray]:
        """The current images as uint8 (canvas, canvas, 3) arrays, one per target."""
        out = []
        for j in range(len(self.targets)):
            img_hw3 = self.images(j).permute(1, 2, 0).float().cpu().numpy()
            out.append(np.round(img_hw3 * 255.0).clip(0, 255).astype(np.uint8))
        return out
