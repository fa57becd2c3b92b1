"""Methods side by side over sampling replicates: several bench outputs of the same grid that differ only in
--seed / --sample-seed (each its own fine-tuning and sampling), summarised as one table.

    python benchmarks/replicates.py runs/r0 runs/r1 runs/r2 [--base dit] [--ipc 10]

For every IPC / net and method it prints the top-1 (best check) as mean ± std over the replicates of each
replicate's mean over classifier repeats (the spread that a new fine-tune-and-sample draw gives), the number of
classifiers pooled, and the difference to --base paired by replicate and classifier seed (mean ± std over the
pairs, and how many pairs favour the method); then the diversity and coverage of the sets and the DD-Ranking
HLR / IOR, each averaged over the replicates. Cells missing from a replicate are left out of that replicate
only (the count says how many contributed). Benches that are not replicates of one another (a folder twice,
the same seeds, or other settings that differ) are refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


# Settings that make the replicates: they must differ; every other setting must agree.
REPLICATE_KEYS = ("seed", "sample_seed")


def load(folders: list[str]) -> list[dict]:
    """The bench.json of each folder. SystemExit naming the folder when one is missing, when a folder is given
    twice, when two benches share their replicate seeds (REPLICATE_KEYS), or when their other settings differ
    (pooling them would mix experiments)."""
    out, seen = [], {}
    for folder in folders:
        path = Path(folder) / "bench.json"
        if not path.is_file():
            raise SystemExit(f"{folder}: no bench.json (has that bench finished?)")
        if path.resolve() in seen:
            raise SystemExit(f"{folder} is given twice")
        seen[path.resolve()] = folder
        out.append(json.loads(path.read_text()))
    first = out[0].get("settings", {})
    for folder, bench in zip(folders[1:], out[1:]):
        settings = bench.get("settings", {})
        other = sorted(k for k in set(first) | set(settings)
                       if k not in REPLICATE_KEYS and first.get(k) != settings.get(k))
        if other:
            raise SystemExit(f"{folder} and {folders[0]} differ in {', '.join(other)}: not replicates of one bench")
        if all(first.get(k) == settings.get(k) for k in REPLICATE_KEYS):
            raise SystemExit(f"{folder} and {folders[0]} have the same seeds ({', '.join(REPLICATE_KEYS)}): "
                             "not different replicates")
    return out


def summarise(benches: list[dict], base: str, ipc_filter: int | None = None) -> list[str]:
    """Markdown lines of the summary tables (see the module docstring)."""
    methods: list[str] = []
    for bench in benches:
        methods += [m for m in bench["methods"] if m not in methods]
    keys = sorted({(c["ipc"], c["net"]) for bench in benches for c in bench["cells"]
                   if ipc_filter in (None, c["ipc"])})
    lines = [f"| IPC | net | method | top-1 (mean ± std over replicates) | classifiers | minus {base} (paired) "
             f"| pairs ahead |", "|---|---|---|---|---|---|---|"]
    for ipc, net in keys:
        for method in methods:
            means, diffs, n = [], [], 0
            for bench in benches:
                cells = {(c["method"], c["ipc"], c["net"]): c for c in bench["cells"]}
                cell, ref = cells.get((method, ipc, net)), cells.get((base, ipc, net))
                if cell is None:
                    continue
                means.append(statistics.mean(r["best"] for r in cell["per_repeat"]))
                n += len(cell["per_repeat"])
                if ref is not None and method != base:
                    ref_best = {r["seed"]: r["best"] for r in ref["per_repeat"]}
                    diffs += [r["best"] - ref_best[r["seed"]] for r in cell["per_repeat"] if r["seed"] in ref_best]
            if not means:
                continue
            ahead = f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else ""
            lines.append(f"| {ipc} | {net} | {method} | {_mean_std(means)} ({len(means)}) | {n} "
                         f"| {_mean_std(diffs) if diffs else ''} | {ahead} |")
    lines += ["", "| IPC | method | diversity | coverage | HLR (points) | IOR (points) |", "|---|---|---|---|---|---|"]
    for ipc in sorted({k[0] for k in keys}):
        for method in methods:
            div, cov, hlr, ior = [], [], [], []
            for bench in benches:
                for m in bench.get("metrics", []):
                    if m["method"] == method and m["ipc"] == ipc:
                        if m.get("diversity") is not None:
                            div.append(m["diversity"])
                        if m.get("coverage") is not None:
                            cov.append(m["coverage"])
                for c in bench["cells"]:
                    if c["method"] == method and c["ipc"] == ipc and c.get("scores"):
                        hlr.append(c["scores"]["hlr"]["mean"])
                        ior.append(c["scores"]["ior"]["mean"])
            if div or cov or hlr:
                fmt = (lambda xs: f"{statistics.mean(xs):.3f}" if xs else "n/a")
                lines.append(f"| {ipc} | {method} | {fmt(div)} | {fmt(cov)} | {_mean_std(hlr)} | {_mean_std(ior)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benches", nargs="+", help="bench output folders, one per replicate (each with bench.json)")
    p.add_argument("--base", default="dit", help="method the paired differences are taken against (default dit)")
    p.add_argument("--ipc", type=int, default=None, help="only this IPC (default: all)")
    args = p.parse_args(argv)
    benches = load(args.benches)
    if not any(args.base in b["methods"] for b in benches):
        raise SystemExit(f"--base {args.base} is not among the benches' methods")
    if args.ipc is not None and not any(c["ipc"] == args.ipc for b in benches for c in b["cells"]):
        raise SystemExit(f"--ipc {args.ipc}: no cell of that IPC in these benches")
    print("\n".join(summarise(benches, args.base, args.ipc)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
