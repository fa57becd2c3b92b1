"""Outputs (issue 9, items 7-10, 16, 21): output problems refused before the work, JSON of the wrong shape,
a full disk, evaluate's --overwrite, a refused run that writes nothing, timings kept by --resume, partial
folders of dead processes, and the pictures people read."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from memdistill.cli import main
from memdistill.errors import UserError



def run_cli(*args):
    return main([str(a) for a in args])


def one_line_error(capsys, code, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and match in err[0], err
    return err[0]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


TINY_RUN = ["--data", "digits", "--steps", "4", "--batch-size", "8", "--ipc", "2", "--sample-steps", "2",
            "--eval-net", "convnet1", "--eval-epochs", "1", "--eval-repeats", "2", "--no-progress"]

# Every stage, with settings that would finish (or fail) within seconds, so that the old code could be run.
STAGES = {
    "pretrain": ["pretrain", "--codec", "pixel", "--data", "digits", "--model", "DiT-Micro/2", "--steps", "1", "--batch-size", "8",
                 "--no-progress"],
    "finetune": ["finetune", "--data", "digits", "--steps", "1", "--no-progress"],
    "sample": ["sample", "--ipc", "1", "--steps", "2"],
    "select": ["select", "--data", "digits", "--ipc", "1"],
    "evaluate": ["evaluate", "--train", "SET", "--test", "digits", "--net", "convnet1", "--epochs", "1",
                 "--repeats", "1"],
    "run": ["run", *TINY_RUN],
    "bench": ["bench", "--data", "digits", "--method", "random", "--ipc", "1", "--eval-net", "convnet1",
              "--eval-repeats", "1", "--no-metrics", "--eval-epochs", "1"],
}


def stage_args(stage, tiny_model, small_set):
    args = [str(a) for a in STAGES[stage]]
    args = [str(small_set) if a == "SET" else a for a in args]
    if stage in ("finetune", "run"):
        args += ["--init", str(tiny_model)]
    if stage == "sample":
        args += ["--model", str(tiny_model)]
    return args


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("where", ["file", "inside a file"])
def test_out_that_cannot_be_a_folder_is_refused_before_the_work(stage, where, tiny_model, small_set, tmp_path,
                                                                capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "file" else blocker / "sub" / "out"
    before = listing(tmp_path)
    t0 = time.perf_counter()
    code = run_cli(*stage_args(stage, tiny_model, small_set), "--out", out)
    line = one_line_error(capsys, code, "--out")
    assert ("is a file" if where == "file" else "inside the file") in line
    assert time.perf_counter() - t0 < 10
    assert listing(tmp_path) == before and blocker.read_text() == "a file, not a folder"


def test_out_in_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    from memdistill import manifest

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(manifest.tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match=r"--out .*cannot write in .*Permission denied"):
        manifest.check_output_folder(tmp_path / "new" / "out")
    assert list(tmp_path.iterdir()) == []


# ----- JSON of the wrong shape ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "JSON list"),
    ('"a string"', "JSON str"),
    ("{}", "'stage'"),
    ('{"stage": 3}', "'stage' must be str"),
    ('{"stage": "select", "config": []}', "'config' must be an object"),
])
def test_manifest_of_the_wrong_shape(tmp_path, text, match):
    from memdistill.manifest import read_manifest

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=match):
        read_manifest(tmp_path)


@pytest.mark.parametrize("key, value, match", [
    ("class_names", "0123456789", "class_names"),
    ("class_names", [0, 1], "class_names"),
    ("channels", "1", "channels"),
    ("resolution", [8], "resolution"),
    ("resolution", "8", "resolution"),
    ("counts", {"0": 2}, "counts"),
    ("counts", [2, 2], "counts"),
    ("ipc", "two", "ipc"),
    ("method", ["random"], "method"),
])
def test_image_set_manifest_of_the_wrong_shape(small_set, tmp_path, key, value, match, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_set, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest[key] = value
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code = run_cli("evaluate", "--train", bad, "--test", "digits", "--net", "convnet1", "--epochs", "1",
                   "--repeats", "1", "--out", tmp_path / "ev")
    one_line_error(capsys, code, match)
    assert not (tmp_path / "ev").exists()


def test_export_and_run_manifest_of_the_wrong_shape(tiny_model, tmp_path, capsys):
    import shutil

    # an export whose config.json has class_names of the wrong shape
    export = tmp_path / "export"
    shutil.copytree(tiny_model, export)
    cfg = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps(dict(cfg, class_names="0123456789")))
    code = run_cli("sample", "--model", export, "--ipc", "1", "--steps", "2", "--out", tmp_path / "s1")
    one_line_error(capsys, code, "class_names")
    # an export config that is a JSON list: one line naming the folder (what it says is issue 9.14's)
    (export / "config.json").write_text("[1, 2, 3]")
    code = run_cli("sample", "--model", export, "--ipc", "1", "--steps", "2", "--out", tmp_path / "s2")
    one_line_error(capsys, code, str(export))
    # a run folder whose manifest.json is a list
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("[]")
    code = run_cli("sample", "--model", run, "--ipc", "1", "--steps", "2", "--out", tmp_path / "s3")
    one_line_error(capsys, code, "JSON list")
    # the run manifest beside a good export is only information: a list there is ignored, sampling works
    good = tmp_path / "r2" / "export"
    shutil.copytree(tiny_model, good)
    (good.parent / "manifest.json").write_text('["not", "a", "manifest"]')
    assert run_cli("sample", "--model", good, "--ipc", "1", "--steps", "2", "--out", tmp_path / "s4") == 0
    assert not any((tmp_path / s).exists() for s in ("s1", "s2", "s3"))


def test_bench_files_of_the_wrong_shape(tmp_path):
    from memdistill.bench import BenchConfig
    from memdistill.bench.cells import _Bench

    bench = _Bench.__new__(_Bench)  # only the file readers are under test
    bench.cfg, bench.out = BenchConfig(), tmp_path
    cell = tmp_path / "cell.json"
    cell.write_text('{"best_mean": "high"}')
    with pytest.raises(UserError, match="cell.json"):
        bench.cell(cell, tmp_path, "convnet1", "x")
    cell.write_text("[]")
    with pytest.raises(UserError, match="JSON list"):
        bench.cell(cell, tmp_path, "convnet1", "x")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"coverage": 0.5, "diversity": "wide"}')
    with pytest.raises(UserError, match="diversity"):
        bench.set_metrics(metrics, tmp_path, "x")
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "extractor.json").write_text('{"net": "convnet3"}')
    with pytest.raises(UserError, match="epochs"):
        bench.extractor_info()


# ----- a full disk --------------------------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def json_writes_fill_the_disk(monkeypatch):
    """Files that manifest.write_json_atomic opens take no byte: every write raises ENOSPC."""
    from memdistill import manifest

    real_fdopen = manifest.os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            no_space()

    monkeypatch.setattr(manifest.os, "fdopen", FullDisk)


def test_full_disk_while_writing_json_leaves_no_tmp(tmp_path, monkeypatch):
    from memdistill import manifest

    json_writes_fill_the_disk(monkeypatch)
    with pytest.raises(UserError, match=r"disk is full.*results\.json"):
        manifest.write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_state_or_export_leaves_no_tmp(tmp_path, monkeypatch, tiny_model):
    import safetensors.torch

    from memdistill.models.io import load_export, save_export
    from memdistill.train import save_atomic

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match=r"disk is full.*last\.pt"):
        save_atomic({"step": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
    model, cfg = load_export(tiny_model)
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    cfg.pop("model")
    with pytest.raises(UserError, match=r"disk is full.*export"):
        save_export(tmp_path / "export", model, cfg)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_finetune_sample_evaluate(tiny_model, small_set, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.setattr(torch, "save", no_space)
        code = run_cli(*stage_args("finetune", tiny_model, small_set), "--out", tmp_path / "ft")
        one_line_error(capsys, code, "disk is full")
    assert not [p for p in (tmp_path / "ft").rglob("*") if p.name.endswith(".tmp")]

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", no_space)
        code = run_cli(*stage_args("sample", tiny_model, small_set), "--out", tmp_path / "set")
        one_line_error(capsys, code, "disk is full")
    assert list(tmp_path.glob("*set*")) == [] and list(tmp_path.glob(".*")) == []

    with monkeypatch.context() as m:
        json_writes_fill_the_disk(m)
        code = run_cli(*stage_args("evaluate", tiny_model, small_set), "--out", tmp_path / "ev")
        one_line_error(capsys, code, "results.json")
    assert list((tmp_path / "ev").iterdir()) == []


def test_full_disk_anywhere_else_is_one_line(monkeypatch, capsys, tmp_path):
    import memdistill.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(cli, "_cmd_select", full)
    line = one_line_error(capsys, run_cli("select", "--out", tmp_path / "x"), "disk is full")
    assert "report.md" in line


# ----- evaluate follows the --overwrite rule ----------------------------------------------------------------------
def test_evaluate_refuses_an_earlier_result_before_training(small_set, tmp_path, monkeypatch, capsys):
    import memdistill.evaluate as evaluate

    args = [*stage_args("evaluate", None, small_set), "--out", tmp_path / "ev"]
    assert run_cli(*args) == 0
    first = (tmp_path / "ev" / "results.json").read_text()

    def must_not_train(*a, **k):
        raise AssertionError("evaluated although the result would be refused")

    with monkeypatch.context() as m:
        m.setattr(evaluate, "evaluate_image_set", must_not_train)
        one_line_error(capsys, run_cli(*args), "--overwrite")
    assert (tmp_path / "ev" / "results.json").read_text() == first
    assert run_cli(*args, "--overwrite", "--seed", "1") == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["config"]["seed"] == 1


# ----- run: a refused command writes nothing; --resume keeps the timings --------------------------------------------
def test_refused_run_writes_nothing_and_the_corrected_command_works(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--init", tiny_model, *TINY_RUN, "--baselines", "random", "--out", out]
    # more images per class than the baseline can draw: refused by the checks before the first stage
    one_line_error(capsys, run_cli(*args, "--ipc", "500"), "--ipc 500")
    assert not out.exists()
    # refused by the fine-tuning stage itself (an init model whose image size differs from the data's)
    one_line_error(capsys, run_cli(*args, "--init", "mnist5k"), "expects")
    assert not out.exists()
    assert run_cli(*args) == 0


def test_resume_of_a_finished_run_keeps_the_timings(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--init", tiny_model, *TINY_RUN, "--out", out]
    assert run_cli(*args) == 0
    timings = json.loads((out / "results.json").read_text())["timings"]
    assert set(timings) == {"finetune", "sample", "select random", "evaluate adaptive", "evaluate random"}
    table = (out / "report.md").read_text().split("## Timings")[1].split("##")[0]
    assert run_cli(*args, "--resume") == 0
    assert json.loads((out / "results.json").read_text())["timings"] == timings
    report = (out / "report.md").read_text()
    assert report.split("## Timings")[1].split("##")[0] == table
    assert "measured when they ran" in report
    # a stored evaluation, or run_config.json, of the wrong shape is refused on resume with one line naming it
    capsys.readouterr()
    good = (out / "eval" / "random.json").read_text()
    (out / "eval" / "random.json").write_text('{"best_mean": 1}')
    one_line_error(capsys, run_cli(*args, "--resume"), "random.json")
    (out / "eval" / "random.json").write_text(good)
    (out / "run_config.json").write_text("[]")
    one_line_error(capsys, run_cli(*args, "--resume"), "run_config.json")


def test_run_records_and_reports_the_precision_its_evaluations_resolved_to(tiny_model, tmp_path, monkeypatch):
    # Before: the report said "ran under auto autocast" for --eval-precision auto (fp32 on a CPU), and neither
    # results.json nor the report's settings said which precision the evaluations ran at.
    import torch

    for asked, cpu_bf16, resolved in (("auto", True, "fp32"), ("tf32", True, "fp32"), ("fast", False, "fp32"),
                                      ("fast", True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=cpu_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        out = tmp_path / f"run-{asked}-{cpu_bf16}"
        assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--eval-device", "cpu", "--eval-precision", asked,
                       "--out", out) == 0
        results = json.loads((out / "results.json").read_text())["results"]
        assert {r["precision"] for r in results} == {resolved}, (asked, cpu_bf16)
        report = (out / "report.md").read_text()
        assert f'"eval_precision": "{resolved}"' in report
        assert ("ran under bf16 autocast" in report) is (resolved == "bf16")
        assert "auto autocast" not in report and "tf32 autocast" not in report


# ----- partial folders of dead processes --------------------------------------------------------------------------
def test_partial_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, live.pid):
            (tmp_path / f".sel.partial-{pid}" / "0").mkdir(parents=True)
        (tmp_path / f".sel.old-{dead.pid}").mkdir()
        assert run_cli("select", "--data", "digits", "--ipc", "1", "--out", tmp_path / "sel") == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".sel.partial-{live.pid}", "sel"]
    finally:
        live.kill()
        live.wait()


def test_pid_alive():
    from memdistill.manifest import pid_alive

    assert pid_alive(os.getpid())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not pid_alive(gone.pid)


# ----- pictures ---------------------------------------------------------------------------------------------------
def test_distilled_vs_real_grid_labels_rows_and_parts():
    from memdistill.reports import distilled_vs_real_grid, image_grid

    g = torch.Generator().manual_seed(0)
    d, r = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    names = ["cat", "dog", "a long class name"]
    grid = distilled_vs_real_grid(d, labels, r, labels, names)
    bare = image_grid([list(d[labels == c]) + list(r[labels == c]) for c in range(3)], split=2)
    assert grid.width > bare.width + 20  # a margin for the class names
    assert grid.height > bare.height  # a header row naming the parts
    with pytest.raises(ValueError, match="class names"):
        distilled_vs_real_grid(d, labels, r, labels, names[:2])


def test_accuracy_plot_says_what_it_shows(tmp_path):
    import matplotlib.pyplot as plt

    from memdistill.reports import accuracy_figure, accuracy_plot

    rows = [{"method": m, "best_mean": 50.0, "best_std": 2.0, "per_repeat": [{"best": 50}] * 3}
            for m in ("adaptive", "random")]
    fig = accuracy_figure(rows, "digits, IPC 2")
    ax = fig.axes[0]
    text = (ax.get_ylabel() + " " + ax.get_title()).lower()
    plt.close(fig)
    for words in ("best top-1", "mean", "3 repeats", "sample std"):
        assert words in text, (words, text)
    assert accuracy_plot(rows, tmp_path / "a.png").is_file()


def test_every_written_set_has_a_labelled_grid(tmp_path):
    from memdistill.imageset import read_image_set, write_image_set

    images = torch.rand(6, 3, 8, 8) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = write_image_set(tmp_path / "set", images, labels, ["a", "b", "c"], {"method": "test"})
    with Image.open(out / "grid.png") as grid:
        assert grid.height > 3 * 56 and grid.width > 2 * 56  # three labelled rows of two upscaled cells
    x, y, names, manifest = read_image_set(out)  # the reader ignores the picture
    assert x.shape == (6, 3, 8, 8) and names == ["a", "b", "c"] and manifest["grid"] == "grid.png"


def test_refused_bench_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    code = run_cli(*STAGES["bench"], "--ipc", "1000", "--out", out)
    one_line_error(capsys, code, "IPC 1000")
    assert not out.exists()
    assert run_cli(*STAGES["bench"], "--out", out) == 0


def test_export_folders_of_dead_processes_are_removed(tmp_path, tiny_model):
    from memdistill.models.io import load_export, save_export

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".export.tmp-{dead.pid}").mkdir()  # a kill -9 in the middle of an earlier export
    (tmp_path / f".export.old-{dead.pid}").mkdir()
    model, cfg = load_export(tiny_model)
    save_export(tmp_path / "export", model, {k: v for k, v in cfg.items() if k != "model"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_resume_refused_over_a_changed_default_says_how_to_give_the_saved_value(tiny_model, tmp_path, capsys):
    # A run made when --eval-precision defaulted to auto, resumed by a version whose default is fast: the user
    # typed nothing different, so "use the original options" alone could not help.
    out = tmp_path / "run"
    assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--eval-precision", "auto", "--out", out) == 0
    capsys.readouterr()
    assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "eval.precision: 'auto' -> 'fast'" in err and "--eval-precision auto gives the saved values" in err
    assert run_cli("run", "--init", tiny_model, *TINY_RUN, "--eval-precision", "auto", "--out", out, "--resume") == 0
