"""The on-disk format of a distilled or selected image set, shared by sampling, baselines and evaluation.

    <out>/<class_name>/<index:05d>.png   one folder per class, grey ("L") for 1 channel, RGB for 3
    <out>/manifest.json                  stage "sample" or "select"; class_names, ipc, channels, resolution, ...
    <out>/grid.png                       a picture of the set for people: one labelled row per class (the
                                         reader ignores it: it reads only the class folders' PNGs)

A set is written into a hidden sibling folder (``.<name>.partial-<pid>``) and renamed into place only
once complete, so a folder named ``<out>`` with a manifest is always a whole set. Such a folder left by a
killed process (its pid no longer runs) is removed by the next writer of the same ``<out>``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .manifest import (check_output_folder, disk_full_is_user_error, read_manifest, remove_dead_partials,
                       write_manifest)
from .pixels import image_to_array

log = logging.getLogger(__name__)

STAGES = ("sample", "select")
_MODES = {1: "L", 3: "RGB"}
GRID = "grid.png"  # the picture of a set, inside its folder
GRID_PER_CLASS = 8  # images per class row in GRID


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, round((x + 1) * 127.5) clamped to 0..255."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(u: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]; exact inverse of to_uint8 on its outputs."""
    return u.float() / 127.5 - 1.0


def image_name(index: int) -> str:
    return f"{index:05d}.png"


MANIFEST = "manifest.json"
SET_FILES = (MANIFEST, GRID)  # a set's own files beside its class folders


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class folder of an image set (None when it can): class names become folder
    names, so nothing that escapes the set folder, hides it, takes the place of one of the set's own files
    (SET_FILES), or cannot be written into JSON (a name that is not valid UTF-8, as a folder name read from
    a disk in another encoding can be)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("."):
        return "cannot be a folder name in an image set"
    if name in SET_FILES:
        return f"is taken by a file of every image set ({', '.join(SET_FILES)}); rename the class folder"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8; rename the class folder"
    return None


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names]
    if not names:
        raise UserError("an image set needs at least one class")
    for n in names:
        problem = class_name_problem(n)
        if problem:
            raise UserError(f"class name {n!r} {problem}")
    if len(set(names)) != len(names):
        raise UserError(f"class names repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return names


def partial_path(out: Path, pid: int | None = None) -> Path:
    """The hidden sibling folder a set is written into before it is renamed to ``out``."""
    return out.parent / f".{out.name}.partial-{os.getpid() if pid is None else pid}"


def check_target(out: str | Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that cannot be written (a file, inside a file, not writable) or that exists unless
    overwriting; call before any expensive work."""
    out = check_output_folder(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass overwrite (--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    return out


class ImageSetWriter:
    """Incremental writer: ``add`` images, then ``commit`` the manifest, which renames the set into place.

    Used as a context manager, an exception before ``commit`` removes the partial folder. Several
    processes may share one partial folder (pass the same ``partial``, ``create`` only on one of them);
    exactly one of them commits.
    """

    def __init__(self, out: str | Path, class_names: Sequence[str], image_shape: Sequence[int],
                 overwrite: bool = False, partial: str | Path | None = None, create: bool = True):
        self.out = check_target(out, overwrite)
        self.overwrite = overwrite
        self.class_names = _check_class_names(class_names)
        self.image_shape = tuple(int(s) for s in image_shape)  # (C, H, W)
        if len(self.image_shape) != 3 or self.image_shape[0] not in _MODES:
            raise UserError(f"images must be (C, H, W) with 1 or 3 channels, got shape {self.image_shape}")
        self.partial = Path(partial) if partial is not None else partial_path(self.out)
        self.committed = False
        self.owner = create  # only the process that created the partial folder may remove it
        if create:
            remove_dead_partials(self.out)
            shutil.rmtree(self.partial, ignore_errors=True)  # a leftover of an earlier run with our pid
            with disk_full_is_user_error(self.partial, cleanup=self.partial):
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self.partial.mkdir()
                for name in self.class_names:
                    (self.partial / name).mkdir()

    def add(self, image: torch.Tensor, label: int, index: int) -> Path:
        """Save one (C, H, W) image in [-1, 1] as class ``label``'s image number ``index``."""
        if tuple(image.shape) != self.image_shape:
            raise ValueError(f"image shape {tuple(image.shape)} differs from the set's {self.image_shape}")
        if not 0 <= int(label) < len(self.class_names):
            raise ValueError(f"label {label} out of range 0..{len(self.class_names) - 1}")
        pixels = to_uint8(image).cpu().permute(1, 2, 0).numpy()  # (H, W, C)
        if pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        path = self.partial / self.class_names[int(label)] / image_name(int(index))
        with disk_full_is_user_error(path, cleanup=path):  # the writer's abort removes the rest
            Image.fromarray(np.ascontiguousarray(pixels)).save(path)  # (H, W) uint8 -> "L", (H, W, 3) -> "RGB"
        return path

    def counts(self) -> list[int]:
        return [sum(1 for p in (self.partial / n).glob("*.png")) for n in self.class_names]

    def commit(self, manifest: dict) -> Path:
        """Write manifest.json and move the set to ``out`` (replacing an old one only now, when overwriting).

        ``manifest`` may hold "stage" (default "sample") and "config"; every other key is stored as is,
        next to class_names, channels, resolution, counts and ipc (None when classes differ in size).
        """
        counts = self.counts()
        empty = [n for n, k in zip(self.class_names, counts) if k == 0]
        if empty:
            raise UserError(f"image set has no images for class {', '.join(empty)}")
        fields = dict(manifest)
        stage = fields.pop("stage", "sample")
        config = fields.pop("config", {})
        c, h, w = self.image_shape
        fields.update(class_names=self.class_names, channels=c, resolution=h if h == w else [h, w],
                      counts=counts, ipc=counts[0] if len(set(counts)) == 1 else None, grid=GRID)
        self._write_grid(fields.get("method") or stage)
        write_manifest(self.partial, stage, config, **fields)
        if self.out.exists():
            if not self.overwrite:
                raise UserError(f"{self.out} appeared while writing; pass overwrite to replace it")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            self.out.rename(old)
            self.partial.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.partial.rename(self.out)
        self.committed = True
        log.info("wrote %d images in %d classes to %s", sum(counts), len(counts), self.out)
        return self.out

    def _write_grid(self, label: str) -> None:
        """GRID in the partial folder: the first GRID_PER_CLASS images of every class, one labelled row each."""
        from .reports import class_grid

        rows = []
        for name in self.class_names:
            files = sorted((p for p in (self.partial / name).glob("*.png") if _png_index(p) is not None),
                           key=_png_index)[:GRID_PER_CLASS]
            rows.append([_read_png(p, self.image_shape[0]) for p in files])
        path = self.partial / GRID
        with disk_full_is_user_error(path, cleanup=path):
            class_grid(rows, self.class_names, [(label, GRID_PER_CLASS)]).save(path)

    def abort(self) -> None:
        if self.owner and not self.committed:
            shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "ImageSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_image_set(out: str | Path, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                    manifest: dict, overwrite: bool = False) -> Path:
    """Write images (N, C, H, W) in [-1, 1] with labels (N,) as a set; within a class, images are
    numbered in the order they appear. See ImageSetWriter.commit for the manifest."""
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise UserError("no images to write")
    next_index = [0] * len(class_names)
    with ImageSetWriter(out, class_names, images.shape[1:], overwrite) as writer:
        for x, y in zip(images, labels.tolist()):
            writer.add(x, y, next_index[y])
            next_index[y] += 1
        return writer.commit(manifest)


def _png_index(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _read_png(path: Path, channels: int) -> torch.Tensor:
    """One image of a set as (C, H, W) in [-1, 1]; UserError when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert(_MODES[channels]), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"unreadable image {path} ({e})") from None
    return from_uint8(torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels).copy()).permute(2, 0, 1))


def _set_shape(path: Path, manifest: dict) -> tuple[list[str], int, tuple[int, int], list[int] | None]:
    """(class_names, channels, (H, W), counts or None) of a set's manifest, each checked for its JSON shape:
    a manifest that is valid JSON of the wrong shape is refused with one line naming ``path``."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    names = manifest.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: 'class_names' must be a list of class names (strings), got {names!r:.80}")
    class_names = _check_class_names(names)
    channels = manifest.get("channels")
    if not is_int(channels) or channels not in _MODES:
        raise UserError(f"{path}: 'channels' must be 1 or 3, got {channels!r:.80}")
    res = manifest.get("resolution")
    size = [res, res] if is_int(res) else res
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)):
        raise UserError(f"{path}: 'resolution' must be a positive integer or [height, width], got {res!r:.80}")
    counts = manifest.get("counts")
    if counts is not None and not (isinstance(counts, list) and len(counts) == len(class_names)
                                   and all(is_int(k) and k >= 0 for k in counts)):
        raise UserError(f"{path}: 'counts' must list one image count per class, got {counts!r:.80}")
    for key in ("ipc",):
        if manifest.get(key) is not None and not (is_int(manifest[key]) and manifest[key] > 0):
            raise UserError(f"{path}: {key!r} must be a positive integer, got {manifest[key]!r:.80}")
    if manifest.get("method") is not None and not isinstance(manifest["method"], str):
        raise UserError(f"{path}: 'method' must be a string, got {manifest['method']!r:.80}")
    return class_names, channels, (size[0], size[1]), counts


def read_image_set(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(images (N, C, H, W) in [-1, 1], labels (N,), class_names, manifest) of a written set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image set folder not found: {folder}")
    if not (folder / "manifest.json").is_file():
        raise UserError(f"no manifest.json in {folder}: not a complete image set (write it with sample or select)")
    manifest = read_manifest(folder)
    if manifest.get("stage") not in STAGES:
        raise UserError(f"{folder} holds a {manifest.get('stage')!r} output, not an image set ({'/'.join(STAGES)})")
    class_names, channels, (h, w), counts = _set_shape(folder / "manifest.json", manifest)

    images, labels = [], []
    for label, name in enumerate(class_names):
        sub = folder / name
        if not sub.is_dir():
            raise UserError(f"image set {folder} has no folder for class {name!r}")
        files = sorted((p for p in sub.glob("*.png") if _png_index(p) is not None), key=_png_index)
        if not files:
            raise UserError(f"class folder {sub} holds no images")
        if counts is not None and counts[label] != len(files):
            raise UserError(f"class folder {sub} holds {len(files)} images, the manifest says {counts[label]}")
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()
                    arr = image_to_array(im, channels)  # (H, W, C) uint8, every PIL mode by one rule
            except (OSError, SyntaxError, ValueError, UserError) as e:
                raise UserError(f"unreadable image {path} ({e})") from None
            if arr.shape[:2] != (h, w):
                raise UserError(f"image {path} is {arr.shape[1]}x{arr.shape[0]}, the set's size is {w}x{h}")
            images.append(torch.from_numpy(arr.reshape(h, w, channels).copy()).permute(2, 0, 1))  # (C, H, W)
            labels.append(label)
    return from_uint8(torch.stack(images)), torch.tensor(labels, dtype=torch.long), class_names, manifest
