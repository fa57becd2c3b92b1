"""`memdistill pretrain`: a class-conditional DiT trained from scratch (how the shipped models are made).

By default on a VAE's latents, as the paper's pipeline: without ``--vae`` the command first trains a VAE of
``--data`` (``memdistill train-vae``'s defaults) into ``OUT/vae`` and then the DiT on its latents."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import torch

from .devices import dist_setup
from .errors import UserError
from .fidelity import FidelityConfig, FidelityWatch
from .train import CODEC_CHOICES, TrainConfig, load_train_data, prepare_output, run_training

log = logging.getLogger(__name__)

# --vae auto: train one on --data into OUT/VAE_FOLDER first (unless --codec pixel).
AUTO = "auto"
VAE_FOLDER = "vae"
# --model auto: the DiT that trained usable models here (docs/pretrained.md, "A new small dataset"): patch 2 on the
# 4x8x8 latents of a 28 px image (16 tokens), patch 4 on its pixels (49 tokens).
AUTO_MODEL = {"vae": "DiT-Tiny/2", "pixel": "DiT-Tiny/4"}

PRETRAIN_HELP = {
    "codec": "auto (vae: the DiT learns the latents of --vae), vae, or pixel (the DiT works on pixels, no VAE)",
    "vae": "auto (train one on --data first, with train-vae's defaults, into OUT/vae; ignored with --codec pixel), "
           "a shipped autoencoder's name (mnist5k-vae) or a local AutoencoderKL folder (a train-vae export)",
    "model": f"DiT size, e.g. DiT-Tiny/2 or DiT-XL/2; auto: {AUTO_MODEL['vae']} on latents, {AUTO_MODEL['pixel']} on "
             "pixels",
}


def pretrain_description() -> str:
    """`memdistill pretrain --help`'s description: the two stages of the default route, with the VAE's settings
    (train-vae's defaults, so a --data needs at least its batch of images)."""
    from .trainvae import vae_defaults

    vae = vae_defaults()
    return (f"Train a class-conditional DiT from scratch. By default a VAE of --data is trained first into OUT/vae "
            f"(train-vae's defaults: {vae.steps} steps, batches of {vae.batch_size} images), then a "
            f"{AUTO_MODEL['vae']} on its latents; --steps, --batch-size and --lr are the DiT's. --vae DIR uses a "
            "given VAE (e.g. from memdistill train-vae, to choose its settings); --codec pixel trains "
            f"a {AUTO_MODEL['pixel']} on the pixels, without a VAE. Prints the VAE's reconstruction checks and the "
            "class fidelity of the DiT's samples.")


def pretrain_defaults() -> TrainConfig:
    """Settings that train a usable model of a small dataset on 2 CPU cores (the shipped mnist5k-latent pair)."""
    return TrainConfig(data="mnist5k", model=AUTO, vae=AUTO, train="all", batch_size=64, lr=1e-3, steps=8000,
                       grad_clip=1.0, ema_decay=0.999, checkpoint_every=500, log_every=25, stage="pretrain")


def resolve_route(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with --codec, --vae auto and --model auto made concrete, except that --vae auto stays ``AUTO`` when
    a VAE is to be trained first (the caller replaces it by that VAE's export). Raises UserError for a --codec
    that is not a choice."""
    if cfg.codec not in CODEC_CHOICES:
        cfg.validate()  # names the choices
    if cfg.vae == AUTO and cfg.codec == "pixel":
        cfg = dataclasses.replace(cfg, vae=None)
    codec = "pixel" if cfg.codec == "pixel" or (cfg.codec == "auto" and cfg.vae is None) else "vae"
    if cfg.model == AUTO:
        cfg = dataclasses.replace(cfg, model=AUTO_MODEL[codec])
    return dataclasses.replace(cfg, codec=codec)


def train_own_vae(cfg: TrainConfig, out: Path, resume: bool) -> Path:
    """Train (or, on ``resume``, continue or reuse) the VAE of ``cfg``'s data in ``out/vae`` with train-vae's
    defaults and ``cfg``'s data options, seed, device and progress; returns its export folder. Raises UserError
    under torchrun (train it first with ``memdistill train-vae`` and pass --vae) and for what train_vae refuses."""
    from .trainvae import resume_state, train_vae, vae_defaults

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("pretrain --vae auto trains its VAE in one process; under torchrun, train it first "
                        "(memdistill train-vae --out DIR) and pass --vae DIR/export, or pass --codec pixel")
    folder = out / VAE_FOLDER
    # exactly `memdistill train-vae` with the same data options and seed (tested)
    vae_cfg = dataclasses.replace(vae_defaults(), data=cfg.data, subset=cfg.subset, resolution=cfg.resolution,
                                  skip_bad_images=cfg.skip_bad_images, channels=cfg.channels, labels=cfg.labels,
                                  seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    export = folder / "export"
    try:
        if resume and (folder / "manifest.json").is_file() and (export / "config.json").is_file():
            resume_state(folder, vae_cfg.with_resolved_paths(), resume=True)  # made with these settings?
            log.info("pretrain: reusing the finished VAE in %s", folder)
            return export
        log.info("pretrain: training a VAE of the data first (%s); --vae DIR or --codec pixel skip this", folder)
        results = train_vae(vae_cfg, folder, resume=resume)
    except UserError as err:
        # An option it names (--batch-size, --lr, ...) is train-vae's, not this command's: say how to set it.
        raise UserError(f"{err} [the VAE that pretrain trains first in {folder}, with train-vae's settings: to "
                        f"choose them, run memdistill train-vae --data {cfg.data} --out DIR and pass --vae "
                        "DIR/export; or --codec pixel]") from None
    log.info("pretrain: VAE trained: latents %s, scaling factor %.5f%s", "x".join(map(str, results["latent_shape"])),
             results["scaling_factor"],
             f", test PSNR {results['psnr_db']:.2f} dB" if "psnr_db" in results else "")
    return export


def check_resume_route(out: Path, cfg: TrainConfig) -> None:
    """Refuse (UserError) a --resume of the DiT run in ``out`` with settings ``cfg`` (its VAE's export in place of
    --vae auto) other than the saved ones, before a VAE is trained for it: run_training checks the same later,
    after the VAE. Nothing to check when ``out`` holds no readable config.json yet."""
    from .manifest import read_json_object
    from .train import check_settings

    if not (out / "config.json").is_file():
        return
    try:
        saved = read_json_object(out / "config.json")
    except UserError:
        return  # damaged: run_training decides from the copy of the settings in the resume state
    # --flip auto resolves on the loaded data (compared then): here it stands for the saved value.
    check_settings(saved, dataclasses.replace(cfg, flip=saved.get("flip", cfg.flip) if cfg.flip == AUTO else cfg.flip))


def pretrain(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
             fidelity: FidelityConfig | None = None) -> Path:
    """Train a DiT from scratch per ``cfg`` into the run folder ``out``; returns its export folder.

    ``cfg.vae == "auto"`` (the command's default) trains a VAE of the data first into ``out/vae`` (train_own_vae)
    and the DiT on its latents; ``cfg.model == "auto"`` picks AUTO_MODEL for the codec. ``fidelity`` (default:
    FidelityConfig(), checks on): the class fidelity of the EMA model's samples under a judge trained on the real
    train split, at the end (and every ``fidelity_every`` steps), written to ``<out>/fidelity.json`` and
    ``<out>/samples.png``; a final figure below ``fidelity_warn`` is logged as a warning and recorded there.
    Raises UserError for bad settings."""
    from .models.dit import build_dit, check_model_name, set_trainable

    out = Path(out)
    cfg = resolve_route(dataclasses.replace(cfg, stage="pretrain", train="all", init=None, memory="none"))
    fidelity = FidelityConfig() if fidelity is None else fidelity
    if cfg.vae == AUTO:
        # Every check that does not need the VAE runs before it is trained: a bad option costs nothing.
        dataclasses.replace(cfg, vae=None).with_resolved_paths().validate()
        fidelity.validate()
        check_model_name(cfg.model)
        if resume:
            check_resume_route(out, dataclasses.replace(cfg, vae=str(out / VAE_FOLDER / "export")))
        else:  # refuse an earlier run, or clear it for --overwrite, before the VAE is written into it
            prepare_output(out, cfg, resume=False, overwrite=overwrite, rank=0)
            if overwrite:
                shutil.rmtree(out / VAE_FOLDER, ignore_errors=True)  # the VAE of an interrupted earlier run
        cfg = dataclasses.replace(cfg, vae=str(train_own_vae(cfg.with_resolved_paths(), out, resume)))
        overwrite = False  # done above: a second clearing would remove the VAE just trained
    cfg = cfg.with_resolved_codec().with_resolved_paths()
    cfg.validate()
    fidelity.validate()
    # The device comes first: under torchrun each rank must be on its own GPU before it loads or encodes data.
    rank, world, device = dist_setup(cfg.device)
    data = load_train_data(cfg, device, rank, world)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    c, h, w = data.latent_shape
    model = build_dit(cfg.model, input_size=h, in_channels=c, num_classes=max(data.cond_labels) + 1,
                      class_dropout_prob=cfg.class_dropout)
    set_trainable(model, "all")
    watch = FidelityWatch(fidelity, data, cfg, out) if fidelity.fidelity else None
    return run_training(cfg, out, model, data, resume=resume, overwrite=overwrite, watch=watch)
