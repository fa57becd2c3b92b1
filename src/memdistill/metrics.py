"""Diversity and representativeness of a distilled set, measured in a classifier's feature space.

- within-class diversity: mean pairwise cosine distance (1 - cos) between a class's images, averaged over
  the classes that have at least two images;
- coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models"): the
  fraction of real images whose nearest distilled neighbour *of the same class* lies within their own
  k-NN radius among the real images of that class (Euclidean distances, as in the paper).

Both are plain functions on feature tensors; the features come from a small classifier trained on the
real train split (``train_feature_extractor``), read at its penultimate layer (the classifier's input).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError
from .runtime import bars_disabled

log = logging.getLogger(__name__)


def mean_pairwise_cosine_distance(features: torch.Tensor) -> float:
    """Mean of 1 - cos(f_i, f_j) over pairs i < j of the rows of features (n, D); nan for n < 2."""
    n = features.shape[0]
    if n < 2:
        return math.nan
    unit = F.normalize(features.flatten(1).double(), dim=1, eps=1e-12)
    cos = unit @ unit.T  # (n, n)
    off_diagonal = cos.sum() - cos.diagonal().sum()
    return float(1.0 - off_diagonal / (n * (n - 1)))


def within_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise cosine distance within each class, averaged over the classes with at least two rows.

    features (N, D), labels (N,). nan when no class has two rows (e.g. IPC 1): diversity is undefined there.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    values = [mean_pairwise_cosine_distance(features[labels == c]) for c in labels.unique().tolist()]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of features (n, D) to its k-th nearest other row: (n,)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN radius needs 1 <= k < number of points; got k={k} with {n} points")
    d = torch.cdist(features.double(), features.double())  # (n, n)
    # Sorted row: index 0 is the point itself (distance 0), index k its k-th neighbour.
    return d.sort(dim=1).values[:, k]


def covered(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per real row: is some fake row within the real row's k-NN radius among the real rows? (n_real,) bool.
    real (n_real, D), fake (n_fake, D) of one class."""
    if fake.shape[0] == 0:
        return torch.zeros(real.shape[0], dtype=torch.bool)
    radii = knn_radii(real.flatten(1), k)  # (n_real,)
    nearest_fake = torch.cdist(real.flatten(1).double(), fake.flatten(1).double()).min(dim=1).values  # (n_real,)
    return nearest_fake <= radii


def coverage(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
             k: int = 5) -> float:
    """Fraction of all real rows covered by a fake row of their own class (Naeem et al. 2020, per class).

    real (N, D) with real_labels (N,); fake (M, D) with fake_labels (M,). Each class needs more than k
    real rows.
    """
    if real.shape[0] != real_labels.shape[0] or fake.shape[0] != fake_labels.shape[0]:
        raise ValueError("features and labels differ in length")
    hits = 0
    for c in real_labels.unique().tolist():
        hits += int(covered(real[real_labels == c], fake[fake_labels == c], k).sum())
    return hits / real.shape[0]


# ----- the feature extractor -------------------------------------------------------------------------------
def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """The input of ``model.classifier`` (every net in memdistill.nets ends in one) for images (N, C, H, W):
    (N, D) on the CPU."""
    captured: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                model(images[s:s + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat([c.flatten(1).cpu() for c in captured]) if captured else torch.empty(0, 0)


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                        device: str | torch.device = "cpu") -> float:
    """Top-1 (%) of ``model`` on images (N, C, H, W) with labels (N,)."""
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        pred = model(images[s:s + batch_size].to(device)).argmax(1).cpu()
        correct += int((pred == labels[s:s + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(images), 1)


def train_feature_extractor(images: torch.Tensor, labels: torch.Tensor, num_classes: int, net: str = "convnet3",
                            epochs: int = 5, batch_size: int = 128, lr: float = 0.01, norm: str = "instance",
                            device: str | torch.device = "cpu",
                            generator: torch.Generator | None = None) -> torch.nn.Module:
    """A classifier trained on real images (N, C, H, W) in [-1, 1] with labels (N,), whose penultimate layer
    serves as the feature space of the metrics. Plain SGD with momentum and a cosine lr, no augmentation:
    it only has to separate the classes, not to be state of the art. Returns the model in eval mode."""
    from .nets import build_net

    if epochs < 1:
        raise UserError(f"feature extractor epochs must be >= 1, got {epochs}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    # The init draws from the global RNG; fork it so the caller's stream is untouched and the init
    # depends on ``generator`` alone.
    init_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_net(net, num_classes, images.shape[1], images.shape[-1], norm)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    per_epoch = max(1, math.ceil(len(images) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
    for epoch in tqdm(range(epochs), desc=f"feature extractor {net}", disable=bars_disabled(), leave=False):
        total = 0.0
        chunks = list(torch.randperm(len(images), generator=g).split(batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:  # batch norm cannot train on a batch of one
            chunks[-2:] = [torch.cat(chunks[-2:])]
        for idx in chunks:
            loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].long().to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("feature extractor epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(images))
    return model.eval()
