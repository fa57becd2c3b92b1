"""DD-Ranking's scores of a distilled set (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset
Distillation", arXiv 2505.13300; NUS-HPC-AI-Lab/DD-Ranking), computed from accuracies measured under one
evaluation protocol. Pure arithmetic: the accuracies come from memdistill.evaluate and memdistill.references.

Accuracies are top-1 in percentage points (0..100). HLR and IOR are reported in points. LRS and ARS apply
``(e^a - e^-1) / (e - e^-1)`` to a weighted difference ``a``; on FRACTIONS (accuracies / 100, the default,
``scaling="fraction"``) a lies in [-1, 1] and the score in [0, 1]. DD-Ranking's code applies the exponential
to points (``scaling="points"``), where a spans [-100, 100] and the score saturates; that scaling is offered
for comparison with its published numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

from .checks import require_finite
from .errors import UserError
from .evaluate import _mean_std as mean_std

SCALINGS = ("fraction", "points")
DEFAULT_WEIGHT = 0.5  # DD-Ranking's w of LRS
DEFAULT_ARS_LAMBDA = 0.5  # DD-Ranking's ars_lambda


def exp_score(a: float) -> float:
    """(e^a - e^-1) / (e - e^-1): 0 at a = -1, 1 at a = 1, increasing in a (DD-Ranking's squashing of LRS)."""
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def _scaled(points: float, scaling: str) -> float:
    """A difference in points as the exponential takes it: points / 100 ("fraction") or unchanged ("points")."""
    check_scaling(scaling)
    return points / 100.0 if scaling == "fraction" else points


def check_scaling(scaling: str, option: str = "--score-scaling") -> None:
    """UserError naming ``option`` unless ``scaling`` is one of SCALINGS."""
    if scaling not in SCALINGS:
        raise UserError(f"{option} must be one of {', '.join(SCALINGS)}, got {scaling!r}")


def hard_label_recovery(full_acc: float, set_acc: float) -> float:
    """HLR = full-data accuracy - the set's hard-label accuracy, in points (lower is better: the accuracy the
    set fails to recover). DD-Ranking, arXiv 2505.13300. Both accuracies are of classifiers trained with HARD
    labels, also when the set is evaluated with soft labels (DD-Ranking's soft-label evaluator,
    ddranking/metrics/soft_label.py: full_data_hard_label_acc - syn_data_hard_label_acc)."""
    return full_acc - set_acc


def improvement_over_random(set_acc: float, random_acc: float) -> float:
    """IOR = the set's accuracy - the accuracy of a random real subset of the same IPC, in points (higher is
    better), both under the evaluation's labels (with soft labels: syn_data_soft_label_acc -
    random_data_soft_label_acc, as DD-Ranking's soft-label evaluator). DD-Ranking, arXiv 2505.13300."""
    return set_acc - random_acc


def label_robust_score(hlr: float, ior: float, weight: float = DEFAULT_WEIGHT, scaling: str = "fraction") -> float:
    """LRS = (e^a - e^-1) / (e - e^-1) with a = w * IOR - (1 - w) * HLR (DD-Ranking, arXiv 2505.13300).

    hlr, ior: points. weight w in [0, 1]. scaling "fraction": a is taken on IOR / 100 and HLR / 100 (score in
    [0, 1]); "points": on the points themselves, as DD-Ranking's code does. Raises UserError for a bad weight
    or scaling.
    """
    require_finite("--lrs-weight", weight, 0, 1)
    return exp_score(weight * _scaled(ior, scaling) - (1 - weight) * _scaled(hlr, scaling))


def augmentation_robust_score(with_aug: float, without_aug: float, lam: float = DEFAULT_ARS_LAMBDA,
                              scaling: str = "fraction") -> float:
    """ARS from with_aug = set_acc_with_aug - random_acc_with_aug and without_aug = set_acc_without_aug -
    random_acc_without_aug (points), as DD-Ranking's AugmentationRobustScore computes them per evaluation round.

    The combination is OURS, pending the paper (arXiv 2505.13300): DD-Ranking's docs name the weight
    ``ars_lambda`` (default 0.5) but no material we hold gives its formula, so ARS takes the shape of LRS:
    (e^a - e^-1) / (e - e^-1) with a = lam * with_aug + (1 - lam) * without_aug, on fractions by default
    (see label_robust_score for ``scaling``). Raises UserError for a bad lam or scaling.
    """
    require_finite("--ars-lambda", lam, 0, 1)
    return exp_score(lam * _scaled(with_aug, scaling) + (1 - lam) * _scaled(without_aug, scaling))


def _spread(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample, ddof 1; 0 for one value), "per_repeat"}, as evaluate_repeats reports top-1."""
    mean, std = mean_std(list(values))
    return {"mean": mean, "std": std, "per_repeat": list(values)}


def _paired(name: str, values: Sequence[float], n: int) -> list[float]:
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} accuracies for {n} repeats of the set; scores pair repeat r of "
                         "each (same classifier seed)")
    return [float(v) for v in values]


def score_repeats(set_acc: Sequence[float], full_acc: Sequence[float], random_acc: Sequence[float],
                  weight: float = DEFAULT_WEIGHT, scaling: str = "fraction",
                  set_noaug: Sequence[float] | None = None, random_noaug: Sequence[float] | None = None,
                  ars_lambda: float = DEFAULT_ARS_LAMBDA, set_hard: Sequence[float] | None = None) -> dict:
    """HLR, IOR, LRS and (when both no-augmentation lists are given) ARS per repeat, then mean ± sample std.

    Each list holds one top-1 (points) per repeat; repeat r of every list was trained with the same seed, as
    DD-Ranking scores each evaluation round. The lists are with the protocol's augmentation; ``set_noaug`` and
    ``random_noaug`` without it. ``full_acc`` is always of hard labels. With soft labels, ``set_acc`` and
    ``random_acc`` are the soft-label accuracies (IOR) and ``set_hard`` the set's hard-label accuracies (HLR), as
    DD-Ranking's soft-label evaluator (ddranking/metrics/soft_label.py) scores; None: ``set_acc`` is hard already. Returns {"hlr", "ior", "lrs"[, "ars"]: {mean, std, per_repeat}, "scaling",
    "weight"[, "ars_lambda"]}. Raises ValueError when the lists differ in length (a caller's bug) and UserError
    for a bad weight, lambda or scaling.
    """
    check_scaling(scaling)
    n = len(set_acc)
    if n == 0:
        raise ValueError("no repeats to score")
    s, f, r = (_paired(k, v, n) for k, v in (("set", set_acc), ("full data", full_acc), ("random", random_acc)))
    h = s if set_hard is None else _paired("set with hard labels", set_hard, n)
    hlr = [hard_label_recovery(fi, hi) for fi, hi in zip(f, h)]
    ior = [improvement_over_random(si, ri) for si, ri in zip(s, r)]
    result = {"hlr": _spread(hlr), "ior": _spread(ior),
              "lrs": _spread([label_robust_score(h, i, weight, scaling) for h, i in zip(hlr, ior)]),
              "scaling": scaling, "weight": weight}
    if set_noaug is not None and random_noaug is not None:
        sn, rn = _paired("set without augmentation", set_noaug, n), _paired("random without augmentation",
                                                                           random_noaug, n)
        result["ars"] = _spread([augmentation_robust_score(si - ri, sni - rni, ars_lambda, scaling)
                                   for si, ri, sni, rni in zip(s, r, sn, rn)])
        result["ars_lambda"] = ars_lambda
    return result
