"""--out may not be an input, lie inside one or hold one: every command refuses it before any work (exit 2, one
line), and the input is left as it was."""

import shutil

import numpy as np
import pytest
from PIL import Image

from memdistill.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def snapshot(root):
    """Every file under ``root`` with its bytes: equal snapshots mean an untouched input."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def listing(root):
    """Every path under ``root``, folders included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def tree(tmp_path):
    """A class-per-folder tree of 8x8 grey PNGs (3 classes x 4 images)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


@pytest.fixture
def image_set(tmp_path):
    out = tmp_path / "set"
    assert run_cli("select", "--data", "digits", "--ipc", "2", "--out", out) == 0
    return out


TRAIN = ["--steps", "1", "--batch-size", "4", "--no-progress"]
EVAL = ["--net", "convnet1", "--epochs", "1", "--repeats", "1"]


def cases():
    """(name, command line with DATA / MODEL / SET placeholders, the input it overlaps)."""
    return [
        ("sample --model X --out X --overwrite", ["sample", "--model", "MODEL", "--ipc", "1", "--steps", "2",
                                                  "--out", "MODEL", "--overwrite"], "MODEL"),
        ("sample --model X --out X/set", ["sample", "--model", "MODEL", "--ipc", "1", "--steps", "2",
                                          "--out", "MODEL/set"], "MODEL"),
        ("select --data D --out D --overwrite", ["select", "--data", "DATA", "--ipc", "1", "--out", "DATA",
                                                 "--overwrite"], "DATA"),
        ("select --data D --out D/sel", ["select", "--data", "DATA", "--ipc", "1", "--out", "DATA/sel"], "DATA"),
        ("select --data D/.. spelled otherwise", ["select", "--data", "DATA/../data", "--ipc", "1", "--out",
                                                  "DATA/./sel"], "DATA"),
        ("pretrain --data D --out D", ["pretrain", "--codec", "pixel", "--data", "DATA", "--model", "DiT-Micro/2", *TRAIN,
                                       "--out", "DATA"], "DATA"),
        ("pretrain --data D --out <parent of D> --overwrite", ["pretrain", "--codec", "pixel", "--data", "DATA", "--model", "DiT-Micro/2", *TRAIN,
                                                      "--out", "DATA/..", "--overwrite"], "DATA"),
        ("finetune --init X --out X --overwrite", ["finetune", "--data", "digits", "--init", "MODEL", *TRAIN,
                                                   "--out", "MODEL", "--overwrite"], "MODEL"),
        ("finetune --data D --out D/run", ["finetune", "--data", "DATA", "--init", "MODEL", *TRAIN,
                                           "--out", "DATA/run"], "DATA"),
        ("evaluate --train S --out S --overwrite", ["evaluate", "--train", "SET", "--test", "digits", *EVAL,
                                                    "--out", "SET", "--overwrite"], "SET"),
        ("evaluate --test D --out D/ev", ["evaluate", "--train", "SET", "--test", "DATA", *EVAL,
                                          "--out", "DATA/ev"], "DATA"),
        ("run --init X --out X/run", ["run", "--data", "digits", "--init", "MODEL", "--steps", "1",
                                      "--out", "MODEL/run"], "MODEL"),
        ("bench --data D --out D --overwrite", ["bench", "--data", "DATA", "--method", "random", "--ipc", "1",
                                                "--no-metrics", "--out", "DATA", "--overwrite"], "DATA"),
    ]


@pytest.mark.parametrize("name,argv,target", cases(), ids=[c[0] for c in cases()])
def test_out_over_an_input_is_refused_and_the_input_untouched(name, argv, target, tree, model_copy, image_set,
                                                              capsys):
    places = {"DATA": tree, "MODEL": model_copy, "SET": image_set}
    for key, path in places.items():
        argv = [a.replace(key, str(path)) for a in argv]
    before = {k: (snapshot(v), listing(v)) for k, v in places.items()}
    code = run_cli(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out" in err[0] and "input" in err[0], err
    after = {k: (snapshot(v), listing(v)) for k, v in places.items()}
    assert after[target] == before[target]


def test_out_through_a_symlink_to_the_input_is_refused(tree, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tree)
    before = snapshot(tree)
    assert run_cli("select", "--data", tree, "--ipc", "1", "--out", link, "--overwrite") == 2
    assert "--data" in capsys.readouterr().err
    assert snapshot(tree) == before


def test_evaluate_may_write_beside_its_input(image_set, tmp_path, capsys):
    """evaluate writes only results.json, so an --out that holds the train set leaves the set as it was."""
    before = snapshot(image_set)
    assert run_cli("evaluate", "--train", image_set, "--test", "digits", *EVAL, "--out", tmp_path) == 0
    assert (tmp_path / "results.json").is_file() and snapshot(image_set) == before
