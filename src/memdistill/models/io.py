"""Loading and saving DiT weights: official layout, our exports, diffusers-format folders.

Everything is converted to the official facebookresearch key layout (see models/dit.py) on load.

Diffusers-format DiTs (DiTTransformer2DModel / Transformer2DModel with patches) hold the same
network with other names; two numerical details differ from the official model:
- diffusers' timestep projection uses downscale_freq_shift = 1 (frequencies exp(-ln(1e4) k / 127)),
  the official one 0 (k / 128). The official weights, which diffusers' DiT-XL-2-256 port was
  converted from, were trained with 0, so a converted model runs with 0 here: it reproduces the
  official model, not diffusers' forward bit for bit. diffusers' forward matches ours after setting
  `block.norm1.emb.time_proj.downscale_freq_shift = 0` on every block.
- diffusers' norm2 uses the config's norm_eps (default 1e-5); the official one 1e-6. We save with
  norm_eps = 1e-6; a folder with 1e-5 differs from ours by that eps only.
diffusers also keeps one timestep/label embedder per block (copies of the official shared one);
we take block 0's, which is also the one diffusers' final layer uses, and warn if the others differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch

from memdistill.errors import UserError
from memdistill.models.dit import DIT_CONFIGS, DiT, DiTConfig, dit_config

log = logging.getLogger(__name__)

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DIFFFIT_RE = re.compile(r"^blocks\.\d+\.difffit_(attn|mlp)$")
_ARCH_KEYS = tuple(DiTConfig.__dataclass_fields__)


# ----------------------------------------------------------------------------- diffusers <-> official


def _is_diffusers_sd(sd: dict) -> bool:
    return any(k.startswith("transformer_blocks.") for k in sd)


# Official key -> diffusers key. Both order their modulation chunks (shift, scale[, gate]...), so no rows
# are permuted. Embedder keys are relative to a block's "norm1.emb.": diffusers keeps a copy per block.
_GLOBAL_KEYS = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
_EMBEDDER_KEYS = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}
_BLOCK_KEYS = {  # per block and per "weight" / "bias"; attn.qkv is split into attn1.to_q/k/v
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}


def diffusers_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers DiT state dict -> official keys (pos_embed left out: it is recomputed)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    emb0 = "transformer_blocks.0.norm1.emb."
    out = {official: sd[diffusers] for official, diffusers in _GLOBAL_KEYS.items()}
    out.update({official: sd[emb0 + diffusers] for official, diffusers in _EMBEDDER_KEYS.items()})
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attn1.to_{n}.{kind}"] for n in "qkv"], dim=0)
            for official, diffusers in _BLOCK_KEYS.items():
                out[dst + f"{official}.{kind}"] = sd[src + f"{diffusers}.{kind}"]
        if i:
            for key in (k for k in sd if k.startswith(f"transformer_blocks.{i}.norm1.emb.")):
                ref = sd[key.replace(f"transformer_blocks.{i}.", "transformer_blocks.0.", 1)]
                if not torch.equal(sd[key], ref):
                    log.warning("diffusers block %d has its own %s; the official layout shares block 0's", i, key)
                    break
    return out


def official_to_diffusers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official keys (DiffFit already folded) -> a diffusers DiTTransformer2DModel state dict."""
    out = {diffusers: sd[official] for official, diffusers in _GLOBAL_KEYS.items()}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out.update({dst + "norm1.emb." + diffusers: sd[official] for official, diffusers in _EMBEDDER_KEYS.items()})
        for kind in ("weight", "bias"):
            q, k, v = sd[src + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[dst + f"attn1.to_q.{kind}"], out[dst + f"attn1.to_k.{kind}"], out[dst + f"attn1.to_v.{kind}"] = q, k, v
            for official, diffusers in _BLOCK_KEYS.items():
                out[dst + f"{diffusers}.{kind}"] = sd[src + f"{official}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def dit_kwargs_from_diffusers_config(cfg: dict) -> dict:
    """DiT constructor kwargs from a diffusers DiTTransformer2DModel config.json dict."""
    if cfg.get("patch_size") is None or cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise UserError("diffusers config is not a DiT: need patch_size set and norm_type 'ada_norm_zero'")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise UserError(f"diffusers DiT activation_fn must be 'gelu-approximate', got {cfg['activation_fn']!r}")
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim", 72))
    in_channels = int(cfg.get("in_channels", 4))
    out_channels = int(cfg.get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"diffusers DiT out_channels must be in_channels or twice it, got {out_channels}")
    return dict(
        input_size=int(cfg.get("sample_size", 32)),
        patch_size=int(cfg["patch_size"]),
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=int(cfg.get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=4.0,  # diffusers' FeedForward is fixed at 4x
        class_dropout_prob=0.1,  # diffusers always builds the null row
        num_classes=int(cfg.get("num_embeds_ada_norm", 1000)),
        learn_sigma=out_channels == 2 * in_channels,
    )


def _diffusers_config(model: DiT) -> dict:
    c = model.config
    if c.mlp_ratio != 4.0:
        raise UserError(f"diffusers DiT needs mlp_ratio 4.0, this model has {c.mlp_ratio}")
    return dict(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=model.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # the official norm2 eps
    )


# ----------------------------------------------------------------------------- reading


def fold_difffit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold DiffFit scales into the gate rows of adaLN_modulation (gamma * gate is linear in c).

    The result is a plain official state dict with the same function (up to float rounding).
    """
    out = {k: v for k, v in sd.items() if not _DIFFFIT_RE.match(k)}
    for key in sd:
        m = _DIFFFIT_RE.match(key)
        if not m:
            continue
        prefix = key.rsplit(".", 1)[0] + ".adaLN_modulation.1."
        gamma = sd[key]
        d = gamma.shape[0]
        rows = slice(2 * d, 3 * d) if m.group(1) == "attn" else slice(5 * d, 6 * d)  # gate_msa / gate_mlp
        w, b = out[prefix + "weight"].clone(), out[prefix + "bias"].clone()
        w[rows] *= gamma[:, None]
        b[rows] *= gamma
        out[prefix + "weight"], out[prefix + "bias"] = w, b
    return out


def _strip_prefixes(sd: dict) -> dict:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _allowing(globals_: list):
    """A context in which ``torch.load(weights_only=True)`` also accepts ``globals_``.

    ``torch.serialization.safe_globals`` exists from torch 2.5 on; older torch gets a context that allows
    nothing more, so a file needing these globals fails to load and ``load_weights_only`` says what to do."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    return scoped(globals_) if scoped is not None else contextlib.nullcontext()


def load_weights_only(path: Path, what: str, map_location="cpu", allow: tuple = ()) -> object:
    """``torch.load(path, weights_only=True)``: tensors, plain containers and values (plus the types in
    ``allow``), never code. ``what`` names the expected content in errors ("a torch checkpoint").

    Raises UserError for a file that holds other objects (naming the first one torch found), or that is not
    a readable torch file. The message never suggests weights_only=False: loading such a file runs code."""
    try:
        with _allowing(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found and found.group(1) == "argparse.Namespace" and not hasattr(torch.serialization, "safe_globals"):
            raise UserError(
                f"{path} is a training checkpoint with its arguments (an argparse.Namespace), which torch "
                f"{torch.__version__} cannot read safely; install torch>=2.5, or save the checkpoint's 'ema' entry "
                "alone as a bare state dict (torch.save(ckpt['ema'], 'dit.pt'))") from None
        if found:
            raise UserError(f"{path} is not {what}: besides tensors it holds a Python object ({found.group(1)}) "
                            "whose loading could run code, so it was not loaded. Use a file from a source you "
                            "trust that holds tensors only") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if "weights_only" in first:  # torch's advice to load it unsafely: not ours to give
            first = type(exc).__name__
        raise UserError(f"{path} is not {what} (damaged, truncated or another format: {first})") from None


def _torch_load(path: Path) -> dict:
    # Training checkpoints of the official train.py carry an argparse.Namespace: allow just that.
    obj = load_weights_only(path, "a torch checkpoint of DiT weights", allow=(argparse.Namespace,))
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    for key in ("ema", "model"):  # prefer EMA weights in a training checkpoint
        if isinstance(obj.get(key), dict):
            log.info("%s: using the %r weights of a training checkpoint", path, key)
            return obj[key]
    return obj


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (on the CPU); UserError for a damaged or truncated file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:
        raise UserError(f"{path} is damaged or truncated, not a readable .safetensors file ({exc}); "
                        "export, copy or download it again") from None


def _load_diffusers_weights(folder: Path) -> dict:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_safetensors(folder / shard))
        return sd
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).exists():
            return load_safetensors(folder / name) if name.endswith(".safetensors") else _torch_load(folder / name)
    raise UserError(f"{folder}: diffusers config found but none of {', '.join(DIFFUSERS_WEIGHTS)}")


def _resolve_folder(path: Path) -> Path:
    # A diffusers pipeline folder keeps the DiT under transformer/.
    if not (path / EXPORT_CONFIG).exists() and (path / "transformer" / EXPORT_CONFIG).exists():
        return path / "transformer"
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):  # valid JSON of another shape
        raise UserError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def load_state_dict_any(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights in the official key layout from an official .pt/.pth (bare or a training checkpoint:
    "ema" preferred over "model"), a .safetensors file, one of our export folders, or a
    diffusers-format DiT folder (converted; pos_embed is not included, being recomputed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights not found: {path}")
    if path.is_dir():
        path = _resolve_folder(path)
        if (path / EXPORT_WEIGHTS).exists():
            sd = load_safetensors(path / EXPORT_WEIGHTS)
        elif (path / EXPORT_CONFIG).exists() and _read_json(path / EXPORT_CONFIG).get("_class_name") in DIFFUSERS_CLASSES:
            sd = _load_diffusers_weights(path)
        else:
            raise UserError(
                f"{path}: not a DiT folder; expected {EXPORT_WEIGHTS} + {EXPORT_CONFIG} or a diffusers DiT "
                f"({EXPORT_CONFIG} with _class_name in {DIFFUSERS_CLASSES})"
            )
    elif path.suffix == ".safetensors":
        sd = load_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        sd = _torch_load(path)
    else:
        raise UserError(f"{path}: unknown weights format; use .pt/.pth/.bin/.ckpt, .safetensors or a folder")
    sd = _strip_prefixes(dict(sd))
    return diffusers_to_official(sd) if _is_diffusers_sd(sd) else sd


# ----------------------------------------------------------------------------- building


def infer_dit_kwargs(sd: dict[str, torch.Tensor], **arch) -> dict:
    """Constructor kwargs read from official-layout shapes; `arch` entries win over inferred ones."""
    if "x_embedder.proj.weight" not in sd:
        raise UserError("not a DiT state dict: missing 'x_embedder.proj.weight'")
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    kw: dict = dict(hidden_size=hidden, in_channels=in_ch, patch_size=patch)
    kw["depth"] = len({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    known_heads = {v["hidden_size"]: v["num_heads"] for v in DIT_CONFIGS.values()}
    kw["num_heads"] = known_heads.get(hidden, max(1, hidden // 64))
    if "blocks.0.mlp.fc1.weight" in sd:
        kw["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    if "final_layer.linear.weight" in sd:
        kw["learn_sigma"] = sd["final_layer.linear.weight"].shape[0] == 2 * patch * patch * in_ch
    if "pos_embed" in sd:
        kw["input_size"] = round(sd["pos_embed"].shape[1] ** 0.5) * patch
    if "y_embedder.embedding_table.weight" in sd:
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        if "num_classes" in arch:
            kw["class_dropout_prob"] = 0.0 if rows == arch["num_classes"] else 0.1
        elif arch.get("class_dropout_prob", 0.1) > 0:
            kw["num_classes"] = rows - 1
        else:
            kw["num_classes"] = rows
    kw.update(arch)
    return kw


def _check_arch(arch: dict, source: str = "") -> None:
    """UserError (naming ``source``, e.g. the config.json it came from) for an unknown DiT argument or one of
    the wrong type or range: integers (not booleans, not strings such as "8") at least 1, mlp_ratio a finite
    number > 0, class_dropout_prob in [0, 1), learn_sigma a boolean. A hand-edited or damaged config then
    ends in one line, not in a TypeError deep inside the model's constructor."""
    where = f"{source}: " if source else ""
    unknown = sorted(set(arch) - set(_ARCH_KEYS))
    if unknown:
        raise UserError(f"{where}unknown DiT argument {unknown[0]!r}; allowed: {', '.join(_ARCH_KEYS)}")
    for key, value in arch.items():
        kind = type(getattr(DiTConfig, key))  # the type of the field's default: int, float or bool
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is bool:
            ok, allowed = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, allowed = number and isinstance(value, int) and value >= 1, "an integer >= 1"
        elif key == "class_dropout_prob":
            ok, allowed = number and 0 <= value < 1, "a number in [0, 1)"
        else:
            ok, allowed = number and math.isfinite(value) and value > 0, "a finite number > 0"
        if not ok:
            raise UserError(f"{where}DiT argument {key!r} must be {allowed}, got {value!r:.40}")


def _model_entry(cfg: dict, source: Path) -> dict:
    """A copy of the "model" entry of an export's config.json (DiT arguments + "difffit"), its shape checked:
    an object, with "difffit" (when present) true or false. The arguments themselves: see _check_arch."""
    if not isinstance(cfg.get("model"), dict):
        raise UserError(f"{source}: no 'model' entry (an object) with the DiT architecture")
    kwargs = dict(cfg["model"])
    if not isinstance(kwargs.get("difffit", False), bool):
        raise UserError(f"{source}: 'difffit' in 'model' must be true or false, got {kwargs['difffit']!r:.40}")
    return kwargs


def _empty_model(kwargs: dict, difffit: bool) -> DiT:
    # Built on meta then materialised uninitialised: every tensor is filled by load_into, so the
    # (slow for XL) random init is skipped.
    with torch.device("meta"):
        model = DiT(**kwargs)
        if difffit:
            model.enable_difffit()
    return model.to_empty(device="cpu")


def load_into(model: DiT, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> DiT:
    """Strict load with one-line errors. pos_embed (fixed) and DiffFit scales may be absent:
    they are recomputed / set to identity. Every path that builds a DiT from weights ends here, so this is
    where weights holding NaN or infinity are refused (UserError naming the first such tensor): a model
    that diverged in training must not produce a set that looks like a result."""
    expected = model.state_dict()
    for key, value in sd.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{source}: the weights hold non-finite values (NaN or infinity) in {key!r}, e.g. from "
                            "a training run that diverged; this model cannot be used")
    for key in expected:
        if key not in sd and key != "pos_embed" and not _DIFFFIT_RE.match(key):
            raise UserError(f"{source}: missing key {key!r} for this DiT architecture")
    for key, value in sd.items():
        if key not in expected:
            raise UserError(f"{source}: unexpected key {key!r} for this DiT architecture")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{source}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            )
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        if "pos_embed" not in sd:
            model.reset_pos_embed()
        for key, param in model.named_parameters():
            if _DIFFFIT_RE.match(key) and key not in sd:
                param.fill_(1.0)
    return model


def load_dit(path: str | os.PathLike, **arch) -> DiT:
    """A DiT (eval mode) from any format `load_state_dict_any` reads.

    The architecture comes from config.json when the folder has one (ours or diffusers), else it is
    inferred from the tensor shapes (num_heads from the registry by hidden size); `arch` kwargs
    (DiT constructor names) override either. Nothing found at all -> DiT-XL/2 at 256 px.
    """
    _check_arch(arch)
    path = Path(path)
    sd = load_state_dict_any(path)
    folder = _resolve_folder(path) if path.is_dir() else None
    difffit = any(_DIFFFIT_RE.match(k) for k in sd)
    if folder is not None and (folder / EXPORT_CONFIG).exists():
        source = folder / EXPORT_CONFIG
        cfg = _read_json(source)
        if "model" in cfg:
            kwargs = _model_entry(cfg, source)
            difffit = kwargs.pop("difffit", False) or difffit
        else:
            try:
                kwargs = dit_kwargs_from_diffusers_config(cfg)
            except (TypeError, ValueError) as err:  # e.g. "num_layers": "x" or null
                raise UserError(f"{source}: not a readable diffusers DiT config ({err})") from None
        kwargs.update(arch)
    else:
        source = path
        kwargs = infer_dit_kwargs(sd, **arch)
    _check_arch(kwargs, str(source))
    model = _empty_model(kwargs, difffit)
    return load_into(model, sd, source=str(path)).eval()


# ----------------------------------------------------------------------------- writing


def _plain_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_official(path: str | os.PathLike, model: DiT) -> None:
    """A bare official-layout state dict (.pt); DiffFit scales are folded into the adaLN gates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fold_difffit(_plain_state_dict(model)), path)


def save_diffusers(folder: str | os.PathLike, model: DiT) -> None:
    """A diffusers-format DiTTransformer2DModel folder (config.json + safetensors) via save_pretrained.

    See the module docstring: diffusers runs it with timestep shift 1 unless told otherwise.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DiTTransformer2DModel

    sd = fold_difffit(_plain_state_dict(model))
    if not model.has_null_class:  # diffusers always has the null row; an unused zero row keeps shapes valid
        table = sd["y_embedder.embedding_table.weight"]
        sd["y_embedder.embedding_table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
    target = DiTTransformer2DModel(**_diffusers_config(model))
    target.load_state_dict(official_to_diffusers(sd, model.config.depth), strict=True)
    target.save_pretrained(str(folder), safe_serialization=True)


def save_export(folder: str | os.PathLike, model: DiT, config: dict) -> Path:
    """Write model.safetensors (official keys + DiffFit scales) and config.json =
    {"model": constructor kwargs + "difffit", **config}, atomically (tmp folder, then rename)."""
    from safetensors.torch import save_file

    if "model" in config:
        raise UserError("export config must not contain the key 'model' (it holds the architecture)")
    folder = Path(folder)
    text = json.dumps({"model": {**dit_config(model), "difffit": model.difffit_enabled}, **config}, indent=2)
    from ..manifest import remove_dead_partials

    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(folder)  # what a killed earlier export left behind
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        from ..manifest import disk_full_is_user_error

        with disk_full_is_user_error(folder):  # the finally below removes the tmp folder
            save_file(_plain_state_dict(model), str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
            (tmp / EXPORT_CONFIG).write_text(text + "\n")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_export(folder: str | os.PathLike) -> tuple[DiT, dict]:
    """(model in eval mode, the full config.json dict) from a save_export folder."""
    folder = Path(folder)
    if not (folder / EXPORT_WEIGHTS).is_file() or not (folder / EXPORT_CONFIG).is_file():
        raise UserError(f"{folder}: not an export folder (needs {EXPORT_WEIGHTS} and {EXPORT_CONFIG})")
    cfg = _read_json(folder / EXPORT_CONFIG)
    kwargs = _model_entry(cfg, folder / EXPORT_CONFIG)
    difffit = kwargs.pop("difffit", False)
    _check_arch(kwargs, str(folder / EXPORT_CONFIG))
    model = _empty_model(kwargs, difffit)
    return load_into(model, load_safetensors(folder / EXPORT_WEIGHTS), source=str(folder)).eval(), cfg
