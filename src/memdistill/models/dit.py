"""Class-conditional latent diffusion transformer (DiT, Peebles & Xie 2023).

Written from the paper's description. Module names and state-dict keys follow the official
facebookresearch release so that its checkpoints (e.g. DiT-XL-2-256x256.pt, a bare state dict)
load as they are:

    x_embedder.proj            Conv2d patch embedding
    t_embedder.mlp.{0,2}       timestep MLP on a 256-d sinusoidal embedding
    y_embedder.embedding_table class table, one extra "null" row when class dropout is on
    pos_embed                  fixed 2-D sin-cos table (in the state dict, never trained)
    blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,adaLN_modulation.1}
    final_layer.{norm_final,linear,adaLN_modulation.1}

DiffFit (Xie et al. 2023) adds per-channel scales on the residual branches of the first half of
the blocks (`blocks.{i}.difffit_attn`, `blocks.{i}.difffit_mlp`), identity at initialisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memdistill.errors import UserError

FREQ_EMBED_DIM = 256
MAX_PERIOD = 10000.0


@dataclass
class DiTConfig:
    """Constructor arguments of `DiT`; defaults are DiT-XL/2 at 256 px (32x32x4 latents)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """(N,) float timesteps -> (N, dim) = [cos(t f), sin(t f)], f_k = max_period^(-k / (dim/2)).

    Cos half first, and the exponent divides by dim/2 (diffusers' "downscale_freq_shift = 0"):
    this is what the official weights were trained with.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) = [sin(pos w), cos(pos w)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """(grid_size^2, dim) fixed position table, tokens in row-major order.

    First half of the channels encodes the column (x) coordinate, second half the row (y)
    coordinate, as in the MAE/DiT tables; computed in float64 like the reference numpy code.
    """
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb_x = _sincos_1d(dim // 2, cols.reshape(-1))
    emb_y = _sincos_1d(dim // 2, rows.reshape(-1))
    return torch.cat([emb_x, emb_y], dim=1)  # (G*G, dim)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with non-overlapping p x p patches."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_dim: int = FREQ_EMBED_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class table; with dropout > 0 it holds one extra row, the null class (index num_classes)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(
        self,
        labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        drop = None
        if force_drop_ids is not None:
            drop = force_drop_ids.to(labels.device) == 1
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        if drop is not None:
            if self.embedding_table.num_embeddings <= self.num_classes:
                raise UserError("label dropout needs a null class row: build the DiT with class_dropout_prob > 0")
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (N, D)


# ----------------------------------------------------------------------------- blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, heads, T, d_head) each
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * branch(modulate(norm(x), shift, scale)), for attention then MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        # DiffFit scales: None until enable_difffit() registers them as parameters.
        self.register_parameter("difffit_attn", None)
        self.register_parameter("difffit_mlp", None)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # (N, D) each
        if self.difffit_attn is not None:
            gate_a = gate_a * self.difffit_attn
            gate_m = gate_m * self.difffit_mlp
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


# ----------------------------------------------------------------------------- model


class DiT(nn.Module):
    """forward(x (N, C, H, W), t (N,), y (N,)) -> (N, out_channels, H, W).

    out_channels = 2 * in_channels with learned sigma: eps first, then the variance interpolation values.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % 4:
            raise UserError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos table, got {hidden_size}")
        self.config = DiTConfig(
            int(input_size), int(patch_size), int(in_channels), int(hidden_size), int(depth), int(num_heads),
            float(mlp_ratio), float(class_dropout_prob), int(num_classes), bool(learn_sigma),
        )
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A parameter (not a buffer) only because the official state dicts carry it under this name.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # -- construction helpers

    @property
    def null_label(self) -> int:
        """Class index used for the unconditional branch of classifier-free guidance."""
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        return self.y_embedder.embedding_table.num_embeddings > self.num_classes

    @property
    def difffit_enabled(self) -> bool:
        return self.blocks[0].difffit_attn is not None if len(self.blocks) else False

    @torch.no_grad()
    def reset_pos_embed(self) -> None:
        table = sincos_pos_embed_2d(self.config.hidden_size, self.grid_size, device=self.pos_embed.device)
        self.pos_embed.copy_(table.float().unsqueeze(0))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Paper init: xavier linears, zero biases, N(0, 0.02) label table and timestep MLP,
        zeroed adaLN modulation and final linear, so a fresh model outputs exactly zeros."""

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        self.reset_pos_embed()
        # Patch embedding initialised like a linear layer on the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def enable_difffit(self) -> None:
        """Add DiffFit scales (ones) on both residual branches of blocks[:depth // 2]; idempotent."""
        if self.difffit_enabled:
            return
        ref = self.pos_embed
        for block in self.blocks[: len(self.blocks) // 2]:
            block.difffit_attn = nn.Parameter(torch.ones(self.config.hidden_size, device=ref.device, dtype=ref.dtype))
            block.difffit_mlp = nn.Parameter(torch.ones(self.config.hidden_size, device=ref.device, dtype=ref.dtype))

    # -- forward

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); the token vector is laid out (p_row, p_col, C)."""
        n, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(n, g, g, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, G, p, G, p)
        return x.reshape(n, c, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W).

        In training mode labels are replaced by the null class with probability class_dropout_prob
        (drawn from `generator`, or the global RNG); `force_drop_ids` (N,), 1 = drop, overrides that.
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids, generator)  # (N, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


# ----------------------------------------------------------------------------- registry

# name -> (depth, hidden_size, num_heads); the patch size is the number after the slash.
_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}
_CPU_SIZES = {"Mini": (6, 256, 4), "Tiny": (6, 128, 4), "Micro": (2, 64, 2)}

DIT_CONFIGS: dict[str, dict] = {
    **{
        f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=nh, patch_size=p)
        for size, (d, h, nh) in _SIZES.items()
        for p in (2, 4, 8)
    },
    **{
        f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=nh, patch_size=p)
        for size, (d, h, nh) in _CPU_SIZES.items()
        for p in (2, 4)
    },
}


def check_model_name(name: str) -> None:
    """Raise UserError unless ``name`` is a DiT size of DIT_CONFIGS (e.g. DiT-XL/2)."""
    if name not in DIT_CONFIGS:
        raise UserError(f"unknown DiT model {name!r}; choose one of: {', '.join(DIT_CONFIGS)}")


def build_dit(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
) -> DiT:
    """A fresh DiT of a registered size, e.g. build_dit("DiT-XL/2", 32, 4, 1000)."""
    check_model_name(name)
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        **DIT_CONFIGS[name],
    )


def dit_config(model: DiT) -> dict:
    """JSON-serialisable constructor kwargs: DiT(**dit_config(model)) rebuilds the architecture."""
    return asdict(model.config)


# ----------------------------------------------------------------------------- trainable sets

TRAIN_MODES = ("difffit", "all")


def trainable_parameter_names(model: DiT, mode: str) -> list[str]:
    """Names of the parameters that `mode` trains. pos_embed is never trained.

    "difffit": all biases, the label table and the DiffFit scales (DiffFit must be enabled);
    "all": every parameter but pos_embed.
    """
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown trainable mode {mode!r}; choose one of: {', '.join(TRAIN_MODES)}")
    names = []
    for name, _ in model.named_parameters():
        if name == "pos_embed":
            continue
        if mode == "all" or (
            name.endswith(".bias")
            or name == "y_embedder.embedding_table.weight"
            or name.endswith(".difffit_attn")
            or name.endswith(".difffit_mlp")
        ):
            names.append(name)
    return names


def set_trainable(model: DiT, mode: str) -> int:
    """Set requires_grad per `mode` (enabling DiffFit scales first for "difffit"); returns the trainable count.

    Call before building the optimiser: enabling DiffFit adds parameters.
    """
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown trainable mode {mode!r}; choose one of: {', '.join(TRAIN_MODES)}")
    if mode == "difffit":
        model.enable_difffit()
    keep = set(trainable_parameter_names(model, mode))
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
        count += param.numel() if name in keep else 0
    return count


# ----------------------------------------------------------------------------- guidance


def guided(model: DiT, scale: float, guided_channels: int | None = None) -> Callable:
    """Classifier-free guidance as a model wrapper: (x, t, y) -> output of the model's shape.

    One batched forward on [x; x] with labels [y; null]. The first `guided_channels` eps channels
    get uncond + scale * (cond - uncond) (None = all eps channels; the official sampler guides 3 of
    4); every other channel, including the learned-variance ones, comes from the conditional half.
    Use the model in eval mode (training mode would also drop labels at random).
    """
    if scale == 1:
        return lambda x, t, y: model(x, t, y)
    if not model.has_null_class:
        raise UserError("classifier-free guidance needs a null class: the model was built with class_dropout_prob = 0")
    n_eps = model.in_channels
    k = n_eps if guided_channels is None else int(guided_channels)
    if not 0 < k <= n_eps:
        raise UserError(f"--guided-channels must be between 1 and {n_eps} (the model's latent channels), "
                        f"got {guided_channels}")

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if t.ndim == 0:
            t = t.expand(n)
        null = torch.full_like(y, model.null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C_out, H, W)
        cond, uncond = out[:n], out[n:]
        mixed = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([mixed, cond[:, k:]], dim=1)

    return forward
