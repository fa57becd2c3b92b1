"""A full disk is one line (exit 2) that says so, also where the writer raises no OSError: torch.save's zip writer
raises RuntimeError ("[enforce fail at inline_container.cc] ... file write failed"), safetensors its own error."""

import shutil
from collections import namedtuple

import pytest
import torch

from memdistill.cli import main
from memdistill.errors import UserError

Usage = namedtuple("Usage", "total used free")
ZIP_FAILURE = "[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0"


def torch_save_fails(*args, **kwargs):
    path = args[1]
    with open(path, "wb") as f:  # what the zip writer leaves: a partial file
        f.write(b"PK")
    raise RuntimeError(ZIP_FAILURE)


def free_bytes(monkeypatch, free):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - free, free))


def test_save_atomic_on_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    from memdistill.train import save_atomic

    monkeypatch.setattr(torch, "save", torch_save_fails)
    free_bytes(monkeypatch, 0)
    with pytest.raises(UserError, match=r"disk is full.*last\.pt"):
        save_atomic({"step": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_atomic_failing_with_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    from memdistill.train import save_atomic

    monkeypatch.setattr(torch, "save", torch_save_fails)
    free_bytes(monkeypatch, 10**9)
    with pytest.raises(RuntimeError, match="inline_container"):
        save_atomic({"step": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_full_disk_with_a_safetensors_error(tmp_path, monkeypatch, tiny_model):
    import safetensors.torch

    from memdistill.models.io import load_export, save_export

    class SafetensorError(Exception):
        pass

    def fails(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    model, cfg = load_export(tiny_model)
    cfg.pop("model")
    monkeypatch.setattr(safetensors.torch, "save_file", fails)
    free_bytes(monkeypatch, 1024)
    with pytest.raises(UserError, match=r"disk is full.*export"):
        save_export(tmp_path / "export", model, cfg)
    assert list(tmp_path.iterdir()) == []


def test_finetune_on_a_full_disk_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", torch_save_fails)
    free_bytes(monkeypatch, 0)
    code = main(["finetune", "--data", "digits", "--init", str(tiny_model), "--steps", "1", "--batch-size", "4",
                 "--no-progress", "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "disk is full" in err[0], err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
