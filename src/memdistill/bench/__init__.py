"""`memdistill bench`: several distillation methods side by side, in the layout of the paper's Table 1.

Methods: random / herding (real images), dit (the pretrained model sampled without fine-tuning), minimax
(fine-tuned with FIFO memories) and adaptive (the paper's self-adaptive memories), and on request finetune
(fine-tuned without memory losses, a control); at several IPCs, for
several evaluation nets, each cell the mean +- std over repeats. Beside accuracy, each distilled set's
within-class diversity and coverage of the real test set (memdistill.metrics) in the feature space of a
classifier trained once on the real train split. ``sweep=True`` runs the sensitivity study of the paper's
Figure 4 instead: accuracy at one IPC against lambda_real, lambda_gen and the memory size N_R = N_G.

Layout of the output folder (every unit is written atomically; one that exists is not redone):
    models/<method>/                        fine-tune runs (finetune, minimax, adaptive), made once, reused everywhere
    sets/<method>-ipc<k>/                   image sets
    cells/<method>-ipc<k>-<net>.json        one evaluation (all repeats): the unit of resume (with -hard / -noaug:
                                            the same set with hard labels under --eval-labels soft / without
                                            augmentation under --ars, for the scores)
    metrics/<method>-ipc<k>.json            diversity and coverage of one set
    features/extractor.json                 the feature classifier of the metrics (a judge: memdistill.judge, cached
                                            outside the bench, shared with every command)
    bench.json, bench.md, accuracy_vs_ipc.png
    sweep/{models,sets,cells,metrics}/..., sweep/sweep.json, sweep/sweep.md, sweep/<parameter>.png
    config.json, timings.json               the settings a resume must match; wall time per stage
"""

from __future__ import annotations

from .command import add_bench_parser, config_from_namespace
from .config import EXTRA_METHODS, METHODS, BenchConfig
from .run import run_bench
from .tables import accuracy_table, metrics_table, tied_best

__all__ = ["BenchConfig", "EXTRA_METHODS", "METHODS", "accuracy_table", "add_bench_parser", "config_from_namespace",
           "metrics_table", "run_bench", "tied_best"]
