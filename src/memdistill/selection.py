"""Over-generate and select: keep IPC of a pool of generated candidates per class (``sample --pool --select``).

The rules (each one per class; every order is deterministic, ties go to the lowest candidate index):
- ``random``: a seeded random subset, the control;
- ``herding``: baselines.herding_order in the judge's feature space (the picks' mean tracks the pool's mean);
- ``prototype``: herding towards the mean of the class's *real* train images in the judge's feature space (the
  picks' mean tracks the real class mean; at IPC 1 the candidate nearest it), what herding of real images does
  with the real images themselves as candidates;
- ``kcenter``: greedy k-center in the judge's feature space (kcenter_order);
- ``confident``: the highest judge probability of the conditioning class;
- ``difficulty``: the judge's per-image loss of the candidates matched to the distribution of that loss over
  the class's real train images by stratified picking over quantile bins (difficulty_order). The idea is
  DiffGuideSamp's (M. Li et al., "Difficulty-guided sampling: bridging the target gap between dataset
  distillation and high-quality sample generation", by the first author of the paper memdistill implements).

A pool is an ordinary image set whose candidate j of class c was sampled with image index j (sample module),
so the first ceil(F x IPC) candidates of a larger pool are the pool of factor F, and a pool does not depend on
batch size or process count. Selection reads the pool from disk (8-bit images), so selecting from a kept
pool later (``--from-pool``) gives the same set as selecting right after sampling.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from .baselines import herding_order
from .errors import UserError

log = logging.getLogger(__name__)

RULES = ("random", "herding", "prototype", "kcenter", "confident", "difficulty")
NEEDS_JUDGE = ("herding", "prototype", "kcenter", "confident", "difficulty")


def pool_size(factor: float, ipc: int) -> int:
    """Candidates per class of a pool of factor F: ceil(F x IPC) (a tolerance keeps 1.1 x 10 at 11)."""
    return max(ipc, math.ceil(factor * ipc - 1e-9))


def kcenter_order(features: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center (Gonzalez 1985): the first pick is the row farthest from the mean of all rows, each next
    pick the row farthest from its nearest pick so far; Euclidean distances, ties to the lowest row.
    On points of a line the two ends come first.

    features (n, D) -> k distinct row indices, in pick order.
    """
    feats = features.detach().flatten(1).double()
    n = feats.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} rows")
    if k == 0:
        return []
    # argmax returns the first maximum: ties go to the lowest row
    first = int(torch.argmax((feats - feats.mean(0)).norm(dim=1)))
    order = [first]
    nearest = (feats - feats[first]).norm(dim=1)  # (n,) distance to the nearest pick
    for _ in range(k - 1):
        masked = nearest.clone()
        masked[order] = -1.0  # a picked row is never picked again, even among duplicates at distance 0
        i = int(torch.argmax(masked))
        order.append(i)
        nearest = torch.minimum(nearest, (feats - feats[i]).norm(dim=1))
    return order


def confident_order(probabilities: torch.Tensor, k: int) -> list[int]:
    """The k rows of the highest probability (n,) of the conditioning class, highest first (ties: lowest row)."""
    if not 0 <= k <= probabilities.shape[0]:
        raise ValueError(f"cannot pick {k} of {probabilities.shape[0]} rows")
    return torch.sort(-probabilities.double(), stable=True).indices[:k].tolist()


def difficulty_order(candidate_loss: torch.Tensor, real_loss: torch.Tensor, k: int) -> list[int]:
    """Stratified picking (DiffGuideSamp's idea): the real losses (m,) are cut into k bins of equal mass, and
    bin i (i = 0..k-1, easiest first) gets the unused candidate whose loss (n,) lies nearest the bin's median,
    the real losses' quantile (i + 0.5) / k; ties go to the lowest candidate. The k picks thus follow the real
    data's distribution of difficulty rather than the easiest (most confident) candidates.

    -> k distinct candidate indices, in bin order.
    """
    n = candidate_loss.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} rows")
    if real_loss.numel() == 0:
        raise ValueError("difficulty selection needs the loss of at least one real image")
    levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    targets = torch.quantile(real_loss.double().flatten(), levels)  # (k,) bin medians
    loss = candidate_loss.double()
    used = torch.zeros(n, dtype=torch.bool)
    order = []
    for target in targets:
        gap = (loss - target).abs()
        gap[used] = math.inf
        i = int(torch.argmin(gap))
        order.append(i)
        used[i] = True
    return order


def random_order(n: int, k: int, seed: int, class_index: int) -> list[int]:
    """k of n candidates at random, from a generator of (seed, class) alone (independent of the other classes)."""
    from .diffusion import image_generator

    return torch.randperm(n, generator=image_generator(seed, class_index, 0))[:k].tolist()


def choose(rule: str, images: torch.Tensor, label: int, k: int, seed: int = 0, judge=None,
           real: torch.Tensor | None = None) -> list[int]:
    """The ``k`` candidates that ``rule`` keeps among ``images`` (n, C, H, W) in [-1, 1] of one class: ``label``
    is the class's index in the judge's classes (in the model's class list for random, which needs no judge);
    ``real``: what the rule needs of that class's real train images (real_statistics: the judge's losses (m,)
    for difficulty, their mean feature (D,) for prototype). Returns candidate indices in pick order;
    ValueError when a judged rule gets no judge (or no real statistic), UserError for an unknown rule."""
    if rule == "random":
        return random_order(len(images), k, seed, label)
    if judge is None:
        raise ValueError(f"rule {rule!r} needs a judge")
    if rule in ("herding", "kcenter"):
        feats = judge.features(images)
        return herding_order(feats, k) if rule == "herding" else kcenter_order(feats, k)
    if rule == "prototype":
        if real is None:
            raise ValueError("prototype selection needs the mean feature of the class's real images")
        return herding_order(judge.features(images), k, target=real)
    if rule == "confident":
        return confident_order(judge.probabilities(images)[:, label], k)
    if rule == "difficulty":
        labels = torch.full((len(images),), label, dtype=torch.long)
        return difficulty_order(judge.losses(images, labels), real, k)
    raise UserError(f"unknown selection rule {rule!r}; allowed: {', '.join(RULES)}")


def run_data(run) -> dict | None:
    """{"data", "subset"} that the run folder ``run`` (a training run's manifest.json) was trained on, when its
    --data is an embedded set or a folder that still exists; else None."""
    from .data import EMBEDDED

    if not isinstance(run, str) or not run:
        return None
    try:
        config = json.loads((Path(run) / "manifest.json").read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    data = config.get("data") if isinstance(config, dict) else None
    if isinstance(data, str) and (data in EMBEDDED or Path(data).is_dir()):
        return {"data": data, "subset": config.get("subset")}
    return None


def judge_data_default(pool_manifest: dict) -> str | None:
    """The dataset whose train split judges a pool: the --data of the run that trained its model (run_data of
    ``source["run"]``); else the embedded set its data identity names (e.g. "mnist5k:train") or a shipped
    model's own dataset; None when unknown (a folder dataset whose run is not at hand)."""
    from .data import EMBEDDED
    from .pretrained import SHIPPED_DATA

    source = pool_manifest.get("source")
    source = source if isinstance(source, dict) else {}
    recorded = run_data(source.get("run"))
    if recorded is not None:
        return recorded["data"]
    data = str(pool_manifest.get("data") or "").split(":", 1)[0]
    if data in EMBEDDED:
        return data
    return SHIPPED_DATA.get(source.get("model"))


def select_from_pool(pool: str | Path, rule: str, ipc: int, out: str | Path, *, size: int | None = None,
                     seed: int = 0, judge_data: str | None = None, judge_subset: str | None = None, judge_net: str = "convnet3",
                     judge_epochs: int = 5, judge_seed: int = 0, judge_cache: str | Path | None = None, device: str = "cpu",
                     overwrite: bool = False, kept_pool: bool = True, config: dict | None = None,
                     factor: float | None = None) -> Path:
    """Keep ``ipc`` of the first ``size`` candidates (default: all) of every class of the image set ``pool`` by
    ``rule`` and write them (in pick order) as the image set ``out``; ``seed`` drives the random rule. The judge (judge.load_judge) is trained on
    the real train split of ``judge_data`` (classes ``judge_subset``; default: judge_data_default) at the pool's
    resolution.

    The manifest keeps the pool's fields (model, seed, data) and adds "selection": pool factor and size, rule,
    judge identity (None for random) and, per class, the kept candidate indices; ``config`` updates its
    "config" (the sampling settings that asked for the selection). The pool factor (``factor``, the F that
    gave size = ceil(F x ipc); default size / ipc) is written both as selection "pool_factor" and config
    "pool", so the two never disagree. Raises UserError for a pool smaller than ``size`` or ``ipc``, classes
    the judge does not know, or data that cannot be found.
    """
    from .imageset import check_target, read_image_set, write_image_set

    out = check_target(out, overwrite)
    images, labels, class_names, manifest = read_image_set(pool)
    counts = [int((labels == c).sum()) for c in range(len(class_names))]
    size = min(counts) if size is None else size
    if min(counts) < size or size < ipc:
        raise UserError(f"the pool {pool} holds {min(counts)} candidates of some class; selecting {ipc} per class "
                        f"from {size} needs at least {max(size, ipc)} (sample a larger --pool)")
    judge, real = None, {}
    if rule in NEEDS_JUDGE:
        judge, real = _judge_for(manifest, class_names, images.shape[1], images.shape[-1], rule, judge_data,
                                      judge_subset, judge_net, judge_epochs, judge_seed, judge_cache, device, pool)
    picks, kept = [], []
    # The random rule draws per class from (seed, the class's position in the model's class list), so a set
    # sampled with --classes keeps the same picks.
    positions = manifest.get("classes") if isinstance(manifest.get("classes"), list) else range(len(class_names))
    for c, name in enumerate(class_names):
        idx = (labels == c).nonzero().flatten()[:size]  # candidate j of the class is its image number j
        label = judge.spec.class_names.index(name) if judge is not None else int(positions[c])
        order = choose(rule, images[idx], label, ipc, seed, judge, real.get(name))
        kept.append(order)
        picks.append(idx[order])
    chosen = torch.cat(picks)
    fields = {key: v for key, v in manifest.items()
              if key not in ("versions", "class_names", "channels", "resolution", "counts", "ipc", "grid")}
    factor = factor if factor is not None else size / ipc
    config = {**(fields.pop("config", None) or {}), **(config or {}), "ipc": ipc, "pool": factor}
    fields.update(config=config, selection={
        "rule": rule, "pool_factor": factor, "pool_size": size,
        "pool": str(Path(pool).resolve()) if kept_pool else None,
        "judge": judge.identity() if judge is not None else None, "seed": seed, "kept": kept})
    log.info("selected %d of %d candidates per class by %s", ipc, size, rule)
    return write_image_set(out, images[chosen], labels[chosen], class_names, fields, overwrite=overwrite)


def judge_train_set(manifest: dict, class_names: list[str], channels: int, side: int, rule: str, judge_data,
                    subset, net: str, cache, where: str):
    """The real train split (data.ImageDataset) a ``rule`` judge of ``class_names`` is trained on, with
    everything the judge needs checked without training it: the data (``judge_data``, default
    judge_data_default(manifest)) opens at ``side`` px and ``channels`` and holds every class, the net
    builds for those images and the judge cache folder can be written. Cheap, so sampling calls it before
    sampling a pool. ``where`` names what is selected from in messages ("the pool runs/p").
    Raises UserError naming --judge-data, --judge-net or --judge-cache."""
    from .data import open_dataset
    from .judge import default_cache
    from .manifest import check_output_folder
    from .nets import build_net

    data = judge_data or judge_data_default(manifest)
    if data is None:
        raise UserError(f"--select {rule} needs a judge trained on the real train images, and {where} records no "
                        "embedded dataset: give --judge-data (the real train images)")
    train = open_dataset(data, "train", subset=subset, resolution=side, channels=channels)
    missing = [n for n in class_names if n not in train.class_names]
    if missing:
        raise UserError(f"--judge-data {data}: it lacks the classes {', '.join(missing[:5])} of {where}")
    try:
        build_net(net, len(train.class_names), channels, side)
    except UserError as err:
        raise UserError(f"--judge-net: {err}") from None
    check_output_folder(cache if cache is not None else default_cache(), "--judge-cache")
    return train


def _judge_for(manifest: dict, class_names: list[str], channels: int, side: int, rule: str, judge_data, subset,
               net: str, epochs: int, seed: int, cache, device: str, pool):
    """(judge, real_statistics of ``class_names``) for a pool of those classes."""
    from .devices import resolve_device
    from .judge import load_judge

    train = judge_train_set(manifest, class_names, channels, side, rule, judge_data, subset, net, cache,
                            f"the pool {pool}")
    judge = load_judge(train, net, epochs, seed, cache, resolve_device(device))
    return judge, real_statistics(rule, judge, train, class_names)


def real_statistics(rule: str, judge, train, class_names: list[str]) -> dict[str, torch.Tensor]:
    """What ``rule`` needs of the real train images (data.ImageDataset ``train``) of each class, by class name:
    the judge's per-image losses (m,) for difficulty, the mean of its features (D,) for prototype; {} for the
    other rules."""
    from .data import load_tensors

    if rule not in ("difficulty", "prototype"):
        return {}
    x, y = load_tensors(train)
    if rule == "difficulty":
        values = judge.losses(x, y)
        return {n: values[y == train.class_names.index(n)] for n in class_names}
    feats = judge.features(x)
    return {n: feats[y == train.class_names.index(n)].mean(0) for n in class_names}
