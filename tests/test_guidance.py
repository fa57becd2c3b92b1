"""Sampling-side guidance levers (guidance.py): the classifier-free guidance window and schedule, mode guidance with
an early stop and its k-means cache, their checks, and the bench variant strings."""

import dataclasses
import json
import math

import pytest
import torch

from memdistill import guidance
from memdistill.cli import main
from memdistill.data import open_dataset
from memdistill.errors import UserError
from memdistill.guidance import cfg_scale_at, class_modes, guidance_fn, variant_overrides
from memdistill.imageset import read_image_set
from memdistill.sample import SampleConfig, load_sampler, sample_set

JOBS = [(0, 0), (1, 1), (3, 2), (7, 5)]


def cfg(model, **kw):
    base = dict(model=str(model), ipc=3, steps=5, cfg_scale=4.0, seed=0, device="cpu")
    base.update(kw)
    return SampleConfig(**base)


@pytest.fixture(scope="module")
def sampler(tiny_model):
    return load_sampler(cfg(tiny_model))


@pytest.fixture(scope="module")
def digit_modes(sampler):
    """Two modes per digit class of the digits train split (no cache)."""
    return class_modes(sampler.codec, open_dataset("digits", "train"), sampler.class_names, 2, seed=0)


# ----- guidance window and schedule ----------------------------------------------------------------------
def test_a_window_over_every_step_is_plain_guidance_bit_for_bit(tiny_model, sampler):
    plain = sampler.images(cfg(tiny_model), JOBS)
    for interval in ("0,1000", "0, 1000"):
        assert torch.equal(sampler.images(cfg(tiny_model, cfg_interval=interval), JOBS), plain)


def test_an_empty_window_is_no_guidance_bit_for_bit(tiny_model, sampler):
    unguided = sampler.images(cfg(tiny_model, cfg_scale=1.0), JOBS)
    for interval in ("500,500", "1000,1000", "0,0"):
        assert torch.equal(sampler.images(cfg(tiny_model, cfg_interval=interval), JOBS), unguided)
    # a schedule with w = 1 is no guidance either
    assert torch.equal(sampler.images(cfg(tiny_model, cfg_scale=1.0, cfg_schedule="cosine"), JOBS), unguided)


def test_a_partial_window_and_a_schedule_change_the_images(tiny_model, sampler):
    plain = sampler.images(cfg(tiny_model), JOBS)
    unguided = sampler.images(cfg(tiny_model, cfg_scale=1.0), JOBS)
    for kw in (dict(cfg_interval="200,800"), dict(cfg_schedule="linear"), dict(cfg_schedule="cosine")):
        x = sampler.images(cfg(tiny_model, **kw), JOBS)
        assert (x - plain).abs().max() > 1e-3 and (x - unguided).abs().max() > 1e-3, kw


def test_schedule_endpoints_and_window():
    for schedule in ("linear", "cosine"):
        assert cfg_scale_at(999, 4.0, schedule) == 1.0  # pure noise: no guidance
        assert cfg_scale_at(0, 4.0, schedule) == 4.0  # clean end: the full scale
        mid = cfg_scale_at(333, 4.0, schedule)
        assert 1.0 < mid < 4.0
    r = 1 - 333 / 999
    assert cfg_scale_at(333, 4.0, "linear") == pytest.approx(1 + 3 * r)
    assert cfg_scale_at(333, 4.0, "cosine") == pytest.approx(1 + 3 * (1 - math.cos(math.pi * r)) / 2)
    assert all(cfg_scale_at(t, 4.0, "constant") == 4.0 for t in (0, 500, 999))
    # the window [a, b): a is inside, b is not
    assert cfg_scale_at(200, 4.0, interval=(200, 800)) == 4.0
    assert cfg_scale_at(800, 4.0, interval=(200, 800)) == 1.0
    assert cfg_scale_at(199, 4.0, "linear", interval=(200, 800)) == 1.0


def test_each_image_gets_the_scale_of_its_own_timestep(sampler):
    """Images at different timesteps in one call equal each image called alone: the result never depends on the
    batch an image is in."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([900, 500, 100, 500])
    y = torch.tensor([1, 2, 3, 4])
    fn = guidance_fn(sampler.model, 4.0, schedule="linear", interval=(200, 800))
    together = fn(x, t, y)
    alone = torch.cat([fn(x[j:j + 1], t[j:j + 1], y[j:j + 1]) for j in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    # t = 900 lies outside the window: the conditional prediction alone
    torch.testing.assert_close(together[:1], sampler.model(x[:1], t[:1], y[:1]), rtol=0, atol=1e-5)


# ----- mode guidance -------------------------------------------------------------------------------------
def test_strength_0_and_stop_0_are_no_mode_guidance_bit_for_bit(tiny_model, sampler, digit_modes):
    plain = sampler.images(cfg(tiny_model), JOBS)
    for kw in (dict(mode_guidance=0.0, mode_stop=1.0), dict(mode_guidance=1.0, mode_stop=0.0)):
        assert torch.equal(sampler.images(cfg(tiny_model, **kw), JOBS, modes=digit_modes), plain)


def test_a_strong_pull_ends_near_the_assigned_modes(tiny_model, sampler, digit_modes):
    own = torch.stack([digit_modes[c, i % 2] for c, i in JOBS])  # (N, 1, 8, 8): job (c, i) follows mode i mod 2

    def distance(**kw):
        x = sampler.images(cfg(tiny_model, **kw), JOBS, modes=digit_modes)
        return (x - own.clamp(-1, 1)).flatten(1).norm(dim=1)  # (N,)

    free = distance()
    half = distance(mode_guidance=0.5, mode_stop=1.0)
    early = distance(mode_guidance=1.0, mode_stop=0.5)
    assert (half < free).all() and (early < free).all()
    # the whole trajectory at strength 1: the last step's x0 is the mode itself
    assert distance(mode_guidance=1.0, mode_stop=1.0).max() < 1e-4


def test_modes_are_deterministic_ordered_and_of_the_right_classes(sampler, digit_modes):
    ds = open_dataset("digits", "train")
    again = class_modes(sampler.codec, ds, sampler.class_names, 2, seed=0)
    assert torch.equal(again, digit_modes) and digit_modes.shape == (10, 2, 1, 8, 8)
    # reordered class names get their own rows
    names = list(reversed(sampler.class_names))
    torch.testing.assert_close(class_modes(sampler.codec, ds, names, 2, seed=0), digit_modes.flip(0))
    # each mode is nearest to images of its own class
    x, y = ds.images, ds.targets
    for c in (0, 5):
        d = torch.cdist(digit_modes[c, :1].flatten(1), x.flatten(1))[0]
        assert y[d.argmin()] == c


def test_the_mode_cache_is_reused_and_invalidated(sampler, tmp_path, monkeypatch):
    calls = []
    real = guidance._kmeans
    monkeypatch.setattr(guidance, "_kmeans", lambda *a: calls.append(a[1:]) or real(*a))
    ds = open_dataset("digits", "train")
    names = sampler.class_names
    first = class_modes(sampler.codec, ds, names, 2, seed=0, cache_dir=tmp_path)
    assert len(calls) == 10 and len(list(tmp_path.glob("modes-*.safetensors"))) == 1
    assert torch.equal(class_modes(sampler.codec, ds, names, 2, seed=0, cache_dir=tmp_path), first)
    assert len(calls) == 10  # reused
    class_modes(sampler.codec, ds, names, 3, seed=0, cache_dir=tmp_path)  # another k
    class_modes(sampler.codec, ds, names, 2, seed=1, cache_dir=tmp_path)  # another seed
    class_modes(sampler.codec, open_dataset("digits", "train", resolution=6), names, 2, seed=0, cache_dir=tmp_path)
    assert len(calls) == 40 and len(list(tmp_path.glob("modes-*.safetensors"))) == 4
    # a damaged cache file is recomputed, never trusted
    path = guidance.modes_cache_path(tmp_path, ds, sampler.codec.config(), names, 2, 0)
    path.write_bytes(b"damaged")
    assert torch.equal(class_modes(sampler.codec, ds, names, 2, seed=0, cache_dir=tmp_path), first)
    assert len(calls) == 50


def test_sample_set_with_guidance_records_it_and_ignores_batch_size(tiny_model, tmp_path):
    kw = dict(ipc=2, classes=[0, 3], cfg_interval="100,900", cfg_schedule="cosine", mode_guidance=0.3,
              mode_stop=0.6, mode_data="digits", mode_cache=str(tmp_path / "cache"))
    a = read_image_set(sample_set(cfg(tiny_model, batch_size=1, **kw), tmp_path / "a"))
    b = read_image_set(sample_set(cfg(tiny_model, batch_size=3, **kw), tmp_path / "b"))
    assert (a[0] - b[0]).abs().max() <= 1 / 255 + 1e-6
    m = a[3]["config"]
    assert (m["cfg_interval"], m["cfg_schedule"], m["mode_guidance"], m["mode_stop"]) == ("100,900", "cosine", 0.3, 0.6)
    assert m["mode_data"] == "digits" and m["modes"] == 2  # the default k: the IPC
    assert len(list((tmp_path / "cache").glob("modes-*"))) == 1


def test_mode_data_comes_from_the_run_or_must_be_given(tiny_model, sampler):
    with pytest.raises(UserError, match="give --mode-data"):
        sampler.mode_modes(cfg(tiny_model, mode_guidance=0.5))
    recorded = dataclasses.replace(sampler, source={**sampler.source, "data": "digits:train"})
    modes, data = recorded.mode_modes(cfg(tiny_model, mode_guidance=0.5, modes=3))
    assert data == "digits" and modes.shape == (10, 3, 1, 8, 8)
    with pytest.raises(UserError, match="--modes 1000 is more than"):
        sampler.mode_modes(cfg(tiny_model, mode_guidance=0.5, modes=1000, mode_data="digits"))
    with pytest.raises(UserError, match="--mode-data: the data has no class cat"):
        class_modes(sampler.codec, open_dataset("digits", "train"), ["0", "cat"], 1)


@pytest.mark.parametrize("field,value,message", [
    ("mode_guidance", -0.1, "--mode-guidance must be a finite number >= 0 and <= 1"),
    ("mode_guidance", 1.5, "--mode-guidance must be"),
    ("mode_guidance", float("nan"), "--mode-guidance must be"),
    ("mode_stop", 2.0, "--mode-stop must be a finite number >= 0 and <= 1"),
    ("mode_stop", float("inf"), "--mode-stop must be"),
    ("modes", 0, "--modes must be an integer >= 1"),
    ("cfg_interval", "800,200", "--cfg-interval end must be a finite number >= 800"),
    ("cfg_interval", "0,2000", "--cfg-interval end must be"),
    ("cfg_interval", "a,b", "--cfg-interval must be two timesteps"),
    ("cfg_interval", "100", "--cfg-interval must be two timesteps"),
    ("cfg_interval", "nan,5", "--cfg-interval start must be"),
    ("cfg_schedule", "exp", "--cfg-schedule must be one of constant, linear, cosine"),
])
def test_bad_guidance_settings_are_refused(tiny_model, tmp_path, field, value, message):
    with pytest.raises(UserError, match=message):
        sample_set(cfg(tiny_model, **{field: value}), tmp_path / "set")
    assert not (tmp_path / "set").exists()
    with pytest.raises(UserError, match=message.replace("--", "--sample-", 1)):
        cfg(tiny_model, **{field: value}).validate(prefix="sample-")


def test_the_cli_refuses_bad_guidance_with_one_line(tiny_model, tmp_path, capsys):
    code = main(["sample", "--model", str(tiny_model), "--mode-guidance", "2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mode-guidance must be" in err[0]
    code = main(["sample", "--model", str(tiny_model), "--mode-guidance", "0.5", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mode-data" in err[0]


def test_the_cli_samples_with_every_lever(tiny_model, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", str(tiny_model), "--ipc", "1", "--steps", "3", "--cfg-interval", "0,600",
                 "--cfg-schedule", "linear", "--mode-guidance", "0.2", "--mode-stop", "0.4", "--modes", "2",
                 "--mode-data", "digits", "--out", str(out)]) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["cfg_interval"], config["mode_guidance"], config["modes"]) == ("0,600", 0.2, 2)


# ----- bench variants ------------------------------------------------------------------------------------
def test_variant_strings_map_to_sample_config_fields():
    assert variant_overrides("modes:0.1:0.5") == {"mode_guidance": 0.1, "mode_stop": 0.5}
    assert variant_overrides("modes:0.2") == {"mode_guidance": 0.2}
    assert variant_overrides("modes:0.2:0.3:4") == {"mode_guidance": 0.2, "mode_stop": 0.3, "modes": 4}
    assert variant_overrides("cfgint:200,800") == {"cfg_interval": "200,800"}
    assert variant_overrides("cfgsched:cosine") == {"cfg_schedule": "cosine"}
    assert variant_overrides("cfg:2") == {"cfg_scale": 2.0}
    SampleConfig(**variant_overrides("modes:0.1:0.5:3")).validate()  # the overrides are fields of SampleConfig


@pytest.mark.parametrize("text,message", [
    ("modes", "unknown guidance variant"), ("modes:x", "unknown guidance variant"),
    ("modes:2", "--mode-guidance must be"), ("modes:0.1:0.5:0", "--modes must be"),
    ("cfgint:800,200", "--cfg-interval end"), ("cfgsched:exp", "--cfg-schedule"), ("cfg:-1", "--cfg-scale"),
    ("herding", "unknown guidance variant"),
])
def test_bad_variant_strings_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        variant_overrides(text)


def test_run_exposes_the_levers_with_the_sample_prefix():
    from memdistill.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    run_flags = {f for a in sub.choices["run"]._actions for f in a.option_strings}
    sample_help = sub.choices["sample"].format_help()
    for name in ("cfg-interval", "cfg-schedule", "mode-guidance", "mode-stop", "modes", "mode-data", "mode-cache"):
        assert f"--sample-{name}" in run_flags and f"--{name}" in sample_help
