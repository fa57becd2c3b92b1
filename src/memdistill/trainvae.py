"""`memdistill train-vae`: a small KL-regularised autoencoder (diffusers AutoencoderKL, the architecture family of
sd-vae-ft-ema) trained on one dataset, exported as a ``save_pretrained`` folder that ``--codec vae --vae <folder>``
loads as it loads sd-vae-ft-ema.

Loss (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", their autoencoder loss
without the perceptual and adversarial terms): per image, the L1 (or squared) reconstruction error summed over the
pixels, plus ``kl_weight`` (1e-6, their KL weight) times the KL divergence of the posterior from N(0, I) summed over
the latent; both averaged over the batch. The decoder reconstructs one posterior sample, as in their training.

Scaling factor: 1 / the standard deviation of the posterior *samples* of the whole training split (latent
diffusion's ``scale_by_std`` takes the std of the samples of its first batch), written into the exported
config.json as ``scaling_factor``, so that scaled training latents have std 1.

Images whose side is not a multiple of twice the down-sampling factor are padded (black, centred) to the next such
size, so latents have an even side (a DiT with patch 2 splits them): 28 px digits become 32 px, latents 4x8x8. The
padding is recorded beside config.json (codec.PADDING_FILE); the codec pads on encode and crops on decode.

Everything random in a step (the batch, the posterior sample) derives from (seed, step), so ``--resume`` continues
bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checks import MAX_LR, MAX_WEIGHT_DECAY, flag, require_finite, require_int
from .errors import UserError

log = logging.getLogger(__name__)

LOSS_CHOICES = ("l1", "mse")
QUALITY_FILE = "quality.json"  # the reconstruction checks of a run: every checkpoint's and the final one
GRID_FILE = "reconstructions.png"  # originals and their reconstructions, a row per class
CHECK_IMAGES = 1000  # training images a run without test images checks its reconstructions on
# The KL weight of latent diffusion's KL autoencoders (Rombach et al. 2022, configs autoencoder_kl_*: kl_weight 1e-6).
LDM_KL_WEIGHT = 1e-6
# How a run is watched, not what it computes: a resume may change these (and --steps, which only says where to stop).
RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "device", "progress", "steps", "judge_warn_drop"}
RESUME_KEYS = ("model", "opt", "rng", "step", "config")


@dataclass
class VAEConfig:
    # data (as every stage: data.open_dataset)
    data: str = "mnist5k"
    subset: str | None = None
    resolution: int | None = None
    skip_bad_images: bool = False
    channels: str = "auto"
    labels: str = "auto"
    test: str | None = None
    # architecture: AutoencoderKL with len(channels_list) resolution levels (down-sampling 2^(levels-1))
    channels_list: str = "32,64,64"
    latent_channels: int = 4
    layers_per_block: int = 1
    pad_to: int | None = None
    # optimisation
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "l1"
    kl_weight: float = LDM_KL_WEIGHT
    judge_epochs: int = 5
    judge_warn_drop: float = 5.0  # warn when the judge's top-1 on reconstructions falls this many points below
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 25
    device: str = "auto"
    progress: bool = True

    def block_channels(self) -> tuple[int, ...]:
        """--channels-list as a tuple of ints (UserError when it is not a comma list of positive multiples of 32)."""
        try:
            values = tuple(int(v) for v in self.channels_list.split(","))
        except ValueError:
            values = ()
        # diffusers' GroupNorm uses 32 groups: every width must be a multiple of 32.
        if not values or any(v < 32 or v % 32 for v in values):
            raise UserError(f"--channels-list must be comma-separated multiples of 32 (e.g. 32,64,64), got "
                            f"{self.channels_list!r}")
        return values

    def validate(self) -> None:
        """Refuse bad settings with a UserError naming the option."""
        self.block_channels()
        if self.loss not in LOSS_CHOICES:
            raise UserError(f"--loss must be one of {', '.join(LOSS_CHOICES)}, got {self.loss!r}")
        require_finite("--lr", self.lr, 0, MAX_LR, low_open=True)
        require_finite("--weight-decay", self.weight_decay, 0, MAX_WEIGHT_DECAY)
        require_finite("--kl-weight", self.kl_weight, 0, 1)
        require_finite("--judge-warn-drop", self.judge_warn_drop, 0, 100)
        for name in ("latent_channels", "layers_per_block", "steps", "batch_size", "judge_epochs",
                     "checkpoint_every", "log_every"):
            require_int(flag(name), getattr(self, name), low=1)
        require_int("--pad-to", self.pad_to, low=1, optional=True)

    def with_resolved_paths(self) -> "VAEConfig":
        """This config with --data, --subset and --test as absolute paths (names of built-in sets stay names)."""
        from .train import _resolved

        return dataclasses.replace(self, data=_resolved("data", self.data), subset=_resolved("subset", self.subset),
                                   test=_resolved("data", self.test))


def vae_defaults() -> VAEConfig:
    """Settings for 28 px grey digits (mnist5k): 4x8x8 latents of 32 px padded images, 3.8 MB of weights."""
    return VAEConfig()


def working_size(side: int, levels: int, pad_to: int | None) -> int:
    """The side the VAE works at for images of ``side`` px: ``pad_to`` when given (UserError below ``side`` or not
    a multiple of the down-sampling factor), else the next multiple of twice the down-sampling factor."""
    f = 2 ** (levels - 1)
    if pad_to is None:
        return -(-side // (2 * f)) * (2 * f)
    if pad_to < side or pad_to % f:
        raise UserError(f"--pad-to must be at least the image size {side} and a multiple of the down-sampling "
                        f"factor {f}, got {pad_to}")
    return pad_to


def build_vae(cfg: VAEConfig, channels: int, sample_size: int):
    """A randomly initialised AutoencoderKL (weights from the global RNG) for ``channels``-channel images."""
    from diffusers import AutoencoderKL

    widths = cfg.block_channels()
    return AutoencoderKL(in_channels=channels, out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=32, sample_size=sample_size)


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, cfg: VAEConfig) -> tuple[torch.Tensor, dict]:
    """(loss, parts) of a batch x (B, C, P, P) in [-1, 1] at the working size: reconstruction error of one posterior
    sample summed per image, plus kl_weight times the per-image KL sum, averaged over the batch."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)  # (B, latent_channels, P/f, P/f)
    recon = vae.decode(z).sample
    err = (recon - x).abs() if cfg.loss == "l1" else (recon - x).square()
    rec = err.flatten(1).sum(1).mean()
    kl = posterior.kl().mean()  # diffusers sums over the latent's elements
    return rec + cfg.kl_weight * kl, {"rec": rec.detach(), "kl": kl.detach()}


def _step_noise(seed: int, step: int) -> torch.Generator:
    from .train import step_generator

    return step_generator(seed, step, stream=2)


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, seed: int, batch_size: int = 256) -> float:
    """Standard deviation over every element of the posterior samples of images (N, C, P, P); the samples are drawn
    from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    total, total_sq, count = 0.0, 0.0, 0
    for xb in images.split(batch_size):
        z = vae.encode(xb.to(device)).latent_dist.sample(generator=g).double()
        total, total_sq, count = total + z.sum().item(), total_sq + z.square().sum().item(), count + z.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) between a and b (N, C, H, W) in [-1, 1], measured on [0, 1] images (peak 1);
    an exact copy counts as 100 dB."""
    mse = ((a - b) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _load_state(path: Path) -> dict:
    from .models.io import load_weights_only

    state = load_weights_only(path, "a resume state", map_location="cpu")
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path} is not a train-vae resume state (no {', '.join(missing)}); start again with "
                        "--overwrite or another --out")
    return state


def resume_state(out: Path, cfg: VAEConfig, resume: bool, overwrite: bool = False) -> dict | None:
    """The resume state of the run in ``out`` that ``resume`` continues (None: start afresh), with its settings
    checked against ``cfg``: those of its config.json, or when that is damaged or gone, those saved in the state;
    RESUMABLE_CHANGES may differ. Clears an earlier run for ``overwrite``. Raises UserError for a run in the way
    (no --resume or --overwrite), a resume without a state, and changed settings."""
    from .train import check_settings, prepare_output

    state_path, checked = prepare_output(out, cfg, resume, overwrite, rank=0, resumable=RESUMABLE_CHANGES)
    if state_path is None:
        return None
    state = _load_state(state_path)
    if not checked:
        check_settings(state["config"], cfg, RESUMABLE_CHANGES)
    return state


def train_vae(cfg: VAEConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Train, export ``out/export`` and measure; returns the results (also in ``out/manifest.json``).

    Raises UserError for bad settings, a changed resume, or a loss or weight that becomes non-finite (naming
    the step; nothing is exported)."""
    from .data import load_tensors, open_dataset
    from .devices import resolve_device
    from .manifest import write_json_atomic, write_manifest
    from .train import _DeferInterrupt, _trim_metrics, batch_indices, restore_rng, rng_state, save_atomic

    cfg = cfg.with_resolved_paths()
    cfg.validate()
    out = Path(out)
    device = resolve_device(cfg.device)
    ds = open_dataset(cfg.data, "train", cfg.subset, cfg.resolution, cfg.skip_bad_images, cfg.channels, cfg.labels)
    images, targets = load_tensors(ds)  # (N, C, S, S) in [-1, 1], (N,)
    n, side = len(targets), images.shape[-1]
    if n < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {n} training images")
    widths = cfg.block_channels()
    size = working_size(side, len(widths), cfg.pad_to)
    # The check images are read before the run folder is touched: a refused --test leaves nothing half-made, and
    # an earlier run that --overwrite would replace stays.
    checks = ReconstructionChecks(cfg, ds, images, targets, device, out)
    state = resume_state(out, cfg, resume, overwrite)

    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    vae = build_vae(cfg, images.shape[1], size).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        if state.get("data") not in (None, ds.identity):
            raise UserError(f"--resume: the data differ from those the run in {out} was trained on "
                            f"(--data {cfg.data}); resume on the same images, or start again with --overwrite")
        if cfg.steps < state["step"]:
            raise UserError(f"--resume: --steps {cfg.steps} is below step {state['step']}, which the run in {out} "
                            f"already reached")
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        restore_rng(state["rng"])
        start = state["step"]
    # The judge trains before the run is written down: stopped meanwhile, the folder holds no run without a state.
    checks.begin(start)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
    _trim_metrics(out / "metrics.jsonl", start)

    from .codec import pad_split

    a, b = pad_split(side, size)
    padded = torch.nn.functional.pad(images, (a, b, a, b), value=-1.0)  # codec.PAD_VALUE, black

    def save_state(step: int) -> None:
        save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "rng": rng_state(), "step": step,
                     "config": dataclasses.asdict(cfg), "data": ds.identity}, out / "checkpoints" / "last.pt")

    def diverged(step: int, what: str) -> UserError:
        return UserError(f"training diverged: {what} became non-finite (NaN or infinity) at step {step}; nothing "
                         f"was exported. Start again with a smaller --lr (now {cfg.lr:g}) (with --overwrite or "
                         "another --out)")

    bar = tqdm(total=cfg.steps, initial=start, desc="train-vae", disable=not cfg.progress, dynamic_ncols=True)
    mark, mark_step = time.perf_counter(), start
    completed = saved = start  # the steps the VAE holds, and those the resume state on disk holds
    clean = True  # the VAE and the optimiser hold exactly `completed` steps
    stop = _DeferInterrupt(active=True)  # a first Ctrl-C (or SIGTERM) lets the running step finish
    with open(out / "metrics.jsonl", "a") as metrics:
        try:
            with stop:
                for step in range(start, cfg.steps):
                    if stop.requested:
                        raise stop.interrupt()
                    idx = batch_indices(n, cfg.batch_size, cfg.seed, step)
                    loss, parts = vae_loss(vae, padded[idx].to(device), _step_noise(cfg.seed, step), cfg)
                    # One host read per step: a tiny VAE's step is long next to it, and a NaN is caught where it
                    # starts.
                    if not torch.isfinite(loss):
                        raise diverged(step + 1, "the loss")
                    clean = False  # from here on the step changes the weights (a second Ctrl-C may stop it midway)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    done = completed = step + 1
                    clean = True
                    if done % cfg.log_every == 0 or done == cfg.steps:
                        row = {"step": done, "loss": loss.item(), "rec": parts["rec"].item(),
                               "kl": parts["kl"].item(), "step_time": (time.perf_counter() - mark) / (done - mark_step)}
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        bar.set_postfix(rec=f"{row['rec']:.2f}", kl=f"{row['kl']:.0f}", refresh=False)
                        mark, mark_step = time.perf_counter(), done
                    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                        if not all(torch.isfinite(p).all() for p in vae.parameters()):
                            raise diverged(done, "the weights")
                        save_state(done)
                        saved = done
                        if done < cfg.steps:  # the last step's check is the final one, on the export
                            checks.at(done, vae, (a, b))
                    bar.update(1)
        except KeyboardInterrupt:
            # As a DiT run: the steps done since the last checkpoint are kept, unless a weight is not finite.
            if clean and completed > saved and all(torch.isfinite(p).all() for p in vae.parameters()):
                save_state(completed)
                saved = completed
            if saved:
                log.warning("interrupted: %s holds step %d; continue with --resume", out / "checkpoints" / "last.pt",
                            saved)
            raise
        finally:
            bar.close()

    vae.eval()
    std = latent_std(vae, padded, cfg.seed)
    export = out / "export"
    export_vae(vae.cpu(), export, scaling_factor=1.0 / std, image_size=side, pad_to=size)
    latent_side = size // 2 ** (len(widths) - 1)
    results = {"latent_std": std, "scaling_factor": 1.0 / std, "image_size": side, "pad_to": size,
               "latent_shape": [cfg.latent_channels, latent_side, latent_side],
               "parameters": sum(p.numel() for p in vae.parameters()),
               "export_bytes": sum(f.stat().st_size for f in export.iterdir()),
               **checks.final(export, cfg.steps)}
    write_manifest(out, "train-vae", dataclasses.asdict(cfg), export="export", data=ds.identity,
                   class_names=list(ds.class_names), steps=cfg.steps, results=results)
    return results


def export_vae(vae, folder: Path, scaling_factor: float, image_size: int, pad_to: int) -> None:
    """``vae.save_pretrained(folder)`` with ``scaling_factor`` in its config.json, plus the padding record the codec
    reads (codec.PADDING_FILE) when the VAE works on padded images."""
    from .codec import PADDING_FILE
    from .manifest import write_json_atomic

    vae.register_to_config(scaling_factor=float(scaling_factor))
    vae.save_pretrained(folder, safe_serialization=True)
    record = folder / PADDING_FILE
    if pad_to != image_size:
        write_json_atomic(record, {"image_size": image_size, "pad_to": pad_to})
    else:
        record.unlink(missing_ok=True)


def reconstruct(vae, x: torch.Tensor, pad: tuple[int, int], seed: int, batch_size: int = 256) -> torch.Tensor:
    """Images x (N, C, S, S) in [-1, 1] through ``vae`` as the vae codec takes them: padded (black) by ``pad``
    (before, after), one posterior sample per image from a generator seeded with ``seed``, decoded, clamped to
    [-1, 1] and cropped back to S px. The VAE's mode (train / eval) is kept."""
    from .codec import PAD_VALUE

    a, b = pad
    g = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for xb in x.split(batch_size):
            xb = torch.nn.functional.pad(xb.to(device), (a, b, a, b), value=PAD_VALUE)
            z = vae.encode(xb).latent_dist.sample(generator=g)
            y = vae.decode(z).sample.clamp(-1.0, 1.0)
            out.append(y[..., a:y.shape[-2] - b, a:y.shape[-1] - b].cpu())
    return torch.cat(out)


class ReconstructionChecks:
    """Whether a VAE keeps what tells the classes apart: the top-1 of a judge (ConvNet-3 trained on the real train
    split) on reconstructions beside its top-1 on the originals, and the PSNR, at every checkpoint and at the end,
    on the test images (``--test``, or the test split of an embedded ``--data``), else on a fixed sample of
    CHECK_IMAGES training images. Recorded in ``out/QUALITY_FILE``; the end also writes GRID_FILE and warns when
    the reconstructions' top-1 is more than ``--judge-warn-drop`` points below the originals'.

    Made in two parts: the constructor reads the check images (UserError for a --test whose classes differ from
    --data's), ``begin`` trains the judge; ``at`` and ``final`` need both."""

    def __init__(self, cfg: VAEConfig, train_ds, train_x: torch.Tensor, train_y: torch.Tensor, device, out: Path):
        from .data import EMBEDDED, load_tensors, open_dataset

        self.cfg, self.out, self.device, self.class_names = cfg, out, device, list(train_ds.class_names)
        self.train_ds, self.train_x, self.train_y = train_ds, train_x, train_y
        test = cfg.test or (cfg.data if cfg.data in EMBEDDED else None)
        if test is not None:
            test_ds = open_dataset(test, "test", cfg.subset, train_ds.resolution, cfg.skip_bad_images,
                                   train_ds.channels, cfg.labels)
            if list(test_ds.class_names) != self.class_names:
                raise UserError(f"--test {test}: its classes differ from those of --data {cfg.data}")
            self.x, self.y = load_tensors(test_ds)
            images = {"split": "test", "data": test_ds.identity}
        else:
            pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed))[:CHECK_IMAGES]
            pick = pick.sort().values
            self.x, self.y = train_x[pick], train_y[pick]
            images = {"split": "train", "data": train_ds.identity}
            log.warning("no --test images: reconstructions are checked on %d training images", len(pick))
        self.images = {**images, "count": len(self.y)}

    def begin(self, start: int) -> None:
        """Train the judge, and keep the checks of steps up to ``start`` (a resume's first step) that the run's
        earlier QUALITY_FILE records."""
        from .metrics import classifier_accuracy, train_feature_extractor

        cfg, device = self.cfg, self.device
        train_x, train_y, train_ds = self.train_x, self.train_y, self.train_ds
        # The judge's own weights are drawn inside fork_rng: the VAE's training draws are the same with checks.
        with torch.random.fork_rng(devices=[]):
            self.judge = train_feature_extractor(train_x, train_y, train_ds.num_classes, epochs=cfg.judge_epochs,
                                                 device=device, generator=torch.Generator().manual_seed(cfg.seed))
        self._accuracy = lambda x: classifier_accuracy(self.judge, x, self.y, device=device)
        kept = _earlier_checks(self.out / QUALITY_FILE, start) if start else []
        self.record = {"images": self.images, "judge": {"net": "convnet3", "epochs": cfg.judge_epochs},
                       "judge_top1_originals": self._accuracy(self.x), "checks": kept}

    def figures(self, recon: torch.Tensor) -> dict:
        """PSNR (dB) and the judge's top-1 (%) of reconstructions ``recon`` of the check images."""
        return {"psnr_db": psnr(recon, self.x), "judge_top1_reconstructions": self._accuracy(recon)}

    def at(self, step: int, vae, pad: tuple[int, int]) -> dict:
        """Check the VAE being trained at ``step`` (then back in train mode); logged and recorded."""
        vae.eval()
        check = {"step": step, **self.figures(reconstruct(vae, self.x, pad, self.cfg.seed))}
        vae.train()
        self.record["checks"].append(check)
        self._write()
        log.info("step %d: reconstructions PSNR %.2f dB, judge top-1 %.2f %% (originals %.2f %%)", step,
                 check["psnr_db"], check["judge_top1_reconstructions"], self.record["judge_top1_originals"])
        return check

    def final(self, export: Path, step: int) -> dict:
        """The export loaded as ``--codec vae`` loads it: figures, grid, warning; returns the results' entries."""
        from .codec import VAECodec
        from .fidelity import GRID_COLUMNS
        from .manifest import disk_full_is_user_error
        from .reports import class_grid

        codec = VAECodec(export, device=self.device)
        recon = codec.decode(codec.encode(self.x, generator=torch.Generator().manual_seed(self.cfg.seed)))
        final = {"step": step, **self.figures(recon)}
        drop = self.record["judge_top1_originals"] - final["judge_top1_reconstructions"]
        final["warning"] = None if drop <= self.cfg.judge_warn_drop else (
            f"the judge's top-1 on reconstructions, {final['judge_top1_reconstructions']:.2f} %, is {drop:.2f} points "
            f"below its {self.record['judge_top1_originals']:.2f} % on the originals (more than --judge-warn-drop "
            f"{self.cfg.judge_warn_drop:g}): the latents lose what tells the classes apart; see "
            f"{self.out / GRID_FILE}. Train longer (--steps) or give the VAE more --latent-channels")
        self.record["final"] = final
        self._write()
        half = max(1, GRID_COLUMNS // 2)  # originals and their reconstructions side by side
        rows = [[*self.x[self.y == c][:half], *recon[self.y == c][:half]] for c in range(len(self.class_names))]
        path = self.out / GRID_FILE
        with disk_full_is_user_error(path):
            class_grid(rows, self.class_names, [("originals", half), ("reconstructions", half)]).save(path)
        if final["warning"]:
            log.warning(final["warning"])
        return {"test" if self.record["images"]["split"] == "test" else "check_images": self.record["images"]["data"],
                "test_images" if self.record["images"]["split"] == "test" else "check_image_count": len(self.y),
                "psnr_db": final["psnr_db"], "judge": self.record["judge"],
                "judge_top1_originals": self.record["judge_top1_originals"],
                "judge_top1_reconstructions": final["judge_top1_reconstructions"], "warning": final["warning"]}

    def _write(self) -> None:
        from .manifest import write_json_atomic

        write_json_atomic(self.out / QUALITY_FILE, self.record)


CHECK_FIGURES = ("psnr_db", "judge_top1_reconstructions")  # what a check records beside its step


def _earlier_checks(path: Path, last: int) -> list[dict]:
    """The checks of steps 1 to ``last`` that the QUALITY_FILE ``path`` records, in step order: its checks and
    its final one (the end of a run that a resume extends is a check of that step), without the warning. An
    unreadable file gives none; an entry that is not a check (a step that is not an integer, a figure that is not
    a number) is left out on its own."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict):
        return []
    checks = earlier.get("checks") if isinstance(earlier.get("checks"), list) else []

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    kept = {c["step"]: {"step": c["step"], **{k: float(c[k]) for k in CHECK_FIGURES}}
            for c in [*checks, earlier.get("final")]
            if isinstance(c, dict) and type(c.get("step")) is int and 0 < c["step"] <= last
            and all(number(c.get(k)) for k in CHECK_FIGURES)}
    return [kept[step] for step in sorted(kept)]


VAE_HELP = {
    "test": "real test images for the reconstruction checks: an embedded dataset's name or a folder (default: the "
            "test split of an embedded --data; for a folder --data, a fixed sample of 1000 training images)",
    "channels_list": "comma-separated widths of the resolution levels, multiples of 32; n levels down-sample by "
                     "2^(n-1)",
    "latent_channels": "channels of the latents",
    "layers_per_block": "ResNet layers per resolution level",
    "pad_to": "side the VAE works at; images are padded (black, centred) to it and decodes cropped back "
              "(default: none = the next multiple of twice the down-sampling factor, 28 -> 32 px)",
    "steps": "optimisation steps",
    "batch_size": "batch size",
    "lr": "AdamW learning rate, above 0 and at most 1",
    "loss": "reconstruction loss: l1 (as latent diffusion) or mse, summed over each image's pixels",
    "kl_weight": "weight of the KL term, 0 to 1 (default: 1e-6, latent diffusion's)",
    "judge_epochs": "epochs of the ConvNet-3 judge trained on the real train split",
    "judge_warn_drop": "warn when the judge's top-1 on the final reconstructions is more than this many points "
                       "below its top-1 on the originals, 0 to 100",
    "seed": "seed of the initial weights, batch order and posterior samples, 0 to 2147483647",
    "checkpoint_every": "save a resume state, and check the reconstructions, every this many steps",
    "log_every": "write a line of metrics.jsonl every this many steps",
}
