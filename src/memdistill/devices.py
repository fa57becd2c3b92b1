"""Where the work runs: device names, and one process per device under torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N; a clear error for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    return device


def dist_setup(name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this initialises the process group (NCCL on
    CUDA, gloo on CPU) and puts each process on the GPU of its LOCAL_RANK; alone, it is just the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(name)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device
