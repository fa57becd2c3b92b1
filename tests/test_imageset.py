import json

import numpy as np
import pytest
import torch
from PIL import Image

from memdistill.errors import UserError
from memdistill.imageset import (
    ImageSetWriter,
    from_uint8,
    read_image_set,
    to_uint8,
    write_image_set,
)


def quantised(n, c, side, seed=0):
    """Images already on the uint8 grid, so the round trip must be exact."""
    g = torch.Generator().manual_seed(seed)
    return from_uint8(torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8))


def test_to_uint8_known_values():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, -1 + 1 / 127.5])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 1]
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(u)), u)


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_exact(tmp_path, channels):
    images = quantised(7, channels, 6)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    out = write_image_set(tmp_path / "set", images, labels, ["a", "b", "c"],
                          {"stage": "select", "method": "random", "seed": 3})
    assert sorted(p.name for p in (out / "a").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    with Image.open(out / "b" / "00000.png") as im:
        assert im.mode == ("L" if channels == 1 else "RGB")
    x, y, names, manifest = read_image_set(out)
    assert names == ["a", "b", "c"]
    # Read back class by class, each in index (= writing) order.
    order = [0, 2, 5, 1, 4, 3, 6]
    assert y.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(to_uint8(x), to_uint8(images[order]))
    assert manifest["stage"] == "select" and manifest["method"] == "random" and manifest["seed"] == 3
    assert manifest["channels"] == channels and manifest["resolution"] == 6
    assert manifest["counts"] == [3, 2, 2] and manifest["ipc"] is None
    # No partial folder is left beside the set.
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_equal_counts_give_ipc_and_existing_out_needs_overwrite(tmp_path):
    images, labels = quantised(4, 1, 4), torch.tensor([0, 1, 0, 1])
    out = write_image_set(tmp_path / "s", images, labels, ["x", "y"], {"method": "m", "seed": 0})
    assert read_image_set(out)[3]["ipc"] == 2
    with pytest.raises(UserError, match="already exists"):
        write_image_set(out, images, labels, ["x", "y"], {"method": "m", "seed": 0})
    new = quantised(2, 1, 4, seed=1)
    write_image_set(out, new, torch.tensor([0, 1]), ["x", "y"], {"method": "m", "seed": 1}, overwrite=True)
    x, _, _, manifest = read_image_set(out)
    assert torch.equal(to_uint8(x), to_uint8(new)) and manifest["ipc"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ImageSetWriter(tmp_path / "s", ["a"], (1, 4, 4)) as w:
            w.add(quantised(1, 1, 4)[0], 0, 0)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def written(tmp_path):
    out = write_image_set(tmp_path / "s", quantised(4, 1, 5), torch.tensor([0, 0, 1, 1]), ["a", "b"],
                          {"method": "m", "seed": 0})
    return out


def test_missing_manifest(written):
    (written / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json .* not a complete image set"):
        read_image_set(written)


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        read_image_set(tmp_path)


def test_empty_class_folder(written):
    for p in (written / "b").iterdir():
        p.unlink()
    with pytest.raises(UserError, match="holds no images"):
        read_image_set(written)


def test_missing_class_folder(written):
    for p in (written / "a").iterdir():
        p.unlink()
    (written / "a").rmdir()
    with pytest.raises(UserError, match="no folder for class 'a'"):
        read_image_set(written)


def test_corrupt_png(written):
    (written / "b" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="unreadable image .*00001.png"):
        read_image_set(written)


def test_wrong_size(written):
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(written / "a" / "00000.png")
    with pytest.raises(UserError, match="00000.png is 5x6, the set's size is 5x5"):
        read_image_set(written)


def test_count_mismatch_and_wrong_stage(written):
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(written / "a" / "00002.png")
    with pytest.raises(UserError, match="holds 3 images, the manifest says 2"):
        read_image_set(written)
    m = json.loads((written / "manifest.json").read_text())
    m["stage"] = "finetune"
    (written / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="'finetune' output, not an image set"):
        read_image_set(written)


def test_bad_class_name(tmp_path):
    with pytest.raises(UserError, match="cannot be a folder name"):
        write_image_set(tmp_path / "s", quantised(1, 1, 4), torch.tensor([0]), ["../evil"], {})
