"""Where a model argument points: a shipped model's name, a run folder, an export, or a checkpoint file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .errors import UserError

# Models that ship inside the package (made with `memdistill pretrain`, see docs/pretrained.md).
# mnist5k: a DiT on the pixels of mnist5k; mnist5k-latent: a DiT on the latents of the shipped mnist5k-vae (the
# embedded default: the paper's latent pipeline).
SHIPPED = {"mnist5k": "mnist5k-dit", "mnist5k-latent": "mnist5k-ldit"}
# The embedded dataset each shipped model was trained on (the judge's and the modes' data by default).
SHIPPED_DATA = {"mnist5k": "mnist5k", "mnist5k-latent": "mnist5k"}
# Autoencoders that ship inside the package (made with `memdistill train-vae`, see docs/pretrained.md): --vae NAME.
SHIPPED_VAES = {"mnist5k-vae": "mnist5k-vae"}


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("memdistill") / "weights" / SHIPPED[name]))


def resolve_vae(spec: str | Path) -> Path:
    """The folder behind a --vae value: a shipped VAE's name (SHIPPED_VAES), else the path itself. UserError when a
    shipped VAE is missing from the installation."""
    if str(spec) not in SHIPPED_VAES:
        return Path(spec)
    path = Path(str(resources.files("memdistill") / "weights" / SHIPPED_VAES[str(spec)]))
    if not (path / "config.json").is_file():
        raise UserError(f"the shipped {spec} autoencoder is missing from the installation ({path})")
    return path


def resolve_model(spec: str) -> Path:
    """The checkpoint behind ``spec``: a shipped name, a stage's output folder (its export), or a path."""
    if spec in SHIPPED:
        path = shipped_path(spec)
        if not (path / "model.safetensors").is_file():
            raise UserError(f"the shipped {spec} model is missing from the installation ({path})")
        return path
    path = Path(spec)
    if not path.exists():
        raise UserError(f"model not found: {spec} (give a shipped name: {', '.join(SHIPPED)}, a run folder, "
                        "an export folder, an official .pt or a diffusers DiT folder)")
    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file():
        from .manifest import read_manifest

        export = read_manifest(path).get("export")  # one line for a manifest that is not a stage's
        if isinstance(export, str) and export:
            return path / export
    elif path.is_dir() and (path / "checkpoints" / "last.pt").is_file():
        # A training run killed (or still running, or stopped by divergence) before its export: say so, and how
        # to finish it.
        stage = _run_stage(path / "config.json")
        raise UserError(f"{path} is an unfinished {stage} run (a resume state but no export yet); finish it with "
                        f"`memdistill {stage} --resume --out {path}` and the options it was started with "
                        f"(saved in {path / 'config.json'})")
    elif path.is_dir() and _run_stage(path / "config.json", None):
        # The settings of a training run and nothing else: it stopped before its first checkpoint.
        stage = _run_stage(path / "config.json")
        raise UserError(f"{path} is an unfinished {stage} run that saved no resume state (stopped, killed or "
                        f"diverged before its first checkpoint) and no export; run it again with `memdistill {stage} "
                        f"--overwrite --out {path}` and the options saved in {path / 'config.json'}")
    elif path.is_file() and path.parent.name == "checkpoints" and (
            path.name == "last.pt" or _run_stage(path.parent.parent / "config.json", None)):
        run = path.parent.parent
        stage = _run_stage(run / "config.json")
        finished = (run / "manifest.json").is_file()
        advice = (f"pass the run folder {run} (its export) instead" if finished else
                  f"the run has no export yet: finish it with `memdistill {stage} --resume --out {run}`, then pass {run}")
        raise UserError(f"{path} is the resume state of the {stage} run {run} (read by --resume), not a model; {advice}")
    return path


def _run_stage(config: Path, default: str | None = "finetune") -> str | None:
    """The stage (pretrain / finetune) whose training run wrote ``config`` (a run folder's config.json);
    ``default`` when the file is missing, damaged or not a training run's (an export's config.json describes
    a model and has no stage of its own)."""
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return default
    stage = data.get("stage") if isinstance(data, dict) and not isinstance(data.get("model"), dict) else None
    return stage if stage in ("pretrain", "finetune") else default
