"""`memdistill bench` on a tiny grid (digits, a micro DiT): outputs, resume of one cell, table layout, sweep."""

import argparse
import dataclasses
import json

import pytest
import torch

from memdistill import bench
from memdistill.bench import accuracy_table, add_bench_parser, tied_best
from memdistill.errors import UserError
from memdistill.imageset import read_image_set



TINY = ["--data", "digits", "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--no-progress",
        "--sample-steps", "3", "--eval-epochs", "2", "--feature-net", "convnet1", "--feature-epochs", "1",
        "--eval-net", "convnet1", "--eval-repeats", "2"]


def bench_cli(*args):
    parser = argparse.ArgumentParser(prog="memdistill")
    add_bench_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["bench", *map(str, args)])
    parsed.func(parsed)


@pytest.fixture
def counters(monkeypatch):
    from memdistill.bench import cells  # where the bench's units call them

    calls = {"evaluate": [], "finetune": []}
    real_eval, real_ft = cells.evaluate_image_set, cells.finetune

    def evaluate(folder, *a, **kw):
        calls["evaluate"].append(str(folder))
        return real_eval(folder, *a, **kw)

    def finetune(cfg, out, *a, **kw):
        calls["finetune"].append((cfg.memory, str(out)))
        return real_ft(cfg, out, *a, **kw)

    monkeypatch.setattr(cells, "evaluate_image_set", evaluate)
    monkeypatch.setattr(cells, "finetune", finetune)
    return calls


def test_bench_grid_and_resume_of_one_cell(tiny_model, tmp_path, counters, capsys):
    out = tmp_path / "bench"
    common = ["--init", tiny_model, *TINY, "--method", "random,dit,adaptive", "--ipc", "1,2", "--out", out]
    bench_cli(*common)
    assert "| IPC | net | Random | DiT | Adaptive |" in capsys.readouterr().out
    for name in ("bench.json", "bench.md", "accuracy_vs_ipc.png", "features/extractor.json", "timings.json"):
        assert (out / name).is_file(), name
    result = json.loads((out / "bench.json").read_text())
    assert [(c["method"], c["ipc"], c["net"]) for c in result["cells"]] == [
        (m, k, "convnet1") for k in (1, 2) for m in ("random", "dit", "adaptive")]
    for c in result["cells"]:
        assert len(c["per_repeat"]) == 2 and c["epochs"] == 2 and 0 <= c["best_mean"] <= 100
    assert len(list((out / "cells").glob("*.json"))) == 6
    # Only the adaptive model was fine-tuned (dit samples the init model), once, for both IPCs.
    assert counters["finetune"] == [("adaptive", str(out / "models" / "adaptive"))]
    assert len(counters["evaluate"]) == 6
    # Metrics: IPC 1 has no within-class pair; coverage is a fraction.
    metrics = {(r["method"], r["ipc"]): r for r in result["metrics"]}
    assert metrics["random", 1]["diversity"] is None and 0 < metrics["random", 2]["diversity"] <= 2
    assert all(0.0 <= r["coverage"] <= 1.0 for r in result["metrics"])
    assert {"finetune adaptive", "sample adaptive-ipc2", "select random-ipc2"} <= set(result["timings"])

    # Smaller IPCs are per-class prefixes of the largest: image 0 of each class is the same in both sets.
    for method in ("random", "dit", "adaptive"):
        x1, y1, _, _ = read_image_set(out / "sets" / f"{method}-ipc1")
        x2, y2, _, _ = read_image_set(out / "sets" / f"{method}-ipc2")
        assert torch.equal(x1, x2[::2]) and torch.equal(y1, y2[::2])

    report = (out / "bench.md").read_text()
    assert "| IPC | net | Random | DiT | Adaptive |" in report and "2 repeats" in report
    assert "trained for 2 epochs" in report and "--eval-epochs 2" in report and "Coverage" in report
    assert "![accuracy against IPC](accuracy_vs_ipc.png)" in report

    # Interrupt: one cell and the report are lost. The rerun evaluates only that cell, trains nothing.
    victim = out / "cells" / "dit-ipc2-convnet1.json"
    kept = (out / "cells" / "adaptive-ipc1-convnet1.json").stat().st_mtime_ns
    victim.unlink()
    (out / "bench.md").unlink()
    counters["evaluate"].clear()
    counters["finetune"].clear()
    bench_cli(*common, "--resume")
    assert counters["evaluate"] == [str(out / "sets" / "dit-ipc2")]
    assert counters["finetune"] == []
    assert victim.is_file() and (out / "bench.md").is_file()
    assert (out / "cells" / "adaptive-ipc1-convnet1.json").stat().st_mtime_ns == kept
    assert json.loads((out / "bench.json").read_text())["cells"][4]["method"] == "dit"

    # Protection of the folder and of the settings a resume depends on.
    with pytest.raises(UserError, match="already holds a bench"):
        bench_cli(*common)
    with pytest.raises(UserError, match="finetune.steps: 4 -> 5"):
        bench_cli(*common, "--resume", "--steps", "5")


def test_table_layout_and_tie_rule():
    cells = [{"method": m, "ipc": 10, "net": "convnet6", "best_mean": mean, "best_std": std}
             for m, mean, std in (("random", 40.0, 1.0), ("dit", 48.5, 0.4), ("minimax", 47.0, 1.0),
                                  ("adaptive", 50.0, 2.0))]
    cells += [{"method": m, "ipc": 50, "net": "convnet6", "best_mean": mean, "best_std": 0.5}
              for m, mean in (("random", 55.0), ("dit", 56.0), ("minimax", 60.0), ("adaptive", 59.6))]
    table = accuracy_table(cells, ["random", "dit", "minimax", "adaptive"], [10, 50], ["convnet6"])
    lines = table.splitlines()
    assert lines[0] == "| IPC | net | Random | DiT | Minimax | Adaptive |"
    assert lines[1] == "|---|---|---|---|---|---|"
    # Best 50.0 ± 2.0: 48.5 is within 2 of it (tie, bold), 47.0 is not, nor 40.0.
    assert lines[2] == "| 10 | convnet6 | 40.00 ± 1.00 | **48.50 ± 0.40** | 47.00 ± 1.00 | **50.00 ± 2.00** |"
    assert lines[3] == "| 50 | convnet6 | 55.00 ± 0.50 | 56.00 ± 0.50 | **60.00 ± 0.50** | **59.60 ± 0.50** |"
    assert tied_best({"a": (10.0, 0.0), "b": (9.99, 5.0)}) == {"a"}  # the best's std decides, not the other's
    # A missing cell is shown as a dash, not invented.
    assert accuracy_table(cells[:1], ["random", "dit"], [10], ["convnet6"]).splitlines()[2] == \
        "| 10 | convnet6 | **40.00 ± 1.00** | – |"


def test_sweep_runs_on_two_values(tiny_model, tmp_path, counters):
    out = tmp_path / "sweep"
    bench_cli("--init", tiny_model, *TINY, "--sweep", "--sweep-ipc", "2", "--sweep-lambda-real", "0,0.002",
              "--sweep-lambda-gen", "", "--sweep-memory", "", "--no-metrics", "--out", out)
    result = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [(p["parameter"], p["value"], p["default"]) for p in result["points"]] == [
        ("lambda_real", 0.0, False), ("lambda_real", 0.002, True)]
    # The default point is the bench's adaptive model; the other has its own run.
    assert counters["finetune"] == [("adaptive", str(out / "sweep" / "models" / "lambda_real-0")),
                                    ("adaptive", str(out / "models" / "adaptive"))]
    assert (out / "sweep" / "lambda_real.png").is_file()
    report = (out / "sweep" / "sweep.md").read_text()
    assert "| lambda_real (representativeness weight) | top-1 (%) | last (%) |" in report
    assert "| 0.002 (default) |" in report


def test_finetune_control_is_fine_tuned_without_memory(tiny_model, tmp_path, counters, capsys):
    out = tmp_path / "control"
    bench_cli("--init", tiny_model, *TINY, "--method", "finetune,minimax", "--ipc", "1", "--no-metrics",
              "--out", out)
    assert counters["finetune"] == [("none", str(out / "models" / "finetune")),
                                    ("fifo", str(out / "models" / "minimax"))]
    assert "| IPC | net | Fine-tune (no memory) | Minimax |" in capsys.readouterr().out
    assert json.loads((out / "models" / "finetune" / "config.json").read_text())["memory"] == "none"


@pytest.mark.parametrize("args, match", [
    (["--method", "random,gan"], "gan"),
    (["--ipc", "1,x"], "--ipc"),
    (["--eval-net", "vgg11"], "vgg11"),
    (["--ipc", "5000", "--method", "random"], "exceeds"),
    (["--sweep", "--sweep-lambda-real", "", "--sweep-lambda-gen", "", "--sweep-memory", ""], "no points"),
])
def test_bad_input(tiny_model, tmp_path, args, match):
    with pytest.raises(UserError, match=match):
        bench_cli("--init", tiny_model, *TINY, *args, "--out", tmp_path / "b")


def test_the_older_spellings_still_run(tiny_model, tmp_path):
    """--ipcs, --methods, --nets and --repeats were renamed (--ipc, --method, --eval-net, --eval-repeats, as in
    the other commands); commands written with the old names keep working."""
    from memdistill.cli import build_parser

    old = build_parser().parse_args(["bench", "--methods", "random", "--ipcs", "1,2", "--nets", "convnet1",
                                     "--repeats", "2"])
    new = build_parser().parse_args(["bench", "--method", "random", "--ipc", "1,2", "--eval-net", "convnet1",
                                     "--eval-repeats", "2"])
    assert vars(old) == vars(new)
    assert (old.methods, old.ipcs, old.nets, old.repeats) == ("random", "1,2", "convnet1", 2)
    default = build_parser().parse_args(["bench"])
    assert (default.ipcs, default.repeats) == ("1,10,50", 3)


def test_reports_of_one_repeat_and_of_real_baselines_only(tmp_path, capsys):
    """One repeat shows as one repeat (no "± 0.00"), and a bench of real baselines does not describe a
    fine-tuning it never ran."""
    bench_cli(*TINY, "--eval-repeats", "1", "--method", "random,herding", "--ipc", "1", "--no-metrics",
              "--out", tmp_path / "b")
    printed = capsys.readouterr().out
    report = (tmp_path / "b" / "bench.md").read_text()
    assert "(1 repeat)" in printed and "± 0.00" not in printed and "± 0.00" not in report
    assert "fine-tune" not in report.split("## Top-1")[0].lower() and "Random and Herding select" in report


def test_bench_scores_every_cell_in_a_second_table(tmp_path, capsys):
    out = tmp_path / "bench"
    bench_cli(*TINY, "--method", "random,herding", "--ipc", "1", "--no-metrics", "--full-data-epochs", "1",
              "--out", out)
    result = json.loads((out / "bench.json").read_text())
    for c in result["cells"]:
        assert {"hlr", "ior", "lrs"} <= set(c["scores"]) and len(c["scores"]["hlr"]["per_repeat"]) == 2
    report = (out / "bench.md").read_text()
    assert "## DD-Ranking scores" in report and "| IPC | net | method | HLR (points) | IOR (points) | LRS |" in report
    assert "| 1 | convnet1 | Herding |" in report
    with pytest.raises(UserError, match="--ars scores the method grid"):
        bench.BenchConfig(sweep=True, scores=dataclasses.replace(bench.BenchConfig().scores, ars=True)).validate()
    out3 = tmp_path / "b3"
    bench_cli(*TINY, "--method", "random", "--ipc", "1", "--no-metrics", "--no-scores", "--out", out3)
    assert "DD-Ranking" not in (out3 / "bench.md").read_text()


def test_bench_ars_adds_one_cell_without_augmentation_per_cell_on_resume(tmp_path, counters):
    """--ars on a resumed bench evaluates only the new no-augmentation cells (with augmentation off) and scores
    ARS from them: the stored ARS equals scores.augmentation_robust_score of the stored accuracies."""
    from memdistill.references import without_augmentation
    from memdistill.scores import augmentation_robust_score

    out = tmp_path / "bench"
    args = [*TINY, "--method", "random,herding", "--ipc", "1", "--no-metrics", "--full-data-epochs", "1",
            "--references-cache", tmp_path / "refs", "--out", out]
    bench_cli(*args)
    assert "ARS" not in (out / "bench.md").read_text()
    first = len(counters["evaluate"])
    bench_cli(*args, "--resume", "--ars")
    assert len(counters["evaluate"]) == first + 2  # one no-augmentation cell per method, nothing else again
    result = json.loads((out / "bench.json").read_text())
    for c in result["cells"]:
        noaug = json.loads((out / "cells" / f"{c['method']}-ipc1-convnet1-noaug.json").read_text())
        aug = json.loads((out / "cells" / f"{c['method']}-ipc1-convnet1.json").read_text())
        # the same protocol with augmentation off, nothing else changed
        assert noaug["config"] == dataclasses.asdict(without_augmentation(type(bench.BenchConfig().eval)(
            **aug["config"]), aug))
        assert noaug["config"] != aug["config"]
        s = c["scores"]
        set_noaug = [r["best"] for r in noaug["per_repeat"]]
        assert s["set_noaug"]["per_repeat"] == set_noaug
        want = [augmentation_robust_score(a["best"] - r, n - rn, s["ars_lambda"], s["scaling"])
                for a, r, n, rn in zip(c["per_repeat"], s["random_real"]["per_repeat"], set_noaug,
                                       s["random_noaug"]["per_repeat"])]
        assert s["ars"]["per_repeat"] == pytest.approx(want)
    assert "| ARS |" in (out / "bench.md").read_text()


def test_bench_soft_label_ars_keeps_one_teacher_per_net(tmp_path, monkeypatch):
    """bench --ars with --eval-teacher full: the no-augmentation cells are labelled by the teacher of their cell
    (teacher/<net>), which is trained once, not again without augmentation over the same file for every cell;
    the random baseline (the very subset of the random reference) then scores IOR 0 with and without
    augmentation."""
    from memdistill import evaluate
    from memdistill.softlabels import sha256_of

    monkeypatch.setattr(evaluate, "TEACHER_EPOCHS", 1)  # the plumbing, not the teacher's quality
    out = tmp_path / "bench"
    bench_cli(*TINY, "--method", "random,herding", "--ipc", "1", "--no-metrics", "--full-data-epochs", "1",
              "--eval-labels", "soft", "--eval-teacher", "full", "--ars", "--references-cache", tmp_path / "refs",
              "--out", out)
    result = json.loads((out / "bench.json").read_text())
    teacher = result["cells"][0]["teacher"]
    assert sha256_of(teacher["path"]) == teacher["sha256"] and all(c["teacher"] == teacher for c in result["cells"])
    random = next(c for c in result["cells"] if c["method"] == "random")["scores"]
    assert random["ior"]["per_repeat"] == [0.0, 0.0]
    assert random["set_noaug"]["per_repeat"] == random["random_noaug"]["per_repeat"]
