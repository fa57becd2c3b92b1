"""Checks every command makes of its command line before any work: one line, exit 2, the option named."""

import time

import pytest

from memdistill.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def one_line(capsys, code, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err
    return err[0]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


TRAIN = ["--steps", "1", "--batch-size", "4", "--no-progress"]
# Every command, with settings that finish in seconds (so the old code, accepting the value, could be run).
COMMANDS = {
    "pretrain": ["pretrain", "--codec", "pixel", "--data", "digits", "--model", "DiT-Micro/2", *TRAIN],
    "finetune": ["finetune", "--data", "digits", *TRAIN],
    "train-vae": ["train-vae", "--data", "digits", "--channels-list", "32,32", "--judge-epochs", "1",
                  "--batch-size", "4", "--steps", "1", "--no-progress"],
    "sample": ["sample", "--ipc", "1", "--steps", "2"],
    "select": ["select", "--data", "digits", "--ipc", "1"],
    "evaluate": ["evaluate", "--train", "SET", "--test", "digits", "--net", "convnet1", "--epochs", "1",
                 "--repeats", "1"],
    "run": ["run", "--data", "digits", *TRAIN, "--ipc", "1", "--sample-steps", "2", "--eval-net", "convnet1",
            "--eval-epochs", "1", "--eval-repeats", "1"],
    "bench": ["bench", "--data", "digits", "--method", "random", "--ipc", "1", "--eval-net", "convnet1",
              "--eval-repeats", "1", "--no-metrics", "--eval-epochs", "1"],
}
SEED_OPTIONS = {"pretrain": ["--seed"], "train-vae": ["--seed"], "finetune": ["--seed"], "sample": ["--seed"], "select": ["--seed"],
                "evaluate": ["--seed"], "run": ["--seed", "--sample-seed", "--eval-seed"],
                "bench": ["--seed", "--sample-seed", "--eval-seed"]}


def argv(command, tiny_model, small_set):
    args = [str(small_set) if a == "SET" else a for a in COMMANDS[command]]
    if command in ("finetune", "run", "sample"):
        args += ["--model" if command == "sample" else "--init", str(tiny_model)]
    return args


@pytest.mark.parametrize("command,option", [(c, o) for c, opts in SEED_OPTIONS.items() for o in opts])
@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2**31)])
def test_seed_out_of_range_is_one_line_before_the_work(command, option, seed, tiny_model, small_set, tmp_path,
                                                       capsys):
    code = run_cli(*argv(command, tiny_model, small_set), option, seed, "--out", tmp_path / "out")
    one_line(capsys, code, option, "0 to 2147483647")
    assert listing(tmp_path) == []


def test_largest_seed_is_accepted(small_set, tmp_path, capsys):
    assert run_cli("select", "--data", "digits", "--ipc", "1", "--seed", 2**31 - 1, "--out", tmp_path / "s") == 0


@pytest.mark.parametrize("where", ["file", "inside a file"])
@pytest.mark.parametrize("command", ["pretrain", "finetune", "run", "bench"])
def test_latent_cache_that_cannot_be_a_folder_is_refused_before_the_work(command, where, tiny_model, small_set,
                                                                         tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    cache = blocker if where == "file" else blocker / "cache"
    t0 = time.perf_counter()
    code = run_cli(*argv(command, tiny_model, small_set), "--latent-cache", cache, "--out", tmp_path / "out")
    one_line(capsys, code, "--latent-cache")
    assert time.perf_counter() - t0 < 10 and listing(tmp_path) == ["afile"]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("length", [300, 250])
def test_too_long_out_name_is_one_line(command, length, tiny_model, small_set, tmp_path, capsys):
    """300 bytes cannot be a name at all; 250 can, but its hidden .<name>.partial-<pid> sibling cannot."""
    code = run_cli(*argv(command, tiny_model, small_set), "--out", tmp_path / ("a" * length))
    one_line(capsys, code, "--out", "bytes long")
    assert listing(tmp_path) == []


def test_too_long_out_path_is_one_line(tmp_path, capsys):
    deep = tmp_path.joinpath(*["b" * 200] * 20)
    code = run_cli("select", "--data", "digits", "--ipc", "1", "--out", deep)
    one_line(capsys, code, "--out", "path is")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("k", [100000, 400])
def test_bench_coverage_k_beyond_the_test_images_is_refused_before_the_work(k, tmp_path, capsys):
    """digits has about 36 test images per class: a k that leaves no k-NN radius fails before sets, cells or
    timings are made, naming --coverage-k and how far to lower it."""
    t0 = time.perf_counter()
    code = run_cli("bench", "--data", "digits", "--method", "random", "--ipc", "1", "--eval-net", "convnet1",
                   "--eval-repeats", "1", "--eval-epochs", "1", "--feature-epochs", "1", "--coverage-k", k,
                   "--out", tmp_path / "b")
    one_line(capsys, code, "--coverage-k", "lower")
    assert time.perf_counter() - t0 < 20 and listing(tmp_path) == []
