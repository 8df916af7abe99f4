"""Fourier phases -> natural-looking images, and random crops of them: the parametrisation of
coordinated activation maximisation (docs/method.md, activation maximisation).

Parametrisation (MaCo, Fel et al. 2023): each image is
``sigmoid(CONTRAST * C @ standardise(irfft2(A * exp(i * phase))))`` on a square canvas, where
only ``phase`` is optimised. ``A`` is a fixed natural-image magnitude spectrum and ``C`` a fixed
3x3 colour matrix, both estimated (deterministically) from the real photos that ship with
scikit-image (astronaut, chelsea, coffee, rocket) and scikit-learn (china, flower):
``C`` is the PCA square root of the photos' RGB pixel covariance (C @ C.T = covariance), and ``A``
is the mean amplitude spectrum of the photos, square-cropped and resized to the canvas, in the
decorrelated colour basis ``C^-1 (rgb - mean)`` under a Hann window (so the photos' borders
add no spurious horizontal/vertical lines), averaged over left-right and up-down flips, with
the DC term set to zero. Crops: random squares covering a range of the canvas area, resized
(bilinear) to a backbone's input size.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

CONTRAST = 1.5
"""Gain between the unit-variance decorrelated image and the sigmoid's input."""


# ---------------------------------------------------------------- natural-image priors
class Priors(NamedTuple):
    """Fixed parts of the parametrisation for one canvas size."""

    colour_33: np.ndarray
    """C: RGB = C @ decorrelated (C @ C.T = RGB pixel covariance of the photos)."""
    magnitude_3hf: np.ndarray
    """Mean amplitude spectrum (rfft2 layout) per decorrelated channel, DC = 0."""


def _photos() -> list[np.ndarray]:
    """Natural photos shipped inside scikit-image and scikit-learn, float RGB in [0, 1]."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    out += list(load_sample_images().images)
    return [np.asarray(p[..., :3], dtype=np.float64) / 255.0 for p in out]


def _square(photo_hw3: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, resized (bicubic) to size x size."""
    from PIL import Image

    h, w, _ = photo_hw3.shape
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    u8 = np.round(photo_hw3[y0 : y0 + s, x0 : x0 + s] * 255).astype(np.uint8)
    img = Image.fromarray(u8).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float64) / 255.0


@functools.lru_cache(maxsize=8)
def natural_priors(canvas: int) -> Priors:
    """Colour matrix and magnitude spectrum estimated from the bundled photos (deterministic)."""
    photos = [_square(p, canvas) for p in _photos()]
    pix_n3 = np.concatenate([p.reshape(-1, 3) for p in photos])
    mean_3 = pix_n3.mean(0)
    cov_33 = np.cov(pix_n3, rowvar=False)
    evals, evecs = np.linalg.eigh(cov_33)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    # Fix eigenvector signs (LAPACK may return either): largest component positive.
    evecs = evecs * np.sign(evecs[np.abs(evecs).argmax(0), np.arange(3)])
    colour_33 = evecs * np.sqrt(np.maximum(evals, 1e-12))
    inv_33 = np.linalg.inv(colour_33)
    mag = np.zeros((3, canvas, canvas // 2 + 1))
    # A Hann window keeps the photos' borders (the FFT sees them as edges) out of the spectrum.
    hann = np.hanning(canvas + 2)[1:-1]
    window_hw = np.outer(hann, hann)
    n = 0
    for p in photos:
        dec_3hw = np.einsum("cj,hwj->chw", inv_33, p - mean_3) * window_hw
        for view in (dec_3hw, dec_3hw[:, :, ::-1], dec_3hw[:, ::-1, :]):
            mag += np.abs(np.fft.rfft2(view, norm="ortho"))
            n += 1
    mag /= n
    mag[:, 0, 0] = 0.0
    # Scale C so every RGB logit has std <= 1 for unit-variance decorrelated channels.
    colour_33 = colour_33 / np.linalg.norm(colour_33, axis=1).max()
    return Priors(colour_33.astype(np.float32), mag.astype(np.float32))


class PhaseImages(nn.Module):
    """n independently parametrised images: optimised Fourier phases, fixed magnitude and colour."""

    def __init__(self, n: int, canvas: int, generator: torch.Generator):
        super().__init__()
        pri = natural_priors(canvas)
        self.canvas = canvas
        self.register_buffer(
            "magnitude_3hf", torch.from_numpy(pri.magnitude_3hf.copy())
        )  # not the cache's
        self.register_buffer("colour_33", torch.from_numpy(pri.colour_33.copy()))
        shape = (n, *pri.magnitude_3hf.shape)
        self.phase_n3hf = nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * math.pi)

    def forward(self, j: int) -> Float[Tensor, "3 h w"]:
        """Image j in [0, 1], shape (3, canvas, canvas)."""
        spec_3hf = torch.polar(self.magnitude_3hf, self.phase_n3hf[j])
        z_3hw = torch.fft.irfft2(spec_3hf, s=(self.canvas, self.canvas), norm="ortho")
        z_3hw = z_3hw / z_3hw.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        logits_3hw = torch.einsum("rc,chw->rhw", self.colour_33, z_3hw)
        return torch.sigmoid(CONTRAST * logits_3hw)


# ---------------------------------------------------------------- crops
def sample_boxes(n: int, scale: tuple[float, float], generator: torch.Generator) -> Tensor:
    """n square boxes as (half side, centre x, centre y) in [-1, 1] canvas coordinates."""
    area_n = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    half_n = area_n.sqrt()  # side fraction s = sqrt(area); half-extent in [-1, 1] units = s
    cx_n = (torch.rand(n, generator=generator) * 2 - 1) * (1 - half_n)
    cy_n = (torch.rand(n, generator=generator) * 2 - 1) * (1 - half_n)
    return torch.stack([half_n, cx_n, cy_n], dim=1)


def crop_resize(image_3hw: Tensor, boxes_n3: Tensor, size: int) -> Float[Tensor, "n 3 size size"]:
    """Bilinear crops of one image at the given boxes, each resized to size x size."""
    n = boxes_n3.shape[0]
    b = boxes_n3.to(device=image_3hw.device, dtype=image_3hw.dtype)
    zero = torch.zeros_like(b[:, 0])
    theta_n23 = torch.stack(
        [torch.stack([b[:, 0], zero, b[:, 1]], 1), torch.stack([zero, b[:, 0], b[:, 2]], 1)], 1
    )
    grid = F.affine_grid(theta_n23, [n, 3, size, size], align_corners=False)
    src = image_3hw.unsqueeze(0).expand(n, -1, -1, -1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
