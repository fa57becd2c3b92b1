"""The method grid: every method at every IPC and net, and its report (bench.md, bench.json, the plot)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..manifest import write_json_atomic
from .cells import _Bench
from .config import LABELS, MEMORY_OF, TIE_RULE
from .report import _epochs_note, _settings, _timings_table
from .tables import accuracy_table, accuracy_vs_ipc_plot, metrics_table

log = logging.getLogger(__name__)


def _model_for(bench: _Bench, method: str) -> str | None:
    ft = bench.cfg.finetune
    if method == "dit":
        return ft.init
    if method in MEMORY_OF:
        return str(bench.model(method, dataclasses.replace(ft, memory=MEMORY_OF[method]),
                               bench.out / "models" / method))
    return None


def _run_grid(bench: _Bench) -> Path:
    cfg, out = bench.cfg, bench.out
    methods, ipcs, nets = cfg.method_list(), cfg.ipc_list(), cfg.net_list()
    models = {m: _model_for(bench, m) for m in methods}
    sets = {(m, k): bench.image_set(m, models[m], k, max(ipcs), out / "sets") for m in methods for k in ipcs}

    cells, total = [], len(methods) * len(ipcs) * len(nets)
    for k in ipcs:
        for net in nets:
            for m in methods:
                label = f"{m}-ipc{k}-{net}"
                log.info("cell %d/%d: %s", len(cells) + 1, total, label)
                result = bench.cell(out / "cells" / f"{label}.json", sets[m, k], net, label)
                cells.append({"method": m, "ipc": k, "net": net,
                              **{key: result[key] for key in ("best_mean", "best_std", "last_mean", "last_std",
                                                              "per_repeat", "epochs")}})
    metrics = []
    if cfg.metrics:
        for m in methods:
            for k in ipcs:
                label = f"{m}-ipc{k}"
                metrics.append({"method": m, "ipc": k,
                                **bench.set_metrics(out / "metrics" / f"{label}.json", sets[m, k], label)})
    return _write_grid_report(bench, methods, ipcs, nets, cells, metrics)


def _write_grid_report(bench: _Bench, methods, ipcs, nets, cells, metrics) -> Path:

    cfg, out = bench.cfg, bench.out
    ft = cfg.finetune
    accuracy_vs_ipc_plot(cells, methods, ipcs, nets, out / "accuracy_vs_ipc.png",
                         title=f"{ft.data}: top-1 vs IPC ({cfg.repeats} repeats)")
    extractor = bench.extractor_info()
    write_json_atomic(out / "bench.json", {"settings": _settings(bench), "methods": methods, "ipcs": ipcs,
                                           "nets": nets, "cells": cells, "metrics": metrics,
                                           "feature_extractor": extractor, "timings": bench.timings,
                                           "tie_rule": TIE_RULE})
    length = ft.steps if ft.steps is not None else f"{ft.epochs or 1} epoch(s) of"
    lines = [
        "# memdistill bench",
        "",
        f"Methods {', '.join(LABELS[m] for m in methods)} on {ft.data}"
        + (f" ({ft.subset})" if ft.subset else "") + f", tested on the real {bench.test} test images. "
        f"Fine-tuned methods start from {ft.init} and share every setting but the memory (Minimax: FIFO, "
        f"Adaptive: self-adaptive, Fine-tune: no memory losses); DiT samples that model without fine-tuning; "
        f"Random and Herding select real images. Fine-tuning: {length} steps, batch "
        f"{ft.batch_size}, lr {ft.lr:g}, lambda_real {ft.lambda_real:g}, lambda_gen {ft.lambda_gen:g}, "
        f"N_R {ft.mem_real}, N_G {ft.mem_gen}. Sampling: {cfg.sample.steps} {cfg.sample.sampler} steps, "
        f"guidance {cfg.sample.cfg_scale:g}.",
        "",
        "## Top-1 accuracy (%)",
        "",
        accuracy_table(cells, methods, ipcs, nets),
        "",
        TIE_RULE,
        "",
        _epochs_note(cells, bench),
        "",
        "![accuracy against IPC](accuracy_vs_ipc.png)",
    ]
    if metrics:
        feat = (f"{extractor['net']} trained {extractor['epochs']} epochs on the real train split, "
                f"{extractor['test_top1']:.1f} % top-1 on the real test set" if extractor else cfg.feature_net)
        lines += [
            "",
            "## Diversity and coverage of the distilled sets",
            "",
            f"In the penultimate-layer feature space of a classifier ({feat}).",
            "",
            "Within-class diversity: mean pairwise cosine distance between a class's images, averaged over classes "
            "(higher = more diverse; n/a at IPC 1, where a class has no pair).",
            "",
            metrics_table(metrics, methods, ipcs, "diversity"),
            "",
            f"Coverage (Naeem et al. 2020, k = {cfg.coverage_k}): fraction of real test images whose nearest distilled "
            "image of the same class lies within their own k-NN radius among the real test images of that class "
            "(higher = the real data is better represented).",
            "",
            metrics_table(metrics, methods, ipcs, "coverage"),
        ]
    lines += ["", "## Wall time per stage", "", _timings_table(bench.timings), "",
              "Per-stage times are in bench.json; stages done by an earlier invocation of a resumed bench keep "
              "the time they took then."]
    path = out / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----- the sensitivity sweep ------------------------------------------------------------------------------------
