"""The command line end to end on a tiny setting (digits, a micro DiT), and its bad-input contract:
one line on stderr and exit code 2."""

import json

import pytest
import torch
from PIL import Image

from memdistill.cli import main

from conftest import DIGITS


def run_cli(*args):
    return main([str(a) for a in args])


def fails_with(capsys, *args, match: str):
    code = run_cli(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and match in err[0], err
    assert "Traceback" not in err[0]


TINY_RUN = ["--data", "digits", "--steps", "6", "--batch-size", "8", "--ipc", "2", "--sample-steps", "4",
            "--eval-net", "convnet1", "--eval-epochs", "2", "--eval-repeats", "2", "--no-progress"]


def test_run_end_to_end_writes_a_report(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--baselines", "random,herding", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "adaptive" in printed
    for name in ("report.md", "results.json", "grid.png", "accuracy.png", "manifest.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in results["results"]]
    assert methods == ["adaptive", "random", "herding"]
    for r in results["results"]:
        assert r["ipc"] == 2 and len(r["per_repeat"]) == 2 and 0 <= r["best_mean"] <= 100
    report = (out / "report.md").read_text()
    assert "| adaptive | 2 | convnet1 |" in report and "![accuracy per method](accuracy.png)" in report
    for c in DIGITS:
        assert len(list((out / "sets" / "adaptive" / c).glob("*.png"))) == 2

    # Run again with --resume: every stage is complete, nothing is redone, same results. How the run is
    # scheduled (here the sampling batch size) may change; what it computes may not (below).
    before = (out / "eval" / "adaptive.json").stat().st_mtime_ns
    assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--baselines", "random,herding", "--out", out,
                   "--resume", "--sample-batch-size", "3") == 0
    assert (out / "eval" / "adaptive.json").stat().st_mtime_ns == before
    # Reused stages must match the settings: a changed IPC is refused, naming it.
    fails_with(capsys, "run", "--init", tiny_model, *TINY_RUN, "--baselines", "random,herding", "--out", out,
               "--resume", "--ipc", "3", match="ipc: 2 -> 3")
    # Without --resume or --overwrite the folder is protected.
    fails_with(capsys, "run", "--init", tiny_model, *TINY_RUN, "--out", out, match="already holds a run")


def test_stages_separately(tiny_model, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert run_cli("finetune", "--init", tiny_model, "--data", "digits", "--steps", "4", "--memory", "fifo",
                   "--no-progress", "--out", ft) == 0
    assert run_cli("sample", "--model", ft, "--ipc", "3", "--steps", "4", "--out", tmp_path / "set",
                   "--classes", "0,5") == 0
    # the set, its manifest, and the picture of it (issue 9.21: sample shows what it made)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["0", "5", "grid.png", "manifest.json"]
    with Image.open(tmp_path / "set" / "grid.png") as grid:
        assert grid.height > 2 * 8 and grid.width > 3 * 8  # two class rows of three upscaled 8x8 images
    assert run_cli("select", "--data", "digits", "--method", "herding", "--ipc", "3", "--out", tmp_path / "sel") == 0
    assert run_cli("evaluate", "--train", tmp_path / "sel", "--test", "digits", "--net", "convnet1", "--epochs", "2",
                   "--repeats", "1", "--out", tmp_path / "ev") == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["method"] == "herding" and result["ipc"] == 3 and result["config"]["flip"] is False


def test_pretrain_and_resume(tmp_path):
    out = tmp_path / "pt"
    common = ["pretrain", "--codec", "pixel", "--data", "digits", "--model", "DiT-Micro/2", "--batch-size", "16", "--checkpoint-every",
              "3", "--no-progress", "--out", out]
    assert run_cli(*common, "--steps", "3") == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["steps"] == 3
    # Extending a finished run: --resume with more steps continues from step 3.
    assert run_cli(*common, "--steps", "6", "--resume") == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("args, match", [
    (["run", "--ipc", "0"], "--ipc must be at least 1"),
    (["run", "--data", "digits", "--ipc", "1000"], "exceeds the"),
    (["run", "--eval-net", "vgg11"], "vgg11"),
    (["run", "--baselines", "kmeans"], "kmeans"),
    (["run", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["evaluate", "--train", "/nonexistent/set"], "/nonexistent/set"),
    (["select", "--data", "digits", "--ipc", "0"], "ipc"),
    (["sample", "--model", "/no/such/model"], "/no/such/model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, match):
    if args[0] == "run":
        args = args + ["--out", str(tmp_path / "r")]
    fails_with(capsys, *args, match=match)


def test_evaluate_rejects_bad_image_sets(tmp_path, capsys):
    assert run_cli("select", "--data", "digits", "--ipc", "2", "--out", tmp_path / "sel") == 0
    # classes differ from the test set's
    fails_with(capsys, "evaluate", "--train", tmp_path / "sel", "--test", "mnist5k", "--subset", str(_subset(tmp_path)),
               match="differ")
    # no manifest
    (tmp_path / "nomanifest" / "0").mkdir(parents=True)
    fails_with(capsys, "evaluate", "--train", tmp_path / "nomanifest", "--test", "digits", match="manifest")
    # a corrupt image in an otherwise complete set
    victim = next((tmp_path / "sel" / "3").glob("*.png"))
    victim.write_bytes(b"not a png")
    fails_with(capsys, "evaluate", "--train", tmp_path / "sel", "--test", "digits", match=victim.name)


def _subset(tmp_path):
    path = tmp_path / "three.txt"
    path.write_text("0\n1\n2\n")
    return path


def test_evaluate_offers_the_skip_option_its_message_names(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    test = tmp_path / "test"
    for c in DIGITS:
        (test / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(test / c / f"{i}.png")
    (test / "4" / "1.png").write_bytes(b"truncated")
    assert main(["select", "--data", "digits", "--ipc", "1", "--out", str(tmp_path / "set")]) == 0
    args = ["evaluate", "--train", str(tmp_path / "set"), "--test", str(test), "--epochs", "1", "--repeats", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unreadable image" in err and "--skip-bad-images" in err
    assert main([*args, "--skip-bad-images", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["num_test"] == 19


def test_evaluate_tests_a_set_on_the_dataset_it_was_made_from(tmp_path, capsys):
    """Without --test, a set selected from digits is tested on the digits test split (it used to be mnist5k,
    downscaled to 8 px); a plain class tree has no such record and needs --test."""
    assert main(["select", "--data", "digits", "--ipc", "1", "--out", str(tmp_path / "set")]) == 0
    assert main(["evaluate", "--train", str(tmp_path / "set"), "--epochs", "1", "--repeats", "1",
                 "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["test"] == "digits:test" and result["num_test"] == 364  # the digits test split
    tree = tmp_path / "tree"
    for c in DIGITS:
        (tree / c).mkdir(parents=True)
        Image.new("L", (8, 8), int(c) * 20).save(tree / c / "0.png")
    capsys.readouterr()
    assert main(["evaluate", "--train", str(tree), "--epochs", "1", "--repeats", "1",
                 "--out", str(tmp_path / "ev2")]) == 2
    assert "--test is required" in capsys.readouterr().err


def test_skip_bad_images_applies_to_a_plain_train_tree(tmp_path, capsys):
    tree = tmp_path / "tree"
    for c in DIGITS:
        (tree / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), int(c) * 20 + i).save(tree / c / f"{i}.png")
    (tree / "3" / "1.png").write_text("not an image")
    args = ["evaluate", "--train", str(tree), "--test", "digits", "--epochs", "1", "--repeats", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "--skip-bad-images" in capsys.readouterr().err
    assert main([*args, "--skip-bad-images", "--out", str(tmp_path / "b")]) == 0


def test_run_report_names_a_tie_as_a_tie(tmp_path):
    from memdistill.reports import write_run_report

    def result(method, best):
        return {"method": method, "ipc": 1, "net": "convnet1", "best_mean": best, "best_std": 0.5, "last_mean": best,
                "last_std": 0.5, "per_repeat": [{"best": best}, {"best": best}], "epochs": 2}

    report = write_run_report(tmp_path, {"memory": "adaptive"}, [result("adaptive", 9.89), result("random", 9.89)],
                              {}, "grid.png", "accuracy.png").read_text()
    assert "adaptive and random tie at 9.89" in report and "scores highest" not in report
    report = write_run_report(tmp_path, {}, [result("adaptive", 9.0), result("random", 9.89)], {}, "g", "a").read_text()
    assert "random scores highest, 9.89 ± 0.50" in report


def test_run_refuses_a_baseline_listed_twice(capsys, tmp_path):
    assert main(["run", "--baselines", "random,random", "--out", str(tmp_path / "r")]) == 2
    assert "random more than once" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, match", [
    (["finetune", "--data", "digits", "--codec", "pixel", "--vae", "somewhere"], "--vae applies to --codec vae"),
    (["pretrain", "--codec", "pixel", "--data", "digits", "--latent-cache", "cache"], "--latent-cache applies to --codec vae"),
    (["sample", "--eta", "0.5"], "--eta is the noise of the ddim sampler"),
    (["sample", "--steps", "1001"], "--steps must be an integer >= 1 and <= 1000"),
    (["sample", "--labels", "imagenet"], "--subset and --labels are only for bare checkpoints"),
    (["sample", "--vae", "somewhere"], "--vae decodes latents"),
    (["sample", "--guided-channels", "2"], "--guided-channels must be between 1 and 1"),
    (["sample", "--classes", "0,0"], "--classes must be distinct"),
    # options of soft labels with hard labels, of scores without --scores: typed, they would do nothing
    *[(["evaluate", "--train", "digits", *typed], "is used only with --labels soft")
      for typed in (["--temperature", "4"], ["--soft-lr", "0.002"], ["--soft-weight-decay", "0.1"],
                    ["--labels", "hard", "--temperature", "20"])],
    (["run", "--eval-temperature", "4"], "--eval-temperature is used only with --eval-labels soft"),
    (["bench", "--eval-soft-lr", "0.1"], "--eval-soft-lr is used only with --eval-labels soft"),
    *[(["evaluate", "--train", "digits", *typed], f"{typed[0]} is used only with --scores")
      for typed in (["--full-data-epochs", "2"], ["--reference-data", "digits"], ["--references-cache", "c"],
                    ["--lrs-weight", "0.3"], ["--ars-lambda", "0.3"], ["--score-scaling", "points"],
                    ["--lrs-weight", "0.5", "--no-scores"])],
    (["run", "--full-data-epochs", "2"], "--full-data-epochs is used only with --scores"),
    (["bench", "--no-scores", "--score-scaling", "points"], "--score-scaling is used only with --scores"),
    (["evaluate", "--train", "digits", "--ars", "--no-scores"], "--ars computes scores, which --no-scores turns off"),
    (["run", "--no-scores", "--ars"], "--ars computes scores, which --no-scores turns off"),
    # --ars-lambda weighs ARS alone: with scores but without --ars it would be ignored (bench scores by default)
    (["bench", "--ars-lambda", "0.3"], "--ars-lambda weighs ARS, which only --ars computes"),
    (["evaluate", "--train", "digits", "--scores", "--ars-lambda", "0.3"], "--ars-lambda weighs ARS"),
    (["run", "--scores", "--ars-lambda", "0.3"], "--ars-lambda weighs ARS"),
    # guidance options that would do nothing: only typed values count
    (["sample", "--modes", "3"], "--modes applies to mode guidance; without --mode-guidance"),
    (["sample", "--mode-data", "digits"], "--mode-data applies to mode guidance"),
    (["sample", "--mode-cache", "cache"], "--mode-cache applies to mode guidance"),
    (["sample", "--mode-stop", "0.5"], "--mode-stop applies to mode guidance"),
    (["sample", "--mode-guidance", "0", "--modes", "3"], "--modes applies to mode guidance"),
    (["sample", "--cfg-scale", "1", "--cfg-schedule", "linear"], "--cfg-schedule linear ramps the guidance scale; "
                                                                 "with --cfg-scale 1"),
    (["sample", "--cfg-scale", "1", "--cfg-schedule", "cosine"], "--cfg-schedule cosine ramps"),
    (["sample", "--cfg-scale", "1", "--cfg-interval", "200,800"], "--cfg-interval limits guidance to a window; with "
                                                                  "--cfg-scale 1"),
    (["sample", "--cfg-interval", "300,300"], "--cfg-interval 300,300 is an empty window"),
    (["run", "--sample-modes", "3"], "--sample-modes applies to mode guidance; without --sample-mode-guidance"),
    (["run", "--sample-cfg-scale", "1", "--sample-cfg-interval", "0,500"], "--sample-cfg-interval limits guidance"),
])
def test_options_that_would_be_ignored_or_unnamed_are_refused(capsys, tmp_path, args, match):
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["--cfg-scale", "1", "--cfg-schedule", "constant"],  # the default schedule: nothing to ignore
    ["--cfg-scale", "1", "--mode-guidance", "0.5", "--modes", "2", "--mode-data", "digits"],
    ["--mode-guidance", "0.5", "--mode-stop", "0.3", "--mode-data", "digits"],
    ["--cfg-interval", "200,800", "--cfg-schedule", "linear"],
])
def test_guidance_options_that_act_are_accepted(args, tiny_model, tmp_path):
    assert main(["sample", "--model", str(tiny_model), "--ipc", "1", "--steps", "2", "--classes", "0", "--device",
                 "cpu", *args, "--out", str(tmp_path / "o")]) == 0


def test_bench_guidance_variants_stay_valid_under_the_typed_option_checks():
    """variant_overrides builds combinations (e.g. an interval checked against the neutral scale 1) that the
    checks of typed options must not refuse: they are not typed."""
    from memdistill.guidance import variant_overrides

    assert variant_overrides("cfgint:200,800") == {"cfg_interval": "200,800"}
    assert variant_overrides("modes:0.2:0.5:3")["modes"] == 3


@pytest.mark.parametrize("flag, want", [("--no-progress", {True}), ("--progress", {None}), (None, {None})])
def test_no_progress_hides_every_bar_of_a_command(small_set, tmp_path, monkeypatch, flag, want):
    """--no-progress reaches the bars of evaluate (and of any stage: runtime.bars_disabled); without it a bar
    shows where stderr is a terminal (tqdm's disable=None)."""
    import memdistill.evaluate as evaluate
    from memdistill import runtime

    seen, real_tqdm = [], evaluate.tqdm

    def tqdm(*a, **kw):
        seen.append(kw.get("disable"))
        return real_tqdm(*a, **kw)

    monkeypatch.setattr(evaluate, "tqdm", tqdm)
    monkeypatch.setattr(runtime, "_bars", {"on": None})  # what this test sets stays in it
    args = ["evaluate", "--train", small_set, "--test", "digits", "--net", "convnet1", "--epochs", "1",
            "--repeats", "1", "--out", tmp_path / "e"]
    assert run_cli(*args, *([flag] if flag else [])) == 0
    assert seen and set(seen) == want


def test_bench_no_progress_reaches_the_evaluation_bars(tmp_path, monkeypatch):
    """--no-progress of a command that drives stages (bench, run) hides their bars too, not only fine-tuning's."""
    import memdistill.evaluate as evaluate
    from memdistill import runtime

    seen, real_tqdm = [], evaluate.tqdm
    monkeypatch.setattr(evaluate, "tqdm", lambda *a, **kw: seen.append(kw.get("disable")) or real_tqdm(*a, **kw))
    monkeypatch.setattr(runtime, "_bars", {"on": None})
    assert run_cli("bench", "--data", "digits", "--method", "random", "--ipc", "1", "--eval-net", "convnet1",
                   "--eval-epochs", "1", "--eval-repeats", "1", "--no-metrics", "--no-scores", "--no-progress",
                   "--out", tmp_path / "b") == 0
    assert seen and set(seen) == {True}


def test_run_report_names_the_sampling_levers_it_used(tiny_model, tmp_path):
    """A run whose set was over-generated and selected (or guided in a window) says so in its report's settings;
    a plain run lists none of them."""
    out = tmp_path / "run"
    assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--sample-pool", "2", "--sample-select", "random",
                   "--sample-cfg-interval", "0,500", "--sample-cfg-scale", "2", "--out", out) == 0
    report = (out / "report.md").read_text()
    for line in ('"pool": 2.0', '"select": "random"', '"cfg_interval": "0,500"', '"cfg_scale": 2.0'):
        assert line in report, line
    from memdistill.run import _sampling_levers
    from memdistill.sample import SampleConfig

    assert _sampling_levers(SampleConfig()) == {}
