"""The paper-scale path with full-size stand-ins: the README's ImageWoof commands, timed stage by stage.

Builds, in a temporary folder:
- a randomly initialised DiT-XL/2 saved as a bare official ``.pt`` (what DiT-XL-2-256x256.pt is),
- a randomly initialised AutoencoderKL with the sd-vae-ft-ema configuration, saved with ``save_pretrained``,
- ImageNet-layout folders (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) of noise JPEGs of ImageNet-like
  sizes for the ten ImageWoof wnids,
then runs the README's paper-scale commands with tiny budgets (fine-tune with a latent cache, interrupted and
resumed; sample; evaluate ResNetAP-10 at 224 px) and prints per stage: wall time, step time or images/s, peak
CPU memory (RSS) and, on CUDA, ``torch.cuda.max_memory_allocated``, the resume checkpoint's size, and the
fine-tuning step time in each ``--precision``.

    python benchmarks/paper_scale.py                         # full size; CUDA when available
    python benchmarks/paper_scale.py --model DiT-S/2 --vae tiny --images 2 --steps 2   # a quick CPU check

Every stage runs in a child process (this script with ``--stage``) so that peak memory is per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The sd-vae-ft-ema / sd-vae-ft-mse architecture (their config.json), and a tiny one for quick checks.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(SD_VAE, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 16, 16, 16))
# Width x height of the stand-in JPEGs: typical ImageNet shapes.
SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (333, 500))


def build_stand_ins(root: Path, model: str, vae: str, images: int, val_images: int) -> dict[str, Path]:
    """The DiT .pt, the VAE folder and the train / val image trees under ``root``."""
    import numpy as np
    import torch
    from PIL import Image

    from memdistill.data import resolve_classes
    from memdistill.models.dit import build_dit
    from memdistill.models.io import save_official

    torch.manual_seed(0)
    dit = build_dit(model, input_size=32, in_channels=4, num_classes=1000)
    save_official(root / "DiT-256x256.pt", dit)
    del dit
    from diffusers import AutoencoderKL

    AutoencoderKL(**(SD_VAE if vae == "sd" else TINY_VAE)).save_pretrained(root / "sd-vae")
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", val_images)):
        for c, wnid in enumerate(resolve_classes("imagewoof", None)):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = SIZES[(c + i) % len(SIZES)]
                # Smooth noise (blocky, then upsampled by JPEG decoding) compresses like a photo, unlike white noise.
                small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
                Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return {"init": root / "DiT-256x256.pt", "vae": root / "sd-vae", "train": root / "imagenet" / "train",
            "val": root / "imagenet" / "val"}


def run_stage(name: str, args: list[str], work: Path) -> dict:
    """Run ``memdistill <args>`` in a child process; its wall time and peak memory."""
    report = work / f"stage-{name}.json"
    print("$ memdistill " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--stage", str(report), "--", *args], capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"stage {name} failed ({proc.returncode}): memdistill {' '.join(args)}\n{proc.stderr[-4000:]}")
    return {"stage": name, "wall_s": wall, **json.loads(report.read_text())}


def _stage_main(report: str, args: list[str]) -> None:
    import torch

    from memdistill.cli import main

    code = main(args)
    peak = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is in KiB
    if torch.cuda.is_available():
        peak["cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    Path(report).write_text(json.dumps(peak))
    sys.exit(code)


def step_times(run: Path) -> list[float]:
    """Per-step wall times of a fine-tuning run (metrics.jsonl, logged every step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step_time"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="DiT-XL/2", help="DiT size of the stand-in (default: DiT-XL/2)")
    parser.add_argument("--vae", choices=("sd", "tiny"), default="sd", help="stand-in VAE architecture (default: sd)")
    parser.add_argument("--images", type=int, default=6, help="train images per class (default: 6)")
    parser.add_argument("--val-images", type=int, default=2, help="val images per class (default: 2)")
    parser.add_argument("--steps", type=int, default=4, help="fine-tuning steps; interrupted after half (default: 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch (default: 8, the paper's)")
    parser.add_argument("--sample-steps", type=int, default=10, help="sampling steps (default: 10)")
    parser.add_argument("--precisions", default="fp32,tf32,bf16",
                        help="fine-tuning precisions to time side by side (default: fp32,tf32,bf16)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--workdir", default=None, help="keep the stand-ins and runs here (default: a temp folder)")
    args, rest = parser.parse_known_args()
    if args.stage:
        _stage_main(args.stage, rest[1:] if rest[:1] == ["--"] else rest)
        return

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="paper-scale-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"device {device} (GPU: {gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"stand-ins: {args.model} (random, bare .pt), {args.vae} VAE (random), imagewoof wnids, "
          f"{args.images} train + {args.val_images} val JPEGs per class")

    t0 = time.perf_counter()
    paths = build_stand_ins(work / "stand", args.model, args.vae, args.images, args.val_images)
    rows = [{"stage": "build stand-ins", "wall_s": time.perf_counter() - t0}]
    run = work / "runs" / "woof-adaptive"
    common = ["finetune", "--data", str(paths["train"]), "--subset", "imagewoof", "--resolution", "256",
              "--codec", "vae", "--vae", str(paths["vae"]), "--init", str(paths["init"]),
              "--batch-size", str(args.batch_size), "--ema-decay", "0.9999", "--latent-cache",
              str(work / "latents"), "--log-every", "1", "--checkpoint-every", "1", "--device", device,
              "--no-progress"]
    half = max(1, args.steps // 2)
    rows.append(run_stage("finetune (encode + first half)", [*common, "--steps", str(half), "--out", str(run)], work))
    rows.append(run_stage("finetune --resume (cache hit)", [*common, "--steps", str(args.steps), "--out", str(run),
                                                             "--resume"], work))
    times = step_times(run)
    rows[-1]["step_s"] = statistics.median(times[1:] if len(times) > 1 else times)
    rows[-1]["checkpoint_mb"] = (run / "checkpoints" / "last.pt").stat().st_size / 2**20

    sample = work / "runs" / "woof-ipc1"
    rows.append(run_stage("sample", ["sample", "--model", str(run), "--vae", str(paths["vae"]), "--ipc", "1",
                                     "--steps", str(args.sample_steps), "--device", device, "--out", str(sample)],
                          work))
    rows[-1]["images_per_s"] = 10 / rows[-1]["wall_s"]
    rows.append(run_stage("evaluate", ["evaluate", "--train", str(sample), "--test", str(paths["val"]), "--subset",
                                       "imagewoof", "--net", "resnetap10", "--image-size", "224", "--repeats", "1",
                                       "--epochs", "2", "--device", device, "--out", str(work / "runs" / "eval")],
                          work))

    precision_rows = []
    for precision in [p for p in args.precisions.split(",") if p]:
        out = work / "runs" / f"precision-{precision}"
        row = run_stage(f"finetune --precision {precision}", [*common, "--steps", str(max(2, half)), "--precision",
                                                               precision, "--out", str(out)], work)
        times = step_times(out)
        row["step_s"] = statistics.median(times[1:])
        ran = json.loads((out / "manifest.json").read_text())["precision"]  # tf32 is fp32 off CUDA
        if ran != precision:
            row["stage"] += f" (ran {ran})"
        precision_rows.append(row)

    print()
    print("| stage | wall s | step s | images/s | peak RSS GB | peak CUDA GB | checkpoint MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows + precision_rows:
        cells = [r["stage"], f"{r['wall_s']:.1f}"] + [
            f"{r[k]:{fmt}}" if k in r else "" for k, fmt in (("step_s", ".3f"), ("images_per_s", ".2f"),
                                                             ("rss_gb", ".2f"), ("cuda_gb", ".2f"),
                                                             ("checkpoint_mb", ".1f"))]
        print("| " + " | ".join(cells) + " |")
    if precision_rows:
        base = precision_rows[0]["step_s"]
        names = [r["stage"].removeprefix("finetune --precision ") for r in precision_rows]
        print(f"fine-tuning step time relative to {names[0]}: "
              + ", ".join(f"{n} {r['step_s'] / base:.2f}x" for n, r in zip(names, precision_rows)))
    finetune_step = rows[2]["step_s"]
    per_image = rows[3]["wall_s"] / 10 / args.sample_steps  # s per image and sampling step (incl. loading)
    print(f"extrapolated paper run at batch {args.batch_size}: fine-tuning 12,000 steps ~ "
          f"{12000 * finetune_step / 3600:.1f} h; sampling IPC 50 (500 images, 50 steps) ~ "
          f"{500 * 50 * per_image / 3600:.2f} h")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
