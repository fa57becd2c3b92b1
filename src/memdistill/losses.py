"""Representativeness and diversity losses against per-class memories (METHOD.md section 3)."""

from __future__ import annotations

import collections

import torch

from memdistill.memory import COS_EPS, ClassMemories


def unit_rows(x: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """Flattened rows of x (N, ...) divided by their norm clamped at eps -> (N, d)."""
    x = x.reshape(x.shape[0], -1)  # (N, d)
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """Cosines between the flattened rows of a (Na, ...) and b (Nb, ...) -> (Na, Nb).

    Norms are clamped at eps so zero rows give 0 instead of NaN (and finite gradients).
    """
    a = a.reshape(a.shape[0], -1)  # (Na, d)
    b = b.reshape(b.shape[0], -1).to(dtype=a.dtype, device=a.device)  # (Nb, d)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cannot compare rows of {a.shape[1]} and {b.shape[1]} elements")
    return unit_rows(a, eps) @ unit_rows(b, eps).T


def _check_memory(memory: torch.Tensor, name: str) -> torch.Tensor:
    if memory.shape[0] == 0:
        raise ValueError(f"{name} needs a non-empty memory")
    return memory.detach()  # memory is a constant target, never optimised


def representativeness_loss(pred: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """1 - min_{i, r} cos(pred_i, memory_r): pulls the worst-aligned prediction towards real data."""
    return 1 - cosine_matrix(pred, _check_memory(memory, "representativeness_loss")).min()


def diversity_loss(pred: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """max_{i, g} cos(pred_i, memory_g): pushes the prediction closest to an earlier one away."""
    return cosine_matrix(pred, _check_memory(memory, "diversity_loss")).max()


def _pair(first: int, at: torch.Tensor, mem: torch.Tensor, weight: float):
    """The pair attaining a class extreme, as (row index in the class-sorted batch (1,), memory row (1, d),
    weight), from ``at``, the flat index into the class's (B_c, K) cosines, without reading it back."""
    at = at.view(1)
    return first + torch.div(at, len(mem), rounding_mode="floor"), mem.index_select(0, at % len(mem)), weight


def _mean(values: list[torch.Tensor]) -> torch.Tensor | float:
    """The float64 mean of 0-d tensors, summed one by one in list order (the plain sequential float sum the
    logged means were taken with before), left on their device for the caller to read when it logs;
    0.0 for none."""
    if not values:
        return 0.0
    acc = values[0].double()
    for v in values[1:]:
        acc = acc + v.double()
    return acc / len(values)


def _defect_visits(ours: list[int], visit_labels: torch.Tensor | None) -> list[int]:
    """The classes (labels' space) in the order the reference loop visits them: the iteration order of
    ``set(visit_labels.tolist())``, the labels it conditions on, mapped back to ``ours`` (N,).

    For small non-negative ints that order is ascending only while they are below the set's table size;
    ImageNet indices such as 193, 182, 258 come out as 193, 258, 182. Raises ValueError when
    ``visit_labels`` (N,) does not name each class of ``ours`` by exactly one label.
    """
    theirs = ours if visit_labels is None else visit_labels.tolist()
    if len(theirs) != len(ours):
        raise ValueError(f"{len(theirs)} visit labels for {len(ours)} labels")
    pairs = set(zip(theirs, ours))
    to_ours = dict(pairs)
    if len(to_ours) != len(pairs) or len(set(to_ours.values())) != len(to_ours):
        raise ValueError("visit_labels must name each class by exactly one label")
    return [to_ours[v] for v in set(theirs)]


def memory_loss(
    pred_x0: torch.Tensor,
    labels: torch.Tensor,
    memories: ClassMemories,
    lambda_real: float,
    lambda_gen: float,
    repeat_defect: bool = False,
    visit_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """(1/|C_B|) * sum_c (lambda_real L_real^c + lambda_gen L_gen^c) over the batch's classes.

    pred_x0 (N, ...) are the predicted clean latents (with gradients), labels (N,) their classes.
    C_B is every class present in the batch. A class contributes only once its generated memory
    is non-empty; a class with an empty generated memory adds nothing but is still counted in
    |C_B| (so the memory terms ramp in as memories fill, rather than the first filled class
    getting the full weight). A contributing class whose real memory is empty adds only its
    diversity term. Memories are used as they are; the caller inserts this batch afterwards.

    repeat_defect=True reproduces the reference code's loop, for ablation only. It visits the
    classes in the iteration order of the Python set of the batch's ``visit_labels`` (N,) (the
    labels the reference conditions on, i.e. the model's class indices; default ``labels``), adds a
    contributing class's term to a running sum, and adds the running sum to the total after EVERY
    visited class, contributing or not. So with V = |C_B| visits, the class visited at position p
    (0-based) counts V - p times; the total is still divided by |C_B|.

    Returns (total, parts) with parts = {"real": mean L_real over classes with a real term,
    "gen": mean L_gen over contributing classes, "classes": number of contributing classes}: the
    means are detached 0-d float64 tensors on pred_x0's device (0.0 when none), so that reading them,
    a device sync, is left to the caller's log steps. total is a zero tensor when no class contributes.
    The only device-to-host transfer is that of ``labels`` (and ``visit_labels`` with the defect).
    Raises ValueError on mismatched sizes, or visit_labels that do not name classes one to one.
    """
    if labels.shape[0] != pred_x0.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {pred_x0.shape[0]} predictions")
    if labels.shape[0] == 0:  # e.g. every sample filtered out by --memory-max-t
        return pred_x0.new_zeros(()), {"real": 0.0, "gen": 0.0, "classes": 0}
    # The one host transfer: which classes are present picks the memory banks (host objects). Everything
    # else stays on the device: the extremes, where they are attained and the logged values are tensors.
    host_labels = labels.tolist()
    visits = _defect_visits(host_labels, visit_labels) if repeat_defect else None
    sizes = collections.Counter(host_labels)
    # One stable sort makes each class a contiguous run of rows, classes ascending. Rows normalise
    # independently, so normalising the whole batch once gives every class exactly the rows
    # `cosine_matrix` would.
    order = torch.argsort(labels, stable=True)
    pred_rows = unit_rows(pred_x0.index_select(0, order))  # (N, d), grouped by class
    rows = pred_rows.detach()
    # A class term is an extreme over its (B_c x K) cosines, and its gradient flows through the one
    # pair that attains it. So the extremes (and the totals, by the same float ops as the per-class
    # formula) are computed without autograd, and the gradient comes from recomputing only the chosen
    # pairs in one batched op: a per-class autograd graph costs more than the arithmetic.
    running = rows.new_zeros(())
    real_values: list[torch.Tensor] = []
    gen_values: list[torch.Tensor] = []
    terms: dict[int, torch.Tensor] = {}  # contributing class -> its term, in ascending class order
    picks: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}  # contributing class -> (row of
    # pred_rows (1,), memory row (1, d), d term / d cos) for its diversity pair and, if any, its
    # representativeness pair; rows found on the device, never read back
    start = 0
    for c in sorted(sizes):
        first, start = start, start + sizes[c]
        gen_bank, real_bank = memories.gen(c), memories.real(c)
        if len(gen_bank) == 0:
            continue
        class_picks = []
        # Memories are constant targets: their normalised rows come cached from the bank, detached.
        mem = gen_bank.unit_rows(rows.dtype, rows.device)  # (K_g, d)
        l_gen, at = (rows[first:start] @ mem.T).view(-1).max(0)  # max cos over (B_c, K_g)
        class_picks.append(_pair(first, at, mem, lambda_gen))
        term = lambda_gen * l_gen
        gen_values.append(l_gen)
        if len(real_bank) > 0:
            mem = real_bank.unit_rows(rows.dtype, rows.device)  # (K_r, d)
            low, at = (rows[first:start] @ mem.T).view(-1).min(0)
            l_real = 1 - low
            class_picks.append(_pair(first, at, mem, -lambda_real))
            term = term + lambda_real * l_real
            real_values.append(l_real)
        running = running + term
        terms[c] = term
        picks[c] = class_picks
    # How often each contributing class's term counts: once, or with the defect V - p times.
    times = dict.fromkeys(terms, 1)
    total = running
    if repeat_defect:
        total, running = rows.new_zeros(()), rows.new_zeros(())
        for p, c in enumerate(visits):
            if c in terms:
                running = running + terms[c]
                times[c] = len(visits) - p
            total = total + running
    if picks:
        total = total / len(sizes)
        pairs = [(i, row, d * times[c] / len(sizes)) for c, class_picks in picks.items()
                 for i, row, d in class_picks]
        idx = torch.cat([i for i, _, _ in pairs])
        coef = torch.tensor([d for _, _, d in pairs], dtype=rows.dtype, device=rows.device)
        cos = (pred_rows.index_select(0, idx) * torch.cat([row for _, row, _ in pairs])).sum(dim=1)  # (P,)
        live = (coef * cos).sum()
        total = total + (live - live.detach())  # the value above, exactly; the gradient of the pairs
    parts = {"real": _mean(real_values), "gen": _mean(gen_values), "classes": len(gen_values)}
    return total, parts
