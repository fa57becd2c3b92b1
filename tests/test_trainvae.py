"""`memdistill train-vae`: the export loads as --codec vae with its recorded scaling factor, padding round-trips
through the codec, resume is bit-identical, and bad input is one line with exit code 2."""

import json

import pytest
import torch
from safetensors.torch import load_file

from memdistill.cli import main
from memdistill.codec import PADDING_FILE, VAECodec
from memdistill.data import load_tensors, open_dataset
from memdistill.errors import UserError

from conftest import digits_folder

# Tiny: two levels of 32 channels (down-sampling 2), 8 px digits padded to 12 px -> latents 4x6x6.
TINY = ["train-vae", "--data", "digits", "--channels-list", "32,32", "--pad-to", "12", "--batch-size", "16",
        "--judge-epochs", "1", "--log-every", "2", "--checkpoint-every", "3", "--no-progress"]


def _train(out, *extra):
    return main([*TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    assert _train(out, "--steps", "6") == 0
    return out


def test_export_loads_as_the_vae_codec_with_the_recorded_scaling_factor(trained, capsys):
    export = trained / "export"
    results = json.loads((trained / "manifest.json").read_text())["results"]
    config = json.loads((export / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["scaling_factor"] == pytest.approx(results["scaling_factor"]) == pytest.approx(1 / results["latent_std"])
    codec = VAECodec(export)
    assert codec.scaling_factor == pytest.approx(results["scaling_factor"])
    assert codec.latent_shape((1, 8, 8)) == (4, 6, 6) == tuple(results["latent_shape"])
    x, _ = load_tensors(open_dataset("digits", "train"))
    z = codec.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (len(x), 4, 6, 6)
    # Scaled train latents have unit spread: the factor was measured on these latents (another draw of them).
    assert z.std().item() == pytest.approx(1.0, abs=0.03)
    assert codec.decode(z[:5]).shape == (5, 1, 8, 8)  # decoded at 12 px, cropped back to the images' 8
    for key in ("psnr_db", "judge_top1_originals", "judge_top1_reconstructions"):
        assert isinstance(results[key], float)
    # The sampling stage takes the export as any AutoencoderKL folder: `--codec vae --vae <export>`.
    assert main(["pretrain", "--data", "digits", "--codec", "vae", "--vae", str(export), "--model", "DiT-Micro/2",
                 "--steps", "1", "--batch-size", "4", "--no-progress", "--out", str(trained.parent / "dit")]) == 0
    dit = json.loads((trained.parent / "dit" / "export" / "config.json").read_text())
    assert dit["latent_shape"] == [4, 6, 6] and dit["image_shape"] == [1, 8, 8]


def test_the_run_prints_its_figures(tmp_path, capsys):
    assert _train(tmp_path / "r", "--steps", "2") == 0
    printed = capsys.readouterr().out
    assert "scaling factor" in printed and "PSNR" in printed and "judge top-1" in printed


def test_resume_is_bit_identical_to_a_straight_run(trained, tmp_path):
    out = tmp_path / "resumed"
    assert _train(out, "--steps", "3") == 0
    assert _train(out, "--steps", "6", "--resume") == 0
    straight = load_file(trained / "export" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(out / "export" / "diffusion_pytorch_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3, 4, 6]


def test_reconstructions_are_checked_at_checkpoints_and_at_the_end(trained, tmp_path, capsys):
    from memdistill.trainvae import GRID_FILE, QUALITY_FILE

    record = json.loads((trained / QUALITY_FILE).read_text())
    assert record["images"]["split"] == "test" and record["images"]["count"] == 364  # digits' test split
    assert [c["step"] for c in record["checks"]] == [3] and record["final"]["step"] == 6
    results = json.loads((trained / "manifest.json").read_text())["results"]
    assert results["judge_top1_reconstructions"] == record["final"]["judge_top1_reconstructions"]
    assert 0 <= record["judge_top1_originals"] <= 100 and (trained / GRID_FILE).is_file()
    # printed: a line per check, the final one last; a resume keeps the checks of the steps it keeps
    out = tmp_path / "r"
    assert _train(out, "--steps", "3", "--checkpoint-every", "1") == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "reconstructions of 364 test images" in line]
    assert [line.split(":")[0] for line in printed] == ["step 1", "step 2", "step 3"]
    assert _train(out, "--steps", "4", "--checkpoint-every", "1", "--resume") == 0
    assert [c["step"] for c in json.loads((out / QUALITY_FILE).read_text())["checks"]] == [1, 2, 3]


def test_a_folder_without_test_images_is_checked_on_training_images(tmp_path, capsys):
    from memdistill.trainvae import QUALITY_FILE

    digits_folder(tmp_path / "data", count=60)
    out = tmp_path / "r"
    assert main([*TINY, "--data", str(tmp_path / "data"), "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / QUALITY_FILE).read_text())
    assert record["images"]["split"] == "train" and record["images"]["count"] == 60
    assert "60 training images (no --test)" in capsys.readouterr().out


def test_a_vae_that_loses_the_classes_warns_last(tmp_path, capsys):
    from memdistill.trainvae import QUALITY_FILE

    # one step: the reconstructions are far from the originals, and any drop exceeds a threshold of 0
    assert _train(tmp_path / "r", "--steps", "1", "--judge-warn-drop", "0") == 0
    final = json.loads((tmp_path / "r" / QUALITY_FILE).read_text())["final"]
    assert final["warning"] and "below" in final["warning"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"WARNING: {final['warning']}"
    assert _train(tmp_path / "q", "--steps", "1", "--judge-warn-drop", "100") == 0  # no drop exceeds 100 points
    assert json.loads((tmp_path / "q" / QUALITY_FILE).read_text())["final"]["warning"] is None
    assert "WARNING" not in capsys.readouterr().out


def test_resume_with_changed_settings_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "changed"
    assert _train(out, "--steps", "3") == 0
    capsys.readouterr()
    assert _train(out, "--steps", "6", "--resume", "--lr", "0.01") == 2
    assert "--resume with changed settings (lr" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--kl-weight", "-1"], "--kl-weight must be"),
    (["--judge-warn-drop", "101"], "--judge-warn-drop must be"),
    (["--channels-list", "32,40"], "--channels-list must be comma-separated multiples of 32"),
    (["--channels-list", "a"], "--channels-list must be"),
    (["--loss", "l2"], "--loss must be one of l1, mse"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--latent-channels", "0"], "--latent-channels must be an integer >= 1"),
    (["--pad-to", "7"], "--pad-to must be at least the image size 8"),
    (["--pad-to", "13"], "multiple of the down-sampling factor 2"),
    (["--batch-size", "5000"], "--batch-size 5000 exceeds"),
    (["--data", "nosuchset"], "dataset folder not found"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    assert _train(tmp_path / "bad", "--steps", "1", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad" / "export").exists()


def test_an_existing_run_needs_overwrite_or_resume(trained, capsys):
    assert _train(trained, "--steps", "6") == 2
    assert "--resume" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_and_exports_nothing(tmp_path, capsys, monkeypatch):
    from memdistill import trainvae

    real = trainvae.vae_loss

    def poisoned(vae, x, generator, cfg):
        loss, parts = real(vae, x, generator, cfg)
        return loss * float("nan"), parts

    monkeypatch.setattr(trainvae, "vae_loss", poisoned)
    assert _train(tmp_path / "nan", "--steps", "3") == 2
    assert "diverged: the loss became non-finite (NaN or infinity) at step 1" in capsys.readouterr().err
    assert not (tmp_path / "nan" / "export").exists()


# ----- the codec's padding ------------------------------------------------------------------------------------
def _padded_vae(folder, image_size=6, pad_to=8):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=pad_to).save_pretrained(folder)
    (folder / PADDING_FILE).write_text(json.dumps({"image_size": image_size, "pad_to": pad_to}))
    return folder


def test_the_codec_pads_images_of_the_recorded_size_and_crops_decodes_back(tmp_path):
    codec = VAECodec(_padded_vae(tmp_path / "vae", image_size=5, pad_to=8))
    x = torch.rand(3, 1, 5, 5) * 2 - 1
    padded = codec.pad(x)
    assert padded.shape == (3, 1, 8, 8)
    assert torch.equal(codec.crop(padded), x)  # odd padding too: 1 pixel before, 2 after
    assert torch.equal(padded[..., 1:6, 1:6], x) and (padded[..., 0, :] == -1).all()
    assert codec.latent_shape((1, 5, 5)) == (4, 4, 4)
    z = codec.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 4, 4, 4)
    assert codec.decode(z).shape == (3, 1, 5, 5)
    # the latent cache's posterior statistics see the same padded images as encoding on the fly
    mean, logvar = codec.posterior(x)
    assert mean.shape == logvar.shape == (3, 4, 4, 4)
    g = torch.Generator().manual_seed(0)
    drawn = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g) - codec.shift_factor) * codec.scaling_factor
    assert torch.allclose(drawn, z, atol=1e-5)
    # Other sizes go through as they are (a fully convolutional VAE), as for a VAE without a padding record.
    assert codec.latent_shape((1, 16, 16)) == (4, 8, 8)
    assert codec.decode(codec.encode(torch.zeros(1, 1, 16, 16))).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("record", ['{"image_size": 9, "pad_to": 8}', '{"image_size": 6}', "not json",
                                    '{"image_size": true, "pad_to": 8}'])
def test_a_damaged_padding_record_is_a_user_error(tmp_path, record):
    folder = _padded_vae(tmp_path / "vae")
    (folder / PADDING_FILE).write_text(record)
    with pytest.raises(UserError, match="invalid padding record"):
        VAECodec(folder)


def test_the_padding_record_is_part_of_the_vae_identity(tmp_path):
    """Editing memdistill_padding.json in place changes how images are encoded, so it must change the identity
    that keys the latent and mode caches (and that exports record)."""
    from memdistill.codec import cache_key
    from memdistill.data import TensorImageDataset

    folder = _padded_vae(tmp_path / "vae", image_size=6, pad_to=8)
    ds = TensorImageDataset(torch.zeros(2, 1, 6, 6), torch.tensor([0, 1]), ["a", "b"], identity="toy:train")
    before, key = VAECodec(folder).identity(), cache_key(VAECodec(folder), ds)
    (folder / PADDING_FILE).write_text(json.dumps({"image_size": 6, "pad_to": 12}))
    assert VAECodec(folder).identity() != before
    assert cache_key(VAECodec(folder), ds) != key


# ----- runs that stop early, inputs that are refused, records that are damaged ------------------------------
def test_a_refused_test_set_leaves_no_run_behind_and_keeps_an_earlier_one(trained, tmp_path, capsys):
    other = digits_folder(tmp_path / "other", classes=[0, 1], per_class=4)  # 2 classes, digits has 10
    out = tmp_path / "r"
    assert _train(out, "--steps", "1", "--test", str(other)) == 2
    assert "classes differ" in capsys.readouterr().err
    assert _train(out, "--steps", "1") == 0  # nothing half-made in the way: no --overwrite or --resume needed
    before = (out / "export" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert _train(out, "--steps", "1", "--test", str(other), "--overwrite") == 2
    assert (out / "export" / "diffusion_pytorch_model.safetensors").read_bytes() == before  # not cleared first


def test_an_interrupted_run_resumes_from_its_last_step(trained, tmp_path, monkeypatch, caplog):
    from memdistill import metrics, trainvae

    real_loss, real_judge = trainvae.vae_loss, metrics.train_feature_extractor

    def judge_interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Stopped while the judge trains, before any step: --resume starts the run, it is not refused.
    monkeypatch.setattr(metrics, "train_feature_extractor", judge_interrupted)
    out = tmp_path / "r"
    assert _train(out, "--steps", "6") == 130
    monkeypatch.setattr(metrics, "train_feature_extractor", real_judge)
    calls = []

    def loss_interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # in step 3, before the first checkpoint (every 3)
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(trainvae, "vae_loss", loss_interrupted)
    assert _train(out, "--steps", "6", "--resume") == 130
    assert "holds step 2; continue with --resume" in caplog.text
    monkeypatch.setattr(trainvae, "vae_loss", real_loss)
    assert _train(out, "--steps", "6", "--resume") == 0
    straight = load_file(trained / "export" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(out / "export" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_damaged_quality_record_is_not_carried_into_a_resume(tmp_path, capsys):
    from memdistill.trainvae import QUALITY_FILE

    out = tmp_path / "r"
    assert _train(out, "--steps", "2") == 0
    good = json.loads((out / QUALITY_FILE).read_text())["final"]
    # entries that are not checks are dropped, each on its own: the good ones stay
    (out / QUALITY_FILE).write_text(json.dumps({"checks": [{"step": 1}, {"step": True, "psnr_db": 1.0},
                                                           {"step": "1"}], "final": good}))
    assert _train(out, "--steps", "3", "--resume") == 0
    assert [c["step"] for c in json.loads((out / QUALITY_FILE).read_text())["checks"]] == [2]
    record = json.loads((out / QUALITY_FILE).read_text())
    (out / QUALITY_FILE).write_text(json.dumps({**record, "checks": [5, *record["checks"], None]}))
    assert _train(out, "--steps", "4", "--resume") == 0
    assert [c["step"] for c in json.loads((out / QUALITY_FILE).read_text())["checks"]] == [2, 3]
    assert "step 3: reconstructions" in capsys.readouterr().out


def test_a_resume_may_change_how_the_run_is_watched_not_what_it_computes(tmp_path, capsys):
    out = tmp_path / "r"
    assert _train(out, "--steps", "2") == 0
    assert _train(out, "--steps", "3", "--resume", "--judge-warn-drop", "50") == 0  # RESUMABLE_CHANGES
    (out / "config.json").write_text("{damaged")  # then the settings saved in the resume state decide
    capsys.readouterr()
    assert _train(out, "--steps", "4", "--resume", "--lr", "0.01") == 2
    assert "--resume with changed settings (lr" in capsys.readouterr().err
