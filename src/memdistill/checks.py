"""Checks of numeric user options, shared by every config's ``validate()``.

``float("nan")`` and ``float("inf")`` parse as floats, and NaN compares false with everything, so a plain
``value < 0`` test lets it through; every float option goes through :func:`require_finite` instead.
"""

from __future__ import annotations

import math

from .errors import UserError

# Realistic upper bounds of the optimisers' learning rate and weight decay (AdamW in fine-tuning and
# pretraining, SGD in evaluation). A finite but absurd value (--lr 1e30) does not overflow at once: it trains
# to weights of 1e30 that are still finite, or to chance accuracy, and looks like a result. Why 1:
# - AdamW's normalised update moves each weight by about lr per step, so lr = 1 already moves every weight by
#   its own scale each step; DiT and Minimax train at 1e-4, the paper fine-tunes at 1e-3.
# - SGD in the evaluation protocol trains at 0.01; large-batch recipes reach a few tenths; beyond 1 the steps
#   of a small classifier diverge.
# - Weight decay: AdamW's decoupled decay shrinks the weights by lr * wd per step (published values 0-0.1; with
#   lr near 1, wd > 1 flips their sign every step); SGD's is an L2 coefficient (protocol 5e-4) that beyond 1
#   outweighs the loss itself.
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0


def flag(field: str, prefix: str = "") -> str:
    """The command-line spelling of a config field: ``flag("cfg_scale", "sample-")`` -> ``--sample-cfg-scale``."""
    return "--" + prefix + field.replace("_", "-")


def require_finite(option: str, value, low: float | None = None, high: float | None = None, *,
                   low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Refuse ``value`` unless it is a finite number in [low, high] (an end is excluded when ``*_open``;
    ``None`` = unbounded). ``optional`` accepts None. Raises UserError naming ``option`` (e.g. ``--lr``)."""
    if value is None and optional:
        return
    if low is None and high is None:
        allowed = "a finite number"
    else:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        allowed = "a finite number " + " and ".join(s for s in (lo, hi) if s)
    if optional:
        allowed += " (or none)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{option} must be {allowed}, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise UserError(f"{option} must be {allowed}, got {value!r}")


def require_int(option: str, value, low: int | None = None, high: int | None = None, *, optional: bool = False) -> None:
    """Refuse ``value`` unless it is an integer in [low, high] (``optional`` accepts None). Raises UserError."""
    if value is None and optional:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(s for s in (f">= {low}" if low is not None else "",
                                          f"<= {high}" if high is not None else "") if s)
        raise UserError(f"{option} must be an integer {bounds}{' (or none)' if optional else ''}, got {value!r}")
