"""Reading any PIL image into 8-bit pixels of 1 or 3 channels: the one rule for folder datasets and image sets.

The rule, by PIL mode (values are mapped linearly so that the mode's full range becomes 0..255):

- ``L``, ``RGB``: as stored.
- ``1`` (bilevel): 0 -> 0, 1 -> 255.
- ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey, e.g. 16-bit PNG/TIFF): v / 257, rounded, so
  0 -> 0 and 65535 -> 255 (257 = 65535 / 255: each 8-bit level is exactly 257 16-bit levels).
- ``I`` (32-bit signed int): PIL hands 16-bit files over in this mode too, so values that all fit in
  0..65535 are read as 16-bit (v / 257); larger values are read against the non-negative int32 range
  (v * 255 / (2**31 - 1)). Negative values are refused: no range maps them without a guess.
- ``F`` (32-bit float): the float convention of imaging libraries, 0.0 = black and 1.0 = white (v * 255);
  values outside [0, 1] or not finite are refused, since their range is unknown.
- Alpha (``LA``, ``La``, ``RGBA``, ``RGBa``, ``PA``, and ``P`` with transparency): composited over black,
  i.e. the colour times its opacity (premultiplied): a transparent pixel contributes no light. One fixed
  background for every image keeps a folder consistent.
- ``P`` (palette): its palette colours; ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``: PIL's conversion to RGB.
- Any other mode is refused with one line.

Grey becomes RGB by repeating the channel; colour becomes grey by PIL's ITU-R 601-2 luma (``convert("L")``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import UserError

SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# Modes whose pixels carry no colour: a folder of only these is read with one channel (``--channels auto``).
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"}) | SIXTEEN_BIT
_TO_RGB = frozenset({"P", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"})
_INT32_MAX = 2 ** 31 - 1


def is_grey_mode(mode: str) -> bool:
    """True for PIL modes without colour (grey, bilevel, 16/32-bit grey, float, grey + alpha)."""
    return mode in GREY_MODES


def _scaled(values: np.ndarray, top: float) -> np.ndarray:
    """values in 0..top -> uint8 0..255, rounded to nearest."""
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _premultiplied(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour (H, W[, C]) over black with uint8 alpha (H, W)."""
    if colour.ndim == 3:
        alpha = alpha[:, :, None]
    return np.rint(colour.astype(np.float64) * alpha.astype(np.float64) / 255.0).astype(np.uint8)


def eight_bit(im: Image.Image) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB uint8 array of a loaded image of any supported mode (see the module
    rule); raises UserError for a mode or value range it cannot map."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8)
    if mode == "1":
        return np.asarray(im, dtype=bool).astype(np.uint8) * 255
    if mode in SIXTEEN_BIT:
        return _scaled(np.asarray(im).astype(np.uint32), 65535)
    if mode == "I":
        v = np.asarray(im, dtype=np.int64)
        low, high = (int(v.min()), int(v.max())) if v.size else (0, 0)
        if low < 0:
            raise UserError(f"32-bit integer image with negative values (min {low}): no range to map it to "
                            "0..255; convert it to 8 or 16 bits")
        return _scaled(v, 65535 if high <= 65535 else _INT32_MAX)
    if mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if v.size and not np.isfinite(v).all():
            raise UserError("float image with NaN or infinite values")
        if v.size and (v.min() < 0.0 or v.max() > 1.0):
            raise UserError(f"float image with values {v.min():g}..{v.max():g}: float images must lie in "
                            "[0, 1] (0 = black, 1 = white)")
        return _scaled(v, 1.0)
    # Premultiplied modes: the colour channels already are the composite over black.
    if mode == "La":
        return np.asarray(im, dtype=np.uint8)[:, :, 0]
    if mode == "RGBa":
        return np.asarray(im, dtype=np.uint8)[:, :, :3]
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "RGBA"):
        a = np.asarray(im, dtype=np.uint8)
        return _premultiplied(a[:, :, 0] if mode == "LA" else a[:, :, :3], a[:, :, -1])
    if mode in _TO_RGB:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise UserError(f"unsupported image mode {mode!r}; convert the image to 8-bit grey or RGB")


def image_to_array(im: Image.Image, channels: int) -> np.ndarray:
    """A loaded PIL image as a uint8 (H, W, channels) array, channels 1 or 3 (see the module rule).

    Raises UserError (without the file name: the caller adds it) for a mode or value range it cannot map.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    a = eight_bit(im)
    if a.ndim == 2:  # grey
        return a[:, :, None] if channels == 1 else np.repeat(a[:, :, None], 3, axis=2)
    if channels == 3:
        return a
    return np.asarray(Image.fromarray(a, "RGB").convert("L"), dtype=np.uint8)[:, :, None]
