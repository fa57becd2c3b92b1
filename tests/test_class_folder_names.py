"""Class folder names that no stage can carry through (not valid UTF-8, or the name of one of an image set's own
files) are refused with one line naming the folder, before any work, in every command that reads a folder."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from memdistill.cli import main
from memdistill.errors import UserError


def run_cli(*args):
    return main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])


def make_tree(root, names):
    """root/<name>/<i>.png, 8x8 grey, 3 per class; names are str or bytes (raw, any encoding)."""
    rng = np.random.default_rng(0)
    for name in names:
        folder = os.path.join(os.fsencode(root), name if isinstance(name, bytes) else name.encode())
        os.makedirs(folder)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(os.fsdecode(folder) + f"/{i}.png")
    return root


BAD = {"not UTF-8": (b"b\xff", "b\\udcff", "UTF-8"), "grid.png": (b"grid.png", "grid.png", "file of every image set"),
       "manifest.json": (b"manifest.json", "manifest.json", "file of every image set")}
COMMANDS = {
    "select": ["select", "--ipc", "1", "--data", "DATA"],
    "pretrain": ["pretrain", "--codec", "pixel", "--model", "DiT-Micro/2", "--steps", "1", "--batch-size", "4", "--no-progress",
                 "--data", "DATA"],
    "evaluate": ["evaluate", "--test", "digits", "--net", "convnet1", "--epochs", "1", "--repeats", "1",
                 "--train", "DATA"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_class_folder_name_is_one_line(command, case, tmp_path, capsys):
    raw, shown, why = BAD[case]
    data = make_tree(tmp_path / "data", [b"a", raw])
    argv = [str(data) if a == "DATA" else a for a in COMMANDS[command]]
    code = run_cli(*argv, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "class folder" in err[0] and shown in err[0] and why in err[0], err
    assert not (tmp_path / "out").exists()


def test_class_list_naming_a_set_file_is_refused(tmp_path, capsys):
    data = make_tree(tmp_path / "data", ["a", "grid.png"])
    listed = tmp_path / "classes.txt"
    listed.write_text("a\ngrid.png\n")
    code = run_cli("select", "--ipc", "1", "--data", data, "--subset", listed, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "grid.png" in err[0] and "classes.txt" in err[0], err


@pytest.mark.parametrize("name", ["grid.png", "manifest.json", "b\udcff"])
def test_image_set_writer_refuses_such_class_names(name, tmp_path):
    from memdistill.imageset import write_image_set

    with pytest.raises(UserError, match="class name"):
        write_image_set(tmp_path / "set", torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), ["a", name], {})
    assert list(tmp_path.iterdir()) == []


def test_non_ascii_utf8_class_folders_are_kept(tmp_path, capsys):
    data = make_tree(tmp_path / "data", ["café", "日本"])
    assert run_cli("select", "--ipc", "1", "--data", data, "--out", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["café", "日本"]
