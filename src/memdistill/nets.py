"""Classifiers for the evaluation protocol: ConvNet-D, ResNetAP-10 and ResNet-18.

All take (N, C, S, S) images and return (N, num_classes) logits. "instance" norm is GroupNorm with one
group per channel (affine), which is what the distillation literature calls instance norm: it keeps
per-sample statistics, so tiny distilled training sets do not depend on batch composition.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from memdistill.errors import UserError

NORMS = ("instance", "batch")
ALLOWED_NETS = "convnetD (any depth D >= 1, e.g. convnet3, ConvNet-6), ResNetAP-10, ResNet-18"
# At or above this size, images are ImageNet-like and get the 7x7/2 + maxpool stem.
LARGE_IMAGE = 128


def _pair_first(value) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


def feature_side(path: Iterable[nn.Module], side: int) -> int:
    """Side of the feature map that the layers of ``path`` (the main path, in order) leave of a side x side
    input, or 0 when that is not a valid map: the map vanishes, or a stride-s layer gets fewer than s px (it
    would then convolve mostly padding instead of down-sampling pixels). Convs and pools are read from the
    modules themselves, so every stride, kernel and padding is counted, the large-image stem included."""
    for layer in path:
        for m in layer.modules():
            if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                continue
            k, stride, pad = (_pair_first(getattr(m, a)) for a in ("kernel_size", "stride", "padding"))
            if side < stride:
                return 0
            side = (side + 2 * pad - k) // stride + 1
            if side < 1:
                return 0
    return side


def minimum_side(path: list[nn.Module], at_least: int = 1) -> int:
    """The smallest input side for which feature_side(path, side) >= at_least (it grows with the input side)."""
    high = 1
    while feature_side(path, high) < at_least:
        high *= 2
    low = high // 2  # invalid (or 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if feature_side(path, mid) >= at_least else (mid, high)
    return high


def _check_size(path: list[nn.Module], image_size: int, label: str, advice: str) -> int:
    """The final feature side, or a UserError naming the minimum image size of this net."""
    side = feature_side(path, image_size)
    if side < 1:
        raise UserError(f"{image_size} px is too small for {label}: its down-sampling needs images of at least "
                        f"{minimum_side(path)} px; {advice}")
    return side


class InstanceNorm(nn.GroupNorm):
    """Instance norm as GroupNorm with one channel per group, (N, C, H, W) -> same shape, computed in the
    NCHW layout whatever the input's layout: a channels-last input (the bf16 CPU path of evaluate, where the
    convolutions and pooling are faster in that layout) is normalised in NCHW and handed back channels-last,
    because torch's channels-last GroupNorm kernel on CPU was about 20x slower than its NCHW one in a profile of
    that training step (docs/benchmarks.md, "Using the CPU well"). Under torch.compile the plain GroupNorm is
    traced instead: the compiler fuses it in the tensor's own layout. The arithmetic, and the state_dict, are those
    of nn.GroupNorm."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # compiled, the plain GroupNorm is fused with the ReLU and pooling in the tensor's own layout: faster
            # than the NCHW detour (benchmarks/bench_cpu.py, "input conv and norm")
            return super().forward(x)
        return self.forward_nchw(x)

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """The eager path: a channels-last input is normalised in NCHW and handed back channels-last."""
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class InputConv(nn.Conv2d):
    """The 3x3 convolution (stride 1, padding 1) that reads a network's input images, (N, C, H, W) ->
    (N, out_channels, H, W): an nn.Conv2d (same parameters, state_dict and arithmetic) that, for one-channel
    images on a CPU under bf16 autocast and torch.compile (evaluate's --precision bf16 --compile), computes the
    same sum as an explicit im2col of the 9 shifted copies of the image and one matrix product with the (out, 9)
    weights. oneDNN's convolution kernel for a single input channel was the slowest part of that training step
    on 28 px digits (forward, weight gradient and a layout copy of its output gradient: about a quarter of the
    step); as a matrix product it costs what its few multiply-adds do. The output is channels-last in memory,
    the layout evaluate's bf16 path trains in. Eager, the matrix product was slower than oneDNN's kernel, and with
    3 channels oneDNN was faster than it: every other case is nn.Conv2d's (docs/benchmarks.md, "The input conv
    and the norm, compiled")."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and x.dim() == 4 and x.shape[1] == 1 and x.device.type == "cpu"
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return super().forward(x)
        n, _, h, w = x.shape
        padded = nn.functional.pad(x.reshape(n, h, w), (1, 1, 1, 1))  # (N, H+2, W+2)
        # column k = 3 * dy + dx: the order of the weight's flattened (1, 3, 3) kernel
        cols = torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], dim=-1)
        out = nn.functional.linear(cols.reshape(n * h * w, 9), self.weight.flatten(1), self.bias)  # (N*H*W, out)
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)  # (N, out, H, W), channels-last in memory


def make_norm(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return InstanceNorm(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise UserError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


class ConvNet(nn.Module):
    """depth x [conv3x3 width, norm, ReLU, avgpool 2], then a linear layer on the flattened map."""

    def __init__(self, depth: int, num_classes: int, channels: int, image_size: int, norm: str,
                 width: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for d in range(depth):
            conv = InputConv(c_in, width) if d == 0 else nn.Conv2d(c_in, width, 3, padding=1)
            layers += [conv, make_norm(norm, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*layers)
        side = _check_size([self.features], image_size, f"ConvNet-{depth}",
                           "use a shallower ConvNet or larger images (--image-size)")
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (N, classes)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual. avgpool_down: down-sample by conv(stride 1) + avgpool 2 (ResNetAP)
    instead of a strided conv, which keeps every input pixel in play on tiny images."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, avgpool_down: bool):
        super().__init__()
        if stride == 1:
            self.conv1 = _conv3x3(c_in, c_out)
        elif avgpool_down:
            self.conv1 = nn.Sequential(_conv3x3(c_in, c_out), nn.AvgPool2d(2))
        else:
            self.conv1 = _conv3x3(c_in, c_out, stride)
        self.norm1 = make_norm(norm, c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.norm2 = make_norm(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif avgpool_down:
            pool = [nn.AvgPool2d(2)] if stride != 1 else []
            self.shortcut = nn.Sequential(*pool, nn.Conv2d(c_in, c_out, 1, bias=False), make_norm(norm, c_out))
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          make_norm(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Four stages of BasicBlocks, widths 64-512, global average pool, linear head."""

    def __init__(self, blocks: list[int], num_classes: int, channels: int, image_size: int, norm: str,
                 avgpool_down: bool, label: str):
        super().__init__()
        if image_size >= LARGE_IMAGE:
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False),
                                      make_norm(norm, 64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            # Small images (MNIST, CIFAR): keep the resolution, a 7x7/2 stem would throw most of it away.
            self.stem = nn.Sequential(InputConv(channels, 64, bias=False), make_norm(norm, 64), nn.ReLU(inplace=True))
        stages: list[BasicBlock] = []
        c_in = 64
        for i, (n_blocks, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            for b in range(n_blocks):
                stages.append(BasicBlock(c_in, width, stride if b == 0 else 1, norm, avgpool_down))
                c_in = width
        self.stages = nn.Sequential(*stages)
        # The main path only: each shortcut down-samples in step with its block's conv1.
        path = [self.stem, *(m for blk in stages for m in (blk.conv1, blk.conv2))]
        self.feature_side = _check_size(path, image_size, label, "use larger images (--image-size) or a ConvNet")
        if norm == "instance" and self.feature_side < 2:
            # instance norm of a 1x1 map subtracts its only value: every feature becomes the norm's bias and the
            # net outputs one constant for every image (chance accuracy, silently)
            raise UserError(f"{image_size} px is too small for {label} with instance norm: its last stage would "
                            f"normalise 1x1 maps, which erases every feature; use --norm batch, images of at least "
                            f"{minimum_side(path, at_least=2)} px (--image-size) or a ConvNet")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))  # (N, 512, s, s)
        return self.classifier(self.pool(h).flatten(1))  # (N, classes)


def build_net(name: str, num_classes: int, channels: int, image_size: int, norm: str = "instance") -> nn.Module:
    """Build a classifier by name (case-insensitive; '-' and '_' ignored): convnetD, resnetap10, resnet18."""
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
    if num_classes < 1 or channels < 1 or image_size < 1:
        raise UserError(f"num_classes, channels and image_size must be >= 1, got "
                        f"{num_classes}, {channels}, {image_size}")
    key = name.lower().replace("-", "").replace("_", "")
    match = re.fullmatch(r"convnet(\d+)", key)
    if match and int(match.group(1)) >= 1:
        return ConvNet(int(match.group(1)), num_classes, channels, image_size, norm)
    if key == "resnetap10":
        return ResNet([1, 1, 1, 1], num_classes, channels, image_size, norm, avgpool_down=True,
                      label="ResNetAP-10")
    if key == "resnet18":
        return ResNet([2, 2, 2, 2], num_classes, channels, image_size, norm, avgpool_down=False,
                      label="ResNet-18")
    raise UserError(f"unknown net {name!r}; allowed: {ALLOWED_NETS}")
