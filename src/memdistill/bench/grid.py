"""The method grid: every method at every IPC and net, and its report (bench.md, bench.json, the plot)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..errors import UserError
from ..manifest import write_json_atomic
from .cells import _Bench
from .config import LABELS, MEMORY_OF, REAL_METHODS, TIE_RULE, method_label, parse_method
from .report import _epochs_note, _settings, _timings_table
from .tables import accuracy_table, accuracy_vs_ipc_plot, metrics_table, scores_table

log = logging.getLogger(__name__)


def _model_for(bench: _Bench, method: str) -> str | None:
    """The model a method samples (a variant: its base method's, fine-tuned once for all its variants)."""
    ft = bench.cfg.finetune
    method = parse_method(method).base
    if method == "dit":
        return ft.init
    if method in MEMORY_OF:
        return str(bench.model(method, dataclasses.replace(ft, memory=MEMORY_OF[method]),
                               bench.out / "models" / method))
    return None


def _method_sentence(methods, bench: _Bench) -> str:
    """How the methods of this bench were made; only the ones it ran (a bench of real baselines fine-tunes
    nothing and samples nothing)."""
    ft, cfg = bench.cfg.finetune, bench.cfg
    variants = [m for m in methods if parse_method(m).levers]
    methods = list(dict.fromkeys(parse_method(m).base for m in methods))
    tuned = [m for m in methods if m in MEMORY_OF]
    parts = []
    if tuned:
        length = ft.steps if ft.steps is not None else f"{ft.epochs or 1} epoch(s) of"
        parts.append(f"{', '.join(LABELS[m] for m in tuned)} fine-tune {ft.init} with every setting alike but "
                     f"the memory (Minimax: FIFO, Adaptive: self-adaptive, Fine-tune: no memory losses): {length} "
                     f"steps, batch {ft.batch_size}, lr {ft.lr:g}, lambda_real {ft.lambda_real:g}, lambda_gen "
                     f"{ft.lambda_gen:g}, N_R {ft.mem_real}, N_G {ft.mem_gen}.")
    if "dit" in methods:
        parts.append(f"DiT samples {ft.init} without fine-tuning.")
    if "dit" in methods or tuned:
        parts.append(f"Sampling: {cfg.sample.steps} {cfg.sample.sampler} steps, guidance {cfg.sample.cfg_scale:g}.")
    real = [LABELS[m] for m in methods if m in REAL_METHODS]
    if real:
        parts.append(f"{' and '.join(real)} select{'s' if len(real) == 1 else ''} real images.")
    if any("select" in parse_method(m).levers for m in variants):
        s = cfg.sample
        parts.append(f"Select variants sample a pool of ceil(F x IPC) candidates per class with the base method's "
                     f"model (one pool per method and F, shared by the rules; its first IPC candidates are the "
                     f"plain set) and keep IPC of them by the rule, judged by {s.judge_net} trained {s.judge_epochs} "
                     f"epochs on the real train split (memdistill.selection).")
    return " ".join(parts)


def _cell_scores(bench: _Bench, result: dict, net: str, ipc: int, hard: dict | None = None,
                 noaug: dict | None = None) -> dict:
    """DD-Ranking's scores of one cell against references under the cell's protocol (trained once, cached);
    ``hard``: the cell's set evaluated with hard labels (needed with soft labels, for HLR); ``noaug``: evaluated
    without augmentation (gives ARS)."""
    from ..evaluate import EvalConfig
    from ..references import references_for, score_set

    if "test_data" not in result:
        raise UserError("a stored cell predates scores; pass --no-scores or delete the cells folder to evaluate again")
    if bench.references is None:
        bench.references = references_for(result, bench.cfg.scores, bench.cfg.finetune.subset,
                                          default_data=bench.cfg.finetune.data)
    return score_set(result, bench.references, EvalConfig(**result["config"]), ipc, bench.cfg.scores,
                     noaug_result=noaug, hard_result=hard)


def _run_grid(bench: _Bench) -> Path:
    cfg, out = bench.cfg, bench.out
    methods, ipcs, nets = cfg.method_list(), cfg.ipc_list(), cfg.net_list()
    models = {m: _model_for(bench, m) for m in methods}
    sets = {(m, k): bench.image_set(m, models[m], k, max(ipcs), out / "sets") for m in methods for k in ipcs}

    cells, total = [], len(methods) * len(ipcs) * len(nets)
    for k in ipcs:
        for net in nets:
            for m in methods:
                label = f"{parse_method(m).slug()}-ipc{k}-{net}"
                log.info("cell %d/%d: %s", len(cells) + 1, total, label)
                result = bench.cell(out / "cells" / f"{label}.json", sets[m, k], net, label)
                cells.append({"method": m, "ipc": k, "net": net,
                              **{key: result[key] for key in ("best_mean", "best_std", "last_mean", "last_std",
                                                              "per_repeat", "epochs")},
                              # how the cell was labelled (cells from before soft labels: hard)
                              "labels": result.get("labels", "hard"), "teacher": result.get("teacher"),
                              "temperature": result.get("temperature")})
                if cfg.scores.wanted:
                    hard = None
                    if cfg.eval.labels == "soft":  # HLR compares hard-label accuracies (references.score_set)
                        hard = bench.cell(out / "cells" / f"{label}-hard.json", sets[m, k], net, f"{label} hard",
                                          hard=True)
                    noaug = None
                    if cfg.scores.ars:  # ARS: the set trained again without augmentation, a cell of its own
                        noaug = bench.cell(out / "cells" / f"{label}-noaug.json", sets[m, k], net,
                                           f"{label} without augmentation", noaug_of=result)
                    cells[-1]["scores"] = _cell_scores(bench, result, net, k, hard, noaug)
    metrics = []
    if cfg.metrics:
        for m in methods:
            for k in ipcs:
                label = f"{parse_method(m).slug()}-ipc{k}"
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
    lines = [
        "# memdistill bench",
        "",
        f"Methods {', '.join(method_label(m) for m in methods)} on {ft.data}"
        + (f" ({ft.subset})" if ft.subset else "") + f", tested on the real {bench.test} test images. "
        + _method_sentence(methods, bench),
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
    scored = [c for c in cells if c.get("scores")]
    if scored:
        from ..reports import score_note

        lines += ["", "## DD-Ranking scores", "", scores_table(cells, methods, ipcs, nets), "",
                  score_note(scored[0]["scores"])]
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
