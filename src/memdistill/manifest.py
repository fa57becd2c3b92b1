"""Small JSON artefacts that tie the stages together: every stage writes a manifest the next one reads."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .checks import flag
from .errors import UserError

log = logging.getLogger(__name__)


# OSError numbers that mean "no room left": a full disk, or the user's quota used up.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


# Free bytes below which a write that failed without an errno is put down to a full disk.
NEARLY_FULL = 16 * 2**20


def is_disk_full_error(err: BaseException, path: str | Path) -> bool:
    """Whether ``err``, raised while writing ``path``, means that the disk (or quota) is full: an OSError with
    ENOSPC/EDQUOT, or an error without an errno (torch.save's zip writer raises RuntimeError "[enforce fail at
    inline_container.cc] ... file write failed", safetensors its own error) while the disk holding ``path`` has
    less than NEARLY_FULL bytes free. Bad input (UserError) and interruptions are never a full disk."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in DISK_FULL
    if not isinstance(err, Exception) or isinstance(err, UserError):
        return False
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free < NEARLY_FULL
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_user_error(path: str | Path, cleanup: str | Path | None = None):
    """Turn a full disk (or quota) while writing ``path`` into a UserError that says so and names the path.
    ``cleanup`` (a file or folder, e.g. the tmp file being written) is removed on any error, so a failed
    write leaves nothing partial behind. "Full" is is_disk_full_error's rule, so writers that raise no OSError
    (torch.save, safetensors) are covered too. Other errors propagate unchanged (after the cleanup)."""
    try:
        yield
    except BaseException as err:
        # Asked before the cleanup, which frees the space the failed write took.
        full = is_disk_full_error(err, path)
        if cleanup is not None:
            cleanup = Path(cleanup)
            if cleanup.is_dir() and not cleanup.is_symlink():
                import shutil

                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    cleanup.unlink()
        if full:
            raise UserError(f"the disk is full (or the quota used up) while writing {path}: free some space "
                            f"and run the command again") from None
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON so that a reader never sees a half-written file (tmp file + rename).

    Raises UserError when the disk is full (naming ``path``; no tmp file is left behind on any error), and,
    writing nothing, when ``data`` holds NaN or infinity: JSON has no such values, and a
    result computed from them is garbage that must not look like a result."""
    path = Path(path)
    try:  # checked before any file is touched
        text = json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False)
    except ValueError:
        raise UserError(f"refusing to write {path}: it would hold a non-finite number (NaN or infinity) "
                        f"at {_first_non_finite(data)}; the computation that produced it diverged") from None
    with disk_full_is_user_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with disk_full_is_user_error(path, cleanup=tmp), os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_non_finite(data: Any, where: str = "top level") -> str:
    """Where in nested dicts/lists the first NaN/infinity lies, e.g. "results[0].best_mean"."""
    if isinstance(data, float) and not math.isfinite(data):
        return where
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else
                                  (key if where == "top level" else f"{where}.{key}"))
        if found:
            return found
    return ""


def read_json_object(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
                     what: str = "") -> dict:
    """The JSON object (dict) stored in ``path``, with each key of ``required`` present and of the given
    type(s). Raises UserError naming the file when it cannot be read, is not valid JSON, is valid JSON of
    another shape (a list, a string, ...), or lacks a key / has one of the wrong type. ``what`` ends the
    message with advice (e.g. "delete it to redo that stage")."""
    path = Path(path)
    advice = f"; {what}" if what else ""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg}){advice}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({getattr(err, 'strerror', None) or err}){advice}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected an object{advice}")
    for key, kind in (required or {}).items():
        if key not in data:
            raise UserError(f"{path} lacks the key {key!r}{advice}")
        value = data[key]
        # bool is an int to Python, never a number or a count in these files
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
            names = "/".join(t.__name__ for t in _types(kind))
            raise UserError(f"{path}: {key!r} must be {names}, got {type(value).__name__}{advice}")
    return data


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


NUMBER = (int, float)


NAME_MAX = 255  # bytes of one file name (Linux, macOS and Windows file systems alike)
PATH_MAX = 4096  # bytes of a whole path (Linux)
# The longest sibling an output is written through is ".<name>.partial-<pid>" (pid up to 7 digits), and a stage
# writes files a few levels deep inside it (class folders, checkpoints, .tmp files).
_SIBLING_EXTRA = len("..partial-") + 10
_INSIDE_EXTRA = 512


def _check_name_lengths(path: Path, option: str) -> None:
    """UserError when a part of ``path`` or the whole of it is too long to be written (errno 36 later on)."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{option}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long, more than "
                            f"the {NAME_MAX} a file name can have; choose a shorter {option}")
    if len(os.fsencode(path.name)) > NAME_MAX - _SIBLING_EXTRA:
        raise UserError(f"{option}: the name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long; at "
                        f"most {NAME_MAX - _SIBLING_EXTRA} bytes leave room for the hidden folder it is written "
                        f"through; choose a shorter {option}")
    full = len(os.fsencode(os.path.abspath(os.path.expanduser(str(path)))))
    if full > PATH_MAX - _INSIDE_EXTRA:
        raise UserError(f"{option}: the path is {full} bytes long; at most {PATH_MAX - _INSIDE_EXTRA} bytes leave "
                        f"room for the files written inside it; choose a shorter {option}")


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written: ``path`` is a file, lies inside a
    file, or its nearest existing folder is not writable (permissions, read-only or full disk). Creates
    nothing. Which existing contents a stage may replace is the stage's rule (see refuse_existing).

    Also refused: a name longer than the file system allows, leaving room for the hidden siblings an output is
    written through (``.<name>.partial-<pid>``), or a path too long to hold a stage's files.

    Raises UserError naming ``option`` and the path."""
    path = Path(path)
    _check_name_lengths(path, option)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; choose another {option}")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise UserError(f"{option} {path}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path} lies inside the file {existing}, not a folder; choose another {option}")
    try:
        # An unnamed temporary file (O_TMPFILE where the OS has it) proves writing works and leaves nothing.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        if err.errno in DISK_FULL:
            raise UserError(f"{option} {path}: the disk holding {existing} is full") from None
        raise UserError(f"{option} {path}: cannot write in {existing} ({err.strerror}); choose another "
                        f"{option}") from None
    return path


def folder_relation(a: str | Path, b: str | Path) -> str | None:
    """How folder ``a`` overlaps folder ``b``: "is" (one folder), "inside" (a lies inside b), "holds" (b lies
    inside a) or None. Paths are compared resolved (relative forms, "~", symlinks), so two spellings of one
    folder are one folder."""
    a = Path(os.path.expanduser(str(a))).resolve()
    b = Path(os.path.expanduser(str(b))).resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "inside"
    return "holds" if a in b.parents else None


def refuse_out_over_inputs(out: str | Path, inputs: dict[str, str | Path], contained_ok: bool = False,
                           option: str = "--out") -> None:
    """Refuse, before any work, an output folder that overlaps an input: ``out`` equal to an input, lying
    inside one (the stage would write into the input), or, unless ``contained_ok``, holding one (replacing or
    writing ``out`` would destroy or pollute the input). ``inputs`` maps an option ("--data") to its path;
    ``option`` names the output ("--out", "--keep-pool"); paths are compared as folder_relation does.

    Raises UserError naming both options and what to choose instead."""
    for name, value in inputs.items():
        relation = folder_relation(out, value)
        if relation is None or (relation == "holds" and contained_ok):
            continue
        why = {"is": f"is the {name} input", "inside": f"lies inside the {name} input {value}",
               "holds": f"holds the {name} input {value}"}[relation]
        raise UserError(f"{option} {out} {why}: writing there would replace or change that input; choose another "
                        f"{option}, outside every input")


def refuse_existing(path: str | Path, what: str, names: tuple[str, ...] | None = None, overwrite: bool = False,
                    resume: bool | None = None) -> None:
    """The one rule of every stage for an output that exists: refuse it unless --overwrite (or --resume,
    for a stage that can continue, i.e. ``resume`` is not None). ``names`` are the entries inside ``path``
    that mark an earlier output (None: any entry does). ``what`` names it in the message ("a run")."""
    path = Path(path)
    if overwrite or resume or not path.is_dir():
        return
    held = [n for n in names if (path / n).exists()] if names is not None else list(path.iterdir())
    if held:
        options = "--resume to continue it or --overwrite to replace it" if resume is not None else \
            "--overwrite to replace it"
        raise UserError(f"{path} already holds {what}; pass {options}")


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
        # a setting the user did not type may differ because its default changed between versions: say how to
        # give the saved value back explicitly
        saved_values = " ".join(f"{_option_of(k)} {saved[k]}" for k in changed
                                if isinstance(saved.get(k), (str, int, float)) and not isinstance(saved.get(k), bool))
        hint = f" (a default may have changed since that run: {saved_values} gives the saved values)" if saved_values \
            else ""
        raise UserError(f"--resume with changed settings ({detail}); use the original options{hint}, another --out, "
                        "or --overwrite")


def _option_of(key: str) -> str:
    """The command-line option of a flattened settings key, as run and bench spell them: eval.lr -> --eval-lr,
    sample.steps -> --sample-steps, finetune.steps -> --steps, steps -> --steps."""
    section, _, name = key.rpartition(".")
    return flag(name, f"{section}-" if section in ("eval", "sample") else "")


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
    """The manifest of a stage's output folder; a clear error (UserError) when it is missing, not a JSON object
    with a "stage" string (and, when present, a "config" object), or of another stage."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no manifest.json in {folder}: not the output of a memdistill stage")
    data = read_json_object(path, {"stage": str})
    if not isinstance(data.get("config", {}), dict):
        raise UserError(f"{path}: 'config' must be an object, got {type(data['config']).__name__}")
    if stage is not None and data.get("stage") != stage:
        raise UserError(f"{folder} holds a {data.get('stage')!r} output, expected {stage!r}")
    return data


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything). A process of another
    user (EPERM) counts as alive: only a folder whose writer is certainly gone may be removed."""
    if pid <= 0:
        return True  # not a real writer's pid: never treat as dead
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno != errno.ESRCH
    return True


def remove_dead_partials(out: str | Path) -> list[Path]:
    """Remove the hidden ``.<name>.partial-<pid>``, ``.<name>.old-<pid>`` and ``.<name>.tmp-<pid>`` folders beside
    ``out`` (what image sets and exports are written through) whose process is gone, e.g. after a kill -9; a live
    process's folder is kept. Returns the folders removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{out.name}.") + r"(partial|old|tmp)-(\d+)")
    removed = []
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not pid_alive(int(m.group(2))):
            log.info("removing %s, left by process %s that no longer runs", p, m.group(2))
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
