"""Sampling a latent model with a VAE that does not fit it, or that changed since the model was trained: one line,
exit code 2, before any sampling."""

import json
import os

import pytest
import torch

from memdistill.cli import main


def _vae(folder, levels=2, out_channels=1):
    """A tiny 1-channel AutoencoderKL: 2 levels turn 8 px digits into 4x4x4 latents, 3 levels into 4x2x2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    AutoencoderKL(in_channels=1, out_channels=out_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels,
                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8).save_pretrained(folder)
    return folder


SAMPLE = ["sample", "--ipc", "1", "--steps", "2", "--classes", "0", "--device", "cpu"]


@pytest.mark.parametrize("levels, out_channels, shown", [
    # 8 px images -> 2x2 latents (the model's 4x4 latents would decode to 16 px images)
    (3, 1, ("latents of shape (4, 2, 2)", "expects (4, 4, 4)")),
    (2, 3, ("decodes 3-channel images", "(1, 8, 8)")),
])
@pytest.mark.parametrize("guidance", [[], ["--mode-guidance", "0.5", "--mode-data", "digits"]])
def test_a_vae_of_other_latents_is_refused_before_sampling(latent_pair, tmp_path, capsys, levels, out_channels,
                                                           shown, guidance):
    _, dit = latent_pair
    other = _vae(tmp_path / "other", levels, out_channels)
    code = main([*SAMPLE, "--model", str(dit), "--vae", str(other), *guidance, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"--vae {other}" in err and all(s in err for s in shown), err
    assert not (tmp_path / "s").exists()


def test_a_vae_changed_in_place_since_training_is_refused_unless_given(latent_pair, tmp_path, capsys):
    """An export records its VAE's identity (config, padding record, weights); sampling with the recorded VAE after
    it was retrained in place is refused with one line saying how to proceed; an explicit --vae accepts it."""
    import shutil

    from memdistill.codec import IDENTITY_KEYS, PADDING_FILE

    vae, init = latent_pair
    vae = shutil.copytree(vae, tmp_path / "vae")  # changed below: the fixture's stays as it is
    run = tmp_path / "run"
    assert main(["finetune", "--data", "digits", "--init", str(init), "--vae", str(vae), "--out", str(run),
                 "--batch-size", "4", "--steps", "1", "--memory", "none", "--device", "cpu", "--no-progress"]) == 0
    recorded = json.loads((run / "export" / "config.json").read_text())["codec"]
    assert recorded["path"] == str(vae.resolve()) and all(key in recorded for key in IDENTITY_KEYS)
    assert main([*SAMPLE, "--model", str(run), "--out", str(tmp_path / "a")]) == 0

    weights = next(vae.glob("*.safetensors"))
    trained = weights.read_bytes()
    _retrain_in_place(vae)
    capsys.readouterr()
    assert main([*SAMPLE, "--model", str(run), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "changed since the model" in err and f"--vae {vae.resolve()}" in err
    assert not (tmp_path / "b").exists()
    assert main([*SAMPLE, "--model", str(run), "--vae", str(vae), "--out", str(tmp_path / "b")]) == 0

    weights.write_bytes(trained)  # back as trained (another modification time, the same bytes)
    (vae / PADDING_FILE).write_text(json.dumps({"image_size": 8, "pad_to": 8}))  # a padding record added
    assert main([*SAMPLE, "--model", str(run), "--out", str(tmp_path / "c")]) == 2
    assert "padding" in capsys.readouterr().err


def _retrain_in_place(vae):
    """Other weights of the same size in the same file, as retraining in place leaves them."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(vae)


def test_a_copied_vae_folder_passes_and_a_retrained_copy_does_not(latent_pair, tmp_path, capsys):
    """A model and its VAE copied to another place (other modification times, the same bytes): the export's
    recorded sha256 of the weights recognises the VAE; failed before (the weights' modification times differ)."""
    import shutil

    vae, init = latent_pair
    vae = shutil.copytree(vae, tmp_path / "vae")
    run = tmp_path / "run"
    assert main(["finetune", "--data", "digits", "--init", str(init), "--vae", str(vae), "--out", str(run),
                 "--batch-size", "4", "--steps", "1", "--memory", "none", "--device", "cpu", "--no-progress"]) == 0
    weights = next(vae.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # copied: new times
    assert main([*SAMPLE, "--model", str(run), "--out", str(tmp_path / "a")]) == 0
    _retrain_in_place(vae)
    capsys.readouterr()
    assert main([*SAMPLE, "--model", str(run), "--out", str(tmp_path / "b")]) == 2
    assert "changed since the model" in capsys.readouterr().err


def test_an_export_without_a_recorded_vae_identity_still_samples(latent_pair, tmp_path):
    _, dit = latent_pair  # records its VAE as {"name", "path"} only, as exports did before identities
    assert main([*SAMPLE, "--model", str(dit), "--out", str(tmp_path / "s")]) == 0


def test_finetune_resume_refuses_a_vae_retrained_since_and_accepts_a_copy(latent_pair, tmp_path, capsys):
    """Before, --resume went on with whatever the VAE folder held: steps before and after on different latents,
    and the export then recorded the new VAE, so sample's check passed too."""
    import shutil

    vae, init = latent_pair
    vae = shutil.copytree(vae, tmp_path / "vae")
    run = tmp_path / "run"
    args = ["finetune", "--data", "digits", "--init", str(init), "--vae", str(vae), "--out", str(run),
            "--batch-size", "4", "--memory", "none", "--device", "cpu", "--no-progress", "--checkpoint-every", "1"]
    assert main([*args, "--steps", "1"]) == 0
    weights = next(vae.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # copied: new times
    assert main([*args, "--steps", "2", "--resume"]) == 0
    _retrain_in_place(vae)
    capsys.readouterr()
    assert main([*args, "--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the VAE" in err and "changed since the run" in err, err
    assert json.loads((run / "export" / "config.json").read_text())["steps"] == 2  # the export was not re-stamped
