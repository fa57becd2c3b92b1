import dataclasses
import json

import pytest
import torch

from memdistill import imageset
from memdistill.codec import PixelCodec
from memdistill.errors import UserError
from memdistill.imageset import read_image_set, to_uint8
from memdistill.models.dit import build_dit
from memdistill.models.io import save_export
from memdistill.sample import SampleConfig, load_sampler, sample_set

CLASSES = ["zero", "one", "two"]


def make_export(folder, null_class=True, seed=0):
    model = build_dit("DiT-Micro/2", input_size=8, in_channels=1, num_classes=3,
                      class_dropout_prob=0.1 if null_class else 0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return save_export(folder, model, {"class_names": CLASSES, "cond_labels": [0, 1, 2], "codec": {"name": "pixel"},
                                       "image_shape": [1, 8, 8], "latent_shape": [1, 8, 8], "stage": "pretrain"})


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("model") / "export")


def cfg(export, **kw):
    base = dict(model=str(export), ipc=3, steps=4, cfg_scale=4.0, seed=0, batch_size=64, device="cpu")
    base.update(kw)
    return SampleConfig(**base)


def test_set_layout_and_manifest(export, tmp_path):
    out = sample_set(cfg(export, ipc=2), tmp_path / "set")
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "manifest.json", "one", "two", "zero"]
    for name in CLASSES:
        assert sorted(p.name for p in (out / name).iterdir()) == ["00000.png", "00001.png"]
    x, y, names, m = read_image_set(out)
    assert x.shape == (6, 1, 8, 8) and y.tolist() == [0, 0, 1, 1, 2, 2] and names == CLASSES
    assert m["stage"] == "sample" and m["ipc"] == 2 and m["channels"] == 1 and m["resolution"] == 8
    assert m["seed"] == 0 and m["method"] == "sample" and m["class_names"] == CLASSES
    assert m["config"]["cfg_scale"] == 4.0 and m["config"]["steps"] == 4
    assert m["source"]["path"] == str(export) and m["source"]["stage"] == "pretrain"
    assert m["source"]["codec"] == {"name": "pixel"}
    assert x.abs().sum() > 0 and x.std() > 0.05  # the randomised model draws real, varied images
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no partial folder left


def test_batch_size_does_not_change_the_set(export, tmp_path):
    a = sample_set(cfg(export, batch_size=1), tmp_path / "b1")
    b = sample_set(cfg(export, batch_size=7), tmp_path / "b7")
    xa, ya, _, _ = read_image_set(a)
    xb, yb, _, _ = read_image_set(b)
    assert torch.equal(ya, yb)
    # Matrix kernels round differently for different batch sizes (~1e-4 after a few steps, see the
    # float test below), so a pixel right at a rounding boundary may move by one level; all else is equal.
    ua, ub = to_uint8(xa).int(), to_uint8(xb).int()
    assert (ua - ub).abs().max() <= 1
    assert (ua == ub).float().mean() > 0.99


def test_pre_quantisation_floats_match_across_batches(export):
    # Every image's noise comes from its own generator, so batched and one-at-a-time images differ only
    # by float32 rounding in batch-size-dependent matrix kernels (measured ~1e-4 here).
    c = cfg(export)
    s = load_sampler(c)
    jobs = [(cl, i) for cl in range(3) for i in range(3)]
    together = s.images(c, jobs)
    alone = torch.cat([s.images(c, [job]) for job in jobs])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-3)


def test_classes_subset_gives_the_same_images(export, tmp_path):
    full = read_image_set(sample_set(cfg(export), tmp_path / "all"))
    part = read_image_set(sample_set(cfg(export, classes=[2, 0]), tmp_path / "part"))
    assert part[2] == ["two", "zero"]
    assert torch.equal(to_uint8(part[0][:3]), to_uint8(full[0][6:9]))
    assert torch.equal(to_uint8(part[0][3:]), to_uint8(full[0][:3]))
    assert part[3]["classes"] == [2, 0] and part[3]["cond_labels"] == [2, 0]


def test_seed_and_guidance_change_the_images(export):
    base = cfg(export)
    s = load_sampler(base)
    jobs = [(0, 0), (1, 0), (2, 1)]
    ref = s.images(base, jobs)
    other_seed = s.images(dataclasses.replace(base, seed=1), jobs)
    unguided = s.images(dataclasses.replace(base, cfg_scale=1.0), jobs)
    assert (ref - other_seed).abs().max() > 0.1
    assert (ref - unguided).abs().max() > 0.1
    # ddim is a different sampler on the same noise
    assert (ref - s.images(dataclasses.replace(base, sampler="ddim"), jobs)).abs().max() > 0.1


def test_interrupted_sampling_leaves_no_complete_folder(export, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_add = imageset.ImageSetWriter.add

    def failing_add(self, image, label, index):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_add(self, image, label, index)

    monkeypatch.setattr(imageset.ImageSetWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        sample_set(cfg(export, batch_size=2), tmp_path / "set")
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []  # neither `set` nor a hidden partial folder


def test_interrupted_overwrite_keeps_the_old_set(export, tmp_path, monkeypatch):
    out = sample_set(cfg(export, ipc=1), tmp_path / "set")
    before = (out / "manifest.json").read_text()

    def broken_decode(self, z):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(PixelCodec, "decode", broken_decode)
    with pytest.raises(RuntimeError, match="decode failed"):
        sample_set(cfg(export, ipc=2), out, overwrite=True)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_existing_out_needs_overwrite(export, tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        sample_set(cfg(export), out)
    sample_set(cfg(export, ipc=1), out, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["ipc"] == 1


@pytest.mark.parametrize("field,value,message", [
    ("ipc", 0, "--ipc must be an integer >= 1"),
    ("cfg_scale", -1.0, "--cfg-scale must be a finite number >= 0"),
    ("sampler", "euler", "unknown sampler"),
    ("batch_size", 0, "--batch-size must be an integer >= 1"),
    ("classes", [0, 3], "distinct label indices in 0..2"),
    ("classes", "0,x", "classes must be label indices"),
])
def test_bad_config(export, tmp_path, field, value, message):
    with pytest.raises(UserError, match=message):
        sample_set(cfg(export, **{field: value}), tmp_path / "set")
    assert not (tmp_path / "set").exists()


def test_guidance_needs_a_null_class(tmp_path):
    plain = make_export(tmp_path / "plain", null_class=False)
    with pytest.raises(UserError, match="needs a null class"):
        sample_set(cfg(plain, cfg_scale=4.0), tmp_path / "set")
    out = sample_set(cfg(plain, cfg_scale=1.0, ipc=1), tmp_path / "set")
    assert read_image_set(out)[0].shape == (3, 1, 8, 8)


def test_bare_checkpoint_needs_classes_and_codec(tmp_path):
    from memdistill.models.io import save_official

    save_official(tmp_path / "dit.pt", build_dit("DiT-Micro/2", input_size=8, in_channels=1, num_classes=3))
    with pytest.raises(UserError, match="not a memdistill export: sampling it needs subset"):
        sample_set(cfg(tmp_path / "dit.pt"), tmp_path / "set")
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\nc\n")
    out = sample_set(cfg(tmp_path / "dit.pt", subset=str(names), codec="pixel", ipc=1), tmp_path / "set")
    x, y, classes, m = read_image_set(out)
    assert classes == ["a", "b", "c"] and x.shape == (3, 1, 8, 8) and m["source"]["stage"] == "checkpoint"


def test_sampling_an_unfinished_run_says_how_to_finish_it(tiny_model, tmp_path, capsys):
    from memdistill.cli import main

    run = tmp_path / "killed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"state")
    (run / "config.json").write_text('{"stage": "finetune"}')
    assert main(["sample", "--model", str(run), "--out", str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err
    assert "unfinished finetune run" in err and "--resume" in err and "needs vae" not in err
    assert not (tmp_path / "set").exists()


def test_a_damaged_export_names_what_it_lacks(tiny_model, tmp_path, capsys):
    import json
    import shutil

    from memdistill.cli import main

    export = tmp_path / "export"
    shutil.copytree(tiny_model, export)
    cfg = json.loads((export / "config.json").read_text())
    del cfg["class_names"]
    (export / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", "--model", str(export), "--out", str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err
    assert "damaged memdistill export" in err and "class_names" in err


def test_bare_imagenet_checkpoint_refuses_a_typo_in_its_subset(tmp_path):
    """Issue 9.6 for sampling: a 1000-class checkpoint with a class list holding a non-wnid is refused under
    --labels auto; --labels index forces 0..K-1."""
    from memdistill.models.io import save_official

    save_official(tmp_path / "dit.pt", build_dit("DiT-Micro/2", input_size=8, in_channels=1, num_classes=1000))
    names = tmp_path / "classes.txt"
    names.write_text("n02086240\nn0209960l\n")
    with pytest.raises(UserError, match=r"'n0209960l' \(did you mean n02099601\?\)"):
        sample_set(cfg(tmp_path / "dit.pt", subset=str(names), codec="pixel", ipc=1), tmp_path / "set")
    out = sample_set(cfg(tmp_path / "dit.pt", subset=str(names), codec="pixel", ipc=1, labels="index",
                         cfg_scale=1.0), tmp_path / "set")
    assert read_image_set(out)[3]["cond_labels"] == [0, 1]
