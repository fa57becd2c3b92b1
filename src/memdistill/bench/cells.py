"""The grid's units, each made once and reused on resume: fine-tuned models, image sets, evaluated cells and
set metrics (see the layout in memdistill.bench)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..baselines import select_real
from ..devices import resolve_device
from ..errors import UserError
from ..evaluate import evaluate_image_set, resolve_test_set
from ..finetune import finetune
from ..manifest import NUMBER, check_output_folder, read_json_object, refuse_changed_settings, refuse_existing, write_json_atomic
from ..sample import sample_set
from ..train import TrainConfig
from .config import BenchConfig, MEMORY_OF, REAL_METHODS, parse_method

log = logging.getLogger(__name__)


# ----- the run ------------------------------------------------------------------------------------------------
# Settings that change what is observed or how fast, not what is computed: a resume may change them.
_FREE = {"finetune": {"checkpoint_every", "log_every", "device", "progress", "memory"},
         "sample": {"device", "batch_size", "model", "ipc", "classes", "judge_cache"},
         "eval": {"device", "net", "repeats"}}


def _fingerprint(cfg: BenchConfig, test: str) -> dict:
    """The settings every stored model, set, cell and metric depends on (the lists of methods, IPCs, nets
    and sweep values may grow between invocations: new cells are added, the old ones stay valid)."""
    fp = {name: {k: v for k, v in dataclasses.asdict(getattr(cfg, name)).items() if k not in free}
          for name, free in _FREE.items()}
    fp["bench"] = {"repeats": cfg.repeats, "test": test, "feature_net": cfg.feature_net,
                   "feature_epochs": cfg.feature_epochs, "coverage_k": cfg.coverage_k}
    return json.loads(json.dumps(fp, default=str))


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _is_export(spec: str) -> bool:
    from ..models.io import EXPORT_CONFIG
    from ..pretrained import resolve_model

    path = resolve_model(spec)
    if not (path.is_dir() and (path / EXPORT_CONFIG).is_file()):
        return False
    try:
        return "class_names" in json.loads((path / EXPORT_CONFIG).read_text())
    except (OSError, ValueError):
        return False


class _Bench:
    """Shared state of one invocation: settings, data, feature space and the timing log."""

    def __init__(self, cfg: BenchConfig, out: Path, test: str):
        from ..data import open_dataset

        self.cfg, self.out, self.test = cfg, out, test
        ft = cfg.finetune
        self.train_ds = open_dataset(ft.data, "train", ft.subset, ft.resolution, ft.skip_bad_images, ft.channels,
                                     ft.labels)
        self.timings: dict[str, float] = {}
        path = out / "timings.json"
        if path.is_file():
            saved = read_json_object(path, what="delete it to drop the stored timings")
            self.timings = {k: float(v) for k, v in saved.items() if isinstance(v, NUMBER) and not isinstance(v, bool)}
        self._features = None
        self._judge = None
        self.references = None  # memdistill.references.References, opened with the first scored cell

    def timed(self, name: str, fn: Callable, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = time.perf_counter() - t0
        write_json_atomic(self.out / "timings.json", self.timings)
        return result

    # -- models and sets
    def model(self, name: str, ft: TrainConfig, folder: Path) -> Path:
        if (folder / "manifest.json").is_file():
            log.info("model %s: already fine-tuned in %s", name, folder)
            return folder
        log.info("model %s: fine-tuning (memory=%s, %s steps) into %s", name, ft.memory, ft.steps, folder)
        self.timed(f"finetune {name}", finetune, ft, folder,
                   resume=(folder / "checkpoints" / "last.pt").exists(), overwrite=True)
        return folder

    def draw(self, method: str, model: str | None, ipc: int, folder: Path) -> Path:
        """Make the image set of ``method`` (a base method, with guidance levers if any) with ``ipc`` images per
        class in ``folder``."""
        if method in REAL_METHODS:
            return self.timed(f"select {folder.name}", select_real, method, self.train_ds, ipc, self.cfg.sample.seed,
                              folder, overwrite=True)
        variant = parse_method(method)
        sample = dataclasses.replace(self.cfg.sample, model=model, ipc=ipc, **variant.sample_overrides())
        if sample.mode_guidance > 0 and sample.mode_data is None:
            # the modes of the data every set is compared on (as in run), not of the data the model came from
            sample = dataclasses.replace(sample, mode_data=self.cfg.finetune.data)
        if variant.base == "dit" and not _is_export(model):
            # A bare pretrained checkpoint carries no class list or codec: take the fine-tuning data's.
            ft = self.cfg.finetune.with_resolved_codec()
            sample = dataclasses.replace(sample, subset=ft.subset, codec=ft.codec, vae=sample.vae or ft.vae)
        return self.timed(f"sample {folder.name}", sample_set, sample, folder, overwrite=True)

    def image_set(self, method: str, model: str | None, ipc: int, largest: int, sets: Path) -> Path:
        variant = parse_method(method)
        folder = sets / f"{variant.slug()}-ipc{ipc}"
        if (folder / "manifest.json").is_file():
            return folder
        if "select" in variant.levers:
            return self.selected_set(variant.sampled(), model, variant.levers["select"], ipc, largest, sets, folder)
        # mode guidance's default number of modes is the IPC, so its sets are not prefixes of one another
        if ipc == largest or "modes" in variant.levers:
            return self.draw(method, model, ipc, folder)
        # Image i of class c is drawn from its own seed (seed, c, i) when sampling, and the real baselines
        # pick in a prefix-consistent order (baselines module): the first k images per class of the IPC-max
        # set are the IPC-k set (up to the last-bit rounding of batched float kernels). So each method is
        # drawn once, at the largest IPC, and the smaller sets are its prefixes.
        source = self.image_set(method, model, largest, largest, sets)
        return _prefix_set(source, ipc, folder)

    def selected_set(self, base: str, model: str | None, select: dict, ipc: int, largest: int, sets: Path,
                     folder: Path) -> Path:
        """IPC candidates per class kept by select["rule"] from the pool of factor select["pool"] of ``base`` (a
        base method, with its guidance levers if any).

        One pool per (method, model, F) serves every rule and IPC: it is sampled once with ceil(F x largest IPC)
        candidates per class, and candidate j is image j of the plain sampler, so its first ceil(F x k)
        candidates are the pool of IPC k."""
        from ..selection import pool_size, select_from_pool

        factor, s, ft = select["pool"], self.cfg.sample, self.cfg.finetune
        pool = sets / f"pool-{base.replace(':', '-')}-x{factor:g}-n{pool_size(factor, largest)}"
        if not (pool / "manifest.json").is_file():
            self.draw(base, model, pool_size(factor, largest), pool)
        return self.timed(f"select {folder.name}", select_from_pool, pool, select["rule"], ipc, folder,
                          size=pool_size(factor, ipc), seed=s.seed, judge_data=s.judge_data or ft.data,
                          judge_subset=None if s.judge_data else ft.subset, judge_net=s.judge_net,
                          judge_epochs=s.judge_epochs, judge_cache=s.judge_cache, device=s.device, overwrite=True)

    # -- evaluation and metrics
    def cell(self, path: Path, set_folder: Path, net: str, label: str, hard: bool = False,
             noaug_of: dict | None = None) -> dict:
        """The evaluation of ``set_folder`` by ``net`` (stored in ``path``, reused from there); ``hard``: with hard
        labels whatever --eval-labels says (the set's HLR under soft labels, references.score_set); ``noaug_of``:
        the cell's evaluation with augmentation, to evaluate the set again without augmentation and with its
        teacher (references.without_augmentation, for ARS)."""
        from ..references import without_augmentation

        if path.is_file():
            return read_json_object(path, CELL_KEYS, what="delete it to evaluate that cell again")
        log.info("cell %s: evaluating %s, %d repeats", label, net, self.cfg.repeats)
        config = dataclasses.replace(self.cfg.eval, net=net, repeats=self.cfg.repeats)
        config = config.with_hard_labels() if hard else config
        config = without_augmentation(config, noaug_of) if noaug_of is not None else config
        t0 = time.perf_counter()
        # soft labels: one teacher per net, trained on the fine-tuning data's train split and kept in teacher/
        result = self.timed(f"evaluate {label}", evaluate_image_set, set_folder, self.test, config,
                            subset=self.cfg.finetune.subset, teacher_dir=self.out / "teacher",
                            teacher_data=self.cfg.finetune.data)
        result["wall_s"] = time.perf_counter() - t0
        write_json_atomic(path, result)
        log.info("cell %s: %.2f ± %.2f %%", label, result["best_mean"], result["best_std"])
        return result

    def set_metrics(self, path: Path, set_folder: Path, label: str) -> dict:
        from ..imageset import read_image_set
        from ..metrics import coverage, within_class_diversity

        if path.is_file():
            data = read_json_object(path, {"coverage": NUMBER}, what="delete it to measure that set again")
            if data.get("diversity") is not None and not isinstance(data["diversity"], NUMBER):
                raise UserError(f"{path}: 'diversity' must be a number or null; delete it to measure that set again")
            return data
        judge, real_f, real_y = self.feature_space()
        t0 = time.perf_counter()
        images, labels, _, _ = read_image_set(set_folder)
        feats = judge.features(images)
        result = {"diversity": _nan_to_none(within_class_diversity(feats, labels)),
                  "coverage": coverage(real_f, real_y, feats, labels, self.cfg.coverage_k),
                  "k": self.cfg.coverage_k, "feature_net": self.cfg.feature_net, "set": str(set_folder)}
        self.timings[f"metrics {label}"] = time.perf_counter() - t0
        write_json_atomic(self.out / "timings.json", self.timings)
        write_json_atomic(path, result)
        return result

    def judge(self):
        """The feature classifier of the metrics (judge.load_judge: trained once per dataset and settings, shared
        through the judge cache with every other command)."""
        if self._judge is None:
            from ..judge import load_judge

            cfg = self.cfg
            self._judge = load_judge(self.train_ds, cfg.feature_net, cfg.feature_epochs, cfg.eval.seed,
                                     cfg.sample.judge_cache, resolve_device(cfg.eval.device), "--sample-judge-cache")
        return self._judge

    def feature_space(self):
        """(judge, real test features (N, D), test labels (N,)); extractor.json records the judge and its
        top-1 on the real test set."""
        if self._features is not None:
            return self._features
        from ..data import load_tensors, open_dataset
        from ..metrics import classifier_accuracy

        judge = self.judge()
        test_ds = open_dataset(self.test, "test", subset=self.cfg.finetune.subset, resolution=self.train_ds.resolution,
                               channels=self.train_ds.channels)
        test_x, test_y = load_tensors(test_ds)
        info = self.out / "features" / "extractor.json"
        if not info.is_file():
            acc = classifier_accuracy(judge.model, test_x, test_y, device=judge.device)
            info.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(info, {**judge.identity(), "test_top1": acc})
            log.info("feature extractor: %.2f %% top-1 on the real test set", acc)
        self._features = (judge, judge.features(test_x), test_y)
        return self._features

    def extractor_info(self) -> dict | None:
        path = self.out / "features" / "extractor.json"
        return read_json_object(path, {"net": str, "epochs": int, "test_top1": NUMBER},
                                what="delete the features folder to train the extractor again") if path.is_file() else None


# Keys of a cells/*.json that the tables read.
CELL_KEYS = {"best_mean": NUMBER, "best_std": NUMBER, "last_mean": NUMBER, "last_std": NUMBER, "per_repeat": list,
             "epochs": int}


def _prefix_set(source: Path, k: int, out: Path) -> Path:
    """The first ``k`` images of every class of the set ``source``, written as the set ``out``."""
    from ..imageset import read_image_set, write_image_set

    images, labels, class_names, manifest = read_image_set(source)
    keep = torch.cat([(labels == c).nonzero().flatten()[:k] for c in range(len(class_names))])  # read in index order
    fields = {key: v for key, v in manifest.items()
              if key not in ("versions", "class_names", "channels", "resolution", "counts", "ipc")}
    fields["config"] = dict(fields.get("config") or {}, ipc=k)
    if "source_indices" in fields:
        fields["source_indices"] = [picks[:k] for picks in fields["source_indices"]]
    fields["prefix_of"] = str(source)
    return write_image_set(out, images[keep], labels[keep], class_names, fields, overwrite=True)


def _check_coverage_k(cfg: BenchConfig, test: str, train_ds) -> None:
    """UserError unless every class of the real test set has more than --coverage-k images (the k-NN radius
    of coverage needs k neighbours of the class): checked up front, from the file list (headers only)."""
    from ..data import open_dataset

    test_ds = open_dataset(test, "test", subset=cfg.finetune.subset, resolution=train_ds.resolution,
                           channels=train_ds.channels, verify=False)
    counts = [int((test_ds.targets == c).sum()) for c in range(test_ds.num_classes)]
    if min(counts) <= cfg.coverage_k:
        c = counts.index(min(counts))
        raise UserError(f"--coverage-k {cfg.coverage_k}: coverage needs more than k real test images per class, and "
                        f"class {test_ds.class_names[c]!r} has {counts[c]}: lower --coverage-k (below "
                        f"{min(counts)}) or pass --no-metrics")


def _prepare(cfg: BenchConfig, out: str | Path, resume: bool, overwrite: bool) -> _Bench:
    """Check everything (options, the output folder, the data against the IPCs, the nets), then, only then,
    prepare ``out``: a refused command writes nothing."""
    from ..nets import build_net

    cfg.validate()
    out = check_output_folder(out)
    ft = cfg.finetune
    test = resolve_test_set(ft.data, cfg.test)
    if "dit" in cfg.base_methods() or set(MEMORY_OF) & set(cfg.base_methods()) or cfg.sweep:
        if ft.init is None:
            raise UserError("bench needs --init (the pretrained model) for the dit, minimax and adaptive methods")
    fingerprint = _fingerprint(cfg, test)
    refuse_existing(out, "a bench", overwrite=overwrite, resume=resume)
    if resume and (out / "config.json").is_file():
        refuse_changed_settings(read_json_object(out / "config.json", what="pass --overwrite to start afresh"),
                                fingerprint)

    bench = _Bench(cfg, out, test)
    ds = bench.train_ds
    ipcs = [cfg.sweep_ipc] if cfg.sweep else cfg.ipc_list()
    real = [m for m in cfg.method_list() if m in REAL_METHODS] if not cfg.sweep else []
    counts = [int((ds.targets == c).sum()) for c in range(ds.num_classes)]
    if real and max(ipcs) > min(counts):
        c = counts.index(min(counts))
        raise UserError(f"IPC {max(ipcs)} exceeds the {min(counts)} real images of class {ds.class_names[c]!r} that "
                        f"the {real[0]} baseline draws from")
    # Every net (and the feature net) is built once up front, so a bad name or depth fails before any work.
    for net in cfg.net_list():
        build_net(net, ds.num_classes, ds.channels, cfg.eval.image_size or ds.resolution, cfg.eval.norm)
    if cfg.metrics:
        build_net(cfg.feature_net, ds.num_classes, ds.channels, ds.resolution)
        _check_coverage_k(cfg, test, ds)

    # Every check passed: from here on the command writes.
    if not resume and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # refuse_existing let it through: --overwrite
        bench.timings = {}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", fingerprint)
    return bench
