"""Sampling-side guidance levers: a classifier-free guidance window and scale schedule, and mode guidance with
an early stop. Each is a wrapper around a ``model_fn(x_t, t, y)`` (see ``diffusion``), so every sampler and
every fine-tuning method gets them alike, and each decides per image from that image's own timestep, so a
batch's composition never changes an image.

Timesteps t are always on the original 1000-step scale (0 = clean, 999 = pure noise) whatever the number of
sampling steps: ``--steps 50`` visits 50 of them (``diffusion.respaced_timesteps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checks import flag, require_finite, require_int
from .diffusion import NUM_TIMESTEPS, GaussianDiffusion, ModelFn
from .errors import UserError
from .models.dit import DiT, guided

log = logging.getLogger(__name__)

CFG_SCHEDULES = ("constant", "linear", "cosine")


# ----- classifier-free guidance: window and schedule ------------------------------------------------------
def parse_interval(text: str | None, option: str = "--cfg-interval") -> tuple[float, float] | None:
    """"a,b" -> (a, b) with 0 <= a <= b <= 1000 (timesteps of the original scale; a == b is an empty window).
    None stays None (every timestep). Raises UserError naming ``option`` otherwise."""
    if text is None:
        return None
    parts = str(text).replace(" ", "").split(",")
    try:
        a, b = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        a = b = None
    if a is None:
        raise UserError(f"{option} must be two timesteps a,b (guidance for a <= t < b), e.g. 200,800; got {text!r}")
    require_finite(f"{option} start", a, 0, NUM_TIMESTEPS)
    require_finite(f"{option} end", b, a, NUM_TIMESTEPS)
    return a, b


def cfg_scale_at(t: int, scale: float, schedule: str = "constant", interval: tuple[float, float] | None = None,
                 num_timesteps: int = NUM_TIMESTEPS) -> float:
    """The guidance scale used at original timestep ``t`` (0..num_timesteps-1).

    Outside ``interval`` [a, b) the scale is 1 (the conditional prediction alone): guidance in a limited interval,
    after Kynkaenniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution
    quality in diffusion models" (NeurIPS 2024), who guide only in the middle of the noise range. Inside, with
    r = 1 - t / (T - 1) the progress of sampling (0 at pure noise, 1 at the clean end) and w = ``scale``:
      constant: w
      linear:   1 + (w - 1) * r
      cosine:   1 + (w - 1) * (1 - cos(pi * r)) / 2
    i.e. guidance grows from none at pure noise to w at the clean end, the increasing schedules that Wang et al.
    2024, "Analysis of Classifier-Free Guidance Weight Schedulers" (TMLR) found to beat a constant scale (their
    linear and cosine ramps, written here between 1 and w). Always w when w == 1.
    """
    if interval is not None and not interval[0] <= t < interval[1]:
        return 1.0
    if schedule == "constant" or scale == 1:
        return scale
    r = 1.0 - t / (num_timesteps - 1)
    ramp = r if schedule == "linear" else (1.0 - math.cos(math.pi * r)) / 2.0
    return 1.0 + (scale - 1.0) * ramp


def guidance_fn(model: DiT, scale: float, guided_channels: int | None = None, schedule: str = "constant",
                interval: tuple[float, float] | None = None) -> ModelFn:
    """``models.dit.guided`` with a scale that depends on each image's timestep (see ``cfg_scale_at``).

    A constant scale over every timestep returns ``guided`` itself, so it equals plain guidance bit for bit; an
    image whose scale is 1 gets ``model(x, t, y)``, exactly what sampling without guidance computes. Images of one
    call with different scales (never the case in ``diffusion.sample``, where all share t) are run in groups.
    Raises UserError as ``guided`` does (no null class, bad ``guided_channels``), and for an unknown schedule.
    """
    if schedule not in CFG_SCHEDULES:
        raise UserError(f"--cfg-schedule must be one of {', '.join(CFG_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant" and (interval is None or (interval[0] <= 0 and interval[1] >= NUM_TIMESTEPS)):
        return guided(model, scale, guided_channels)
    guided(model, scale, guided_channels)  # refuse a bad setting now, not at the first step inside the window
    by_scale: dict[float, Callable] = {}

    def at(s: float) -> Callable:
        if s not in by_scale:
            by_scale[s] = guided(model, s, guided_channels)
        return by_scale[s]

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # one host read of the (N,) timesteps per step: the scale is a Python float, exactly as plain guidance's
        scales = [cfg_scale_at(int(v), scale, schedule, interval) for v in t.tolist()]
        if len(set(scales)) == 1:
            return at(scales[0])(x, t, y)
        out = None
        for s in dict.fromkeys(scales):
            idx = torch.tensor([j for j, v in enumerate(scales) if v == s], device=x.device)
            part = at(s)(x[idx], t[idx], y[idx])
            out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
            out[idx] = part
        return out

    return forward


# ----- mode guidance -------------------------------------------------------------------------------------
def mode_guided(fn: ModelFn, diffusion: GaussianDiffusion, modes: torch.Tensor, strength: float, stop: float
                ) -> ModelFn:
    """``fn`` with each image's predicted clean sample pulled towards its mode for the first ``stop`` of sampling.

    ``modes`` (N, C, H, W): image j's mode, in the space the DiT works in (pixels or latents). With
    abar = abar_t, eps = the first C output channels and x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar):
        x0' = x0 + strength * (mode - x0)
        eps' = (x_t - sqrt(abar) x0') / sqrt(1 - abar) = eps - strength * sqrt(abar / (1 - abar)) * (mode - x0)
    at every original timestep t >= (1 - stop) * 1000 (``stop`` 0.5: the noisier half of the trajectory), and the
    output unchanged below (the stop). The sampler then builds its mean (DDPM posterior or DDIM update) from
    eps', i.e. from x0': the pull on x_{t-1} is strength * posterior_coef1 * (mode - x0), small at high noise and
    growing as sampling proceeds. ``strength`` 1 replaces x0 by the mode while guidance lasts.
    This is a simplified, deterministic form of the mode guidance and stop guidance of MGD3 (Chan-Santiago et
    al. 2025, "MGD3: Mode-Guided Dataset Distillation using Diffusion Models", ICML 2025, arXiv 2505.18963),
    which steers each sample's predicted clean sample towards a mode of its class found in the real data and
    stops steering part-way through sampling. Strength 0 or stop 0 returns ``fn`` itself.
    """
    if strength == 0 or stop == 0:
        return fn
    start_t = (1.0 - stop) * diffusion.num_timesteps

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = fn(x, t, y)
        c = x.shape[1]
        abar = diffusion.base.on("alphas_cumprod", x.device, x.dtype)[t].view(-1, *[1] * (x.dim() - 1))  # (N,1,1,1)
        eps = out[:, :c]
        x0 = (x - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        on = (t >= start_t).view_as(abar).to(x.dtype)  # (N,1,1,1): 1 while guidance lasts
        pulled = eps - (on * strength) * (abar / (1.0 - abar)).sqrt() * (modes.to(x) - x0)
        return torch.cat([pulled, out[:, c:]], dim=1)

    return forward


def _kmeans(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centres (k, D), cluster sizes (k,)) of k-means on points (n, D) float64, seeded and deterministic."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(points)
    return km.cluster_centers_, np.bincount(km.labels_, minlength=k)


def modes_cache_path(cache_dir: str | Path, dataset, codec_config: dict, class_names: list[str], k: int, seed: int
                     ) -> Path:
    """The cache file of the modes of ``dataset`` (its identity covers the data, split, classes, resolution and
    channels) encoded by the codec ``codec_config`` for the classes ``class_names``, with k and the k-means seed."""
    payload = {"identity": dataset.identity, "resolution": dataset.resolution, "codec": codec_config,
               "class_names": list(class_names), "k": k, "seed": seed}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"modes-{key}.safetensors"


def class_modes(codec, dataset, class_names: list[str], k: int, seed: int = 0, cache_dir: str | Path | None = None,
                option: str = "--mode-data") -> torch.Tensor:
    """The k modes of each class: k-means centres (seeded by ``seed``) of that class's real images of ``dataset``
    encoded by ``codec`` (pixels stay pixels), ordered by cluster size, largest first.

    Returns (len(class_names), k, *latent_shape) float32; row c belongs to ``class_names[c]``, matched to the
    dataset's classes by name. Cached as ``modes-<key>.safetensors`` in ``cache_dir`` (also the latent cache of the
    encoding) when given; a damaged or mismatched cache file is recomputed. Raises UserError (naming ``option`` or
    --modes) when a class is missing from the dataset or has fewer than k images.
    """
    from .codec import _save_atomic, encode_dataset

    missing = [n for n in class_names if n not in dataset.class_names]
    if missing:
        raise UserError(f"{option}: the data has no class {', '.join(missing[:5])} of the model "
                        f"(its classes: {', '.join(list(dataset.class_names)[:10])})")
    # the VAE's identity (its files' hashes): a VAE retrained in place must not reuse the old modes
    codec_key = codec.identity()
    path = modes_cache_path(cache_dir, dataset, codec_key, class_names, k, seed) if cache_dir else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        try:
            modes = load_file(path)["modes"]
            if modes.shape[:2] == (len(class_names), k):
                log.info("mode cache hit: %s", path)
                return modes
        except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            log.warning("mode cache %s is unreadable (%s); recomputing", path, e)
    posterior, targets = encode_dataset(codec, dataset, Path(cache_dir) if cache_dir else None)
    # the posterior means of the unflipped images, scaled as the DiT sees latents (pixels: the images themselves)
    latents = (posterior.mean[:, 0] - posterior.shift) * posterior.scale
    rows = []
    for name in class_names:
        z = latents[targets == list(dataset.class_names).index(name)].double()  # (n_c, C, H, W)
        if len(z) < k:
            raise UserError(f"--modes {k} is more than the {len(z)} real images of class {name!r}; use at most {len(z)}")
        centres, sizes = _kmeans(z.flatten(1).numpy(), k, seed)
        order = np.argsort(-sizes, kind="stable")  # largest mode first: with IPC < k the big modes are sampled
        rows.append(torch.from_numpy(centres[order]).float().view(k, *z.shape[1:]))
    modes = torch.stack(rows)  # (K, k, C, H, W)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({"modes": modes}, path, {"identity": dataset.identity, "k": str(k), "seed": str(seed)})
    return modes


def validate_guidance(cfg, prefix: str = "") -> None:
    """The guidance fields of a SampleConfig, each refused with a UserError naming its option."""
    if cfg.cfg_schedule not in CFG_SCHEDULES:
        raise UserError(f"{flag('cfg_schedule', prefix)} must be one of {', '.join(CFG_SCHEDULES)}, "
                        f"got {cfg.cfg_schedule!r}")
    parse_interval(cfg.cfg_interval, flag("cfg_interval", prefix))
    require_finite(flag("mode_guidance", prefix), cfg.mode_guidance, 0, 1)
    require_finite(flag("mode_stop", prefix), cfg.mode_stop, 0, 1)
    require_int(flag("modes", prefix), cfg.modes, low=1, optional=True)


def refuse_ignored_guidance(value: Callable[[str], object], given: set[str], prefix: str = "") -> None:
    """Refuse guidance options typed on the command line (the fields in ``given``) that would do nothing: the mode
    options without mode guidance, a --cfg-schedule ramp or a --cfg-interval without guidance (--cfg-scale 1),
    and an empty --cfg-interval a,a. ``value(field)`` is the option's value. Defaults never count, nor do the
    settings that bench variants (variant_overrides) build. Raises UserError naming the option."""
    if value("mode_guidance") == 0:
        for name in ("modes", "mode_data", "mode_cache", "mode_stop"):
            if name in given:
                raise UserError(f"{flag(name, prefix)} applies to mode guidance; without {flag('mode_guidance', prefix)} "
                                "(a strength above 0) it would be ignored")
    interval = parse_interval(value("cfg_interval"), flag("cfg_interval", prefix)) if "cfg_interval" in given else None
    if value("cfg_scale") == 1:
        if value("cfg_schedule") != "constant" and "cfg_schedule" in given:
            raise UserError(f"{flag('cfg_schedule', prefix)} {value('cfg_schedule')} ramps the guidance scale; with "
                            f"{flag('cfg_scale', prefix)} 1 (no guidance) it would be ignored")
        if interval is not None:
            raise UserError(f"{flag('cfg_interval', prefix)} limits guidance to a window; with "
                            f"{flag('cfg_scale', prefix)} 1 (no guidance) it would be ignored")
    if interval is not None and interval[0] == interval[1]:
        raise UserError(f"{flag('cfg_interval', prefix)} {value('cfg_interval')} is an empty window (a <= t < b "
                        f"with a = b): no timestep would be guided; give a < b, or {flag('cfg_scale', prefix)} 1 for no "
                        "guidance")


# ----- bench variants ------------------------------------------------------------------------------------
VARIANTS = {
    "modes": "modes:STRENGTH[:STOP[:K]] (mode guidance)",
    "cfgint": "cfgint:A,B (guidance only for timesteps A <= t < B)",
    "cfgsched": "cfgsched:constant|linear|cosine (guidance scale schedule)",
    "cfg": "cfg:SCALE (guidance scale)",
}


def variant_overrides(text: str) -> dict:
    """SampleConfig field overrides of a bench variant argument, e.g. "modes:0.1:0.5" -> {"mode_guidance": 0.1,
    "mode_stop": 0.5}, "cfgint:200,800" -> {"cfg_interval": "200,800"}; see VARIANTS for every form. Values are
    checked as the options are (UserError naming the variant and what is allowed)."""
    name, _, rest = str(text).partition(":")
    args = rest.split(":") if rest else []
    wrong = UserError(f"unknown guidance variant {text!r}; allowed: {'; '.join(VARIANTS.values())}")
    try:
        if name == "modes" and 1 <= len(args) <= 3:
            keys = ("mode_guidance", "mode_stop", "modes")
            over = {key: (int if key == "modes" else float)(v) for key, v in zip(keys, args)}
        elif name == "cfgint" and len(args) == 1:
            over = {"cfg_interval": args[0]}
        elif name == "cfgsched" and len(args) == 1:
            over = {"cfg_schedule": args[0]}
        elif name == "cfg" and len(args) == 1:
            over = {"cfg_scale": float(args[0])}
        else:
            raise wrong
    except ValueError:
        raise wrong from None
    # checked against neutral values of the fields it leaves alone (sample.py's defaults; guidance does not
    # import sample, which imports it)
    fields = types.SimpleNamespace(**{"cfg_scale": 1.0, "cfg_schedule": "constant", "cfg_interval": None,
                                      "mode_guidance": 0.0, "mode_stop": 0.5, "modes": None, **over})
    try:
        require_finite("--cfg-scale", fields.cfg_scale, low=0)
        validate_guidance(fields)
    except UserError as e:
        raise UserError(f"guidance variant {text!r}: {e}") from None
    return over
