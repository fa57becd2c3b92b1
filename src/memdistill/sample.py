"""Sampling a distilled set: IPC images per class from a (fine-tuned) DiT, saved as an image set.

Image (class c, index i) draws all its noise from ``diffusion.image_generator(seed, c, i)``, with c the
class's position in the model's class list: the set is the same for any batch size, any number of
processes and any choice of ``classes``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checks import flag, require_finite, require_int
from .codec import Codec, check_latents_fit, make_codec, vae_changes
from .devices import dist_setup, resolve_device
from .diffusion import NUM_TIMESTEPS, SAMPLERS, GaussianDiffusion, image_generator
from .errors import UserError
from .guidance import class_modes, guidance_fn, mode_guided, parse_interval, validate_guidance
from .imageset import ImageSetWriter, check_target, partial_path
from .manifest import check_output_folder, folder_relation
from .models.dit import DiT, guided
from .runtime import autocast, bars_disabled, check_precision

log = logging.getLogger(__name__)

# What sampling needs from an export's config.json beside the architecture (see train.run_training).
EXPORT_KEYS = ("class_names", "image_shape")


@dataclass
class SampleConfig:
    model: str = "mnist5k"  # shipped name, run folder, export folder, official .pt or diffusers DiT folder
    ipc: int = 10
    cfg_scale: float = 4.0
    steps: int = 50
    sampler: str = "ddpm"  # ddpm | ddim
    eta: float = 0.0  # DDIM noise (0 = deterministic)
    guided_channels: int | None = None  # None = all latent channels; 3 reproduces the official DiT sampler
    # Guidance levers (guidance.py); timesteps on the original 1000-step scale.
    cfg_interval: str | None = None  # "a,b": guide only at timesteps a <= t < b (scale 1 elsewhere); None = all
    cfg_schedule: str = "constant"  # guidance.CFG_SCHEDULES: how the scale ramps with t
    mode_guidance: float = 0.0  # strength (0..1) of the pull of each image's predicted x0 towards its mode; 0 = off
    mode_stop: float = 0.5  # the pull lasts for this fraction of the trajectory, from pure noise
    modes: int | None = None  # k-means modes per class (image i of a class gets mode i mod k); None = ipc
    mode_data: str | None = None  # real train data for the modes; None = the embedded set the model was trained on
    mode_cache: str | None = None  # folder caching the modes (and VAE latents of mode_data); None = no cache
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"  # runtime.PRECISIONS (auto: tf32 on CUDA, else fp32); the sampler arithmetic stays fp32
    classes: list[int] | None = None  # label indices (positions in the class list) to sample; None = all
    # Only for checkpoints without an export config (official .pt, diffusers DiT) or to override the export's:
    subset: str | None = None  # class list: built-in name (imagewoof, ...) or a text file of names
    codec: str | None = None  # pixel | vae; None = the export's (vae when `vae` is given for a bare checkpoint)
    vae: str | None = None  # local AutoencoderKL folder used to decode (e.g. sd-vae-ft-mse)
    vae_batch_size: int = 32  # latents decoded per VAE call (a 256 px SD-VAE decode needs ~1 GB per 8 images)
    labels: str = "auto"  # class names of `subset` -> model class indices: auto, imagenet or index
    # Over-generate and select (memdistill.selection): ceil(pool x ipc) candidates per class, ipc kept by `select`.
    pool: float | None = None  # F > 1, required to sample a pool for a rule; None with from_pool: all its candidates
    select: str = "none"  # none | selection.RULES
    keep_pool: str | None = None  # folder: keep the candidate pool there as an image set
    from_pool: str | None = None  # folder of a kept pool: select from it instead of sampling
    judge_data: str | None = None  # real train images of the judge; None = the model's embedded dataset
    judge_net: str = "convnet3"
    judge_epochs: int = 5
    judge_cache: str | None = None  # None = judge.default_cache()

    def validate(self, prefix: str = "") -> None:
        """Refuse bad settings with a UserError naming the option (``prefix``: "sample-" inside ``run``)."""
        require_int(flag("ipc", prefix), self.ipc, low=1)
        require_finite(flag("cfg_scale", prefix), self.cfg_scale, low=0)  # 1 = no guidance
        require_int(flag("steps", prefix), self.steps, low=1, high=NUM_TIMESTEPS)
        if self.sampler not in SAMPLERS:
            raise UserError(f"{flag('sampler', prefix)}: unknown sampler {self.sampler!r}; allowed: {', '.join(SAMPLERS)}")
        # eta > 1 makes DDIM's sqrt(1 - abar_prev - sigma^2) imaginary (NaN images)
        require_finite(flag("eta", prefix), self.eta, 0, 1)
        if self.eta != 0 and self.sampler != "ddim":
            raise UserError(f"{flag('eta', prefix)} is the noise of the ddim sampler; with --sampler {self.sampler} "
                            "it would be ignored (use --sampler ddim, or leave --eta at 0)")
        require_int(flag("batch_size", prefix), self.batch_size, low=1)
        require_int(flag("guided_channels", prefix), self.guided_channels, low=1, optional=True)
        validate_guidance(self, prefix)
        if self.mode_cache is not None:
            check_output_folder(self.mode_cache, flag("mode_cache", prefix))
        require_int(flag("vae_batch_size", prefix), self.vae_batch_size, low=1)
        resolve_device(self.device)
        check_precision(self.precision, flag("precision", prefix))
        self._validate_selection(prefix)

    def _validate_selection(self, prefix: str) -> None:
        from .selection import RULES, pool_size

        require_finite(flag("pool", prefix), self.pool, low=1, optional=True)
        if self.select not in ("none", *RULES):
            raise UserError(f"{flag('select', prefix)}: unknown rule {self.select!r}; allowed: none, {', '.join(RULES)}")
        require_int(flag("judge_epochs", prefix), self.judge_epochs, low=1)
        given = [name for name, on in (("pool", self.pool not in (None, 1)), ("keep_pool", self.keep_pool),
                                       ("from_pool", self.from_pool)) if on]
        if given and self.select == "none":
            raise UserError(f"{flag(given[0], prefix)} needs a selection rule: give {flag('select', prefix)} "
                            f"({', '.join(RULES)})")
        if self.keep_pool and self.from_pool:
            raise UserError(f"{flag('keep_pool', prefix)} keeps a pool that is sampled; with "
                            f"{flag('from_pool', prefix)} nothing is sampled: give one of them")
        if self.select == "none":
            return
        # A rule keeps ipc of ceil(F x ipc) candidates: at F = 1 it would keep them all, only reordered.
        if self.pool is None and not self.from_pool:
            raise UserError(f"{flag('select', prefix)} {self.select} keeps --ipc of a larger pool "
                            f"of candidates per class: give {flag('pool', prefix)} F > 1 (e.g. 4)")
        if self.pool is not None and pool_size(self.pool, self.ipc) <= self.ipc:
            raise UserError(f"{flag('pool', prefix)} {self.pool:g} with --ipc {self.ipc} gives "
                            f"{self.ipc} candidates per class, all of which {flag('select', prefix)} would keep: "
                            f"give {flag('pool', prefix)} F > 1 (e.g. 4)")
        if self.from_pool:
            self._validate_from_pool(prefix)

    def _validate_from_pool(self, prefix: str) -> None:
        """With from_pool nothing is sampled: a sampling option set away from its default would be ignored
        silently, so it is refused, as is --classes (the kept pool's classes are all selected from)."""
        defaults = SampleConfig()
        if self.classes is not None:
            raise UserError(f"--classes chooses the classes to sample; {flag('from_pool', prefix)} selects from "
                            "every class of the kept pool: leave --classes out (or keep a pool of those classes)")
        changed = [name for name in SAMPLING_ONLY if getattr(self, name) != getattr(defaults, name)]
        if changed:
            raise UserError(f"{flag(changed[0], prefix)} is a sampling option; with {flag('from_pool', prefix)} "
                            "nothing is sampled (the kept pool's manifest records how it was sampled): leave it "
                            "out")


# Fields that only matter when images are sampled (refused with from_pool, see _validate_from_pool).
SAMPLING_ONLY = ("model", "cfg_scale", "steps", "sampler", "eta", "guided_channels", "cfg_interval", "cfg_schedule",
                 "mode_guidance", "mode_stop", "modes", "mode_data", "mode_cache", "batch_size", "precision",
                 "subset", "codec", "vae", "vae_batch_size", "labels")


def parse_classes(classes) -> list[int] | None:
    """None, a list of ints, or a text such as "0,3,5" -> a list of label indices."""
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c for c in classes.replace(" ", "").split(",") if c]
    try:
        return [int(c) for c in classes]
    except (TypeError, ValueError):
        raise UserError(f"--classes must be label indices such as 0,3,5; got {classes!r}") from None


@dataclass
class Sampler:
    """A loaded model with everything needed to turn (class, index) jobs into images."""

    model: DiT
    codec: Codec
    class_names: list[str]
    cond_labels: list[int]  # the model's class index of each label
    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    device: torch.device
    source: dict  # what the set was sampled from, for the manifest

    def images(self, cfg: SampleConfig, jobs: list[tuple[int, int]], diffusion: GaussianDiffusion | None = None,
               progress: bool = False, modes: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] for jobs (label, index), all in one batch.

        ``modes`` (K, k, *latent_shape): the modes of every label (see ``mode_modes``), required when
        cfg.mode_guidance is on; job (c, i) is pulled towards modes[c, i mod k].
        """
        diffusion = diffusion or GaussianDiffusion()
        fn = _at_precision(guidance_fn(self.model, cfg.cfg_scale, cfg.guided_channels, cfg.cfg_schedule,
                                       parse_interval(cfg.cfg_interval)), self.device, cfg.precision)
        if cfg.mode_guidance and cfg.mode_stop:
            if modes is None:
                raise ValueError("mode guidance needs the modes of the labels (Sampler.mode_modes)")
            own = torch.stack([modes[c, i % modes.shape[1]] for c, i in jobs]).to(self.device)  # (N, *latent_shape)
            fn = mode_guided(fn, diffusion, own, cfg.mode_guidance, cfg.mode_stop)
        y = torch.tensor([self.cond_labels[c] for c, _ in jobs], dtype=torch.long)
        gens = [image_generator(cfg.seed, c, i) for c, i in jobs]
        z = diffusion.sample(fn, self.latent_shape, y, gens, steps=cfg.steps, sampler=cfg.sampler, eta=cfg.eta,
                             device=self.device, progress=progress,
                             clip_x0=self.codec.name == "pixel")  # (N, *latent_shape); pixels live in [-1, 1]
        images = self.codec.decode(z).float().cpu()
        # Checked before decoding's clamp too: NaN is written as black, infinity clamped to white, and either
        # would look like a set.
        if not (bool(torch.isfinite(z).all()) and bool(torch.isfinite(images).all())):
            raise UserError(self._non_finite_message(cfg, jobs, z, images, diffusion))
        return images

    def mode_modes(self, cfg: SampleConfig) -> tuple[torch.Tensor, str]:
        """(modes (K, k, *latent_shape) of every label, the data they come from) for cfg's mode guidance, with
        k = cfg.modes or cfg.ipc: k-means of each class's real train images of cfg.mode_data (default: the
        embedded dataset the model was trained on, when its run recorded it, or the shipped model's own set).
        Raises UserError naming --mode-data when there is none, or when it lacks a class or images."""
        from .data import EMBEDDED, open_dataset
        from .pretrained import SHIPPED_DATA

        data = cfg.mode_data
        trained_on = str(self.source.get("data") or "").split(":")[0]
        if data is None and trained_on in EMBEDDED:
            data = trained_on
        elif data is None and cfg.model in SHIPPED_DATA:  # a shipped model's own training set
            data = SHIPPED_DATA[cfg.model]
        if data is None:
            raise UserError(f"--mode-guidance needs the real train images of the model's classes: give --mode-data "
                            f"(an embedded set: {', '.join(EMBEDDED)}, or a class-per-folder image tree)")
        channels, side = self.image_shape[0], self.image_shape[1]
        ds = open_dataset(data, "train", resolution=side, channels=channels)
        k = cfg.modes or cfg.ipc
        return class_modes(self.codec, ds, self.class_names, k, cfg.seed, cfg.mode_cache), data

    def _non_finite_message(self, cfg: SampleConfig, jobs: list[tuple[int, int]], z: torch.Tensor,
                            images: torch.Tensor, diffusion: GaussianDiffusion) -> str:
        """Why sampling gave non-finite values, for the error: guidance is blamed only when the first failing
        image, sampled again without guidance (the same noise), stays finite; otherwise the model is the cause
        (typically training diverged to huge weights that are still finite)."""
        bad = (~torch.isfinite(z.float().cpu()).flatten(1).all(1)) | (~torch.isfinite(images).flatten(1).all(1))
        job = jobs[int(bad.nonzero()[0, 0])]
        settings = f"--sampler {cfg.sampler}, --steps {cfg.steps}"
        if cfg.cfg_scale != 1:
            plain = dataclasses.replace(cfg, cfg_scale=1.0)
            fn = _at_precision(guided(self.model, 1.0, cfg.guided_channels), self.device, cfg.precision)
            y = torch.tensor([self.cond_labels[job[0]]], dtype=torch.long)
            z1 = diffusion.sample(fn, self.latent_shape, y, [image_generator(plain.seed, *job)], steps=plain.steps,
                                  sampler=plain.sampler, eta=plain.eta, device=self.device,
                                  clip_x0=self.codec.name == "pixel")
            if bool(torch.isfinite(z1).all()) and bool(torch.isfinite(self.codec.decode(z1).float()).all()):
                return (f"sampling produced non-finite values (NaN or infinity) with --cfg-scale {cfg.cfg_scale:g}, "
                        f"{settings}, and finite ones without guidance; nothing was written. A smaller --cfg-scale "
                        "avoids it")
        largest = max((float(p.detach().abs().max()) for p in self.model.parameters() if p.numel()), default=0.0)
        return (f"sampling produced non-finite values (NaN or infinity) from the model {self.source.get('model')} "
                f"itself ({settings}{', also without guidance' if cfg.cfg_scale != 1 else ''}; its largest weight "
                f"is {largest:.3g} in magnitude): the model may have diverged in training; nothing was written. "
                "Sample another model, or train it again (e.g. with a smaller --lr)")


def _at_precision(fn, device: torch.device, precision: str):
    """``fn`` (x, t, y) -> eps output with its forward under ``precision`` autocast, returned in fp32 so that the
    diffusion update (posterior means, variances, noise) is computed in fp32."""
    if precision == "fp32":
        return fn

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            out = fn(x, t, y)
        return out.float()

    return forward


def _run_info(export: Path) -> dict:
    """Data identity and method details from the run folder around an export, when there is one."""
    manifest = export.parent / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("export") != export.name:  # not a run's manifest: no run info
        return {}
    info = {"run": str(export.parent), "run_stage": data.get("stage"), "data": data.get("data")}
    memory = (data.get("config") or {}).get("memory")
    if memory is not None:
        info["memory"] = memory
    return info


def _check_export_fields(path: Path, cfg: dict) -> None:
    """The keys of an export's config.json that sampling reads, each of the JSON shape it needs; one line
    naming ``path`` and the key otherwise."""
    def ints(v, n: int | None = None) -> bool:
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in v))

    checks = {
        "class_names": (lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v),
                        "a list of class names"),
        "cond_labels": (lambda v: ints(v, len(cfg["class_names"])), "one integer label per class"),
        "image_shape": (lambda v: ints(v, 3), "[channels, height, width]"),
        "latent_shape": (lambda v: v is None or ints(v, 3), "[channels, height, width]"),
        "codec": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("name"), str)),
                  'an object with a "name"'),
    }
    missing = [key for key in EXPORT_KEYS if key not in cfg]
    if missing:
        raise UserError(f"{path} is a damaged memdistill export: it lacks {', '.join(missing)}")
    for key, (ok, shape) in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise UserError(f"{path}: {key!r} must be {shape}, got {cfg[key]!r:.80}")


def _check_vae_fits(codec, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int],
                    cfg: SampleConfig, recorded: dict) -> None:
    """Refuse, before any sampling, a VAE whose latents of the export's ``image_shape`` (C, H, W) images are not the
    model's ``latent_shape``, or that decodes to other channels: it would decode to images of another shape than the
    set's. One line naming --vae (or the VAE the export records, when --vae is not given) and both shapes."""
    vae = f"--vae {cfg.vae}" if cfg.vae is not None else f"the VAE {recorded.get('path')} that the export records"
    hint = (f"give the --vae the model was trained with ({recorded.get('path')}), or leave --vae out"
            if cfg.vae is not None else "give a --vae that matches the model")
    if codec.image_channels != image_shape[0]:
        raise UserError(f"{vae} decodes {codec.image_channels}-channel images but the model {cfg.model} makes images "
                        f"of shape {tuple(image_shape)}; {hint}")
    try:
        shape = codec.latent_shape(image_shape)
    except UserError as e:
        raise UserError(f"{vae}: {e}; {hint}") from None
    check_latents_fit(f"vae ({vae})", shape, latent_shape, cfg.model, hint)


def _check_vae_unchanged(codec, recorded: dict, model: str) -> None:
    """Refuse the VAE that an export records when its files (config, padding record, weights; see
    VAECodec.identity) differ from what the export recorded at training time: it would decode the model's latents
    differently. Weights whose modification times differ are compared by content when the export recorded their
    sha256 (VAECodec.weights_sha256), so a copied folder passes. Exports that record no identity (older ones) are
    not checked; an explicit --vae is taken as is."""
    changed = vae_changes(recorded, codec.identity(), codec.weights_sha256)
    if changed:
        raise UserError(f"the VAE {recorded.get('path')} changed since the model {model} was trained (its "
                        f"{', '.join(changed)} differ): its latents may decode differently; pass --vae "
                        f"{recorded.get('path')} to sample with it anyway, or train the model again on it")


def load_sampler(cfg: SampleConfig, device: torch.device | None = None) -> Sampler:
    """Load the model behind cfg.model (an export's EMA weights) with its codec and class list."""
    from .data import conditioning_labels, resolve_classes
    from .models.io import EXPORT_CONFIG, load_dit, load_export
    from .pretrained import resolve_model

    device = device or resolve_device(cfg.device)
    path = resolve_model(cfg.model)
    export_cfg = None
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        try:
            text = json.loads((path / EXPORT_CONFIG).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path / EXPORT_CONFIG}: {e}") from None
        if isinstance(text, dict) and isinstance(text.get("model"), dict):  # written by save_export
            export_cfg = text
    source = {"model": cfg.model, "path": str(path)}

    if export_cfg is not None:
        model, export_cfg = load_export(path)
        _check_export_fields(path / EXPORT_CONFIG, export_cfg)
        if cfg.subset is not None or cfg.labels != "auto":
            raise UserError(f"{path} is an export with its own class list and labels; --subset and --labels are "
                            "only for bare checkpoints")
        class_names = list(export_cfg["class_names"])
        cond_labels = [int(c) for c in export_cfg.get("cond_labels", range(len(class_names)))]
        codec_cfg = dict(export_cfg.get("codec") or {"name": "pixel"})
        if cfg.codec is not None:
            codec_cfg = {"name": cfg.codec}
        if cfg.vae is not None:
            if codec_cfg["name"] != "vae":
                raise UserError(f"--vae decodes latents, but {path} works in {codec_cfg['name']} space; leave --vae out")
            codec_cfg["path"] = cfg.vae
        image_shape = tuple(export_cfg["image_shape"])
        latent_shape = tuple(export_cfg.get("latent_shape") or (model.in_channels, *[model.config.input_size] * 2))
        source.update(stage=export_cfg.get("stage"), **_run_info(path))
    else:
        if cfg.subset is None or (cfg.vae is None and cfg.codec != "pixel"):
            raise UserError(f"{path} is not a memdistill export: sampling it needs subset (the class list, e.g. "
                            "imagewoof or a text file) and vae (a local AutoencoderKL folder to decode with)")
        model = load_dit(path)
        class_names = resolve_classes(cfg.subset, None)
        cond_labels = conditioning_labels(class_names, cfg.labels, model.num_classes)
        codec_cfg = {"name": cfg.codec or "vae", "path": cfg.vae}
        latent_shape = (model.in_channels, model.config.input_size, model.config.input_size)
        image_shape = None
        source.update(stage="checkpoint", subset=cfg.subset)

    bad = [c for c in cond_labels if not 0 <= c < model.num_classes]
    if bad:
        raise UserError(f"class indices {bad} are outside the model's {model.num_classes} classes")
    codec = make_codec(codec_cfg["name"], codec_cfg.get("path"), device=device, batch_size=cfg.vae_batch_size)
    if hasattr(codec, "load"):
        codec.load()  # a damaged VAE folder fails now, not after the first batch has been sampled
    if image_shape is not None and codec.name != "pixel":
        _check_vae_fits(codec, image_shape, latent_shape, cfg, export_cfg.get("codec") or {})
    if image_shape is None:
        if codec.name == "pixel":
            image_shape = latent_shape
        else:
            f = codec.downsample
            if codec.latent_channels != model.in_channels:
                raise UserError(f"the VAE has {codec.latent_channels} latent channels, the DiT {model.in_channels}")
            image_shape = (3, latent_shape[1] * f, latent_shape[2] * f)
    if export_cfg is not None and cfg.vae is None and codec.name == "vae":
        _check_vae_unchanged(codec, export_cfg.get("codec") or {}, cfg.model)
    source["codec"] = codec.config()
    return Sampler(model.to(device).eval(), codec, class_names, cond_labels, tuple(latent_shape),
                   tuple(int(s) for s in image_shape), device, source)


def sample_set(cfg: SampleConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Sample cfg.ipc images for each class (or cfg.classes) into the image set ``out``.

    With a selection rule (cfg.select), ceil(cfg.pool x cfg.ipc) candidates per class are sampled instead, by
    the same per-image noise rule (candidate j is image j), into a pool (cfg.keep_pool, else a hidden folder
    removed afterwards), and cfg.ipc of them are kept (selection.select_from_pool); with cfg.from_pool, the
    first ceil(cfg.pool x cfg.ipc) candidates (default: all) of that kept pool are selected from without
    sampling. Everything the selection needs (the pool folder, the judge's data, net and cache) is checked
    before sampling. Raises UserError for bad settings, naming the option."""
    from .selection import pool_size

    cfg = dataclasses.replace(cfg, classes=parse_classes(cfg.classes))
    cfg.validate()
    out = check_target(out, overwrite)
    if cfg.from_pool:
        return _select(cfg, cfg.from_pool, out, overwrite, kept=True)
    if cfg.select == "none":
        return _sample(cfg, out, overwrite)
    pool = _pool_folder(cfg, out, overwrite)
    try:
        # The pool is a plain set of ceil(F x IPC) images per class: image j of a class is candidate j.
        _sample(dataclasses.replace(cfg, ipc=pool_size(cfg.pool, cfg.ipc)), pool, overwrite=True,
                check=lambda sampler, classes: _check_judge(cfg, sampler, classes))
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            _select(cfg, pool, out, overwrite, kept=bool(cfg.keep_pool))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the selected set is in place before any rank returns
    finally:
        if not cfg.keep_pool:
            shutil.rmtree(pool, ignore_errors=True)
    return out


def _pool_folder(cfg: SampleConfig, out: Path, overwrite: bool) -> Path:
    """The folder the candidates are sampled into: cfg.keep_pool, checked as ``out`` is (writable; an existing
    one only with ``overwrite``) and apart from ``out`` (the pool and the selected set are two sets), else
    a hidden sibling of ``out``, removed after selecting."""
    if not cfg.keep_pool:
        return out.parent / f".{out.name}.pool"
    check_output_folder(cfg.keep_pool, "--keep-pool")
    relation = folder_relation(cfg.keep_pool, out)
    if relation is not None:
        why = {"is": "is", "inside": "lies inside", "holds": "holds"}[relation]
        raise UserError(f"--keep-pool {cfg.keep_pool} {why} --out {out}: the pool and the selected set are two "
                        "image sets and need two separate folders; choose another --keep-pool")
    return check_target(cfg.keep_pool, overwrite)


def _check_judge(cfg: SampleConfig, sampler: Sampler, classes: list[int]) -> None:
    """What cfg.select's judge needs (selection.judge_train_set), checked before the pool is sampled."""
    from .selection import NEEDS_JUDGE, judge_train_set

    if cfg.select in NEEDS_JUDGE:
        # the fields of the pool's manifest that judge_data_default reads
        manifest = {"data": sampler.source.get("data"), "source": sampler.source}
        judge_train_set(manifest, [sampler.class_names[c] for c in classes], sampler.image_shape[0],
                        sampler.image_shape[-1], cfg.select, cfg.judge_data, None, cfg.judge_net, cfg.judge_cache,
                        f"the model {cfg.model}")


def _select(cfg: SampleConfig, pool: str | Path, out: Path, overwrite: bool, kept: bool) -> Path:
    """cfg.ipc of the first ceil(cfg.pool x cfg.ipc) candidates (all without cfg.pool) of ``pool`` per class
    kept by cfg.select into ``out``."""
    from .selection import pool_size, select_from_pool

    record = {k: getattr(cfg, k) for k in ("pool", "select", "keep_pool", "from_pool", "judge_data", "judge_net",
                                           "judge_epochs", "judge_cache")}
    size = pool_size(cfg.pool, cfg.ipc) if cfg.pool is not None else None
    return select_from_pool(pool, cfg.select, cfg.ipc, out, size=size, seed=cfg.seed, judge_data=cfg.judge_data,
                            judge_net=cfg.judge_net, judge_epochs=cfg.judge_epochs, judge_cache=cfg.judge_cache,
                            device=cfg.device, overwrite=overwrite, kept_pool=kept, config=record, factor=cfg.pool)


def _sample(cfg: SampleConfig, out: Path, overwrite: bool, check=None) -> Path:
    """cfg.ipc images per class, image i of class c from image_generator(seed, c, i), into ``out``.
    ``check(sampler, classes)``, when given, runs once the model is loaded and before anything is sampled."""
    rank, world, device = dist_setup(cfg.device)
    sampler = load_sampler(cfg, device)
    # fail on a bad guidance setting or class list before any work
    guidance_fn(sampler.model, cfg.cfg_scale, cfg.guided_channels, cfg.cfg_schedule, parse_interval(cfg.cfg_interval))
    k = len(sampler.class_names)
    classes = cfg.classes if cfg.classes is not None else list(range(k))
    bad = [c for c in classes if not 0 <= c < k]
    if bad or len(set(classes)) != len(classes) or not classes:
        raise UserError(f"--classes must be distinct label indices in 0..{k - 1}, got {classes}")
    if check is not None:
        check(sampler, classes)
    modes = None
    if cfg.mode_guidance and cfg.mode_stop:
        modes, data = sampler.mode_modes(cfg)
        cfg = dataclasses.replace(cfg, mode_data=data, modes=modes.shape[1])  # the manifest records what was used

    names = [sampler.class_names[c] for c in classes]
    jobs = [(c, i) for c in classes for i in range(cfg.ipc)]
    mine = jobs[rank::world]  # disjoint shares; each image's noise does not depend on who samples it

    # Every rank writes into rank 0's partial folder; only rank 0 creates and commits it.
    shared = [str(partial_path(out))]
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
        if rank != 0:
            dist.barrier()  # wait for rank 0 to create the folder
    writer = ImageSetWriter(out, names, sampler.image_shape, overwrite, partial=shared[0], create=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    position = {c: j for j, c in enumerate(classes)}
    diffusion = GaussianDiffusion()
    with writer, tqdm(total=len(mine), desc="sampling", unit="img", disable=bars_disabled()) as bar:
        for start in range(0, len(mine), cfg.batch_size):
            batch = mine[start:start + cfg.batch_size]
            for (c, i), x in zip(batch, sampler.images(cfg, batch, diffusion, modes=modes)):
                writer.add(x, position[c], i)
            bar.update(len(batch))
        if world > 1:
            dist.barrier()  # every rank's images are on disk
        if rank == 0:
            manifest = {
                "stage": "sample",
                "config": dataclasses.asdict(cfg),
                "method": "sample",
                "seed": cfg.seed,
                "classes": classes,
                "cond_labels": [sampler.cond_labels[c] for c in classes],
                "source": sampler.source,
                "data": sampler.source.get("data"),
            }
            writer.commit(manifest)
    if world > 1:
        dist.barrier()  # the set is in place before any rank returns
    return out
