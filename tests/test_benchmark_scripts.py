"""The analysis scripts of benchmarks/: what they print is complete and computed right."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_methods  # noqa: E402
import make_glyphs  # noqa: E402
import memory_diagnostics  # noqa: E402
import memory_geometry  # noqa: E402


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


def test_memory_geometry_known_answers():
    """Class 0 along one axis, class 1 along another, both away from the origin: raw cosines 1 within a class and
    0 between; centred (the mean subtracted), the two classes point opposite ways: 1 and -1."""
    import torch

    entries = torch.zeros(6, 1, 2, 2)
    entries[:3, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    entries[3:, 0, 1, 1] = torch.tensor([1.0, 2.0, 3.0])
    entries[:3, 0, 0, 1] = entries[:3, 0, 0, 0]  # same direction per class, ...
    entries[3:, 0, 1, 0] = -entries[3:, 0, 1, 1]  # ... orthogonal classes
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    g = torch.Generator().manual_seed(0)
    i, j = memory_geometry.sample_pairs(targets, 50, True, g)
    assert (targets[i] == targets[j]).all() and (i != j).all()
    i, j = memory_geometry.sample_pairs(targets, 50, False, g)
    assert (targets[i] != targets[j]).all()
    result = memory_geometry.geometry(entries, targets, 50, seed=1)
    assert result["raw within"] == pytest.approx((1.0, 1.0, 1.0))
    assert result["raw between"] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert result["centred between"][0] < 0  # the classes sit on opposite sides of the mean


@pytest.mark.parametrize("codec", ["pixel", "vae"])
def test_memory_geometry_prints_every_row(codec, latent_pair, capsys):
    vae, _ = latent_pair
    extra = ["--vae", str(vae)] if codec == "vae" else []
    memory_geometry.main(["--data", "digits", "--codec", codec, *extra, "--pairs", "300", "--seed", "2"])
    out = capsys.readouterr().out
    shape = "4x4x4" if codec == "vae" else "1x8x8"
    assert f"digits train, 1433 entries of {shape}, codec {codec}, flip off; 300 pairs per kind, seed 2" in out
    rows = re.findall(r"^(raw|centred)\s+(within|between)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)$", out, flags=re.M)
    assert [(a, b) for a, b, *_ in rows] == [("raw", "within"), ("raw", "between"), ("centred", "within"),
                                             ("centred", "between")]
    for *_, mean, p5, p95 in rows:
        assert -1 <= float(p5) <= float(mean) <= float(p95) <= 1
    means = {(a, b): float(m) for a, b, m, _, _ in rows}
    if codec == "pixel":  # digits in pixels: one class's images are more alike than two classes'
        assert means[("centred", "within")] > means[("centred", "between")]


def test_memory_geometry_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        memory_geometry.main(["--data", "digits", "--codec", "vae"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AutoencoderKL folder" in err, err


def _cell(method, per_repeat):
    bests = [b for _, b in per_repeat]
    mean = sum(bests) / len(bests)
    return {"method": method, "ipc": 10, "net": "convnet3", "best_mean": mean, "best_std": 0.0,
            "per_repeat": [{"seed": s, "best": b} for s, b in per_repeat]}


def test_compare_methods_pairs_repeats_by_seed(tmp_path, capsys):
    bench = tmp_path / "b"
    bench.mkdir()
    # Seed 1 is lucky for both; the paired differences are +1 and +2 whatever the repeat order.
    cells = [_cell("adaptive", [(0, 70.0), (1, 80.0)]), _cell("minimax", [(1, 78.0), (0, 69.0)])]
    metrics = [{"method": "adaptive", "ipc": 10, "diversity": 0.2, "coverage": 0.5},
               {"method": "minimax", "ipc": 10, "diversity": 0.1, "coverage": 0.4}]
    (bench / "bench.json").write_text(json.dumps({"cells": cells, "metrics": metrics}))
    (bench / "models" / "minimax").mkdir(parents=True)
    (bench / "models" / "minimax" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "gen": g, "real": 0.5}) + "\n" for s, g in ((100, 9.0), (110, 0.6), (120, 0.8))))
    compare_methods.main([str(bench)])
    out = capsys.readouterr().out
    assert f"| {bench} | 10 | 75.00 ± 0.00 | 73.50 ± 0.00 | +1.50 ± 0.71 | 0.200 / 0.100 | 0.500 / 0.400 |" in out
    assert "adaptive - minimax = +1.50 ± 0.71 (std over repeats), adaptive ahead in 1 of 1 cells" in out
    assert f"| {bench} | minimax | 0.700 | 0.500 |" in out  # step 100 (memories filling) is left out
    with pytest.raises(SystemExit, match="no bench holds both"):  # --ipc keeps only the cells of that IPC
        compare_methods.main([str(bench), "--ipc", "1"])


def test_bench_cpu_quick_prints_every_comparison(monkeypatch, capsys):
    # Workers run in-process here (a subprocess per setting costs minutes on a loaded 2-core machine); the
    # script itself runs them as subprocesses so that process-wide settings are measured apart.
    import contextlib

    import torch

    import bench_cpu

    def in_process(spec, wait="passive", malloc="tuned"):
        try:
            return json.loads(json.dumps(bench_cpu.worker(spec)))
        finally:
            torch.set_num_threads(1)

    monkeypatch.setattr(bench_cpu, "run_worker", in_process)
    monkeypatch.setattr(bench_cpu, "Busy", contextlib.nullcontext)
    assert bench_cpu.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in ("threads idle: 1 -> 2", "threads busy: torch default", "allocator (1 thread)",
                 "test check pass (fp32): batch 256 -> 64", "fp32 -> bf16", "training step images/s, fp32",
                 "training step images/s, bf16", "share of evaluation time in test checks",
                 "evaluation eager: NCHW -> channels-last", "evaluation compiled: NCHW -> channels-last",
                 "evaluation: oneDNN input conv -> matrix product", "evaluation: both (and the norm fused"):
        assert name in out, name
    ratios = [float(x) for x in re.findall(r" x ?(\d+\.\d+)", out)]
    assert len(ratios) == 11 and all(r > 0 for r in ratios)
    assert "same weights with the allocator tuned and default: True" in out
    # --only target: one evaluation at the protocol's epochs (2 with --quick) against the 10-minute target
    assert bench_cpu.main(["--quick", "--only", "target"]) == 0
    target = capsys.readouterr().out.strip().splitlines()
    assert len(target) == 2 and target[0].startswith("# bench_cpu --only target: digits")
    match = re.fullmatch(r"one IPC-10 evaluation, 2 epochs x 3 repeats \(bf16, compiled, 1 thread\): (\d+\.\d) s, "
                         r"(\d+\.\d\d) x the 600 s target; best top-1 \d+\.\d\d ± \d+\.\d\d", target[1])
    assert match and float(match.group(2)) == pytest.approx(float(match.group(1)) / 600, abs=0.006)


@pytest.mark.slow
def test_paper_scale_runs_every_stage_and_keeps_a_lean_resume_state(tmp_path):
    """benchmarks/paper_scale.py, reduced (DiT-S/2 stand-in, tiny VAE, one image per class, two steps): every
    stage runs and is reported, and the resume state holds the tuned parameters only."""
    import os
    import subprocess

    import torch

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "paper_scale.py"), "--model", "DiT-S/2",
                           "--vae", "tiny", "--images", "1", "--val-images", "1", "--steps", "2", "--batch-size", "2",
                           "--sample-steps", "2", "--precisions", "fp32,bf16", "--device", "cpu",
                           "--workdir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| stage")}
    assert list(rows) == ["build stand-ins", "finetune (encode + first half)", "finetune --resume (cache hit)",
                          "sample", "evaluate", "finetune --precision fp32", "finetune --precision bf16"]
    assert all(float(cells[0]) > 0 for cells in rows.values())  # wall s
    assert all(float(cells[3]) > 0 for name, cells in rows.items() if name != "build stand-ins")  # peak RSS
    resume = rows["finetune --resume (cache hit)"]
    assert float(resume[1]) > 0 and float(rows["sample"][2]) > 0  # step s, images/s
    assert re.search(r"^fine-tuning step time relative to fp32: fp32 1\.00x, bf16 [\d.]+x$", done.stdout, re.M)
    assert "extrapolated paper run at batch 2: fine-tuning 12,000 steps ~" in done.stdout
    assert done.stdout.count("$ memdistill finetune ") == 4 and "$ memdistill evaluate " in done.stdout

    last = tmp_path / "runs" / "woof-adaptive" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["step"] == 2 and state["frozen"]["keys"] > 0
    init_bytes = (tmp_path / "stand" / "DiT-256x256.pt").stat().st_size
    # a full state held the 33M weights twice (model, EMA): 260 MB; the lean one ~ 4 x 0.46M tuned + memories
    assert last.stat().st_size < 0.1 * init_bytes
    assert abs(float(resume[5]) - last.stat().st_size / 2**20) < 0.1  # the table's checkpoint MB
    manifest = json.loads((tmp_path / "runs" / "precision-bf16" / "manifest.json").read_text())
    assert manifest["precision"] == "bf16"


def test_bench_precision_pairs_seeds_and_judges_the_spread():
    import bench_precision

    rows = [{"seed": 0, "fp32": 90.0, "bf16": 89.0, "fp32_s": 10.0, "bf16_s": 5.0},
            {"seed": 1, "fp32": 92.0, "bf16": 92.0, "fp32_s": 10.0, "bf16_s": 5.0},
            {"seed": 2, "fp32": 94.0, "bf16": 93.0, "fp32_s": 10.0, "bf16_s": 5.0}]
    stats = bench_precision.summarize(rows)
    assert stats["diffs"] == [-1.0, 0.0, -1.0]
    assert stats["diff_mean"] == pytest.approx(-2 / 3) and stats["diff_std"] == pytest.approx(0.57735, abs=1e-4)
    assert stats["fp32_std"] == pytest.approx(2.0) and stats["fp32_range"] == 4.0 and stats["time_ratio"] == 2.0
    assert stats["within"]  # |-0.67| <= 2.0
    tight = [dict(r, fp32=92.0 + 0.1 * i) for i, r in enumerate(rows)]  # fp32 std 0.1: a -2 point shift is outside
    tight = [dict(r, bf16=r["fp32"] - 2.0) for r in tight]
    assert not bench_precision.summarize(tight)["within"]


def test_bench_precision_quick_prints_paired_rows(capsys):
    import bench_precision

    assert bench_precision.main(["--quick", "--epochs", "2,2"]) == 0
    out = capsys.readouterr().out
    assert "## IPC 1: 2 epochs (reduced from the protocol's 3000)" in out
    assert "## IPC 5: 2 epochs (reduced from the protocol's 2000)" in out
    rows = re.findall(r"^\s+(\d) +([\d.]+) +([\d.]+) +([+-][\d.]+) +[\d.]+ +[\d.]+$", out, flags=re.M)
    assert [seed for seed, *_ in rows] == ["0", "1", "0", "1"]  # the same seeds in both precisions, per IPC
    for _, fp32, bf16, diff in rows:
        assert float(diff) == pytest.approx(float(bf16) - float(fp32), abs=0.011)
    assert len(re.findall(r"^paired bf16 - fp32: [+-][\d.]+ ± [\d.]+ points", out, flags=re.M)) == 2
    assert len(re.findall(r"^IPC +\d+: [+-][\d.]+ ± [\d.]+ +fp32 std [\d.]+ +(within|OUTSIDE) +x\d", out,
                          flags=re.M)) == 2


def test_replicates_pairs_by_replicate_and_classifier_seed(tmp_path, capsys):
    import replicates

    def bench(folder, dit, adaptive, coverage, seed=None, cfg=4.0):
        seed = folder if seed is None else seed
        cells = [{"method": m, "ipc": 10, "net": "convnet3",
                  "per_repeat": [{"seed": s, "best": b} for s, b in enumerate(bests)],
                  "scores": {"hlr": {"mean": 90 - sum(bests) / len(bests)}, "ior": {"mean": 1.0}}}
                 for m, bests in (("dit", dit), ("adaptive", adaptive))]
        metrics = [{"method": "adaptive", "ipc": 10, "diversity": 0.1, "coverage": coverage}]
        (tmp_path / folder).mkdir()
        settings = {"seed": seed, "sample_seed": seed, "cfg_scale": cfg}
        (tmp_path / folder / "bench.json").write_text(json.dumps(
            {"methods": ["dit", "adaptive"], "cells": cells, "metrics": metrics, "settings": settings}))
        return str(tmp_path / folder)

    r0 = bench("r0", dit=[80, 82], adaptive=[81, 85], coverage=0.2)  # diffs +1, +3
    r1 = bench("r1", dit=[70, 70], adaptive=[69, 71], coverage=0.4)  # diffs -1, +1
    assert replicates.main([r0, r1]) == 0
    out = capsys.readouterr().out
    # replicate means 83 and 70 -> 76.50 ± 9.19; the four paired diffs +1 +3 -1 +1 -> 1.00 ± 1.63, 3 of 4 ahead
    assert "| 10 | convnet3 | adaptive | 76.50 ± 9.19 (2) | 4 | 1.00 ± 1.63 | 3 of 4 |" in out
    assert "| 10 | adaptive | 0.100 | 0.300 |" in out
    with pytest.raises(SystemExit, match="no bench.json"):
        replicates.main([str(tmp_path)])
    # benches that are not replicates of one another are refused, and so are a base or IPC they lack
    with pytest.raises(SystemExit, match="given twice"):
        replicates.main([r0, r0])
    with pytest.raises(SystemExit, match="differ in cfg_scale"):
        replicates.main([r0, bench("r2", [1, 1], [1, 1], 0.1, cfg=2.0)])
    with pytest.raises(SystemExit, match="same seeds"):
        replicates.main([r0, bench("r3", [1, 1], [1, 1], 0.1, seed="r0")])
    with pytest.raises(SystemExit, match="--base herding"):
        replicates.main([r0, r1, "--base", "herding"])
    with pytest.raises(SystemExit, match="--ipc 3"):
        replicates.main([r0, r1, "--ipc", "3"])


@pytest.mark.parametrize("args, match", [
    (["--out", "{file}"], "is a file, not a folder"),
    (["--out", "{file}/sub"], "lies inside the file"),
    (["--out", "{tmp}/g", "--train-per-class", "0"], "--train-per-class must be at least 1"),
    (["--out", "{tmp}/g", "--test-per-class", "-1"], "--test-per-class must be at least 1"),
    (["--out", "{full}"], "is not empty"),
])
def test_make_glyphs_refuses_a_bad_out_or_count_in_one_line(tmp_path, capsys, args, match):
    """Refused before any font is read or image drawn: exit 2 and one line naming the option, nothing written."""
    (tmp_path / "file").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    args = [a.format(file=tmp_path / "file", tmp=tmp_path, full=tmp_path / "full") for a in args]
    with pytest.raises(SystemExit) as err:
        make_glyphs.main(args)
    assert err.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert match in message and "--" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_bench_cpu_only_target_runs_the_epochs_asked_for_and_refuses_fewer_than_one(monkeypatch, capsys):
    # --epochs was ignored by --only target (it always ran the protocol's 2000 epochs, or 2 with --quick), and
    # --epochs 0 silently meant the default
    import bench_cpu

    specs = []

    def fake_worker(spec, wait="passive", malloc="tuned"):  # the protocol evaluation itself: see the test above
        specs.append(spec)
        return {"wall": 6.0, "epochs": spec["epochs"] or 2000, "best_mean": 50.0, "best_std": 1.0}

    monkeypatch.setattr(bench_cpu, "run_worker", fake_worker)
    for argv, epochs in ((["--epochs", "5"], 5), (["--quick", "--epochs", "3"], 3), (["--quick"], 2), ([], None)):
        assert bench_cpu.main(["--only", "target", *argv]) == 0
        assert specs[-1]["kind"] == "protocol" and specs[-1]["epochs"] == epochs, argv
        header, result = capsys.readouterr().out.strip().splitlines()
        assert (f"{epochs} epochs," if epochs else "the protocol's epochs,") in header
        assert result.startswith(f"one IPC-10 evaluation, {epochs or 2000} epochs x 3 repeats")
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exc:
            bench_cpu.main(["--only", "target", "--epochs", bad])
        assert exc.value.code == 2 and "--epochs must be at least 1" in capsys.readouterr().err
    assert len(specs) == 4
