"""Decoded images handed from the image workers to the GPU, which resizes them (resize.py): a worker's share of a
photo's work drops to its decoding, about half of it (bench/job.py).

The workers write each decoded image (H, W, 3 bytes) into a slab of memory they share with the parent (mapped
before they were forked); the parent's resizer thread copies it to the GPU, frees its place, resizes and normalizes
it there, and brings the (3, size, size) float32 pixels back, the reference's values bit for bit. Nothing waits
for room in the slab: an image that finds none, or is too large for it, is resized by its worker as before. The
resizer checks once that the GPU's resize gives Pillow's pixels, and if it does not, stops the staging (every image
is then resized by the workers). Its GPU work runs on a stream of its own and never while the engine captures a
CUDA graph (graphs.CAPTURE)."""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import multiprocessing
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from idefics import graphs, resize
from idefics.images import ImageTransform

STAGE = 1 << 28  # bytes of the shared slab (256 MiB: sixteen workers' photos of 16 megapixels)
CHUNK = 1 << 20  # its unit of allocation


class Staged(NamedTuple):
    offset: int  # in the slab, a multiple of CHUNK
    height: int
    width: int
    key: bytes  # the image's key for the encoder's cache: a hash of its encoded bytes and decode mode

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3


def key_of(data: bytes, decode: str) -> bytes:
    """A staged image's key: its encoded bytes decoded the same way make the same pixels (a key of its own kind:
    the workers' keys of pixels, images.pixel_key, never equal one)."""
    h = hashlib.blake2b(digest_size=16, person=b"idefics-encoded")
    h.update(decode.encode())
    h.update(data)
    return h.digest()


class Stage:
    """The slab, its allocation table (one flag per CHUNK) and whether the workers stage at all; made before the
    workers are forked, shared with them."""

    def __init__(self, nbytes: int = STAGE):
        fork = multiprocessing.get_context("fork")
        self.buffer = mmap.mmap(-1, nbytes)  # anonymous and shared: what a worker writes, the parent reads
        self.used = fork.Array("b", nbytes // CHUNK)  # (its lock is a process-shared one)
        self.enabled = fork.Value("b", 1, lock=False)

    def put(self, image: Image.Image, key: bytes) -> Staged | None:
        """In a worker: copy a decoded RGB image into a free run of the slab -> where it is, or None if there is
        no room (or staging is off)."""
        width, height = image.size
        n = height * width * 3
        chunks = -(-n // CHUNK)
        if not self.enabled.value:
            return None
        with self.used.get_lock():
            start = bytes(self.used.get_obj()).find(bytes(chunks))
            if start < 0:
                return None
            self.used[start : start + chunks] = b"\1" * chunks
        offset = start * CHUNK
        self.buffer[offset : offset + n] = image.tobytes()
        return Staged(offset, height, width, key)

    def view(self, s: Staged) -> np.ndarray:
        """(H, W, 3) uint8 over the slab (valid until give)."""
        return np.frombuffer(self.buffer, np.uint8, s.nbytes, s.offset).reshape(s.height, s.width, 3)

    def give(self, s: Staged):
        start, chunks = s.offset // CHUNK, -(-s.nbytes // CHUNK)
        with self.used.get_lock():
            self.used[start : start + chunks] = bytes(chunks)


class Resizer:
    """In the parent: one thread that turns staged images into pixels on `device`."""

    def __init__(self, stage: Stage, transform: ImageTransform, device: torch.device):
        self.stage, self.transform, self.device = stage, transform, torch.device(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="idefics-resize")
        self.checked = False
        self.stream = self.table = None  # made by the thread, on first use

    def submit(self, s: Staged) -> Future:
        """-> a Future of (pixels (3, size, size) float32 numpy, key); the slab's place is freed once it is done."""
        try:
            return self.pool.submit(self._pixels, s)
        except RuntimeError:  # closed: resized in this thread
            future = Future()
            future.set_result(self._pixels(s))
            return future

    def _pixels(self, s: Staged):
        try:
            if self.stage.enabled.value and self._check():
                return self._on_device(self.stage.view(s)), s.key
            # Staging was turned off after this image was staged: resized here, as a worker resizes.
            return self.transform.pixels(Image.fromarray(self.stage.view(s))), s.key
        finally:
            self.stage.give(s)

    def _on_device(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, size, size) float32 pixels, resized and normalized on the device; every copy is
        complete when it returns."""
        cuda = self.device.type == "cuda"
        if self.table is None:
            self.stream = torch.cuda.Stream(self.device) if cuda else None
            self.table = torch.from_numpy(self.transform.table).to(self.device)  # (3, 256) float32
        with graphs.CAPTURE, torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
            x = resize.resize(torch.from_numpy(image).to(self.device), self.transform.image_size).long()
            return torch.stack([self.table[c][x[c]] for c in range(3)]).cpu().numpy()

    def _check(self) -> bool:
        """Once: the device's resize of a few images (wide, tall, small) against Pillow's. A mismatch (another
        Pillow's arithmetic) turns staging off, with a warning."""
        if self.checked:
            return True
        rng = np.random.default_rng(0)
        for width, height in ((1600, 1067), (1067, 1600), (300, 1000), (1000, 300), (150, 100)):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            if not np.array_equal(self._on_device(image), self.transform.pixels(Image.fromarray(image))):
                self.stage.enabled.value = 0
                warnings.warn(f"resizing images on {self.device} does not give Pillow {Image.__version__}'s pixels: "
                              "the image workers resize them again", stacklevel=2)
                return False
        self.checked = True
        return True

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
