"""`memdistill bench`: several distillation methods side by side, in the layout of the paper's Table 1.

Methods: random / herding (real images), dit (the pretrained model sampled without fine-tuning), minimax
(fine-tuned with FIFO memories) and adaptive (the paper's self-adaptive memories), and on request finetune
(fine-tuned without memory losses, a control); at several IPCs, for
several evaluation nets, each cell the mean +- std over repeats. Beside accuracy, each distilled set's
within-class diversity and coverage of the real test set (memdistill.metrics) in the feature space of a
classifier trained once on the real train split. ``sweep=True`` runs the sensitivity study of the paper's
Figure 4 instead: accuracy at one IPC against lambda_real, lambda_gen and the memory size N_R = N_G.

Layout of the output folder (every unit is written atomically; one that exists is not redone):
    models/<method>/                        fine-tune runs (finetune, minimax, adaptive), made once, reused everywhere
    sets/<method>-ipc<k>/                   image sets
    cells/<method>-ipc<k>-<net>.json        one evaluation (all repeats): the unit of resume
    metrics/<method>-ipc<k>.json            diversity and coverage of one set
    features/extractor.pt, extractor.json   the feature classifier of the metrics
    bench.json, bench.md, accuracy_vs_ipc.png
    sweep/{models,sets,cells,metrics}/..., sweep/sweep.json, sweep/sweep.md, sweep/<parameter>.png
    config.json, timings.json               the settings a resume must match; wall time per stage
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .baselines import select_real
from .checks import flag, require_finite
from .devices import resolve_device
from .errors import UserError
from .evaluate import EvalConfig, evaluate_image_set, resolve_test_set
from .finetune import finetune, finetune_defaults
from .manifest import (NUMBER, check_output_folder, read_json_object, refuse_changed_settings, refuse_existing,
                       write_json_atomic)
from .sample import SampleConfig, sample_set
from .train import TrainConfig

log = logging.getLogger(__name__)

METHODS = ("random", "herding", "dit", "minimax", "adaptive")
# Opt-in controls, not in the default grid: "finetune" is the same fine-tuning without memory losses, which
# separates what the memories do from what fine-tuning alone does.
EXTRA_METHODS = ("finetune",)
REAL_METHODS = ("random", "herding")
# the fine-tuned methods and their memory strategy
MEMORY_OF = {"finetune": "none", "minimax": "fifo", "adaptive": "adaptive"}
LABELS = {"random": "Random", "herding": "Herding", "dit": "DiT", "finetune": "Fine-tune (no memory)",
          "minimax": "Minimax", "adaptive": "Adaptive"}
SWEEP_PARAMETERS = ("lambda_real", "lambda_gen", "memory")
TIE_RULE = ("Bold: the best mean of the row and every method whose mean lies within one standard deviation "
            "(over repeats) of it; differences smaller than that spread are ties at this number of repeats.")


@dataclass
class BenchConfig:
    methods: str = ",".join(METHODS)
    ipcs: str = "1,10,50"
    nets: str = "convnet3"
    repeats: int = 3
    test: str | None = None  # real test images: None = the embedded dataset's test split; else a folder
    # diversity / coverage, in the feature space of a classifier trained on the real train split
    metrics: bool = True
    feature_net: str = "convnet3"
    feature_epochs: int = 5
    coverage_k: int = 5
    # sensitivity sweep (paper Figure 4): adaptive memory, one IPC, the first net; '' skips a parameter
    sweep: bool = False
    sweep_ipc: int = 10
    sweep_lambda_real: str = "0,0.001,0.002,0.004,0.008"
    sweep_lambda_gen: str = "0,0.004,0.008,0.016,0.032"
    sweep_memory: str = "16,32,64,128"  # N_R = N_G
    finetune: TrainConfig = field(default_factory=finetune_defaults)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # epochs None: the protocol's table (METHOD.md section 7)

    def method_list(self) -> list[str]:
        names = _split(self.methods, "method", str)
        allowed = METHODS + EXTRA_METHODS
        bad = [m for m in names if m not in allowed]
        if bad or not names:
            raise UserError(f"unknown method {bad[0]!r} in --method; allowed: {', '.join(allowed)} (comma-separated)"
                            if bad else f"--method is empty; allowed: {', '.join(allowed)}")
        return list(dict.fromkeys(names))

    def ipc_list(self) -> list[int]:
        ipcs = _split(self.ipcs, "ipc", int)
        if not ipcs or min(ipcs) < 1:
            raise UserError(f"--ipc must be positive integers such as 1,10,50; got {self.ipcs!r}")
        return sorted(set(ipcs))

    def net_list(self) -> list[str]:
        nets = list(dict.fromkeys(_split(self.nets, "eval-net", str)))
        if not nets:
            raise UserError("--eval-net is empty; give e.g. convnet3 or convnet6,resnetap10,resnet18")
        return nets

    def sweep_points(self) -> list[tuple[str, float | int]]:
        """(parameter, value) for every sweep point, parameter by parameter."""
        points: list[tuple[str, float | int]] = []
        for name in SWEEP_PARAMETERS:
            values = _split(getattr(self, f"sweep_{name}"), f"sweep-{name.replace('_', '-')}",
                            int if name == "memory" else float)
            if name != "memory":
                for v in values:
                    require_finite(flag(f"sweep_{name}"), v, low=0)
            if any(v < (1 if name == "memory" else 0) for v in values):
                raise UserError(f"--sweep-{name.replace('_', '-')} values must be "
                                f"{'>= 1' if name == 'memory' else '>= 0'}, got {values}")
            points += [(name, v) for v in dict.fromkeys(values)]
        if not points:
            raise UserError("the sweep has no points: give at least one of --sweep-lambda-real, "
                            "--sweep-lambda-gen, --sweep-memory")
        return points

    def validate(self) -> None:
        self.method_list(), self.ipc_list(), self.net_list()
        if self.repeats < 1:
            raise UserError(f"--eval-repeats must be at least 1, got {self.repeats}")
        if self.feature_epochs < 1:
            raise UserError(f"--feature-epochs must be at least 1, got {self.feature_epochs}")
        if self.coverage_k < 1:
            raise UserError(f"--coverage-k must be at least 1, got {self.coverage_k}")
        if self.sweep:
            if self.sweep_ipc < 1:
                raise UserError(f"--sweep-ipc must be at least 1, got {self.sweep_ipc}")
            self.sweep_points()
        self.finetune.validate()
        self.sample.validate(prefix="sample-")
        self.eval.validate(prefix="eval-")


def _split(text: str, name: str, kind: type) -> list:
    try:
        return [kind(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"--{name} must be a comma-separated list of {kind.__name__} values, got {text!r}") from None


# ----- the table, the plots ---------------------------------------------------------------------------------
def tied_best(entries: dict[str, tuple[float, float]]) -> set[str]:
    """Methods to bold in a row of {method: (mean, std)}: the best mean and every mean within its std."""
    if not entries:
        return set()
    best = max(entries, key=lambda m: entries[m][0])
    floor = entries[best][0] - entries[best][1] - 1e-9
    return {m for m, (mean, _) in entries.items() if mean >= floor}


def accuracy_table(cells: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], nets: Sequence[str]) -> str:
    """Markdown in the layout of the paper's Table 1: rows IPC x net, columns methods, mean ± std,
    ties with the best in bold (``TIE_RULE``). ``cells``: dicts with method, ipc, net, best_mean, best_std."""
    from .reports import markdown_table, pm

    lookup = {(c["method"], c["ipc"], c["net"]): c for c in cells}
    rows = []
    for k in ipcs:
        for net in nets:
            found = {m: (lookup[m, k, net]["best_mean"], lookup[m, k, net]["best_std"]) for m in methods
                     if (m, k, net) in lookup}
            bold = tied_best(found)
            rows.append([k, net] + [("–" if m not in found else
                                     f"**{pm(*found[m])}**" if m in bold else pm(*found[m])) for m in methods])
    return markdown_table(["IPC", "net"] + [LABELS.get(m, m) for m in methods], rows)


def metrics_table(metrics: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], key: str) -> str:
    """Rows IPC, columns methods, the set metric ``key`` (diversity or coverage); n/a where undefined."""
    from .reports import markdown_table

    lookup = {(r["method"], r["ipc"]): r.get(key) for r in metrics}
    rows = [[k] + [("–" if (m, k) not in lookup else "n/a" if lookup[m, k] is None else f"{lookup[m, k]:.3f}")
                   for m in methods] for k in ipcs]
    return markdown_table(["IPC"] + [LABELS.get(m, m) for m in methods], rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_ipc_plot(cells: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], nets: Sequence[str],
                         path: str | Path, title: str = "") -> Path:
    """One panel per net, one line per method: mean top-1 against IPC with std error bars."""
    plt = _pyplot()
    lookup = {(c["method"], c["ipc"], c["net"]): c for c in cells}
    fig, axes = plt.subplots(1, len(nets), figsize=(4.6 * len(nets), 3.8), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for i, m in enumerate(methods):
            pts = [(k, lookup[m, k, net]) for k in ipcs if (m, k, net) in lookup]
            # Methods are nudged apart along the (log) IPC axis so equal results do not hide each other.
            dodge = 1.04 ** (i - (len(methods) - 1) / 2)
            if pts:
                ax.errorbar([k * dodge for k, _ in pts], [c["best_mean"] for _, c in pts],
                            yerr=[c["best_std"] for _, c in pts], marker="o", capsize=3, label=LABELS.get(m, m))
        ax.set_xscale("log")
        ax.set_xticks(list(ipcs), [str(k) for k in ipcs])
        ax.minorticks_off()
        ax.set_xlabel("images per class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(net, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_plot(points: Sequence[dict], parameter: str, default: float, path: str | Path, title: str = "") -> Path:
    """Accuracy (mean ± std) against one parameter's values; the default value marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    xs = [p["value"] for p in points]
    ax.errorbar(xs, [p["best_mean"] for p in points], yerr=[p["best_std"] for p in points], marker="o", capsize=3)
    ax.axvline(default, color="grey", linestyle="--", linewidth=1, label=f"default {default:g}")
    if parameter == "memory" and min(xs) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(SWEEP_AXIS[parameter])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SWEEP_AXIS = {"lambda_real": "lambda_real (representativeness weight)",
              "lambda_gen": "lambda_gen (diversity weight)", "memory": "memory size N_R = N_G"}


# ----- the run ------------------------------------------------------------------------------------------------
# Settings that change what is observed or how fast, not what is computed: a resume may change them.
_FREE = {"finetune": {"checkpoint_every", "log_every", "device", "progress", "memory"},
         "sample": {"device", "batch_size", "model", "ipc", "classes"},
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
    from .models.io import EXPORT_CONFIG
    from .pretrained import resolve_model

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
        from .data import open_dataset

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
        """Make the image set of ``method`` with ``ipc`` images per class in ``folder``."""
        if method in REAL_METHODS:
            return self.timed(f"select {folder.name}", select_real, method, self.train_ds, ipc, self.cfg.sample.seed,
                              folder, overwrite=True)
        sample = dataclasses.replace(self.cfg.sample, model=model, ipc=ipc)
        if method == "dit" and not _is_export(model):
            # A bare pretrained checkpoint carries no class list or codec: take the fine-tuning data's.
            ft = self.cfg.finetune
            sample = dataclasses.replace(sample, subset=ft.subset, codec=ft.codec, vae=sample.vae or ft.vae)
        return self.timed(f"sample {folder.name}", sample_set, sample, folder, overwrite=True)

    def image_set(self, method: str, model: str | None, ipc: int, largest: int, sets: Path) -> Path:
        folder = sets / f"{method}-ipc{ipc}"
        if (folder / "manifest.json").is_file():
            return folder
        if ipc == largest:
            return self.draw(method, model, ipc, folder)
        # Image i of class c is drawn from its own seed (seed, c, i) when sampling, and the real baselines
        # pick in a prefix-consistent order (baselines module): the first k images per class of the IPC-max
        # set are the IPC-k set (up to the last-bit rounding of batched float kernels). So each method is
        # drawn once, at the largest IPC, and the smaller sets are its prefixes.
        source = self.image_set(method, model, largest, largest, sets)
        return _prefix_set(source, ipc, folder)

    # -- evaluation and metrics
    def cell(self, path: Path, set_folder: Path, net: str, label: str) -> dict:
        if path.is_file():
            return read_json_object(path, CELL_KEYS, what="delete it to evaluate that cell again")
        log.info("cell %s: evaluating %s, %d repeats", label, net, self.cfg.repeats)
        config = dataclasses.replace(self.cfg.eval, net=net, repeats=self.cfg.repeats)
        t0 = time.perf_counter()
        result = self.timed(f"evaluate {label}", evaluate_image_set, set_folder, self.test, config,
                            subset=self.cfg.finetune.subset)
        result["wall_s"] = time.perf_counter() - t0
        write_json_atomic(path, result)
        log.info("cell %s: %.2f ± %.2f %%", label, result["best_mean"], result["best_std"])
        return result

    def set_metrics(self, path: Path, set_folder: Path, label: str) -> dict:
        from .imageset import read_image_set
        from .metrics import coverage, penultimate_features, within_class_diversity

        if path.is_file():
            data = read_json_object(path, {"coverage": NUMBER}, what="delete it to measure that set again")
            if data.get("diversity") is not None and not isinstance(data["diversity"], NUMBER):
                raise UserError(f"{path}: 'diversity' must be a number or null; delete it to measure that set again")
            return data
        extractor, real_f, real_y = self.feature_space()
        t0 = time.perf_counter()
        images, labels, _, _ = read_image_set(set_folder)
        feats = penultimate_features(extractor, self._fit(images), device=resolve_device(self.cfg.eval.device))
        result = {"diversity": _nan_to_none(within_class_diversity(feats, labels)),
                  "coverage": coverage(real_f, real_y, feats, labels, self.cfg.coverage_k),
                  "k": self.cfg.coverage_k, "feature_net": self.cfg.feature_net, "set": str(set_folder)}
        self.timings[f"metrics {label}"] = time.perf_counter() - t0
        write_json_atomic(self.out / "timings.json", self.timings)
        write_json_atomic(path, result)
        return result

    def _fit(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the feature classifier's resolution (the real train split's)."""
        from .augment import resize_center_crop

        side = self.train_ds.resolution
        return images if images.shape[-1] == side and images.shape[-2] == side else resize_center_crop(images, side)

    def feature_space(self):
        """(extractor, real test features (N, D), test labels (N,)); the extractor is trained once and cached."""
        if self._features is not None:
            return self._features
        from .data import load_tensors, open_dataset
        from .metrics import classifier_accuracy, penultimate_features, train_feature_extractor
        from .nets import build_net

        cfg, folder = self.cfg, self.out / "features"
        test_ds = open_dataset(self.test, "test", subset=cfg.finetune.subset, resolution=self.train_ds.resolution,
                               channels=self.train_ds.channels)
        test_x, test_y = load_tensors(test_ds)
        small = [(n, int((test_y == c).sum())) for c, n in enumerate(test_ds.class_names)
                 if int((test_y == c).sum()) <= cfg.coverage_k]
        if small:
            raise UserError(f"coverage with k={cfg.coverage_k} needs more than {cfg.coverage_k} real test images per "
                            f"class; class {small[0][0]!r} has {small[0][1]}: lower --coverage-k or pass --no-metrics")
        k, channels, side = self.train_ds.num_classes, self.train_ds.channels, self.train_ds.resolution
        spec = {"net": cfg.feature_net, "epochs": cfg.feature_epochs, "seed": cfg.eval.seed,
                "data": self.train_ds.identity, "num_classes": k, "channels": channels, "resolution": side}
        model = build_net(cfg.feature_net, k, channels, side)
        path = folder / "extractor.pt"
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        try:
            cached = json.loads(saved["spec"]) == spec and isinstance(saved["state_dict"], dict)
        except (TypeError, KeyError, ValueError):
            cached = False  # no cache, or one of another shape: train the extractor again
        if cached:
            model.load_state_dict(saved["state_dict"])
            model = model.to(resolve_device(cfg.eval.device)).eval()
            log.info("feature extractor: cached in %s", path)
        else:
            train_x, train_y = load_tensors(self.train_ds)
            g = torch.Generator().manual_seed(cfg.eval.seed)
            log.info("feature extractor: training %s for %d epochs on %d real images", cfg.feature_net,
                     cfg.feature_epochs, len(train_y))
            model = self.timed("feature extractor", train_feature_extractor, train_x, train_y, k, cfg.feature_net,
                               cfg.feature_epochs, device=resolve_device(cfg.eval.device), generator=g)
            acc = classifier_accuracy(model, test_x, test_y, device=resolve_device(cfg.eval.device))
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"spec": json.dumps(spec), "state_dict": {n: t.cpu() for n, t in model.state_dict().items()}},
                       tmp)
            os.replace(tmp, path)
            write_json_atomic(folder / "extractor.json", {**spec, "test_top1": acc})
            log.info("feature extractor: %.2f %% top-1 on the real test set", acc)
        real_f = penultimate_features(model, test_x, device=resolve_device(cfg.eval.device))
        self._features = (model, real_f, test_y)
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
    from .imageset import read_image_set, write_image_set

    images, labels, class_names, manifest = read_image_set(source)
    keep = torch.cat([(labels == c).nonzero().flatten()[:k] for c in range(len(class_names))])  # read in index order
    fields = {key: v for key, v in manifest.items()
              if key not in ("versions", "class_names", "channels", "resolution", "counts", "ipc")}
    fields["config"] = dict(fields.get("config") or {}, ipc=k)
    if "source_indices" in fields:
        fields["source_indices"] = [picks[:k] for picks in fields["source_indices"]]
    fields["prefix_of"] = str(source)
    return write_image_set(out, images[keep], labels[keep], class_names, fields, overwrite=True)


def _prepare(cfg: BenchConfig, out: str | Path, resume: bool, overwrite: bool) -> _Bench:
    """Check everything (options, the output folder, the data against the IPCs, the nets), then, only then,
    prepare ``out``: a refused command writes nothing."""
    from .nets import build_net

    cfg.validate()
    out = check_output_folder(out)
    ft = cfg.finetune
    test = resolve_test_set(ft.data, cfg.test)
    if "dit" in cfg.method_list() or set(MEMORY_OF) & set(cfg.method_list()) or cfg.sweep:
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

    # Every check passed: from here on the command writes.
    if not resume and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # refuse_existing let it through: --overwrite
        bench.timings = {}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", fingerprint)
    return bench


def run_bench(cfg: BenchConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the bench grid (or, with ``cfg.sweep``, the sensitivity sweep) in ``out``; returns the markdown
    report (bench.md or sweep/sweep.md). With ``resume``, finished models, sets, cells and metrics are kept."""
    bench = _prepare(cfg, out, resume, overwrite)
    return _run_sweep(bench) if cfg.sweep else _run_grid(bench)


def _model_for(bench: _Bench, method: str) -> str | None:
    ft = bench.cfg.finetune
    if method == "dit":
        return ft.init
    if method in MEMORY_OF:
        return str(bench.model(method, dataclasses.replace(ft, memory=MEMORY_OF[method]),
                               bench.out / "models" / method))
    return None


def _run_grid(bench: _Bench) -> Path:
    cfg, out = bench.cfg, bench.out
    methods, ipcs, nets = cfg.method_list(), cfg.ipc_list(), cfg.net_list()
    models = {m: _model_for(bench, m) for m in methods}
    sets = {(m, k): bench.image_set(m, models[m], k, max(ipcs), out / "sets") for m in methods for k in ipcs}

    cells, total = [], len(methods) * len(ipcs) * len(nets)
    for k in ipcs:
        for net in nets:
            for m in methods:
                label = f"{m}-ipc{k}-{net}"
                log.info("cell %d/%d: %s", len(cells) + 1, total, label)
                result = bench.cell(out / "cells" / f"{label}.json", sets[m, k], net, label)
                cells.append({"method": m, "ipc": k, "net": net,
                              **{key: result[key] for key in ("best_mean", "best_std", "last_mean", "last_std",
                                                              "per_repeat", "epochs")}})
    metrics = []
    if cfg.metrics:
        for m in methods:
            for k in ipcs:
                label = f"{m}-ipc{k}"
                metrics.append({"method": m, "ipc": k,
                                **bench.set_metrics(out / "metrics" / f"{label}.json", sets[m, k], label)})
    return _write_grid_report(bench, methods, ipcs, nets, cells, metrics)


def _settings(bench: _Bench) -> dict:
    cfg, ft = bench.cfg, bench.cfg.finetune
    return {"data": ft.data, "subset": ft.subset, "test": bench.test, "init": ft.init, "finetune_steps": ft.steps,
            "finetune_epochs": ft.epochs, "batch_size": ft.batch_size, "lr": ft.lr, "lambda_real": ft.lambda_real,
            "lambda_gen": ft.lambda_gen, "mem_real": ft.mem_real, "mem_gen": ft.mem_gen,
            "memory_max_t": ft.memory_max_t, "seed": ft.seed,
            "sample_steps": cfg.sample.steps, "sampler": cfg.sample.sampler, "cfg_scale": cfg.sample.cfg_scale,
            "sample_seed": cfg.sample.seed, "repeats": cfg.repeats, "eval_epochs_option": cfg.eval.epochs,
            "eval_seed": cfg.eval.seed, "feature_net": cfg.feature_net, "feature_epochs": cfg.feature_epochs,
            "coverage_k": cfg.coverage_k}


def _epochs_note(cells: Sequence[dict], bench: _Bench) -> str:
    used = sorted({c["epochs"] for c in cells})
    text = (f"Each classifier was trained for {', '.join(map(str, used))} epochs and the table reports, per repeat, "
            f"the best test top-1 of the periodic checks, mean ± sample std over {bench.cfg.repeats} repeats "
            "(seeds eval seed, +1, ...).")
    if bench.cfg.eval.epochs is not None:
        text += (f" The epochs were fixed by --eval-epochs {bench.cfg.eval.epochs}; the paper's protocol trains "
                 "longer (3000/2000/1500 epochs at IPC 1/10/50), so absolute numbers are not comparable to it.")
    return text


def _timings_table(timings: dict[str, float]) -> str:
    """Seconds summed per kind of stage (the first word of each timing's name: finetune, sample, ...)."""
    from .reports import markdown_table

    kinds: dict[str, list[float]] = {}
    for name, seconds in timings.items():
        kinds.setdefault(name.split()[0], []).append(seconds)
    return markdown_table(["stage", "count", "seconds"], [[k, len(v), f"{sum(v):.1f}"] for k, v in kinds.items()])


def _write_grid_report(bench: _Bench, methods, ipcs, nets, cells, metrics) -> Path:

    cfg, out = bench.cfg, bench.out
    ft = cfg.finetune
    accuracy_vs_ipc_plot(cells, methods, ipcs, nets, out / "accuracy_vs_ipc.png",
                         title=f"{ft.data}: top-1 vs IPC ({cfg.repeats} repeats)")
    extractor = bench.extractor_info()
    write_json_atomic(out / "bench.json", {"settings": _settings(bench), "methods": methods, "ipcs": ipcs,
                                           "nets": nets, "cells": cells, "metrics": metrics,
                                           "feature_extractor": extractor, "timings": bench.timings,
                                           "tie_rule": TIE_RULE})
    length = ft.steps if ft.steps is not None else f"{ft.epochs or 1} epoch(s) of"
    lines = [
        "# memdistill bench",
        "",
        f"Methods {', '.join(LABELS[m] for m in methods)} on {ft.data}"
        + (f" ({ft.subset})" if ft.subset else "") + f", tested on the real {bench.test} test images. "
        f"Fine-tuned methods start from {ft.init} and share every setting but the memory (Minimax: FIFO, "
        f"Adaptive: self-adaptive, Fine-tune: no memory losses); DiT samples that model without fine-tuning; "
        f"Random and Herding select real images. Fine-tuning: {length} steps, batch "
        f"{ft.batch_size}, lr {ft.lr:g}, lambda_real {ft.lambda_real:g}, lambda_gen {ft.lambda_gen:g}, "
        f"N_R {ft.mem_real}, N_G {ft.mem_gen}. Sampling: {cfg.sample.steps} {cfg.sample.sampler} steps, "
        f"guidance {cfg.sample.cfg_scale:g}.",
        "",
        "## Top-1 accuracy (%)",
        "",
        accuracy_table(cells, methods, ipcs, nets),
        "",
        TIE_RULE,
        "",
        _epochs_note(cells, bench),
        "",
        "![accuracy against IPC](accuracy_vs_ipc.png)",
    ]
    if metrics:
        feat = (f"{extractor['net']} trained {extractor['epochs']} epochs on the real train split, "
                f"{extractor['test_top1']:.1f} % top-1 on the real test set" if extractor else cfg.feature_net)
        lines += [
            "",
            "## Diversity and coverage of the distilled sets",
            "",
            f"In the penultimate-layer feature space of a classifier ({feat}).",
            "",
            "Within-class diversity: mean pairwise cosine distance between a class's images, averaged over classes "
            "(higher = more diverse; n/a at IPC 1, where a class has no pair).",
            "",
            metrics_table(metrics, methods, ipcs, "diversity"),
            "",
            f"Coverage (Naeem et al. 2020, k = {cfg.coverage_k}): fraction of real test images whose nearest distilled "
            "image of the same class lies within their own k-NN radius among the real test images of that class "
            "(higher = the real data is better represented).",
            "",
            metrics_table(metrics, methods, ipcs, "coverage"),
        ]
    lines += ["", "## Wall time per stage", "", _timings_table(bench.timings), "",
              "Per-stage times are in bench.json; stages done by an earlier invocation of a resumed bench keep "
              "the time they took then."]
    path = out / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----- the sensitivity sweep ------------------------------------------------------------------------------------
def _sweep_config(base: TrainConfig, parameter: str, value) -> TrainConfig:
    if parameter == "memory":
        return dataclasses.replace(base, mem_real=int(value), mem_gen=int(value))
    return dataclasses.replace(base, **{parameter: float(value)})


def _run_sweep(bench: _Bench) -> Path:
    from .reports import markdown_table, pm

    cfg, out = bench.cfg, bench.out
    base = dataclasses.replace(cfg.finetune, memory="adaptive")
    k, net = cfg.sweep_ipc, cfg.net_list()[0]
    defaults = {"lambda_real": base.lambda_real, "lambda_gen": base.lambda_gen, "memory": base.mem_real}
    points = []
    plan = cfg.sweep_points()
    for i, (parameter, value) in enumerate(plan):
        name = f"{parameter}-{value:g}"
        ft = _sweep_config(base, parameter, value)
        log.info("sweep point %d/%d: %s = %g", i + 1, len(plan), parameter, value)
        # The point at the default settings is the bench's own adaptive model: shared, not trained twice.
        folder = out / "models" / "adaptive" if ft == base else out / "sweep" / "models" / name
        model = bench.model("adaptive" if ft == base else f"sweep {name}", ft, folder)
        image_set = _sweep_set(bench, str(model), k, out / "sweep" / "sets" / f"{name}-ipc{k}")
        result = bench.cell(out / "sweep" / "cells" / f"{name}-ipc{k}-{net}.json", image_set, net,
                            f"sweep {name}-ipc{k}-{net}")
        point = {"parameter": parameter, "value": value, "ipc": k, "net": net, "default": value == defaults[parameter],
                 **{key: result[key] for key in ("best_mean", "best_std", "last_mean", "last_std", "per_repeat",
                                                 "epochs")}}
        if cfg.metrics:
            point.update(bench.set_metrics(out / "sweep" / "metrics" / f"{name}-ipc{k}.json", image_set,
                                           f"sweep {name}-ipc{k}"))
        points.append(point)

    lines = ["# memdistill sensitivity sweep", "",
             f"Adaptive memory on {cfg.finetune.data}, IPC {k}, evaluated with {net}; each parameter is varied alone "
             f"around the defaults (lambda_real {base.lambda_real:g}, lambda_gen {base.lambda_gen:g}, "
             f"N_R = N_G = {base.mem_real}); every point is its own fine-tune + sample + evaluation.", "",
             _epochs_note(points, bench)]
    for parameter in SWEEP_PARAMETERS:
        rows = [p for p in points if p["parameter"] == parameter]
        if not rows:
            continue
        sweep_plot(rows, parameter, defaults[parameter], out / "sweep" / f"{parameter}.png",
                   title=f"IPC {k}, {net}, {cfg.repeats} repeats")
        header = [SWEEP_AXIS[parameter], "top-1 (%)", "last (%)"] + (["diversity", "coverage"] if cfg.metrics else [])
        table = [[f"{p['value']:g}" + (" (default)" if p["default"] else ""), pm(p["best_mean"], p["best_std"]),
                  pm(p["last_mean"], p["last_std"])]
                 + ([("n/a" if p["diversity"] is None else f"{p['diversity']:.3f}"), f"{p['coverage']:.3f}"]
                    if cfg.metrics else []) for p in rows]
        lines += ["", f"## {SWEEP_AXIS[parameter]}", "", markdown_table(header, table), "",
                  f"![{parameter}]({parameter}.png)"]
    lines += ["", "## Wall time per stage", "", _timings_table(bench.timings)]
    write_json_atomic(out / "sweep" / "sweep.json", {"settings": _settings(bench), "ipc": k, "net": net,
                                                     "points": points, "feature_extractor": bench.extractor_info(),
                                                     "timings": bench.timings})
    path = out / "sweep" / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sweep_set(bench: _Bench, model: str, k: int, folder: Path) -> Path:
    if (folder / "manifest.json").is_file():
        return folder
    return bench.draw("sweep", model, k, folder)


# ----- command line ------------------------------------------------------------------------------------------
BENCH_HELP = {
    "methods": f"methods, comma-separated: {', '.join(METHODS)}; also finetune (the same fine-tuning without "
               "memory losses, a control)",
    "ipcs": "images per class, comma-separated",
    "nets": "evaluation nets (convnetD, resnetap10, resnet18), comma-separated",
    "repeats": "classifiers trained per cell, each with its own seed",
    "test": "real test images (default: the embedded dataset's test split)",
    "metrics": "measure diversity and coverage of every set",
    "feature_net": "classifier whose penultimate features the metrics use (trained on the real train split)",
    "feature_epochs": "training epochs of the feature classifier",
    "coverage_k": "k of the coverage metric's k-NN radius",
    "sweep": "run the sensitivity sweep (paper Figure 4) instead of the method grid",
    "sweep_ipc": "IPC of the sweep",
    "sweep_lambda_real": "lambda_real values of the sweep ('' skips)",
    "sweep_lambda_gen": "lambda_gen values of the sweep ('' skips)",
    "sweep_memory": "N_R = N_G values of the sweep ('' skips)",
}


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on the subparsers of the memdistill command line."""
    from .cli import EVAL_HELP, SAMPLE_HELP, TRAIN_HELP, add_config_args

    defaults = BenchConfig()
    p = sub.add_parser("bench", help="several methods side by side at several IPCs: a table, a plot, metrics",
                       description="Random, Herding, DiT (no fine-tuning), Minimax (FIFO memory) and Adaptive "
                                   "memory, at several IPCs and nets, mean ± std over repeats, with diversity and "
                                   "coverage of each set; --sweep runs the lambda / memory-size sensitivity study "
                                   "instead. Sampling options are --sample-*, evaluation options --eval-*, the rest "
                                   "of the options are fine-tuning options; an option that takes a list keeps its "
                                   "name (--method dit,adaptive --ipc 1,10,50 --eval-net convnet3,resnet18).")
    # Bench-level lists of a stage's option keep that option's name and the stage prefix (as in run).
    add_config_args(p, defaults, skip={"finetune", "sample", "eval"}, help=BENCH_HELP,
                    flags={"methods": "--method", "ipcs": "--ipc", "nets": "--eval-net", "repeats": "--eval-repeats"})
    add_config_args(p, defaults.finetune, skip={"model", "stage", "memory"}, help=TRAIN_HELP)
    add_config_args(p, defaults.sample, skip={"model", "ipc", "classes", "subset", "codec", "labels"}, help=SAMPLE_HELP,
                    prefix="sample")
    add_config_args(p, defaults.eval, skip={"net", "repeats"}, help=EVAL_HELP, prefix="eval")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--resume", action="store_true", help="continue the bench in --out; finished cells are kept")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    p.set_defaults(func=_cmd_bench)
    return p


def config_from_namespace(args: argparse.Namespace) -> BenchConfig:
    from .cli import config_from_args

    base = BenchConfig()
    cfg = config_from_args(BenchConfig, args, base)
    return dataclasses.replace(cfg, finetune=config_from_args(TrainConfig, args, base.finetune),
                               sample=config_from_args(SampleConfig, args, base.sample, prefix="sample"),
                               eval=config_from_args(EvalConfig, args, base.eval, prefix="eval"))


def _cmd_bench(args: argparse.Namespace) -> None:
    from .cli import check_out

    check_out(args, "a bench")
    cfg = config_from_namespace(args)
    report = run_bench(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if cfg.sweep:
        for p in json.loads((report.parent / "sweep.json").read_text())["points"]:
            print(f"{p['parameter']:>12} = {p['value']:<8g} best {p['best_mean']:.2f} ± {p['best_std']:.2f}")
    else:
        result = json.loads((report.parent / "bench.json").read_text())
        print(accuracy_table(result["cells"], result["methods"], result["ipcs"], result["nets"]))
    print(f"report: {report}")
