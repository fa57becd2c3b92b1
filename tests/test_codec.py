import json
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memdistill.codec import PixelCodec, VAECodec, cache_key, encode_dataset, make_codec  # noqa: E402
from memdistill.data import TensorImageDataset  # noqa: E402
from memdistill.errors import UserError  # noqa: E402


def _tiny_vae(folder, scaling_factor=0.5):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    _tiny_vae(folder)
    return folder


def _images(n=5, res=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1


def test_pixel_round_trip():
    codec = make_codec("pixel")
    x = _images()
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert codec.latent_shape((3, 16, 16)) == (3, 16, 16)
    assert codec.decode(torch.tensor([2.0, -3.0])).tolist() == [1.0, -1.0]
    assert json.loads(json.dumps(codec.config())) == {"name": "pixel"}


def test_vae_shapes_and_scaling_factor_from_config(vae_dir):
    from diffusers import AutoencoderKL

    codec = VAECodec(vae_dir)
    assert codec.scaling_factor == 0.5
    assert codec.latent_shape((3, 16, 16)) == (4, 8, 8)
    x = _images()
    z = codec.encode(x, generator=torch.Generator().manual_seed(3))
    assert z.shape == (5, 4, 8, 8)

    ref = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    with torch.no_grad():
        expect = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3)) * 0.5
        assert torch.allclose(z, expect, atol=1e-6)
        dec = codec.decode(z)
        expect_dec = ref.decode(z / 0.5).sample.clamp(-1, 1)
    assert dec.shape == (5, 3, 16, 16) and torch.allclose(dec, expect_dec, atol=1e-6)
    assert dec.min() >= -1 and dec.max() <= 1

    # batching does not change the deterministic decode
    codec.batch_size = 2
    assert torch.allclose(codec.decode(z), dec, atol=1e-6)
    with pytest.raises(UserError, match="multiple of .* factor 2"):
        codec.latent_shape((3, 15, 16))


def test_vae_scaling_factor_is_not_a_literal(tmp_path):
    _tiny_vae(tmp_path / "v", scaling_factor=0.25)
    codec = make_codec("vae", str(tmp_path / "v"))
    half = VAECodec(tmp_path / "v")
    half.scaling_factor = 0.5
    x = _images(2)
    z = codec.encode(x, generator=torch.Generator().manual_seed(0))
    z2 = half.encode(x, generator=torch.Generator().manual_seed(0))
    assert codec.scaling_factor == 0.25 and torch.allclose(z * 2, z2, atol=1e-6)


def test_vae_bad_folders_and_make_codec(tmp_path):
    with pytest.raises(UserError, match="VAE folder not found: .*missing"):
        VAECodec(tmp_path / "missing")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="unet is not a diffusers AutoencoderKL"):
        VAECodec(other)
    with pytest.raises(UserError, match="needs the path"):
        make_codec("vae")
    with pytest.raises(UserError, match="unknown codec 'vq': use one of pixel, vae"):
        make_codec("vq")


def _dataset(identity="toy:train"):
    images = _images(6, seed=7)
    return TensorImageDataset(images, torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], identity=identity)


def _count_posterior_calls(codec, monkeypatch) -> list[int]:
    calls = []
    real = codec.posterior
    monkeypatch.setattr(codec, "posterior", lambda x: calls.append(len(x)) or real(x))
    return calls


def test_encode_dataset_cache_hit(vae_dir, tmp_path, monkeypatch, caplog):
    codec = VAECodec(vae_dir)
    calls = _count_posterior_calls(codec, monkeypatch)
    ds = _dataset()
    cache = tmp_path / "cache"

    p1, y1 = encode_dataset(codec, ds, cache, batch_size=4)
    assert calls == [4, 2] and p1.mean.shape == p1.logvar.shape == (6, 1, 4, 8, 8) and y1.tolist() == [0, 1, 0, 1, 0, 1]
    assert (p1.scale, p1.shift) == (0.5, 0.0) and not p1.flips
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name == f"posterior-{cache_key(codec, ds)}.safetensors"

    with caplog.at_level(logging.INFO, logger="memdistill.codec"):
        p2, y2 = encode_dataset(codec, ds, cache, batch_size=4)
    assert calls == [4, 2]  # no new encode
    assert "cache hit" in caplog.text
    assert torch.equal(p1.mean, p2.mean) and torch.equal(p1.logvar, p2.logvar) and torch.equal(y1, y2)

    # without a cache: the same statistics
    p3, _ = encode_dataset(codec, ds, None, batch_size=4)
    assert torch.equal(p3.mean, p1.mean) and torch.equal(p3.logvar, p1.logvar)


@pytest.mark.parametrize("flip", [False, True])
def test_cached_posterior_draws_equal_encoding_on_the_fly(vae_dir, tmp_path, flip):
    """A draw from the cached statistics is the latent that encoding the (flipped) images on the fly gives with the
    same generator: the flips come first from it, then the posterior noise."""
    codec = VAECodec(vae_dir)
    ds = _dataset()
    encode_dataset(codec, ds, tmp_path / "cache", flip=flip)
    posterior, _ = encode_dataset(codec, ds, tmp_path / "cache", flip=flip)  # read back from the cache
    assert posterior.flips == flip
    idx = torch.tensor([4, 0, 3, 3, 1])
    z = posterior.draw(idx, torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    x = ds.images[idx]
    if flip:
        mirrored = torch.rand(len(idx), generator=g) < 0.5
        assert 0 < mirrored.sum() < len(idx)  # this seed mirrors some and keeps some
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    expect = codec.encode(x, generator=g)
    assert z.shape == expect.shape == (5, 4, 8, 8)
    assert torch.allclose(z, expect, rtol=1e-5, atol=1e-6)


def test_cache_key_depends_on_codec_and_dataset(vae_dir, tmp_path):
    import shutil

    ds = _dataset()
    shutil.copytree(vae_dir, tmp_path / "copy")
    a, b = VAECodec(vae_dir), VAECodec(tmp_path / "copy")
    assert a.config() != b.config()
    assert cache_key(a, ds) != cache_key(b, ds)
    assert cache_key(a, ds) == cache_key(VAECodec(vae_dir), _dataset())
    assert cache_key(a, ds) != cache_key(a, _dataset("toy:test"))
    # config() rebuilds the codec
    assert make_codec(**a.config()).config() == a.config()


@pytest.mark.parametrize("flip", [False, True])
def test_pixel_codec_needs_no_cache(tmp_path, flip):
    ds = _dataset()
    posterior, y = encode_dataset(PixelCodec(), ds, tmp_path / "cache", flip=flip)
    assert posterior.logvar is None and posterior.flips == flip and torch.equal(y, ds.targets)
    assert torch.equal(posterior.mean[:, 0], ds.images)
    if flip:
        assert torch.equal(posterior.mean[:, 1], ds.images.flip(-1))
    assert not (tmp_path / "cache").exists()


def test_a_cache_of_another_flip_setting_or_vae_is_never_returned(tmp_path, monkeypatch):
    """The key covers flipping, the channels and the VAE's weights (retrained in place, same folder and config),
    not the seed (the statistics do not depend on it)."""
    folder = tmp_path / "vae"
    _tiny_vae(folder)
    codec = VAECodec(folder)
    calls = _count_posterior_calls(codec, monkeypatch)
    ds = _dataset()
    cache = tmp_path / "cache"
    plain, _ = encode_dataset(codec, ds, cache)
    mirrored, _ = encode_dataset(codec, ds, cache, flip=True)
    assert calls == [6, 12] and len(list(cache.iterdir())) == 2  # the flip-off cache was not served to flip on
    assert mirrored.flips and torch.equal(mirrored.mean[:, 0], plain.mean[:, 0])
    assert torch.allclose(mirrored.mean[:, 1], codec.posterior(ds.images.flip(-1))[0], atol=1e-6)
    calls.clear()
    encode_dataset(codec, ds, cache)
    assert calls == []  # a hit

    key = cache_key(codec, ds)
    grey = TensorImageDataset(ds.images[:, :1], ds.targets, ds.class_names, identity=ds.identity)
    assert cache_key(codec, grey) != key

    vae = _tiny_vae(tmp_path / "other")  # other weights, the same config.json
    torch.manual_seed(5)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    vae.save_pretrained(folder)
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a coarse clock moves on
    retrained = VAECodec(folder)
    assert cache_key(retrained, ds) != key
    again, _ = encode_dataset(retrained, ds, cache)
    assert not torch.allclose(again.mean, plain.mean)


def test_old_format_cache_files_are_re_encoded_not_misread(vae_dir, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    codec = VAECodec(vae_dir)
    ds = _dataset()
    cache = tmp_path / "cache"
    cache.mkdir()
    # A file of the first format (one draw per image) under the old name, and one under the new name.
    one_draw = {"latents": torch.zeros(6, 4, 8, 8), "targets": ds.targets}
    save_file(one_draw, cache / "latents-0123456789abcdef01234567.safetensors")
    path = cache / f"posterior-{cache_key(codec, ds)}.safetensors"
    save_file({"mean": torch.zeros(6, 1, 4, 8, 8), "logvar": torch.zeros(6, 1, 4, 8, 8), "targets": ds.targets}, path,
              metadata={"format": "1"})
    calls = _count_posterior_calls(codec, monkeypatch)
    posterior, _ = encode_dataset(codec, ds, cache)
    assert calls == [6]
    assert torch.allclose(posterior.mean[:, 0], codec.posterior(ds.images)[0], atol=1e-6)
    calls.clear()
    encode_dataset(codec, ds, cache)  # rewritten in this format: now a hit
    assert calls == []


def test_cache_key_covers_replaced_files(tmp_path):
    """A file replaced by another of the same size is noticed (its modification time changes)."""
    from PIL import Image

    from memdistill.data import FolderImageDataset

    for c in ("a", "b"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "tree" / c / "0.bmp")
    before = FolderImageDataset(tmp_path / "tree", None).identity
    path = tmp_path / "tree" / "a" / "0.bmp"
    size = path.stat().st_size
    Image.new("RGB", (16, 16), (0, 0, 0)).save(path)  # same size, other pixels
    assert path.stat().st_size == size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a coarse clock still moves on
    assert FolderImageDataset(tmp_path / "tree", None).identity != before


def test_latent_cache_on_a_full_disk_is_one_line(vae_dir, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="disk is full"):
        encode_dataset(VAECodec(vae_dir), _dataset(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no tmp file left


def test_the_shipped_vae_resolves_by_name_and_is_recorded_by_name(monkeypatch, tmp_path):
    """--vae mnist5k-vae: the packaged autoencoder, 4x8x8 latents of 28 px digits (padded to 32), its scaling
    factor from train-vae; exports and manifests record the name, so they stay valid on another installation."""
    import memdistill.pretrained as pretrained
    from memdistill.codec import make_codec
    from memdistill.errors import UserError
    from memdistill.train import _resolved

    codec = make_codec("vae", "mnist5k-vae")
    assert codec.config() == {"name": "vae", "path": "mnist5k-vae"}
    assert codec.latent_shape((1, 28, 28)) == (4, 8, 8) and 0.4 < codec.scaling_factor < 0.55
    x = torch.zeros(2, 1, 28, 28) - 1
    assert codec.decode(codec.encode(x, torch.Generator().manual_seed(0))).shape == (2, 1, 28, 28)
    monkeypatch.chdir(tmp_path)
    assert _resolved("vae", "mnist5k-vae") == "mnist5k-vae"  # a name, not ./mnist5k-vae
    monkeypatch.setitem(pretrained.SHIPPED_VAES, "mnist5k-vae", "no-such-folder")
    with pytest.raises(UserError, match="shipped mnist5k-vae autoencoder is missing"):
        make_codec("vae", "mnist5k-vae")


def test_every_shipped_model_names_its_embedded_training_set():
    """The judge's and the modes' data default to a shipped model's own set: each shipped model must name one."""
    from memdistill.data import EMBEDDED
    from memdistill.pretrained import SHIPPED, SHIPPED_DATA

    assert set(SHIPPED_DATA) == set(SHIPPED) and set(SHIPPED_DATA.values()) <= set(EMBEDDED)
