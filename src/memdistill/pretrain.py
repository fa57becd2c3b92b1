"""`memdistill pretrain`: a class-conditional DiT trained from scratch (how the shipped mnist5k model is made)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .devices import dist_setup
from .fidelity import FidelityConfig, FidelityWatch
from .train import TrainConfig, load_train_data, run_training


def pretrain_defaults() -> TrainConfig:
    """Settings that train the shipped mnist5k model on 2 CPU cores."""
    return TrainConfig(data="mnist5k", model="DiT-Tiny/4", train="all", batch_size=64, lr=1e-3, steps=8000, grad_clip=1.0,
                       ema_decay=0.999, checkpoint_every=500, log_every=25, stage="pretrain")


def pretrain(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
             fidelity: FidelityConfig | None = None) -> Path:
    """Train a DiT from scratch per ``cfg`` into the run folder ``out``; returns its export folder.

    ``fidelity`` (default: FidelityConfig(), checks on): the class fidelity of the EMA model's samples under a
    judge trained on the real train split, at the end (and every ``fidelity_every`` steps), written to
    ``<out>/fidelity.json`` and ``<out>/samples.png``; a final figure below ``fidelity_warn`` is logged as a
    warning and recorded there. Raises UserError for bad settings."""
    from .models.dit import build_dit, set_trainable

    cfg = dataclasses.replace(cfg, stage="pretrain", train="all", init=None, memory="none").with_resolved_codec()
    cfg = cfg.with_resolved_paths()
    cfg.validate()
    fidelity = FidelityConfig() if fidelity is None else fidelity
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
