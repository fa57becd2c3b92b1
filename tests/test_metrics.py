"""Diversity and coverage on hand-built features with known answers, and the feature extractor."""

import math

import pytest
import torch

from memdistill.metrics import (coverage, covered, knn_radii, mean_pairwise_cosine_distance, penultimate_features,
                                train_feature_extractor, within_class_diversity)


def test_diversity_identical_is_zero_orthogonal_is_one():
    same = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    assert mean_pairwise_cosine_distance(same) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine_distance(torch.eye(5)) == pytest.approx(1.0)
    # Opposite vectors: cosine -1, distance 2.
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    # Scale does not matter, only direction.
    assert mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [5.0, 0.0]])) == pytest.approx(0.0, abs=1e-12)


def test_within_class_diversity_averages_over_classes():
    # Class 0: identical rows (0); class 1: orthogonal rows (1); class 2: a single row (no pair, ignored).
    feats = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    # class 0 rows 0,1 identical -> 0; class 1 rows 2,3 = e1, e2 -> 1
    assert within_class_diversity(feats, labels) == pytest.approx(0.5)
    # Pairs of three: e1, e2, (e1 + e2)/sqrt2 -> distances 1, 1 - 1/sqrt2, 1 - 1/sqrt2.
    three = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]])
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert within_class_diversity(three, torch.zeros(3, dtype=torch.long)) == pytest.approx(expected)
    assert math.isnan(within_class_diversity(torch.eye(3), torch.arange(3)))  # IPC 1: undefined


def _grid_points():
    """Real points of one class on a line: x = 0, 1, 2, 3, 4, 5, 6 (k=2 radius of an inner point is 1)."""
    return torch.tensor([[float(x), 0.0] for x in range(7)])


def test_knn_radii_known():
    r = knn_radii(_grid_points(), k=2)
    # End points: 2nd neighbour at distance 2; inner points: neighbours at 1 and 1.
    assert r.tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        knn_radii(_grid_points(), k=7)


def test_coverage_full_none_and_partial():
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.0]])
    labels = torch.zeros(6, dtype=torch.long)
    # A distilled point at the centre lies within every real point's 5-NN ball (radii >= ~0.7 > distances).
    centre = torch.tensor([[0.5, 0.5]])
    assert coverage(real, labels, centre, torch.zeros(1, dtype=torch.long), k=5) == 1.0
    far = torch.tensor([[100.0, 100.0]])
    assert coverage(real, labels, far, torch.zeros(1, dtype=torch.long), k=5) == 0.0

    # Partial, on the line 0..6 with k=1 (radius 1 everywhere): a fake point at 0.2 is within 1 of
    # real 0 (0.2) and real 1 (0.8), not of real 2 (1.8): 2 of 7 covered.
    line = _grid_points()
    fake = torch.tensor([[0.2, 0.0]])
    assert covered(line, fake, k=1).tolist() == [True, True] + [False] * 5
    assert coverage(line, torch.zeros(7, dtype=torch.long), fake, torch.zeros(1, dtype=torch.long), k=1) == \
        pytest.approx(2 / 7)


def test_coverage_only_counts_same_class_neighbours():
    line = _grid_points()
    real = torch.cat([line, line + torch.tensor([0.0, 100.0])])  # class 1: the same line far away
    real_labels = torch.tensor([0] * 7 + [1] * 7)
    # A fake of class 1 sits right on class 0's points: it must cover nothing of class 0.
    fake = line.clone()
    assert coverage(real, real_labels, fake, torch.ones(7, dtype=torch.long), k=1) == 0.0
    assert coverage(real, real_labels, fake, torch.zeros(7, dtype=torch.long), k=1) == pytest.approx(0.5)


def test_feature_extractor_learns_and_gives_penultimate_features():
    # Two separable classes of 8x8 images: bright top half vs bright bottom half, plus noise.
    g = torch.Generator().manual_seed(0)
    x = torch.full((64, 1, 8, 8), -1.0) + 0.1 * torch.randn(64, 1, 8, 8, generator=g)
    y = torch.arange(64) % 2
    x[y == 0, :, :4] += 1.5
    x[y == 1, :, 4:] += 1.5
    model = train_feature_extractor(x, y, 2, net="convnet1", epochs=3, batch_size=16, generator=g)
    feats = penultimate_features(model, x)
    assert feats.shape == (64, 128 * 4 * 4)  # ConvNet-1 on 8x8: 128 channels at 4x4 before the classifier
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    # The extractor depends on the generator alone: replaying its state gives the same model, another
    # state a different one.
    g2 = torch.Generator().manual_seed(0)
    torch.randn(64, 1, 8, 8, generator=g2)  # the draw the data took from g before training
    same = train_feature_extractor(x, y, 2, net="convnet1", epochs=3, batch_size=16, generator=g2)
    assert torch.equal(penultimate_features(same, x), feats)
    other = train_feature_extractor(x, y, 2, net="convnet1", epochs=3, batch_size=16,
                                    generator=torch.Generator().manual_seed(1))
    assert not torch.equal(penultimate_features(other, x), feats)
