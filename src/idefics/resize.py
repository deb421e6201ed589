"""Pillow's bicubic resize of 8-bit RGB images, bit for bit, as matrix products on any torch device (the GPU's, for
the image pipeline: pipeline.py).

Pillow (libImaging/Resample.c) resizes in two passes, each output value a sum of at most 2 * ceil(2 * scale) + 1
input values times fixed-point coefficients (22 fractional bits, computed in double precision from the bicubic
filter, a = -0.5), plus a half, shifted right by 22 bits and clipped to 0..255; the image between the passes is
stored as 8 bits, so their order matters: horizontal first, except from Pillow 13 on, where an image losing more
than twice as many rows as columns is resized vertically first. Each pass here is one float64 product with the coefficients laid out as a banded
(out, in) matrix: every product of a byte and a coefficient (< 2^31) and every partial sum (< 2^40) is an integer
that float64 holds exactly, so the order of the sums (cuBLAS's, the CPU's) cannot change the result."""
from __future__ import annotations

import functools

import numpy as np
import PIL
import torch

PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2
SUPPORT = 2.0  # the bicubic filter's
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
ROWS = 256  # input rows per horizontal product: bounds the float64 copy of a large image on the device


def _bicubic(x: float) -> float:
    """Resample.c's bicubic_filter (a = -0.5), in the same order of double operations."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64: Pillow's fixed-point coefficients of one pass (precompute_coeffs, then
    normalize_coeffs_8bpc), each output's in its input columns, zero elsewhere. Python's floats are C doubles and
    Python does not contract a * b + c into one rounding, as Pillow's x86-64 build does not."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ss = 1.0 / filterscale
    k = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in w:
            ww += v
        for x, v in enumerate(w):
            v = v / ww if ww != 0.0 else v
            k[xx, xmin + x] = int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
    k.flags.writeable = False
    return k


@functools.lru_cache(maxsize=16)  # (a matrix of a 4000-pixel side is 7 MB)
def _on(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(coefficients(in_size, out_size).copy()).to(device)


def _shift(acc: torch.Tensor) -> torch.Tensor:
    """Resample.c's clip8 of the sums (float64 integers): add the half, shift right, clip to a byte."""
    return torch.floor((acc + (1 << (PRECISION_BITS - 1))) * (1.0 / (1 << PRECISION_BITS))).clamp_(0, 255)


def vertical_first(width: int, height: int, size: int) -> bool:
    """Whether the installed Pillow resizes this image's columns before its rows (ImagingResampleInner)."""
    return PILLOW_13 and height - size > 0 and height - size > (width - size) * 2


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """image (H, W, 3) uint8 -> (3, size, size) uint8: what PIL's Image.resize((size, size), BICUBIC) gives for the
    RGB image, computed on the image's device. The image is converted to float64 a band of ROWS rows at a time."""
    h, w, _ = image.shape
    kx = _on(w, size, image.device).T  # (W, size)
    ky = _on(h, size, image.device)  # (size, H)
    bands = [(r, image[r : r + ROWS].permute(2, 0, 1)) for r in range(0, h, ROWS)]  # (3, <= ROWS, W) uint8 views
    if vertical_first(w, h, size):  # (size, H) @ (3, H, W) summed band by band, then (3, size, W) @ (W, size)
        columns = sum(ky[:, r : r + band.shape[1]] @ band.to(torch.float64) for r, band in bands)
        return _shift(_shift(columns) @ kx).to(torch.uint8)
    rows = torch.cat([_shift(band.to(torch.float64) @ kx) for _, band in bands], dim=1)  # (3, H, size)
    return _shift(ky @ rows).to(torch.uint8)
