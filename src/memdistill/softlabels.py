"""The soft-label evaluation protocol: the classifier learns a teacher's softened predictions instead of the
hard labels (knowledge distillation, Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

As RDED (Sun et al. 2024, "On the Diversity and Realism of Distilled Dataset") and SRe2L (Yin et al. 2023,
"Squeeze, Recover and Relabel") evaluate distilled sets, the teacher labels every augmented batch the student
sees, after CutMix: the mixed image gets the teacher's own label, so no label mixing is needed.

Loss: T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch. The T^2 keeps the
gradient's scale independent of T (the gradient with respect to the student's logits is T * (p_s - p_t)).
Temperature: 20, RDED's value with CutMix (its argument.py: 20 with CutMix, 4 with MixUp; the protocol here uses
CutMix). The student trains as RDED's does (its argument.py and train loop): AdamW, lr 1e-3, weight decay 0.01, the
learning rate on a half cosine from lr to 0 over the epochs (SOFT_LR, SOFT_WEIGHT_DECAY, soft_lr_at; ``--soft-lr`` and
``--soft-weight-decay`` change them). RDED omits the T^2 factor; under Adam the loss's scale does not change the
updates, so keeping Hinton's factor changes nothing but the logged loss. The protocol's SGD with step decay
(METHOD.md section 7) stays for hard labels. Measured on the 8x8 digits, 50 real images per class, a ConvNet-3
teacher of 86% top-1, 100 epochs: the protocol's SGD reached 71.7% with soft labels, this recipe 84.1% (hard labels
with SGD: 90.4%); see docs/benchmarks.md.

A teacher is a classifier of this package's nets trained on the full real train split (``evaluate --teacher
full`` trains and saves one, see evaluate.full_teacher) or a user's checkpoint: a .safetensors file (ours carries
the net, classes and image size in its metadata) or a weights-only torch state dict.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .nets import build_net

LABEL_MODES = ("hard", "soft")
TEMPERATURE = 20.0
SOFT_LR = 1e-3  # RDED's student: AdamW at this lr, weight decay SOFT_WEIGHT_DECAY, half-cosine schedule
SOFT_WEIGHT_DECAY = 0.01
FULL = "full"  # --teacher full: train the teacher on the whole real train split
METADATA_KEY = "memdistill_teacher"  # the safetensors metadata entry that describes a saved teacher


def soft_lr_at(epoch: int, total_epochs: int, base_lr: float) -> float:
    """The student's learning rate in ``epoch`` (0-based) of ``total_epochs``: base_lr * (1 + cos(pi * epoch /
    total)) / 2, RDED's half-cosine schedule (from base_lr at the start towards 0 at the end)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over the batch (a scalar).

    Logits are (B, classes); the teacher's carry no gradient. Zero when both agree up to a constant per row."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


@dataclass
class Teacher:
    """A frozen classifier in eval mode and where it came from (``identity``: path, sha256, net, ...)."""

    model: torch.nn.Module
    identity: dict

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of augmented images x (B, C, H, W), without autograd bookkeeping."""
        with torch.no_grad():
            return self.model(x)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_teacher(model: torch.nn.Module, path: str | Path, meta: dict) -> Path:
    """Write ``model``'s weights to the .safetensors file ``path`` with ``meta`` (net, norm, num_classes,
    channels, image_size, class_names, how it was trained) in its metadata; atomic, a full disk is a UserError."""
    from .codec import _save_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save_atomic(tensors, path, {METADATA_KEY: json.dumps(meta)})
    return path


def teacher_meta(path: str | Path) -> dict:
    """The description a saved teacher carries ({} for a file without one: a bare state dict)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by load_teacher when it reads the weights
        return {}
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def load_teacher(path: str | Path, net: str, norm: str, num_classes: int, channels: int, image_size: int,
                 class_names: list[str] | None = None, option: str = "--teacher") -> Teacher:
    """Load a teacher for a student of ``num_classes`` classes on (channels, image_size, image_size) images.

    ``path``: a .safetensors file (a saved teacher's metadata names its net and norm; without it, ``net``/
    ``norm`` are assumed) or a torch file holding a state dict (read with weights_only=True). Raises UserError,
    naming ``option``, for a missing or unreadable file, or a teacher of other classes, class order, channels or
    image size."""
    from .models.io import load_safetensors, load_weights_only

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file; give a teacher checkpoint (.safetensors or a torch state "
                        f"dict) or '{FULL}' to train one on the full real train split")
    meta = teacher_meta(path)
    want = {"num_classes": num_classes, "channels": channels, "image_size": image_size}
    for key, value in want.items():
        if key in meta and meta[key] != value:
            raise UserError(f"{option} {path}: the teacher was trained with {key.replace('_', ' ')} "
                            f"{meta[key]}, the evaluation needs {value}; give a teacher trained on the same "
                            "classes and image size")
    if class_names is not None and meta.get("class_names") not in (None, list(class_names)):
        raise UserError(f"{option} {path}: the teacher's classes ({', '.join(map(str, meta['class_names'][:5]))}"
                        f"...) differ from the test set's ({', '.join(class_names[:5])}...) or their order")
    net, norm = meta.get("net", net), meta.get("norm", norm)
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = load_weights_only(path, "a classifier's state dict")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{option} {path}: holds a {type(state).__name__}, expected a classifier's state dict")
    model = build_net(net, num_classes, channels, image_size, norm)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise UserError(f"{option} {path}: not a {net} classifier of {num_classes} classes on {channels}x"
                        f"{image_size}x{image_size} images ({detail})") from None
    model.eval().requires_grad_(False)
    identity = {"path": str(path.resolve()), "sha256": sha256_of(path), "net": net, "norm": norm,
                **{k: meta[k] for k in ("data", "epochs", "top1") if k in meta}}
    return Teacher(model, identity)
