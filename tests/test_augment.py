import pytest
import torch
import torch.nn.functional as F

from memdistill.augment import (IMAGENET_MEAN, IMAGENET_STD, TrainAugment, color_jitter, cutmix, lighting,
                                normalize, random_flip, random_resized_crop, resize_center_crop,
                                test_transform)
from memdistill.errors import UserError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_mirrors_exactly_the_drawn_samples():
    x = torch.arange(4 * 2 * 3 * 5, dtype=torch.float32).view(4, 2, 3, 5)
    assert torch.equal(random_flip(x, p=1.0, generator=gen()), x[..., [4, 3, 2, 1, 0]])
    assert torch.equal(random_flip(x, p=0.0, generator=gen()), x)
    # p=0.5: each sample is either itself or its exact mirror, following the generator's draws.
    out = random_flip(x, p=0.5, generator=gen(1))
    drawn = torch.rand(4, generator=gen(1)) < 0.5
    assert 0 < int(drawn.sum()) < 4  # this seed flips some but not all
    for i in range(4):
        assert torch.equal(out[i], x[i].flip(-1) if drawn[i] else x[i])


def test_resize_center_crop_known_values():
    x = torch.arange(24, dtype=torch.float32).view(1, 1, 4, 6)
    assert torch.equal(resize_center_crop(x, 4), x[..., 1:5])  # no resize, central columns
    sq = torch.rand(2, 3, 8, 8, generator=gen())
    assert torch.equal(resize_center_crop(sq, 8), sq)
    assert resize_center_crop(sq, 4).shape == (2, 3, 4, 4)
    assert torch.allclose(resize_center_crop(torch.full((1, 3, 9, 7), 0.3), 5), torch.full((1, 3, 5, 5), 0.3))
    # The shorter side sets the scale: 8x12 -> 4x6, then columns 1..4 of the 6. A pattern that only varies
    # along columns keeps doing so, and the (left-right symmetric) crop of a symmetric pattern stays symmetric.
    cols = torch.tensor([0.0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3]).repeat(8, 1).view(1, 1, 8, 12)
    out = resize_center_crop(torch.cat([cols, cols.flip(-1)]), 4)
    assert out.shape == (2, 1, 4, 4)
    assert torch.allclose(out, out[:, :, :1].expand_as(out))
    assert torch.allclose(out[0], out[1].flip(-1), atol=1e-6)


def test_random_resized_crop_full_box_is_identity():
    x = torch.rand(3, 3, 16, 16, generator=gen())
    out = random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1), generator=gen())
    assert torch.allclose(out, x, atol=1e-5)
    # At another size the full box is plain bilinear resampling of the whole image.
    up = random_resized_crop(x, 24, scale=(1, 1), ratio=(1, 1), generator=gen())
    ref = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(up, ref, atol=1e-5)


def test_random_resized_crop_cuts_a_subimage():
    # Image = its column index. scale 1/4 with ratio 1 gives a 16x16 box; resized to 8 px, neighbouring
    # output pixels are 2 input columns apart, and every value lies inside the image.
    x = torch.arange(32, dtype=torch.float32).repeat(32, 1).view(1, 1, 32, 32).repeat(4, 1, 1, 1)
    out = random_resized_crop(x, 8, scale=(0.25, 0.25), ratio=(1, 1), generator=gen())
    steps = out[:, 0, 0, 1:] - out[:, 0, 0, :-1]
    assert torch.allclose(steps, torch.full_like(steps, 2.0), atol=1e-4)
    assert float(out.min()) >= 0 and float(out.max()) <= 31
    # per-sample boxes: not all the same left edge; the left edge sits at an integer column + 0.5
    assert len(set(out[:, 0, 0, 0].tolist())) > 1
    assert torch.allclose(out[:, 0, 0, 0] % 1, torch.full((4,), 0.5), atol=1e-4)
    with pytest.raises(UserError):
        random_resized_crop(x, 8, scale=(0.0, 1.0))


def test_color_jitter_zero_strength_is_identity():
    x = torch.rand(4, 3, 5, 5, generator=gen())
    assert torch.equal(color_jitter(x, 0, 0, 0, generator=gen()), x)


def test_brightness_scales_constant_image_within_bounds():
    x = torch.full((16, 3, 4, 4), 0.5)
    out = color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, generator=gen())
    # contrast and saturation keep a constant grey image; brightness multiplies it by f in [0.6, 1.4]
    factor = out / 0.5
    per_image = factor[:, 0, 0, 0]
    assert torch.allclose(factor, per_image.view(-1, 1, 1, 1).expand_as(factor), atol=1e-6)
    assert float(per_image.min()) >= 0.6 - 1e-6 and float(per_image.max()) <= 1.4 + 1e-6
    assert float(per_image.std()) > 0.05  # per-sample factors


def test_saturation_only_touches_colour():
    grey = torch.rand(4, 1, 5, 5, generator=gen())
    assert torch.equal(color_jitter(grey, 0, 0, 0.9, generator=gen()), grey)
    rgb = torch.rand(4, 3, 5, 5, generator=gen())
    assert not torch.allclose(color_jitter(rgb, 0, 0, 0.9, generator=gen()), rgb)


def test_lighting_is_constant_shift_per_channel():
    x = torch.rand(5, 3, 6, 6, generator=gen())
    out = lighting(x, std=0.1, generator=gen())
    shift = out - x
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert float(shift.abs().max()) > 0
    # known answer: alpha drawn from the same generator
    alpha = torch.randn(5, 3, generator=gen()) * 0.1
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    assert torch.allclose(shift[:, :, 0, 0], (alpha * eigval) @ eigvec.T, atol=1e-6)
    grey = torch.rand(2, 1, 4, 4)
    assert torch.equal(lighting(grey, generator=gen()), grey)


def _after_lambda(g):
    torch.randint(0, 2 ** 62, (1,), generator=g)  # cutmix draws its Beta seed first, then the permutation
    return g


def test_cutmix_pixels_box_and_soft_labels():
    n, classes = 8, 5
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, 12, 16).clone()  # image i == i
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    fractions = set()
    for seed in range(6):
        mixed, soft = cutmix(x, y, classes, beta=1.0, generator=gen(seed))
        perm = torch.randperm(n, generator=_after_lambda(gen(seed)))
        moved = int((perm != torch.arange(n)).nonzero()[0])
        box = mixed[moved, 0] != moved  # (H, W) pasted region, the same for every image
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])  # one rectangle
        frac = float(box.float().mean())
        fractions.add(round(frac, 4))
        for i in range(n):
            assert torch.equal(mixed[i][:, box], x[perm[i]][:, box])  # pasted pixels come from x[perm]
            assert torch.equal(mixed[i][:, ~box], x[i][:, ~box])  # the rest from x
            expected = torch.zeros(classes)
            expected[y[i]] += 1 - frac
            expected[y[perm[i]]] += frac
            assert torch.allclose(soft[i], expected, atol=1e-6)  # weight == pasted-area fraction
        assert torch.allclose(soft.sum(1), torch.ones(n))
    assert len(fractions) > 1  # lambda is random per batch
    with pytest.raises(UserError):
        cutmix(x, y, classes, beta=0)


def test_normalize_known_values():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    out = normalize(x, mean=(0.0, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(UserError):
        normalize(x, (0.5,), (0.5,))


def test_train_augment_deterministic_and_normalised():
    x = torch.rand(4, 3, 20, 20, generator=gen())
    aug = TrainAugment(size=16)
    a, b = aug(x, gen(7)), aug(x, gen(7))
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, aug(x, gen(8)))
    # with the random photometric steps off, a constant image only gets normalised
    plain = TrainAugment(size=8, flip=False, jitter=False, lighting=False)
    const = torch.full((2, 3, 12, 12), 0.5)
    expected = ((0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    assert torch.allclose(plain(const, gen()), expected.expand(2, 3, 8, 8), atol=1e-5)
    grey = TrainAugment(size=8, flip=False, jitter=False, lighting=False)(torch.full((2, 1, 8, 8), 0.75), gen())
    assert torch.allclose(grey, torch.full((2, 1, 8, 8), 0.5))  # (0.75 - 0.5) / 0.5


def test_test_transform_known_values():
    x = torch.rand(4, 3, 20, 20, generator=gen())
    assert torch.allclose(test_transform(x, 20), normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    grey = torch.rand(2, 1, 8, 8, generator=gen())
    assert torch.allclose(test_transform(grey, 8), grey * 2 - 1)
    assert test_transform(x, 10).shape == (4, 3, 10, 10)


def test_same_generator_same_output():
    x = torch.rand(4, 3, 12, 12, generator=gen())
    y = torch.tensor([0, 1, 2, 3])
    for fn in (lambda g: random_resized_crop(x, 8, generator=g), lambda g: random_flip(x, generator=g),
               lambda g: color_jitter(x, generator=g), lambda g: lighting(x, generator=g),
               lambda g: cutmix(x, y, 4, generator=g)[0]):
        assert torch.equal(fn(gen(5)), fn(gen(5)))
