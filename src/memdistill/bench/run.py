"""Entry point of a bench: the checks and the output folder (cells._prepare), then the grid or the sweep."""

from __future__ import annotations

from pathlib import Path

from . import cells, grid, sweep
from .config import BenchConfig


def run_bench(cfg: BenchConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the bench grid (or, with ``cfg.sweep``, the sensitivity sweep) in ``out``; returns the markdown
    report (bench.md or sweep/sweep.md). With ``resume``, finished models, sets, cells and metrics are kept."""
    bench = cells._prepare(cfg, out, resume, overwrite)
    return sweep._run_sweep(bench) if cfg.sweep else grid._run_grid(bench)


