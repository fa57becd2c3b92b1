"""Paired comparison of two methods across bench outputs: A - B on the same classifier seeds.

    python benchmarks/compare_methods.py runs/inv/cfg4 runs/inv/cfg2 ... [--a adaptive] [--b minimax] [--ipc 10]

Within one bench, every method's repeat r trains its classifier from the same seed (eval seed + r), and the
seed moves all methods alike (a lucky seed is lucky for every set). So the difference A - B per repeat is far
less noisy than the two means' spread suggests. For each bench folder (its bench.json) and each IPC / net
cell holding both methods, this prints A and B (mean ± std over repeats), the paired difference (mean ± std
over repeats), and the diversity and coverage of both sets; then the pooled differences over all rows; then,
from each fine-tuned model's metrics.jsonl, the logged memory losses averaged over the steps after
--from-step (when memories are full): L_gen = max cosine to the generated memory, L_real = 1 - min cosine
to the real memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benches", nargs="+", help="bench output folders (each with bench.json)")
    p.add_argument("--a", default="adaptive")
    p.add_argument("--b", default="minimax")
    p.add_argument("--ipc", type=int, default=None, help="only cells of this IPC (default: all)")
    p.add_argument("--from-step", type=int, default=100)
    args = p.parse_args(argv)

    print(f"| bench | IPC | {args.a} | {args.b} | {args.a} - {args.b} (paired) | diversity {args.a} / {args.b} "
          f"| coverage {args.a} / {args.b} |")
    print("|---|---|---|---|---|---|---|")
    pooled: list[float] = []
    rows = 0
    wins = 0
    for folder in args.benches:
        bench = json.loads((Path(folder) / "bench.json").read_text())
        cells = {(c["method"], c["ipc"], c["net"]): c for c in bench["cells"]}
        metrics = {(m["method"], m["ipc"]): m for m in bench.get("metrics", [])}
        for (method, ipc, net), a in cells.items():
            b = cells.get((args.b, ipc, net))
            if method != args.a or b is None or args.ipc not in (None, ipc):
                continue
            seeds_a = {r["seed"]: r["best"] for r in a["per_repeat"]}
            seeds_b = {r["seed"]: r["best"] for r in b["per_repeat"]}
            diffs = [seeds_a[s] - seeds_b[s] for s in sorted(seeds_a) if s in seeds_b]
            pooled += diffs
            rows += 1
            wins += statistics.mean(diffs) > 0
            ma, mb = metrics.get((args.a, ipc), {}), metrics.get((args.b, ipc), {})

            def pair(key: str, ma=ma, mb=mb) -> str:
                va, vb = ma.get(key), mb.get(key)
                return "n/a" if va is None or vb is None else f"{va:.3f} / {vb:.3f}"

            print(f"| {folder} | {ipc} | {a['best_mean']:.2f} ± {a['best_std']:.2f} | {b['best_mean']:.2f} ± "
                  f"{b['best_std']:.2f} | {statistics.mean(diffs):+.2f} ± {_std(diffs):.2f} | {pair('diversity')} "
                  f"| {pair('coverage')} |")
    if not pooled:
        raise SystemExit(f"no bench holds both {args.a} and {args.b}")
    print(f"\npooled over {rows} cell(s), {len(pooled)} paired repeats: {args.a} - {args.b} = "
          f"{statistics.mean(pooled):+.2f} ± {_std(pooled):.2f} (std over repeats), "
          f"{args.a} ahead in {wins} of {rows} cells")

    print(f"\nlogged memory losses during fine-tuning, mean over the logged steps after {args.from_step}:")
    print("| bench | method | L_gen (max cos to generated memory) | L_real (1 - min cos to real memory) |")
    print("|---|---|---|---|")
    for folder in args.benches:
        for method in (args.a, args.b):
            path = Path(folder) / "models" / method / "metrics.jsonl"
            if not path.is_file():
                continue
            logged = [json.loads(line) for line in path.read_text().splitlines()]
            logged = [r for r in logged if r["step"] > args.from_step and "gen" in r]
            if logged:
                print(f"| {folder} | {method} | {statistics.mean(r['gen'] for r in logged):.3f} | "
                      f"{statistics.mean(r['real'] for r in logged):.3f} |")


if __name__ == "__main__":
    main()
