"""Class fidelity (memdistill.fidelity): the figure itself, the `fidelity` command, and pretrain's checks."""

import json
from types import SimpleNamespace

import pytest
import torch

from memdistill.cli import main
from memdistill.fidelity import FIDELITY_FILE, FidelityConfig, FidelityWatch, class_fidelity, judge_images

from conftest import digits_folder


class StubJudge:
    """Predicts the class written into each image's first pixel (its judge index), whatever else it shows."""

    def __init__(self, class_names):
        self.spec = SimpleNamespace(class_names=tuple(class_names))

    def logits(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), len(self.spec.class_names)).float()


def _constructed_set(predicted_per_class):
    """Images (N, 1, 4, 4) whose first pixel holds the class the stub judge will say, labels (N,)."""
    images, labels = [], []
    for c, predicted in enumerate(predicted_per_class):
        for p in predicted:
            x = torch.zeros(1, 4, 4)
            x[0, 0, 0] = p
            images.append(x)
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def test_stub_judge_fidelity_known_percentage():
    # class a: 4 of 4 right; b: 1 of 4; c: 2 of 2 -> 7 of 10 = 70%
    images, labels = _constructed_set([[0, 0, 0, 0], [1, 0, 2, 2], [2, 2]])
    result = judge_images(StubJudge(["a", "b", "c"]), images, labels, ["a", "b", "c"])
    assert result["fidelity"] == 70.0
    assert result["per_class"] == {"a": 100.0, "b": 25.0, "c": 100.0}
    assert result["images"] == 10


def test_judge_classes_map_by_name():
    """A judge whose class order differs from the model's (or that knows more classes) judges by class name."""
    judge = StubJudge(["z", "c", "b", "a"])  # judge index of a = 3, b = 2, c = 1
    images, labels = _constructed_set([[3, 3], [2, 0], [1, 3]])  # a: 2/2; b: 1/2 (z is no class of ours); c: 1/2
    result = judge_images(judge, images, labels, ["a", "b", "c"])
    assert result["per_class"] == {"a": 100.0, "b": 50.0, "c": 50.0}
    assert result["fidelity"] == pytest.approx(100 * 4 / 6, abs=0.01)


def test_class_without_images_is_none():
    result = class_fidelity(torch.tensor([0, 0]), torch.tensor([0, 0]), ["a", "b"])
    assert result == {"fidelity": 100.0, "per_class": {"a": 100.0, "b": None}, "images": 2}


def test_watch_resume_keeps_the_checks_up_to_its_step(tmp_path):
    def check(step):
        return {"step": step, "fidelity": float(step), "per_class": {}, "images": 1}

    (tmp_path / FIDELITY_FILE).write_text(json.dumps({"checks": [check(2), check(4)],
                                                      "final": {**check(6), "warning": "low"}}))
    watch = FidelityWatch(FidelityConfig(), None, None, tmp_path)
    watch.start(4)
    assert [c["step"] for c in watch.record["checks"]] == [2, 4]
    watch.start(6)  # extended past its end: the old final check stays, as a check of step 6
    assert [c["step"] for c in watch.record["checks"]] == [2, 4, 6]
    assert "warning" not in watch.record["checks"][-1]
    watch.start(0)  # a fresh run forgets an old record
    assert watch.record["checks"] == []


def test_the_warning_reads_the_fidelity_against_the_judges_own_top1(tmp_path):
    """On data the judge itself reads only in part (glyphs10-hard: 74.1% of the real test images), samples as
    recognisable as real images are not a failure: --fidelity-warn is a share of that ceiling."""
    watch = FidelityWatch(FidelityConfig(fidelity_warn=80), None, SimpleNamespace(codec="vae"), tmp_path)
    watch._ceiling = (74.1, "test")
    result = {"fidelity": 75.2, "per_class": {"A": 42.0, "B": 96.0}}
    assert watch.warning(result) is None  # at the ceiling
    low = watch.warning({**result, "fidelity": 59.0})  # below 80% of 74.1 = 59.28
    assert low and "below 80% of the judge's 74.1% top-1 on real test images (59.3%" in low
    watch._ceiling = (100.0, "training")
    assert "80.0%" in watch.warning(result)  # a judge that reads every image: the bar is 80% itself


# ----- the fidelity command --------------------------------------------------------------------------------
def test_fidelity_command_output_and_results(tiny_model, tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["fidelity", "--model", str(tiny_model), "--data", "digits", "--per-class", "2", "--steps", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["images"] == 20 and result["per_class_images"] == 2
    assert set(result["per_class"]) == {str(i) for i in range(10)}
    assert 0 <= result["fidelity"] <= 100
    assert result["fidelity"] == pytest.approx(sum(result["per_class"].values()) / 10, abs=0.01)
    assert 0 < result["judge_test_top1"] <= 100 and result["judge"]["data"] == "digits:train"
    assert f"class fidelity: {result['fidelity']:.1f}% of 20 images" in printed
    assert f"{result['judge_test_top1']:.1f}% top-1 on the real test split" in printed
    assert (out / "samples.png").is_file()


def test_fidelity_of_an_image_set(small_set, tmp_path, capsys):
    """A set of real digits selected from digits: its manifest names the data, so no --data is needed."""
    grid = tmp_path / "g.png"
    assert main(["fidelity", "--set", str(small_set), "--grid", str(grid), "--out", str(tmp_path / "f")]) == 0
    result = json.loads((tmp_path / "f" / "results.json").read_text())
    assert result["images"] == 20 and result["judge_data"]["data"] == "digits"
    assert grid.is_file() and result["grid"] == str(grid)
    assert "class fidelity:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    ([], ["--model", "--set"]),
    (["--model", "mnist5k", "--set", "x"], ["--model", "--set"]),
    (["--model", "mnist5k", "--per-class", "0"], ["--per-class", ">= 1"]),
    (["--model", "mnist5k", "--cfg-scale", "-1"], ["--cfg-scale"]),
])
def test_fidelity_bad_input_one_line(argv, words, tmp_path, capsys):
    assert main(["fidelity", *argv, "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(w in err for w in words)


def test_fidelity_needs_data_when_the_model_records_none(tiny_model, tmp_path, capsys):
    assert main(["fidelity", "--model", str(tiny_model), "--per-class", "1", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give --data" in err


# ----- pretrain's checks -------------------------------------------------------------------------------------
PRETRAIN = ["pretrain", "--codec", "pixel", "--data", "digits", "--model", "DiT-Micro/2", "--steps", "4", "--batch-size", "16",
            "--checkpoint-every", "2", "--no-progress", "--fidelity-per-class", "1", "--fidelity-final-per-class", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step pretraining with checks every step and without any check."""
    root = tmp_path_factory.mktemp("pretrain")
    assert main([*PRETRAIN, "--fidelity-every", "1", "--out", str(root / "checked")]) == 0
    assert main([*PRETRAIN, "--no-fidelity", "--out", str(root / "plain")]) == 0
    return root


def test_checks_leave_the_weights_bit_identical(runs):
    for name in ("model.safetensors",):
        assert (runs / "checked" / "export" / name).read_bytes() == (runs / "plain" / "export" / name).read_bytes()
    a = torch.load(runs / "checked" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(runs / "plain" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the global generator too: a resume draws alike


def test_checks_are_recorded(runs):
    record = json.loads((runs / "checked" / FIDELITY_FILE).read_text())
    assert [c["step"] for c in record["checks"]] == [1, 2, 3]
    assert all(c["images"] == 10 for c in record["checks"])
    assert record["final"]["step"] == 4 and record["final"]["images"] == 20
    assert (runs / "checked" / "samples.png").is_file()
    manifest = json.loads((runs / "checked" / "manifest.json").read_text())
    assert manifest["fidelity"]["fidelity"] == record["final"]["fidelity"]
    assert not (runs / "plain" / FIDELITY_FILE).exists() and not (runs / "plain" / "samples.png").exists()


def test_untrained_model_warns(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    final = json.loads((out / FIDELITY_FILE).read_text())["final"]
    assert final["fidelity"] < 80 and "below 80% of the judge's" in final["warning"]
    assert "the latent route" in final["warning"]  # a pixel run is pointed to the route that trains sooner
    assert printed[-1] == f"WARNING: {final['warning']}"  # the last line printed
    assert any(r.levelname == "WARNING" and final["warning"] in r.getMessage() for r in caplog.records)


def test_a_folder_without_test_images_is_read_against_the_judges_training_top1(tmp_path):
    digits_folder(tmp_path / "data", count=100)
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--data", str(tmp_path / "data"), "--steps", "1", "--out", str(out)]) == 0
    final = json.loads((out / FIDELITY_FILE).read_text())["final"]
    assert final["judge_test_top1"] is None and 0 < final["judge_train_top1"] <= 100
    assert final["warning"] is None or "top-1 on real training images" in final["warning"]
    expected = final["fidelity"] < 0.8 * final["judge_train_top1"]
    assert (final["warning"] is not None) == expected


def test_no_warning_above_the_threshold(tmp_path, capsys):
    assert main([*PRETRAIN, "--steps", "1", "--fidelity-warn", "0", "--out", str(tmp_path / "run")]) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / FIDELITY_FILE).read_text())["final"]["warning"] is None


def test_resume_extends_the_record(runs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--steps", "2", "--fidelity-every", "1", "--out", str(out)]) == 0
    assert main([*PRETRAIN, "--fidelity-every", "1", "--resume", "--out", str(out)]) == 0
    record = json.loads((out / FIDELITY_FILE).read_text())
    assert [c["step"] for c in record["checks"]] == [1, 2, 3] and record["final"]["step"] == 4
    assert (out / "export" / "model.safetensors").read_bytes() == \
        (runs / "plain" / "export" / "model.safetensors").read_bytes()


def test_pretrain_fidelity_model_records_its_data(runs, tmp_path, capsys):
    """`fidelity --model <run>` judges with the run's recorded --data."""
    assert main(["fidelity", "--model", str(runs / "plain"), "--per-class", "1", "--steps", "2",
                 "--out", str(tmp_path / "f")]) == 0
    assert json.loads((tmp_path / "f" / "results.json").read_text())["judge_data"]["data"] == "digits"


@pytest.mark.parametrize("argv, option", [
    (["--fidelity-warn", "120"], "--fidelity-warn"),
    (["--fidelity-every", "0"], "--fidelity-every"),
    (["--fidelity-per-class", "0"], "--fidelity-per-class"),
    (["--fidelity-final-per-class", "-1"], "--fidelity-final-per-class"),
])
def test_pretrain_bad_fidelity_options_one_line(argv, option, tmp_path, capsys):
    assert main([*PRETRAIN, *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
