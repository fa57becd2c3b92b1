"""Evaluation training throughput (images/s) of the protocol's training step: augmentation, CutMix,
forward, backward and SGD step, on random images, measured in one run.

    python benchmarks/bench_evaluate.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from memdistill.augment import TrainAugment, cutmix
from memdistill.nets import build_net


def throughput(net_name: str, channels: int, size: int, images: int, batch: int, device: str) -> float:
    torch.manual_seed(0)
    net = build_net(net_name, 10, channels, size).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = TrainAugment(size=size, flip=True, jitter=True, lighting=channels == 3)
    g = torch.Generator().manual_seed(0)
    x01 = torch.rand(batch, channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step():
        x = augment(x01, g)
        xm, target = cutmix(x, y, 10, 1.0, g)
        loss = F.cross_entropy(net(xm), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    steps = max(1, images // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="images per measurement (small nets)")
    p.add_argument("--images-224", type=int, default=128, help="images per measurement at 224 px")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"{platform.machine()}, torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}")
    for net, channels, size, n in [("convnet3", 1, 28, args.images), ("convnet3", 3, 32, args.images),
                                   ("resnetap10", 3, 224, args.images_224)]:
        print(f"{net:>11} {channels}x{size}x{size}: {throughput(net, channels, size, n, args.batch, args.device):8.1f} "
              "images/s")


if __name__ == "__main__":
    main()
