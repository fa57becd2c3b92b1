"""Fine-tuning step time with memory adaptive / fifo / none, and one memory update at paper shapes.

    PYTHONPATH=src python benchmarks/bench_finetune.py [--steps 160] [--measure-from 100] [--rounds 4]
                                                       [--threads 1] [--clock cpu|wall]

The embedded default setting: the shipped mnist5k DiT if it is installed, else a freshly built
DiT-Tiny/4 on 1x28x28 with 10 classes (the step cost does not depend on the weights); data mnist5k,
batch 8, DiffFit. Each block is a real `run_training` call into a fresh folder; only the steps after
--measure-from count, when every class's memory is full (about 0.8 latents per class and step at
batch 8, so 64 entries after ~80 steps) and each update evicts, as in most of a real run.
Blocks of the three strategies alternate, in a rotated order each round, so machine noise hits all
three alike. Machines are shared and noisy: read the ratios, all measured in this one run.

--clock cpu (default) times each step by the CPU time of the training thread (the step_time that
run_training logs, with its clock swapped for time.thread_time): with one torch thread all of a
step's work runs on it, and time the core spends on other processes does not count. --clock wall
keeps the wall clock.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory_update import full_bank, median_seconds  # noqa: E402

from memdistill.finetune import finetune_defaults  # noqa: E402
from memdistill.models.dit import build_dit, set_trainable  # noqa: E402
from memdistill.pretrained import SHIPPED, shipped_path  # noqa: E402
from memdistill.train import load_train_data, run_training  # noqa: E402

STRATEGIES = ("adaptive", "fifo", "none")


def starting_model(data) -> tuple[torch.nn.Module, str]:
    from memdistill.models.io import load_dit

    path = shipped_path("mnist5k")
    if "mnist5k" in SHIPPED and (path / "model.safetensors").is_file():
        return load_dit(path), f"shipped mnist5k DiT ({path})"
    torch.manual_seed(0)
    c, h, _ = data.latent_shape
    model = build_dit("DiT-Tiny/4", input_size=h, in_channels=c, num_classes=len(data.class_names))
    return model, f"fresh DiT-Tiny/4 on {c}x{h}x{h}, {len(data.class_names)} classes (no shipped model installed)"


class _ThreadClock:
    """Stands in for the `time` module inside memdistill.train: perf_counter reads the thread's CPU time."""

    perf_counter = staticmethod(time.thread_time)


def block_step_times(cfg, model, data, measure_from: int) -> list[float]:
    """Per-step seconds of one run after `measure_from` steps (logged by run_training itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_training(cfg, Path(tmp) / "run", copy.deepcopy(model), data)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if r["step"] > measure_from]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=160, help="steps per block")
    p.add_argument("--measure-from", type=int, default=100, help="steps of each block not timed (memories filling)")
    p.add_argument("--rounds", type=int, default=4, help="blocks per strategy")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine has 2 shared cores)")
    p.add_argument("--update-reps", type=int, default=200)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="what a step's time is (see above)")
    args = p.parse_args()
    if args.clock == "cpu":
        import memdistill.train

        memdistill.train.time = _ThreadClock
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.WARNING)

    base = dataclasses.replace(finetune_defaults(), device="cpu", progress=False, log_every=1,
                               checkpoint_every=10**9, steps=args.steps, stage="finetune")
    data = load_train_data(base)
    model, described = starting_model(data)
    trainable = set_trainable(model, base.train)

    # Warm-up: one short block per strategy (allocator, first-call costs), not counted.
    for m in STRATEGIES:
        block_step_times(dataclasses.replace(base, memory=m, steps=20), model, data, 10)
    times: dict[str, list[float]] = {m: [] for m in STRATEGIES}
    for r in range(args.rounds):
        order = STRATEGIES[r % 3:] + STRATEGIES[:r % 3]
        for m in order:
            times[m] += block_step_times(dataclasses.replace(base, memory=m), model, data, args.measure_from)

    # One memory update at paper shapes (8 new latents of 4x32x32 into a full memory of 64).
    gen = torch.Generator().manual_seed(0)
    shape, new_n, cap = (4, 32, 32), 8, 64
    templates = {s: full_bank(s, cap, shape, new_n, gen) for s in ("adaptive", "fifo")}
    new = torch.randn(new_n, *shape, generator=gen)
    update = {s: median_seconds(lambda s=s: copy.deepcopy(templates[s]), lambda bank: bank.add(new),
                                args.update_reps, 20) for s in templates}

    med = {m: statistics.median(v) for m, v in times.items()}
    mean = {m: statistics.fmean(v) for m, v in times.items()}
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
          + f", torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {described}; {trainable:,} trainable ({base.train}); data {base.data}, "
          f"{len(data.targets)} images; batch {base.batch_size}; N_R = {base.mem_real}, N_G = {base.mem_gen}")
    print(f"{args.rounds} interleaved blocks per strategy of {args.steps} steps, timing steps "
          f"{args.measure_from + 1}..{args.steps} (memories full): {len(times['none'])} steps each, "
          f"{'CPU time of the training thread' if args.clock == 'cpu' else 'wall clock'}")
    for m in STRATEGIES:
        print(f"step time {m:9s} median {med[m] * 1e3:7.3f} ms   mean {mean[m] * 1e3:7.3f} ms")
    for m in ("adaptive", "fifo"):
        print(f"ratio {m}/none   median {med[m] / med['none']:5.3f}   mean {mean[m] / mean['none']:5.3f}"
              "   (target <= 1.10)")
    print(f"memory update at paper shapes ({new_n} x {'x'.join(map(str, shape))} into a full memory of {cap}), "
          f"median of {args.update_reps}: adaptive {update['adaptive'] * 1e3:.3f} ms, fifo {update['fifo'] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
