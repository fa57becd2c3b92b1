"""The training loop shared by `pretrain` (from scratch) and `finetune` (the method).

Everything random in a step (batch order, timesteps, noise, label dropout, the flips and posterior samples of
the training latents) is derived from (seed, step),
so a resumed run replays exactly the steps an uninterrupted run would take, and a run split over several
processes draws the same global batch as a single process.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checks import MAX_LR, MAX_WEIGHT_DECAY, flag, require_finite, require_int
from .codec import vae_changes
from .devices import dist_setup, resolve_device
from .diffusion import NUM_TIMESTEPS, GaussianDiffusion
from .errors import UserError
from .latents import FLIP_CHOICES, LatentPosterior
from .manifest import read_json_object, refuse_changed_settings, write_json_atomic, write_manifest
from .memory import NonFiniteEntry
from .runtime import announce_precision, autocast, check_precision, matmul_precision, resolve_precision

log = logging.getLogger(__name__)

MEMORY_CHOICES = ("adaptive", "fifo", "none")
TRAIN_CHOICES = ("difffit", "all")
# Options that change how a run is observed, not what it computes: a resume may change them.
# `steps` and `epochs` only say where to stop (no schedule depends on them), so a run can be extended.
# `precision`, like `device`, changes how the arithmetic is done (a run started on a GPU may go on on a CPU).
RESUMABLE_CHANGES = {"checkpoint_every", "log_every", "device", "precision", "progress", "steps", "epochs"}


@dataclass
class TrainConfig:
    # data
    data: str = "mnist5k"
    subset: str | None = None
    resolution: int | None = None
    skip_bad_images: bool = False
    channels: str = "auto"  # auto (1 when every image is grey), 1 or 3
    labels: str = "auto"  # class names -> DiT class indices: auto, imagenet or index (data.label_mapping)
    codec: str = "auto"  # auto: the --init model's own codec and VAE (its export records them), else pixel
    vae: str | None = None
    latent_cache: str | None = None
    # Horizontal flips of the training images, drawn per step (latents.FLIP_CHOICES): auto = data.default_flip.
    # A run records the value it resolved to ("on" or "off").
    flip: str = "auto"
    # model: `init` is a checkpoint to start from (finetune); without it `model` is built from scratch
    model: str = "DiT-Tiny/4"
    init: str | None = None
    train: str = "all"
    class_dropout: float = 0.1
    # optimisation
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    # memory (METHOD.md sections 3-4)
    memory: str = "none"
    lambda_real: float = 0.002
    lambda_gen: float = 0.008
    mem_real: int = 64
    mem_gen: int = 64
    repeat_loss_defect: bool = False
    # Only samples drawn at a timestep t < memory_max_t take part in the memory mechanism (losses and
    # updates); None = every t, as the paper. At large t the predicted clean latent is mostly noise.
    memory_max_t: int | None = None
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    device: str = "auto"
    # runtime.PRECISIONS: auto (tf32 on CUDA, fp32 elsewhere), fp32, tf32 or bf16 (autocast of the DiT forward;
    # the diffusion and memory losses and the memory updates stay fp32)
    precision: str = "auto"
    progress: bool = True
    stage: str = field(default="train")

    def validate(self, prefix: str = "") -> None:
        """Refuse bad settings with a UserError naming the option (``prefix`` as in ``run``'s options, e.g. "")."""
        def opt(name: str) -> str:
            return flag(name, prefix)

        if self.codec not in CODEC_CHOICES:
            raise UserError(f"{opt('codec')} must be one of {', '.join(CODEC_CHOICES)}, got {self.codec!r}")
        if self.codec == "pixel" and (self.vae is not None or self.latent_cache is not None):
            given = opt("vae") if self.vae is not None else opt("latent_cache")
            raise UserError(f"{given} applies to {opt('codec')} vae; with the pixel codec it would be ignored")
        if self.flip not in FLIP_CHOICES:
            raise UserError(f"{opt('flip')} must be one of {', '.join(FLIP_CHOICES)}, got {self.flip!r}")
        if self.memory not in MEMORY_CHOICES:
            raise UserError(f"{opt('memory')} must be one of {', '.join(MEMORY_CHOICES)}, got {self.memory!r}")
        if self.train not in TRAIN_CHOICES:
            raise UserError(f"{opt('train')} must be one of {', '.join(TRAIN_CHOICES)}, got {self.train!r}")
        for name in ("lambda_real", "lambda_gen"):
            require_finite(opt(name), getattr(self, name), low=0)
        require_finite(opt("lr"), self.lr, 0, MAX_LR)
        require_finite(opt("weight_decay"), self.weight_decay, 0, MAX_WEIGHT_DECAY)
        require_finite(opt("ema_decay"), self.ema_decay, 0, 1, high_open=True)
        require_finite(opt("class_dropout"), self.class_dropout, 0, 1, high_open=True)
        require_finite(opt("epochs"), self.epochs, low=0, low_open=True, optional=True)
        require_finite(opt("grad_clip"), self.grad_clip, low=0, low_open=True, optional=True)
        for name in ("mem_real", "mem_gen", "batch_size", "checkpoint_every", "log_every"):
            require_int(opt(name), getattr(self, name), low=1)
        require_int(opt("steps"), self.steps, low=1, optional=True)
        if self.steps is not None and self.epochs is not None:
            raise UserError(f"give {opt('steps')} or {opt('epochs')}, not both (got {self.steps} steps and "
                            f"{self.epochs:g} epochs)")
        require_int(opt("memory_max_t"), self.memory_max_t, 1, NUM_TIMESTEPS, optional=True)
        check_precision(self.precision, opt("precision"))

    def with_resolved_codec(self) -> "TrainConfig":
        """This config with --codec auto made concrete: an explicit --vae means vae; else the codec and VAE that the
        --init model's export records (config.json "codec"), so that a latent model is tuned on its own VAE's
        latents; else (no --init, or a checkpoint that records none) pixel."""
        if self.codec != "auto":
            return self
        if self.vae is not None:
            return dataclasses.replace(self, codec="vae")
        recorded = _init_codec(self.init)
        if recorded is None or recorded.get("name") != "vae":
            return dataclasses.replace(self, codec="pixel")
        return dataclasses.replace(self, codec="vae", vae=recorded.get("path"))

    def with_resolved_paths(self) -> "TrainConfig":
        """This config with its path-valued options (--data, --init, --vae, --latent-cache, a --subset file) as
        absolute, resolved paths: a run records the folders it used, not the text typed, so that a resume from
        another working directory, or one typed as ./data instead of data, means the same folders. Names of
        embedded datasets, shipped models and built-in subsets stay names."""
        return dataclasses.replace(self, **{k: _resolved(k, getattr(self, k)) for k in PATH_OPTIONS})


CODEC_CHOICES = ("auto", "pixel", "vae")


def _init_codec(init: str | None) -> dict | None:
    """The codec ({"name", "path"}) that the export behind ``init`` records, or None (no --init, a bare checkpoint,
    an unreadable config: then the load itself reports what is wrong)."""
    if not init:
        return None
    from .pretrained import resolve_model

    try:
        config = Path(resolve_model(init)) / "config.json"
        codec = json.loads(config.read_text()).get("codec") if config.is_file() else None
    except (UserError, OSError, ValueError, AttributeError):
        return None
    return codec if isinstance(codec, dict) and isinstance(codec.get("path"), (str, type(None))) else None


# Options that name a file or folder (unless the value is a built-in name): compared and stored resolved.
PATH_OPTIONS = ("data", "init", "vae", "latent_cache", "subset")


def _builtin_names(option: str) -> tuple[str, ...]:
    """The names that ``option`` accepts besides paths (they are never resolved against the working directory)."""
    if option == "data":
        from .data import EMBEDDED

        return tuple(EMBEDDED)
    if option == "init":
        from .pretrained import SHIPPED

        return tuple(SHIPPED)
    if option == "vae":
        from .pretrained import SHIPPED_VAES

        return tuple(SHIPPED_VAES)
    if option == "subset":
        from .data import BUILTIN_SUBSETS

        return tuple(BUILTIN_SUBSETS)
    return ()


def _resolved(option: str, value):
    """``value`` of the path option ``option`` as an absolute path (``~`` expanded, links and .. resolved);
    None, a non-text value and a built-in name unchanged."""
    if not isinstance(value, str) or not value or value in _builtin_names(option):
        return value
    return str(Path(value).expanduser().resolve())


# ----- distributed helpers ---------------------------------------------------------------------------
def gather_batch(x: torch.Tensor, world: int) -> torch.Tensor:
    """All ranks' rows of ``x`` in rank order (no gradient)."""
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


# ----- per-step randomness --------------------------------------------------------------------------
def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 7 + stream)
    return g


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Global batch of ``step``: epochs are permutations seeded by (seed, epoch); the tail that does not
    fill a batch is dropped."""
    per_epoch = n // batch
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
    return perm[j * batch:(j + 1) * batch]


def step_draws(cfg: TrainConfig, step: int, n: int, latent_shape: tuple[int, ...], diffusion: GaussianDiffusion
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything random about the global batch of ``step``, from (seed, step) alone: the indices of its images
    among ``n``, their timesteps, noise and class-dropout flags (on the CPU). A resumed run, and any script
    that replays a run, draws exactly these."""
    idx = batch_indices(n, cfg.batch_size, cfg.seed, step)
    g = step_generator(cfg.seed, step)
    t = diffusion.sample_timesteps(cfg.batch_size, generator=g)
    noise = torch.randn((cfg.batch_size, *latent_shape), generator=g)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.class_dropout
    return idx, t, noise, drop


# The stream of step_generator that draws a step's latents (0: timesteps, noise, dropout; 1: the epoch orders):
# a stream of its own leaves the other draws as they were before the latents were drawn per step.
LATENT_STREAM = 2


def step_latents(posterior: LatentPosterior, seed: int, step: int, idx: torch.Tensor) -> torch.Tensor:
    """The clean latents (B, C, h, w) of the global batch ``idx`` (B,) of ``step``: its flips and posterior samples,
    drawn from (seed, step) alone (see LatentPosterior.draw), on the posterior's device."""
    return posterior.draw(idx, step_generator(seed, step, stream=LATENT_STREAM))


# ----- the run --------------------------------------------------------------------------------------
@dataclass
class TrainData:
    posterior: LatentPosterior  # what each step draws its latents from: (N, V, C, h, w) statistics
    targets: torch.Tensor  # (N,) labels 0..K-1
    class_names: list[str]
    cond_labels: list[int]  # the model's class index of each label
    identity: str
    codec_config: dict  # codec.identity(): the config and, for a VAE, what its files were (sample compares them)
    image_shape: tuple[int, ...]
    label_mapping: str = "index"  # how class_names became cond_labels: "imagenet" or "index"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of one training latent."""
        return self.posterior.latent_shape

    @property
    def flip(self) -> str:
        """The resolved --flip: "on" when the mirror images are drawn from, else "off"."""
        return "on" if self.posterior.flips else "off"


def load_train_data(cfg: TrainConfig, device: torch.device | None = None, rank: int = 0, world: int = 1
                    ) -> TrainData:
    """The training split of ``cfg.data`` encoded by ``cfg.codec`` into posterior statistics (cached when
    ``cfg.latent_cache`` is set), with the mirror images when ``cfg.flip`` resolves to on (data.default_flip).

    Call it after ``dist_setup`` (so ``device`` is this rank's device). Under torchrun (``world`` > 1) with a
    VAE, rank 0 alone encodes the images (or reads the cache); the other ranks never load the VAE and receive
    the latents by broadcast.
    """
    from .codec import encode_dataset, make_codec
    from .data import default_flip, open_dataset

    cfg = cfg.with_resolved_codec()
    cache = Path(cfg.latent_cache) if cfg.latent_cache else None
    # With a latent cache, folder images are only listed (headers) up front: a cache hit then needs neither the
    # pixels nor the VAE; on a miss, encode_dataset decodes (and checks) them. Ranks > 0 never read pixels.
    lazy = (cache is not None or rank > 0) and cfg.codec != "pixel" and not cfg.skip_bad_images
    ds = open_dataset(cfg.data, "train", cfg.subset, cfg.resolution, cfg.skip_bad_images, cfg.channels, cfg.labels,
                      verify=not lazy)
    codec = make_codec(cfg.codec, cfg.vae, device=device or resolve_device(cfg.device))
    flip = cfg.flip == "on" or (cfg.flip == "auto" and default_flip(cfg.data, ds.channels))
    if world > 1 and codec.name != "pixel":
        posterior, targets = _encode_on_rank0(codec, ds, cache, flip, rank, device)
    else:
        posterior, targets = encode_dataset(codec, ds, cache, flip=flip)
    codec_config = codec.identity()
    if hasattr(codec, "weights_sha256"):  # the export and the resume state record the VAE's bytes too (every
        codec_config["weights_sha256"] = codec.weights_sha256()  # rank, so that all take one resume decision)
    return TrainData(posterior, targets.long().cpu(), list(ds.class_names), list(ds.cond_labels),
                     ds.identity, codec_config, (ds.channels, ds.resolution, ds.resolution), ds.label_mapping)


def _encode_on_rank0(codec, ds, cache: Path | None, flip: bool, rank: int, device: torch.device
                     ) -> tuple[LatentPosterior, torch.Tensor]:
    """(posterior statistics (N, V, *latent_shape), targets (N,)) encoded once by rank 0 and broadcast to every
    rank."""
    from .codec import encode_dataset

    shape = (len(ds), 2 if flip else 1, *codec.latent_shape((ds.channels, ds.resolution, ds.resolution)))
    if rank == 0:
        posterior, targets = encode_dataset(codec, ds, cache, flip=flip)
        mean, logvar = posterior.mean, posterior.logvar
    else:
        mean, logvar, targets = torch.empty(shape), torch.empty(shape), torch.empty(len(ds), dtype=torch.long)
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    mean, logvar, targets = mean.float().to(comm), logvar.float().to(comm), targets.long().to(comm)
    for tensor in (mean, logvar, targets):
        dist.broadcast(tensor, src=0)
    return LatentPosterior(mean.cpu(), logvar.cpu(), codec.scaling_factor, codec.shift_factor), targets.cpu()


def total_steps(cfg: TrainConfig, n: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_epoch = max(n // cfg.batch_size, 1)
    return max(int(round((cfg.epochs or 1.0) * per_epoch)), 1)


def prepare_output(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool, rank: int,
                   resumable: set[str] = RESUMABLE_CHANGES) -> tuple[Path | None, bool]:
    """(the resume state to load, if any; whether the settings were checked against the run's config.json).
    Refuses to mix runs in one folder, and a resume with other settings than those in config.json, except the
    ``resumable`` ones (another stage's settings, e.g. a train-vae VAEConfig, come with their own). When that
    file is damaged or gone, the copy of the settings inside the resume state decides instead (check_resume)."""
    state_path = out / "checkpoints" / "last.pt"
    holds_run = (out / "config.json").exists() or state_path.exists()
    if resume:
        if not state_path.exists():
            if holds_run or (out / "manifest.json").exists():
                raise UserError(f"--resume: {out} has no resume state (checkpoints/last.pt)")
            return None, False  # nothing to resume yet: start fresh
        try:
            saved = read_json_object(out / "config.json")
        except UserError as err:
            log.warning("%s; the settings saved in %s are used instead, and config.json is rewritten", err, state_path)
            return state_path, False
        check_settings(saved, cfg, resumable)
        return state_path, True
    if holds_run or (out / "manifest.json").exists():
        if not overwrite:
            raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        if rank == 0:
            shutil.rmtree(out)
    return None, False


def save_atomic(obj, path: Path) -> None:
    """torch.save through a tmp file and a rename: ``path`` is the old or the new state, never half of one."""
    from .manifest import disk_full_is_user_error

    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_full_is_user_error(path, cleanup=tmp):  # a full disk: one line, and no .tmp left behind
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


RESUME_KEYS = ("model", "ema", "opt", "memories", "rng", "step", "config")


def check_settings(saved: dict, cfg: TrainConfig, resumable: set[str] = RESUMABLE_CHANGES) -> None:
    """Refuse (UserError) a resume whose settings differ from the ``saved`` ones, other than ``resumable``.
    Path options are compared resolved; a relative path saved by an older version is taken as relative to the
    working directory, as it was then read."""
    saved = {**saved, **{k: _resolved(k, saved.get(k)) for k in PATH_OPTIONS if k in saved}}
    refuse_changed_settings(saved, dataclasses.asdict(cfg.with_resolved_paths()), ignore=resumable)


def check_resume(state: dict, cfg: TrainConfig, data: TrainData, steps: int, path: Path, settings_checked: bool
                 ) -> None:
    """What a resume state must agree with before training goes on (UserError, one line, otherwise): the settings
    it was saved with (unless ``settings_checked`` against the run's config.json already: a state of an older
    version may lack settings added since), the data it was trained on (TrainData.identity: the file list with
    sizes, the resolution, the classes), the VAE's files (codec.vae_changes) and a length (``steps``) not below
    the step it already reached."""
    if not settings_checked:
        check_settings(state["config"], cfg)
    trained_on = state.get("data")  # absent in states of older versions: nothing to compare
    if trained_on is not None and trained_on != data.identity:
        raise UserError(f"--resume: the data differ from those the run in {path.parent.parent} was trained on "
                        f"(--data {cfg.data}: {data.identity}, was {trained_on}); resume on the same images, or "
                        "start again with --overwrite or another --out")
    recorded = state.get("codec")  # absent in states of older versions
    changed = vae_changes(recorded, data.codec_config, lambda: data.codec_config.get("weights_sha256")) \
        if isinstance(recorded, dict) else []
    if changed:
        raise UserError(f"--resume: the VAE {recorded.get('path')} changed since the run in {path.parent.parent} was "
                        f"trained with it (its {', '.join(changed)} differ), so its latents differ too; resume with "
                        "the VAE as it was, or start again with --overwrite or another --out")
    if steps < state["step"]:
        length = f"--steps {cfg.steps}" if cfg.steps is not None else f"--epochs {cfg.epochs or 1:g} ({steps} steps)"
        raise UserError(f"--resume: {length} is below step {state['step']}, which the run in {path.parent.parent} "
                        f"already reached; pass --steps {state['step']} or more (or start again with --overwrite)")


def frozen_record(model: torch.nn.Module, init: str | None) -> dict | None:
    """What a lean resume state needs to know about the weights it leaves out: None when every parameter is
    trained; else ``{"init": init, "keys": n, "sha256": hex}``, the sha256 over the frozen entries of the
    model's state dict (frozen parameters and buffers) in key order, each with its name, dtype and shape.

    Hashing reads every frozen byte once (2.7 GB, a few seconds, at DiT-XL/2): call it once per run, on the
    weights as loaded (before they move to a GPU)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if all(p.requires_grad for p in model.parameters()):
        return None
    digest = hashlib.sha256()
    frozen = {k: v for k, v in model.state_dict().items() if k not in trainable}
    for key in sorted(frozen):
        t = frozen[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"init": init, "keys": len(frozen), "sha256": digest.hexdigest()}


def trainable_state(module: torch.nn.Module, names: set[str] | None) -> dict:
    """``module``'s state dict, limited to ``names`` (the trained parameters) unless that is None (keep all)."""
    state = module.state_dict()
    return state if names is None else {k: v for k, v in state.items() if k in names}


def load_weights(module: torch.nn.Module, saved: dict, frozen: dict | None, what: str, path: Path) -> None:
    """Load ``saved`` into ``module``: all of it for a full state; for a lean one (``frozen``, its record of
    the left-out weights, is not None) the trained entries only, the rest staying as ``module`` holds them
    (the init weights). UserError when ``saved`` does not hold exactly what it should."""
    if frozen is None:
        module.load_state_dict(saved)
        return
    missing, unexpected = module.load_state_dict(saved, strict=False)
    if unexpected or len(missing) != frozen["keys"]:
        raise UserError(f"{path} does not match the model: its {what} has {len(saved)} tuned entries "
                        f"({len(unexpected)} unknown); start again with --overwrite or another --out")


def check_frozen(saved: dict | None, current: dict | None, path: Path) -> None:
    """Refuse (UserError) to resume a lean state onto weights other than those it was trained from."""
    if saved is None:
        return
    if current is None:
        raise UserError(f"{path} holds only the tuned parameters of a --train difffit run; resume it with "
                        "--train difffit, or start again with --overwrite or another --out")
    if saved["sha256"] != current["sha256"] or saved["keys"] != current["keys"]:
        raise UserError(f"--resume: the frozen weights of --init {current['init']} differ from those the run "
                        f"started from (sha256 {current['sha256'][:12]}, was {saved['sha256'][:12]}): {path} holds "
                        "only the tuned parameters, so it continues only from the same init checkpoint. Put the "
                        "original back, or start again with --overwrite or another --out")


def load_resume_state(path: Path) -> dict:
    """The resume state at ``path`` with every tensor on the CPU (the caller moves what it needs).

    Read with ``weights_only=True``: a resume state holds only tensors and plain values, so a file that holds
    anything else (a pickled object whose loading would run code) is refused without running it.
    Raises UserError for such a file or a damaged one."""
    from .models.io import load_weights_only

    state = load_weights_only(path, "a resume state", map_location="cpu")
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if not missing and not (isinstance(state["config"], dict) and isinstance(state["step"], int)):
        missing = ["config", "step"]
    if missing:
        raise UserError(f"{path} is not a memdistill resume state (no {', '.join(missing)}); "
                        "start again with --overwrite or another --out")
    return state


def rng_state() -> dict:
    """The global generators' states as CPU uint8 tensors: torch's CPU generator, and every CUDA device's
    when CUDA is in use (their states are host tensors too, so a resume state loads on the CPU)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    """Put back what ``rng_state`` saved, each generator on its own device (the CPU state must stay a CPU
    tensor: torch.set_rng_state refuses any other). CUDA states are restored for the devices present."""
    torch.set_rng_state(rng["torch"].cpu())
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:torch.cuda.device_count()]])


def _memories_to(state: dict, device: torch.device) -> dict:
    # Memory entries live where the latents do (MemoryBank.load_state_dict puts their unit rows beside
    # them); the CPU bookkeeping (Gram matrix, row sums, slots) stays on the CPU.
    for kind in ("real", "gen"):
        for bank in state[kind].values():
            if bank.get("entries") is not None:
                bank["entries"] = bank["entries"].to(device)
    return state


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``: SIGINT for Ctrl-C, SIGTERM from kill, a scheduler's
    time limit or a container stop). A KeyboardInterrupt, so every caller treats both alike; the command line
    exits with 128 + ``signum``, as a process the signal ended would."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class _DeferInterrupt:
    """While active (single process, main thread): the first SIGINT (Ctrl-C) or SIGTERM only sets
    ``requested``, so the step in progress completes and the loop can save it; a second signal interrupts at
    once, as usual. ``interrupt()`` is the exception to raise for the signal received."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.signum = int(signal.SIGINT)
        self._previous = {}

    def interrupt(self) -> Interrupted:
        return Interrupted(self.signum)

    def _handler(self, signum, frame):
        if self.requested:
            raise Interrupted(signum)
        self.requested, self.signum = True, signum

    def __enter__(self):
        if self.active:
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            # None: the previous handler was not set from Python (the default is then the one to restore)
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
        return False


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model on the trainable parameters, as one fused foreach op."""
    pairs = [(pe, pm) for pe, pm in zip(ema.parameters(), model.parameters()) if pm.requires_grad]
    if pairs:
        torch._foreach_lerp_([pe for pe, _ in pairs], [pm.detach() for _, pm in pairs], 1.0 - decay)


_NO_STEP = 2**62  # "no non-finite loss yet" in the on-device record of the first one


def run_training(cfg: TrainConfig, out: str | Path, model: torch.nn.Module, data: TrainData,
                 resume: bool = False, overwrite: bool = False, export_extra: dict | None = None,
                 watch=None) -> Path:
    """Train ``model`` on ``data`` per ``cfg``; returns the export folder. ``model`` must already hold its
    starting weights and trainable flags.

    Raises UserError when the loss or the weights become non-finite (naming the step; nothing is exported and
    the resume state on disk stays the last finite one). On Ctrl-C (KeyboardInterrupt) the last completed
    step is saved as the resume state before the interrupt goes on (a first Ctrl-C lets the running step
    finish), so ``--resume`` continues from there.

    ``watch`` (fidelity.FidelityWatch or None) measures the EMA model's class fidelity on rank 0 every
    ``watch.every`` steps (when set) and once before the export; it never draws from the training's generators."""
    from .models.io import save_export

    # Recorded (config.json, resume state, manifest) as the folders used and the flipping the data were loaded with.
    cfg = dataclasses.replace(cfg.with_resolved_paths(), flip=data.flip)
    cfg.validate()
    out = Path(out)
    rank, world, device = dist_setup(cfg.device)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    n = len(data.targets)
    if n < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {n} training images")
    state_path, settings_checked = prepare_output(out, cfg, resume, overwrite, rank)
    if world > 1:
        dist.barrier()
    steps = total_steps(cfg, n)
    local = cfg.batch_size // world

    precision = (announce_precision if rank == 0 else resolve_precision)(cfg.precision, device)
    # Under DiffFit the resume state holds only what changes (the tuned parameters, their EMA, the optimiser,
    # the memories); the frozen weights come back from --init, whose content the record's hash pins down.
    # (--train all keeps whole states: its only frozen weight is the fixed positional table.)
    frozen = frozen_record(model, cfg.init) if cfg.train != "all" else None
    tuned = None if frozen is None else {n for n, p in model.named_parameters() if p.requires_grad}
    diffusion = GaussianDiffusion()
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    memories = None
    if cfg.memory != "none":
        from .memory import ClassMemories

        memories = ClassMemories(len(data.class_names), cfg.mem_real, cfg.mem_gen, cfg.memory)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start = 0
    if state_path is not None:
        # Loaded on the CPU, then each part goes where it lives: load_state_dict copies the weights onto the
        # model's device, AdamW moves its moments beside their parameters, the RNG states stay on the host.
        state = load_resume_state(state_path)
        check_resume(state, cfg, data, steps, state_path, settings_checked)
        check_frozen(state.get("frozen"), frozen, state_path)
        # ema is the model's copy taken before this load: its frozen entries are the init weights, as they
        # should be (ema_update touches only the trained parameters).
        load_weights(model, state["model"], state.get("frozen"), "model", state_path)
        load_weights(ema, state["ema"], state.get("frozen"), "EMA", state_path)
        opt.load_state_dict(state["opt"])
        if memories is not None:
            memories.load_state_dict(_memories_to(state["memories"], device))
        restore_rng(state["rng"])
        start = state["step"]
        log.info("resumed from step %d", start)
    if watch is not None and rank == 0:
        watch.start(start)  # a resumed run keeps the checks of the steps it keeps

    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", dataclasses.asdict(cfg))
        _trim_metrics(out / "metrics.jsonl", start)

    posterior = data.posterior.to(device)
    targets = data.targets.to(device)
    cond = torch.tensor(data.cond_labels, dtype=torch.long, device=device)

    def save_state(step: int) -> None:
        if rank != 0:
            return
        state = {"model": trainable_state(model, tuned), "ema": trainable_state(ema, tuned), "opt": opt.state_dict(),
                 "memories": memories.state_dict() if memories is not None else None,
                 "rng": rng_state(), "step": step, "config": dataclasses.asdict(cfg), "frozen": frozen,
                 "data": data.identity, "codec": data.codec_config}
        save_atomic(state, out / "checkpoints" / "last.pt")

    # The first step whose loss was not finite, recorded on the device every step and read only when the
    # loop syncs anyway (logging, checkpoints): no extra host sync per step.
    first_bad = torch.full((), _NO_STEP, dtype=torch.long, device=device)
    saved = start  # the step the resume state on disk holds

    def check_finite(done: int, weights: bool, collective: bool = True) -> None:
        """UserError if a loss so far, or (``weights``) a weight of the model or its EMA, is not finite.
        ``collective``: every rank calls it at this point (the verdict is shared, so all ranks stop together)."""
        flags = first_bad.clone()
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in (*model.parameters(), *ema.parameters())]).all()
            flags = torch.stack([flags, torch.where(finite, _NO_STEP, done)])
        if world > 1 and collective:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad = flags.min().item()
        if bad == _NO_STEP:
            return
        what = "the loss" if bad == flags.view(-1)[0].item() else "the weights"
        kept = (f"{out / 'checkpoints' / 'last.pt'} still holds step {saved}, the last finite state"
                if saved > 0 else "no resume state was saved")
        raise UserError(f"training diverged: {what} became non-finite (NaN or infinity) at step {bad}; nothing "
                        f"was exported and {kept}. Start again with a smaller --lr (now {cfg.lr:g}) or a "
                        "--grad-clip (with --overwrite or another --out)")

    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=steps, initial=start, desc=cfg.stage, disable=(rank != 0 or not cfg.progress), dynamic_ncols=True)
    model.train()
    completed, clean = start, True  # the model, EMA, optimiser and memories hold exactly `completed` steps
    # Under torchrun every rank gets Ctrl-C and they could stop at different steps: there the interrupt
    # is not deferred, and a step is saved only when the interrupt lands between steps.
    stop = _DeferInterrupt(active=world == 1)
    # step_time is the mean wall time per step since the previous log row, read after the log's host copy (a
    # device sync on CUDA, where a step's own clock would only time its kernel launches), checkpoints excluded.
    mark, mark_step = time.perf_counter(), start
    try:
        with stop:
            for step in range(start, steps):
                if stop.requested:
                    raise stop.interrupt()
                idx, t_all, noise_all, drop_all = step_draws(cfg, step, n, data.latent_shape, diffusion)
                # This step's flips and posterior samples: the memories' real entries are these very latents.
                x0_all = step_latents(posterior, cfg.seed, step, idx)
                t_all, noise_all, drop_all = t_all.to(device), noise_all.to(device), drop_all.to(device)
                mine = slice(rank * local, (rank + 1) * local)
                labels = targets[idx][mine]
                y = cond[labels]

                def model_fn(x, t, yy, _drop=drop_all[mine]):
                    with autocast(device, precision):  # bf16: the DiT alone; its output goes on in fp32
                        return net(x, t, yy, force_drop_ids=_drop).float()

                with matmul_precision(device, precision):
                    terms = diffusion.training_losses(model_fn, x0_all[mine], t_all[mine], y, noise_all[mine])
                loss = terms["loss"].mean()
                parts = {}
                done = step + 1
                clean = False  # from here on the step changes the memories, the weights and the EMA
                if memories is not None:
                    try:
                        with matmul_precision(device, "fp32"):  # memory losses and eviction: strict fp32
                            loss, parts = _add_memory_loss(loss, terms["pred_x0"], labels, x0_all[mine], t_all,
                                                           memories, cfg, rank, world, cond)
                    except NonFiniteEntry:  # a NaN prediction reached the adaptive memories' host check
                        first_bad = torch.minimum(first_bad, torch.full_like(first_bad, done))
                        check_finite(done, weights=False)
                first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad < _NO_STEP), first_bad,
                                        torch.full_like(first_bad, done))
                opt.zero_grad(set_to_none=True)
                with matmul_precision(device, precision):
                    loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                try:
                    opt.step()
                except RuntimeError as exc:  # lr x weight decay, or an update, beyond float32
                    if "overflow" not in str(exc):
                        raise
                    raise UserError(f"training diverged: the optimiser update overflows float32 at step {done} "
                                    f"(--lr {cfg.lr:g}, --weight-decay {cfg.weight_decay:g}); nothing was exported. "
                                    "Start again with a smaller --lr (with --overwrite or another --out)") from None
                ema_update(ema, model, cfg.ema_decay)
                completed, clean = done, True
                save_now = done % cfg.checkpoint_every == 0 or done == steps
                if (log_now := done % cfg.log_every == 0 or done == steps) or save_now:
                    check_finite(done, weights=save_now)  # nothing non-finite is logged, saved or exported
                if log_now:
                    # Under DDP each rank holds the diffusion terms of its own slice (and `loss` carries the
                    # world-scaled memory term): log the global batch's values, as one process would.
                    logged = torch.stack([terms[k].detach().mean() for k in ("loss", "mse", "vb")])
                    if world > 1:
                        dist.all_reduce(logged)
                        logged /= world
                    diff, mse, vb = logged.tolist()
                    dt = (time.perf_counter() - mark) / (done - mark_step)
                if metrics_file is not None and log_now:
                    # The memory terms stay on the device between log steps: read them only here.
                    parts = {k: v.item() if torch.is_tensor(v) else v for k, v in parts.items()}
                    row = {"step": done, "loss": diff + parts.get("memory", 0.0), "diffusion": diff, "mse": mse,
                           "vb": vb, **parts, "step_time": dt}
                    if memories is not None:
                        row["memory_sizes"] = memories.sizes()
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    bar.set_postfix(loss=f"{row['diffusion']:.4f}", refresh=False)
                if save_now:
                    save_state(done)
                    saved = done
                checked = watch is not None and watch.every and done % watch.every == 0 and done < steps
                if checked:
                    if rank == 0:
                        watch.check(done, ema, device)
                    if world > 1:
                        dist.barrier()
                if log_now or save_now or checked:  # a check's time is not a training step's
                    mark, mark_step = time.perf_counter(), done
                bar.update(1)
    except KeyboardInterrupt as interrupt:
        if clean and completed > saved and rank == 0:
            try:
                check_finite(completed, weights=True, collective=False)  # only rank 0 gets here
            except UserError as err:
                log.warning("interrupted; no resume state saved: %s", err)
                raise interrupt from None
            save_state(completed)
            saved = completed
        if rank == 0:
            log.warning("interrupted: %s holds step %d; continue with --resume", out / "checkpoints" / "last.pt", saved)
        raise
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    export = out / "export"
    fidelity = None
    if watch is not None and rank == 0:
        fidelity = watch.check(steps, ema, device, final=True)  # before save_export moves the EMA to the CPU
    if rank == 0:
        extra = {"stage": cfg.stage, "class_names": data.class_names, "cond_labels": data.cond_labels,
                 "labels": data.label_mapping,
                 "codec": data.codec_config, "image_shape": list(data.image_shape),
                 "latent_shape": list(data.latent_shape), "steps": steps, **(export_extra or {})}
        save_export(export, ema.cpu(), extra)
        write_manifest(out, cfg.stage, dataclasses.asdict(cfg), export="export", data=data.identity,
                       class_names=data.class_names, cond_labels=data.cond_labels, labels=data.label_mapping,
                       steps=steps, precision=precision,
                       **({"fidelity": {k: fidelity[k] for k in ("fidelity", "per_class", "images", "warning")}}
                          if fidelity else {}))
    if world > 1:
        dist.barrier()
    return export


def _add_memory_loss(loss, pred_x0, labels, x0, t_all, memories, cfg: TrainConfig, rank: int, world: int,
                     cond: torch.Tensor | None = None):
    """Memory terms on the global batch, then the memory update.

    Every rank sees all ranks' predictions, but only its own slice carries gradient; scaling the term by the
    world size makes the DDP-averaged gradient equal to the single-process gradient of the global batch.
    ``t_all`` holds the global batch's timesteps (for ``cfg.memory_max_t``). ``cond`` (K,) maps a label to
    the model's class index: the reference loop that ``cfg.repeat_loss_defect`` reproduces visits those.
    """
    from .losses import memory_loss

    if world > 1:
        n = len(labels)
        all_pred = gather_batch(pred_x0, world)
        all_pred = torch.cat([all_pred[: rank * n], pred_x0, all_pred[(rank + 1) * n:]])
        all_labels = gather_batch(labels, world)
        all_x0 = gather_batch(x0, world)
    else:
        all_pred, all_labels, all_x0 = pred_x0, labels, x0
    if cfg.memory_max_t is not None:
        keep = (t_all < cfg.memory_max_t).nonzero().view(-1)
        all_pred, all_labels, all_x0 = (x.index_select(0, keep) for x in (all_pred, all_labels, all_x0))
    visit = cond[all_labels] if cfg.repeat_loss_defect and cond is not None else None
    mem, parts = memory_loss(all_pred, all_labels, memories, cfg.lambda_real, cfg.lambda_gen,
                             repeat_defect=cfg.repeat_loss_defect, visit_labels=visit)
    memories.update(all_labels, all_x0.detach(), all_pred.detach())
    return loss + world * mem, {"memory": mem.detach(), **parts}  # tensors: read at log steps only


def _trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint; drop their old lines."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank, or the tail of a line a killed run did not finish writing
        # a line that is not one of the loop's rows (edited, or of another tool) says nothing about a step
        done = row.get("step") if isinstance(row, dict) else None
        if isinstance(done, int) and not isinstance(done, bool) and done <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
