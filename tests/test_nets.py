import pytest
import torch
from torch import nn

from memdistill.errors import UserError
from memdistill.nets import build_net

NORMS = ["instance", "batch"]


def _forward(net, channels, size, batch=2):
    torch.manual_seed(0)
    with torch.no_grad():
        return net(torch.randn(batch, channels, size, size))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["convnet3", "resnetap10", "resnet18"])
def test_small_grey_images(name, norm):
    net = build_net(name, num_classes=10, channels=1, image_size=28, norm=norm)
    assert _forward(net, 1, 28).shape == (2, 10)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["convnet3", "resnetap10", "resnet18"])
def test_cifar_size_rgb(name, norm):
    net = build_net(name, num_classes=7, channels=3, image_size=32, norm=norm)
    assert _forward(net, 3, 32).shape == (2, 7)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["convnet3", "ConvNet-6", "ResNetAP-10", "ResNet_18"])
def test_imagenet_size_rgb(name, norm):
    net = build_net(name, num_classes=10, channels=3, image_size=224, norm=norm).eval()
    assert _forward(net, 3, 224, batch=1).shape == (1, 10)


def test_convnet6_needs_64_pixels():
    # 6 halvings: 64 -> 1 works; 32 -> 0 and 28 -> 0 cannot work.
    assert _forward(build_net("convnet6", 4, 3, 64), 3, 64).shape == (2, 4)
    for size in (28, 32):
        with pytest.raises(UserError, match="too small"):
            build_net("convnet6", 10, 3, size)


def test_convnet_structure_and_linear_size():
    net = build_net("convnet3", 10, 1, 28)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(128, (3, 3), (1, 1))] * 3
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 3
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert linear[0].in_features == 128 * 3 * 3  # 28 -> 14 -> 7 -> 3


def test_instance_norm_is_groupnorm_per_channel():
    for name in ("convnet3", "resnetap10", "resnet18"):
        net = build_net(name, 10, 3, 32, norm="instance")
        norms = [m for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
        assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
        assert all(m.num_groups == m.num_channels and m.affine for m in norms)
    net = build_net("resnet18", 10, 3, 32, norm="batch")
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())


def test_resnet_variants_downsample_differently():
    ap = build_net("resnetap10", 10, 3, 32)
    strided = build_net("resnet18", 10, 3, 32)
    assert all(c.stride == (1, 1) for c in ap.modules() if isinstance(c, nn.Conv2d))
    assert sum(isinstance(m, nn.AvgPool2d) for m in ap.modules()) == 6  # 3 main paths + 3 shortcuts
    assert sum(c.stride == (2, 2) for c in strided.modules() if isinstance(c, nn.Conv2d)) == 6
    n_blocks = sum(type(m).__name__ == "BasicBlock" for m in strided.modules())
    assert n_blocks == 8
    assert sum(type(m).__name__ == "BasicBlock" for m in ap.modules()) == 4


def test_stem_depends_on_image_size():
    big = build_net("resnet18", 10, 3, 224)
    small = build_net("resnet18", 10, 3, 32)
    assert big.stem[0].kernel_size == (7, 7) and big.stem[0].stride == (2, 2)
    assert isinstance(big.stem[-1], nn.MaxPool2d)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)


def test_unknown_name_and_norm():
    with pytest.raises(UserError, match="allowed"):
        build_net("vgg11", 10, 3, 32)
    with pytest.raises(UserError, match="allowed"):
        build_net("convnet0", 10, 3, 32)
    with pytest.raises(UserError, match="instance, batch"):
        build_net("convnet3", 10, 3, 32, norm="layer")


def test_resnetap_too_small_image():
    with pytest.raises(UserError, match="at least 8 px"):
        build_net("resnetap10", 10, 1, 4)
