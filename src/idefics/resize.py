"""Pillow's bicubic resize of 8-bit RGB images, bit for bit, as integer matrix products on any torch device (the
GPU's int8 tensor cores, for the image pipeline: stage.py).

Pillow (libImaging/Resample.c) resizes in two passes, each output value a sum of at most 2 * ceil(2 * scale) + 1
input values times fixed-point coefficients (22 fractional bits, computed in double precision from the bicubic
filter, a = -0.5), plus a half, shifted right by 22 bits and clipped to 0..255; the image between the passes is
stored as 8 bits, so their order matters: horizontal first, except from Pillow 13 on, where an image losing more
than twice as many rows as columns is resized vertically first. Here each pass is three int8 products: the bytes
offset by -128 times each of the three signed bytes of every coefficient (laid out as a banded (out, in) matrix),
summed exactly in int32 and recombined in int64, so nothing is rounded before Pillow's own shift."""
from __future__ import annotations

import functools

import numpy as np
import PIL
import torch

PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2
SUPPORT = 2.0  # the bicubic filter's
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
PRODUCT_ROWS = 1 << 15  # lines per int8 product (with its three int32 results: 1 + 85 MB for 1600 x 224 values)
MAX_SIDE = 1 << 16  # the longest side resized here: 2^16 products of at most 2^14 stay under 2^31


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


def coefficients(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) int64: Pillow's fixed-point coefficients of one pass (precompute_coeffs, then
    normalize_coeffs_8bpc), each output's in its input columns, zero elsewhere. Python's floats are C doubles and
    Python does not contract a * b + c into one rounding, as Pillow's x86-64 build does not. (Not kept: _digits
    keeps what the products need, a quarter of the bytes.)"""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ss = 1.0 / filterscale
    k = np.zeros((out_size, in_size), dtype=np.int64)
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
    return k


def vertical_first(width: int, height: int, size: int) -> bool:
    """Whether the installed Pillow resizes this image's columns before its rows (ImagingResampleInner)."""
    return PILLOW_13 and height - size > 0 and height - size > (width - size) * 2


@functools.lru_cache(maxsize=16)  # (a side of 4000 pixels: 2.7 MB)
def _digits(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's coefficients as three signed bytes each, k = d2 * 2^16 + d1 * 2^8 + d0 (|k| < 2^23) -> digits (3,
    out, in) int8, padded with zeros to multiples of 8 (the int8 product's shapes), and each output's 128 * sum(k)
    (out,) int64, which the inputs' offset by -128 (bytes as int8) takes away."""
    k = coefficients(in_size, out_size)
    offset = 128 * k.sum(axis=1)
    digits = np.zeros((3, -(-out_size // 8) * 8, -(-in_size // 8) * 8), dtype=np.int8)
    for i in range(3):
        low = ((k + 128) & 255) - 128
        digits[i, :out_size, :in_size] = low
        k = (k - low) >> 8
    assert not k.any(), "a coefficient outside 24 signed bits"
    return torch.from_numpy(digits).to(device), torch.from_numpy(offset).to(device)


def _int8_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ b (K, N) int8 (column-major) -> (M, N) int32, exact (|sums| < K * 2^14 < 2^31). On CUDA the
    int8 tensor cores (at least 17 rows); elsewhere float64, whose sums of such integers are exact too."""
    if a.device.type != "cuda":
        return (a.double() @ b.double()).int()
    if a.shape[0] > 16:
        return torch._int_mm(a, b)
    return torch._int_mm(torch.cat([a, a.new_zeros(17 - a.shape[0], a.shape[1])]), b)[: a.shape[0]]


def _pass(lines: torch.Tensor, out_size: int) -> torch.Tensor:
    """One of Pillow's passes: lines (R, L) uint8, each row resized along its L values -> (R, out_size) uint8."""
    r, length = lines.shape
    digits, offset = _digits(length, out_size, lines.device)
    a = lines.bitwise_xor(128).view(torch.int8)  # x - 128
    if length % 8:
        a = torch.nn.functional.pad(a, (0, digits.shape[2] - length))
    out = torch.empty(r, out_size, dtype=torch.uint8, device=lines.device)
    for start in range(0, r, PRODUCT_ROWS):
        part = a[start : start + PRODUCT_ROWS]
        sums = offset + (1 << (PRECISION_BITS - 1))  # (out,) int64, then (rows, out)
        for i in range(3):
            sums = sums + (_int8_products(part, digits[i].T)[:, :out_size].long() << (8 * i))
        out[start : start + PRODUCT_ROWS] = (sums >> PRECISION_BITS).clamp_(0, 255)  # clip8
    return out


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """images (N, H, W, 3) uint8 (or one, (H, W, 3)) -> (N, 3, size, size) uint8 (or (3, size, size)): what PIL's
    Image.resize((size, size), BICUBIC) gives for each RGB image, computed on the images' device."""
    if images.dim() == 3:
        return resize(images[None], size)[0]
    n, h, w, _ = images.shape
    assert max(h, w) <= MAX_SIDE, "sums of int8 products past 2^31"
    if vertical_first(w, h, size):  # along the columns, (N, 3, W, H) lines, then along the rows
        columns = _pass(images.permute(0, 3, 2, 1).reshape(n * 3 * w, h), size).view(n, 3, w, size)
        return _pass(columns.transpose(2, 3).reshape(n * 3 * size, w), size).view(n, 3, size, size)
    rows = _pass(images.permute(0, 3, 1, 2).reshape(n * 3 * h, w), size).view(n, 3, h, size)
    return _pass(rows.transpose(2, 3).reshape(n * 3 * size, h), size).view(n, 3, size, size).transpose(2, 3)
