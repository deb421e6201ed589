"""Images -> pixel tensors in a pool of worker threads, ahead of the model and overlapped with its work.

Each image is read, decoded, resized and normalized by one worker (Pillow lets go of the GIL while it decodes
and resizes, so threads run in parallel), and its decoded pixels are dropped as soon as it is resized: a worker
holds one full-size image at a time, and all workers together at most `memory` bytes of them (an image larger
than that is decoded alone).

decode "exact" gives the reference processor's pixel values bit for bit. decode "fast" lets JPEG decoding scale
the picture down by 2, 4 or 8 in the DCT (Pillow's draft mode) to the smallest size still at least the target on
both sides, before the same resize: several times less work on photos, slightly different pixels (measured in
bench/job.py and in tests/test_pipeline.py). Other formats decode as in "exact"."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image

from idefics.errors import IdeficsError
from idefics.images import ImageLimits, ImageTransform, load_image

DECODES = ("exact", "fast")
MEMORY = 1 << 29  # bytes of decoded images the workers may hold at once (512 MiB)
PILLOW_BLOCK = 1 << 30  # see _return_freed_images


def _return_freed_images():
    """Pillow allocates an image's pixels in blocks (16 MiB by default); glibc serves blocks under its mmap
    threshold (which rises up to 32 MiB as large blocks are freed) from per-thread heaps that keep what is freed, so
    each worker thread would go on holding a large photo's worth of memory after dropping it. With blocks larger
    than any image under the pixel limit, a large image is one block above that threshold: mapped for it alone and
    given back to the system when it is freed."""
    if Image.core.get_block_size() < PILLOW_BLOCK:
        Image.core.set_block_size(PILLOW_BLOCK)


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def check_workers(workers) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise IdeficsError(f"workers must be a positive integer, got {workers!r}")
    return workers


def check_decode(decode) -> str:
    if decode not in DECODES:
        raise IdeficsError(f"unknown image_decode {decode!r} (valid: {', '.join(DECODES)})")
    return decode


class Budget:
    """Bytes that threads take before a large allocation and give back after; a request larger than the whole
    budget waits until nothing else is taken, then runs alone."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self.changed = threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.total)
        with self.changed:
            self.changed.wait_for(lambda: self.free >= n)
            self.free -= n
        return n

    def give(self, n: int):
        with self.changed:
            self.free += n
            self.changed.notify_all()


def decoded_bytes(image: Image.Image) -> int:
    """What decoding an opened image allocates: Pillow keeps 1, 2 or 4 bytes a pixel (RGB takes 4)."""
    per_pixel = 1 if image.mode in ("1", "L", "P") else 2 if image.mode in ("LA", "I;16") else 4
    return image.size[0] * image.size[1] * per_pixel


class ImagePipeline:
    """Worker threads that turn image sources into (3, H, W) float32 pixel tensors."""

    def __init__(self, transform: ImageTransform, limits: ImageLimits = ImageLimits(), workers: int | None = None,
                 decode: str = "exact", memory: int | None = None):
        self.transform = transform
        self.limits = limits
        self.workers = check_workers(workers)
        self.decode = check_decode(decode)
        self.budget = Budget(MEMORY if memory is None else memory)
        _return_freed_images()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def submit(self, source, resized: bool = False) -> Future:
        """Start on one image -> a Future of its (3, H, W) pixels (or, resized, of the image at the model's size), or
        of the IdeficsError that says why not."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="idefics-images")
            return self._pool.submit(self.resized if resized else self.pixels, source)

    def pixels(self, source) -> torch.Tensor:
        """Load, decode, resize and normalize one image, in the calling thread -> (3, H, W) float32."""
        return self._load(source, self.transform.pixels)

    def resized(self, source) -> Image.Image:
        """Load, decode and resize one image, in the calling thread -> RGB at the model's size (what the processor
        turns into the same pixels as the source)."""
        return self._load(source, self.transform.resized)

    def _load(self, source, finish):
        taken = []
        size = (self.transform.image_size,) * 2

        def prepare(image: Image.Image):
            if self.decode == "fast":
                image.draft(None, size)  # JPEG only: the largest DCT scaling that keeps both sides >= size
            taken.append(self.budget.take(decoded_bytes(image)))

        try:
            image = load_image(source, self.limits, prepare)  # (a PIL image given as such is decoded already)
            return finish(image)
        finally:
            image = None  # the full-size pixels go before the budget is given back
            for n in taken:
                self.budget.give(n)

    def close(self):
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
