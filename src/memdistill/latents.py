"""The training latents as the reference training sees them: per image (and, with flipping, its mirror image) the
VAE posterior N(mean, exp(logvar)), from which every step draws its own flips and its own posterior sample.

Drawing anew each step, instead of reusing one sample encoded once, is what the reference code does; the draws come
from a generator the caller derives from (seed, step), so a resumed run and a torchrun run repeat them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLIP_CHOICES = ("auto", "on", "off")


@dataclass
class LatentPosterior:
    """Posterior statistics of N images, as the VAE gives them (before the scaling factor).

    mean: (N, V, C, h, w) float32; V = 2 when flipping is on (view 1 is the mirror image), else 1.
    logvar: the same shape, or None where there is no posterior (pixel codec: the mean is the image itself).
    scale, shift: a draw z becomes (z - shift) * scale, as the codec does when it encodes on the fly.
    """

    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self):
        if self.mean.dim() < 3 or self.mean.shape[1] not in (1, 2):
            raise ValueError(f"mean must be (N, V, ...) with V = 1 or 2, got {tuple(self.mean.shape)}")
        if self.logvar is not None and self.logvar.shape != self.mean.shape:
            raise ValueError(f"logvar {tuple(self.logvar.shape)} does not match mean {tuple(self.mean.shape)}")

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def flips(self) -> bool:
        """Whether the mirror images are held (and drawn from half of the time)."""
        return self.mean.shape[1] == 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of one latent."""
        return tuple(self.mean.shape[2:])

    def to(self, device: torch.device | str) -> "LatentPosterior":
        logvar = None if self.logvar is None else self.logvar.to(device)
        return LatentPosterior(self.mean.to(device), logvar, self.scale, self.shift)

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents (B, C, h, w) of the images ``idx`` (B,), on the device of ``mean``: from ``generator`` (a CPU
        generator), first which of them are mirrored (B uniform draws, < 0.5 mirrors; only when flipping is on),
        then the posterior noise eps (B, C, h, w) ~ N(0, I) (only when there is a posterior); the latent is
        (mean + exp(0.5 * logvar) * eps - shift) * scale, the sample a diffusers AutoencoderKL draws with the same
        noise, scaled as encoding does."""
        n = idx.shape[0]
        view = (torch.rand(n, generator=generator) < 0.5).long() if self.flips else torch.zeros(n, dtype=torch.long)
        # Both index tensors on the statistics' device: advanced indexing must not mix devices.
        idx, view = idx.to(self.mean.device), view.to(self.mean.device)
        mean = self.mean[idx, view]  # (B, C, h, w)
        if self.logvar is None:
            return mean
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        z = mean + torch.exp(0.5 * self.logvar[idx, view]) * eps
        return (z - self.shift) * self.scale
