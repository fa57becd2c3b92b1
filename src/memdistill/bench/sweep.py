"""The sensitivity sweep of the paper's Figure 4: accuracy at one IPC against lambda_real, lambda_gen and the
memory size N_R = N_G."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..manifest import write_json_atomic
from ..train import TrainConfig
from .cells import _Bench
from .config import SWEEP_PARAMETERS
from .report import _epochs_note, _settings, _timings_table
from .tables import SWEEP_AXIS, sweep_plot

log = logging.getLogger(__name__)


# ----- the sensitivity sweep ------------------------------------------------------------------------------------
def _sweep_config(base: TrainConfig, parameter: str, value) -> TrainConfig:
    if parameter == "memory":
        return dataclasses.replace(base, mem_real=int(value), mem_gen=int(value))
    return dataclasses.replace(base, **{parameter: float(value)})


def _run_sweep(bench: _Bench) -> Path:
    from ..reports import markdown_table, pm

    cfg, out = bench.cfg, bench.out
    base = dataclasses.replace(cfg.finetune, memory="adaptive")
    k, net = cfg.sweep_ipc, cfg.net_list()[0]
    defaults = {"lambda_real": base.lambda_real, "lambda_gen": base.lambda_gen, "memory": base.mem_real}
    points = []
    plan = cfg.sweep_points()
    for i, (parameter, value) in enumerate(plan):
        name = f"{parameter}-{value:g}"
        ft = _sweep_config(base, parameter, value)
        log.info("sweep point %d/%d: %s = %g", i + 1, len(plan), parameter, value)
        # The point at the default settings is the bench's own adaptive model: shared, not trained twice.
        folder = out / "models" / "adaptive" if ft == base else out / "sweep" / "models" / name
        model = bench.model("adaptive" if ft == base else f"sweep {name}", ft, folder)
        image_set = _sweep_set(bench, str(model), k, out / "sweep" / "sets" / f"{name}-ipc{k}")
        result = bench.cell(out / "sweep" / "cells" / f"{name}-ipc{k}-{net}.json", image_set, net,
                            f"sweep {name}-ipc{k}-{net}")
        point = {"parameter": parameter, "value": value, "ipc": k, "net": net, "default": value == defaults[parameter],
                 **{key: result[key] for key in ("best_mean", "best_std", "last_mean", "last_std", "per_repeat",
                                                 "epochs")}}
        if cfg.metrics:
            point.update(bench.set_metrics(out / "sweep" / "metrics" / f"{name}-ipc{k}.json", image_set,
                                           f"sweep {name}-ipc{k}"))
        points.append(point)

    lines = ["# memdistill sensitivity sweep", "",
             f"Adaptive memory on {cfg.finetune.data}, IPC {k}, evaluated with {net}; each parameter is varied alone "
             f"around the defaults (lambda_real {base.lambda_real:g}, lambda_gen {base.lambda_gen:g}, "
             f"N_R = N_G = {base.mem_real}); every point is its own fine-tune + sample + evaluation.", "",
             _epochs_note(points, bench)]
    for parameter in SWEEP_PARAMETERS:
        rows = [p for p in points if p["parameter"] == parameter]
        if not rows:
            continue
        sweep_plot(rows, parameter, defaults[parameter], out / "sweep" / f"{parameter}.png",
                   title=f"IPC {k}, {net}, {cfg.repeats} repeats")
        header = [SWEEP_AXIS[parameter], "top-1 (%)", "last (%)"] + (["diversity", "coverage"] if cfg.metrics else [])
        table = [[f"{p['value']:g}" + (" (default)" if p["default"] else ""), pm(p["best_mean"], p["best_std"], cfg.repeats),
                  pm(p["last_mean"], p["last_std"], cfg.repeats)]
                 + ([("n/a" if p["diversity"] is None else f"{p['diversity']:.3f}"), f"{p['coverage']:.3f}"]
                    if cfg.metrics else []) for p in rows]
        lines += ["", f"## {SWEEP_AXIS[parameter]}", "", markdown_table(header, table), "",
                  f"![{parameter}]({parameter}.png)"]
    lines += ["", "## Wall time per stage", "", _timings_table(bench.timings)]
    write_json_atomic(out / "sweep" / "sweep.json", {"settings": _settings(bench), "ipc": k, "net": net,
                                                     "points": points, "feature_extractor": bench.extractor_info(),
                                                     "timings": bench.timings})
    path = out / "sweep" / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sweep_set(bench: _Bench, model: str, k: int, folder: Path) -> Path:
    if (folder / "manifest.json").is_file():
        return folder
    return bench.draw("adaptive", model, k, folder)  # a sweep point is an adaptive model


# ----- command line ------------------------------------------------------------------------------------------
