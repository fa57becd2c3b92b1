"""The bench's tables and plots: accuracy in the layout of the paper's Table 1, diversity and coverage,
accuracy against IPC, the sweep's curves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .config import method_label

log = logging.getLogger(__name__)


# ----- the table, the plots ---------------------------------------------------------------------------------
def tied_best(entries: dict[str, tuple[float, float]]) -> set[str]:
    """Methods to bold in a row of {method: (mean, std)}: the best mean and every mean within its std."""
    if not entries:
        return set()
    best = max(entries, key=lambda m: entries[m][0])
    floor = entries[best][0] - entries[best][1] - 1e-9
    return {m for m, (mean, _) in entries.items() if mean >= floor}


def accuracy_table(cells: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], nets: Sequence[str]) -> str:
    """Markdown in the layout of the paper's Table 1: rows IPC x net, columns methods, mean ± std,
    ties with the best in bold (``TIE_RULE``). ``cells``: dicts with method, ipc, net, best_mean, best_std."""
    from ..reports import markdown_table, pm

    lookup = {(c["method"], c["ipc"], c["net"]): c for c in cells}
    rows = []
    for k in ipcs:
        for net in nets:
            found = {m: (lookup[m, k, net]["best_mean"], lookup[m, k, net]["best_std"]) for m in methods
                     if (m, k, net) in lookup}
            repeats = {m: len(lookup[m, k, net].get("per_repeat") or ()) or None for m in found}
            bold = tied_best(found)
            rows.append([k, net] + [("–" if m not in found else f"**{pm(*found[m], repeats[m])}**" if m in bold
                                     else pm(*found[m], repeats[m])) for m in methods])
    return markdown_table(["IPC", "net"] + [method_label(m) for m in methods], rows)


def scores_table(cells: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], nets: Sequence[str]) -> str:
    """The second table: rows IPC x net x method, columns HLR, IOR, LRS (mean ± std over repeats); cells
    without scores are left out."""
    from ..reports import SCORE_COLUMNS, markdown_table, score_cells

    lookup = {(c["method"], c["ipc"], c["net"]): c for c in cells if c.get("scores")}
    columns = [(i, name) for i, (key, name, _) in enumerate(SCORE_COLUMNS)
               if any(key in c["scores"] for c in lookup.values())]
    rows = [[k, net, method_label(m)] + [score_cells(lookup[m, k, net]["scores"])[i] for i, _ in columns]
            for k in ipcs for net in nets for m in methods if (m, k, net) in lookup]
    return markdown_table(["IPC", "net", "method"] + [name for _, name in columns], rows)


def metrics_table(metrics: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], key: str) -> str:
    """Rows IPC, columns methods, the set metric ``key`` (diversity or coverage); n/a where undefined."""
    from ..reports import markdown_table

    lookup = {(r["method"], r["ipc"]): r.get(key) for r in metrics}
    rows = [[k] + [("–" if (m, k) not in lookup else "n/a" if lookup[m, k] is None else f"{lookup[m, k]:.3f}")
                   for m in methods] for k in ipcs]
    return markdown_table(["IPC"] + [method_label(m) for m in methods], rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_ipc_plot(cells: Sequence[dict], methods: Sequence[str], ipcs: Sequence[int], nets: Sequence[str],
                         path: str | Path, title: str = "") -> Path:
    """One panel per net, one line per method: mean top-1 against IPC with std error bars."""
    plt = _pyplot()
    lookup = {(c["method"], c["ipc"], c["net"]): c for c in cells}
    fig, axes = plt.subplots(1, len(nets), figsize=(4.6 * len(nets), 3.8), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for i, m in enumerate(methods):
            pts = [(k, lookup[m, k, net]) for k in ipcs if (m, k, net) in lookup]
            # Methods are nudged apart along the (log) IPC axis so equal results do not hide each other.
            dodge = 1.04 ** (i - (len(methods) - 1) / 2)
            if pts:
                ax.errorbar([k * dodge for k, _ in pts], [c["best_mean"] for _, c in pts],
                            yerr=[c["best_std"] for _, c in pts], marker="o", capsize=3, label=method_label(m))
        ax.set_xscale("log")
        ax.set_xticks(list(ipcs), [str(k) for k in ipcs])
        ax.minorticks_off()
        ax.set_xlabel("images per class")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(net, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_plot(points: Sequence[dict], parameter: str, default: float, path: str | Path, title: str = "") -> Path:
    """Accuracy (mean ± std) against one parameter's values; the default value marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    xs = [p["value"] for p in points]
    ax.errorbar(xs, [p["best_mean"] for p in points], yerr=[p["best_std"] for p in points], marker="o", capsize=3)
    ax.axvline(default, color="grey", linestyle="--", linewidth=1, label=f"default {default:g}")
    if parameter == "memory" and min(xs) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(SWEEP_AXIS[parameter])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SWEEP_AXIS = {"lambda_real": "lambda_real (representativeness weight)",
              "lambda_gen": "lambda_gen (diversity weight)", "memory": "memory size N_R = N_G"}
