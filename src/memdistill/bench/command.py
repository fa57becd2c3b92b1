"""The `memdistill bench` subcommand: its options and what it prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from ..evaluate import EvalConfig, labels_line
from ..references import ScoreConfig
from ..sample import SampleConfig
from ..train import TrainConfig
from .config import METHODS, BenchConfig, lever_help
from .run import run_bench
from .tables import accuracy_table

log = logging.getLogger(__name__)


# ----- command line ------------------------------------------------------------------------------------------
BENCH_HELP = {
    "methods": f"methods, comma-separated: {', '.join(METHODS)}; also finetune (the same fine-tuning without "
               "memory losses, a control); a sampled method takes levers as variants METHOD+LEVER[+LEVER...]: "
               f"{lever_help()}; e.g. adaptive+select:confident,dit+cfgint:200-800+select:kcenter:4",
    "ipcs": "images per class, comma-separated",
    "nets": "evaluation nets (convnetD, resnetap10, resnet18), comma-separated",
    "repeats": "classifiers trained per cell, each with its own seed",
    "test": "real test images (default: the embedded dataset's test split)",
    "metrics": "measure diversity and coverage of every set",
    "feature_net": "classifier whose penultimate features the metrics use (trained on the real train split)",
    "feature_epochs": "training epochs of the feature classifier",
    "coverage_k": "k of the coverage metric's k-NN radius",
    "sweep": "run the sensitivity sweep (paper Figure 4) instead of the method grid",
    "sweep_ipc": "IPC of the sweep",
    "sweep_lambda_real": "lambda_real values of the sweep ('' skips)",
    "sweep_lambda_gen": "lambda_gen values of the sweep ('' skips)",
    "sweep_memory": "N_R = N_G values of the sweep ('' skips)",
}


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on the subparsers of the memdistill command line."""
    from ..options import EVAL_HELP, SAMPLE_HELP, TRAIN_HELP, add_config_args
    from ..references import SCORE_HELP

    defaults = BenchConfig()
    p = sub.add_parser("bench", help="several methods side by side at several IPCs: a table, a plot, metrics",
                       description="Random, Herding, DiT (no fine-tuning), Minimax (FIFO memory) and Adaptive "
                                   "memory, at several IPCs and nets, mean ± std over repeats, with diversity and "
                                   "coverage of each set; --sweep runs the lambda / memory-size sensitivity study "
                                   "instead. Sampling options are --sample-*, evaluation options --eval-*, the rest "
                                   "of the options are fine-tuning options; an option that takes a list keeps its "
                                   "name (--method dit,adaptive --ipc 1,10,50 --eval-net convnet3,resnet18).")
    # Bench-level lists of a stage's option keep that option's name and the stage prefix (as in run).
    add_config_args(p, defaults, skip={"finetune", "sample", "eval", "scores"}, help=BENCH_HELP,
                    flags={"methods": "--method", "ipcs": "--ipc", "nets": "--eval-net", "repeats": "--eval-repeats"})
    add_config_args(p, defaults.finetune, skip={"model", "stage", "memory"}, help=TRAIN_HELP)
    # Pool and rule come with a method variant (METHOD+select:RULE[:F]), one per column, not as one setting
    add_config_args(p, defaults.sample, skip={"model", "ipc", "classes", "subset", "codec", "labels", "pool", "select",
                                              "keep_pool", "from_pool"}, help=SAMPLE_HELP, prefix="sample")
    add_config_args(p, defaults.eval, skip={"net", "repeats"}, help=EVAL_HELP, prefix="eval")
    add_config_args(p, defaults.scores, help=SCORE_HELP)
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--resume", action="store_true", help="continue the bench in --out; finished cells are kept")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    p.set_defaults(func=_cmd_bench)
    return p


def config_from_namespace(args: argparse.Namespace) -> BenchConfig:
    from ..options import config_from_args

    base = BenchConfig()
    cfg = config_from_args(BenchConfig, args, base)
    return dataclasses.replace(cfg, finetune=config_from_args(TrainConfig, args, base.finetune),
                               sample=config_from_args(SampleConfig, args, base.sample, prefix="sample"),
                               eval=config_from_args(EvalConfig, args, base.eval, prefix="eval"),
                               scores=config_from_args(ScoreConfig, args, base.scores))


def _cmd_bench(args: argparse.Namespace) -> None:
    from ..options import check_out

    check_out(args, "a bench")
    cfg = config_from_namespace(args)
    report = run_bench(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if cfg.sweep:
        for p in json.loads((report.parent / "sweep.json").read_text())["points"]:
            print(f"{p['parameter']:>12} = {p['value']:<8g} best {p['best_mean']:.2f} ± {p['best_std']:.2f}")
    else:
        result = json.loads((report.parent / "bench.json").read_text())
        if labels_line(result["cells"]):
            print(labels_line(result["cells"]))
        print(accuracy_table(result["cells"], result["methods"], result["ipcs"], result["nets"]))
    print(f"report: {report}")
