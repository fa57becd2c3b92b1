"""Class fidelity: the share (%) of generated images that a judge (judge.py, a classifier trained on the real
train split) labels as the class they were generated for.

A low figure means the model draws blobs or the wrong digits for some classes, which no loss curve shows;
``memdistill fidelity`` measures it for any model or image set, and ``memdistill pretrain`` measures it at
checkpoints and at the end of training (FidelityWatch). Sampling uses sample.Sampler with its per-image seeds,
so a measurement never touches the random draws of the training it observes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import require_finite, require_int
from .errors import UserError

log = logging.getLogger(__name__)

FIDELITY_FILE = "fidelity.json"  # a pretrain run's record of its checks, in the run folder
SAMPLES_FILE = "samples.png"  # the grid of the final check's samples
GRID_COLUMNS = 10  # samples per class shown in a grid


@dataclass
class FidelityConfig:
    """The class-fidelity checks of a training run (pretrain)."""

    fidelity: bool = True  # --no-fidelity turns every check off
    fidelity_every: int | None = None  # also check every N steps (None: at the end only)
    fidelity_per_class: int = 10  # samples per class of a check during training (cheap)
    fidelity_final_per_class: int = 50  # samples per class of the final check
    fidelity_warn: float = 80.0  # warn when the final fidelity (%) is below this

    def validate(self) -> None:
        """UserError naming the option for a value out of range."""
        require_int("--fidelity-every", self.fidelity_every, low=1, optional=True)
        require_int("--fidelity-per-class", self.fidelity_per_class, low=1)
        require_int("--fidelity-final-per-class", self.fidelity_final_per_class, low=1)
        require_finite("--fidelity-warn", self.fidelity_warn, 0, 100)


FIDELITY_HELP = {
    "fidelity": "measure the class fidelity of the model's samples (share a judge trained on the real train split "
                "labels as their class) at the end, and every --fidelity-every steps; writes fidelity.json and "
                "samples.png in the run folder",
    "fidelity_every": "also measure the class fidelity every this many steps, with --fidelity-per-class samples "
                      "(default: none, at the end only)",
    "fidelity_per_class": "samples per class of the checks during training",
    "fidelity_final_per_class": "samples per class of the final check",
    "fidelity_warn": "warn when the final class fidelity is below this share (%%, 0 to 100) of the judge's own top-1 "
                     "on real images (its test split's for an embedded --data, else its training images'): on data "
                     "the judge itself reads only in part, real images are the ceiling",
}


# ----- the measurement ------------------------------------------------------------------------------------
def class_fidelity(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Fidelity figures of predicted classes (N,) against the classes the images were generated for (N,), both
    indices into ``class_names``: {"fidelity": % of all images, "per_class": {name: % or None when the class has
    no image}, "images": N}."""
    hit = predicted.long() == labels.long()
    per_class = {}
    for c, name in enumerate(class_names):
        mine = labels == c
        per_class[name] = round(hit[mine].float().mean().item() * 100, 2) if bool(mine.any()) else None
    overall = hit.float().mean().item() * 100 if len(hit) else 0.0
    return {"fidelity": round(overall, 2), "per_class": per_class, "images": int(len(hit))}


def judge_labels(judge, class_names: list[str], option: str = "--data") -> torch.Tensor:
    """(K,) the judge's index of each of ``class_names``; UserError naming ``option`` when it lacks one."""
    known = list(judge.spec.class_names)
    missing = [n for n in class_names if n not in known]
    if missing:
        raise UserError(f"{option}: the judge's data lack the classes {', '.join(missing[:5])}; give the real "
                        "train images of the model's classes")
    return torch.tensor([known.index(n) for n in class_names], dtype=torch.long)


def judge_images(judge, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 option: str = "--data") -> dict:
    """class_fidelity of images (N, C, H, W) in [-1, 1] generated for labels (N,) (indices into ``class_names``)
    as ``judge`` labels them; a prediction of a class outside ``class_names`` counts as a miss."""
    to_judge = judge_labels(judge, class_names, option)
    predicted = judge.logits(images).argmax(1)  # (N,) judge indices
    back = {int(j): c for c, j in enumerate(to_judge)}
    predicted = torch.tensor([back.get(int(p), -1) for p in predicted], dtype=torch.long)
    return class_fidelity(predicted, labels, class_names)


def judge_top1(judge, dataset) -> float:
    """The judge's top-1 (%) on a real split (data.ImageDataset), the ceiling of any fidelity it measures."""
    from .data import load_tensors

    images, labels = load_tensors(dataset)
    to_judge = judge_labels(judge, list(dataset.class_names), "--test")
    predicted = judge.logits(images).argmax(1)
    return round((predicted == to_judge[labels.long()]).float().mean().item() * 100, 2)


def sample_per_class(sampler, cfg, per_class: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (K * per_class, C, H, W) in [-1, 1], labels (K * per_class,)): image i of class c from the
    sample's per-image noise rule (sample.Sampler.images), cfg.batch_size at a time."""
    from tqdm.auto import tqdm

    from .diffusion import GaussianDiffusion

    modes = sampler.mode_modes(cfg)[0] if cfg.mode_guidance and cfg.mode_stop else None
    jobs = [(c, i) for c in range(len(sampler.class_names)) for i in range(per_class)]
    diffusion, parts = GaussianDiffusion(), []
    for start in tqdm(range(0, len(jobs), cfg.batch_size), desc="fidelity", unit="batch", disable=not progress):
        parts.append(sampler.images(cfg, jobs[start:start + cfg.batch_size], diffusion, modes=modes))
    return torch.cat(parts), torch.tensor([c for c, _ in jobs], dtype=torch.long)


def sample_grid(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: str | Path) -> Path:
    """Write a PNG of the first GRID_COLUMNS images of each class (a labelled row per class) to ``path``."""
    from .manifest import disk_full_is_user_error
    from .reports import class_grid

    rows = [list(images[labels == c][:GRID_COLUMNS]) for c in range(len(class_names))]
    picture = class_grid(rows, class_names, [("samples", GRID_COLUMNS)])
    path = Path(path)
    with disk_full_is_user_error(path):
        picture.save(path)
    return path


def format_result(result: dict) -> list[str]:
    """The printed lines of a measurement (a dict as measure_model / measure_set return)."""
    top1 = result.get("judge_test_top1")
    judge = result["judge"]
    lines = [f"judge: {judge['net']} trained on {judge['data']} at {judge['resolution']} px"
             + (f", {top1:.1f}% top-1 on the real test split" if top1 is not None else " (no test split given)"),
             f"class fidelity: {result['fidelity']:.1f}% of {result['images']} images"]
    per = " ".join(f"{name}:{'-' if v is None else f'{v:.0f}'}" for name, v in result["per_class"].items())
    lines.append(f"per class (%): {per}")
    return lines


# ----- which real data judge a model ------------------------------------------------------------------------
def recorded_data(source: dict, model: str | None = None) -> dict | None:
    """{"data", "subset"} of the real train images a model was trained on, from what sample.Sampler.source (or an
    image set's manifest "source") records: the run's own settings when its --data is an embedded set or a
    folder that still exists, else a shipped model's own embedded set; None when unknown."""
    from .selection import judge_data_default, run_data

    recorded = run_data(source.get("run"))
    if recorded is not None:
        return recorded
    data = judge_data_default({"data": source.get("data"), "source": {"model": model or source.get("model")}})
    return {"data": data, "subset": None} if data else None


def open_judge(data: str, subset: str | None, image_shape: tuple[int, ...], net: str = "convnet3",
               epochs: int = 5, cache=None, device="cpu", test: str | None = None):
    """(judge, its top-1 % on the real test split or None) for images of ``image_shape`` (C, H, W): the judge
    trained on the train split of ``data`` (judge.load_judge, cached), tested on ``test`` (a folder or an
    embedded set's test split; default: ``data``'s test split when it is an embedded set)."""
    from .data import EMBEDDED, open_dataset
    from .judge import load_judge

    channels, side = image_shape[0], image_shape[-1]
    train = open_dataset(data, "train", subset=subset, resolution=side, channels=channels)
    judge = load_judge(train, net, epochs, cache=cache, device=device)
    test = test or (data if data in EMBEDDED else None)
    top1 = None
    if test is not None:
        top1 = judge_top1(judge, open_dataset(test, "test", subset=subset, resolution=side, channels=channels))
    return judge, top1


# ----- the fidelity command ---------------------------------------------------------------------------------
def measure_model(cfg, per_class: int, data: str | None = None, test: str | None = None,
                  progress: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor, list[str]]:
    """Sample ``per_class`` images of every class of cfg.model (a sample.SampleConfig) and judge them.
    Returns (result dict, images, labels, class names). UserError when the judge's data are unknown
    (``data`` None and nothing recorded) or lack a class of the model."""
    from .devices import resolve_device
    from .sample import load_sampler

    cfg.validate()
    device = resolve_device(cfg.device)
    sampler = load_sampler(cfg, device)
    chosen = _judge_data(data, recorded_data(sampler.source, cfg.model), f"the model {cfg.model}")
    judge, top1 = open_judge(chosen["data"], chosen["subset"], sampler.image_shape, cfg.judge_net, cfg.judge_epochs,
                             cfg.judge_cache, device, test)
    start = time.perf_counter()
    images, labels = sample_per_class(sampler, cfg, per_class, progress)
    seconds = time.perf_counter() - start
    result = judge_images(judge, images, labels, sampler.class_names)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("ipc", "classes", "pool", "select", "keep_pool", "from_pool", "judge_data")}
    result.update(model=cfg.model, source=sampler.source, per_class_images=per_class, sampling=settings,
                  sampling_seconds=round(seconds, 1), judge=judge.identity(), judge_data=chosen,
                  judge_test_top1=top1)
    return result, images, labels, sampler.class_names


def measure_set(folder: str | Path, data: str | None = None, test: str | None = None, net: str = "convnet3",
                epochs: int = 5, cache=None, device: str = "cpu") -> tuple[dict, torch.Tensor, torch.Tensor, list[str]]:
    """Judge the images of an existing image set (imageset format), each against its class folder."""
    from .devices import resolve_device
    from .imageset import read_image_set

    images, labels, class_names, manifest = read_image_set(folder)
    source = dict(manifest.get("source") or {}, data=manifest.get("data"))
    chosen = _judge_data(data, recorded_data(source), f"the set {folder}")
    judge, top1 = open_judge(chosen["data"], chosen["subset"], tuple(images.shape[1:]), net, epochs, cache,
                             resolve_device(device), test)
    result = judge_images(judge, images, labels, class_names)
    result.update(set=str(folder), judge=judge.identity(), judge_data=chosen, judge_test_top1=top1)
    return result, images, labels, class_names


def _judge_data(data: str | None, recorded: dict | None, what: str) -> dict:
    from .data import EMBEDDED

    if data is not None:
        return {"data": data, "subset": None}
    if recorded is None:
        raise UserError(f"{what} does not record the real data it was trained on: give --data (the real train "
                        f"images of its classes: {', '.join(EMBEDDED)} or a class-per-folder image tree)")
    return recorded


# ----- the checks of a training run -------------------------------------------------------------------------
class FidelityWatch:
    """Class-fidelity checks of a training run, called by train.run_training with its EMA model.

    Each check samples with the per-image noise of sample.Sampler and runs inside torch.random.fork_rng, so the
    training's random draws and resume state are the same with or without checks. Results go to
    ``<out>/fidelity.json`` ({"checks": [...], "final": {...}}), the final samples to ``<out>/samples.png``.
    """

    def __init__(self, cfg: FidelityConfig, data, train_cfg, out: str | Path):
        """``data``: train.TrainData of the run; ``train_cfg``: its train.TrainConfig (the judge's data)."""
        self.cfg, self.data, self.train_cfg, self.out = cfg, data, train_cfg, Path(out)
        self.every = cfg.fidelity_every  # read by the training loop at every step: a plain int
        self._judge = None
        self._ceiling: tuple[float, str] | None = None  # (the judge's top-1 on real images, which ones)
        self.record = {"checks": [], "final": None}

    def start(self, step: int) -> None:
        """Keep the checks of an earlier run up to ``step`` (the step a resume continues from)."""
        path = self.out / FIDELITY_FILE
        try:
            saved = json.loads(path.read_text()) if step > 0 else {}
        except (OSError, ValueError):
            saved = {}
        if not isinstance(saved, dict):
            saved = {}
        checks = list(saved.get("checks") or [])
        # A run extended with --resume --steps keeps its earlier final check as a check of that step.
        final = saved.get("final")
        if isinstance(final, dict) and all(not isinstance(c, dict) or c.get("step") != final.get("step")
                                           for c in checks):
            checks.append({k: v for k, v in final.items() if k != "warning"})
        self.record["checks"] = [c for c in checks if isinstance(c, dict) and isinstance(c.get("step"), int)
                                 and not isinstance(c["step"], bool) and c["step"] <= step]

    def judge(self, device):
        if self._judge is None:
            from .data import EMBEDDED

            c = self.train_cfg
            self._judge = open_judge(c.data, c.subset, self.data.image_shape, device=device,
                                     test=c.data if c.data in EMBEDDED else None)
            top1 = self._judge[1]
            if top1 is not None:
                self._ceiling = (top1, "test")
            else:  # no test images: the training images stand in (an upper bound of the test top-1)
                from .data import open_dataset

                channels, side = self.data.image_shape[0], self.data.image_shape[-1]
                train = open_dataset(c.data, "train", subset=c.subset, resolution=side, channels=channels)
                self._ceiling = (judge_top1(self._judge[0], train), "training")
        return self._judge

    def check(self, step: int, model: torch.nn.Module, device: torch.device, final: bool = False) -> dict:
        """Measure the fidelity of ``model`` (the EMA, in eval mode) at ``step``; returns the result."""
        from .codec import make_codec
        from .sample import SampleConfig, Sampler

        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # judge training draws from the global generators
            judge, top1 = self.judge(device)
            codec_cfg = self.data.codec_config
            codec = make_codec(codec_cfg["name"], codec_cfg.get("path"), device=device)
            sampler = Sampler(model, codec, self.data.class_names, self.data.cond_labels,
                              tuple(self.data.latent_shape), tuple(self.data.image_shape), device, {})
            per_class = self.cfg.fidelity_final_per_class if final else self.cfg.fidelity_per_class
            start = time.perf_counter()
            sample_cfg = SampleConfig(seed=self.train_cfg.seed, device=str(device))
            images, labels = sample_per_class(sampler, sample_cfg, per_class)
            result = judge_images(judge, images, labels, self.data.class_names)
        result.update(step=step, per_class_images=per_class, seconds=round(time.perf_counter() - start, 1),
                      judge=judge.identity(), judge_test_top1=top1)
        if top1 is None:
            result["judge_train_top1"] = self._ceiling[0]
        log.info("step %d: class fidelity %.1f%% (%d images)", step, result["fidelity"], result["images"])
        if final:
            sample_grid(images, labels, self.data.class_names, self.out / SAMPLES_FILE)
            result["warning"] = self.warning(result)
            if result["warning"]:
                log.warning(result["warning"])
            self.record["final"] = result
        else:
            self.record["checks"].append(result)
        from .manifest import write_json_atomic

        write_json_atomic(self.out / FIDELITY_FILE, {**self.record, "settings": dataclasses.asdict(self.cfg)})
        return result

    def warning(self, result: dict) -> str | None:
        """The one-line warning for a final fidelity below --fidelity-warn % of the judge's top-1 on real images
        (self._ceiling, set by the first check), else None."""
        ceiling, images = self._ceiling
        bar = self.cfg.fidelity_warn / 100 * ceiling
        if result["fidelity"] >= bar:
            return None
        weak = sorted((v, n) for n, v in result["per_class"].items() if v is not None)[:3]
        return (f"class fidelity {result['fidelity']:.1f}% is below {self.cfg.fidelity_warn:g}% of the judge's "
                f"{ceiling:.1f}% top-1 on real {images} images ({bar:.1f}%; weakest classes: "
                f"{', '.join(f'{n} {v:.0f}%' for v, n in weak)}): the model's samples often do "
                f"not show their class; see {self.out / SAMPLES_FILE}. Train longer (--steps) or check --lr / --model"
                + ("; on a new small dataset the latent route (no --codec pixel: a VAE of the data first) trains a "
                   "usable model sooner (docs/pretrained.md)" if getattr(self.train_cfg, "codec", None) == "pixel"
                   else ""))
