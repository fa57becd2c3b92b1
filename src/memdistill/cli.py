"""The `memdistill` command line: one console script, a subcommand per stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError
from .options import (EVAL_HELP, SAMPLE_HELP, TRAIN_HELP, TRAIN_RUN_MARKS, _add_run_folder_args, add_config_args,
                      check_command, check_out, config_from_args)

log = logging.getLogger("memdistill")


# ----- subcommands ---------------------------------------------------------------------------------------
def say(message: str) -> None:
    """Print a result line once, from rank 0 only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def _say_labels(export: Path) -> None:
    """Print how the export's class names map to the model's class indices (--labels)."""
    from .models.io import EXPORT_CONFIG

    cfg = json.loads((Path(export) / EXPORT_CONFIG).read_text())
    pairs = [f"{n}->{c}" for n, c in zip(cfg["class_names"], cfg["cond_labels"])]
    say(f"class labels ({cfg.get('labels', 'index')}): {', '.join(pairs[:10])}" + (" ..." if len(pairs) > 10 else ""))


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from .pretrain import VAE_FOLDER, pretrain, pretrain_defaults
    from .train import TrainConfig

    from .fidelity import FIDELITY_FILE, FidelityConfig

    check_out(args, "a run", TRAIN_RUN_MARKS + (VAE_FOLDER,))
    cfg = config_from_args(TrainConfig, args, pretrain_defaults())
    fidelity = config_from_args(FidelityConfig, args, FidelityConfig())
    export = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, fidelity=fidelity)
    if (Path(args.out) / VAE_FOLDER / "manifest.json").is_file():  # the VAE this run trained first (--vae auto)
        say(f"VAE of the data: {Path(args.out) / VAE_FOLDER}")
        # the warning's remedies (--steps, --latent-channels) are train-vae's options, not pretrain's
        _say_vae_quality(Path(args.out) / VAE_FOLDER,
                         advice=f"(those options are train-vae's: run memdistill train-vae --data {cfg.data} --out DIR "
                                "with them, then pretrain with --vae DIR/export)")
    _say_labels(export)
    say(f"pretrained model exported to {export}")
    if fidelity.fidelity:
        _say_training_fidelity(Path(args.out) / FIDELITY_FILE)


def _say_training_fidelity(path: Path) -> None:
    """Print the checks a training run recorded in ``path`` (fidelity.json), its warning last."""
    from .fidelity import SAMPLES_FILE, format_result

    record = json.loads(path.read_text())
    for check in record["checks"]:
        say(f"step {check['step']}: class fidelity {check['fidelity']:.1f}% ({check['images']} images)")
    final = record["final"]
    say(f"final (step {final['step']}, {final['per_class_images']} samples per class):")
    for line in format_result(final):
        say("  " + line)
    say(f"samples: {path.parent / SAMPLES_FILE}; figures: {path}")
    if final.get("warning"):
        say(f"WARNING: {final['warning']}")


def _cmd_fidelity(args: argparse.Namespace) -> None:
    from .checks import require_int
    from .fidelity import SAMPLES_FILE, format_result, measure_model, measure_set, sample_grid
    from .manifest import write_json_atomic
    from .runtime import bars_disabled
    from .sample import SampleConfig

    if (args.model is None) == (args.set is None):
        raise UserError("give --model (a model to sample) or --set (an image set to judge), one of them")
    require_int("--per-class", args.per_class, low=1)
    check_out(args, "results (results.json)", ("results.json",), resumable=False)
    if args.set is not None:
        result, images, labels, names = measure_set(args.set, args.data, args.test, args.judge_net,
                                                    args.judge_epochs, args.judge_cache, args.device)
        say(f"set: {args.set} ({result['images']} images)")
    else:
        cfg = config_from_args(SampleConfig, args, SampleConfig(model=args.model))
        result, images, labels, names = measure_model(cfg, args.per_class, args.data, args.test,
                                                      progress=bars_disabled() is None and sys.stderr.isatty())
        say(f"model: {args.model}; {args.per_class} samples per class, guidance {cfg.cfg_scale:g}, "
            f"{cfg.steps} {cfg.sampler} steps, {result['sampling_seconds']:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(images, labels, names, args.grid or out / SAMPLES_FILE)
    result["grid"] = str(grid)
    write_json_atomic(out / "results.json", result)
    for line in format_result(result):
        say(line)
    say(f"grid: {grid}; results written to {out / 'results.json'}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune, finetune_defaults
    from .train import TrainConfig

    check_out(args, "a run", TRAIN_RUN_MARKS)
    cfg = config_from_args(TrainConfig, args, finetune_defaults())
    export = finetune(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    _say_labels(export)
    say(f"fine-tuned model exported to {export}")


def _cmd_train_vae(args: argparse.Namespace) -> None:
    from .trainvae import VAEConfig, train_vae, vae_defaults

    check_out(args, "a run", TRAIN_RUN_MARKS)
    cfg = config_from_args(VAEConfig, args, vae_defaults())
    r = train_vae(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    say(f"latents {'x'.join(map(str, r['latent_shape']))} of {r['image_size']} px images (padded to {r['pad_to']} px); "
        f"scaling factor {r['scaling_factor']:.5f} (1 / std {r['latent_std']:.4f} of the train latents)")
    say(f"VAE exported to {Path(args.out) / 'export'} (use --codec vae --vae {Path(args.out) / 'export'})")
    _say_vae_quality(Path(args.out))


def _say_vae_quality(run: Path, advice: str | None = None) -> None:
    """Print the reconstruction checks a train-vae run recorded (trainvae.QUALITY_FILE), its warning last, and
    ``advice`` on the line after a warning."""
    from .trainvae import GRID_FILE, QUALITY_FILE

    record = json.loads((run / QUALITY_FILE).read_text())
    images, originals = record["images"], record["judge_top1_originals"]
    what = "test images" if images["split"] == "test" else "training images (no --test)"
    for check in record["checks"] + [record["final"]]:
        say(f"step {check['step']}: reconstructions of {images['count']} {what}: PSNR {check['psnr_db']:.2f} dB; "
            f"judge top-1 {check['judge_top1_reconstructions']:.2f} % on reconstructions, {originals:.2f} % on the "
            "originals")
    say(f"originals and reconstructions: {run / GRID_FILE}")
    if record["final"]["warning"]:
        say(f"WARNING: {record['final']['warning']}")
        if advice:
            say(advice)


def _cmd_sample(args: argparse.Namespace) -> None:
    from .imageset import check_target
    from .sample import SampleConfig, parse_classes, sample_set

    check_target(args.out, args.overwrite)
    cfg = config_from_args(SampleConfig, args, SampleConfig())
    cfg = dataclasses.replace(cfg, classes=parse_classes(args.classes))
    out = sample_set(cfg, args.out, overwrite=args.overwrite)
    say(f"sampled {cfg.ipc} images per class into {out}")


def _cmd_select(args: argparse.Namespace) -> None:
    from .baselines import select_real
    from .data import open_dataset
    from .imageset import check_target

    check_target(args.out, args.overwrite)  # before the data is read
    ds = open_dataset(args.data, "train", args.subset, args.resolution, args.skip_bad_images, args.channels,
                      args.labels)
    out = select_real(args.method, ds, args.ipc, args.seed, args.out, overwrite=args.overwrite)
    say(f"selected {args.ipc} real images per class ({args.method}) into {out}")


def _print_eval(result: dict, label: str) -> None:
    from .evaluate import format_table

    say(format_table(dict(result, label=label)))


def _print_scores(scores: dict) -> None:
    from .reports import SCORE_COLUMNS, score_cells

    say("  ".join(f"{name} {cell}" for (_, name, _), cell in zip(SCORE_COLUMNS, score_cells(scores)) if cell != "–")
        + f"  (scaling: {scores['scaling']})")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import EvalConfig, evaluate_image_set
    from .manifest import write_json_atomic
    from .references import ScoreConfig, check_reference_data, references_for, score_set, without_augmentation

    # One rule for every stage: an earlier result is replaced only with --overwrite, checked before training.
    check_out(args, "results (results.json)", ("results.json",), resumable=False)
    if (Path(args.out) / "results.json").is_dir():
        raise UserError(f"--out {args.out}: results.json there is a folder; choose another --out")
    cfg = config_from_args(EvalConfig, args, EvalConfig())
    score_cfg = config_from_args(ScoreConfig, args, ScoreConfig())
    score_cfg.validate()
    check_reference_data(score_cfg, args.test)
    result = evaluate_image_set(args.train, args.test, cfg, test_split=args.test_split, subset=args.subset,
                                resolution=args.resolution, skip_bad_images=args.skip_bad_images,
                                teacher_dir=Path(args.out) / "teacher")
    if score_cfg.wanted:
        noaug = None
        if score_cfg.ars:
            # labelled by the first evaluation's teacher: none is trained again (without augmentation)
            noaug = evaluate_image_set(args.train, args.test, without_augmentation(cfg, result),
                                       test_split=args.test_split, subset=args.subset, resolution=args.resolution,
                                       skip_bad_images=args.skip_bad_images)
        hard = None
        if cfg.labels == "soft":  # HLR compares hard-label accuracies (references.score_set)
            hard = evaluate_image_set(args.train, args.test, cfg.with_hard_labels(), test_split=args.test_split,
                                      subset=args.subset, resolution=args.resolution,
                                      skip_bad_images=args.skip_bad_images)
        refs = references_for(result, score_cfg, args.subset, args.test_split)
        result["scores"] = score_set(result, refs, EvalConfig(**result["config"]), result["ipc"], score_cfg, noaug,
                                     hard)
    write_json_atomic(Path(args.out) / "results.json", result)
    _print_eval(result, str(result.get("method") or args.train))
    if "scores" in result:
        _print_scores(result["scores"])
    say(f"results written to {Path(args.out) / 'results.json'}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .ddranking import FORMATS, export_ddranking

    if args.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    out = export_ddranking(args.set, args.out, overwrite=args.overwrite)
    say(f"exported {args.set} for DD-Ranking into {out} (class order in {out / 'CLASS_ORDER.txt'})")


def _cmd_run(args: argparse.Namespace) -> None:
    from .evaluate import EvalConfig
    from .references import ScoreConfig
    from .run import RunConfig, run_pipeline
    from .sample import SampleConfig
    from .train import TrainConfig

    check_out(args, "a run")
    base = RunConfig()
    cfg = RunConfig(ipc=args.ipc, baselines=args.baselines, test=args.test,
                    finetune=config_from_args(TrainConfig, args, base.finetune),
                    sample=config_from_args(SampleConfig, args, base.sample, prefix="sample"),
                    eval=config_from_args(EvalConfig, args, base.eval, prefix="eval"),
                    scores=config_from_args(ScoreConfig, args, base.scores))
    report = run_pipeline(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    results = json.loads((report.parent / "results.json").read_text())
    from .evaluate import labels_line
    from .reports import format_score

    if labels_line(results["results"]):
        say(labels_line(results["results"]))

    for r in results["results"]:
        n = len(r["per_repeat"])
        say(f"{r['method']:>10}  IPC {r['ipc']}  {r['net']}  best {format_score(r['best_mean'], r['best_std'], n)}  "
            f"last {format_score(r['last_mean'], r['last_std'], n)}")
        if "scores" in r:
            _print_scores(r["scores"])
    say(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .fidelity import FIDELITY_HELP, FidelityConfig
    from .pretrain import PRETRAIN_HELP, pretrain_defaults, pretrain_description

    parser = argparse.ArgumentParser(prog="memdistill", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"memdistill {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress messages (-v) or debug details (-vv); warnings are always shown")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a class-conditional DiT from scratch",
                       description=pretrain_description())
    add_config_args(p, pretrain_defaults(), skip={"init", "train", "memory", "lambda_real", "lambda_gen", "mem_real",
                                                  "mem_gen", "repeat_loss_defect", "memory_max_t", "stage"},
                    help={**TRAIN_HELP, **PRETRAIN_HELP})
    add_config_args(p, FidelityConfig(), help=FIDELITY_HELP)
    _add_run_folder_args(p, "runs/pretrain")
    p.set_defaults(func=_cmd_pretrain)

    from .finetune import finetune_defaults

    p = sub.add_parser("finetune", help="fine-tune a DiT with memory losses (the method)",
                       description="Fine-tune a pretrained DiT with the representativeness and diversity losses "
                                   "against per-class memories. Defaults: the shipped mnist5k-latent DiT on the latents "
                                   "of the shipped mnist5k-vae, tuned on mnist5k (the pixel-space model: --init mnist5k "
                                   "--codec pixel).")
    add_config_args(p, finetune_defaults(), skip={"model", "stage"}, help=TRAIN_HELP)
    _add_run_folder_args(p, "runs/finetune")
    p.set_defaults(func=_cmd_finetune)

    from .trainvae import VAE_HELP, vae_defaults

    p = sub.add_parser("train-vae", help="train a small KL autoencoder (AutoencoderKL) for --codec vae",
                       description="Train a KL-regularised autoencoder (diffusers AutoencoderKL, the family of "
                                   "sd-vae-ft-ema) on a dataset and export a folder that --codec vae --vae loads, "
                                   "with its scaling factor (1 / std of the train latents) in config.json. Loss: "
                                   "L1 reconstruction + 1e-6 x KL, as latent diffusion (Rombach et al. 2022). "
                                   "Checks the reconstructions at every checkpoint and at the end (a judge's top-1 "
                                   "beside the originals', PSNR; test images, else 1000 training images).")
    add_config_args(p, vae_defaults(), help={**TRAIN_HELP, **VAE_HELP})
    _add_run_folder_args(p, "runs/train-vae")
    p.set_defaults(func=_cmd_train_vae)

    from .evaluate import EvalConfig
    from .references import SCORE_HELP, ScoreConfig
    from .run import RunConfig
    from .sample import SampleConfig

    p = sub.add_parser("sample", help="sample IPC images per class from a DiT into a class-per-folder PNG set")
    add_config_args(p, SampleConfig(), skip={"classes"}, help=SAMPLE_HELP)
    p.add_argument("--classes", default=None, help="comma-separated label indices to sample (default: all)")
    p.add_argument("--out", default="runs/sample", help="output image set folder (default: runs/sample)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set")
    _add_progress_arg(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("fidelity", help="class fidelity of a model's samples (or of an image set) under a judge "
                                        "trained on the real train split",
                       description="Sample --per-class images of every class of --model (or read the image set "
                                   "--set) and report the share that a classifier trained on the real train "
                                   "split (the judge) labels as their class, overall and per class, beside the "
                                   "judge's own top-1 on the real test split. Writes results.json and a grid.")
    p.add_argument("--model", default=None, help=SAMPLE_HELP["model"] + " (or --set)")
    p.add_argument("--set", default=None, help="an image set (from sample or select) to judge instead of a model")
    p.add_argument("--data", default=None, help="real train images of the judge: an embedded set (mnist5k, digits) "
                   "or a class-per-folder tree (default: the data the model's run recorded, or a shipped model's "
                   "own set; required otherwise)")
    p.add_argument("--test", default=None, help="real test images for the judge's own top-1 (default: the test "
                   "split of an embedded --data; none for a folder)")
    p.add_argument("--per-class", type=int, default=50, help="samples per class (default: 50)")
    add_config_args(p, SampleConfig(), skip={"model", "ipc", "classes", "pool", "select", "keep_pool", "from_pool",
                                             "judge_data"}, help=SAMPLE_HELP)
    p.add_argument("--grid", default=None, help="PNG of the first 10 images of each class (default: samples.png "
                   "in --out)")
    p.add_argument("--out", default="runs/fidelity", help="folder for results.json (default: runs/fidelity)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results.json in --out")
    _add_progress_arg(p)
    p.set_defaults(func=_cmd_fidelity)

    p = sub.add_parser("select", help="select IPC real images per class (random or herding baseline)")
    p.add_argument("--method", default="random", help="random or herding (default: random)")
    p.add_argument("--data", default="mnist5k", help=TRAIN_HELP["data"] + " (default: mnist5k)")
    p.add_argument("--subset", default=None, help="class list of the --test images: built-in name (imagewoof, "
                   "imagenette, imageidc, idc100) or a text file of folder names (default: every class folder of a "
                   "--test folder; an embedded set's own classes)")
    p.add_argument("--resolution", type=int, default=None, help=TRAIN_HELP["resolution"])
    p.add_argument("--channels", default="auto", help=TRAIN_HELP["channels"] + " (default: auto)")
    p.add_argument("--labels", default="auto", help=TRAIN_HELP["labels"] + " (default: auto)")
    p.add_argument("--skip-bad-images", action="store_true", help=TRAIN_HELP["skip_bad_images"])
    p.add_argument("--ipc", type=int, default=10, help="images per class (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice, 0 to 2147483647 (default: 0)")
    p.add_argument("--out", default="runs/select", help="output image set folder (default: runs/select)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set")
    _add_progress_arg(p)
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser("evaluate", help="train classifiers on an image set, test on real images")
    p.add_argument("--train", required=True,
                   help="train images: an image set (from sample or select) or any class-per-folder tree, "
                        "labelled by its folder names, which must match the test classes")
    p.add_argument("--test", default=None, help="real test images: an embedded dataset's name or a folder (default: "
                   "the test split of the embedded dataset the set was made from; required otherwise)")
    p.add_argument("--test-split", default="test", help="split of an embedded test set (default: test)")
    p.add_argument("--subset", default=None, help="class list of the --test images: built-in name (imagewoof, "
                   "imagenette, imageidc, idc100) or a text file of folder names (default: every class folder of a "
                   "--test folder; an embedded set's own classes)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size of a train folder tree and of the test images (default: the train images' "
                        "own size, which a tree's images must then share; e.g. 256 for ImageNet photos)")
    add_config_args(p, EvalConfig(), help=EVAL_HELP)
    add_config_args(p, ScoreConfig(), help=SCORE_HELP)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images of a --test folder or a plain --train tree with a warning (default: "
                        "stop at the first)")
    p.add_argument("--out", default="runs/evaluate", help="folder for results.json (default: runs/evaluate)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results.json in --out")
    _add_progress_arg(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write an image set in another tool's layout (DD-Ranking)",
                       description="Write an image set as DD-Ranking reads one: each class in the folder of its label "
                                   "index in the model's class list (00000, 00001, ...; a set sampled with --classes "
                                   "7,3 gives 00007 and 00003), and CLASS_ORDER.txt mapping each index to its class.")
    p.add_argument("--format", default="ddranking", help="output layout: ddranking (default: ddranking)")
    p.add_argument("--set", required=True, help="the image set (from sample or select) or a class-per-folder tree")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_progress_arg(p)
    p.set_defaults(func=_cmd_export)

    run_defaults = RunConfig()
    p = sub.add_parser("run", help="the whole pipeline: fine-tune, sample, evaluate beside baselines, report",
                       description="Fine-tune, sample, select baselines, evaluate and write a report. With no "
                                   "arguments: the shipped mnist5k-latent DiT on its VAE, self-adaptive memory, "
                                   "IPC 10, ConvNet-3 beside the random baseline. Sampling options are --sample-*, "
                                   "evaluation options --eval-*, the rest are fine-tuning options.")
    p.add_argument("--ipc", type=int, default=run_defaults.ipc, help=f"images per class (default: {run_defaults.ipc})")
    p.add_argument("--baselines", default=run_defaults.baselines,
                   help="comma-separated real baselines: random, herding, or '' (default: random)")
    p.add_argument("--test", default=None, help="real test images (default: the embedded dataset's test split)")
    add_config_args(p, run_defaults.finetune, skip={"model", "stage"}, help=TRAIN_HELP)
    add_config_args(p, run_defaults.sample, skip={"model", "ipc", "classes", "subset", "codec", "labels", "keep_pool",
                                                  "from_pool"},
                    help=SAMPLE_HELP, prefix="sample")
    add_config_args(p, run_defaults.eval, help=EVAL_HELP, prefix="eval")
    add_config_args(p, run_defaults.scores, help=SCORE_HELP)
    _add_run_folder_args(p, "runs/run")
    p.set_defaults(func=_cmd_run)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    for p in (parser, *sub.choices.values()):
        _add_runtime_args(p)
    return parser


THREADS_HELP = ("intra-op CPU threads: a number or auto (default: auto = the cores not busy with other work, from "
                "the 1-minute load average; MEMDISTILL_THREADS or OMP_NUM_THREADS also set it). Waiting threads "
                "sleep (OMP_WAIT_POLICY=passive unless set). fp32 results can differ in the last digits between "
                "thread counts (parallel sums); the thread count is recorded in every manifest")


PROGRESS_HELP = "show progress bars (default: when stderr is a terminal); --no-progress hides every bar"


def _add_progress_arg(p: argparse.ArgumentParser) -> None:
    """--progress / --no-progress for a command whose settings have no progress field of their own."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=PROGRESS_HELP)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--threads both before the subcommand and after it; SUPPRESS keeps a subparser's default from hiding a
    value given before the subcommand."""
    p.add_argument("--threads", default=argparse.SUPPRESS, metavar="N|auto", help=THREADS_HELP)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import runtime

    try:
        runtime.prepare_environment()  # before torch is imported: libgomp reads OMP_WAIT_POLICY at load time
    except UserError as err:
        print(f"memdistill: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_flush_denormal(True)  # denormals make CPU steps erratically slow
    try:
        runtime.set_threads(getattr(args, "threads", None))
        runtime.set_progress(getattr(args, "progress", None))  # every bar, not only a stage's own
        check_command(args)  # seeds, --latent-cache, --out against the inputs: before any stage starts
        args.func(args)
    except UserError as err:
        print(f"memdistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # 128 + the signal's number, as a shell reports a process the signal ended: 130 Ctrl-C, 143 SIGTERM
        signum = getattr(err, "signum", 2)
        print("terminated" if signum == 15 else "interrupted", file=sys.stderr)
        return 128 + signum
    except OSError as err:
        from .manifest import DISK_FULL

        if err.errno not in DISK_FULL:
            raise
        # A write the stages' own helpers do not wrap (a log line, a report): still one line, with the path.
        where = f" while writing {err.filename}" if err.filename else ""
        print(f"memdistill {args.command}: error: the disk is full (or the quota used up){where}: free some "
              "space and run the command again", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # torchrun: release the process group (NCCL warns when it leaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
