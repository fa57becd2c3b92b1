"""Training draws its latents per step, as the reference training does: a flip and a posterior sample for each batch
element from that step's own generator, out of one cache of posterior statistics that serves every seed."""

import json
from pathlib import Path

import pytest
import torch

from memdistill.cli import main
from memdistill.data import default_flip
from memdistill.train import TrainConfig, batch_indices, load_train_data, step_draws, step_latents


def last_state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def real_entries(out: Path) -> list[torch.Tensor]:
    """Every entry of every class's real memory of the run in ``out``."""
    return [e for bank in last_state(out)["memories"]["real"].values() for e in bank["entries"]]


def vae_config(vae, cache, **kw) -> TrainConfig:
    return TrainConfig(data="digits", codec="vae", vae=str(vae), latent_cache=str(cache), device="cpu", **kw)


def test_different_seeds_and_steps_draw_differently_from_one_cache(latent_pair, tmp_path):
    vae, _ = latent_pair
    cache = tmp_path / "cache"
    a = load_train_data(vae_config(vae, cache, seed=0))
    b = load_train_data(vae_config(vae, cache, seed=1))
    assert len(list(cache.iterdir())) == 1  # one cache for both seeds: the statistics do not depend on the seed
    assert torch.equal(a.posterior.mean, b.posterior.mean) and torch.equal(a.posterior.logvar, b.posterior.logvar)
    idx = torch.arange(8)
    z0 = step_latents(a.posterior, 0, 3, idx)
    assert torch.equal(z0, step_latents(b.posterior, 0, 3, idx))  # (seed, step) alone decide the draw
    assert not torch.allclose(z0, step_latents(a.posterior, 1, 3, idx))  # another seed: other draws
    assert not torch.allclose(z0, step_latents(a.posterior, 0, 4, idx))  # another step: a fresh sample
    # every draw is a posterior sample: around the scaled mean, at the posterior's spread
    scaled_mean = a.posterior.mean[idx, 0] * a.posterior.scale
    assert not torch.allclose(z0, scaled_mean)
    spread = (a.posterior.logvar[idx, 0] * 0.5).exp() * a.posterior.scale
    assert ((z0 - scaled_mean).abs() <= 6 * spread).all()


@pytest.mark.parametrize("flip", ["on", "off", "auto"])
def test_flipped_draws_appear_only_when_flipping_is_on(tiny_model, tmp_path, flip):
    """Every real memory entry (pixel codec: a drawn image itself) is a training image or, with --flip on, its
    mirror image; mirrors appear with --flip on and never otherwise (auto is off for the digits)."""
    out = tmp_path / "run"
    assert main(["finetune", "--data", "digits", "--init", str(tiny_model), "--out", str(out), "--batch-size", "8",
                 "--steps", "6", "--memory", "fifo", "--mem-real", "64", "--device", "cpu", "--no-progress",
                 "--flip", flip]) == 0
    resolved = "on" if flip == "on" else "off"
    assert json.loads((out / "config.json").read_text())["flip"] == resolved
    assert json.loads((out / "manifest.json").read_text())["config"]["flip"] == resolved
    images = load_train_data(TrainConfig(data="digits", device="cpu")).posterior.mean[:, 0]  # (N, 1, 8, 8)
    entries = real_entries(out)
    assert len(entries) == 6 * 8

    def among(x, pool):
        return bool((pool == x).flatten(1).all(1).any())

    plain = [among(e, images) for e in entries]
    mirrored = [among(e, images.flip(-1)) for e in entries]
    assert all(p or m for p, m in zip(plain, mirrored))
    mirror_only = sum(m and not p for p, m in zip(plain, mirrored))
    if flip == "on":
        assert mirror_only > 0
    else:
        assert mirror_only == 0


def test_real_memory_entries_are_the_latents_drawn_at_each_step(latent_pair, tmp_path):
    """On the latent path with flipping, the real memories hold the very latents each step drew (a FIFO large
    enough to keep them all, in batch order)."""
    vae, init = latent_pair
    out, cache, steps = tmp_path / "run", tmp_path / "cache", 4
    assert main(["finetune", "--data", "digits", "--codec", "vae", "--vae", str(vae), "--init", str(init),
                 "--out", str(out), "--batch-size", "8", "--steps", str(steps), "--memory", "fifo", "--mem-real", "64",
                 "--flip", "on", "--seed", "3", "--latent-cache", str(cache), "--device", "cpu", "--no-progress"]) == 0
    cfg = vae_config(vae, cache, flip="on", seed=3, batch_size=8)
    data = load_train_data(cfg)
    assert data.flip == "on" and data.posterior.flips
    from memdistill.diffusion import GaussianDiffusion

    expect = {c: [] for c in range(10)}
    for step in range(steps):
        idx = step_draws(cfg, step, len(data.targets), data.latent_shape, GaussianDiffusion())[0]
        assert torch.equal(idx, batch_indices(len(data.targets), 8, 3, step))
        z = step_latents(data.posterior, 3, step, idx)
        for label, latent in zip(data.targets[idx].tolist(), z):
            expect[label].append(latent)
    saved = last_state(out)["memories"]["real"]
    for c, latents in expect.items():
        if latents:
            assert torch.equal(saved[c]["entries"], torch.stack(latents)), c


def test_flip_auto_by_data_kind(tmp_path):
    import numpy as np
    from PIL import Image

    assert not default_flip("digits", 1) and not default_flip("mnist5k", 3)  # digits: never mirrored
    assert default_flip(str(tmp_path), 3) and not default_flip(str(tmp_path), 1)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "rgb" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb" / c / f"{i}.png")
    data = load_train_data(TrainConfig(data=str(tmp_path / "rgb"), device="cpu"))
    assert data.flip == "on" and torch.equal(data.posterior.mean[:, 1], data.posterior.mean[:, 0].flip(-1))
    grey = load_train_data(TrainConfig(data=str(tmp_path / "rgb"), channels="1", device="cpu"))
    assert grey.flip == "off" and grey.posterior.mean.shape[1] == 1
    forced = load_train_data(TrainConfig(data=str(tmp_path / "rgb"), flip="off", device="cpu"))
    assert forced.flip == "off"


@pytest.mark.parametrize("command", ["finetune", "pretrain", "run", "bench"])
def test_a_bad_flip_value_is_one_line(command, tmp_path, capsys):
    assert main([command, "--flip", "sometimes", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--flip must be one of auto, on, off" in err, err
