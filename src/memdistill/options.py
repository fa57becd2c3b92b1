"""Command-line options shared by every subcommand: one ``--option`` per field of a stage's config dataclass, the
help text of those fields, and the output-folder check every stage runs first. Both the main command line (cli) and
the bench's subcommand build on it, so neither imports the other."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Callable

from .errors import UserError

# ----- dataclass <-> argparse --------------------------------------------------------------------------
def _field_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional) of a dataclass annotation such as ``int | None``."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing})  # annotations are strings under `from __future__ import annotations`
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _optional(base: type) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__
    return parse


# The namespace attribute that lists the options typed on the command line (see given_fields).
GIVEN = "_given"


def _recording(action: type[argparse.Action]) -> type[argparse.Action]:
    """``action`` that also notes its dest in the namespace's GIVEN set: a value typed explicitly can then be told
    from a default, e.g. to refuse an option that would do nothing (guidance.refuse_ignored_guidance)."""
    class Recorded(action):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, set(getattr(namespace, GIVEN, ())) | {self.dest})

    Recorded.__name__ = f"Recorded{action.__name__}"
    return Recorded


_STORE, _BOOL = _recording(argparse._StoreAction), _recording(argparse.BooleanOptionalAction)


def given_fields(args: argparse.Namespace, prefix: str = "") -> set[str]:
    """The config fields whose options were typed on the command line (by add_config_args's options), without
    ``prefix`` ("sample" for run's --sample-* options)."""
    head = f"{prefix}_" if prefix else ""
    return {d[len(head):] for d in getattr(args, GIVEN, ()) if d.startswith(head)}


def add_config_args(parser: argparse.ArgumentParser, defaults: Any, skip: set[str] = frozenset(),
                    help: dict[str, str] | None = None, prefix: str = "", flags: dict[str, str] | None = None
                    ) -> None:
    """One ``--[prefix-]option`` per field of the dataclass ``defaults``, with its value as the default.
    With a prefix, the parsed attribute is ``<prefix>_<field>``. ``flags`` spells a field's option otherwise
    ({field: "--flag"}); its usual spelling is then kept as a hidden alias, so older commands still run.
    The help says "(default: X)" unless its text states the default itself."""
    help = help or {}
    flags = flags or {}
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        usual = "--" + (prefix + "-" if prefix else "") + f.name.replace("_", "-")
        flag = flags.get(f.name, usual)
        dest = f"{prefix}_{f.name}" if prefix else f.name
        default = getattr(defaults, f.name)
        base, optional = _field_type(f.type)
        text = help.get(f.name, "")
        if "(default:" in text and default != _class_default(f):
            # this command's default differs from the one the shared help text states (run's 100 evaluation
            # epochs, say): state this command's own
            text = text[:text.rfind("(default:")].rstrip()
        if base is bool:
            state = {True: "on", False: "off"}.get(default)
            kwargs: dict[str, Any] = dict(action=_BOOL,
                                          help=text if "(default:" in text or state is None else f"{text} (default: {state})")
        else:
            kwargs = dict(action=_STORE, type=_optional(base) if optional else base, metavar=base.__name__.upper(),
                          help=text if "(default:" in text else
                          f"{text} (default: {'none' if default is None else default})".strip())
        # --steps and --epochs of a training config: left unset when not given, so that config_from_args can tell an
        # explicit --epochs from the default length in steps
        given_only = f.name in UNTIL and all(hasattr(defaults, n) for n in UNTIL)
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS if given_only else default, **kwargs)
        if flag != usual:  # the usual spelling stays as a hidden alias
            parser.add_argument(usual, dest=dest, default=argparse.SUPPRESS, **{**kwargs, "help": argparse.SUPPRESS})


def _class_default(f: dataclasses.Field) -> Any:
    """The default that the dataclass itself gives field ``f`` (MISSING when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# A training run's length: --steps or --epochs (see add_config_args and config_from_args).
UNTIL = ("steps", "epochs")


def config_from_args(cls: type, args: argparse.Namespace, base: Any, prefix: str = "") -> Any:
    """``base`` with the options of ``cls``'s fields parsed into ``args`` (``prefix``: "eval" for --eval-*). A config
    with ``refuse_idle(typed, prefix)`` is then shown which of its TYPED_ONLY options were typed (given_fields), and
    raises a UserError for one that would do nothing (e.g. --temperature with hard labels); defaults are never
    refused."""
    def dest(name: str) -> str:
        return f"{prefix}_{name}" if prefix else name

    values = {f.name: getattr(args, dest(f.name)) for f in dataclasses.fields(cls) if hasattr(args, dest(f.name))}
    if "epochs" in values and "steps" not in values and hasattr(base, "steps"):
        values["steps"] = None  # an explicit --epochs wins over the default --steps (giving both: validate refuses)
    config = dataclasses.replace(base, **values)
    if hasattr(config, "refuse_idle"):
        typed = set(getattr(cls, "TYPED_ONLY", ())) & given_fields(args, prefix)
        config.refuse_idle(typed, f"{prefix}-" if prefix else "")
    return config


def _add_run_folder_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")


TRAIN_HELP = {
    "data": "embedded dataset (mnist5k, digits) or a class-per-folder image tree",
    "subset": "built-in class list (imagewoof, imagenette, imageidc, idc100) or a text file of folder names "
              "(default: every class folder of --data, sorted)",
    "resolution": "image size: folder images get their shorter side resized to it and the centre square cropped "
                  "(default: the images' own size when all are square and of one size, else required, e.g. 256 "
                  "for ImageNet photos; embedded sets: their own, 28 or 8 px)",
    "skip_bad_images": "skip unreadable images with a warning instead of stopping at the first",
    "channels": "image channels: auto (1 when every image is grey, else 3), 1 or 3",
    "labels": "class names to model class indices: auto (ImageNet index when the names are wnids, else 0..K-1; "
              "an unknown name among wnids or for a 1000-class model is an error), imagenet or index "
              "(0..K-1 in class order)",
    "codec": "auto (the --init model's own: its export records the codec and VAE; pixel when it records none), "
             "pixel (the DiT works on pixels) or vae (on the latents of --vae)",
    "vae": "a shipped autoencoder's name (mnist5k-vae) or a local folder of a diffusers AutoencoderKL (default: none; "
           "required with --codec vae)",
    "latent_cache": "folder where the VAE posterior (mean and log-variance of each image, and of its mirror image "
                    "with flipping) is cached and reused; every step draws its own flips and latents from it, so one "
                    "cache serves every --seed (default: none, encode every run)",
    "flip": "horizontal flips of the training images, drawn per step: auto (off for the embedded digit sets and "
            "grey images, on for colour folder data, as the reference does for ImageNet), on or off; a run "
            "records the value it resolved to",
    "model": "DiT size to build from scratch, e.g. DiT-XL/2 or DiT-Tiny/4",
    "init": "checkpoint to start from: a shipped name (mnist5k-latent, mnist5k), an export folder, a run folder, an "
            "official .pt or a diffusers DiT folder",
    "train": "parameters to tune: difffit (biases, label table, DiffFit scales) or all",
    "class_dropout": "probability that a label is replaced by the null class (trains classifier-free guidance)",
    "steps": "optimisation steps; give --steps or --epochs, not both",
    "epochs": "passes over the training images, instead of --steps (default: none, the default --steps applies)",
    "batch_size": "global batch size (split over torchrun processes)",
    "lr": "AdamW learning rate, 0 to 1",
    "weight_decay": "AdamW (decoupled) weight decay, 0 to 1",
    "grad_clip": "clip the gradient norm at this value; none: no clipping",
    "ema_decay": "decay of the exponential moving average of the weights that is exported",
    "memory": "memory strategy: adaptive (the paper), fifo (Minimax) or none",
    "lambda_real": "weight of the representativeness loss",
    "lambda_gen": "weight of the diversity loss",
    "mem_real": "capacity N_R of each class's real memory",
    "mem_gen": "capacity N_G of each class's generated memory",
    "repeat_loss_defect": "reproduce the reference code's re-added class loss (ablation only)",
    "memory_max_t": "only samples at timesteps t below this feed the memory losses and memories "
                    "(default: none, every t, as the paper)",
    "seed": "seed of every random draw (batch order, timesteps, noise, label dropout, initial weights), 0 to 2147483647",
    "checkpoint_every": "save a resume state every this many steps",
    "log_every": "write a line of metrics.jsonl every this many steps",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "progress": "show a progress bar",
    "precision": "auto, fast, fp32, tf32 or bf16: tf32 = TensorFloat-32 matrix products (CUDA only; fp32 "
                 "elsewhere), fast = bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX), else auto, "
                 "bf16 = bfloat16 autocast of the DiT forward (the losses, memories and eviction stay fp32) "
                 "(default: auto = tf32 on CUDA, fp32 on the CPU)",
}

SAMPLE_HELP = {
    "model": "shipped name (mnist5k-latent, mnist5k), a run folder, an export, an official .pt or a diffusers DiT folder",
    "ipc": "images per class",
    "cfg_scale": "classifier-free guidance scale (1 = none)",
    "steps": "respaced sampling steps",
    "sampler": "ddpm (ancestral, learned variances) or ddim",
    "eta": "DDIM noise, 0 (deterministic) to 1",
    "guided_channels": "guide only the first N latent channels, 3 reproduces the official DiT sampler "
                       "(default: none, all channels)",
    "cfg_interval": "a,b: classifier-free guidance only at timesteps a <= t < b of the 1000-step scale "
                    "(0 = clean, 999 = pure noise), the conditional prediction alone elsewhere "
                    "(default: none, every timestep)",
    "cfg_schedule": "how the guidance scale w ramps with timestep t: constant (w), linear or cosine (from 1 at "
                    "pure noise up to w at the clean end)",
    "mode_guidance": "mode guidance strength, 0 (off) to 1: each image's predicted clean sample is pulled this "
                     "fraction of the way towards its class mode (k-means of the real train images)",
    "mode_stop": "fraction of the sampling trajectory, from pure noise, during which mode guidance acts, 0 to 1",
    "modes": "modes (k-means clusters) per class; image i of a class follows mode i mod k "
             "(default: none, as many as --ipc)",
    "mode_data": "real train data for the modes: an embedded set (mnist5k, digits) or a class-per-folder image "
                 "tree (default: none, the embedded set the model was trained on; run and bench: their --data)",
    "mode_cache": "folder where the modes (and VAE latents of the mode data) are cached and reused "
                  "(default: none, computed on every call)",
    "seed": "seed of the per-image noise (image i of class c always gets the same noise) and of the k-means of "
            "the modes, 0 to 2147483647",
    "batch_size": "images sampled at once (does not change the images)",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "precision": "auto, fast, fp32, tf32 or bf16 for the DiT's forward passes: tf32 = TensorFloat-32 matrix products "
                 "(CUDA only; fp32 elsewhere), fast = bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX), else "
                 "auto, bf16 = bfloat16 autocast; the sampler's arithmetic stays fp32 "
                 "(default: auto = tf32 on CUDA, fp32 on the CPU)",
    "subset": "class list for a checkpoint without an export config (default: none, the export's own)",
    "codec": "pixel or vae, for a checkpoint without an export config (default: none, the export's own)",
    "vae": "shipped autoencoder name or local AutoencoderKL folder used to decode (default: none, the export's own)",
    "vae_batch_size": "latents decoded per VAE call (lower it if decoding runs out of GPU memory)",
    "labels": "for --subset: auto, imagenet (wnid -> ImageNet index) or index (0..K-1)",
    "pool": "over-generate: sample ceil(F x IPC) candidates per class (F > 1, required with --select; candidate j "
            "gets image j's noise, so the first IPC are the plain set) and keep IPC of them by --select; with "
            "--from-pool: select from the kept pool's first ceil(F x IPC) candidates (default: none; with "
            "--from-pool all of them)",
    "select": "rule keeping IPC candidates per class: none (plain sampling), random (seeded control), herding "
              "(towards the pool's mean) or kcenter (first pick: farthest from the mean) in the judge's feature "
              "space, prototype (herding towards the mean of the class's real images), confident (highest judge "
              "probability of the class), difficulty (judge loss matched to the real data's, DiffGuideSamp) "
              "(default: none)",
    "keep_pool": "keep the candidate pool in this folder as an image set, for --from-pool; checked as --out is "
                 "(apart from --out and every input; an existing one only with --overwrite) (default: none, the "
                 "pool is deleted once selected from)",
    "from_pool": "select --ipc per class from every class of this kept pool (an image set from --keep-pool) "
                 "instead of sampling; sampling options (--model, --steps, --cfg-scale, ...) and --classes are "
                 "refused with it (default: none, sample)",
    "judge_data": "real train images the judge classifier is trained on (default: the embedded dataset the model "
                  "was trained on)",
    "judge_net": "judge classifier: convnetD, resnetap10 or resnet18",
    "judge_epochs": "training epochs of the judge",
    "judge_cache": "folder of trained judges, reused across commands (default: $MEMDISTILL_CACHE/judges, else "
                   "~/.cache/memdistill/judges)",
}

EVAL_HELP = {
    "net": "convnetD (any depth, e.g. convnet3, convnet6), resnetap10 or resnet18",
    "norm": "instance or batch",
    "image_size": "train/test image size (default: the set's own)",
    "epochs": "training epochs (default: the protocol's by IPC: 1 -> 3000, <=10 -> 2000, <=50 -> 1500, "
              "<=200 -> 1000, <=500 -> 500, else 300)",
    "lr": "SGD learning rate, above 0 and at most 1 (multiplied by 0.2 at 2/3 and 5/6 of training)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay, 0 to 1",
    "batch_size": "training batch size",
    "cutmix_beta": "CutMix Beta(b, b) parameter; 0 disables",
    "flip": "random horizontal flips (default: on, except for the embedded digit sets)",
    "jitter": "colour jitter (brightness, contrast, saturation 0.4)",
    "lighting": "PCA lighting noise (std 0.1)",
    "eval_every": "test every this many epochs, and after the last (default: a tenth of the epochs)",
    "repeats": "classifiers trained, each with its own seed",
    "seed": "seed of the first classifier (repeat r uses seed + r), 0 to 2147483647",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N",
    "precision": "auto, fast, fp32, tf32 or bf16 for the classifier's forward passes (training and test checks): "
                 "tf32 = TensorFloat-32 matrix products (CUDA only), bf16 = bfloat16 autocast, fast = bf16 on a CPU "
                 "with bf16 instructions (AVX512-BF16, AMX), else auto (default: auto = tf32 on CUDA, fp32 on the "
                 "CPU)",
    "compile": "torch.compile the classifier's training forward: pays off for long runs such as the protocol's "
               "epochs (with --precision bf16 on a CPU: one IPC-10 mnist5k evaluation at 2000 epochs x 3 in 9-10 "
               "minutes on one thread of the development machine); the first compilation on a machine takes tens "
               "of seconds, later ones reuse torch's cache",
    "labels": "hard (the protocol's labels) or soft (knowledge distillation from --teacher: the teacher labels "
              "every augmented, CutMix-ed batch; the student trains as RDED's: AdamW, --soft-lr, half-cosine schedule)",
    "teacher": "with --labels soft: a teacher classifier of the same classes and image size (.safetensors, or a torch "
               "state dict of a --net classifier), or full: train one on the whole real train split (30 epochs, hard "
               "labels) and save it in the output folder's teacher/ for reuse by path (default: none, needed with "
               "--labels soft)",
    "temperature": "soft-label temperature T; the loss is T^2 * KL(teacher/T || student/T) (default: 20, RDED's "
                   "with CutMix)",
    "soft_lr": "with --labels soft: the student's AdamW learning rate, above 0 and at most 1, on a half-cosine "
               "schedule (RDED's recipe; hard labels keep the protocol's SGD and --lr)",
    "soft_weight_decay": "with --labels soft: the student's AdamW (decoupled) weight decay, 0 to 1",
}



# Entries that mark a training run's folder (as train.prepare_output reads them).
TRAIN_RUN_MARKS = ("config.json", "checkpoints/last.pt", "manifest.json")


def check_out(args: argparse.Namespace, what: str, names: tuple[str, ...] | None = None,
              resumable: bool = True) -> None:
    """The output check every stage runs first, before loading data or models: --out must be a folder that
    can be written, and an earlier output in it (any of ``names`` inside it; None: anything) is refused
    unless --overwrite (or --resume, for a ``resumable`` stage). Creates nothing."""
    from .manifest import check_output_folder, refuse_existing

    check_output_folder(args.out)
    refuse_existing(args.out, what, names, overwrite=args.overwrite,
                    resume=getattr(args, "resume", False) if resumable else None)


# ----- checks of the whole command line, before any stage starts --------------------------------------------
# Seeds go through integer mixing (step and image generators) that must stay inside torch's 64-bit seed range.
SEED_MAX = 2**31 - 1

# The options of each command that name an input path. Embedded dataset names and shipped model names are not
# paths; evaluate only writes results.json into --out, so there an input may lie inside --out.
INPUT_OPTIONS = {
    "pretrain": ("data", "subset", "vae", "latent_cache"),
    "train-vae": ("data", "subset", "test"),
    "finetune": ("data", "subset", "init", "vae", "latent_cache"),
    "sample": ("model", "subset", "vae", "from_pool", "judge_data", "mode_data", "mode_cache"),
    "select": ("data", "subset"),
    "fidelity": ("model", "set", "data", "test", "subset", "vae", "mode_data", "mode_cache"),
    "evaluate": ("train", "test", "subset", "teacher"),
    "export": ("set",),
    "run": ("data", "subset", "init", "vae", "latent_cache", "test", "eval_teacher", "sample_judge_data",
            "sample_mode_data", "sample_mode_cache"),
    "bench": ("data", "subset", "init", "vae", "sample_vae", "latent_cache", "test", "eval_teacher",
              "sample_judge_data", "sample_mode_data", "sample_mode_cache"),
}
# Output folders beside --out, checked as --out is (check_command); `sample --keep-pool` writes the pool there.
OUTPUT_OPTIONS = {"sample": ("keep_pool",)}
# Outputs created by the stage, so an input path that does not exist yet still counts.
_CREATED = {"latent_cache", "mode_cache", "sample_mode_cache"}


def _input_paths(args: argparse.Namespace) -> dict[str, str]:
    """{"--option": path} of the command's input options that name a path (see INPUT_OPTIONS)."""
    from .data import BUILTIN_SUBSETS, EMBEDDED
    from .pretrained import SHIPPED, SHIPPED_VAES

    names = set(EMBEDDED) | set(SHIPPED) | set(SHIPPED_VAES) | set(BUILTIN_SUBSETS) | {"full"}  # --teacher full: trained, not read
    found = {}
    for name in INPUT_OPTIONS.get(getattr(args, "command", None), ()):
        value = getattr(args, name, None)
        if not value or str(value) in names:
            continue
        if name in _CREATED or os.path.lexists(os.path.expanduser(str(value))):
            found["--" + name.replace("_", "-")] = str(value)
    return found


def check_command(args: argparse.Namespace) -> None:
    """What every command checks before its stage starts (UserError, one line, naming the option):
    every seed in 0..SEED_MAX; sample's (and run's --sample-*) guidance options typed where they would do nothing
    (guidance.refuse_ignored_guidance); --latent-cache and --out folders (and the command's OUTPUT_OPTIONS, such as
    --keep-pool) that can be written (see manifest.check_output_folder); each output neither an input, nor
    inside one, nor (except for evaluate, which writes only results.json) holding one."""
    from .manifest import check_output_folder, refuse_out_over_inputs

    for name, value in sorted(vars(args).items()):
        if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not 0 <= value <= SEED_MAX:
            raise UserError(f"--{name.replace('_', '-')} must be an integer from 0 to {SEED_MAX}, got {value}")
    if args.command in ("sample", "run"):
        from .guidance import refuse_ignored_guidance

        prefix = "sample" if args.command == "run" else ""
        refuse_ignored_guidance(lambda name: getattr(args, f"{prefix}_{name}" if prefix else name),
                                given_fields(args, prefix), prefix + "-" if prefix else "")
    if getattr(args, "latent_cache", None):
        check_output_folder(args.latent_cache, "--latent-cache")
    outputs = ["out", *OUTPUT_OPTIONS.get(getattr(args, "command", None), ())]
    for name in outputs:
        value = getattr(args, name, None)
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        check_output_folder(value, option)  # a file, too long a name, not writable: before comparing paths
        refuse_out_over_inputs(value, _input_paths(args), contained_ok=args.command == "evaluate", option=option)
