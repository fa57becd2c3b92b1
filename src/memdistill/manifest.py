"""Small JSON artefacts that tie the stages together: every stage writes a manifest the next one reads."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def refuse_changed_settings(saved: dict, now: dict, ignore: set[str] = frozenset()) -> None:
    """The rule every resumable command follows: what a folder holds was made with ``saved`` settings, so a
    --resume with other ones is refused, naming each changed (flattened) key. Keys in ``ignore`` (how a run is
    watched or scheduled, not what it computes) may change."""
    saved, now = flatten(saved), flatten(now)
    changed = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise UserError(f"--resume with changed settings ({detail}); use the original options, another --out, "
                        "or --overwrite")


def versions() -> dict[str, str]:
    import torch

    from . import __version__
    from .runtime import runtime_info

    return {"memdistill": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "runtime": runtime_info()}


def write_manifest(folder: str | Path, stage: str, config: dict, **extra: Any) -> Path:
    path = Path(folder) / "manifest.json"
    write_json_atomic(path, {"stage": stage, "config": config, "versions": versions(), **extra})
    return path


def read_manifest(folder: str | Path, stage: str | None = None) -> dict:
    """The manifest of a stage's output folder; a clear error when it is missing or of another stage."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no manifest.json in {folder}: not the output of a memdistill stage")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg})") from None
    if stage is not None and data.get("stage") != stage:
        raise UserError(f"{folder} holds a {data.get('stage')!r} output, expected {stage!r}")
    return data
