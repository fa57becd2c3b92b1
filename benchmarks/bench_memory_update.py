"""Time one memory update at paper shapes: adaptive (incremental) vs fifo vs the naive adaptive rule.

    PYTHONPATH=src python benchmarks/bench_memory_update.py [--reps 200] [--threads N]

Each repetition starts from a copy of the same full memory (copying is not timed) and adds the
same new batch. Machines are shared and noisy: read the ratios, all measured in this one run.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from memdistill.memory import MemoryBank, naive_adaptive_keep


def median_seconds(make_state, run, reps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + reps):
        state = make_state()
        t0 = time.perf_counter()
        run(state)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def full_bank(strategy: str, capacity: int, shape, batch: int, gen: torch.Generator) -> MemoryBank:
    bank = MemoryBank(capacity, strategy)
    while len(bank) < capacity:
        bank.add(torch.randn(batch, *shape, generator=gen))
    bank.add(torch.randn(batch, *shape, generator=gen))  # past capacity once, so evictions have happened
    return bank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity", type=int, default=64)
    p.add_argument("--new", type=int, default=8, help="latents added per update (the batch's class share)")
    p.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32], help="latent shape")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    gen = torch.Generator().manual_seed(args.seed)
    templates = {s: full_bank(s, args.capacity, args.shape, args.new, gen) for s in ("adaptive", "fifo")}
    new = torch.randn(args.new, *args.shape, generator=gen)

    def timed_add(strategy):
        return median_seconds(
            lambda: copy.deepcopy(templates[strategy]), lambda bank: bank.add(new), args.reps, args.warmup
        )

    def naive(entries):
        merged = torch.cat([entries, new])
        return merged[naive_adaptive_keep(merged, args.capacity)]

    t_adaptive = timed_add("adaptive")
    t_fifo = timed_add("fifo")
    base = templates["adaptive"].tensor()
    t_naive = median_seconds(lambda: base, naive, args.reps, args.warmup)

    # Same start, same batch: the incremental and naive rules must keep the same entries.
    check = copy.deepcopy(templates["adaptive"])
    check.add(new)
    same = torch.equal(check.tensor(), naive(base))

    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
          + f", torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"update: {args.new} new latents of {'x'.join(map(str, args.shape))} into a full memory of "
          f"{args.capacity}; median of {args.reps} after {args.warmup} warm-up")
    print(f"adaptive (incremental): {t_adaptive * 1e3:8.3f} ms")
    print(f"fifo:                   {t_fifo * 1e3:8.3f} ms")
    print(f"adaptive (naive):       {t_naive * 1e3:8.3f} ms")
    print(f"ratio adaptive/fifo:    {t_adaptive / t_fifo:8.2f}")
    print(f"ratio naive/adaptive:   {t_naive / t_adaptive:8.2f}")
    print(f"incremental keeps the same entries as naive: {same}")


if __name__ == "__main__":
    main()
