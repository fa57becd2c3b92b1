"""Every PIL mode is read into the right 8-bit range (pixels.image_to_array), in folders and in image sets."""

import json

import numpy as np
import pytest
from PIL import Image

from memdistill.data import FolderImageDataset, load_tensors
from memdistill.errors import UserError
from memdistill.imageset import read_image_set, write_image_set
from memdistill.pixels import image_to_array

RAMP16 = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)  # 8-bit: 0, 1, 128 / 255, 4, 254
RAMP8 = np.array([[0, 1, 128], [255, 4, 254]], dtype=np.uint8)


def _grey(im, channels=1):
    return image_to_array(im, channels)[:, :, 0]


@pytest.mark.parametrize("mode,raw", [("I;16", RAMP16.astype("<u2").tobytes()),
                                      ("I;16L", RAMP16.astype("<u2").tobytes()),
                                      ("I;16B", RAMP16.astype(">u2").tobytes())])
def test_sixteen_bit_modes_scale_by_257(mode, raw):
    im = Image.frombytes(mode, (3, 2), raw)
    assert np.array_equal(_grey(im), RAMP8)


def test_sixteen_bit_png_file_is_not_white(tmp_path):
    # The reported case: a 16-bit grey PNG read into a folder dataset (own size, grey kept).
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    Image.fromarray(RAMP16[:, :2].copy()).save(root / "a.png")
    with Image.open(root / "a.png") as im:
        assert im.mode.startswith("I")  # PIL hands 16-bit PNGs over as I;16 (or I)
    ds = FolderImageDataset(tmp_path / "data", ["c"], None)
    assert ds.channels == 1 and ds.resolution == 2
    x, _ = ds[0]
    assert np.array_equal(((x[0] + 1) * 127.5).round().byte().numpy(), RAMP8[:, :2])


def test_int32_mode_16bit_values_and_full_range():
    small = Image.fromarray(RAMP16.astype(np.int32))
    assert small.mode == "I" and np.array_equal(_grey(small), RAMP8)
    big = Image.fromarray(np.array([[0, 2 ** 31 - 1, 2 ** 30]], dtype=np.int32))
    assert _grey(big).tolist() == [[0, 255, 128]]
    with pytest.raises(UserError, match="negative"):
        image_to_array(Image.fromarray(np.array([[-1, 5]], dtype=np.int32)), 1)


def test_float_mode_unit_range_and_refusals():
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert im.mode == "F" and _grey(im).tolist() == [[0, 128, 255]]
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        image_to_array(Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32)), 1)
    with pytest.raises(UserError, match="NaN"):
        image_to_array(Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)), 1)


def test_bilevel_and_grey_to_rgb():
    im = Image.fromarray(np.array([[True, False]]))
    assert im.mode == "1" and _grey(im).tolist() == [[255, 0]]
    rgb = image_to_array(Image.fromarray(RAMP8), 3)
    assert rgb.shape == (2, 3, 3) and all(np.array_equal(rgb[:, :, c], RAMP8) for c in range(3))


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    assert image_to_array(pal, 3).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    pal.info["transparency"] = 1  # index 1 fully transparent: composited over black
    assert image_to_array(pal, 3).tolist() == [[[255, 0, 0], [0, 0, 0]]]


def test_alpha_is_composited_over_black():
    rgba = Image.fromarray(np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8))
    assert rgba.mode == "RGBA"
    assert image_to_array(rgba, 3).tolist() == [[[200, 100, 50], [0, 0, 0], [100, 50, 25]]]
    la = Image.fromarray(np.array([[[200, 255], [200, 0], [200, 51]]], np.uint8), "LA")
    assert _grey(la).tolist() == [[200, 0, 40]]
    assert _grey(la.convert("La")).tolist() == [[200, 0, 40]]
    assert image_to_array(rgba.convert("RGBa"), 3).tolist() == [[[200, 100, 50], [0, 0, 0], [100, 50, 25]]]
    pa = Image.new("PA", (1, 1))
    pa.putpalette([10, 20, 30] + [0] * 765)
    pa.putpixel((0, 0), (0, 0))
    assert image_to_array(pa, 3).tolist() == [[[0, 0, 0]]]


def test_cmyk_and_other_colour_spaces_convert_to_rgb():
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert image_to_array(cmyk, 3).tolist() == [[[255, 0, 0]]]
    ycc = Image.new("RGB", (1, 1), (10, 200, 30)).convert("YCbCr")
    assert np.abs(image_to_array(ycc, 3).astype(int) - [10, 200, 30]).max() <= 3
    assert image_to_array(Image.new("RGB", (1, 1), (0, 255, 0)), 1).tolist() == [[[150]]]  # ITU-R 601-2 luma


def test_unsupported_mode_is_refused_in_one_line(tmp_path):
    class Odd:
        mode = "I;32S"
    with pytest.raises(UserError, match="unsupported image mode 'I;32S'"):
        image_to_array(Odd(), 3)


def test_folder_refuses_an_unmappable_image_naming_it(tmp_path):
    root = tmp_path / "data" / "c"
    root.mkdir(parents=True)
    Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32)).save(root / "f.tiff")
    with pytest.raises(UserError, match=r"unreadable image .*f\.tiff .*\[0, 1\]"):
        FolderImageDataset(tmp_path / "data", ["c"], 2)


def test_image_set_reads_16bit_and_rgba_pngs(tmp_path):
    import torch

    out = write_image_set(tmp_path / "set", torch.zeros(2, 1, 2, 3 - 1), torch.tensor([0, 1]), ["a", "b"],
                          {"method": "x"})
    Image.fromarray(RAMP16[:, :2].copy()).save(out / "a" / "00000.png")  # 16-bit grey replaces 8-bit
    x, y, names, _ = read_image_set(out)
    assert np.array_equal(((x[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), RAMP8[:, :2])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["channels"] == 1 and names == ["a", "b"] and y.tolist() == [0, 1]
    loaded, _ = load_tensors(FolderImageDataset(out, ["a", "b"], 2))
    assert torch.equal(loaded[0], x[0])  # the same rule in a folder dataset
