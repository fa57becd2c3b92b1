"""Codecs map pixels in [-1, 1] to the space the DiT works in, and back.

`pixel` is the identity (small embedded datasets); `vae` is a diffusers AutoencoderKL from a local
folder. `encode_dataset` encodes a dataset once into the posterior statistics that training draws its latents
from (latents.LatentPosterior) and caches them on disk.
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
from memdistill.runtime import bars_disabled
from memdistill.latents import LatentPosterior

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

    def identity(self) -> dict:
        """What the codec's output depends on, for cache keys: its config, and for a VAE its weights."""
        return self.config()


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
        from .pretrained import SHIPPED_VAES, resolve_vae

        # a shipped VAE is recorded by its name, so that exports and manifests stay valid on another installation
        self.shipped = str(path) if str(path) in SHIPPED_VAES else None
        path = resolve_vae(path).expanduser()
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
            self.image_channels = int(cfg.get("out_channels", 3))  # channels of the images it decodes to
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
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (N, latent_channels, H/f, W/f) on x's device, of the posterior of pixels x
        (N, C, H, W) in [-1, 1], unscaled, the log-variance clamped as diffusers clamps it before sampling."""
        means, logvars = [], []
        for xb in x.split(self.batch_size):
            posterior = self.vae.encode(self.pad(xb.to(self.device, torch.float32))).latent_dist
            means.append(posterior.mean.to(x.device))
            logvars.append(posterior.logvar.to(x.device))
        return torch.cat(means), torch.cat(logvars)

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
        return {"name": self.name, "path": self.shipped or str(self.path)}

    def identity(self) -> dict:
        """The config, the sha256 of the folder's config.json and of its padding record (PADDING_FILE; None
        without one), and each weights file's name, size and modification time: weights retrained or replaced in
        place give another identity without reading hundreds of MB. A shipped VAE's weights are identified by
        their sha256 instead (a few MB), which, unlike a modification time, is the same on every installation."""
        folder = self.folder / (self.subfolder or "")
        files = []
        for path in self._weight_files():
            st = path.stat()
            files.append([path.name, st.st_size, _sha256(path) if self.shipped else st.st_mtime_ns])
        padding = folder / PADDING_FILE
        return {**self.config(), "config_sha256": _sha256(folder / "config.json"),
                "padding_sha256": _sha256(padding) if padding.is_file() else None, "weights": files}

    def weights_sha256(self) -> list[list[str]]:
        """[name, sha256] of each weights file, read in full (about a second for SD-VAE's 335 MB): exports record
        it beside identity(), so that a copy of the folder (other modification times, the same bytes) is known
        for the VAE the model was trained on (sample's check)."""
        return [[path.name, _sha256(path)] for path in self._weight_files()]

    def _weight_files(self) -> list[Path]:
        folder = self.folder / (self.subfolder or "")
        return [path for path in sorted(folder.iterdir())
                if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]


# What VAECodec.identity records beside the config: compared to tell whether a recorded VAE changed since.
IDENTITY_KEYS = ("config_sha256", "padding_sha256", "weights")


def vae_changes(recorded: dict, now: dict, weights_sha256) -> list[str]:
    """The parts ("config", "padding", "weights") in which a VAE's identity ``now`` (VAECodec.identity) differs from
    the ``recorded`` one; [] when the record has no identity (older exports and states). Weights whose modification
    times differ count as unchanged when the record holds their sha256 and ``weights_sha256()`` (called only
    then) gives the same: a copied folder."""
    if not all(key in recorded for key in IDENTITY_KEYS):
        return []
    changed = [key.split("_")[0] for key in IDENTITY_KEYS if now.get(key) != recorded[key]]
    if changed == ["weights"] and recorded.get("weights_sha256") is not None \
            and recorded["weights_sha256"] == weights_sha256():
        return []
    return changed


def _sha256(path: Path) -> str:
    """Hex sha256 of the file ``path``, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_latents_fit(codec: str, latent_shape: tuple[int, ...], model_shape: tuple[int, ...], model: str,
                      hint: str) -> None:
    """Refuse (UserError, one line) latents of ``latent_shape`` (C, h, w), as the ``codec`` (its description,
    e.g. "vae") gives them, for a DiT ``model`` that works on ``model_shape``; ``hint`` says how to proceed."""
    if tuple(latent_shape) != tuple(model_shape):
        raise UserError(f"the {codec} codec gives latents of shape {tuple(latent_shape)} but the model {model} "
                        f"expects {tuple(model_shape)}; {hint}")


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


# Bumped whenever what a cache file holds changes: files of another format get another name and are re-encoded.
# 2: the posterior mean and log-variance of each image and, with flipping, of its mirror (1 held one draw).
CACHE_FORMAT = 2
CACHE_DTYPE = torch.float32


def cache_key(codec: Codec, dataset, flip: bool = False) -> str:
    """Hex key over everything that changes the cached tensors: the format and dtype, the data (its identity covers
    the files, their sizes and modification times), the classes, the resolution and channels, the codec (config
    and weights) and whether the mirror images are held. Not the seed: the statistics do not depend on it."""
    payload = {
        "format": CACHE_FORMAT,
        "dtype": str(CACHE_DTYPE),
        "identity": dataset.identity,
        "class_names": list(dataset.class_names),
        "resolution": dataset.resolution,
        "channels": dataset.channels,
        "codec": codec.identity(),
        "flip": bool(flip),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(codec: Codec, dataset, cache_dir: str | Path, flip: bool = False) -> Path:
    """Where the posterior statistics of ``dataset`` under ``codec`` (with mirror images when ``flip``) are cached
    in ``cache_dir``. Files of the first format (latents-*.safetensors, one draw each) are never read."""
    return Path(cache_dir) / f"posterior-{cache_key(codec, dataset, flip)}.safetensors"


def read_latent_cache(path: Path, count: int, views: int, latent_shape: tuple[int, ...]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(mean, logvar, targets) from the cache file ``path`` when it exists, is of this CACHE_FORMAT and holds
    ``count`` images of ``views`` views each with latents of ``latent_shape``: mean and logvar (count, views,
    *latent_shape) float32, targets (count,) int64; else None: a damaged or mismatched cache is rebuilt, never
    trusted. Reads no image and loads no VAE."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    expect = (count, views, *latent_shape)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cached = load_file(path)
        if meta.get("format") != str(CACHE_FORMAT) or not {"mean", "logvar", "targets"} <= cached.keys():
            log.warning("latent cache %s is of another format; re-encoding", path)
        elif (tuple(cached["mean"].shape) == expect == tuple(cached["logvar"].shape)
              and cached["mean"].dtype == CACHE_DTYPE == cached["logvar"].dtype
              and tuple(cached["targets"].shape) == (count,)):
            log.info("latent cache hit: %s", path)
            return cached["mean"], cached["logvar"], cached["targets"].long()
        else:
            log.warning("latent cache %s does not match the dataset; re-encoding", path)
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


def _views(x: torch.Tensor, flip: bool) -> torch.Tensor:
    """(N, V, ...) of images (N, C, H, W): the images, and with ``flip`` their mirror images (V = 2)."""
    return torch.stack([x, x.flip(-1)], dim=1) if flip else x.unsqueeze(1)


def encode_dataset(
    codec: Codec,
    dataset,
    cache_dir: Path | None,
    batch_size: int = 64,
    flip: bool = False,
) -> tuple[LatentPosterior, torch.Tensor]:
    """The posterior statistics of a whole dataset and its targets (N,), cached under ``cache_dir`` (VAE only).

    With ``flip`` the statistics of each image's mirror image are held too (LatentPosterior.mean is (N, 2, ...)).
    Encoding is deterministic: training draws the flips and the posterior samples per step. The pixel codec has no
    posterior: its mean is the image itself (no copy without flipping) and it needs no cache.
    """
    from memdistill.data import load_tensors

    if isinstance(codec, PixelCodec):
        images, targets = load_tensors(dataset, batch_size=max(batch_size, 256))
        return LatentPosterior(_views(images, flip)), targets

    scale = {"scale": codec.scaling_factor, "shift": codec.shift_factor}
    views = 2 if flip else 1
    latent_shape = codec.latent_shape((dataset.channels, dataset.resolution, dataset.resolution))
    path = cache_path(codec, dataset, cache_dir, flip) if cache_dir is not None else None
    if path is not None:
        cached = read_latent_cache(path, len(dataset), views, latent_shape)
        if cached is not None:
            mean, logvar, targets = cached
            return LatentPosterior(mean, logvar, **scale), targets
    if hasattr(dataset, "verify"):
        dataset.verify()  # a folder opened from headers only (for a cache hit) is decoded now

    # Decoding thousands of JPEGs is the slow part of a one-time encode on a GPU: worker processes decode
    # while the VAE runs; pinned memory speeds the copies to the GPU.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=loader_workers(dataset),
                                         pin_memory=getattr(codec, "device", torch.device("cpu")).type == "cuda")
    means, logvars, ys = [], [], []
    for x, y in tqdm(loader, desc=f"encoding ({codec.name})", unit="batch", disable=bars_disabled()):
        m, lv = codec.posterior(_views(x, flip).flatten(0, 1))  # (b * V, *latent_shape) each
        means.append(m.cpu().to(CACHE_DTYPE).unflatten(0, (-1, views)))
        logvars.append(lv.cpu().to(CACHE_DTYPE).unflatten(0, (-1, views)))
        ys.append(y.long())
    mean, logvar, targets = torch.cat(means), torch.cat(logvars), torch.cat(ys)  # (N, V, *latent_shape) x2, (N,)

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": str(CACHE_FORMAT), "identity": dataset.identity, "flip": str(bool(flip)),
                "codec": json.dumps(codec.config(), sort_keys=True)}
        _save_atomic({"mean": mean, "logvar": logvar, "targets": targets}, path, meta)
        log.info("latent cache written: %s", path)
    return LatentPosterior(mean, logvar, **scale), targets
