"""`memdistill export --format ddranking`: zero-padded class folders in the model's class order, read back with
the right labels; bad input refused with one line."""

import torch
from PIL import Image

from memdistill.cli import main
from memdistill.data import open_dataset, load_tensors
from memdistill.imageset import read_image_set, write_image_set


def run_cli(*args):
    return main([str(a) for a in args])


def test_export_reads_back_with_the_right_labels(tmp_path, capsys):
    # A set whose model class order is not alphabetical (as ImageWoof's wnids in label order): zebra is class 0.
    names = ["zebra", "ant", "moth"]
    images = torch.linspace(-1, 1, 6 * 16).reshape(6, 1, 4, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    src = write_image_set(tmp_path / "set", images, labels, names,
                          {"stage": "select", "method": "random", "cond_labels": [340, 9, 7]})
    out = tmp_path / "dd"
    assert run_cli("export", "--format", "ddranking", "--set", src, "--out", out) == 0
    assert "CLASS_ORDER.txt" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]
    note = (out / "CLASS_ORDER.txt").read_text().splitlines()
    assert note[1:] == ["00000 zebra 340", "00001 ant 9", "00002 moth 7"]
    # As DD-Ranking's loader labels: the sorted folder names, index = position; images identical.
    ds = open_dataset(str(out), labels="index")
    x, y = load_tensors(ds)
    assert ds.class_names == ["00000", "00001", "00002"]
    for c, name in enumerate(names):
        original = images[labels == c]
        exported = x[y == c]
        assert torch.allclose(exported, original, atol=1 / 127.5), name
    # And back into memdistill as a set.
    back_x, back_y, _, manifest = read_image_set(out)
    assert torch.equal(back_y, labels) and manifest["class_order"] == names


def test_export_of_a_plain_class_tree(tmp_path):
    for name in ("b", "a"):
        (tmp_path / "tree" / name).mkdir(parents=True)
        Image.new("L", (4, 4), 200 if name == "a" else 10).save(tmp_path / "tree" / name / "x.png")
    assert run_cli("export", "--set", tmp_path / "tree", "--out", tmp_path / "dd") == 0
    assert (tmp_path / "dd" / "CLASS_ORDER.txt").read_text().splitlines()[1:] == ["00000 a", "00001 b"]
    x, y, _, _ = read_image_set(tmp_path / "dd")
    assert x[y == 0].mean() > 0 > x[y == 1].mean()  # class a (bright) is label 0


def test_bad_export_input_is_one_line(tmp_path, small_set, capsys):
    cases = [(["--format", "tensors", "--set", small_set, "--out", tmp_path / "a"], "--format must be one of ddranking"),
             (["--set", tmp_path / "missing", "--out", tmp_path / "b"], "not found"),
             (["--set", small_set, "--out", small_set / "inside"], "--out")]
    for args, match in cases:
        assert run_cli("export", *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0] and "Traceback" not in err[0], err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("")
    assert run_cli("export", "--set", small_set, "--out", tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err


def test_export_of_a_set_of_some_classes_names_folders_by_the_models_label_index(tmp_path, tiny_model, capsys):
    # sample --classes 7,3 writes class 7 first; DD-Ranking reads the folder index as the label, so the 7s must
    # land in 00007 and the 3s in 00003, not in 00000 and 00001.
    src = tmp_path / "set"
    assert run_cli("sample", "--model", tiny_model, "--ipc", "2", "--steps", "2", "--classes", "7,3",
                   "--out", src) == 0
    set_x, set_y, names, _ = read_image_set(src)
    assert names == ["7", "3"]
    out = tmp_path / "dd"
    assert run_cli("export", "--format", "ddranking", "--set", src, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00003", "00007"]
    assert (out / "CLASS_ORDER.txt").read_text().splitlines()[1:] == ["00007 7 7", "00003 3 3"]
    ds = open_dataset(str(out), labels="index")
    x, y = load_tensors(ds)
    for folder, position in (("00007", 0), ("00003", 1)):  # the set's class 7 is its label 0
        got = x[y == ds.class_names.index(folder)]
        assert torch.allclose(got, set_x[set_y == position], atol=1 / 127.5), folder
    # An export exported again keeps the indices.
    assert run_cli("export", "--set", out, "--out", tmp_path / "again") == 0
    assert sorted(p.name for p in (tmp_path / "again").iterdir() if p.is_dir()) == ["00003", "00007"]


def test_export_refuses_a_sampled_set_whose_class_indices_are_unknown(tmp_path, capsys):
    images = torch.zeros(2, 1, 4, 4)
    src = write_image_set(tmp_path / "set", images, torch.tensor([0, 1]), ["7", "3"], {"stage": "sample"})
    assert run_cli("export", "--set", src, "--out", tmp_path / "dd") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label index of each folder is unknown" in err[0], err
    assert not (tmp_path / "dd").exists()
