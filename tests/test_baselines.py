import pytest
import torch

from memdistill.baselines import herding_order, pooled_features, select_indices, select_real
from memdistill.data import TensorImageDataset
from memdistill.errors import UserError
from memdistill.imageset import read_image_set, to_uint8


def dataset(per_class=(6, 5, 4), side=4):
    """Each image is constant at a distinct uint8 level, so an image identifies its dataset position."""
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    n = len(targets)
    levels = torch.linspace(-1, 1, 256)[torch.arange(n) * 7 % 256]
    images = levels.view(n, 1, 1, 1).expand(n, 1, side, side).clone()
    return TensorImageDataset(images, targets, ["a", "b", "c"][: len(per_class)])


def test_herding_known_sequence():
    # 1-D features; mean 3. First pick: closest to the mean (3.5, row 1). Then the row that brings
    # the running mean closest to 3: (3.5 + x) / 2 -> x = 2.5 exactly (row 3); then (6 + x) / 3 = 3
    # -> x = 3 is absent, 0 and 10 give |2 - 3| vs |5.33 - 3|: row 0.
    feats = torch.tensor([[0.0], [3.5], [10.0], [2.5], [2.0], [0.0]])
    assert feats.mean() == 3.0
    assert herding_order(feats, 4) == [1, 3, 4, 0]
    # Ties go to the lowest row: two identical candidates closest to the mean.
    assert herding_order(torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), 2) == [0, 1]
    # towards a given target instead of the rows' mean: 3 is nearest 2.6, then 1 brings the mean to 2
    assert herding_order(torch.tensor([[0.0], [1.0], [3.0], [10.0]]), 2, target=torch.tensor([2.6])) == [2, 1]


def test_herding_first_pick_is_closest_to_mean_2d():
    feats = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 1.25], [-1.0, -1.0], [1.0, 0.75]])  # mean (1, 1)
    order = herding_order(feats, 5)
    # Rows 2 and 4 are both 0.25 from the mean: the lowest wins. Then (1, 1.25) + x = (2, 2) -> row 4 exactly.
    assert order[:2] == [2, 4]
    assert sorted(order) == [0, 1, 2, 3, 4]


def test_pooled_features_shape_and_values():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    f = pooled_features(x)
    assert f.shape == (2, 3 * 16 * 16)
    assert f[0, 0] == x[0, 0, :2, :2].mean()
    small = torch.randn(2, 1, 8, 8)
    assert torch.equal(pooled_features(small), small.flatten(1))


def test_random_is_seeded_distinct_and_per_class(tmp_path):
    ds = dataset()
    a = select_indices("random", ds, 3, seed=5)
    assert a == select_indices("random", ds, 3, seed=5)
    assert a != select_indices("random", ds, 3, seed=6)
    for c, picks in enumerate(a):
        assert len(set(picks)) == 3 and all(int(ds.targets[i]) == c for i in picks)
    # Nested: with one class, IPC 1 is the first pick of IPC 4 with the same seed.
    one = dataset(per_class=(6,))
    assert select_indices("random", one, 1, seed=2)[0] == select_indices("random", one, 4, seed=2)[0][:1]


def test_select_real_writes_the_chosen_images(tmp_path):
    ds = dataset()
    out = select_real("random", ds, 2, seed=1, out=tmp_path / "rand")
    x, y, names, manifest = read_image_set(out)
    chosen = manifest["source_indices"]
    assert names == ["a", "b", "c"] and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(to_uint8(x), to_uint8(ds.images[[i for p in chosen for i in p]]))
    assert manifest["stage"] == "select" and manifest["method"] == "random" and manifest["ipc"] == 2
    assert manifest["seed"] == 1 and manifest["data"] == ds.identity
    assert chosen == select_indices("random", ds, 2, seed=1)
    with pytest.raises(UserError, match="already exists"):
        select_real("random", ds, 2, seed=1, out=out)


def test_herding_selection_with_custom_features(tmp_path):
    ds = dataset(per_class=(6, 5, 4))
    # Features = dataset position; per class the mean position, so herding picks the middle one first.
    position = {float(v): i for i, v in enumerate(ds.images[:, 0, 0, 0].tolist())}

    def index_feature(images):
        return torch.tensor([[float(position[float(v)])] for v in images[:, 0, 0, 0]])

    chosen = select_indices("herding", ds, 3, features=index_feature)
    # Class a = rows 0..5 (mean 2.5): 2 (tie with 3, lowest row), then (2 + x) / 2 = 2.5 -> 3, then
    # (5 + x) / 3 = 2.5 needs 2.5: rows 1 and 4 are both 0.5 / 3 away -> 1.
    assert chosen[0] == [2, 3, 1]
    # Class b = rows 6..10 (mean 8): 8, then 16 needs 8 (used) -> 7 or 9 tie -> 7, then 15 + x = 24 -> 9.
    assert chosen[1] == [8, 7, 9]
    out = select_real("herding", ds, 3, seed=0, out=tmp_path / "herd", features=index_feature)
    assert read_image_set(out)[3]["source_indices"] == chosen


def test_default_herding_runs_on_pixels():
    ds = dataset()
    chosen = select_indices("herding", ds, 2)
    # Constant images: herding on pixels equals herding on the scalar level.
    levels = ds.images[:, 0, 0, 0]
    for c, picks in enumerate(chosen):
        rows = torch.nonzero(ds.targets == c).flatten()
        assert picks == [int(rows[i]) for i in herding_order(levels[rows].unsqueeze(1), 2)]


def test_bad_input():
    ds = dataset(per_class=(6, 5, 4))
    with pytest.raises(UserError, match="class 'c' has only 4 images, fewer than ipc 5"):
        select_indices("random", ds, 5)
    with pytest.raises(UserError, match="ipc must be at least 1"):
        select_indices("herding", ds, 0)
    with pytest.raises(UserError, match="allowed: random, herding"):
        select_indices("kmeans", ds, 1)
