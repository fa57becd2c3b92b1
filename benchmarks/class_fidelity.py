"""Class fidelity of a class-conditional DiT on mnist5k: the share of its samples that a classifier trained
on the real mnist5k train split labels as their conditioning class.

    python benchmarks/class_fidelity.py --model mnist5k --per-class 100 --grid docs/mnist5k_samples.png

--model takes a shipped name, a run folder, an export folder, or a resume state (checkpoints/last.pt, its EMA).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memdistill.data import load_tensors, open_dataset
from memdistill.diffusion import GaussianDiffusion, image_generator
from memdistill.models.dit import build_dit, guided
from memdistill.models.io import load_dit
from memdistill.nets import build_net
from memdistill.pretrained import resolve_model
from memdistill.reports import image_grid
from memdistill.train import load_resume_state


def load_model(spec: str):
    raw = spec.endswith(":raw")  # the raw (non-EMA) weights of a resume state, to debug a young run
    spec = spec.removesuffix(":raw")
    path = Path(spec)
    if path.suffix == ".pt" and path.is_file():  # an in-progress run: take the EMA of its resume state
        state = load_resume_state(path)  # tensors and plain values only (weights_only=True)
        cfg = state["config"]
        model = build_dit(cfg["model"], input_size=cfg["resolution"] or 28, in_channels=1, num_classes=10)
        model.load_state_dict(state["model" if raw else "ema"])
        return model.eval(), f"{spec} (step {state['step']})"
    return load_dit(resolve_model(spec)).eval(), spec


def train_classifier(size: int, seed: int = 0, epochs: int = 8):
    """ConvNet-3 on the real train split, plain Adam, no augmentation: a judge, not a benchmark."""
    torch.manual_seed(seed)
    x, y = load_tensors(open_dataset("mnist5k", "train", resolution=size))
    tx, ty = load_tensors(open_dataset("mnist5k", "test", resolution=size))
    net = build_net("convnet3", 10, 1, size)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(tx).argmax(1) == ty).float().mean().item() * 100
    return net, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist5k")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write a PNG grid of the first 10 samples per class here")
    args = p.parse_args()
    torch.set_flush_denormal(True)

    model, name = load_model(args.model)
    size = model.config.input_size
    judge, judge_acc = train_classifier(size)
    diffusion = GaussianDiffusion()
    t0 = time.perf_counter()
    jobs = [(c, i) for c in range(10) for i in range(args.per_class)]
    labels = torch.tensor([c for c, _ in jobs])
    fn = guided(model, args.cfg_scale)
    samples = []
    for start in range(0, len(jobs), 250):
        part = jobs[start:start + 250]
        gens = [image_generator(args.seed, c, i) for c, i in part]
        samples.append(diffusion.sample(fn, (1, size, size), labels[start:start + 250], gens, steps=args.steps,
                                        clip_x0=True))
    x = torch.cat(samples).clamp(-1, 1)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        pred = judge(x).argmax(1)
    fidelity = (pred == labels).float().mean().item() * 100
    per_class = [(pred[labels == c] == c).float().mean().item() * 100 for c in range(10)]
    print(f"model: {name}")
    print(f"judge: ConvNet-3 trained on mnist5k train at {size} px, {judge_acc:.1f}% on the mnist5k test split")
    print(f"samples: {len(x)} ({args.per_class} per class), guidance {args.cfg_scale}, {args.steps} DDPM steps, "
          f"{elapsed:.0f} s")
    print(f"class fidelity: {fidelity:.1f}%  per class: " + " ".join(f"{v:.0f}" for v in per_class))
    if args.grid:
        rows = [list(x[labels == c][:10]) for c in range(10)]
        image_grid(rows, min_cell=28).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
