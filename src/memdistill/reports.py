"""Human-readable outputs: image grids, accuracy plots and the markdown report of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def _to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def image_grid(rows: Sequence[Sequence[torch.Tensor]], pad: int = 2, gap: int = 8,
               split: int | None = None, min_cell: int = 56) -> Image.Image:
    """A grid of images, one row per entry of ``rows`` (each a list of (C, H, W) tensors in [-1, 1]).
    With ``split``, a wider gap separates the first ``split`` columns from the rest. Small images are
    upscaled (nearest) to at least ``min_cell`` pixels so that digits stay visible."""
    first = next(img for row in rows for img in row)
    h, w = first.shape[-2:]
    zoom = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * zoom, w * zoom
    ncols = max(len(r) for r in rows)
    width = ncols * (cw + pad) + pad + (gap if split is not None else 0)
    height = len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = Image.fromarray(_to_uint8_hwc(img.float().cpu())).resize((cw, ch), Image.NEAREST)
            x = pad + c * (cw + pad) + (gap if split is not None and c >= split else 0)
            canvas.paste(tile, (x, pad + r * (ch + pad)))
    return canvas


def distilled_vs_real_grid(distilled: torch.Tensor, distilled_labels: torch.Tensor, real: torch.Tensor,
                           real_labels: torch.Tensor, num_classes: int, per_class: int = 8) -> Image.Image:
    """Per class (a row): up to ``per_class`` distilled images, a gap, then as many real ones."""
    rows = []
    for c in range(num_classes):
        d = distilled[distilled_labels == c][:per_class]
        r = real[real_labels == c][:per_class]
        rows.append(list(d) + list(r))
    return image_grid(rows, split=min(per_class, max(int((distilled_labels == c).sum()) for c in range(num_classes))))


def accuracy_plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Bar plot of mean top-1 (+- std) per method. ``rows``: dicts with method, best_mean, best_std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 3.6))
    names = [r["method"] for r in rows]
    means = [r["best_mean"] for r in rows]
    stds = [r["best_std"] for r in rows]
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3",
                                                                "#937860"][: len(rows)])
    for bar, m, s in zip(bars, means, stds):
        ax.annotate(f"{m:.1f}", (bar.get_x() + bar.get_width() / 2, m + s), ha="center", va="bottom", fontsize=9,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, min(100, max(m + s for m, s in zip(means, stds)) * 1.2 + 5))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def pm(mean: float, std: float, repeats: int | None = None) -> str:
    """Mean ± std, or the mean and "(1 repeat)" for one repeat (evaluate.format_score)."""
    from .evaluate import format_score

    return format_score(mean, std, repeats)


def write_run_report(out: str | Path, settings: dict, results: list[dict], timings: dict[str, float],
                     grid: str, plot: str, notes: Sequence[str] = ()) -> Path:
    """report.md of `memdistill run`: what was done, the results table, the pictures and the timings."""
    out = Path(out)
    table = markdown_table(
        ["method", "IPC", "net", "best top-1 (%)", "last top-1 (%)", "per repeat (best)", "epochs"],
        [[r["method"], r["ipc"], r["net"], pm(r["best_mean"], r["best_std"], len(r["per_repeat"])),
          pm(r["last_mean"], r["last_std"], len(r["per_repeat"])),
          ", ".join(f"{p['best']:.1f}" for p in r["per_repeat"]), r["epochs"]] for r in results],
    )
    best = max(results, key=lambda r: r["best_mean"])
    lines = [
        "# memdistill run report",
        "",
        f"Distilled {settings.get('data')} into {settings.get('ipc')} images per class with the "
        f"**{settings.get('memory')}** memory and evaluated by training {settings.get('net')} from scratch on each "
        f"set, {settings.get('repeats')} repeats, testing on the real {settings.get('test')} images.",
        "",
        f"**Outcome:** {best['method']} scores highest, "
        f"{pm(best['best_mean'], best['best_std'], len(best['per_repeat']))} % top-1 "
        "(best check per repeat, mean ± sample std over repeats).",
        "",
        "## Results",
        "",
        table,
        "",
        f"![accuracy per method]({plot})",
        "",
        "## Distilled images (left) beside real images (right), one row per class",
        "",
        f"![distilled vs real]({grid})",
        "",
        "## Timings",
        "",
        markdown_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]),
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, default=str),
        "```",
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
