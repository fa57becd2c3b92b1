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


def _map_side(net, channels, size):
    """The side of the map entering the global pool / classifier, measured by a real forward."""
    seen = []
    body = net.features if hasattr(net, "features") else net.stages
    handle = body.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    _forward(net, channels, size, batch=2)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["convnet3", "resnetap10", "resnet18"])
@pytest.mark.parametrize("size", [8, 9, 28, 32, 127, 128, 130, 224])
def test_computed_feature_side_equals_the_real_one(name, size):
    """The size check reads every stride and pool of the main path, the large-image stem included."""
    from memdistill.nets import feature_side

    net = build_net(name, 3, 1, size, "batch")  # the geometry (instance norm refuses 1x1 final maps, below)
    path = [net.features] if hasattr(net, "features") else \
        [net.stem, *(m for b in net.stages for m in (b.conv1, b.conv2))]
    assert feature_side(path, size) == _map_side(net, 1, size)


# The minimum sizes, derived by hand from the layers (a stride-s layer needs at least s px of input):
# ConvNet-D: D avg-pools of 2 -> 2**D. ResNetAP-10 (small stem, stride 1): 3 avg-pools of 2 -> 8.
# ResNet-18 (small stem): 3 strided 3x3 convs, side -> (side - 1) // 2 + 1, each input >= 2: 5 -> 3 -> 2 -> 1,
# while 4 -> 2 -> 1 leaves the last strided conv a 1 px input.
@pytest.mark.parametrize("name,minimum", [("convnet1", 2), ("convnet3", 8), ("convnet6", 64),
                                          ("resnetap10", 8), ("resnet18", 5)])
def test_each_net_at_its_minimum_size(name, minimum):
    assert _forward(build_net(name, 4, 1, minimum, "batch"), 1, minimum).shape == (2, 4)
    with pytest.raises(UserError, match=f"at least {minimum} px"):
        build_net(name, 4, 1, minimum - 1, "batch")


# With instance norm a ResNet's last stage needs maps of at least 2x2: instance norm of a 1x1 map subtracts its only
# value, so the net output one constant for every image (chance accuracy, silently, before this check).
# ResNetAP-10: side // 8 >= 2 -> 16. ResNet-18: 9 -> 5 -> 3 -> 2, while 8 -> 4 -> 2 -> 1.
@pytest.mark.parametrize("name,minimum", [("resnetap10", 16), ("resnet18", 9)])
def test_a_resnet_with_instance_norm_needs_more_than_a_1x1_final_map(name, minimum):
    net = build_net(name, 4, 1, minimum, "instance").eval()
    with torch.no_grad():
        out = net(torch.randn(6, 1, minimum, minimum, generator=torch.Generator().manual_seed(0)))
    assert out.std(0).max() > 1e-3  # the outputs depend on the image
    with pytest.raises(UserError, match=f"instance norm.*at least {minimum} px"):
        build_net(name, 4, 1, minimum - 1, "instance")
    assert build_net(name, 4, 1, minimum - 1, "batch") is not None


def test_evaluate_cli_refuses_resnet18_at_2px(tmp_path, capsys):
    from memdistill.cli import main
    from memdistill.data import open_dataset
    from memdistill.imageset import write_image_set

    ds = open_dataset("digits", "train")
    keep = torch.cat([torch.nonzero(ds.targets == c).flatten()[:1] for c in range(10)])
    write_image_set(tmp_path / "set", ds.images[keep], ds.targets[keep], ds.class_names, {"method": "x"})
    code = main(["evaluate", "--train", str(tmp_path / "set"), "--test", "digits", "--net", "resnet18",
                 "--image-size", "2", "--epochs", "1", "--repeats", "1", "--device", "cpu",
                 "--out", str(tmp_path / "e")])
    assert code == 2
    assert "2 px is too small for ResNet-18: its down-sampling needs images of at least 5 px" in capsys.readouterr().err


def test_instance_norm_on_a_channels_last_input_equals_nchw_and_keeps_the_layout():
    # The bf16 CPU path of evaluate trains channels-last; the norm must compute exactly what it computes in
    # NCHW (torch's channels-last GroupNorm is a different, much slower kernel) and hand the layout back.
    from memdistill.nets import InstanceNorm

    torch.manual_seed(0)
    norm = InstanceNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 8, 6, 6)
    plain = nn.GroupNorm(8, 8)
    plain.load_state_dict(norm.state_dict())  # the same parameters under the same names
    out_nchw = norm(x)
    out_cl = norm(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(out_nchw, plain(x))
    assert torch.equal(out_cl, out_nchw)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    out_cl.sum().backward()  # gradients flow through the layout change
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()


def _input_conv_pair(channels: int, bias: bool = True):
    from memdistill.nets import InputConv

    torch.manual_seed(0)
    conv = InputConv(channels, 16, bias=bias)
    plain = nn.Conv2d(channels, 16, 3, padding=1, bias=bias)
    plain.load_state_dict(conv.state_dict())  # the same parameters under the same names
    return conv, plain


@pytest.mark.parametrize("bias", [True, False])  # ConvNet's input conv has a bias, ResNet's stem none
def test_the_compiled_input_conv_of_one_channel_images_under_bf16_on_a_cpu_is_a_matrix_product(monkeypatch, bias):
    # oneDNN's bf16 kernel for a single input channel was about a quarter of evaluate's compiled bf16 training
    # step on digits; compiled, the input conv computes the same sum as an im2col matrix product, channels-last.
    # (Compiling takes a minute on 2 cores: the traced branch is run eagerly here, benchmarks/bench_cpu.py runs
    # the compiled one.)
    conv, plain = _input_conv_pair(1, bias)
    x = torch.rand(5, 1, 7, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(x)
        expected.float().square().sum().backward()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: pytest.fail("oneDNN conv called"))
        out = conv(x)
        out.float().square().sum().backward()
    assert out.shape == expected.shape == (5, 16, 7, 9) and out.dtype == expected.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)  # both round to bf16
    pairs = [(conv.weight.grad, plain.weight.grad)] + ([(conv.bias.grad, plain.bias.grad)] if bias else [])
    for mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("compiling", [False, True])
def test_the_input_conv_is_nn_conv2d_eager_in_fp32_and_for_colour_images(monkeypatch, compiling):
    # eager the matrix product was slower than oneDNN's kernel: only the compiled one-channel bf16 case changes
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    cases = [(1, True, False), (3, True, False), (3, False, True), (1, False, False)]
    for channels, bias, autocast in cases + ([] if compiling else [(1, True, True), (1, False, True)]):
        conv, plain = _input_conv_pair(channels, bias)
        x = torch.rand(2, channels, 6, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.equal(conv(x), plain(x)), (channels, bias, autocast)


def test_the_instance_norm_being_compiled_normalises_in_the_inputs_own_layout(monkeypatch):
    # compiled, the plain GroupNorm is fused in the tensor's layout (no NCHW detour); the values are the same
    from memdistill.nets import InstanceNorm

    torch.manual_seed(0)
    norm = InstanceNorm(8)
    x = torch.randn(3, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    eager = norm(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("layout detour while compiling"))
    compiled_path = norm(x)
    monkeypatch.undo()
    torch.testing.assert_close(compiled_path, eager)


@pytest.mark.parametrize("shape, layout", [((1, 1, 1, 1), "contiguous"), ((2, 1, 2, 2), "channels_last"),
                                           ((1, 1, 3, 5), "transposed"), ((2, 1, 6, 4), "channels_last")])
def test_the_input_conv_matrix_product_matches_the_convolution_on_odd_inputs(monkeypatch, shape, layout):
    # 1x1 and 2x2 images, H != W, batches of 1 and 2, channels-last and non-contiguous inputs: the im2col path
    # (run eagerly as in the test above) gives nn.Conv2d's values and gradients, the input's gradient included
    conv, plain = _input_conv_pair(1)
    torch.manual_seed(1)
    n, c, h, w = shape
    x = torch.randn(n, c, w, h).transpose(2, 3) if layout == "transposed" else torch.randn(shape)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    assert x.shape == shape and (layout != "transposed" or not x.is_contiguous())
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(theirs)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: pytest.fail("oneDNN conv called"))
        out = conv(ours)
    weights = torch.randn(expected.shape)  # a gradient that differs per output element
    (expected.float() * weights).sum().backward()
    (out.float() * weights).sum().backward()
    assert out.shape == expected.shape == (n, 16, h, w) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    grads = ((ours.grad, theirs.grad), (conv.weight.grad, plain.weight.grad), (conv.bias.grad, plain.bias.grad))
    for mine, want in grads:
        torch.testing.assert_close(mine, want, rtol=3e-2, atol=5e-2)
