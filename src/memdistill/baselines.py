"""Real-data baselines: IPC real images per class, chosen at random or by herding, saved as an image set.

Both selections are prefix-consistent: the first k images of an IPC-n selection are the IPC-k selection
with the same seed, so baselines at several IPCs are nested.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ImageDataset, per_class_indices
from .errors import UserError
from .imageset import check_target, write_image_set
from .runtime import bars_disabled

log = logging.getLogger(__name__)

METHODS = ("random", "herding")
FEATURE_SIDE = 16  # default herding features: images average-pooled to at most 16x16
Features = Callable[[torch.Tensor], torch.Tensor]  # images (n, C, H, W) -> features (n, ...)


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) -> (n, C * h * w) with h, w = min(H, 16), min(W, 16) after average pooling."""
    h, w = min(images.shape[2], FEATURE_SIDE), min(images.shape[3], FEATURE_SIDE)
    if (h, w) != tuple(images.shape[2:]):
        images = F.adaptive_avg_pool2d(images, (h, w))
    return images.flatten(1)


def herding_order(features: torch.Tensor, k: int, target: torch.Tensor | None = None) -> list[int]:
    """Greedy herding (Welling 2009, in the running-mean form of iCaRL): the i-th pick is the unused row
    that brings the mean of the picks closest to ``target``, by default the mean of all rows. Ties go to the
    lowest row.

    features (n, D), target (D,) or None -> k distinct row indices, in pick order.
    """
    feats = features.detach().flatten(1).double()  # float64: the greedy order must not depend on rounding
    n = feats.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} rows")
    mu = feats.mean(dim=0) if target is None else target.detach().flatten().double()  # (D,)
    if mu.shape != feats.shape[1:]:
        raise ValueError(f"target of {mu.numel()} values for features of {feats.shape[1]}")
    total = torch.zeros_like(mu)
    used = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    for step in range(1, k + 1):
        # Distance of the running mean after adding each candidate: (total + f_i) / step vs mu.
        dist = ((total.unsqueeze(0) + feats) / step - mu).pow(2).sum(dim=1)  # (n,)
        dist[used] = float("inf")
        i = int(torch.argmin(dist))
        order.append(i)
        used[i] = True
        total += feats[i]
    return order


def _stack(dataset: ImageDataset, indices: list[int]) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])  # (n, C, H, W)


def _class_features(dataset: ImageDataset, indices: list[int], features: Features, batch_size: int = 256):
    # Batched so that a large folder dataset never has to sit in memory as pixels.
    parts = [features(_stack(dataset, indices[s:s + batch_size])).detach().flatten(1).cpu()
             for s in range(0, len(indices), batch_size)]
    return torch.cat(parts)  # (n, D)


def select_indices(method: str, dataset: ImageDataset, ipc: int, seed: int = 0, features: Features | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """For each class, the dataset positions of its ``ipc`` selected images, in selection order."""
    if method not in METHODS:
        raise UserError(f"unknown selection method {method!r}; allowed: {', '.join(METHODS)}")
    if ipc < 1:
        raise UserError(f"ipc must be at least 1, got {ipc}")
    per_class = per_class_indices(dataset.targets, dataset.num_classes)
    for name, idx in zip(dataset.class_names, per_class):
        if len(idx) < ipc:
            raise UserError(f"class {name!r} has only {len(idx)} images, fewer than ipc {ipc}")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    chosen = []
    for idx in tqdm(per_class, desc=f"{method} selection", unit="class", disable=bars_disabled()):
        idx = idx.tolist()
        if method == "random":
            picks = torch.randperm(len(idx), generator=g)[:ipc].tolist()
        else:
            picks = herding_order(_class_features(dataset, idx, features or pooled_features), ipc)
        chosen.append([idx[p] for p in picks])
    return chosen


def select_real(method: str, dataset: ImageDataset, ipc: int, seed: int, out: str | Path, overwrite: bool = False,
                features: Features | None = None, generator: torch.Generator | None = None) -> Path:
    """Select ``ipc`` real images per class (method "random" or "herding") and write them as an image set.

    Herding uses ``features`` (images -> features) or, by default, the pixels pooled to at most 16x16;
    random draws from ``generator`` or a generator seeded with ``seed``.
    """
    out = check_target(out, overwrite)
    chosen = select_indices(method, dataset, ipc, seed, features, generator)
    flat = [i for picks in chosen for i in picks]
    images = _stack(dataset, flat)  # (K * ipc, C, H, W)
    labels = torch.tensor([c for c, picks in enumerate(chosen) for _ in picks], dtype=torch.long)
    manifest = {
        "stage": "select",
        "config": {"method": method, "ipc": ipc, "seed": seed,
                   "features": "pooled16" if features is None else getattr(features, "__name__", "custom")},
        "method": method,
        "seed": seed,
        "data": dataset.identity,
        "cond_labels": list(dataset.cond_labels),
        "source_indices": chosen,
    }
    return write_image_set(out, images, labels, dataset.class_names, manifest, overwrite=overwrite)
