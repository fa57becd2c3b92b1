"""No stage turns NaN or infinity into something that looks like a result: training stops naming the step,
sampling refuses non-finite weights and images, evaluation refuses a diverged classifier."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memdistill.cli import main
from memdistill.models.io import EXPORT_WEIGHTS


def finetune_args(init, out, steps, *extra):
    return ["finetune", "--data", "digits", "--init", str(init), "--out", str(out), "--batch-size", "8",
            "--steps", str(steps), "--memory", "adaptive", "--mem-real", "4", "--mem-gen", "3", "--log-every", "1",
            "--device", "cpu", "--no-progress", *map(str, extra)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: " in err, err
    return err


@pytest.mark.parametrize("command, option, value", [
    ("finetune", "--lr", "1e30"), ("finetune", "--lr", "1.5"), ("finetune", "--weight-decay", "1e30"),
    ("pretrain", "--lr", "2"), ("pretrain", "--weight-decay", "3"),
    ("evaluate", "--lr", "1e30"), ("evaluate", "--weight-decay", "1e30"), ("evaluate", "--lr", "1.01"),
])
def test_learning_rates_and_weight_decays_beyond_1_are_refused(tiny_model, tmp_path, capsys, command, option, value):
    """Finite but absurd values train to finite garbage (weights of 1e30, chance accuracy): refused up front."""
    out = tmp_path / "out"
    args = {"finetune": finetune_args(tiny_model, out, 2),
            "pretrain": ["pretrain", "--codec", "pixel", "--data", "digits", "--model", "DiT-Micro/2", "--steps", "1", "--device", "cpu",
                         "--out", str(out)],
            "evaluate": ["evaluate", "--train", str(tmp_path / "set"), "--test", "digits", "--device", "cpu",
                         "--out", str(out)]}[command]
    assert main([*args, option, value]) == 2
    err = one_error_line(capsys)
    assert f"{option} must be" in err and "<= 1" in err and value in err.replace("+", ""), err
    assert not out.exists()
    # the bound is in the help too
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    line = help_text[help_text.index(option + " FLOAT", help_text.index("options:")):][:120]
    assert "to 1" in line or "at most 1" in line, line


def test_the_weights_are_checked_after_the_last_step(tiny_model, tmp_path, capsys, monkeypatch):
    """The last step is neither a checkpoint nor a log step: its weights are still checked before the export."""
    out = tmp_path / "run"
    inject(monkeypatch, 3, "weights")
    args = finetune_args(tiny_model, out, 3, "--checkpoint-every", 2)
    args[args.index("--log-every") + 1] = "5"
    assert main(args) == 2
    assert "the weights became non-finite (NaN or infinity) at step 3" in one_error_line(capsys)
    assert not (out / "export").exists()


def inject(monkeypatch, at_step: int, where: str):
    """NaN in the loss (``where="loss"``) or in a weight after the optimiser step ("weights") at 1-based ``at_step``."""
    import memdistill.train as train

    calls = {"n": 0}
    if where == "loss":
        real = train.GaussianDiffusion.training_losses

        def training_losses(self, *args, **kwargs):
            terms = real(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == at_step:
                terms["loss"] = terms["loss"] * float("nan")
            return terms

        monkeypatch.setattr(train.GaussianDiffusion, "training_losses", training_losses)
    else:
        real = train.ema_update

        def ema_update(ema, model, decay):
            calls["n"] += 1
            if calls["n"] == at_step:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
            real(ema, model, decay)

        monkeypatch.setattr(train, "ema_update", ema_update)


@pytest.mark.parametrize("where, at_step, named", [("loss", 5, "the loss"), ("weights", 4, "the weights")])
def test_non_finite_training_keeps_the_last_finite_checkpoint(tiny_model, tmp_path, capsys, monkeypatch, where,
                                                               at_step, named):
    out = tmp_path / "run"
    inject(monkeypatch, at_step, where)
    assert main(finetune_args(tiny_model, out, 8, "--checkpoint-every", 2)) == 2
    err = one_error_line(capsys)
    last = 2 * ((at_step - 1) // 2)  # the checkpoint before the bad step
    assert f"{named} became non-finite" in err and f"at step {at_step}" in err and f"holds step {last}" in err
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == last
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (out / "export").exists() and not (out / "manifest.json").exists()


def test_the_loss_check_costs_no_host_sync_per_step(tiny_model, tmp_path, monkeypatch, capsys):
    """The loss is checked every step on the device and read only with the log: a NaN at step 3 with
    --log-every 4 is still reported as step 3."""
    out = tmp_path / "run"
    inject(monkeypatch, 3, "loss")
    args = finetune_args(tiny_model, out, 8, "--checkpoint-every", 8)
    args[args.index("--log-every") + 1] = "4"
    assert main(args) == 2
    assert "the loss became non-finite (NaN or infinity) at step 3" in one_error_line(capsys)


def nan_export(tiny_model, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / EXPORT_WEIGHTS)
    weights["final_layer.linear.bias"][0] = float("nan")
    save_file(weights, str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
    return folder


def test_sample_refuses_a_model_with_non_finite_weights(tiny_model, tmp_path, capsys):
    model = nan_export(tiny_model, tmp_path / "nan-export")
    out = tmp_path / "set"
    assert main(["sample", "--model", str(model), "--ipc", "1", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "non-finite" in err and "final_layer.linear.bias" in err
    assert not out.exists()
    # finetune --init reads models the same way
    assert main(finetune_args(model, tmp_path / "run", 2)) == 2
    assert "non-finite" in one_error_line(capsys)


def test_sample_writes_no_set_from_non_finite_images(tiny_model, tmp_path, capsys, monkeypatch):
    """Whatever makes the images non-finite (here a stand-in for an overflowing chain), no set is written."""
    import memdistill.sample as sample

    real = sample.GaussianDiffusion.sample

    def overflowing(self, *args, **kwargs):
        z = real(self, *args, **kwargs)
        z[-1, 0, 0, 0] = float("inf")
        return z

    monkeypatch.setattr(sample.GaussianDiffusion, "sample", overflowing)
    out = tmp_path / "set"
    assert main(["sample", "--model", str(tiny_model), "--ipc", "2", "--steps", "2", "--sampler", "ddim",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "non-finite" in one_error_line(capsys)
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def huge_export(tiny_model, folder: Path) -> Path:
    """A model that diverged in training to weights that are still finite (what --lr 1e30 used to export)."""
    shutil.copytree(tiny_model, folder)
    weights = {k: v * 1e30 if k != "pos_embed" else v for k, v in load_file(folder / EXPORT_WEIGHTS).items()}
    save_file(weights, str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("cfg_scale", ["4", "1"])
def test_non_finite_samples_of_a_diverged_model_blame_the_model(tiny_model, tmp_path, capsys, cfg_scale):
    model = huge_export(tiny_model, tmp_path / "huge")
    out = tmp_path / "set"
    assert main(["sample", "--model", str(model), "--ipc", "1", "--steps", "2", "--cfg-scale", cfg_scale,
                 "--device", "cpu", "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "non-finite" in err and "may have diverged" in err and str(model) in err, err
    assert "smaller --cfg-scale" not in err
    assert not out.exists()


def test_non_finite_samples_from_guidance_alone_blame_the_guidance(tiny_model, tmp_path, capsys, monkeypatch):
    import memdistill.guidance as guidance
    import memdistill.sample as sample

    real = sample.guided

    def overflowing_guidance(model, scale, channels=None):
        fn = real(model, scale, channels)
        return fn if scale == 1 else (lambda x, t, y: fn(x, t, y) * float("inf"))

    monkeypatch.setattr(sample, "guided", overflowing_guidance)
    monkeypatch.setattr(guidance, "guided", overflowing_guidance)  # what sample's guidance_fn wraps
    out = tmp_path / "set"
    assert main(["sample", "--model", str(tiny_model), "--ipc", "1", "--steps", "2", "--cfg-scale", "4",
                 "--device", "cpu", "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "--cfg-scale 4" in err and "smaller --cfg-scale" in err and "diverged" not in err, err
    assert not out.exists()


def test_evaluate_writes_no_result_from_a_diverged_classifier(tmp_path, capsys, monkeypatch):
    assert main(["select", "--data", "digits", "--ipc", "2", "--out", str(tmp_path / "sel")]) == 0
    capsys.readouterr()

    class PoisonedSGD(torch.optim.SGD):  # a stand-in for a run that diverges within the allowed bounds
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    monkeypatch.setattr(torch.optim, "SGD", PoisonedSGD)
    out = tmp_path / "eval"
    assert main(["evaluate", "--train", str(tmp_path / "sel"), "--test", "digits", "--epochs", "2", "--repeats", "1",
                 "--device", "cpu", "--out", str(out)]) == 2
    assert "diverged" in one_error_line(capsys)
    assert not (out / "results.json").exists()
