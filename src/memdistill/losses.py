"""Representativeness and diversity losses against per-class memories (METHOD.md section 3)."""

from __future__ import annotations

import torch

from memdistill.memory import ClassMemories


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosines between the flattened rows of a (Na, ...) and b (Nb, ...) -> (Na, Nb).

    Norms are clamped at eps so zero rows give 0 instead of NaN (and finite gradients).
    """
    a = a.reshape(a.shape[0], -1)  # (Na, d)
    b = b.reshape(b.shape[0], -1).to(dtype=a.dtype, device=a.device)  # (Nb, d)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cannot compare rows of {a.shape[1]} and {b.shape[1]} elements")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(eps)
    return a @ b.T


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
    classes = torch.unique(labels).tolist()  # sorted: fixes the order the defect depends on
    total = pred_x0.new_zeros(())
    running = pred_x0.new_zeros(())
    real_values: list[float] = []
    gen_values: list[float] = []
    for c in classes:
        gen_mem = memories.gen(c).tensor()
        if gen_mem.shape[0] == 0:
            continue
        pred_c = pred_x0[labels == c]  # (B_c, ...)
        l_gen = diversity_loss(pred_c, gen_mem)
        term = lambda_gen * l_gen
        gen_values.append(float(l_gen.detach()))
        real_mem = memories.real(c).tensor()
        if real_mem.shape[0] > 0:
            l_real = representativeness_loss(pred_c, real_mem)
            term = term + lambda_real * l_real
            real_values.append(float(l_real.detach()))
        running = running + term
        if repeat_defect:
            total = total + running
    if not repeat_defect:
        total = running
    if gen_values:
        total = total / len(classes)
    parts = {
        "real": sum(real_values) / len(real_values) if real_values else 0.0,
        "gen": sum(gen_values) / len(gen_values) if gen_values else 0.0,
        "classes": len(gen_values),
    }
    return total, parts
