"""Damaged, hostile or unsupported weight files: one line, exit 2, nothing run, and what to do."""

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from memdistill.cli import main
from memdistill.errors import UserError
from memdistill.models import io
from memdistill.models.io import EXPORT_WEIGHTS, load_dit, load_state_dict_any


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: " in err, err
    return err


def truncated_export(tiny_model, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    weights = folder / EXPORT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_a_truncated_export_is_one_line_for_every_command(tiny_model, tmp_path, capsys):
    model = truncated_export(tiny_model, tmp_path / "cut")
    assert main(["sample", "--model", str(model), "--ipc", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "set")]) == 2
    assert "truncated" in one_error_line(capsys) and not (tmp_path / "set").exists()
    assert main(["finetune", "--data", "digits", "--init", str(model), "--steps", "2", "--batch-size", "8",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "truncated" in one_error_line(capsys) and not (tmp_path / "run").exists()


def test_a_truncated_safetensors_file_and_a_truncated_pt(tiny_model, tmp_path):
    bare = tmp_path / "dit.safetensors"
    data = (tiny_model / EXPORT_WEIGHTS).read_bytes()
    for cut in (5, 100, len(data) - 10):
        bare.write_bytes(data[:cut])
        with pytest.raises(UserError, match="dit.safetensors.*truncated"):
            load_state_dict_any(bare)
    pt = tmp_path / "dit.pt"
    torch.save(load_state_dict_any(tiny_model), pt)
    pt.write_bytes(pt.read_bytes()[:200])
    with pytest.raises(UserError, match="dit.pt is not a torch checkpoint") as err:
        load_dit(pt)
    assert "weights_only" not in str(err.value)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tiny_model, tmp_path):
    marker, pt = tmp_path / "marker", tmp_path / "dit.pt"
    torch.save({"ema": load_state_dict_any(tiny_model), "extra": RunsCode(marker)}, pt)
    with pytest.raises(UserError, match="Python object") as err:
        load_dit(pt)
    assert not marker.exists()
    assert "weights_only" not in str(err.value)  # torch's advice to load it unsafely is not passed on


def test_without_safe_globals_a_bare_checkpoint_loads_and_a_training_checkpoint_says_what_to_do(
        tiny_model, tmp_path, monkeypatch):
    """torch < 2.5 has no torch.serialization.safe_globals: bare state dicts still load; an official training
    checkpoint (which carries an argparse.Namespace) gets a message that says how to proceed."""
    sd = load_state_dict_any(tiny_model)
    bare, training = tmp_path / "bare.pt", tmp_path / "training.pt"
    torch.save(sd, bare)
    torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model="DiT-XL/2")}, training)
    assert load_dit(training) is not None  # with safe_globals (this torch)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    assert load_dit(bare) is not None
    with pytest.raises(UserError, match=r"torch>=2\.5.*ckpt\['ema'\]"):
        load_dit(training)


def test_the_torch_floor_is_stated_and_met():
    """pyproject's floor is the one the code relies on (NumPy 2 interop, see its comment); this torch meets it."""
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+)", d) for d in deps if d.startswith("torch"))
    assert floor is not None and (int(floor[1]), int(floor[2])) >= (2, 3)
    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (int(floor[1]), int(floor[2]))
    assert hasattr(io, "load_weights_only")
