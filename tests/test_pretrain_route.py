"""`memdistill pretrain`'s default route: a VAE of --data trained first into OUT/vae, then a DiT-Tiny/2 on its
latents (the paper's latent pipeline); --codec pixel keeps the pixel route. The VAE is shrunk here (2 levels, 20
steps, a 1-epoch judge) by patching train-vae's defaults, which the route takes exactly as `train-vae` does."""

from __future__ import annotations

import json

import pytest

from memdistill.cli import main
from memdistill.errors import UserError
from memdistill.trainvae import VAEConfig

from conftest import digits_folder

FAST = ["--data", "digits", "--steps", "3", "--batch-size", "16", "--no-fidelity", "--no-progress"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def small_vae(monkeypatch):
    monkeypatch.setattr("memdistill.trainvae.vae_defaults",
                        lambda: VAEConfig(channels_list="32,32", steps=20, judge_epochs=1, checkpoint_every=10))


def config(folder):
    return json.loads((folder / "config.json").read_text())


def test_the_defaults_train_a_vae_then_a_latent_dit_that_sample_loads(tmp_path):
    out = tmp_path / "pt"
    assert main(["pretrain", *FAST, "--out", str(out)]) == 0
    vae = out / "vae" / "export"
    assert (vae / WEIGHTS).is_file() and config(out / "vae")["steps"] == 20
    cfg = config(out)
    assert (cfg["codec"], cfg["vae"], cfg["model"]) == ("vae", str(vae), "DiT-Tiny/2")
    assert config(out / "export")["codec"]["path"] == str(vae)
    # The export names its VAE: sample needs no --vae and decodes 8 px digits.
    assert main(["sample", "--model", str(out), "--ipc", "1", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 0
    from PIL import Image

    pngs = sorted((tmp_path / "s").glob("*/*.png"))  # one folder per class
    assert len(pngs) == 10 and Image.open(pngs[0]).size == (8, 8)


def test_its_vae_is_the_one_train_vae_makes(tmp_path):
    assert main(["pretrain", *FAST, "--seed", "3", "--out", str(tmp_path / "pt")]) == 0
    assert main(["train-vae", "--data", "digits", "--seed", "3", "--no-progress", "--out", str(tmp_path / "v")]) == 0
    assert (tmp_path / "pt/vae/export" / WEIGHTS).read_bytes() == (tmp_path / "v/export" / WEIGHTS).read_bytes()
    assert config(tmp_path / "pt/vae/export")["scaling_factor"] == config(tmp_path / "v/export")["scaling_factor"]


def test_resume_reuses_the_finished_vae_and_continues_the_dit(tmp_path):
    out = tmp_path / "pt"
    assert main(["pretrain", *FAST, "--checkpoint-every", "1", "--out", str(out)]) == 0
    weights = out / "vae" / "export" / WEIGHTS
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    assert main(["pretrain", *FAST[:2], *FAST[4:], "--steps", "5", "--checkpoint-every", "1", "--resume",
                 "--out", str(out)]) == 0
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads((out / "manifest.json").read_text())["steps"] == 5 and last["step"] >= 3


def test_codec_pixel_trains_no_vae(tmp_path):
    out = tmp_path / "pt"
    assert main(["pretrain", *FAST, "--codec", "pixel", "--out", str(out)]) == 0
    cfg = config(out)
    assert (cfg["codec"], cfg["vae"], cfg["model"]) == ("pixel", None, "DiT-Tiny/4") and not (out / "vae").exists()


def test_a_given_vae_is_used_and_none_is_trained(tmp_path):
    assert main(["train-vae", "--data", "digits", "--no-progress", "--out", str(tmp_path / "v")]) == 0
    out = tmp_path / "pt"
    assert main(["pretrain", *FAST, "--vae", str(tmp_path / "v/export"), "--out", str(out)]) == 0
    assert config(out)["vae"] == str(tmp_path / "v/export") and not (out / "vae").exists()


def test_a_bad_option_is_refused_before_the_vae_is_trained(tmp_path, capsys):
    for option, value in (("--model", "DiT-Huge/3"), ("--ema-decay", "1"), ("--fidelity-warn", "101")):
        out = tmp_path / option
        assert main(["pretrain", *FAST, option, value, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert option in err or value in err, err
        assert not (out / "vae").exists()


def test_the_vae_of_an_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "pt"
    assert main(["train-vae", "--data", "digits", "--no-progress", "--out", str(out / "vae")]) == 0
    assert main(["pretrain", *FAST, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    stale = out / "vae" / "stale"
    stale.write_text("x")
    assert main(["pretrain", *FAST, "--overwrite", "--out", str(out)]) == 0
    assert not stale.exists() and config(out)["codec"] == "vae"


def test_torchrun_is_told_to_train_the_vae_first(tmp_path, monkeypatch):
    from memdistill.pretrain import pretrain, pretrain_defaults

    monkeypatch.setenv("WORLD_SIZE", "2")
    import dataclasses

    cfg = dataclasses.replace(pretrain_defaults(), data="digits", steps=1)
    with pytest.raises(UserError, match="train-vae"):
        pretrain(cfg, tmp_path / "pt")
    assert not (tmp_path / "pt" / "vae").exists()


def test_resume_with_another_route_is_refused_before_a_vae_is_trained(tmp_path, capsys):
    out = tmp_path / "pt"
    assert main(["pretrain", *FAST, "--codec", "pixel", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["pretrain", *FAST, "--steps", "5", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume with changed settings (codec" in err and "--codec pixel" in err
    assert not (out / "vae").exists()


def test_what_the_vae_stage_refuses_says_it_is_the_vae_and_how_to_change_it(tmp_path, capsys):
    data = digits_folder(tmp_path / "few", classes=[0, 1], per_class=5)  # 10 images: below the VAE's batch of 32
    assert main(["pretrain", *FAST, "--batch-size", "4", "--data", str(data), "--out", str(tmp_path / "pt")]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 32 exceeds the 10 training images" in err and len(err.strip().splitlines()) == 1
    assert "memdistill train-vae" in err and "--vae" in err


def test_a_vae_quality_warning_says_how_to_train_a_better_vae(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("memdistill.trainvae.vae_defaults",
                        lambda: VAEConfig(channels_list="32,32", steps=1, judge_epochs=1, judge_warn_drop=0))
    assert main(["pretrain", *FAST, "--out", str(tmp_path / "pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("WARNING: the judge's top-1 on reconstructions")]
    assert warned and "memdistill train-vae" in lines[warned[0] + 1] and "--vae" in lines[warned[0] + 1]


def test_resume_does_not_reuse_a_vae_trained_with_other_settings(tmp_path, capsys):
    out = tmp_path / "pt"
    # the VAE finished, the DiT not started: the run was stopped in between
    assert main(["train-vae", "--data", "digits", "--no-progress", "--out", str(out / "vae")]) == 0
    capsys.readouterr()
    assert main(["pretrain", *FAST, "--seed", "3", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume with changed settings (seed: 0 -> 3)" in err and "the VAE that pretrain trains first" in err
    assert not (out / "export").exists()
    assert main(["pretrain", *FAST, "--resume", "--out", str(out)]) == 0  # with its own settings it is reused


def test_the_help_says_a_vae_is_trained_first_and_what_it_needs(capsys):
    from memdistill.trainvae import vae_defaults

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    vae = vae_defaults()
    assert f"{vae.steps} steps, batches of {vae.batch_size}" in text and "--codec pixel" in text
    assert "--steps, --batch-size and --lr are the DiT's" in text
