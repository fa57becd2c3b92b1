"""`memdistill finetune`: stage 1 of the method (METHOD.md sections 3-5).

A pretrained DiT is tuned on the real images with the diffusion loss plus the memory losses; the memories
are updated self-adaptively ("adaptive"), first-in first-out as Minimax does ("fifo"), or not at all ("none").
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from .codec import check_latents_fit
from .errors import UserError
from .devices import dist_setup
from .train import TrainConfig, TrainData, load_train_data, run_training

log = logging.getLogger(__name__)


def paper_defaults() -> TrainConfig:
    """The paper's recipe (DiT-XL/2 on a 10-class ImageNet subset): DiffFit, AdamW 1e-3, batch 8,
    EMA 0.9999, 12,000 steps, N_R = N_G = 64, lambda_r = 0.002, lambda_g = 0.008."""
    return TrainConfig(train="difffit", memory="adaptive", batch_size=8, lr=1e-3, steps=12000, ema_decay=0.9999,
                       checkpoint_every=1000, codec="vae", stage="finetune")


def finetune_defaults() -> TrainConfig:
    """The embedded default, the paper's latent pipeline at small scale: the shipped mnist5k-latent DiT, on the
    latents of the shipped mnist5k-vae (the VAE its export records: --codec auto), tuned on mnist5k
    (docs/pretrained.md). Same recipe as the paper except the
    length and the EMA decay, scaled so that the EMA actually moves within the few hundred CPU steps. The pixel-space
    model stays available: --init mnist5k --codec pixel."""
    return dataclasses.replace(paper_defaults(), data="mnist5k", init="mnist5k-latent", codec="auto", steps=500,
                               ema_decay=0.99, checkpoint_every=100)


def load_init_model(cfg: TrainConfig, data: TrainData) -> torch.nn.Module:
    """The starting DiT, checked against the data it will be tuned on."""
    from .data import label_mapping
    from .models.io import load_dit
    from .pretrained import resolve_model

    if cfg.init is None:
        raise UserError("finetune needs --init: a pretrained model (e.g. mnist5k, a run folder or an official .pt)")
    model = load_dit(resolve_model(cfg.init))
    latent_shape = data.latent_shape
    model_shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    check_latents_fit(cfg.codec, latent_shape, model_shape, cfg.init, "choose a matching codec/--resolution or model")
    # Now that the model's class count is known: a 1000-class ImageNet model refuses non-wnid names under
    # --labels auto rather than tuning towards whatever ImageNet classes 0..K-1 happen to be.
    label_mapping(data.class_names, cfg.labels, model.config.num_classes)
    needed = max(data.cond_labels) + 1
    if needed > model.config.num_classes:
        raise UserError(f"the model {cfg.init} has {model.config.num_classes} classes but the data's labels need "
                        f"{needed} (class {data.class_names[data.cond_labels.index(needed - 1)]!r} has label {needed - 1})")
    if cfg.class_dropout > 0 and not model.has_null_class:
        raise UserError(f"the model {cfg.init} has no null class, so --class-dropout must be 0")
    return model


def finetune(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    from .models.dit import set_trainable

    cfg = dataclasses.replace(cfg, stage="finetune").with_resolved_codec().with_resolved_paths()
    cfg.validate()
    # The device comes first: under torchrun each rank must be on its own GPU before it loads or encodes data.
    rank, world, device = dist_setup(cfg.device)
    data = load_train_data(cfg, device, rank, world)
    model = load_init_model(cfg, data)
    count = set_trainable(model, cfg.train)
    log.info("fine-tuning %s parameters (%s) with memory=%s", f"{count:,}", cfg.train, cfg.memory)
    return run_training(cfg, out, model, data, resume=resume, overwrite=overwrite,
                        export_extra={"init": cfg.init, "memory": cfg.memory})
