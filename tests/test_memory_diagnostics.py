"""benchmarks/memory_diagnostics.py on a few batches: the report it prints is complete and consistent."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_diagnostics  # noqa: E402


def test_report_shares_and_ratios(capsys):
    memory_diagnostics.main(["--steps", "14", "--measure-from", "10"])
    out = capsys.readouterr().out
    assert "steps 11-14 (4 batches)" in out
    shares = re.findall(r"^\s+\[\d+, \d+\)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%$", out, flags=re.M)
    assert len(shares) == len(memory_diagnostics.BINS) - 1
    for column in zip(*shares):  # drawn, L_gen, L_real: each a distribution over the bins
        assert abs(sum(float(x) for x in column) - 100) < 0.5
    ratios = re.findall(r"L_(gen|real)\s+lambda [\d.]+: ([\d.]+) ", out)
    assert [name for name, _ in ratios] == ["gen", "real"] and all(float(r) > 0 for _, r in ratios)
