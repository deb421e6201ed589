"""Pillow's bicubic resize of an 8-bit RGB image, bit for bit, as products of float64 matrices on any torch device.

The reference processor resizes with PIL (`image.resize(size, BICUBIC)`): on one core a photo takes longer to
resize than to decode. On a GPU the same arithmetic is a few matrix products. Pillow (libImaging/Resample.c)
resizes in two passes, one along each axis (which goes first: horizontal_first), each output byte a sum of input
bytes times fixed-point weights (double weights normalized per output pixel, times 2^22, rounded half away from
zero), plus 2^21, shifted right by 22 bits and clipped to 0..255. Every product and partial sum is an integer below
2^31 in magnitude, so float64 (53-bit mantissa) holds the sums exactly in any order: a dense product with the
weights gives Pillow's bytes.

    weights(in_size, out_size)   (out, in) int64: Pillow's fixed-point weights, zero outside each pixel's window
    resize(image, size, device)  PIL RGB image -> (size, size, 3) uint8 numpy, Pillow's pixels
    agrees_with_pillow(size)     whether the installed Pillow resizes as modelled (checked on small images)

The image goes to the device a band of rows at a time, each band's share of the vertical sums added at once (after
its horizontal pass when that goes first), so device memory stays within a few bands whatever the image's size."""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import PIL
import torch
from PIL import Image

PRECISION_BITS = 22  # Pillow's 8-bit fixed point: 32 bits - 8 for the pixel - 2 for the filter's overshoot
BAND_BYTES = 32 << 20  # float64 bytes of one band of rows on the device
BICUBIC = Image.Resampling.BICUBIC
SUPPORT = 2.0  # the bicubic filter's half width, in input pixels at scale 1
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter (a = -0.5), its operations in its order."""
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's precompute_coeffs and normalize_coeffs_8bpc for the box (0, in_size) -> (out_size, in_size) int64,
    each row's weights in its window [xmin, xmin + count) and zero elsewhere."""
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
    return dense[:, :in_size]


def _clip8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a fixed-point sum: (sum + 2^21) >> 22, clipped to 0..255 (float64 in, float64 out)."""
    half, unit = float(1 << (PRECISION_BITS - 1)), 2.0 ** -PRECISION_BITS
    return torch.floor((sums + half) * unit).clamp_(0, 255)


class _PerThread(threading.local):
    """Each thread's CUDA stream (its resizes wait for nothing else on the device, the model's work included) and its
    weights on the device, made on that stream (no other stream reads them while they are copied, nor frees them
    under another's kernel); a few sizes kept."""

    def __init__(self):
        self.weights: dict = {}
        self.streams: dict = {}

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return contextlib.nullcontext()
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return torch.cuda.stream(self.streams[device])

    def get(self, in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
        key = (in_size, out_size, device)
        if key not in self.weights:
            if len(self.weights) >= 8:
                self.weights.pop(next(iter(self.weights)))
            self.weights[key] = torch.from_numpy(weights(in_size, out_size)).to(device, torch.float64)
        return self.weights[key]


_thread = _PerThread()


def horizontal_first(width: int, height: int, size: int) -> bool:
    """Which pass Pillow runs first. From 13.0 it runs the vertical one first when the height shrinks by more than
    twice as many pixels as the width does; before, always the horizontal one."""
    return PILLOW_MAJOR < 13 or not (height - size > 0 and height - size > (width - size) * 2)


@torch.no_grad()
def resize(image: Image.Image, size: int, device: torch.device | str) -> np.ndarray:
    """An RGB image -> (size, size, 3) uint8, equal to np.asarray(image.resize((size, size), BICUBIC))."""
    assert image.mode == "RGB", image.mode
    device = torch.device(device)
    with _thread.stream(device):
        return _resize(image, size, device)


def _resize(image: Image.Image, size: int, device: torch.device) -> np.ndarray:
    width, height = image.size
    across = _thread.get(width, size, device).T  # (W, size)
    down = _thread.get(height, size, device)  # (size, H)
    first = horizontal_first(width, height, size)
    # Rows of the output's sums, their columns (channel, x): each band of input rows adds its share to all of them.
    sums = torch.zeros(size, 3 * (size if first else width), dtype=torch.float64, device=device)
    band = max(1, BAND_BYTES // (width * 3 * 8))
    for top in range(0, height, band):
        rows = min(band, height - top)
        # (rows, W, 3) uint8; np.array, not asarray: torch wants the writable copy
        x = torch.from_numpy(np.array(image.crop((0, top, width, top + rows)))).to(device)
        x = x.permute(0, 2, 1).to(torch.float64)  # (rows, 3, W)
        if first:
            x = _clip8(x @ across)  # (rows, 3, size): the horizontal pass's bytes
        sums.addmm_(down[:, top : top + rows], x.reshape(rows, -1))
    out = _clip8(sums).view(size, 3, -1)  # (size, 3, size or W)
    if not first:
        out = _clip8(out @ across)  # the horizontal pass, on the vertical one's bytes
    return out.to(torch.uint8).transpose(1, 2).cpu().numpy()


@functools.cache
def agrees_with_pillow(size: int) -> bool:
    """Whether this Pillow resizes as modelled here, on small images of each shape (shrinking wide, tall and
    square, growing): a Pillow that changed its arithmetic or its order of passes keeps its own resize."""
    rng = np.random.default_rng(0)
    for width, height in ((3 * size, size + 7), (size + 5, 3 * size), (2 * size, 2 * size - 1), (size // 2, 9)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if not np.array_equal(resize(image, size, "cpu"), np.asarray(image.resize((size, size), BICUBIC))):
            return False
    return True
