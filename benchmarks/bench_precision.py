"""bf16 against fp32, paired: is bf16 autocast's top-1 within the spread over classifier seeds? (issue: use the
CPU well, item 4: bf16 becomes a default only where it is.)

    python benchmarks/bench_precision.py            # mnist5k, IPC 1, 10, 50; about 36 min of one free core
    python benchmarks/bench_precision.py --quick    # seconds: the 8x8 digits, a few epochs (a smoke test)

For each IPC the train set is the random real selection with select seed 0 (`memdistill select --method random`,
the bench's Random set); each classifier seed trains a ConvNet-3 twice, in fp32 and under bf16 autocast (eager,
no compile), from the same initialisation and the same shuffling and augmentation draws, so the difference of a
pair is the precision's alone plus the chaos of training. Printed per IPC: each seed's best top-1 in both
precisions, the paired differences bf16 - fp32 with their mean ± sample std, the fp32 spread over seeds (sample
std and range), and the wall-time ratio fp32 / bf16. "Within the spread" means: |mean paired difference| <= the
fp32 sample std over seeds.

Epochs: the protocol's at IPC 1 (3000); at IPC 10 and 50 reduced budgets (300 and 60 instead of 2000 and 1500;
the measured run took 36 min of CPU time, 53 min wall on the loaded machine, see docs/benchmarks.md); the output
says which were used.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

# Reduced epochs where the protocol's would take hours on one thread (None: the protocol's).
REDUCED_EPOCHS = {1: None, 10: 300, 50: 60}
PRECISIONS = ("fp32", "bf16")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for a single value) of a non-empty list."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def random_real_set(dataset: str, ipc: int, seed: int = 0):
    """(images (K*ipc, C, H, W) in [-1, 1], labels (K*ipc,)) of the random real selection of ``ipc`` images per
    class with select seed ``seed``: the images `memdistill select --method random --seed seed` writes."""
    import torch

    from memdistill.baselines import select_indices
    from memdistill.data import load_tensors, open_dataset

    train = open_dataset(dataset, "train")
    images, labels = load_tensors(train)
    flat = [i for picks in select_indices("random", train, ipc, seed) for i in picks]
    index = torch.tensor(flat)
    return images[index], labels[index]


def paired_runs(dataset: str, ipc: int, epochs: int | None, seeds: list[int]) -> list[dict]:
    """For each classifier seed: best top-1 % and wall seconds of one evaluation in fp32 and in bf16.

    epochs None: the protocol's for ``ipc``. Returns [{seed, fp32, bf16, fp32_s, bf16_s}] in seed order."""
    from memdistill.data import load_tensors, open_dataset
    from memdistill.evaluate import EvalConfig, train_and_test, with_default_flip

    train_x, train_y = random_real_set(dataset, ipc)
    test_x, test_y = load_tensors(open_dataset(dataset, "test"))
    num_classes = int(train_y.max()) + 1
    for precision in PRECISIONS:  # one-epoch warm-up so that the first timed run does not pay for lazy set-up
        warm = with_default_flip(EvalConfig(epochs=1, precision=precision, device="cpu", repeats=1), dataset)
        train_and_test(train_x, train_y, test_x, test_y, num_classes, warm, seeds[0])
    rows = []
    for seed in seeds:
        row: dict = {"seed": seed}
        for precision in PRECISIONS:
            config = with_default_flip(EvalConfig(epochs=epochs, precision=precision, device="cpu", repeats=1),
                                       dataset)
            t0 = time.perf_counter()
            row[precision] = train_and_test(train_x, train_y, test_x, test_y, num_classes, config, seed)["best"]
            row[f"{precision}_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Paired statistics of paired_runs' rows: diffs (bf16 - fp32, points), their mean and std, fp32 mean/std/
    range over seeds, the wall-time ratio fp32 / bf16 (> 1: bf16 faster) and whether bf16 is within the spread
    (|mean difference| <= fp32 std)."""
    diffs = [r["bf16"] - r["fp32"] for r in rows]
    diff_mean, diff_std = mean_std(diffs)
    fp32_mean, fp32_std = mean_std([r["fp32"] for r in rows])
    bf16_mean, bf16_std = mean_std([r["bf16"] for r in rows])
    ratio = sum(r["fp32_s"] for r in rows) / sum(r["bf16_s"] for r in rows)
    return {"diffs": diffs, "diff_mean": diff_mean, "diff_std": diff_std, "fp32_mean": fp32_mean,
            "fp32_std": fp32_std, "fp32_range": max(r["fp32"] for r in rows) - min(r["fp32"] for r in rows),
            "bf16_mean": bf16_mean, "bf16_std": bf16_std, "time_ratio": ratio,
            "within": abs(diff_mean) <= fp32_std}


def report(ipc: int, epochs: int, protocol: int, rows: list[dict], stats: dict) -> str:
    """The printed block of one IPC."""
    budget = "the protocol's" if epochs == protocol else f"reduced from the protocol's {protocol}"
    lines = [f"## IPC {ipc}: {epochs} epochs ({budget})",
             f"{'seed':>4} {'fp32':>7} {'bf16':>7} {'bf16-fp32':>10} {'fp32 s':>8} {'bf16 s':>8}"]
    for r, d in zip(rows, stats["diffs"]):
        lines.append(f"{r['seed']:>4} {r['fp32']:7.2f} {r['bf16']:7.2f} {d:+10.2f} {r['fp32_s']:8.1f} "
                     f"{r['bf16_s']:8.1f}")
    lines += [f"mean fp32 {stats['fp32_mean']:.2f} ± {stats['fp32_std']:.2f} (range {stats['fp32_range']:.2f}), "
              f"bf16 {stats['bf16_mean']:.2f} ± {stats['bf16_std']:.2f}",
              f"paired bf16 - fp32: {stats['diff_mean']:+.2f} ± {stats['diff_std']:.2f} points "
              f"({', '.join(f'{d:+.2f}' for d in stats['diffs'])})",
              f"wall time fp32 / bf16: x{stats['time_ratio']:.2f}",
              f"bf16 within the fp32 spread (|mean diff| {abs(stats['diff_mean']):.2f} <= fp32 std "
              f"{stats['fp32_std']:.2f}): {'yes' if stats['within'] else 'NO'}"]
    return "\n".join(lines)


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"{option} must be comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, IPC 1 and 5, 4 epochs, 2 seeds: a smoke test")
    parser.add_argument("--ipc", default=None, help="IPCs, comma-separated (default 1,10,50; quick 1,5)")
    parser.add_argument("--epochs", default=None,
                        help="epochs per IPC, comma-separated, one per --ipc (default: 3000,300,60 -- the "
                             "protocol's at IPC 1, reduced at 10 and 50; quick 4 each)")
    parser.add_argument("--seeds", type=int, default=None, help="classifier seeds 0..n-1 (default 3; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    from memdistill import runtime

    runtime.prepare_environment()  # wait policy and allocator, as the CLI does (before torch loads, when run alone)
    import torch

    from memdistill.evaluate import epochs_for_ipc

    dataset = "digits" if args.quick else "mnist5k"
    ipcs = parse_ints(args.ipc or ("1,5" if args.quick else "1,10,50"), "--ipc")
    if args.epochs:
        epochs = parse_ints(args.epochs, "--epochs")
        if len(epochs) != len(ipcs):
            raise SystemExit(f"--epochs needs one value per --ipc ({len(ipcs)}), got {len(epochs)}")
    else:
        epochs = [4 if args.quick else (REDUCED_EPOCHS.get(k) or epochs_for_ipc(k)) for k in ipcs]
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print(f"# bench_precision: {dataset}, ConvNet-3, random real sets (select seed 0), classifier seeds "
              f"{seeds}, eager, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}")
        print("# best top-1 % of the periodic checks per seed; epochs per IPC: "
              + ", ".join(f"IPC {k} {e} (protocol {epochs_for_ipc(k)})" for k, e in zip(ipcs, epochs)))
        t0 = time.perf_counter()
        summary = []
        for ipc, n in zip(ipcs, epochs):
            rows = paired_runs(dataset, ipc, n, seeds)
            stats = summarize(rows)
            print(report(ipc, n, epochs_for_ipc(ipc), rows, stats), flush=True)
            summary.append((ipc, stats))
        print("## summary: IPC, paired bf16 - fp32 (mean ± std), fp32 std over seeds, within, time fp32/bf16")
        for ipc, s in summary:
            print(f"IPC {ipc:>3}: {s['diff_mean']:+.2f} ± {s['diff_std']:.2f}   fp32 std {s['fp32_std']:.2f}   "
                  f"{'within' if s['within'] else 'OUTSIDE'}   x{s['time_ratio']:.2f}")
        print(f"# total wall time {time.perf_counter() - t0:.0f} s")
    finally:
        torch.set_num_threads(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
