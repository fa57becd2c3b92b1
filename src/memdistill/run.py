"""`memdistill run`: fine-tune, sample, select real baselines, evaluate and report, in one command.

Layout of the output folder:
    finetune/            the fine-tuning run (resume state, metrics, export)
    sets/<method>/       each evaluated image set (the distilled one and the real baselines)
    eval/<method>.json   each set's evaluation
    report.md, results.json, grid.png, accuracy.png, run_config.json
    timings.json         seconds per stage, updated as each stage ends (kept by --resume)
A stage whose output is complete is not redone when the same command is run again with --resume;
run_config.json makes sure "the same command" holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .evaluate import EvalConfig, evaluate_image_set, resolve_test_set
from .finetune import finetune, finetune_defaults
from .references import ScoreConfig, references_for, score_set, without_augmentation
from .devices import resolve_device
from .runtime import resolve_precision
from .manifest import (NUMBER, check_output_folder, read_json_object, refuse_changed_settings, refuse_existing,
                       write_json_atomic, write_manifest)
from .sample import SampleConfig, sample_set
from .train import TrainConfig

log = logging.getLogger(__name__)

BASELINES = ("random", "herding")


@dataclass
class RunConfig:
    ipc: int = 10
    baselines: str = "random"  # comma-separated real-data baselines evaluated beside the distilled set
    test: str | None = None  # real test images: None = the embedded dataset's test split; else a folder
    finetune: TrainConfig = field(default_factory=finetune_defaults)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # 100 epochs instead of the IPC table's 2000, and precision "fast" (bf16 autocast where the CPU computes bf16
    # natively: there about 2x faster, and within the spread of fp32 over repeats at IPC 1, 10 and 50,
    # docs/benchmarks.md "bf16 against fp32, paired"), keep the embedded default within minutes on 2 CPU cores.
    # evaluate and bench keep the protocol's arithmetic (auto).
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(epochs=100, repeats=3, precision="fast"))
    # Off by default: the first full-data reference trains minutes per classifier on a CPU (references module).
    scores: ScoreConfig = field(default_factory=ScoreConfig)

    def baseline_list(self) -> list[str]:
        names = [b.strip() for b in self.baselines.split(",") if b.strip()]
        bad = [b for b in names if b not in BASELINES]
        if bad:
            raise UserError(f"unknown baseline {bad[0]!r}; allowed: {', '.join(BASELINES)} (comma-separated)")
        if len(set(names)) != len(names):
            raise UserError(f"--baselines lists {', '.join(sorted({n for n in names if names.count(n) > 1}))} "
                            "more than once")
        return names

    def validate(self) -> None:
        """Every setting of every stage, before any work (options as ``run`` spells them)."""
        if isinstance(self.ipc, bool) or not isinstance(self.ipc, int) or self.ipc < 1:
            raise UserError(f"--ipc must be at least 1, got {self.ipc}")
        self.baseline_list()
        self.finetune.validate()
        self.sample.validate(prefix="sample-")
        if self.sample.vae is not None and self.finetune.with_resolved_codec().codec != "vae":
            raise UserError("--sample-vae decodes latents, but the run works in pixel space (--codec pixel); leave "
                            "it out")
        self.eval.validate(prefix="eval-")
        self.scores.validate()


def _complete(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


# Options that change how a run is watched or scheduled, not what it computes.
WATCH_ONLY = {"finetune.progress", "finetune.checkpoint_every", "finetune.log_every", "finetune.device",
              "sample.device", "sample.batch_size", "eval.device",
              # scores are computed from the stored evaluations: asking for them on --resume redoes no stage
              *(f"scores.{f.name}" for f in dataclasses.fields(ScoreConfig))}


def _sampling_levers(sample) -> dict:
    """The sampling levers a run used (memdistill.guidance, memdistill.selection), for the report's settings;
    the ones left at their defaults are left out so the plain run's settings stay short."""
    levers = {}
    if sample.cfg_interval is not None:
        levers["cfg_interval"] = sample.cfg_interval
    if sample.cfg_schedule != "constant":
        levers["cfg_schedule"] = sample.cfg_schedule
    if sample.mode_guidance > 0:
        levers.update(mode_guidance=sample.mode_guidance, mode_stop=sample.mode_stop, modes=sample.modes)
    if sample.select != "none":
        levers.update(pool=sample.pool, select=sample.select)
    return levers


def _settings_now(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _check_same_run(out: Path, cfg: RunConfig) -> None:
    """Completed stages are reused on --resume, so the settings must be the ones they were made with.
    Only checks: run_config.json is written once every check of the command has passed."""
    path = out / "run_config.json"
    if path.is_file():
        refuse_changed_settings(read_json_object(path, what="pass --overwrite to start the run afresh"),
                                _settings_now(cfg), ignore=WATCH_ONLY)


# Keys of an eval/<method>.json that the report reads.
EVAL_KEYS = {"ipc": int, "net": str, "best_mean": NUMBER, "best_std": NUMBER, "last_mean": NUMBER,
             "last_std": NUMBER, "per_repeat": list, "epochs": int}


def run_pipeline(cfg: RunConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Fine-tune, sample, select the baselines, evaluate every set and write the report into ``out``;
    returns report.md. Every check (options, output folder, data against IPC, nets) runs before anything is
    written, and a command refused before its first stage leaves nothing behind. With ``resume``, complete
    stages are kept, with the time they took when they ran (timings.json)."""
    from .data import open_dataset

    out = check_output_folder(out)
    ft = cfg.finetune
    cfg.validate()
    baselines = cfg.baseline_list()
    test = resolve_test_set(ft.data, cfg.test)
    refuse_existing(out, "a run", overwrite=overwrite, resume=resume)
    if resume:
        _check_same_run(out, cfg)
    # The train set is checked up front so a bad IPC fails before minutes of fine-tuning.
    train_ds = open_dataset(ft.data, "train", ft.subset, ft.resolution, ft.skip_bad_images, ft.channels, ft.labels)
    counts = [int((train_ds.targets == c).sum()) for c in range(train_ds.num_classes)]
    if baselines and cfg.ipc > min(counts):
        c = counts.index(min(counts))
        raise UserError(f"--ipc {cfg.ipc} exceeds the {min(counts)} real images of class "
                        f"{train_ds.class_names[c]!r} that the baselines draw from")

    # Likewise the evaluation net (name, and depth against the image size).
    from .nets import build_net

    build_net(cfg.eval.net, train_ds.num_classes, train_ds.channels, cfg.eval.image_size or train_ds.resolution,
              cfg.eval.norm)

    # Every check passed: from here on the command writes.
    if out.exists() and not resume and any(out.iterdir()):
        shutil.rmtree(out)  # refuse_existing let it through: --overwrite
    created = not out.exists()
    fresh = created or not any(out.iterdir())
    write_json_atomic(out / "run_config.json", _settings_now(cfg))
    try:
        return _run_stages(cfg, out, train_ds, counts, baselines, test)
    except UserError:
        # Refused before any stage made something worth keeping (e.g. an --init that does not fit the data):
        # leave the folder as it was, so the corrected command is not refused as "already holds a run".
        if fresh and not any((out / "finetune" / "checkpoints").glob("*")) and not (out / "sets").exists():
            if created:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for p in out.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise


def _run_stages(cfg: RunConfig, out: Path, train_ds, counts: list[int], baselines: list[str], test: str) -> Path:
    from .baselines import select_real
    from .imageset import read_image_set
    from .reports import accuracy_plot, distilled_vs_real_grid, write_run_report

    ft = cfg.finetune
    timings_path = out / "timings.json"
    # Seconds per stage, kept across invocations: a stage reused on --resume keeps the time it took then.
    timings: dict[str, float] = {}
    if timings_path.is_file():
        saved = read_json_object(timings_path, what="delete it to drop the stored timings")
        timings = {k: float(v) for k, v in saved.items() if isinstance(v, NUMBER) and not isinstance(v, bool)}
    fresh_timings: set[str] = set()

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t0
        fresh_timings.add(name)
        write_json_atomic(timings_path, timings)
        return result

    # 1. fine-tune
    ft_dir = out / "finetune"
    if _complete(ft_dir):
        log.info("fine-tuning already complete in %s", ft_dir)
    else:
        timed("finetune", finetune, ft, ft_dir, resume=(ft_dir / "checkpoints" / "last.pt").exists(),
              overwrite=True)

    # 2. sample the distilled set, select the real baselines
    sets: dict[str, Path] = {}
    method = ft.memory if ft.memory != "none" else "finetuned"
    sets[method] = out / "sets" / method
    if not _complete(sets[method]):
        sample_cfg = dataclasses.replace(cfg.sample, model=str(ft_dir), ipc=cfg.ipc,
                                         mode_data=cfg.sample.mode_data or ft.data)  # modes of the tuned-on data
        timed("sample", sample_set, sample_cfg, sets[method], overwrite=True)
    for name in baselines:
        sets[name] = out / "sets" / name
        if not _complete(sets[name]):
            timed(f"select {name}", select_real, name, train_ds, cfg.ipc, cfg.eval.seed, sets[name], overwrite=True)

    # 3. evaluate every set with the same protocol
    eval_cfg = cfg.eval
    results = []
    for name, folder in sets.items():
        path = out / "eval" / f"{name}.json"
        if path.is_file():
            result = read_json_object(path, EVAL_KEYS, what="delete it to evaluate that set again")
        else:
            # soft labels: the same teacher for every set, trained once on the train split into teacher/
            result = timed(f"evaluate {name}", evaluate_image_set, folder, test, eval_cfg,
                           subset=ft.subset, resolution=None, teacher_dir=out / "teacher", teacher_data=ft.data)
            write_json_atomic(path, result)
        result["method"] = name
        results.append(result)
    if cfg.scores.wanted:
        _score(cfg, out, sets, results, timed)

    # 4. report
    images, labels, class_names, _ = read_image_set(sets[method])
    real_images = [train_ds[i][0] for c in range(len(class_names))
                   for i in (train_ds.targets == c).nonzero().flatten()[:8].tolist()]
    real_labels = [c for c in range(len(class_names)) for _ in range(min(8, counts[c]))]
    import torch

    grid = distilled_vs_real_grid(images, labels, torch.stack(real_images), torch.tensor(real_labels),
                                  class_names)
    grid.save(out / "grid.png")
    accuracy_plot(results, out / "accuracy.png",
                  title=f"{ft.data}, IPC {cfg.ipc}, {eval_cfg.net}, {eval_cfg.repeats} repeats")
    summary = [{k: r[k] for k in ("method", "ipc", "net", "best_mean", "best_std", "last_mean", "last_std",
                                  "per_repeat", "epochs", "precision", "scores") if k in r} for r in results]
    # the precision the evaluations ran at (fast and auto resolved); older eval files did not record it
    eval_precision = summary[0].get("precision") or resolve_precision(eval_cfg.precision,
                                                                       resolve_device(eval_cfg.device))
    write_json_atomic(out / "results.json", {"results": summary, "timings": timings})
    settings = {"data": ft.data, "subset": ft.subset, "test": test, "ipc": cfg.ipc, "memory": ft.memory,
                "init": ft.init, "finetune_steps": ft.steps, "lambda_real": ft.lambda_real,
                "lambda_gen": ft.lambda_gen, "mem_real": ft.mem_real, "mem_gen": ft.mem_gen,
                "net": eval_cfg.net, "repeats": eval_cfg.repeats, "eval_epochs": summary[0]["epochs"],
                "eval_precision": eval_precision,
                "cfg_scale": cfg.sample.cfg_scale, "sample_steps": cfg.sample.steps, "seed": ft.seed,
                **_sampling_levers(cfg.sample)}
    notes = []
    expected = ["finetune", "sample", *(f"select {b}" for b in baselines), *(f"evaluate {m}" for m in sets)]
    if set(timings) - fresh_timings:
        notes.append("Stages complete from an earlier invocation were reused; their timings are the ones "
                     "measured when they ran.")
    missing = [name for name in expected if name not in timings]
    if missing:
        notes.append(f"Not timed (made before timings were stored): {', '.join(missing)}.")
    if eval_cfg.epochs is not None:
        notes.append(f"Evaluation trained for {eval_cfg.epochs} epochs (the protocol's IPC table would use more); "
                     "pass --eval-epochs none for the full protocol.")
    if eval_precision == "bf16":
        notes.append("Evaluation ran under bf16 autocast (faster; the protocol trains in fp32): pass "
                     "--eval-precision fp32 for the protocol's arithmetic.")
    report = write_run_report(out, settings, summary, timings, "grid.png", "accuracy.png", notes)
    write_manifest(out, "run", {"ipc": cfg.ipc, "baselines": baselines, "test": test,
                                "finetune": dataclasses.asdict(ft), "sample": dataclasses.asdict(cfg.sample),
                                "eval": dataclasses.asdict(eval_cfg)}, report="report.md")
    return report


def _score(cfg: RunConfig, out: Path, sets: dict[str, Path], results: list[dict], timed) -> None:
    """Add DD-Ranking's scores to every result (memdistill.references): references on the run's own train data;
    with --ars every set is evaluated again without augmentation (eval/<method>-noaug.json, kept on resume)."""
    ft, eval_cfg = cfg.finetune, cfg.eval
    for result in results:
        if "test_data" not in result:  # an evaluation stored by an older version: evaluate it again for scores
            raise UserError(f"{out / 'eval' / (result['method'] + '.json')} predates scores; delete it to evaluate "
                            "that set again")
    refs = references_for(results[0], cfg.scores, ft.subset, default_data=ft.data)
    for result in results:
        noaug = None
        if cfg.scores.ars:
            path = out / "eval" / f"{result['method']}-noaug.json"
            if path.is_file():
                noaug = read_json_object(path, EVAL_KEYS, what="delete it to evaluate that set again")
            else:
                noaug = timed(f"evaluate {result['method']} without augmentation", evaluate_image_set,
                              sets[result["method"]], result["test_data"], without_augmentation(eval_cfg, result),
                              subset=ft.subset, resolution=None)
                write_json_atomic(path, noaug)
        hard = None
        if eval_cfg.labels == "soft":  # HLR compares hard-label accuracies (references.score_set)
            path = out / "eval" / f"{result['method']}-hard.json"
            if path.is_file():
                hard = read_json_object(path, EVAL_KEYS, what="delete it to evaluate that set again")
            else:
                hard = timed(f"evaluate {result['method']} with hard labels", evaluate_image_set,
                             sets[result["method"]], result["test_data"], eval_cfg.with_hard_labels(),
                             subset=ft.subset, resolution=None)
                write_json_atomic(path, hard)
        result["scores"] = score_set(result, refs, EvalConfig(**result["config"]), result["ipc"], cfg.scores, noaug,
                                     hard)
