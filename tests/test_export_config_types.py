"""An export whose config.json holds architecture fields of the wrong type or range ("input_size": "8", ...) is
refused with one line naming the file and the field, wherever a model is loaded (sample --model, finetune --init)."""

import json
import shutil

import pytest

from memdistill.cli import main
from memdistill.errors import UserError

BAD = [("input_size", "8"), ("depth", 2.5), ("num_heads", True), ("hidden_size", -4), ("num_classes", None),
       ("patch_size", [2]), ("mlp_ratio", "4"), ("mlp_ratio", 0), ("class_dropout_prob", 2),
       ("learn_sigma", "yes"), ("difffit", "no")]


def broken_copy(tiny_model, tmp_path, key, value):
    copy = tmp_path / "export"
    shutil.copytree(tiny_model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"][key] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
@pytest.mark.parametrize("command", ["sample", "finetune"])
def test_wrongly_typed_architecture_field_is_one_line(command, key, value, tiny_model, tmp_path, capsys):
    model = broken_copy(tiny_model, tmp_path, key, value)
    argv = (["sample", "--model", model, "--ipc", "1", "--steps", "2"] if command == "sample" else
            ["finetune", "--data", "digits", "--init", model, "--steps", "1", "--batch-size", "4", "--no-progress"])
    code = main([str(a) for a in argv] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "config.json" in err[0] and repr(key) in err[0], err
    assert not (tmp_path / "out").exists()


def test_model_entry_of_another_shape(tiny_model, tmp_path):
    from memdistill.models.io import load_dit, load_export

    copy = tmp_path / "export"
    shutil.copytree(tiny_model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"] = [cfg["model"]]
    (copy / "config.json").write_text(json.dumps(cfg))
    for load in (load_dit, load_export):
        with pytest.raises(UserError, match="'model' entry"):
            load(copy)


def test_diffusers_config_with_unreadable_numbers(tmp_path, tiny_model):
    from memdistill.models.io import load_dit, load_export, save_diffusers

    model, _ = load_export(tiny_model)
    folder = tmp_path / "diffusers"
    save_diffusers(folder, model)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layers"] = "two"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config.json"):
        load_dit(folder)
