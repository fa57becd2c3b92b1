"""Gaussian diffusion: the linear schedule, forward noising, the hybrid training loss and samplers.

The network never appears here: every function takes ``model_fn(x_t, t, y) -> output`` where the output
holds eps in its first C channels and, with learned sigma, a variance interpolation value in the next C.
Classifier-free guidance is therefore just another ``model_fn`` (see ``models.dit.guided``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim")


NUM_TIMESTEPS = 1000  # T of the DiT training schedule (METHOD.md section 2)


def linear_betas(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The DDPM linear schedule, in float64 so that products over 1000 steps stay exact enough."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps of ``range(num_timesteps)`` evenly spread, first and last included, ascending.

    The rule of DiT / improved-diffusion's respacing (one section): a float position starts at 0 and grows by
    the float stride (num_timesteps - 1) / (steps - 1) after each pick, and each pick is Python's ``round``
    (half to even) of the running position. Rounding the accumulated sum, not ``i * stride``, is what makes
    the lists equal theirs for every step count: the two differ by one timestep for a few hundred counts.

    One step deviates on purpose: their rule takes timestep 0 (a stride of 1 from 0), which would feed the
    network a nearly clean timestep on pure noise. We take T-1, so one step returns the model's clean
    prediction from pure noise.

    Raises UserError unless 1 <= steps <= num_timesteps.
    """
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"number of sampling steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    # A stride >= 1 keeps the picks distinct and the accumulated error (~1e-13) keeps the last one at
    # num_timesteps - 1; sorting a set guards the invariants the schedule relies on anyway.
    return sorted(set(kept))


def _gather(s: "Schedule", name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The schedule table ``name`` at indices t (N,), shaped (N, 1, ...) to broadcast against ``like``, in
    ``like``'s dtype and on its device. The table comes from the schedule's per-device cache: copying the
    float64 table to the device on every call costs a host-to-device transfer per call in the training
    loop. Casting the table before indexing gives the same values as indexing before casting."""
    out = s.on(name, like.device, like.dtype)[t]
    return out.view(-1, *([1] * (like.dim() - 1)))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins (the t = 0 term of the variational bound)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


@dataclass
class Schedule:
    """Per-step constants of a (possibly respaced) chain. ``timesteps[i]`` is the original timestep of step i,
    which is what the network is conditioned on."""

    betas: torch.Tensor  # (S,) float64
    timesteps: torch.Tensor  # (S,) int64

    def __post_init__(self):
        b = self.betas
        self.alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=b.dtype), self.alphas_cumprod[:-1]])
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at the first step, so its log is replaced there by the next step's
        # (IDDPM's clipping). A one-step chain has no next step: beta stands in. Either way the value at
        # the first step is never used to draw noise (the last sampling step adds none), it only keeps
        # the logs finite.
        first = self.posterior_variance[1:2] if len(b) > 1 else b[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        # The fixed "large" variance (beta, with the same first value), for models without learned sigma.
        self.log_variance_large = torch.log(torch.cat([first, b[1:]]))
        self.posterior_mean_coef1 = b * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * torch.sqrt(1.0 - b) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = torch.log(b)
        self._on: dict[tuple, torch.Tensor] = {}

    def on(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The table ``name`` (S,) in ``dtype`` on ``device``, converted once and cached."""
        key = (name, torch.device(device), dtype)
        if key not in self._on:
            self._on[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._on[key]

    @property
    def num_steps(self) -> int:
        return len(self.betas)


class GaussianDiffusion:
    """A linear-beta diffusion of ``num_timesteps`` steps and its respaced sampling chains."""

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_timesteps = num_timesteps
        self.base = Schedule(linear_betas(num_timesteps, beta_start, beta_end), torch.arange(num_timesteps))

    # ----- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
        abar = _gather(self.base, "alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: Schedule | None = None):
        """zhat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), per sample at its own t (step index of ``schedule``)."""
        s = schedule or self.base
        abar = _gather(s, "alphas_cumprod", t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    # ----- reverse process -------------------------------------------------------------------------
    def _posterior(self, s: Schedule, x0, x_t, i):
        mean = _gather(s, "posterior_mean_coef1", i, x_t) * x0 + _gather(s, "posterior_mean_coef2", i, x_t) * x_t
        return mean, _gather(s, "posterior_log_variance_clipped", i, x_t)

    def p_mean_variance(self, s: Schedule, output: torch.Tensor, x_t: torch.Tensor, i: torch.Tensor,
                        clip_x0: bool = False):
        """Mean, log-variance and predicted x0 of p(x_{i-1} | x_i) from the network output at step index i.
        ``clip_x0`` clamps the predicted x0 to [-1, 1]: right for pixels, wrong for VAE latents."""
        c = x_t.shape[1]
        eps = output[:, :c]
        if output.shape[1] == 2 * c:
            # Learned range: interpolate (in log space) between the posterior variance and beta.
            frac = (output[:, c:] + 1.0) / 2.0
            min_log = _gather(s, "posterior_log_variance_clipped", i, x_t)
            max_log = _gather(s, "log_betas", i, x_t)
            log_var = frac * max_log + (1.0 - frac) * min_log
        elif output.shape[1] == c:
            # Fixed "large" variance, as DDPM with a fixed sigma.
            log_var = _gather(s, "log_variance_large", i, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {output.shape[1]} channels, expected {c} or {2 * c}")
        x0 = self.predict_x0(x_t, i, eps, s)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self._eps_from_x0(s, x_t, i, x0)
        mean, _ = self._posterior(s, x0, x_t, i)
        return mean, log_var, x0, eps

    def _eps_from_x0(self, s: Schedule, x_t, i, x0):
        abar = _gather(s, "alphas_cumprod", i, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    # ----- training --------------------------------------------------------------------------------
    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hybrid loss DiT is trained with: MSE on eps plus, with learned sigma, the variational bound on
        the variance channels with the mean detached (so the bound trains only the variance).

        Returns per-sample ``loss``, ``mse``, ``vb`` (N,), and ``pred_x0`` (not detached) for the memory losses.
        """
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t, y)
        c = x0.shape[1]
        eps = out[:, :c]
        mse = _mean_flat((noise - eps) ** 2)
        vb = torch.zeros_like(mse)
        if out.shape[1] == 2 * c:
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            vb = self._vb_term(frozen, x0, x_t, t)
        pred_x0 = self.predict_x0(x_t, t, eps)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "pred_x0": pred_x0, "x_t": x_t}

    def _vb_term(self, output, x0, x_t, t):
        """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits per dimension; the decoder NLL at t = 0."""
        s = self.base
        true_mean, true_log_var = self._posterior(s, x0, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(s, output, x_t, t)
        kl = _mean_flat(_normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----- sampling --------------------------------------------------------------------------------
    def respaced(self, steps: int) -> Schedule:
        """The chain that visits ``steps`` of the original timesteps, with betas recomputed so that each
        visited step keeps its original abar (the IDDPM respacing)."""
        kept = respaced_timesteps(self.num_timesteps, steps)
        abar = self.base.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return Schedule(1.0 - abar / prev, torch.tensor(kept, dtype=torch.long))

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, shape: Sequence[int], y: torch.Tensor,
               generators: Sequence[torch.Generator], steps: int = 50, sampler: str = "ddpm", eta: float = 0.0,
               device: torch.device | str = "cpu", progress: bool = False, clip_x0: bool = False) -> torch.Tensor:
        """Generate ``len(y)`` samples of per-image ``shape``. ``clip_x0``: see ``p_mean_variance``.

        Every image draws all of its noise from its own generator, so an image depends only on its
        generator's seed and label, never on the batch it happens to be in.
        """
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if len(generators) != len(y):
            raise ValueError("one generator per image is required")
        s = self.respaced(steps)

        def noise_like() -> torch.Tensor:  # (N, *shape), one draw per image from its own generator
            return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)

        x = noise_like()
        y = y.to(device)
        for i in tqdm(range(s.num_steps - 1, -1, -1), desc=f"{sampler} sampling", disable=not progress, leave=False):
            idx = torch.full((len(y),), i, dtype=torch.long, device=device)
            t = s.on("timesteps", device, torch.long)[idx]
            out = model_fn(x, t, y)
            mean, log_var, x0, eps = self.p_mean_variance(s, out, x, idx, clip_x0=clip_x0)
            if sampler == "ddpm":
                x = mean + (torch.exp(0.5 * log_var) * noise_like() if i > 0 else 0.0)
            else:
                abar = _gather(s, "alphas_cumprod", idx, x)
                abar_prev = _gather(s, "alphas_cumprod_prev", idx, x)
                sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
                x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps
                if eta > 0 and i > 0:
                    x = x + sigma * noise_like()
        return x


def image_generator(seed: int, class_index: int, image_index: int) -> torch.Generator:
    """The generator of one image, derived from (seed, class, index) alone (batch-size independent)."""
    g = torch.Generator()
    # A fixed mixing of the three integers; distinct triples give distinct 63-bit seeds in practice.
    mixed = (seed * 1_000_003 + class_index) * 1_000_033 + image_index
    g.manual_seed(mixed % (2**63 - 1))
    return g
