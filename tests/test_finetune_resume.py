"""A resumed fine-tuning run ends bit-identical to an uninterrupted one: weights, EMA, optimiser,
memories (with their derived Gram state) and the metrics log, after a clean stop and after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memdistill.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def finetune_args(init, out, steps, *extra):
    return ["finetune", "--data", "digits", "--init", str(init), "--out", str(out), "--batch-size", "8",
            "--steps", str(steps), "--mem-real", "4", "--mem-gen", "3", "--log-every", "1", "--device", "cpu",
            "--no-progress", *map(str, extra)]


def state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(ref: Path, other: Path, steps: int) -> None:
    a, b = state(ref), state(other)
    assert a["step"] == b["step"] == steps
    # ("rng", the global generator's state, is left out: every random draw of a step comes from its
    # own (seed, step) generator, and what the global one holds depends on the process's history.)
    for key in ("model", "ema", "opt", "memories", "config"):
        assert_same_tensors(a[key], b[key], key)
    assert a["memories"] is not None and a["memories"]["real"]  # memories were there to compare
    wa, wb = load_file(ref / "export" / "model.safetensors"), load_file(other / "export" / "model.safetensors")
    assert_same_tensors(wa, wb, "export")
    # The log: each step once, the same values (step_time aside).
    ra, rb = ([{k: v for k, v in json.loads(line).items() if k != "step_time"}
               for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (ref, other))
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    assert ra == rb


@pytest.mark.parametrize("memory", ["adaptive", "fifo"])
def test_resume_from_a_clean_stop_equals_a_straight_run(tiny_model, tmp_path, memory):
    ref, split = tmp_path / "straight", tmp_path / "split"
    assert main(finetune_args(tiny_model, ref, 20, "--memory", memory, "--checkpoint-every", 7)) == 0
    assert main(finetune_args(tiny_model, split, 10, "--memory", memory, "--checkpoint-every", 7)) == 0
    assert state(split)["step"] == 10
    assert main(finetune_args(tiny_model, split, 20, "--memory", memory, "--checkpoint-every", 7, "--resume")) == 0
    assert_same_run(ref, split, 20)


@pytest.mark.slow
def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_model, tmp_path):
    steps, args = 150, ["--memory", "adaptive", "--checkpoint-every", "4"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(finetune_args(tiny_model, ref, steps, *args)) == 0

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "memdistill", *finetune_args(tiny_model, killed, steps, *args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped = state(killed)["step"]
    assert 4 <= stopped < steps and stopped % 4 == 0  # killed mid-way, at one of its checkpoints
    assert not (killed / "export").exists()

    assert main(finetune_args(tiny_model, killed, steps, *args, "--resume")) == 0
    assert_same_run(ref, killed, steps)
