"""Codecs map pixels in [-1, 1] to the space the DiT works in, and back.

`pixel` is the identity (small embedded datasets); `vae` is a diffusers AutoencoderKL from a local
folder. `encode_dataset` encodes a dataset once and caches the latents on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memdistill.errors import UserError

log = logging.getLogger(__name__)

CODECS = ("pixel", "vae")
# Written by `memdistill train-vae` beside an AutoencoderKL's config.json when the VAE works on padded images:
# {"image_size": S, "pad_to": P}. Kept out of config.json so diffusers reads that file as it reads any other.
PADDING_FILE = "memdistill_padding.json"
# Padding value in [-1, 1]: black, the background of the grey digit sets the padding exists for.
PAD_VALUE = -1.0


def pad_split(size: int, pad_to: int) -> tuple[int, int]:
    """(before, after): the pixels added on each side to centre ``size`` inside ``pad_to`` (after gets the odd one)."""
    before = (pad_to - size) // 2
    return before, pad_to - size - before


class Codec:
    """Interface: encode (N, C, H, W) pixels in [-1, 1] to latents; decode back to [-1, 1]."""

    name: str = ""

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable; `make_codec(**config)` rebuilds the codec."""
        raise NotImplementedError


class PixelCodec(Codec):
    """The identity: the DiT works on pixels directly."""

    name = "pixel"

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # Samples from a diffusion model may overshoot the data range.
        return z.clamp(-1.0, 1.0)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        return tuple(image_shape)

    def config(self) -> dict:
        return {"name": self.name}


def _vae_folder(path: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) holding an AutoencoderKL config: the folder itself or a pipeline's vae/."""
    for sub in (None, "vae"):
        cfg = path / sub / "config.json" if sub else path / "config.json"
        if cfg.is_file():
            try:
                cls = json.loads(cfg.read_text(encoding="utf-8")).get("_class_name")
            except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or JSON but not an object
                cls = None
            if cls == "AutoencoderKL":
                return path, sub
    raise UserError(f"{path} is not a diffusers AutoencoderKL folder (need config.json with _class_name AutoencoderKL)")


class VAECodec(Codec):
    """A diffusers AutoencoderKL; latents are one posterior sample times the VAE's scaling factor.

    Only the folder's config.json is read at construction; the weights load on the first encode or decode
    (or ``load()``), so a run that finds its latents cached, or a torchrun rank that receives them from
    rank 0, never loads the VAE.
    """

    name = "vae"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UserError(f"VAE folder not found: {path}")
        if batch_size < 1:
            raise UserError(f"the VAE batch size must be >= 1, got {batch_size}")
        self.folder, self.subfolder = _vae_folder(path)
        self.path = path.resolve()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._vae = None
        config_file = self.folder / (self.subfolder or "") / "config.json"
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
        try:
            # diffusers' AutoencoderKL defaults, for configs that omit a key.
            self.scaling_factor = float(cfg.get("scaling_factor", 0.18215))
            # Newer VAEs (SD3, Flux) also shift latents; SD VAEs have none.
            shift = cfg.get("shift_factor")
            self.shift_factor = float(shift) if shift is not None else 0.0
            self.latent_channels = int(cfg.get("latent_channels", 4))
            self.downsample = 2 ** (len(cfg.get("block_out_channels", (64,))) - 1)
        except (TypeError, ValueError) as e:
            raise UserError(f"{config_file}: invalid AutoencoderKL config ({e})") from None
        self.image_size, self.pad_to = _read_padding(config_file.parent / PADDING_FILE)

    def load(self) -> "VAECodec":
        """Load the weights now (a clear error for a damaged folder before any other work)."""
        _ = self.vae
        return self

    @property
    def vae(self):
        if self._vae is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from diffusers import AutoencoderKL
            from diffusers.utils import is_accelerate_available

            try:
                # Passing low_cpu_mem_usage explicitly keeps diffusers from printing its "accelerate not
                # found" advice on every load; with accelerate installed, the faster path is taken.
                vae = AutoencoderKL.from_pretrained(self.folder, subfolder=self.subfolder, local_files_only=True,
                                                    low_cpu_mem_usage=is_accelerate_available())
            except (OSError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot load the AutoencoderKL in {self.path}: {str(e).splitlines()[0]}") from e
            log.info("loaded the AutoencoderKL of %s on %s", self.path, self.device)
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def _padding(self, side: int) -> tuple[int, int]:
        """(before, after) pixels of padding for images of ``side`` px: none unless the VAE was trained on
        ``image_size`` px images padded to ``pad_to`` (see PADDING_FILE)."""
        if self.image_size is None or side != self.image_size:
            return 0, 0
        return pad_split(self.image_size, self.pad_to)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, S, S) as the VAE sees them: centred in ``pad_to`` px with black around them when S is
        the VAE's padded ``image_size``; unchanged otherwise."""
        a, b = self._padding(x.shape[-1])
        return F.pad(x, (a, b, a, b), value=PAD_VALUE) if a or b else x

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded images (N, C, P, P) cropped back to ``image_size`` when P is the VAE's ``pad_to``; the
        inverse of ``pad``."""
        if self.image_size is None or x.shape[-1] != self.pad_to:
            return x
        a, _ = pad_split(self.image_size, self.pad_to)
        s = self.image_size
        return x[..., a:a + s, a:a + s]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = []
        for xb in x.split(self.batch_size):
            posterior = self.vae.encode(self.pad(xb.to(self.device, torch.float32))).latent_dist
            z = posterior.sample(generator=generator)  # (b, latent_channels, H/f, W/f)
            out.append(((z - self.shift_factor) * self.scaling_factor).to(x.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        for zb in z.split(self.batch_size):
            zb = zb.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
            out.append(self.crop(self.vae.decode(zb).sample.clamp(-1.0, 1.0)).to(z.device))
        return torch.cat(out)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, ...]:
        _, h, w = image_shape
        if self.image_size is not None and h == w == self.image_size:
            h = w = self.pad_to
        f = self.downsample
        if h % f or w % f:
            raise UserError(f"image size {h}x{w} is not a multiple of the VAE's down-sampling factor {f}")
        return (self.latent_channels, h // f, w // f)

    def config(self) -> dict:
        return {"name": self.name, "path": str(self.path)}


def _read_padding(path: Path) -> tuple[int | None, int | None]:
    """(image_size, pad_to) from a VAE folder's PADDING_FILE; (None, None) when it has none."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        size, pad_to = data["image_size"], data["pad_to"]
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (size, pad_to)) and 1 <= size <= pad_to
    except (OSError, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise UserError(f"{path}: invalid padding record (need integers image_size <= pad_to)")
    return size, pad_to


def make_codec(name: str, path: str | Path | None = None, device: str | torch.device = "cpu",
               batch_size: int = 32) -> Codec:
    """'pixel', or 'vae' with the path of a local AutoencoderKL folder (``batch_size`` images per VAE call)."""
    if name == "pixel":
        return PixelCodec()
    if name == "vae":
        if path is None:
            raise UserError("the vae codec needs the path of a local AutoencoderKL folder")
        return VAECodec(path, device=device, batch_size=batch_size)
    raise UserError(f"unknown codec '{name}': use one of {', '.join(CODECS)}")


# ----------------------------------------------------------------------------- latent cache


def loader_workers(dataset, limit: int = 8) -> int:
    """DataLoader worker processes for reading ``dataset`` once: none for in-memory tensors, else one per
    available core (at most ``limit``), leaving one core to the main process."""
    from memdistill.data import TensorImageDataset

    if isinstance(dataset, TensorImageDataset):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(limit, cores - 1))


def cache_key(codec: Codec, dataset, seed: int = 0) -> str:
    """Hex key over everything that changes the latents: the data (its identity covers the files, their sizes
    and modification times), the classes, the resolution, the codec and the seed of the posterior draws."""
    payload = {
        "identity": dataset.identity,
        "class_names": list(dataset.class_names),
        "resolution": dataset.resolution,
        "codec": codec.config(),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(codec: Codec, dataset, cache_dir: str | Path, seed: int = 0) -> Path:
    """Where the latents of ``dataset`` under ``codec`` drawn with ``seed`` are cached in ``cache_dir``."""
    return Path(cache_dir) / f"latents-{cache_key(codec, dataset, seed)}.safetensors"


def read_latent_cache(path: Path, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(latents, targets) from the cache file ``path`` when it exists and holds ``count`` images, else None:
    a damaged or mismatched cache is rebuilt, never trusted. Reads no image and loads no VAE."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        cached = load_file(path)
        if cached["latents"].shape[0] == count == cached["targets"].shape[0]:
            log.info("latent cache hit: %s", path)
            return cached["latents"], cached["targets"].long()
        log.warning("latent cache %s does not match the dataset size; re-encoding", path)
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("latent cache %s is unreadable (%s); re-encoding", path, e)
    return None


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written through a tmp file and a rename: a crash mid-write never leaves a file that a
    later run takes for a complete cache; a full disk is one line naming ``path``, with no tmp file left."""
    from safetensors.torch import save_file

    from memdistill.manifest import disk_full_is_user_error

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    with disk_full_is_user_error(path, cleanup=tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)


def encode_dataset(
    codec: Codec,
    dataset,
    cache_dir: Path | None,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (N, *latent_shape) and targets (N,) of a whole dataset, cached under cache_dir.

    The posterior samples come from one generator seeded with `seed`, so a dataset always gets
    the same latents whether or not the cache exists.
    """
    from memdistill.data import load_tensors

    if isinstance(codec, PixelCodec):
        return load_tensors(dataset, batch_size=max(batch_size, 256))

    path = cache_path(codec, dataset, cache_dir, seed) if cache_dir is not None else None
    if path is not None:
        cached = read_latent_cache(path, len(dataset))
        if cached is not None:
            return cached
    if hasattr(dataset, "verify"):
        dataset.verify()  # a folder opened from headers only (for a cache hit) is decoded now

    generator = torch.Generator().manual_seed(seed)
    # Decoding thousands of JPEGs is the slow part of a one-time encode on a GPU: worker processes decode
    # while the VAE runs; pinned memory speeds the copies to the GPU.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=loader_workers(dataset),
                                         pin_memory=getattr(codec, "device", torch.device("cpu")).type == "cuda")
    zs, ys = [], []
    for x, y in tqdm(loader, desc=f"encoding ({codec.name})", unit="batch", disable=None):
        zs.append(codec.encode(x, generator=generator).cpu())
        ys.append(y.long())
    latents, targets = torch.cat(zs), torch.cat(ys)  # (N, *latent_shape), (N,)

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"identity": dataset.identity, "codec": json.dumps(codec.config(), sort_keys=True)}
        _save_atomic({"latents": latents, "targets": targets}, path, meta)
        log.info("latent cache written: %s", path)
    return latents, targets
