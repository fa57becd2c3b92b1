"""Batched image augmentation on (N, C, H, W) float tensors, without torchvision.

Every random draw is made on the CPU with the caller's torch.Generator and then moved to the images'
device, so a seed gives the same augmentation on any device. Randomness is per sample unless a
docstring says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from memdistill.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (AlexNet lighting noise); eigenvectors are the columns.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB; 0.5/0.5 (maps [0,1] to [-1,1]) for any other channel count."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)  # (n,) on CPU


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bilinear, antialiased) and take the central size x size crop."""
    _, _, h, w = x.shape
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return x[:, :, top:top + size, left:left + size]


def _crop_boxes(n: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float],
                generator: torch.Generator | None, tries: int = 10) -> torch.Tensor:
    """Integer crop boxes (n, 4) as (top, left, height, width), torchvision's RandomResizedCrop rule:
    up to `tries` draws of area fraction and log-uniform aspect ratio, the first that fits wins;
    otherwise a central crop with the ratio clamped to the allowed range."""
    area = h * w * _uniform(n * tries, scale[0], scale[1], generator).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, tries))
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)  # (n, tries)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first fitting try
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    top = torch.floor(torch.rand(n, generator=generator) * (h - ch + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (w - cw + 1))

    if w / h < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        fw, fh = int(round(h * ratio[1])), h
    else:
        fw, fh = w, h
    ok = fits.any(dim=1)
    ch = torch.where(ok, ch, torch.tensor(float(fh)))
    cw = torch.where(ok, cw, torch.tensor(float(fw)))
    top = torch.where(ok, top, torch.tensor(float((h - fh) // 2)))
    left = torch.where(ok, left, torch.tensor(float((w - fw) // 2)))
    return torch.stack([top, left, ch, cw], dim=1)  # (n, 4)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Resample each box (top, left, height, width) in pixels to size x size, bilinear (no antialias)."""
    n, c, h, w = x.shape
    top, left, bh, bw = boxes.to(torch.float32).unbind(1)
    # align_corners=False maps output pixel centres to box pixel centres exactly: a full-image box
    # at the same size reproduces the input.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, size: int, scale: Sequence[float] = (0.5, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop (area fraction in `scale`, aspect in `ratio`) resized to size x size."""
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise UserError(f"random_resized_crop needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                        f"got scale={tuple(scale)}, ratio={tuple(ratio)}")
    _, _, h, w = x.shape
    return crop_resize(x, _crop_boxes(x.shape[0], h, w, scale, ratio, generator), size)


def random_flip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)  # (N,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luminance; a 1-channel image is its own gray."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, contrast and saturation on [0, 1] images, factors uniform in [max(0, 1-s), 1+s]
    per sample. The order of the three is drawn once per batch (torchvision draws it per call too).
    Saturation needs colour: it is a no-op for non-RGB images."""
    n = x.shape[0]
    factors = {name: _uniform(n, max(0.0, 1 - s), 1 + s, generator)
               for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation))}
    order = torch.randperm(3, generator=generator).tolist()
    for op in order:
        if op == 0 and brightness > 0:
            x = _blend(x, torch.zeros_like(x), factors["brightness"])
        elif op == 1 and contrast > 0:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
            x = _blend(x, mean.expand_as(x), factors["contrast"])
        elif op == 2 and saturation > 0 and x.shape[1] == 3:
            x = _blend(x, _gray(x).expand_as(x), factors["saturation"])
    return x


def lighting(x: torch.Tensor, std: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """AlexNet PCA lighting noise: add eigvec @ (alpha * eigval), alpha ~ N(0, std^2) per sample, i.e. one
    constant per channel per image. Only meaningful for RGB: a no-op for other channel counts."""
    if x.shape[1] != 3 or std <= 0:
        return x
    alpha = torch.randn(x.shape[0], 3, generator=generator) * std  # (N, 3)
    eigval = torch.tensor(IMAGENET_EIGVAL)
    eigvec = torch.tensor(IMAGENET_EIGVEC)
    shift = (alpha * eigval) @ eigvec.T  # (N, 3): one RGB offset per image
    return x + shift.to(device=x.device, dtype=x.dtype)[:, :, None, None]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise UserError(f"normalize: mean/std have {len(mean)}/{len(std)} values for {x.shape[1]}-channel images")
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, beta: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one random box from a shuffled copy of the batch into every image.

    One lambda ~ Beta(beta, beta) per batch sets the box area; lambda is then recomputed from the clipped
    box, so the soft target (N, num_classes) = lam * onehot(y) + (1 - lam) * onehot(y[perm]) weights each
    label by the exact fraction of pixels it owns.
    """
    if beta <= 0:
        raise UserError(f"cutmix beta must be > 0, got {beta}")
    n, _, h, w = x.shape
    # torch's Beta sampler takes no generator: seed numpy's from the torch generator instead.
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(beta, beta))
    perm = torch.randperm(n, generator=generator)
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)

    perm = perm.to(x.device)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    onehot = F.one_hot(y, num_classes).to(x.dtype)  # (N, classes)
    return mixed, lam * onehot + (1 - lam) * onehot[perm]


@dataclass
class TrainAugment:
    """The evaluation protocol's training transform on [0, 1] images already at (or above) `size`:
    random resized crop, flip, colour jitter, PCA lighting, normalise. mean/std None -> default_mean_std."""

    size: int
    scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    jitter: bool = True
    lighting: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, x01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_resized_crop(x01, self.size, scale=self.scale, generator=generator)
        if self.flip:
            x = random_flip(x, generator=generator)
        if self.jitter:
            x = color_jitter(x, generator=generator)
        if self.lighting:
            x = lighting(x, generator=generator)
        mean, std = default_mean_std(x.shape[1])
        return normalize(x, self.mean or mean, self.std or std)


def test_transform(x01: torch.Tensor, size: int, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> torch.Tensor:
    """Deterministic test transform: resize + centre crop, then normalise (defaults by channel count)."""
    dmean, dstd = default_mean_std(x01.shape[1])
    return normalize(resize_center_crop(x01, size), mean or dmean, std or dstd)


# pytest would otherwise try to collect this module-level function when imported into a test file.
test_transform.__test__ = False  # type: ignore[attr-defined]
