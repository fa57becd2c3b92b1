#!/usr/bin/env bash
# CUDA correctness checks of the embedded default (mnist5k), compared with the CPU:
#   - fine-tuning losses on CUDA (fp32) against the CPU, and bf16 against fp32;
#   - two identical CUDA runs, and a run interrupted at step 10 and resumed, against an uninterrupted one;
#   - sampled images: batch size 7 against the default batch, CUDA against the CPU;
#   - evaluate and the whole `memdistill run` on CUDA, timed.
# Usage: bash benchmarks/cuda_checks.sh [WORKDIR]   (memdistill installed, a CUDA device visible)
set -euo pipefail
C=${1:-/tmp/cuda-checks}; mkdir -p "$C"
M="python3 -m memdistill"
F="finetune --steps 20 --log-every 1 --no-progress"
export HF_HUB_OFFLINE=1
set -x
$M $F --device cuda --precision fp32 --out "$C/gpu20"
$M $F --device cuda --precision fp32 --out "$C/gpu20b"
$M $F --device cpu --out "$C/cpu20"
$M $F --device cuda --precision fp32 --steps 10 --out "$C/resumed"
$M $F --device cuda --precision fp32 --out "$C/resumed" --resume
$M $F --device cuda --precision bf16 --out "$C/bf16"
$M sample --model "$C/gpu20" --ipc 10 --device cuda --out "$C/s_gpu"
$M sample --model "$C/gpu20" --ipc 10 --device cuda --batch-size 7 --out "$C/s_gpu7"
$M sample --model "$C/gpu20" --ipc 2 --device cpu --out "$C/s_cpu"
time $M evaluate --train "$C/s_gpu" --device cuda --repeats 2 --out "$C/ev"
time $M run --out "$C/run" --device cuda --sample-device cuda --eval-device cuda --no-progress
set +x
python3 - "$C" <<'PY'
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
C = Path(sys.argv[1])
def losses(run):
    return [json.loads(l)["loss"] for l in (C / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
def gap(a, b):
    return max(abs(x - y) for x, y in zip(losses(a), losses(b)))
print(f"losses, CUDA fp32 vs CPU: max abs diff {gap('gpu20', 'cpu20'):.3g}; CUDA bf16 vs fp32: {gap('gpu20', 'bf16'):.3g}")
def weights(a, b):
    wa, wb = (load_file(C / r / "export" / "model.safetensors") for r in (a, b))
    same = all(torch.equal(wa[k], wb[k]) for k in wa)
    return f"bit-identical {same}, max abs diff {max((wa[k] - wb[k]).abs().max().item() for k in wa):.3g}"
print("two identical CUDA runs:", weights("gpu20", "gpu20b"))
print("resumed at step 10 vs uninterrupted, CUDA:", weights("gpu20", "resumed"))
def pixels(a, b):
    d = [np.abs(np.asarray(Image.open(p)).astype(int) - np.asarray(Image.open(C / b / p.relative_to(C / a))).astype(int))
         for p in sorted((C / a).glob("*/*.png")) if (C / b / p.relative_to(C / a)).exists()]
    return f"{len(d)} images, {int(sum((x > 0).sum() for x in d))} of {sum(x.size for x in d)} pixels differ, max {int(max(x.max() for x in d))}"
print("sample batch 7 vs default, CUDA:", pixels("s_gpu", "s_gpu7"))
print("sample CUDA vs CPU:", pixels("s_cpu", "s_gpu"))
PY
