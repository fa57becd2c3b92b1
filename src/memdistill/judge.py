"""The judge: a small classifier trained once on the real train split of a dataset, cached on disk.

It serves two purposes that need the same thing, a model of the real data: the feature space of the bench's
diversity and coverage metrics, and the scores of ``memdistill sample --select`` (class probabilities,
per-image loss, penultimate features of candidate images).

Training is deterministic given the settings (``metrics.train_feature_extractor`` with a generator seeded by
``seed``), so a judge is stored once under a key that hashes everything that changes it (JudgeSpec) and
reused by every later command; a stored file whose recorded settings differ from the ones asked for (another
dataset, resolution, net, epochs, seed or an older format) is never returned: the judge is trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)

# Bump when training or storage changes, so judges stored by an older version are trained again.
JUDGE_FORMAT = 1
CACHE_ENV = "MEMDISTILL_CACHE"  # replaces ~/.cache/memdistill; judges live in its judges/ folder


def default_cache() -> Path:
    """The judges folder: $MEMDISTILL_CACHE/judges when that variable is set, else ~/.cache/memdistill/judges."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "memdistill") / "judges"


@dataclass(frozen=True)
class JudgeSpec:
    """Everything a judge's weights depend on; its hash names the cache file."""

    data: str  # the train split's identity (data.ImageDataset.identity)
    class_names: tuple[str, ...]
    channels: int
    resolution: int  # side in pixels of the square images it is trained on
    net: str  # nets.build_net name, e.g. convnet3
    epochs: int
    seed: int
    format: int = JUDGE_FORMAT

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists: comparable with a stored copy

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:20]


class Judge:
    """A trained classifier of the real data, evaluated in batches without gradients.

    Every method takes images (N, C, H, W) in [-1, 1] with the judge's channels; images of another size are
    resized (shorter side) and centre-cropped to the judge's resolution first.
    """

    def __init__(self, model: torch.nn.Module, spec: JudgeSpec, path: Path | None,
                 device: str | torch.device = "cpu", batch_size: int = 256):
        self.model, self.spec, self.path = model.to(device).eval(), spec, path
        self.device, self.batch_size = torch.device(device), batch_size

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        """Images at the judge's resolution: (N, C, side, side)."""
        from .augment import resize_center_crop

        side = self.spec.resolution
        if images.shape[1] != self.spec.channels:
            raise UserError(f"the judge was trained on {self.spec.channels}-channel images, got "
                            f"{images.shape[1]} channels")
        return images if tuple(images.shape[-2:]) == (side, side) else resize_center_crop(images, side)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K) on the CPU."""
        images = self.fit(images)
        parts = [self.model(images[s:s + self.batch_size].to(self.device)).float().cpu()
                 for s in range(0, len(images), self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, len(self.spec.class_names))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (N, K); column k is class_names[k]."""
        return self.logits(images).softmax(dim=1)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-image cross-entropy (N,) in nats of labels (N,) (indices into class_names): a difficulty score."""
        return F.cross_entropy(self.logits(images), labels.long(), reduction="none")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, D) on the CPU (the input of the classifier's last linear layer)."""
        from .metrics import penultimate_features

        return penultimate_features(self.model, self.fit(images), self.batch_size, self.device)

    def identity(self) -> dict:
        """What a manifest records of the judge: its settings, cache key and file."""
        return {**self.spec.as_dict(), "key": self.spec.key(), "file": str(self.path) if self.path else None}


def _read_cached(path: Path, spec: JudgeSpec, model: torch.nn.Module) -> bool:
    """Load ``path`` into ``model`` when it is a judge stored with exactly ``spec``; False otherwise (absent,
    damaged, of another spec or shape): the caller trains it again."""
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if json.loads(saved["spec"]) != spec.as_dict():
            log.warning("judge cache %s holds other settings; training the judge again", path)
            return False
        model.load_state_dict(saved["state_dict"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss, never a result
        log.warning("judge cache %s is unreadable (%s); training the judge again", path, e)
        return False
    return True


def load_judge(dataset, net: str = "convnet3", epochs: int = 5, seed: int = 0, cache: str | Path | None = None,
               device: str | torch.device = "cpu", option: str = "--judge-cache") -> Judge:
    """The judge of ``dataset`` (a data.ImageDataset, the real train split): read from the cache folder
    (``cache``, else default_cache()) when stored with these exact settings, else trained with
    metrics.train_feature_extractor and stored there. Raises UserError when the folder cannot be written
    (naming ``option``) or the net does not fit the images."""
    from .data import load_tensors
    from .manifest import check_output_folder
    from .metrics import train_feature_extractor
    from .nets import build_net
    from .train import save_atomic

    spec = JudgeSpec(data=dataset.identity, class_names=tuple(dataset.class_names), channels=dataset.channels,
                     resolution=dataset.resolution, net=net, epochs=epochs, seed=seed)
    folder = check_output_folder(cache if cache is not None else default_cache(), option)
    path = folder / f"{spec.key()}.pt"
    model = build_net(net, len(spec.class_names), spec.channels, spec.resolution)
    if _read_cached(path, spec, model):
        log.info("judge: cached in %s", path)
        return Judge(model, spec, path, device)
    images, labels = load_tensors(dataset)
    log.info("judge: training %s for %d epochs on %d real images of %s", net, epochs, len(labels), dataset.identity)
    model = train_feature_extractor(images, labels, len(spec.class_names), net, epochs, device=device,
                                    generator=torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic({"spec": json.dumps(spec.as_dict()),
                 "state_dict": {n: t.detach().cpu() for n, t in model.state_dict().items()}}, path)
    return Judge(model, spec, path, device)
