"""Device-to-host syncs per fine-tuning step, counted on any machine.

    PYTHONPATH=src python benchmarks/bench_host_syncs.py [--steps 40] [--memory-max-t 500]

On a GPU every conversion of a device tensor to a host value (`.item()`, `.tolist()`, `int()`, `float()`,
`bool()`, `.cpu()`, `nonzero`, `unique`) waits for the queue to drain, and a float64 schedule table copied to
the device on every call is a host-to-device copy per call. On the CPU nothing waits, but the same calls
happen, so this script counts them: it patches those methods, counts the calls made from memdistill's own
source files (torch internals such as AdamW's host-side step counter are not device syncs), and splits the
count per training step at each call of `train.step_draws`. Plain steps are the ones that neither log nor
save (logging and saving happen once, at the end, here). On CUDA it also runs with
`torch.cuda.set_sync_debug_mode("warn")` and counts torch's own sync warnings.

Measured on this repository's CPU machine (synthetic data: 10 classes, 4x8x8 latents, batch 8, DiT-Tiny/4,
40 steps), median per plain step:
    before issue 14.10: adaptive 55, fifo 43, none 0 syncs; 11 float64 table copies per step in every mode
    after:              adaptive  3, fifo  2, none 0 syncs (+1 with --memory-max-t); 0 table copies
(after: `memory_loss` reads the labels; `ClassMemories.update` reads them and, adaptive, every bank's new
Gram rows in one transfer; the logged values are read only at log steps.)
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import memdistill
import memdistill.train as train
from memdistill.latents import LatentPosterior
from memdistill.models.dit import build_dit
from memdistill.train import TrainConfig, TrainData, run_training

PACKAGE = str(Path(memdistill.__file__).resolve().parent)
METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "nonzero")
FUNCTIONS = ("unique", "nonzero")


def _float64_to_device(args, kwargs) -> bool:
    """A `.to` call that moves a float64 tensor to a device (a host-to-device copy when that is a GPU)."""
    wants_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
    return args[0].dtype == torch.float64 and wants_device


class SyncCounter:
    """Counts host conversions made from memdistill's source files, per call site, and marks step starts."""

    def __init__(self):
        self.sites: list[str] = []  # one entry per counted call, in order
        self.tables: list[str] = []  # float64 tables moved with .to(device) (host-to-device copies on CUDA)
        self.step_starts: list[tuple[int, int]] = []  # (len(sites), len(tables)) at each step's start
        self._saved: list[tuple[object, str, object]] = []

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        name = frame.f_code.co_filename
        if not name.startswith(PACKAGE):
            return None
        return f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"

    def _wrap(self, owner, name: str, log: list[str], only_float64: bool = False) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            site = self._caller()
            if site is not None and (not only_float64 or _float64_to_device(args, kwargs)):
                log.append(site)
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self):
        for name in METHODS:
            self._wrap(torch.Tensor, name, self.sites)
        for name in FUNCTIONS:
            self._wrap(torch, name, self.sites)
        self._wrap(torch.Tensor, "to", self.tables, only_float64=True)
        draws = train.step_draws

        def marked(*args, **kwargs):
            self.step_starts.append((len(self.sites), len(self.tables)))
            return draws(*args, **kwargs)

        self._saved.append((train, "step_draws", draws))
        train.step_draws = marked
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def plain_steps(self) -> list[tuple[list[str], int]]:
        """(call sites, table copies) of every step but the last (which logs and saves)."""
        bounds = self.step_starts
        return [(self.sites[a:b], tb - ta) for (a, ta), (b, tb) in zip(bounds, bounds[1:])]


def synthetic_data(classes: int = 10, per_class: int = 12, shape=(4, 8, 8)) -> TrainData:
    g = torch.Generator().manual_seed(0)
    n = classes * per_class
    return TrainData(LatentPosterior(torch.randn(n, 1, *shape, generator=g)), torch.arange(n) % classes,
                     [f"c{k}" for k in range(classes)], list(range(classes)), "synthetic", {"name": "pixel"}, shape)


def count(memory: str, steps: int, memory_max_t: int | None, device: str) -> SyncCounter:
    data = synthetic_data()
    torch.manual_seed(0)
    model = build_dit("DiT-Tiny/4", input_size=8, in_channels=4, num_classes=10)
    cfg = TrainConfig(memory=memory, steps=steps, batch_size=8, log_every=10**9, checkpoint_every=10**9,
                      device=device, progress=False, memory_max_t=memory_max_t, stage="bench")
    with tempfile.TemporaryDirectory() as tmp, SyncCounter() as counter:
        run_training(cfg, Path(tmp) / "run", model, data)
    return counter


def cuda_sync_warnings(memory: str, steps: int, memory_max_t: int | None) -> float:
    """Median torch sync-debug warnings per step on CUDA (all sources, torch internals included)."""
    starts: list[int] = []
    draws = train.step_draws

    def marked(*args, **kwargs):
        starts.append(len(caught))
        return draws(*args, **kwargs)

    train.step_draws = marked
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            count(memory, steps, memory_max_t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        train.step_draws = draws
    return statistics.median(b - a for a, b in zip(starts, starts[1:]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="steps per run (memories fill after a few)")
    p.add_argument("--memory-max-t", type=int, default=None, help="also filter by timestep, as --memory-max-t")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    for memory in ("adaptive", "fifo", "none"):
        counter = count(memory, args.steps, args.memory_max_t, "cpu")
        per_step = counter.plain_steps()
        syncs = [len(sites) for sites, _ in per_step]
        tables = [n for _, n in per_step]
        print(f"{memory:8s} host syncs per plain step: median {statistics.median(syncs):g}, max {max(syncs)}; "
              f"float64 table copies per step: median {statistics.median(tables):g}")
        busiest = max(per_step, key=lambda s: len(s[0]))[0]
        for site, n in collections.Counter(busiest).most_common():
            print(f"    {n:3d}  {site}")
        if torch.cuda.is_available():
            print(f"         CUDA sync-debug warnings per step (median): "
                  f"{cuda_sync_warnings(memory, args.steps, args.memory_max_t):g}")


if __name__ == "__main__":
    main()
