"""Pillow's bicubic resize of an 8-bit RGB image, bit for bit, as products of float64 matrices on any torch device.

The reference processor resizes with PIL (`image.resize(size, BICUBIC)`): on one core a photo takes about as long to
resize as to decode. On a GPU the same arithmetic is a few matrix products. Pillow (libImaging/Resample.c) resizes
in two passes, one along each axis (which goes first: horizontal_first), each output byte a sum of input bytes
times fixed-point weights (double weights normalized per output pixel, times 2^22, rounded half away from zero),
plus 2^21, shifted right by 22 bits and clipped to 0..255. Every product and partial sum is an integer below 2^31
in magnitude, so float64 (53-bit mantissa) holds the sums exactly in any order: a dense product with the weights
gives Pillow's bytes.

    weights(in_size, out_size)      (out, in) int64: Pillow's fixed-point weights, zero outside each pixel's window
    resize(pixels, size, weights)   (H, W, 3) uint8 tensor -> (size, size, 3) uint8 on its device, Pillow's pixels
    agrees_with_pillow(size)        whether the installed Pillow resizes as modelled (checked on small images)

The image is turned into float64 a band of rows at a time, each band's share of the vertical sums added at once
(after its horizontal pass when that goes first), so memory stays within a few bands whatever the image's size."""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import PIL
import torch
from PIL import Image

PRECISION_BITS = 22  # Pillow's 8-bit fixed point: 32 bits - 8 for the pixel - 2 for the filter's overshoot
BAND_BYTES = 32 << 20  # float64 bytes of one band of rows
SUPPORT = 2.0  # the bicubic filter's half width, in input pixels at scale 1
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
Weights = Callable[[int, int], torch.Tensor]  # (in_size, out_size) -> weights() as float64 on the resize's device


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter (a = -0.5), its operations in its order."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's precompute_coeffs and normalize_coeffs_8bpc for the box (0, in_size) -> (out_size, in_size) int64,
    each row's weights in its window [xmin, xmin + count) and zero elsewhere. (Read-only: shared by every caller.)"""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # (out,)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)[None, :]  # (1, ksize)
    inside = x < count[:, None]
    w = np.where(inside, _bicubic(((x + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # left to right, as Pillow adds them (np.sum would pair them up)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    fixed = np.trunc(np.where(w < 0, -0.5 + w * (1 << PRECISION_BITS), 0.5 + w * (1 << PRECISION_BITS)))
    dense = np.zeros((out_size, in_size + ksize), dtype=np.int64)  # padded: a window may run past the edge (zeros)
    rows = np.repeat(np.arange(out_size), ksize)
    np.add.at(dense, (rows, (xmin[:, None] + x).ravel()), np.where(inside, fixed, 0).astype(np.int64).ravel())
    dense = dense[:, :in_size]
    dense.flags.writeable = False
    return dense


def cpu_weights(in_size: int, out_size: int) -> torch.Tensor:
    return torch.from_numpy(weights(in_size, out_size).astype(np.float64))


def _clip8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a fixed-point sum: (sum + 2^21) >> 22, clipped to 0..255 (float64 in, float64 out)."""
    half, unit = float(1 << (PRECISION_BITS - 1)), 2.0 ** -PRECISION_BITS
    return torch.floor((sums + half) * unit).clamp_(0, 255)


def horizontal_first(width: int, height: int, size: int) -> bool:
    """Which pass Pillow runs first. From 13.0 it runs the vertical one first when the height shrinks by more than
    twice as many pixels as the width does; before, always the horizontal one."""
    return PILLOW_MAJOR < 13 or not (height - size > 0 and height - size > (width - size) * 2)


@torch.no_grad()
def resize(pixels: torch.Tensor, size: int, weights_on: Weights = cpu_weights) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB -> (N, size, size, 3) or (size, size, 3) uint8 on the same device, equal
    to Pillow's np.asarray(image.resize((size, size), BICUBIC)) for each image. weights_on gives the weights there."""
    if pixels.dim() == 3:
        return resize(pixels[None], size, weights_on)[0]
    n, height, width, _ = pixels.shape
    across = weights_on(width, size).T  # (W, size)
    down = weights_on(height, size)  # (size, H)
    first = horizontal_first(width, height, size)
    # Rows of the output's sums, their columns (channel, x): each band of input rows adds its share to all of them.
    sums = torch.zeros(n, size, 3 * (size if first else width), dtype=torch.float64, device=pixels.device)
    band = max(1, BAND_BYTES // (n * width * 3 * 8))
    for top in range(0, height, band):
        x = pixels[:, top : top + band].permute(0, 1, 3, 2).to(torch.float64)  # (N, rows, 3, W)
        if first:
            x = _clip8(x @ across)  # (N, rows, 3, size): the horizontal pass's bytes
        rows = x.shape[1]
        sums.baddbmm_(down[:, top : top + rows].expand(n, -1, -1), x.reshape(n, rows, -1))
    out = _clip8(sums).view(n, size, 3, -1)  # (N, size, 3, size or W)
    if not first:
        out = _clip8(out @ across)  # the horizontal pass, on the vertical one's bytes
    return out.to(torch.uint8).transpose(2, 3)


@functools.cache
def agrees_with_pillow(size: int) -> bool:
    """Whether this Pillow resizes as modelled here, on small images of each shape (shrinking wide, tall and
    square, growing): a Pillow that changed its arithmetic or its order of passes keeps its own resize."""
    rng = np.random.default_rng(0)
    for width, height in ((3 * size, size + 7), (size + 5, 3 * size), (2 * size, 2 * size - 1), (size // 2, 9)):
        a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pillow = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))
        if not np.array_equal(resize(torch.from_numpy(a), size).numpy(), pillow):
            return False
    return True

