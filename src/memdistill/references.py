"""Reference accuracies a distilled set is scored against (memdistill.scores), under the set's own protocol:

- full data: classifiers trained on the whole real train split, always with hard labels (HLR, see score_set);
- random real: classifiers trained on a random real subset with the set's IPC (one subset, drawn with the
  protocol's seed as the random baseline of ``run`` draws it; repeats differ by classifier seed).

Each is trained once per (train data incl. subset and resolution, test data, net and every protocol setting,
IPC for random, repeats, seed) and cached on disk as JSON with that config: reused when the config matches,
trained again when any part changes. Cache folder: --references-cache, else $MEMDISTILL_CACHE/references, else
~/.cache/memdistill/references.

Full-data budget: the protocol's epochs are per IPC (3000 epochs at IPC 1 down to 300 above IPC 500) because a
tiny set gives one or two SGD steps per epoch. One epoch of a whole train split is already many steps (63 at
batch 64 on mnist5k's 4000 images), and measured on this project's shared CPU one epoch of ConvNet-3 on mnist5k
took 29 s (one thread), so even the protocol's last row (300 epochs) would cost hours per classifier. The
full-data reference trains FULL_DATA_EPOCHS = 10 epochs (630 SGD steps on mnist5k, with the protocol's lr decay
at 2/3 and 5/6): about 5 minutes per classifier there, and 2 epochs already reached 92 % top-1 on mnist5k, so 10
are near the plateau. --full-data-epochs changes it (and keys the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch

from .checks import flag, require_finite, require_int
from .errors import UserError
from .evaluate import EvalConfig, evaluate_repeats, with_default_flip
from .manifest import check_output_folder, write_json_atomic
from .scores import DEFAULT_ARS_LAMBDA, DEFAULT_WEIGHT, check_scaling, score_repeats

log = logging.getLogger(__name__)

FULL_DATA_EPOCHS = 10  # see the module docstring: the full-data budget and why
CACHE_ENV = "MEMDISTILL_CACHE"
# Settings that change how fast a classifier trains, not what it learns: not part of a reference's key.
_NOT_KEYED = ("device", "compile")


def references_cache(option: str | None = None) -> Path:
    """The references' cache folder: ``option`` (--references-cache), else $MEMDISTILL_CACHE/references, else
    ~/.cache/memdistill/references."""
    if option:
        return Path(option).expanduser()
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "memdistill") / "references"


def without_augmentation(config: EvalConfig, result: dict | None) -> EvalConfig:
    """The protocol 'without augmentation' of ARS: no CutMix, flip, colour jitter or lighting noise. (The random
    resized crop of the train transform stays: it is how images reach the net's size.) ``result``: the evaluation
    with augmentation this one is compared with; with soft labels its teacher labels this one too
    (EvalConfig.with_teacher_of: only the student's augmentation differs, and --teacher full is not trained again
    without augmentation over the first one's file). None: ``config``'s teacher is already that one."""
    config = config.with_teacher_of(result) if result is not None else config
    return replace(config, cutmix_beta=0.0, flip=False, jitter=False, lighting=False)


@dataclass
class ScoreConfig:
    """DD-Ranking scores in a report (options as the command line spells them)."""

    scores: bool = False  # HLR, IOR, LRS beside top-1: trains (once, cached) the full-data and random references
    ars: bool = False  # also ARS: every set and the random reference evaluated again without augmentation
    reference_data: str | None = None  # the real train data of the references; None: the set's embedded dataset
    references_cache: str | None = None  # None: $MEMDISTILL_CACHE/references or ~/.cache/memdistill/references
    full_data_epochs: int = FULL_DATA_EPOCHS
    lrs_weight: float = DEFAULT_WEIGHT
    ars_lambda: float = DEFAULT_ARS_LAMBDA
    score_scaling: str = "fraction"  # or "points", as DD-Ranking's code
    # Options that act only with scores: typed without them they are refused (options.config_from_args)
    TYPED_ONLY: ClassVar[tuple[str, ...]] = ("scores", "reference_data", "references_cache", "full_data_epochs",
                                             "lrs_weight", "ars_lambda", "score_scaling")

    def refuse_idle(self, typed: set[str], prefix: str = "") -> None:
        """UserError naming the option when one of ``typed`` (fields whose option the user gave) would do nothing:
        a score setting without --scores (or --ars), --ars-lambda without --ars (it weighs ARS alone, and bench
        scores without ARS by default), --ars with an explicit --no-scores."""
        idle = [name for name in self.TYPED_ONLY if name in typed and name != "scores"]
        if idle and not self.wanted:
            raise UserError(f"{flag(idle[0], prefix)} is used only with {flag('scores', prefix)}; without it it "
                            "would be ignored")
        if "ars_lambda" in typed and not self.ars:
            raise UserError(f"{flag('ars_lambda', prefix)} weighs ARS, which only {flag('ars', prefix)} computes; "
                            "without it it would be ignored")
        if self.ars and "scores" in typed and not self.scores:
            raise UserError(f"{flag('ars', prefix)} computes scores, which {flag('no_scores', prefix)} turns off: give "
                            "one of them")

    @property
    def wanted(self) -> bool:
        return self.scores or self.ars

    def validate(self) -> None:
        """UserError naming the option for a bad value (and an unwritable cache folder when scores are wanted)."""
        require_int(flag("full_data_epochs"), self.full_data_epochs, low=1)
        require_finite(flag("lrs_weight"), self.lrs_weight, 0, 1)
        require_finite(flag("ars_lambda"), self.ars_lambda, 0, 1)
        check_scaling(self.score_scaling)
        if self.wanted:
            check_output_folder(references_cache(self.references_cache), "--references-cache")


SCORE_HELP = {
    "scores": "report DD-Ranking's HLR, IOR and LRS: trains full-data and random-real references once under the "
              "same protocol and caches them (see --references-cache)",
    "ars": "also ARS: evaluate every set and the random reference again without augmentation (no CutMix, flip, "
           "jitter, lighting); implies --scores",
    "reference_data": "real train images of the references: an embedded dataset or a folder (default: the embedded "
                      "dataset the set was made from)",
    "references_cache": "folder of cached reference accuracies (default: $MEMDISTILL_CACHE/references, else "
                        "~/.cache/memdistill/references)",
    "full_data_epochs": "epochs of the full-data reference (the protocol's table is per IPC; whole splits need "
                        "far fewer passes)",
    "lrs_weight": "w of LRS = score of w * IOR - (1 - w) * HLR, 0 to 1",
    "ars_lambda": "lambda of ARS, weight of the with-augmentation difference, 0 to 1",
    "score_scaling": "fraction (differences / 100 before the exponential, scores in 0..1) or points (as "
                     "DD-Ranking's code)",
}


def _key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class References:
    """The real train and test data a set is scored against, and its cached reference accuracies.

    train_ds, test_ds: memdistill.data datasets of the same classes in the same order, at the set's resolution
    and channels. Tensors are loaded only when a reference has to be trained. Raises UserError when the class
    lists differ or the cache folder cannot be written.
    """

    def __init__(self, train_ds, test_ds, test_name: str, cache: str | Path | None = None):
        if list(train_ds.class_names) != list(test_ds.class_names):
            raise UserError(f"the reference train data has classes {', '.join(train_ds.class_names[:5])} ..., the "
                            f"test set {', '.join(test_ds.class_names[:5])} ...: both need the same classes")
        self.train_ds, self.test_ds, self.test_name = train_ds, test_ds, test_name
        self.cache = check_output_folder(references_cache(str(cache) if cache else None), "--references-cache")
        self._tensors: tuple | None = None

    def _data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from .data import load_tensors

        if self._tensors is None:
            self._tensors = (*load_tensors(self.train_ds), *load_tensors(self.test_ds))
        return self._tensors

    def _spec(self, kind: str, config: EvalConfig, **extra) -> dict:
        if config.labels == "hard":  # the soft-label settings do not act on hard labels: not part of the key
            config = config.with_hard_labels()
        protocol = {k: v for k, v in asdict(config).items() if k not in _NOT_KEYED}
        if config.labels == "soft":  # a teacher file replaced in place must not reuse the old teacher's references
            from .softlabels import sha256_of

            protocol["teacher_sha256"] = sha256_of(config.teacher)
        return {"kind": kind, "train": self.train_ds.identity, "test": self.test_ds.identity, "protocol": protocol,
                **extra}

    def _cached(self, spec: dict, compute: Callable[[], dict]) -> dict:
        """The stored result of ``spec``, or compute, store and return it. A file that cannot be read, or holds
        another config, is replaced."""
        path = self.cache / f"{spec['kind']}-{_key(spec)}.json"
        spec = json.loads(json.dumps(spec, default=str))  # as it reads back from JSON
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                if saved.get("spec") == spec and isinstance(saved.get("result"), dict):
                    log.info("reference %s: cached in %s", spec["kind"], path)
                    return saved["result"]
            except (OSError, ValueError, AttributeError):
                pass
            log.warning("reference cache %s is unreadable or of another config: training it again", path)
        result = compute()
        self.cache.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"spec": spec, "result": result})
        return result

    def full_data(self, config: EvalConfig, epochs: int = FULL_DATA_EPOCHS) -> dict:
        """evaluate_repeats' result of classifiers trained on the whole train split for ``epochs`` epochs
        (see the module docstring for the budget) with HARD labels, every other setting as ``config``: HLR
        compares hard-label accuracies also when the set is evaluated with soft labels (DD-Ranking's soft-label
        evaluator, ddranking/metrics/soft_label.py), so soft-label settings neither train nor key it."""
        config = replace(with_default_flip(config.with_hard_labels(), self.test_name), epochs=epochs)

        def train() -> dict:
            x, y, tx, ty = self._data()
            log.info("reference full data: %s on %d real images, %d epochs", config.net, len(y), epochs)
            return evaluate_repeats(x, y, tx, ty, self.train_ds.num_classes, config)

        return self._cached(self._spec("full", config), train)

    def random_real(self, config: EvalConfig, ipc: int) -> dict:
        """evaluate_repeats' result on ``ipc`` random real images per class (drawn with config.seed), under
        ``config`` (its epochs None: the protocol's by IPC, as for the set)."""
        from .baselines import select_indices

        config = with_default_flip(config, self.test_name)

        def train() -> dict:
            x, y, tx, ty = self._data()
            picks = torch.tensor([i for chosen in select_indices("random", self.train_ds, ipc, config.seed)
                                  for i in chosen])
            log.info("reference random real: %s on %d images per class", config.net, ipc)
            return evaluate_repeats(x[picks], y[picks], tx, ty, self.train_ds.num_classes, config)

        return self._cached(self._spec("random", config, ipc=ipc), train)


def open_references(data: str, test: str, test_split: str, subset: str | None, resolution: int, channels: int,
                    cache: str | Path | None = None) -> References:
    """References of a set of ``channels`` x ``resolution`` px images: real train images ``data`` (an embedded
    dataset's train split or a folder) and test images ``test`` (``test_split`` of an embedded one) of the
    classes ``subset``. Raises UserError for missing data or classes that differ."""
    from .data import open_dataset

    train_ds = open_dataset(data, "train", subset, resolution, channels=channels)
    test_ds = open_dataset(test, test_split, subset, resolution, channels=channels)
    return References(train_ds, test_ds, test, cache)


def _best(result: dict) -> list[float]:
    return [r["best"] for r in result["per_repeat"]]


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("best_mean", "best_std", "epochs")} | {"per_repeat": _best(result)}


def score_set(result: dict, references: References, config: EvalConfig, ipc: int, cfg: ScoreConfig,
              noaug_result: dict | None = None, hard_result: dict | None = None) -> dict:
    """HLR, IOR, LRS (and ARS when ``noaug_result``, the set evaluated under without_augmentation(config, result),
    is given) of a set whose evaluate_repeats ``result`` was measured under ``config`` at ``ipc`` images per
    class; see memdistill.scores.score_repeats. Adds "full_data" and "random_real" (best top-1 per repeat, mean,
    std, epochs) and the reference settings.

    With soft labels the scores follow DD-Ranking's soft-label evaluator (ddranking/metrics/soft_label.py):
    HLR = full data (hard labels) - the set with hard labels, from ``hard_result`` (the set evaluated under
    config.with_hard_labels(), required then: ValueError without it); IOR = the set's soft-label accuracy - the
    random reference's soft-label accuracy. "set_hard" then reports the set's hard-label accuracy."""
    soft = config.labels == "soft"
    if soft and hard_result is None:
        raise ValueError("soft labels: HLR needs the set's hard-label accuracy (hard_result)")
    config = config.with_teacher_of(result)  # the references are labelled by the very teacher the set was
    full = references.full_data(config, cfg.full_data_epochs)
    random = references.random_real(config, ipc)
    noaug, random_noaug = {}, None
    if noaug_result is not None:
        random_noaug = references.random_real(without_augmentation(config, None), ipc)
        noaug = {"set_noaug": _best(noaug_result), "random_noaug": _best(random_noaug)}
    scores = score_repeats(_best(result), _best(full), _best(random), cfg.lrs_weight, cfg.score_scaling,
                           ars_lambda=cfg.ars_lambda, set_hard=_best(hard_result) if soft else None, **noaug)
    scores.update(full_data=_summary(full), random_real=_summary(random), reference_data=references.train_ds.identity,
                  ipc=ipc, labels=config.labels)
    if soft:
        scores["set_hard"] = _summary(hard_result)
    if noaug_result is not None:
        scores["set_noaug"], scores["random_noaug"] = _summary(noaug_result), _summary(random_noaug)
    return scores


def references_for(result: dict, cfg: ScoreConfig, subset: str | None, test_split: str = "test",
                   default_data: str | None = None) -> References:
    """The References of an evaluate_image_set ``result`` (its test data, resolution and channels): train data
    --reference-data, else ``default_data``, else the embedded dataset it was tested on. UserError when none."""
    from .evaluate import NO_FLIP_DATASETS

    data = cfg.reference_data or default_data or (result["test_data"] if result["test_data"] in NO_FLIP_DATASETS
                                                  else None)
    if data is None:
        raise UserError("--reference-data is required for scores of a set tested on a folder: the real train images "
                        "of its classes (the full-data and random-real references train on them)")
    return open_references(data, result["test_data"], test_split, subset, result["resolution"], result["channels"],
                           cfg.references_cache)


def check_reference_data(cfg: ScoreConfig, test: str | None, default_data: str | None = None) -> None:
    """Before any training: scores of a set tested on a folder need --reference-data (UserError)."""
    from .evaluate import NO_FLIP_DATASETS

    if cfg.wanted and not (cfg.reference_data or default_data) and test is not None and test not in NO_FLIP_DATASETS:
        raise UserError(f"--reference-data is required with --scores when --test is a folder ({test}): the real train "
                        "images of its classes")
