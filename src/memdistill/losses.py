"""Representativeness and diversity losses against per-class memories (METHOD.md section 3)."""

from __future__ import annotations

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


def memory_loss(
    pred_x0: torch.Tensor,
    labels: torch.Tensor,
    memories: ClassMemories,
    lambda_real: float,
    lambda_gen: float,
    repeat_defect: bool = False,
) -> tuple[torch.Tensor, dict]:
    """(1/|C_B|) * sum_c (lambda_real L_real^c + lambda_gen L_gen^c) over the batch's classes.

    pred_x0 (N, ...) are the predicted clean latents (with gradients), labels (N,) their classes.
    C_B is every class present in the batch. A class contributes only once its generated memory
    is non-empty; a class with an empty generated memory adds nothing but is still counted in
    |C_B| (so the memory terms ramp in as memories fill, rather than the first filled class
    getting the full weight). A contributing class whose real memory is empty adds only its
    diversity term. Memories are used as they are; the caller inserts this batch afterwards.

    repeat_defect=True reproduces the reference code's bug, for ablation only: classes are
    visited in ascending label order, skipping non-contributing ones; with term_j the j-th
    contributing class's lambda_real L_real + lambda_gen L_gen and running_j = term_1 + ... + term_j,
    the total is (running_1 + ... + running_m) / |C_B| = sum_j (m - j + 1) term_j / |C_B|,
    i.e. the j-th contributing class is counted m - j + 1 times.

    Returns (total, parts) with parts = {"real": mean L_real over classes with a real term,
    "gen": mean L_gen over contributing classes, "classes": number of contributing classes}
    (floats, detached; 0.0 when none). total is a zero tensor when no class contributes.
    """
    if labels.shape[0] != pred_x0.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {pred_x0.shape[0]} predictions")
    if labels.shape[0] == 0:  # e.g. every sample filtered out by --memory-max-t
        return pred_x0.new_zeros(()), {"real": 0.0, "gen": 0.0, "classes": 0}
    # One stable sort makes each class a contiguous run of rows; classes come out ascending, which
    # fixes the order the defect depends on. Rows normalise independently, so normalising the whole
    # batch once gives every class exactly the rows `cosine_matrix` would.
    classes, counts = torch.unique(labels, return_counts=True)
    order = torch.argsort(labels, stable=True)
    pred_rows = unit_rows(pred_x0.index_select(0, order))  # (N, d), grouped by class
    rows = pred_rows.detach()
    # A class term is an extreme over its (B_c x K) cosines, and its gradient flows through the one
    # pair that attains it. So the extremes (and the totals, by the same float ops as the per-class
    # formula) are computed without autograd, and the gradient comes from recomputing only the chosen
    # pairs in one batched op: a per-class autograd graph costs more than the arithmetic.
    total = rows.new_zeros(())
    running = rows.new_zeros(())
    real_values: list[float] = []
    gen_values: list[float] = []
    picks: list[list[tuple[int, torch.Tensor, float]]] = []  # per contributing class: (row of pred_rows,
    # memory row (1, d), d term / d cos) for its diversity pair and, if any, its representativeness pair
    start = 0
    for c, n in zip(classes.tolist(), counts.tolist()):
        first, start = start, start + n
        gen_bank, real_bank = memories.gen(c), memories.real(c)
        if len(gen_bank) == 0:
            continue
        class_picks = []
        # Memories are constant targets: their normalised rows come cached from the bank, detached.
        mem = gen_bank.unit_rows(rows.dtype, rows.device)  # (K_g, d)
        l_gen, at = (rows[first:start] @ mem.T).view(-1).max(0)  # max cos over (B_c, K_g)
        class_picks.append((first + int(at) // len(mem), mem[int(at) % len(mem)][None], lambda_gen))
        term = lambda_gen * l_gen
        gen_values.append(float(l_gen))
        if len(real_bank) > 0:
            mem = real_bank.unit_rows(rows.dtype, rows.device)  # (K_r, d)
            low, at = (rows[first:start] @ mem.T).view(-1).min(0)
            l_real = 1 - low
            class_picks.append((first + int(at) // len(mem), mem[int(at) % len(mem)][None], -lambda_real))
            term = term + lambda_real * l_real
            real_values.append(float(l_real))
        running = running + term
        if repeat_defect:
            total = total + running
        picks.append(class_picks)
    if not repeat_defect:
        total = running
    if picks:
        total = total / len(classes)
        # The same total as a function of the chosen pairs: the j-th of m contributing classes counts
        # once, or m - j + 1 times with the defect (its term is in every later running sum).
        m = len(picks)
        pairs = [(i, row, d * ((m - j) if repeat_defect else 1) / len(classes))
                 for j, class_picks in enumerate(picks) for i, row, d in class_picks]
        idx = torch.tensor([i for i, _, _ in pairs], device=rows.device)
        coef = torch.tensor([d for _, _, d in pairs], dtype=rows.dtype, device=rows.device)
        cos = (pred_rows.index_select(0, idx) * torch.cat([row for _, row, _ in pairs])).sum(dim=1)  # (P,)
        live = (coef * cos).sum()
        total = total + (live - live.detach())  # the value above, exactly; the gradient of the pairs
    parts = {
        "real": sum(real_values) / len(real_values) if real_values else 0.0,
        "gen": sum(gen_values) / len(gen_values) if gen_values else 0.0,
        "classes": len(gen_values),
    }
    return total, parts
