"""Two gloo processes (torchrun, CPU) fine-tune like one process with the same global batch: the same
memories, losses and weights up to float rounding (the per-rank forward runs on half the batch), and
only rank 0 writes files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memdistill.cli import main
from memdistill.finetune import finetune_defaults

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 8
LR = 1e-3  # the fine-tuning default


def finetune_args(init, out, *extra):
    return ["finetune", "--data", "digits", "--init", str(init), "--out", str(out), "--batch-size", "8",
            "--steps", str(STEPS), "--memory", "adaptive", "--mem-real", "4", "--mem-gen", "3", "--log-every", "1",
            "--checkpoint-every", "3", "--device", "cpu", "--no-progress", *map(str, extra)]


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("path", ["pixel", "latent"])
def test_two_gloo_processes_match_one_process(tiny_model, latent_pair, tmp_path, path):
    """Pixels, and the latent path with flipping, where every rank draws the global batch's flips and posterior
    samples from the step's generator (rank 0 encodes, rank 1 receives the statistics)."""
    assert finetune_defaults().lr == LR
    one, two = tmp_path / "one", tmp_path / "two"
    init, extra = tiny_model, []
    if path == "latent":
        vae, init = latent_pair
        extra = ["--codec", "vae", "--vae", vae, "--flip", "on"]
    assert main(finetune_args(init, one, *extra)) == 0

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "memdistill", *finetune_args(init, two, *extra)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Only rank 0 wrote: the same files as one process, one log line per step.
    assert files(two) == files(one) == {"config.json", "manifest.json", "metrics.jsonl", "checkpoints/last.pt",
                                        "export/model.safetensors", "export/config.json"}
    rows_one, rows_two = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                          for out in (one, two))
    assert [r["step"] for r in rows_two] == list(range(1, STEPS + 1))

    # The logged losses are those of the global batch.
    for a, b in zip(rows_one, rows_two):
        assert a["memory_sizes"] == b["memory_sizes"] and a["classes"] == b["classes"]
        for key in ("loss", "diffusion", "mse", "vb", "memory", "real", "gen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert rows_one[-1]["memory"] > 0

    sa, sb = (torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) for out in (one, two))
    assert sa["step"] == sb["step"] == STEPS
    for part in ("model", "ema"):
        for name, value in sa[part].items():
            other = sb[part][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias shifts every logit of a query equally, which softmax ignores: its true
                # gradient is 0 and what it gets is rounding noise, which Adam scales up to steps of
                # up to ~lr. Compare it within that bound, the query and value biases tightly.
                value, other = value.reshape(3, -1), other.reshape(3, -1)
                assert (value[1] - other[1]).abs().max() <= 2 * STEPS * LR, (part, name)
                value, other = value[0::2], other[0::2]
            assert torch.allclose(other, value, rtol=1e-4, atol=1e-6), (part, name)
    # Same memories: the same entries kept (the real ones exactly: they are data), up to rounding.
    ma, mb = sa["memories"], sb["memories"]
    for kind in ("real", "gen"):
        assert ma[kind].keys() == mb[kind].keys() and ma[kind]
        for c in ma[kind]:
            ea, eb = ma[kind][c]["entries"], mb[kind][c]["entries"]
            assert ea.shape == eb.shape
            if kind == "real":
                assert torch.equal(ea, eb), c
            else:
                assert torch.allclose(ea, eb, rtol=1e-4, atol=1e-4 * ea.abs().max().item()), c
