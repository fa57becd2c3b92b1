"""Evaluation protocol (METHOD.md section 7): train a fresh classifier on a (distilled) train set with hard
labels, test top-1 on real images; mean +- std over repeats with different seeds. ``labels="soft"`` trains on a
teacher's soft labels instead (softlabels module: loss, temperature, sources), for any train set alike.

The core works on tensors; `evaluate_image_set` loads an image set and a real test set around it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memdistill.augment import TrainAugment, cutmix, resize_center_crop, test_transform
from memdistill.checks import MAX_LR, MAX_WEIGHT_DECAY, flag, require_finite, require_int
from memdistill.devices import resolve_device
from memdistill.errors import UserError
from memdistill.nets import build_net
from memdistill.reports import format_score
from memdistill.runtime import autocast, bars_disabled, check_precision, memory_format, resolve_precision, runtime_info
from memdistill.softlabels import (FULL, LABEL_MODES, SOFT_LR, SOFT_WEIGHT_DECAY, TEMPERATURE, Teacher, kd_loss,
                                   load_teacher, save_teacher, soft_lr_at, teacher_meta)

log = logging.getLogger(__name__)

LR_DECAY = 0.2
# --teacher full: epochs of the teacher's hard-label training on the whole real train split. Our choice, fixed so
# that every report's teacher is comparable: the protocol's table would give 300 epochs for > 500 images per class,
# hours per teacher on a CPU; a full split has many images per epoch, so far fewer passes converge.
TEACHER_EPOCHS = 30
TEACHER_FILE = "teacher.safetensors"
# Test checks run in batches of 64: 1.8x faster than 256 on CPU (activations stay in cache; docs/benchmarks.md).
TEST_BATCH = 64


def epochs_for_ipc(ipc: int) -> int:
    """Training epochs by images per class: fewer images need more passes to converge."""
    if ipc < 1:
        raise UserError(f"images per class must be >= 1, got {ipc}")
    for limit, epochs in ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500)):
        if ipc <= limit:
            return epochs
    return 300


def lr_milestones(total_epochs: int) -> tuple[int, int]:
    """Epochs (0-based) from which the lr is multiplied by 0.2: at 2/3 and 5/6 of training."""
    return int(2 / 3 * total_epochs), int(5 / 6 * total_epochs)


def lr_at(epoch: int, total_epochs: int, base_lr: float) -> float:
    """Learning rate for 0-based `epoch` (a per-epoch MultiStepLR with gamma 0.2)."""
    passed = sum(epoch >= m for m in lr_milestones(total_epochs))
    return base_lr * LR_DECAY ** passed


def images_per_class(labels: torch.Tensor) -> int:
    """IPC of a train set: the size of its largest class."""
    return int(torch.bincount(labels.long()).max()) if len(labels) else 0


def resolved_epochs(config: "EvalConfig", train_y: torch.Tensor) -> int:
    """config.epochs, or the IPC rule when unset."""
    return config.epochs or epochs_for_ipc(images_per_class(train_y))


@dataclass
class EvalConfig:
    """Defaults follow the Minimax/paper protocol. None means: derive from the data."""

    net: str = "convnet3"
    norm: str = "instance"
    image_size: int | None = None  # None -> the train images' own (shorter) side
    epochs: int | None = None  # None -> epochs_for_ipc
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    cutmix_beta: float = 1.0  # 0 disables CutMix
    flip: bool | None = None  # None: flip, except on the embedded digit sets (see with_default_flip)
    jitter: bool = True
    lighting: bool = True
    eval_every: int | None = None  # None -> about 10 checks over training, plus the last epoch
    repeats: int = 3
    seed: int = 0
    device: str = "auto"  # as every stage: CUDA when available
    precision: str = "auto"  # runtime.PRECISIONS for the classifier's forward passes; auto = tf32 on CUDA, else fp32
    compile: bool = False  # torch.compile the training forward (pays off only for long runs; see benchmarks.md)
    labels: str = "hard"  # hard (the protocol) or soft (a teacher's labels, softlabels module)
    teacher: str | None = None  # with soft labels: a teacher checkpoint, or "full" (trained on the real train split)
    temperature: float = TEMPERATURE  # of the soft labels (RDED's, with CutMix)
    soft_lr: float = SOFT_LR  # soft labels train as RDED's student: AdamW at this lr, half-cosine schedule
    soft_weight_decay: float = SOFT_WEIGHT_DECAY  # and this decoupled weight decay
    # Options that act only with soft labels: typed with hard labels they are refused (options.config_from_args)
    TYPED_ONLY: ClassVar[tuple[str, ...]] = ("temperature", "soft_lr", "soft_weight_decay")

    def refuse_idle(self, typed: set[str], prefix: str = "") -> None:
        """UserError naming the option when one of ``typed`` (fields whose option the user gave) would do nothing:
        the soft-label settings with hard labels."""
        idle = [name for name in self.TYPED_ONLY if name in typed]
        if idle and self.labels != "soft":
            raise UserError(f"{flag(idle[0], prefix)} is used only with {flag('labels', prefix)} soft; with hard "
                            "labels it would be ignored")

    def with_hard_labels(self) -> "EvalConfig":
        """This protocol with hard labels: no teacher, and the soft-label settings (temperature, the student's
        AdamW lr and weight decay) back at their defaults, as they do not act on hard labels, so that a key made
        from the result (a reference's cache, a --teacher full file) does not change with them."""
        return replace(self, labels="hard", teacher=None, temperature=TEMPERATURE, soft_lr=SOFT_LR,
                       soft_weight_decay=SOFT_WEIGHT_DECAY)

    def with_teacher_of(self, result: dict) -> "EvalConfig":
        """This protocol labelled by the teacher that labelled ``result`` (an evaluate_repeats dict): with soft
        labels its teacher file (for --teacher full the one that evaluation trained), so that a second evaluation
        of the same set (without augmentation for ARS, a reference) uses the very same teacher instead of training
        one of its own under its own settings into the same file. Unchanged for hard labels."""
        path = (result.get("teacher") or {}).get("path")
        return replace(self, teacher=path) if self.labels == "soft" and path else self

    def validate(self, prefix: str = "") -> None:
        """Refuse bad settings with a UserError naming the option (``prefix``: "eval-" inside ``run``)."""
        require_finite(flag("lr", prefix), self.lr, 0, MAX_LR, low_open=True)
        require_finite(flag("momentum", prefix), self.momentum, 0, 1, high_open=True)  # 1 never forgets: diverges
        require_finite(flag("weight_decay", prefix), self.weight_decay, 0, MAX_WEIGHT_DECAY)
        require_finite(flag("cutmix_beta", prefix), self.cutmix_beta, low=0)  # 0 disables CutMix
        for name in ("batch_size", "repeats"):
            require_int(flag(name, prefix), getattr(self, name), low=1)
        for name in ("epochs", "eval_every", "image_size"):
            require_int(flag(name, prefix), getattr(self, name), low=1, optional=True)
        resolve_device(self.device)
        check_precision(self.precision, flag("precision", prefix))
        if self.labels not in LABEL_MODES:
            raise UserError(f"{flag('labels', prefix)} must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        if self.labels == "soft" and not self.teacher:
            raise UserError(f"{flag('labels', prefix)} soft needs {flag('teacher', prefix)}: a teacher checkpoint "
                            f"(.safetensors or a torch state dict) or '{FULL}' (trained on the real train split)")
        if self.labels == "hard" and self.teacher:
            raise UserError(f"{flag('teacher', prefix)} is used only with {flag('labels', prefix)} soft "
                            "(hard labels need no teacher)")
        if self.teacher not in (None, FULL) and not Path(self.teacher).expanduser().is_file():
            # checked here, so that run and bench refuse it before fine-tuning rather than at evaluation
            raise UserError(f"{flag('teacher', prefix)} {self.teacher}: no such file; give a teacher checkpoint "
                            f"(.safetensors or a torch state dict) or '{FULL}' to train one on the real train split")
        require_finite(flag("temperature", prefix), self.temperature, 0, low_open=True)
        require_finite(flag("soft_lr", prefix), self.soft_lr, 0, MAX_LR, low_open=True)
        require_finite(flag("soft_weight_decay", prefix), self.soft_weight_decay, 0, MAX_WEIGHT_DECAY)


def _check_data(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                num_classes: int) -> int:
    """Validate the tensors; return images per class of the train set (its largest class)."""
    if train_x.ndim != 4 or test_x.ndim != 4:
        raise UserError(f"images must be (N, C, H, W), got train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    if len(train_x) == 0 or len(test_x) == 0:
        raise UserError(f"empty {'train' if len(train_x) == 0 else 'test'} set: nothing to evaluate")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UserError(f"{len(train_x)} train images but {len(train_y)} labels, "
                        f"{len(test_x)} test images but {len(test_y)} labels")
    if train_x.shape[1] != test_x.shape[1]:
        raise UserError(f"train images have {train_x.shape[1]} channels, test images {test_x.shape[1]}")
    for name, y in (("train", train_y), ("test", test_y)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise UserError(f"{name} labels must lie in 0..{num_classes - 1}, "
                            f"got {int(y.min())}..{int(y.max())}")
    train_classes, test_classes = set(train_y.tolist()), set(test_y.tolist())
    if train_classes != test_classes:
        raise UserError(f"the train set has {len(train_classes)} classes, the test set {len(test_classes)} "
                        f"(or different ones): both must cover the same classes")
    return images_per_class(train_y)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
              precision: str = "fp32") -> float:
    """Top-1 % of ``model`` on test images x (N, C, H, W) with labels y (N,), in eval mode, TEST_BATCH at a
    time under inference mode (no autograd bookkeeping) and ``precision`` autocast."""
    model.eval()
    correct = 0
    layout = memory_format(device, precision)
    with torch.inference_mode(), autocast(device, precision):
        for i in range(0, len(x), TEST_BATCH):
            logits = model(x[i:i + TEST_BATCH].to(device).contiguous(memory_format=layout))
            correct += int((logits.argmax(1).cpu() == y[i:i + TEST_BATCH]).sum())
    model.train()
    return 100.0 * correct / len(x)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one joins the previous one (batch norm needs two)."""
    chunks = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def train_and_test(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int, config: EvalConfig | None = None, seed: int | None = None,
                   teacher: Teacher | None = None) -> dict:
    """Train one fresh classifier and test it.

    Images are (N, C, H, W) in [-1, 1]; labels (N,) int64. seed None -> config.seed; it seeds both the
    network's init (torch.manual_seed) and a generator for shuffling and augmentation.
    Returns dict(best=, last=, history=[(epoch, top-1 %)]) with 1-based epochs.
    config.precision bf16 runs the forward passes under bf16 autocast (the loss, the gradients' accumulation
    in the fp32 weights and the optimiser stay fp32); config.compile compiles the training forward.
    With config.labels "soft" the loss is softlabels.kd_loss against ``teacher``'s logits of the same augmented
    (and CutMix-ed) batch; ``teacher`` None loads config.teacher (see resolve_teacher). Raises UserError for bad
    options, data or teacher, and for a run that diverges.
    """
    return _train(train_x, train_y, test_x, test_y, num_classes, config, seed, teacher)[1]


def resolve_teacher(config: EvalConfig, teacher: Teacher | None, num_classes: int, channels: int, size: int,
                    class_names: list[str] | None = None) -> Teacher | None:
    """The teacher a run with ``config`` uses: None for hard labels, else ``teacher`` or the checkpoint
    config.teacher (softlabels.load_teacher). '--teacher full' must have been trained first (full_teacher)."""
    if config.labels != "soft":
        return None
    if teacher is not None:
        return teacher
    if config.teacher == FULL:
        raise UserError(f"--teacher {FULL} is trained by evaluate_image_set (full_teacher); on tensors give a "
                        "teacher checkpoint")
    return load_teacher(config.teacher, config.net, config.norm, num_classes, channels, size, class_names)


def _train(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
           num_classes: int, config: EvalConfig | None, seed: int | None, teacher: Teacher | None
           ) -> tuple[torch.nn.Module, dict]:
    """train_and_test, also returning the trained classifier."""
    config = config or EvalConfig()
    config.validate()
    seed = config.seed if seed is None else seed
    ipc = _check_data(train_x, train_y, test_x, test_y, num_classes)
    device = resolve_device(config.device)
    size = config.image_size or min(train_x.shape[-2:])
    teacher = resolve_teacher(config, teacher, num_classes, int(train_x.shape[1]), size)
    precision = resolve_precision(config.precision, device)  # once: auto and fast become what they mean here
    layout = memory_format(device, precision)  # channels-last for bf16 on a CPU: faster, see runtime
    if teacher is not None:
        teacher.model.to(device)
    epochs = resolved_epochs(config, train_y)
    eval_every = config.eval_every or max(1, epochs // 10)

    torch.manual_seed(seed)  # before any other draw: the init depends on the seed only
    model = build_net(config.net, num_classes, train_x.shape[1], size, config.norm).to(device, memory_format=layout)

    # Deterministic parts are done once: train images are resized/cropped to `size` up front, so the
    # random resized crop per epoch works at the final resolution; test images are fully prepared.
    train01 = resize_center_crop(((train_x.float() + 1) / 2).clamp(0, 1), size).to(device)
    test_ready = test_transform(((test_x.float() + 1) / 2).clamp(0, 1), size)
    train_y, test_y = train_y.long().to(device), test_y.long().cpu()
    augment = TrainAugment(size=size, flip=config.flip is not False, jitter=config.jitter, lighting=config.lighting)

    # The compiled module shares its parameters with `model`; the test checks run the eager one (eval mode
    # would otherwise trigger a second compilation).
    forward = torch.compile(model) if config.compile else model
    if teacher is None:  # the protocol (METHOD.md section 7): SGD with momentum, step decay
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        base_lr, lr_schedule = config.lr, lr_at
    else:  # soft labels: RDED's student (softlabels module)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.soft_lr, weight_decay=config.soft_weight_decay)
        base_lr, lr_schedule = config.soft_lr, soft_lr_at
    generator = torch.Generator().manual_seed(seed)
    log.info("training %s on %d images (%d per class), %d px, %d epochs, seed %d",
             config.net, len(train_x), ipc, size, epochs, seed)

    history: list[tuple[int, float]] = []
    model.train()
    for epoch in tqdm(range(epochs), desc=f"eval {config.net} seed {seed}", disable=bars_disabled(), leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(epoch, epochs, base_lr)
        for idx in _batches(len(train01), config.batch_size, generator):
            x = augment(train01[idx.to(device)], generator).contiguous(memory_format=layout)  # (B, C, size, size)
            y = train_y[idx.to(device)]
            if config.cutmix_beta > 0:
                x, target = cutmix(x, y, num_classes, config.cutmix_beta, generator)
            else:
                target = F.one_hot(y, num_classes).float()
            if config.compile:
                # the batch size varies (a smaller last batch): one graph for every size, not a second compile
                # (in fp32 torch picks a CPU convolution's kernel by batch size: a last batch below 16 after
                # larger ones still compiles a second graph)
                torch._dynamo.mark_dynamic(x, 0)
            with autocast(device, precision):
                logits = forward(x)
                # the teacher labels the very images the student sees: augmented and mixed
                teacher_logits = teacher(x) if teacher is not None else None
            if teacher_logits is not None:
                loss = kd_loss(logits.float(), teacher_logits.float(), config.temperature)
            else:
                loss = F.cross_entropy(logits.float(), target)  # soft targets: (B, classes) probabilities
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # NaN nets score chance
                raise UserError(f"training the {config.net} classifier diverged: its weights became non-finite "
                                f"(NaN or infinity) by epoch {epoch + 1} (seed {seed}); no result was written. "
                                f"Use a smaller learning rate (now {config.lr:g}; --lr, in run and bench --eval-lr)")
            acc = _accuracy(model, test_ready, test_y, device, precision)
            history.append((epoch + 1, acc))
            log.debug("epoch %d: loss %.4f, top-1 %.2f%%", epoch + 1, loss.item(), acc)
    best, last = max(acc for _, acc in history), history[-1][1]
    log.info("seed %d: best %.2f%%, last %.2f%%", seed, best, last)
    return model, {"best": best, "last": last, "history": history}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def evaluate_repeats(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     num_classes: int, config: EvalConfig | None = None, teacher: Teacher | None = None) -> dict:
    """Run train_and_test `config.repeats` times with seeds seed, seed+1, ... (soft labels: all from one teacher,
    ``teacher`` or config.teacher's checkpoint).

    Std is the sample standard deviation (ddof=1) over repeats; 0 for a single repeat.
    Returns dict(per_repeat=[{seed, best, last}], best_mean, best_std, last_mean, last_std, epochs, net,
    config, labels ("hard"/"soft"), teacher (its identity: path, sha256, net, ...; None for hard labels),
    temperature (None for hard labels)).
    """
    config = config or EvalConfig()
    config.validate()
    _check_data(train_x, train_y, test_x, test_y, num_classes)  # before the teacher is read: shapes known good
    size = config.image_size or min(train_x.shape[-2:])
    teacher = resolve_teacher(config, teacher, num_classes, int(train_x.shape[1]), size)  # once for all repeats
    per_repeat = []
    for r in range(config.repeats):
        seed = config.seed + r
        result = train_and_test(train_x, train_y, test_x, test_y, num_classes, config, seed, teacher)
        per_repeat.append({"seed": seed, "best": result["best"], "last": result["last"]})
    best_mean, best_std = _mean_std([r["best"] for r in per_repeat])
    last_mean, last_std = _mean_std([r["last"] for r in per_repeat])
    soft = config.labels == "soft"
    return {"per_repeat": per_repeat, "best_mean": best_mean, "best_std": best_std, "last_mean": last_mean,
            "last_std": last_std, "epochs": resolved_epochs(config, train_y), "net": config.net,
            "config": asdict(config), "runtime": runtime_info(), "labels": config.labels,
            "precision": resolve_precision(config.precision, resolve_device(config.device)),  # what auto/fast became
            "teacher": teacher.identity if soft else None, "temperature": config.temperature if soft else None}


def labels_caption(result: dict) -> str:
    """How a result's classifiers were labelled, for a table's header: "hard labels", or "soft labels (KD, T=20;
    teacher PATH, sha256 0123456789ab)"."""
    if result.get("labels", "hard") != "soft":
        return "hard labels"
    teacher = result.get("teacher") or {}
    return (f"soft labels (KD, T={result.get('temperature'):g}; teacher {teacher.get('path')}, "
            f"sha256 {str(teacher.get('sha256'))[:12]})")


def labels_line(results: list[dict]) -> str | None:
    """"Labels: ..." naming the labels (and teachers) of evaluation results, printed above their table; None
    when all used the protocol's hard labels (the tables then read as before)."""
    captions = sorted({labels_caption(r) for r in results})
    return None if captions == ["hard labels"] else f"Labels: {'; '.join(captions)}"


def format_table(results: dict | list[dict]) -> str:
    """Markdown table, one row per evaluate_repeats result; an optional "label" key names the row."""
    rows = [results] if isinstance(results, dict) else list(results)
    modes = {r.get("labels", "hard") for r in rows}
    # The labels are named in the header; a table that mixes both modes names them per row.
    mode = modes.pop() if len(modes) == 1 else "by row"
    line = labels_line(rows)
    lines = [line, ""] if line else []
    lines += [f"| run | net | epochs | repeats | best top-1 % ({mode}) | last top-1 % ({mode}) |",
              "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        label, n = r.get("label", str(i + 1)), len(r["per_repeat"])
        if mode == "by row":
            label = f"{label} ({r.get('labels', 'hard')})"
        lines.append(f"| {label} | {r['net']} | {r['epochs']} | {n} | {format_score(r['best_mean'], r['best_std'], n)} "
                     f"| {format_score(r['last_mean'], r['last_std'], n)} |")
    return "\n".join(lines)


# Digits are not mirror-symmetric: the protocol's horizontal flip would teach wrong labels on them.
NO_FLIP_DATASETS = ("mnist5k", "digits")


def resolve_test_set(data: str, test: str | None) -> str:
    """The real test images for training data ``data``: ``test`` when given, else the embedded dataset's own
    test split; folder data has no split of its own to fall back on."""
    if test is not None:
        return test
    if data not in NO_FLIP_DATASETS:
        raise UserError(f"--test is required for folder data ({data}): a folder of real test images, e.g. the "
                        "ImageNet val images of the subset")
    return data


def with_default_flip(config: EvalConfig, test: str) -> EvalConfig:
    """``flip=None`` means: flip unless the test set is an embedded digit set."""
    if config.flip is not None:
        return config
    return replace(config, flip=test not in NO_FLIP_DATASETS)


def set_test_default(manifest: dict, train_folder: str | Path) -> str:
    """The real test set of an image set whose --test was not given: the test split of the embedded dataset it
    was made from (its manifest's "data", e.g. "digits:train" -> digits). A set made from folder data, or a
    plain class tree, has none: UserError asking for --test."""
    data = str(manifest.get("data") or "")
    name = data.split(":", 1)[0]
    if name in NO_FLIP_DATASETS:
        return name
    raise UserError(f"--test is required for {train_folder}: it was not made from an embedded dataset"
                    + (f" (its data: {data})" if data else "") + "; give a folder of real test images of its classes")


def evaluate_image_set(train_folder: str | Path, test: str | None, config: EvalConfig, test_split: str = "test",
                       subset: str | None = None, resolution: int | None = None,
                       skip_bad_images: bool = False, teacher_dir: str | Path | None = None,
                       teacher_data: str | None = None) -> dict:
    """Train classifiers on the image set in ``train_folder`` and test them on the real ``test`` images
    (an embedded dataset's split or a class-per-folder tree; None: the test split of the embedded dataset the
    set was made from, see set_test_default). ``skip_bad_images`` skips unreadable files of a plain class tree
    (--train) or a test folder with a warning. Returns evaluate_repeats' dict plus where the data came from.

    Soft labels with config.teacher "full": the teacher is trained on the train split of ``teacher_data`` (None:
    the embedded test dataset's; a test folder has none: UserError) and saved in ``teacher_dir``, or reused from
    there (see full_teacher)."""
    from .data import load_tensors, open_dataset

    config.validate()  # options first: a bad one is refused before any image is read
    train_x, train_y, class_names, manifest = read_train_folder(train_folder, resolution, skip_bad_images)
    test = test if test is not None else set_test_default(manifest, train_folder)
    config = with_default_flip(config, test)
    test_ds = open_dataset(test, test_split, subset=subset, resolution=resolution or train_x.shape[-1],
                           skip_bad_images=skip_bad_images, channels=int(train_x.shape[1]))
    test_names = list(test_ds.class_names)
    if set(test_names) != set(class_names):
        missing = sorted(set(class_names) ^ set(test_names))
        raise UserError(f"the classes of {train_folder} differ from the test set's {test} "
                        f"(not in both: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                        "both need the same class (folder) names")
    # Labels follow the test set's class order; train classes are matched to them by name.
    to_test = torch.tensor([test_names.index(n) for n in class_names], dtype=torch.long)
    train_y = to_test[train_y]
    test_x, test_y = load_tensors(test_ds)
    teacher = None
    if config.labels == "soft":
        channels, size = int(train_x.shape[1]), config.image_size or min(train_x.shape[-2:])
        if config.teacher == FULL:
            data = teacher_data or (test if test in NO_FLIP_DATASETS else None)
            if data is None:
                raise UserError(f"--teacher {FULL} trains on the train split of an embedded --test dataset "
                                f"({', '.join(NO_FLIP_DATASETS)}); {test} is a folder of test images: give "
                                "--teacher PATH, a classifier trained on the real train images")
            teacher = full_teacher(data, subset, config, channels, size, test_names, teacher_dir,
                                   test_x, test_y, resolution=int(test_x.shape[-1]), skip_bad_images=skip_bad_images)
        else:
            teacher = load_teacher(config.teacher, config.net, config.norm, len(test_names), channels, size,
                                   test_names)
    result = evaluate_repeats(train_x, train_y, test_x, test_y, len(test_names), config, teacher)
    result.update(train=str(train_folder), test=f"{test}:{test_split}" if test in NO_FLIP_DATASETS else test,
                  method=manifest.get("method") or Path(train_folder).expanduser().resolve().name,
                  ipc=manifest.get("ipc") or images_per_class(train_y), num_test=len(test_y),
                  test_data=test, resolution=resolution or int(train_x.shape[-1]), channels=int(train_x.shape[1]))
    return result


def read_train_folder(folder: str | Path, resolution: int | None = None, skip_bad_images: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(images (N, C, H, W) in [-1, 1], labels (N,), class_names, manifest) of a train set: an image set
    written by sample/select (it has manifest.json), or any class-per-folder tree, labelled by its folder
    names, read at ``resolution`` (None: the images' own size, see data.FolderImageDataset) with one
    channel when every image is grey; its manifest is then empty. Raises UserError for missing or bad data."""
    from .data import FolderImageDataset, load_tensors
    from .imageset import read_image_set

    path = Path(folder).expanduser()
    if (path / "manifest.json").is_file() or not path.is_dir():
        return read_image_set(path)
    ds = FolderImageDataset(path, None, resolution, skip_bad_images=skip_bad_images, labels="index")
    images, labels = load_tensors(ds)
    return images, labels, list(ds.class_names), {}


def full_teacher(data: str, subset: str | None, config: EvalConfig, channels: int, size: int,
                 class_names: list[str], folder: str | Path | None, test_x: torch.Tensor, test_y: torch.Tensor,
                 resolution: int | None = None, skip_bad_images: bool = False) -> Teacher:
    """The teacher of ``--teacher full``: a ``config.net`` classifier trained with hard labels (the protocol,
    TEACHER_EPOCHS epochs, seed config.seed) on every image of the train split of ``data`` (its ``subset``
    classes, read at ``resolution``), tested on test_x/test_y (N, C, H, W) in [-1, 1].

    It is saved as ``folder``/<net>.safetensors, with the settings it was trained with and its test top-1, and
    reused from there when they match (a second evaluate can also name that file with --teacher PATH): only what
    changes the teacher keys it (data, classes, net, norm, image size, epochs, seed, the hard-label protocol), not
    the student's soft-label settings.
    Raises UserError when ``folder`` is None or the train split's classes differ from ``class_names``."""
    from .data import load_tensors, open_dataset

    if folder is None:
        raise UserError(f"--teacher {FULL} needs an output folder to save the teacher in")
    path = Path(folder) / f"{config.net}.safetensors"
    # with_hard_labels: the student's settings (--temperature, --soft-lr, ...) neither train nor key the teacher
    train_config = replace(config.with_hard_labels(), epochs=TEACHER_EPOCHS, repeats=1, eval_every=None)
    settings = {k: v for k, v in asdict(train_config).items() if k not in ("device", "compile", "repeats")}
    meta = {"data": f"{data}:train", "subset": subset, "class_names": list(class_names),
            "num_classes": len(class_names), "channels": channels, "image_size": size, "net": config.net,
            "norm": config.norm, "epochs": TEACHER_EPOCHS, "settings": settings}
    if path.is_file() and {k: v for k, v in teacher_meta(path).items() if k != "top1"} == meta:
        log.info("teacher: reusing %s", path)
        return load_teacher(path, config.net, config.norm, len(class_names), channels, size, class_names)
    ds = open_dataset(data, "train", subset=subset, resolution=resolution, skip_bad_images=skip_bad_images,
                      channels=channels)
    if list(ds.class_names) != list(class_names):
        raise UserError(f"--teacher {FULL}: the classes of {data}'s train split differ from the test set's "
                        "(or their order); train a teacher on the same classes and give it as --teacher PATH")
    train_x, train_y = load_tensors(ds)
    log.info("teacher: training %s on all %d real train images of %s, %d epochs", config.net, len(train_x), data,
             TEACHER_EPOCHS)
    model, result = _train(train_x, train_y, test_x, test_y, len(class_names), train_config, None, None)
    save_teacher(model, path, {**meta, "top1": result["last"]})
    return load_teacher(path, config.net, config.norm, len(class_names), channels, size, class_names)
