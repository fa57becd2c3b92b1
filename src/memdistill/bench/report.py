"""What the grid's and the sweep's reports share: their settings block, the note on epochs, the timings."""

from __future__ import annotations

import logging
from typing import Sequence

from .cells import _Bench

log = logging.getLogger(__name__)


def _settings(bench: _Bench) -> dict:
    cfg, ft = bench.cfg, bench.cfg.finetune
    return {"data": ft.data, "subset": ft.subset, "test": bench.test, "init": ft.init, "finetune_steps": ft.steps,
            "finetune_epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr, "lambda_real": ft.lambda_real,
            "lambda_gen": ft.lambda_gen, "mem_real": ft.mem_real, "mem_gen": ft.mem_gen,
            "memory_max_t": ft.memory_max_t, "seed": ft.seed,
            "sample_steps": cfg.sample.steps, "sampler": cfg.sample.sampler, "cfg_scale": cfg.sample.cfg_scale,
            "sample_seed": cfg.sample.seed, "repeats": cfg.repeats, "eval_epochs_option": cfg.eval.epochs,
            "eval_seed": cfg.eval.seed, "feature_net": cfg.feature_net, "feature_epochs": cfg.feature_epochs,
            "coverage_k": cfg.coverage_k}


def _epochs_note(cells: Sequence[dict], bench: _Bench) -> str:
    used = sorted({c["epochs"] for c in cells})
    text = (f"Each classifier was trained for {', '.join(map(str, used))} epochs and the table reports, per repeat, "
            f"the best test top-1 of the periodic checks, mean ± sample std over {bench.cfg.repeats} repeats "
            "(seeds eval seed, +1, ...).")
    if bench.cfg.eval.epochs is not None:
        text += (f" The epochs were fixed by --eval-epochs {bench.cfg.eval.epochs}; the paper's protocol trains "
                 "longer (3000/2000/1500 epochs at IPC 1/10/50), so absolute numbers are not comparable to it.")
    return text


def _timings_table(timings: dict[str, float]) -> str:
    """Seconds summed per kind of stage (the first word of each timing's name: finetune, sample, ...)."""
    from ..reports import markdown_table

    kinds: dict[str, list[float]] = {}
    for name, seconds in timings.items():
        kinds.setdefault(name.split()[0], []).append(seconds)
    return markdown_table(["stage", "count", "seconds"], [[k, len(v), f"{sum(v):.1f}"] for k, v in kinds.items()])
