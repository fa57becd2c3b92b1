"""Threads, wait policy, allocator and precision: chosen, validated, recorded, and (where arranged) without
effect on results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memdistill import runtime
from memdistill.bench import BenchConfig, config_from_namespace
from memdistill.cli import build_parser, main
from memdistill.errors import UserError
from memdistill.evaluate import EvalConfig, epochs_for_ipc, resolved_epochs, train_and_test
from memdistill.sample import SampleConfig, load_sampler

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.parametrize("cores, load, expected", [(2, 0.0, 2), (2, 0.3, 2), (2, 0.7, 1), (2, 1.2, 1), (2, 9.0, 1),
                                                   (16, 3.4, 13), (1, 0.0, 1)])
def test_auto_threads_uses_the_free_cores(cores, load, expected):
    assert runtime.auto_threads(cores, load) == expected


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), ("AUTO", None), ("3", 3), (2, 2)])
def test_parse_threads(value, expected):
    assert runtime.parse_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", 0])
def test_parse_threads_rejects(value):
    with pytest.raises(UserError, match="--threads must be a positive integer or auto"):
        runtime.parse_threads(value)


@pytest.mark.parametrize("argv", [["--threads", "0", "select"], ["select", "--threads", "x"],
                                  ["evaluate", "--train", "t", "--threads", "-2"]])
def test_cli_rejects_bad_threads(argv, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if "select" in argv else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads must be a positive integer or auto" in err[0]


def test_cli_rejects_bad_threads_env(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDISTILL_THREADS", "many")
    assert main(["select", "--data", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "MEMDISTILL_THREADS must be a positive integer or auto" in capsys.readouterr().err


def test_every_subcommand_accepts_threads():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        assert "--threads" in sub.choices[name]._option_string_actions, name
    assert parser.parse_args(["--threads", "2", "select"]).threads == "2"
    assert parser.parse_args(["select", "--threads", "auto"]).threads == "auto"
    assert not hasattr(parser.parse_args(["select"]), "threads")


def test_threads_are_set_and_recorded_in_the_manifest(tmp_path):
    try:
        assert main(["--threads", "2", "select", "--data", "digits", "--ipc", "1", "--out", str(tmp_path / "s")]) == 0
        assert torch.get_num_threads() == 2
        rt = json.loads((tmp_path / "s" / "manifest.json").read_text())["versions"]["runtime"]
        assert rt["threads"] == 2 and rt["threads_source"] == "--threads"
        assert rt["wait_policy"] == os.environ["OMP_WAIT_POLICY"]
    finally:
        torch.set_num_threads(1)


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1")
    env.pop("OMP_WAIT_POLICY", None)
    env.update(kw)
    return env


def test_auto_sets_passive_wait_before_torch_loads(tmp_path):
    # In a fresh process nothing but the default is given: the policy must be in place before torch loads.
    env = _env()
    env.pop("OMP_NUM_THREADS")
    out = tmp_path / "s"
    subprocess.run([sys.executable, "-m", "memdistill", "select", "--data", "digits", "--ipc", "1", "--out", str(out)],
                   env=env, check=True, capture_output=True)
    rt = json.loads((out / "manifest.json").read_text())["versions"]["runtime"]
    assert rt["wait_policy"] == "passive" and rt["wait_policy_effective"] is True
    assert rt["threads_source"] == "auto" and 1 <= rt["threads"] <= rt["cores"]
    assert rt["malloc"] == "tuned"


# Trains the evaluation classifier with the real loop and prints a hash of its final weights.
TRAIN_SNIPPET = r"""
import hashlib, json, sys
from memdistill import runtime
runtime.prepare_environment()
import torch
import memdistill.evaluate as ev
torch.set_num_threads(1)
models, real = [], ev.build_net
ev.build_net = lambda *a, **k: models.append(real(*a, **k)) or models[-1]
g = torch.Generator().manual_seed(0)
x, y = torch.rand(40, 1, 16, 16, generator=g) * 2 - 1, torch.arange(40) % 10
tx, ty = torch.rand(50, 1, 16, 16, generator=g) * 2 - 1, torch.arange(50) % 10
r = ev.train_and_test(x, y, tx, ty, 10, ev.EvalConfig(net="convnet3", epochs=3, batch_size=16), seed=0)
weights = b"".join(p.detach().numpy().tobytes() for p in models[0].parameters())
print(json.dumps({"hash": hashlib.sha256(weights).hexdigest(), "history": r["history"],
                  "malloc": runtime.runtime_info()["malloc"]}))
"""


def test_allocator_setting_leaves_fp32_results_bit_identical():
    runs = {}
    for mode in ("tuned", "default"):
        done = subprocess.run([sys.executable, "-c", TRAIN_SNIPPET], env=_env(MEMDISTILL_MALLOC=mode),
                              check=True, capture_output=True, text=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["tuned"]["malloc"] == "tuned" and runs["default"]["malloc"] == "default"
    assert runs["tuned"]["hash"] == runs["default"]["hash"]
    assert runs["tuned"]["history"] == runs["default"]["history"]


def test_bad_allocator_mode_is_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "memdistill", "select", "--out", str(tmp_path / "s")],
                          env=_env(MEMDISTILL_MALLOC="jemalloc"), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["memdistill: error: MEMDISTILL_MALLOC must be one of tuned, default, "
                                                "got 'jemalloc'"]


# ----- precision and compile ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets") / "s"
    assert main(["select", "--data", "digits", "--ipc", "1", "--out", str(folder)]) == 0
    return folder


@pytest.mark.parametrize("argv", [["evaluate", "--train", "SET", "--test", "digits", "--precision", "fp16"],
                                  ["sample", "--precision", "half"],
                                  ["run", "--eval-precision", "fp64"], ["run", "--sample-precision", "int8"],
                                  ["bench", "--eval-precision", "bfloat16"],
                                  ["finetune", "--data", "digits", "--precision", "fp16"],
                                  ["pretrain", "--data", "digits", "--precision", "TF32"],
                                  ["run", "--data", "digits", "--precision", "half"]])
def test_bad_precision_is_one_line_and_exit_2(argv, capsys, tmp_path, digit_set):
    argv = [str(digit_set) if a == "SET" else a for a in argv]
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    option = next(a for a in argv if a.endswith("precision"))  # named as the user typed it (--eval-precision)
    assert len(err) == 1 and f"{option} must be one of auto, fast, fp32, tf32, bf16" in err[0], err
    assert not (tmp_path / "o").exists()


def _tiny_data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.arange(20) % 10
    return x, y, torch.rand(30, 1, 8, 8, generator=g) * 2 - 1, torch.arange(30) % 10


def test_bf16_and_compile_train_and_are_recorded(tmp_path, digit_set, monkeypatch):
    # through the CLI: a selected set, evaluated in bf16 with a compiled forward. Compiling takes over a minute
    # on 2 cores, so torch.compile is replaced by a recorder here (benchmarks/bench_cpu.py runs the real one).
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    assert main(["evaluate", "--train", str(digit_set), "--test", "digits", "--net", "convnet1", "--epochs", "2",
                 "--repeats", "1", "--precision", "bf16", "--compile", "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert result["config"]["precision"] == "bf16" and result["config"]["compile"] is True
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert result["runtime"]["threads"] == torch.get_num_threads()
    assert 0 <= result["best_mean"] <= 100 and len(result["per_repeat"]) == 1


def test_bf16_test_checks_agree_with_fp32():
    x, y, tx, ty = _tiny_data()
    base = EvalConfig(net="convnet1", epochs=4, batch_size=8, eval_every=1)
    fp32 = train_and_test(x, y, tx, ty, 10, base, seed=0)["history"]
    bf16 = train_and_test(x, y, tx, ty, 10, EvalConfig(**{**base.__dict__, "precision": "bf16"}), seed=0)["history"]
    assert [e for e, _ in bf16] == [e for e, _ in fp32]  # the protocol's check schedule is unchanged
    # a few test images may flip class after 4 bf16 steps, not most of them
    assert max(abs(a - b) for (_, a), (_, b) in zip(fp32, bf16)) <= 100 * 6 / 30


def test_bf16_sampling_is_close_to_fp32(tmp_path):
    from test_sample import make_export

    export = make_export(tmp_path / "export")
    base = dict(model=str(export), ipc=2, steps=3, cfg_scale=2.0, seed=0, device="cpu")
    jobs = [(c, i) for c in range(3) for i in range(2)]
    fp32 = load_sampler(SampleConfig(**base)).images(SampleConfig(**base), jobs)
    cfg16 = SampleConfig(**base, precision="bf16")
    bf16 = load_sampler(cfg16).images(cfg16, jobs)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert not torch.equal(fp32, bf16)  # bf16 did run
    assert (fp32 - bf16).abs().mean() < 0.05


# ----- the protocol's epochs by default ---------------------------------------------------------------------
def test_protocol_table():
    assert [epochs_for_ipc(k) for k in (1, 10, 50, 200, 500, 1000)] == [3000, 2000, 1500, 1000, 500, 300]


@pytest.mark.parametrize("ipc, epochs", [(1, 3000), (10, 2000), (50, 1500)])
def test_evaluate_and_bench_default_to_the_protocol_epochs(ipc, epochs):
    labels = torch.arange(10).repeat(ipc)
    evaluate_args = build_parser().parse_args(["evaluate", "--train", "x"])
    assert resolved_epochs(EvalConfig(epochs=evaluate_args.epochs), labels) == epochs
    bench_cfg = config_from_namespace(build_parser().parse_args(["bench"]))
    assert resolved_epochs(bench_cfg.eval, labels) == epochs
    assert resolved_epochs(BenchConfig().eval, labels) == epochs
    override = config_from_namespace(build_parser().parse_args(["bench", "--eval-epochs", "7"]))
    assert resolved_epochs(override.eval, labels) == 7


# ----- precision of fine-tuning -----------------------------------------------------------------------------
def test_auto_precision_is_tf32_on_cuda_and_fp32_elsewhere():
    from memdistill.runtime import resolve_precision

    assert [resolve_precision(p, "cuda") for p in ("auto", "fp32", "tf32", "bf16")] == ["tf32", "fp32", "tf32", "bf16"]
    assert [resolve_precision(p, "cpu") for p in ("auto", "fp32", "tf32", "bf16")] == ["fp32", "fp32", "fp32", "bf16"]


def test_tf32_flags_are_set_on_cuda_only_and_put_back():
    from memdistill.runtime import autocast, matmul_precision

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    for precision, inside in (("tf32", (True, True)), ("auto", (True, True)), ("fp32", (False, False))):
        with matmul_precision("cuda", precision):
            assert flags() == inside
        assert flags() == before
    with autocast("cuda", "fp32"):
        assert flags() == (False, False)
    with matmul_precision("cpu", "tf32"), autocast("cpu", "tf32"):
        assert flags() == before and not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")


def _finetune(tiny_model, out, *extra):
    from test_finetune_resume import finetune_args

    return main(finetune_args(tiny_model, out, 4, "--memory", "adaptive", "--checkpoint-every", 4, *extra))


def _losses(out):
    return [json.loads(line)["diffusion"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_fine_tuning_is_close_to_fp32_and_recorded(tiny_model, tmp_path, monkeypatch):
    import memdistill.losses as losses

    seen = []
    real = losses.memory_loss

    def memory_loss(pred, labels, memories, *args, **kwargs):
        seen.append(pred.dtype)
        return real(pred, labels, memories, *args, **kwargs)

    monkeypatch.setattr(losses, "memory_loss", memory_loss)
    assert _finetune(tiny_model, tmp_path / "fp32") == 0
    assert _finetune(tiny_model, tmp_path / "bf16", "--precision", "bf16") == 0
    assert seen == [torch.float32] * 8  # the memory losses (and updates) get fp32 predictions under bf16 too
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert fp32 != bf16  # bf16 did run
    assert all(abs(a - b) <= 0.02 * abs(a) for a, b in zip(fp32, bf16)), (fp32, bf16)
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["config"]["precision"] == "bf16"
    manifest = json.loads((tmp_path / "fp32" / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["config"]["precision"] == "auto"  # auto on the CPU
    # the memories hold fp32 entries
    last = torch.load(tmp_path / "bf16" / "checkpoints" / "last.pt", weights_only=True)
    entries = [b["entries"] for kind in ("real", "gen") for b in last["memories"][kind].values()
               if b.get("entries") is not None]
    assert entries and all(e.dtype == torch.float32 for e in entries)


def test_tf32_on_the_cpu_is_fp32_and_says_so(tiny_model, tmp_path, caplog):
    assert _finetune(tiny_model, tmp_path / "fp32", "--precision", "fp32") == 0
    with caplog.at_level("WARNING"):
        assert _finetune(tiny_model, tmp_path / "tf32", "--precision", "tf32") == 0
    assert any("tf32 applies to CUDA only" in r.getMessage() for r in caplog.records)
    assert _losses(tmp_path / "fp32") == _losses(tmp_path / "tf32")
    assert json.loads((tmp_path / "tf32" / "manifest.json").read_text())["precision"] == "fp32"


def test_memory_format_is_channels_last_for_bf16_on_a_cpu_only():
    import torch

    from memdistill.runtime import memory_format

    assert memory_format("cpu", "bf16") == torch.channels_last
    for precision in ("fp32", "auto", "tf32"):
        assert memory_format("cpu", precision) == torch.contiguous_format
    assert memory_format("cuda", "bf16") == torch.contiguous_format  # not measured there: the default layout


def test_fast_precision_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch):
    # run evaluates at "fast": without AVX512-BF16 or AMX, oneDNN emulates bf16 and it can be slower than fp32;
    # on CUDA, fast is auto (tf32). The default does not depend on the host, so --resume moves between hosts.
    import torch

    from memdistill import runtime
    from memdistill.run import RunConfig

    assert RunConfig().eval.precision == "fast"
    for bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert runtime.cpu_has_bf16() is (bf16 or amx)
        assert runtime.resolve_precision("fast", "cpu") == expected
        assert runtime.resolve_precision("fast", "cuda") == "tf32"
        assert runtime.memory_format("cpu", "fast") == (torch.channels_last if expected == "bf16"
                                                         else torch.contiguous_format)
