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


def class_grid(rows: Sequence[Sequence[torch.Tensor]], class_names: Sequence[str],
               sections: Sequence[tuple[str, int]], pad: int = 2, gap: int = 8, min_cell: int = 56,
               max_cell: int = 128) -> Image.Image:
    """The grid of images people read: one row per class, labelled with the class name on the left, and
    its columns in named sections (e.g. "distilled" then "real") with the name above each.

    rows: rows[c] lists class c's images, (C, H, W) tensors in [-1, 1] of one size, section by section:
        section s takes the next ``sections[s][1]`` entries (a class may have fewer; a missing or None
        entry stays blank).
    class_names: one per row. sections: (header, columns) pairs.
    Small images are upscaled (nearest, by an integer factor) to at least ``min_cell`` pixels so that digits
    stay visible; images larger than ``max_cell`` are shrunk to it so the picture stays small.
    Raises ValueError when the rows and class names differ in number or no row holds an image.
    """
    from PIL import ImageDraw, ImageFont

    if len(rows) != len(class_names):
        raise ValueError(f"{len(rows)} rows but {len(class_names)} class names")
    first = next((img for row in rows for img in row if img is not None), None)
    if first is None:
        raise ValueError("no images to draw")
    h, w = first.shape[-2:]
    zoom = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * zoom, w * zoom
    if max(h, w) > max_cell:
        scale = max_cell / max(h, w)
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_w = max(text_size(str(n))[0] for n in class_names) + 2 * pad + 4
    header_h = max(text_size(name)[1] for name, _ in sections) + 2 * pad + 4
    # x of each section's first column, and the width of the whole picture
    starts, x = [], label_w + pad
    for s, (_, ncols) in enumerate(sections):
        starts.append(x)
        x += ncols * (cw + pad) + (gap if s < len(sections) - 1 else 0)
    width, height = x, header_h + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for (name, ncols), x0 in zip(sections, starts):
        tw, _ = text_size(name)
        draw.text((x0 + max(0, (ncols * (cw + pad) - tw) // 2), pad), name, fill=(0, 0, 0), font=font)
    for r, (row, cname) in enumerate(zip(rows, class_names)):
        y = header_h + r * (ch + pad)
        _, th = text_size(str(cname))
        draw.text((pad, y + max(0, (ch - th) // 2)), str(cname), fill=(0, 0, 0), font=font)
        cells = list(row)
        for (_, ncols), x0 in zip(sections, starts):
            part, cells = cells[:ncols], cells[ncols:]
            for c, img in enumerate(part):
                if img is None:
                    continue
                tile = Image.fromarray(_to_uint8_hwc(img.float().cpu())).resize((cw, ch), Image.NEAREST)
                canvas.paste(tile, (x0 + c * (cw + pad), y))
    return canvas


def distilled_vs_real_grid(distilled: torch.Tensor, distilled_labels: torch.Tensor, real: torch.Tensor,
                           real_labels: torch.Tensor, class_names: Sequence[str], per_class: int = 8) -> Image.Image:
    """Per class (a row labelled with its name): up to ``per_class`` distilled images under the header
    "distilled", then as many real ones under "real". Images (N, C, H, W) in [-1, 1], labels (N,) indexing
    ``class_names``."""
    k = len(class_names)
    top = max(int(distilled_labels.max()), int(real_labels.max()))
    if top >= k:
        raise ValueError(f"label {top} has no entry among the {k} class names")
    n_d = min(per_class, max(int((distilled_labels == c).sum()) for c in range(k)))
    n_r = min(per_class, max(int((real_labels == c).sum()) for c in range(k)))
    rows = []
    for c in range(k):
        d = list(distilled[distilled_labels == c][:n_d])
        r = list(real[real_labels == c][:n_r])
        rows.append(d + [None] * (n_d - len(d)) + r)
    return class_grid(rows, class_names,
                      [("distilled", n_d), ("real", n_r)])


def accuracy_caption(rows: list[dict]) -> str:
    """What accuracy_plot draws, in words: the statistic, the mean, the error bars and over how many
    repeats (from each row's ``per_repeat`` list when present)."""
    repeats = sorted({len(r["per_repeat"]) for r in rows if "per_repeat" in r})
    over = f"{'/'.join(map(str, repeats))} repeat{'s' if repeats != [1] else ''}" if repeats else "the repeats"
    spread = "no error bar: one repeat" if repeats == [1] else "error bars: sample std"
    return f"bar: mean over {over} of each classifier's best top-1; {spread}"


def accuracy_figure(rows: list[dict], title: str = ""):
    """The matplotlib figure of accuracy_plot (for tests and notebooks); close it with plt.close."""
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
    ax.set_ylabel("best top-1 accuracy (%)")
    ax.set_ylim(0, min(100, max(m + s for m, s in zip(means, stds)) * 1.2 + 5))
    caption = accuracy_caption(rows)
    ax.set_title(f"{title}\n{caption}" if title else caption, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Bar plot of the mean best top-1 (with sample-std error bars) per method, captioned with what it shows
    (accuracy_caption). ``rows``: dicts with method, best_mean, best_std and, optionally, per_repeat."""
    fig = accuracy_figure(rows, title)
    import matplotlib.pyplot as plt  # after accuracy_figure chose the Agg backend

    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def format_score(mean: float, std: float, repeats: int | None = None, digits: int = 2) -> str:
    """A top-1 figure as people read it: "91.60 ± 1.21" (mean ± sample std over repeats), or
    "91.60 (1 repeat)" for a single repeat, which has no spread to show. repeats None: not known (2 or more).
    ``digits``: decimals (3 for LRS and ARS, which lie in 0..1)."""
    if repeats == 1:
        return f"{mean:.{digits}f} (1 repeat)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# DD-Ranking's scores as reports show them: key, column name, decimals (memdistill.scores).
SCORE_COLUMNS = (("hlr", "HLR (points)", 2), ("ior", "IOR (points)", 2), ("lrs", "LRS", 3), ("ars", "ARS", 3))


def score_cells(scores: dict | None) -> list[str]:
    """The HLR, IOR, LRS and ARS cells of one scored result (mean ± std over repeats); "–" where not measured."""
    scores = scores or {}
    return [format_score(scores[k]["mean"], scores[k]["std"], len(scores[k]["per_repeat"]), digits) if k in scores
            else "–" for k, _, digits in SCORE_COLUMNS]


def score_note(scores: dict) -> str:
    """One sentence on how the scores were computed (scaling, weights, references)."""
    full = scores["full_data"]
    text = (f"DD-Ranking scores (arXiv 2505.13300): HLR = full-data top-1 ({format_score(full['best_mean'], full['best_std'], len(full['per_repeat']))} %, "
            f"{full['epochs']} epochs on the whole train split) - the set's; IOR = the set's top-1 - that of a random "
            f"real subset of the same IPC; LRS = (e^a - e^-1)/(e - e^-1), a = {scores['weight']:g} IOR - "
            f"{1 - scores['weight']:g} HLR on {'fractions' if scores['scaling'] == 'fraction' else 'points'}")
    if "ars" in scores:
        text += (f"; ARS the same shape of {scores['ars_lambda']:g} x (set - random with augmentation) + "
                 f"{1 - scores['ars_lambda']:g} x (without), our combination pending the paper")
    return text + ". Mean ± sample std over repeats, paired by classifier seed."


def pm(mean: float, std: float, repeats: int | None = None) -> str:
    """Mean ± std, or the mean and "(1 repeat)" for one repeat (format_score)."""
    return format_score(mean, std, repeats)


def _scores_section(results: list[dict]) -> list[str]:
    """The run report's table of DD-Ranking scores, one row per scored method (nothing when none was scored)."""
    scored = [r for r in results if r.get("scores")]
    if not scored:
        return []
    table = markdown_table(["method", "IPC", "net", *(name for _, name, _ in SCORE_COLUMNS)],
                           [[r["method"], r["ipc"], r["net"], *score_cells(r["scores"])] for r in scored])
    return ["", "### DD-Ranking scores", "", table, "", score_note(scored[0]["scores"])]


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
    top = max(r["best_mean"] for r in results)
    leaders = [r for r in results if r["best_mean"] == top]
    outcome = (f"{leaders[0]['method']} scores highest, "
               f"{pm(leaders[0]['best_mean'], leaders[0]['best_std'], len(leaders[0]['per_repeat']))} % top-1"
               if len(leaders) == 1 else f"{' and '.join(r['method'] for r in leaders)} tie at {top:.2f} % top-1")
    lines = [
        "# memdistill run report",
        "",
        f"Distilled {settings.get('data')} into {settings.get('ipc')} images per class with the "
        f"**{settings.get('memory')}** memory and evaluated by training {settings.get('net')} from scratch on each "
        f"set, {settings.get('repeats')} repeats, testing on the real {settings.get('test')} images.",
        "",
        f"**Outcome:** {outcome} (best check per repeat, mean ± sample std over repeats).",
        "",
        "## Results",
        "",
        table,
        *_scores_section(results),
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
