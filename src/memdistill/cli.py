"""The `memdistill` command line: one console script, a subcommand per stage."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from typing import Any, Callable

from .errors import UserError

log = logging.getLogger("memdistill")


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


def add_config_args(parser: argparse.ArgumentParser, defaults: Any, skip: set[str] = frozenset(),
                    help: dict[str, str] | None = None) -> None:
    """One ``--option`` per field of the dataclass ``defaults``, with its value as the default."""
    help = help or {}
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        base, optional = _field_type(f.type)
        text = help.get(f.name, "")
        if base is bool:
            parser.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=text)
        else:
            parser.add_argument(flag, dest=f.name, default=default, type=_optional(base) if optional else base,
                                metavar=base.__name__.upper(), help=f"{text} (default: {default})".strip())


def config_from_args(cls: type, args: argparse.Namespace, base: Any) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return dataclasses.replace(base, **values)


def _add_run_folder_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")


TRAIN_HELP = {
    "data": "embedded dataset (mnist5k, digits) or a class-per-folder image tree",
    "subset": "built-in class list (imagewoof, imagenette, imageidc, idc100) or a text file of folder names",
    "codec": "pixel or vae",
    "vae": "local folder of a diffusers AutoencoderKL (for --codec vae)",
    "latent_cache": "folder where encoded latents are cached and reused",
    "model": "DiT size to build from scratch, e.g. DiT-XL/2 or DiT-Tiny/4",
    "init": "checkpoint to start from: an export folder, a run folder, an official .pt or a diffusers DiT folder",
    "train": "parameters to tune: difffit (biases, label table, DiffFit scales) or all",
    "memory": "memory strategy: adaptive (the paper), fifo (Minimax) or none",
    "lambda_real": "weight of the representativeness loss",
    "lambda_gen": "weight of the diversity loss",
    "mem_real": "capacity N_R of each class's real memory",
    "mem_gen": "capacity N_G of each class's generated memory",
    "repeat_loss_defect": "reproduce the reference code's re-added class loss (ablation only)",
    "steps": "optimisation steps (overrides --epochs)",
    "epochs": "passes over the training images",
    "device": "auto, cpu or cuda",
}


# ----- subcommands ---------------------------------------------------------------------------------------
def _cmd_pretrain(args: argparse.Namespace) -> None:
    from .pretrain import pretrain, pretrain_defaults
    from .train import TrainConfig

    cfg = config_from_args(TrainConfig, args, pretrain_defaults())
    export = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"pretrained model exported to {export}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune, finetune_defaults
    from .train import TrainConfig

    cfg = config_from_args(TrainConfig, args, finetune_defaults())
    export = finetune(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"fine-tuned model exported to {export}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .pretrain import pretrain_defaults

    parser = argparse.ArgumentParser(prog="memdistill", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"memdistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a class-conditional DiT from scratch")
    add_config_args(p, pretrain_defaults(), skip={"init", "train", "memory", "lambda_real", "lambda_gen", "mem_real",
                                                  "mem_gen", "repeat_loss_defect", "stage"}, help=TRAIN_HELP)
    _add_run_folder_args(p, "runs/pretrain")
    p.set_defaults(func=_cmd_pretrain)

    from .finetune import finetune_defaults

    p = sub.add_parser("finetune", help="fine-tune a DiT with memory losses (the method)",
                       description="Fine-tune a pretrained DiT with the representativeness and diversity losses "
                                   "against per-class memories. Defaults: the shipped mnist5k DiT on mnist5k.")
    add_config_args(p, finetune_defaults(), skip={"model", "stage"}, help=TRAIN_HELP)
    _add_run_folder_args(p, "runs/finetune")
    p.set_defaults(func=_cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_flush_denormal(True)  # denormals make CPU steps erratically slow
    try:
        args.func(args)
    except UserError as err:
        print(f"memdistill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
