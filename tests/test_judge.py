"""The judge: trained once per settings, cached, never returned from a cache of other settings."""

import json

import torch

from memdistill import judge as judge_module
from memdistill.data import open_dataset
from memdistill.judge import default_cache, load_judge


def weights(j):
    return {n: t.clone() for n, t in j.model.state_dict().items()}


def test_cache_reused_and_invalidated_when_settings_change(tmp_path, monkeypatch):
    from memdistill import metrics

    calls = []
    real_train = metrics.train_feature_extractor

    def counting(*a, **kw):
        calls.append(a[3:5])
        return real_train(*a, **kw)

    monkeypatch.setattr(metrics, "train_feature_extractor", counting)
    ds = open_dataset("digits", "train")
    first = load_judge(ds, "convnet1", 1, seed=0, cache=tmp_path)
    assert first.path.parent == tmp_path and first.path.is_file() and len(calls) == 1
    again = load_judge(ds, "convnet1", 1, seed=0, cache=tmp_path)
    assert len(calls) == 1  # reused, not trained again
    assert all(torch.equal(a, b) for a, b in zip(weights(first).values(), weights(again).values()))
    x = ds.images[:6]
    assert torch.allclose(first.probabilities(x), again.probabilities(x))

    # every setting that changes the judge gives another cache entry
    others = [load_judge(ds, "convnet1", 2, seed=0, cache=tmp_path), load_judge(ds, "convnet1", 1, seed=1, cache=tmp_path),
              load_judge(ds, "convnet2", 1, seed=0, cache=tmp_path),
              load_judge(open_dataset("digits", "train", resolution=16), "convnet1", 1, seed=0, cache=tmp_path)]
    assert len(calls) == 5 and len({j.path for j in [first, *others]}) == 5

    # a stored file whose recorded settings differ (an older format, or another judge copied over it) is not used
    saved = torch.load(first.path, weights_only=True)
    spec = first.spec.as_dict()
    torch.save({"spec": json.dumps({**spec, "format": spec["format"] - 1}),
                "state_dict": saved["state_dict"]}, first.path)
    load_judge(ds, "convnet1", 1, seed=0, cache=tmp_path)
    assert len(calls) == 6
    first.path.write_bytes(b"damaged")
    load_judge(ds, "convnet1", 1, seed=0, cache=tmp_path)
    assert len(calls) == 7


def test_outputs_shapes_and_losses(tmp_path):
    ds = open_dataset("digits", "train")
    j = load_judge(ds, "convnet1", 1, cache=tmp_path)
    x, y = ds.images[:5], ds.targets[:5]
    p = j.probabilities(x)
    assert p.shape == (5, 10) and torch.allclose(p.sum(1), torch.ones(5))
    loss = j.losses(x, y)
    assert torch.allclose(loss, -p[torch.arange(5), y].log(), atol=1e-5)
    assert j.features(x).shape[0] == 5
    # images of another size are brought to the judge's resolution
    assert j.probabilities(torch.nn.functional.interpolate(x, size=16)).shape == (5, 10)
    assert j.identity()["data"] == "digits:train" and j.identity()["file"] == str(j.path)


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDISTILL_CACHE", str(tmp_path))
    assert default_cache() == tmp_path / "judges"
    monkeypatch.delenv("MEMDISTILL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache() == tmp_path / "home" / ".cache" / "memdistill" / "judges"
    assert judge_module.CACHE_ENV == "MEMDISTILL_CACHE"
