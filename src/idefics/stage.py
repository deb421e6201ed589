"""Decoded images handed from the image workers to the GPU, which resizes them (resize.py): a worker's share of a
photo's work drops to its decoding, about half of it (bench/pipeline.py: 1.75x the images/s of 16 workers).

The workers write each decoded image (H, W, 3 bytes) into a slab of memory they share with the parent (mapped
before they were forked, page-locked by the parent for CUDA); the parent's resizer thread takes the images waiting
(up to MAX_BATCH), copies them to the GPU, resizes and normalizes them there, one batch per image size, brings the
(3, size, size) float32 pixels back, the reference's values bit for bit, and frees their places. Nothing waits for
room in the slab: an image that finds none, or is too large for it, is resized by its worker as before. The resizer
checks once that the GPU's resize gives Pillow's pixels, and if it does not, stops the staging (every image is then
resized by the workers). Its GPU work runs on a stream of its own and never while the engine captures a CUDA graph
(graphs.CAPTURE)."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import multiprocessing
import queue
import threading
import warnings
import weakref
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from idefics import graphs, resize
from idefics.errors import reason
from idefics.images import ImageTransform

STAGE = 1 << 28  # bytes of the shared slab (256 MiB: 51 photos of 1600 x 1067, 5 of 16 megapixels)
CHUNK = 1 << 20  # its unit of allocation
MAX_BATCH = 16  # staged images resized together at most: 16 took 0.23 ms each, one alone 1.5 (H100)


class Staged(NamedTuple):
    offset: int  # in the slab, a multiple of CHUNK
    height: int
    width: int
    key: bytes  # the image's key for the encoder's cache: a hash of its encoded bytes and decode mode

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3


def _chunks(nbytes: int) -> int:
    """The CHUNKs of the slab that nbytes take."""
    return -(-nbytes // CHUNK)


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
        self.pinned = False

    def pin(self):
        """Page-lock the slab for CUDA (in the parent): its images then go to the GPU by DMA, at 50 GB/s where a
        copy from pageable memory ran at 15 (H100), with no copy by the CPU. A shared mapping stays shared in the
        workers forked after (no copy on write)."""
        anchor = ctypes.c_char.from_buffer(self.buffer)  # (keeps the mapping from being closed while pinned)
        address, nbytes = ctypes.addressof(anchor), len(self.buffer)
        cudart = torch.cuda.cudart()
        try:
            registered = cudart.cudaHostRegister(address, nbytes, 0) == cudart.cudaError.success
        except RuntimeError:  # (then copied from pageable memory: slower, the same pixels)
            registered = False
        if registered:
            self.pinned = True
            weakref.finalize(self, cudart.cudaHostUnregister, address)
            self._anchor = anchor

    def put(self, image: Image.Image, key: bytes) -> Staged | None:
        """In a worker: copy a decoded RGB image into a free run of the slab -> where it is, or None if there is
        no room (or staging is off)."""
        width, height = image.size
        n = height * width * 3
        chunks = _chunks(n)
        if not self.enabled.value or max(width, height) > resize.MAX_SIDE:
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
        start, chunks = s.offset // CHUNK, _chunks(s.nbytes)
        with self.used.get_lock():
            self.used[start : start + chunks] = bytes(chunks)


class Resizer:
    """In the parent: a thread that turns staged images into pixels on `device`, those waiting together (one
    batched resize per image size, one copy back). On the CPU it runs the same arithmetic (the tests')."""

    def __init__(self, stage: Stage, transform: ImageTransform, device: torch.device | str):
        self.stage, self.transform, self.device = stage, transform, torch.device(device)
        if self.device.type == "cuda":
            stage.pin()
        self.queue: queue.SimpleQueue | None = None  # the thread's: (Staged, Future), then None to stop it
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.checked = False
        self.stream = self.table = None  # made by the thread, on first use

    def submit(self, s: Staged) -> Future:
        """-> a Future of (pixels (3, size, size) float32 numpy, key); the slab's place is freed once it is done."""
        future = Future()
        with self.lock:
            if self.thread is None:  # (started again after a close: the pipeline's pool may start again too)
                self.queue = queue.SimpleQueue()
                self.thread = threading.Thread(target=self._run, args=(self.queue,), name="idefics-resize",
                                               daemon=True)
                self.thread.start()
            self.queue.put((s, future))
        return future

    def close(self):
        """Stop the thread once it has resized what was submitted."""
        with self.lock:
            if self.thread is not None:
                self.queue.put(None)
                self.thread = None

    def _run(self, todo: queue.SimpleQueue):
        while (item := todo.get()) is not None:
            batch = [item]
            while len(batch) < MAX_BATCH and not todo.empty():
                if (item := todo.get()) is None:
                    todo.put(None)
                    break
                batch.append(item)
            self._finish(batch)

    def _finish(self, batch: list[tuple[Staged, Future]]):
        staged = [s for s, _ in batch]
        try:
            pixels = None
            if self.stage.enabled.value and self._check():
                try:
                    pixels = self._on_device([self.stage.view(s) for s in staged])
                except RuntimeError:  # (out of device memory, say): resized here instead
                    pass
            if pixels is None:  # staging was turned off after these were staged: resized as a worker resizes
                pixels = [self.transform.pixels(Image.fromarray(self.stage.view(s))) for s in staged]
        except BaseException as e:  # noqa: BLE001 - the callers see it; the thread goes on
            for _, future in batch:
                future.set_exception(e)
            return
        finally:
            for s in staged:
                self.stage.give(s)
        for (s, future), x in zip(batch, pixels):
            future.set_result((x, s.key))

    def _on_device(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 each -> (3, size, size) float32 pixels each, resized and normalized on the device, one
        batch per image size; every copy is complete when it returns."""
        cuda = self.device.type == "cuda"
        if self.table is None:
            self.stream = torch.cuda.Stream(self.device) if cuda else None
            self.table = torch.from_numpy(self.transform.table).to(self.device)  # (3, 256) float32
        size = self.transform.image_size
        shapes: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            shapes.setdefault(image.shape, []).append(i)
        with graphs.CAPTURE, torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
            out = torch.empty(len(images), 3, size, size, device=self.device)
            for shape, members in shapes.items():
                x = torch.empty(len(members), *shape, dtype=torch.uint8, device=self.device)
                for j, i in enumerate(members):  # (from the pinned slab: copies by DMA, in order on the stream)
                    x[j].copy_(torch.from_numpy(images[i]), non_blocking=True)
                x = resize.resize(x, size).long()  # (n, 3, size, size)
                out[members] = torch.stack([self.table[c][x[:, c]] for c in range(3)], dim=1)
            host = torch.empty(out.shape, pin_memory=cuda)  # (pinned: copied back by DMA too)
            host.copy_(out, non_blocking=True)
            if cuda:
                self.stream.synchronize()
            return list(host.numpy())

    def _check(self) -> bool:
        """Once: the device's resize of a few images (wide, tall, small) against Pillow's. A mismatch (another
        Pillow's arithmetic) or a failure (a GPU without int8 products) turns staging off, with a warning."""
        if self.checked:
            return True
        rng = np.random.default_rng(0)
        problem = None
        try:
            for width, height in ((1600, 1067), (1067, 1600), (300, 1000), (1000, 300), (150, 100)):
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                if not np.array_equal(self._on_device([image])[0], self.transform.pixels(Image.fromarray(image))):
                    problem = f"does not give Pillow {Image.__version__}'s pixels"
                    break
        except RuntimeError as e:
            problem = f"failed ({reason(e)})"
        if problem is not None:
            self.stage.enabled.value = 0
            warnings.warn(f"resizing images on {self.device} {problem}: the image workers resize them again",
                          stacklevel=2)
            return False
        self.checked = True
        return True
