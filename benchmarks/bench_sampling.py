"""Sampling throughput: batched (ours) vs one image at a time (as the reference code samples).

    PYTHONPATH=src python benchmarks/bench_sampling.py [--images 100] [--batch 100] [--reference-images 20]
                                                       [--steps 50] [--cfg-scale 4] [--threads 2]

Same model, steps, guidance and per-image seeds for both; the one-at-a-time images are also compared with
their batched twins. Model: the shipped mnist5k export when present, else a freshly built DiT-Tiny/4 on
1x28x28 with 10 classes (weights perturbed so outputs are not all zero). Machines are shared and noisy:
read the ratio, measured in this one run. On a busy CPU, --threads 2 makes single-image forwards wait on
thread synchronisation (the ratio then mostly measures that); --threads 1 isolates the batching gain.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from memdistill.codec import PixelCodec
from memdistill.devices import resolve_device
from memdistill.imageset import to_uint8
from memdistill.models.dit import build_dit
from memdistill.pretrained import shipped_path
from memdistill.sample import SampleConfig, Sampler, load_sampler


def fresh_sampler(device: torch.device) -> Sampler:
    model = build_dit("DiT-Tiny/4", input_size=28, in_channels=1, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    names = [str(c) for c in range(10)]
    return Sampler(model.to(device), PixelCodec(), names, list(range(10)), (1, 28, 28), (1, 28, 28), device,
                   {"model": "fresh DiT-Tiny/4"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100, help="images sampled batched")
    ap.add_argument("--batch", type=int, default=None, help="batch size of the batched run (default: --images)")
    ap.add_argument("--reference-images", type=int, default=20,
                    help="images sampled one at a time (the slow reference path; throughput is per image)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    cfg = SampleConfig(steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler, device=args.device)
    device = resolve_device(args.device)
    if (shipped_path("mnist5k") / "model.safetensors").is_file():
        sampler, which = load_sampler(cfg, device), "shipped mnist5k export"
    else:
        sampler, which = fresh_sampler(device), "fresh DiT-Tiny/4 on 1x28x28, 10 classes (no shipped mnist5k export)"
    k = len(sampler.class_names)
    jobs = [(j % k, j // k) for j in range(args.images)]  # round-robin over classes
    batch = args.batch or args.images
    n_ref = min(args.reference_images, args.images)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    sampler.images(cfg, jobs[:2])  # warm-up (allocator, kernels)
    batched, t_batched = timed(lambda: torch.cat([sampler.images(cfg, jobs[s:s + batch])
                                                  for s in range(0, len(jobs), batch)]))
    single, t_single = timed(lambda: torch.cat([sampler.images(cfg, [job]) for job in jobs[:n_ref]]))

    fast, slow = args.images / t_batched, n_ref / t_single
    diff = (to_uint8(batched[:n_ref]).int() - to_uint8(single).int()).abs()
    print(f"model: {which}; {sum(p.numel() for p in sampler.model.parameters()) / 1e6:.2f} M parameters")
    print(f"steps {args.steps} ({args.sampler}), cfg scale {args.cfg_scale}, {device}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"batched (batch {batch}):   {args.images:5d} images in {t_batched:7.2f} s = {fast:8.2f} images/s")
    print(f"one at a time:        {n_ref:5d} images in {t_single:7.2f} s = {slow:8.2f} images/s")
    print(f"speed-up batched / one at a time: {fast / slow:.1f}x")
    print(f"same images: max |uint8 difference| {int(diff.max())}, "
          f"{float((diff == 0).float().mean()) * 100:.2f}% of pixels identical")


if __name__ == "__main__":
    main()
