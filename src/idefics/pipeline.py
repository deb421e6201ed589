"""Images -> pixel tensors in a pool of worker processes, ahead of the model and overlapped with its work.

Each image is read, decoded, resized, normalized and hashed (its key for the encoder's cache) by one worker, and
its decoded pixels are dropped as soon as it is resized: a worker holds one full-size image at a time, and all
workers together at most `memory` bytes of them (an image larger than that is decoded alone).

Workers are processes, not threads: the engine's thread launches the GPU's work from this interpreter, and while
sixteen decoding threads shared it, every launch waited its turn (an encoder call of one image took 10 to 50 ms
while photos loaded, against 2 ms after: bench/job_trace.py). The processes are forked when the first image comes,
so they start at once and never import the caller's script again; they run only Pillow and numpy code and return
each image's pixels (600 kB) and key. Images given as PIL images are already decoded: they are resized in a thread
of this process instead, as are images asked for only resized (ranked classification's). A worker that dies (a
decoder crash, the out-of-memory killer) fails the images then in flight, each with a one-line error, and the next
image starts a fresh pool; workers whose process was killed outright end within a second.

A pipeline made with resize_on (a CUDA device: idefics.load's) leaves an RGB image not at the model's size
decoded in a slab of memory shared with this process, where there is room, and the GPU resizes and normalizes it
(stage.py): a worker's share of a photo is then its decoding alone, and the images' keys hash their encoded bytes.

decode "exact" gives the reference processor's pixel values bit for bit. decode "fast" lets JPEG decoding scale
the picture down by 2, 4 or 8 in the DCT (Pillow's draft mode) to the smallest size still at least the target on
both sides, before the same resize: several times less work on photos, slightly different pixels (measured in
bench/job.py and in tests/test_pipeline.py). Other formats decode as in "exact"."""
from __future__ import annotations

import gc
import multiprocessing
import os
import stat
import threading
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import torch
from PIL import Image

from idefics.errors import IdeficsError
from idefics.images import ImageLimits, ImageTransform, decode as decode_image, describe, load_image, pixel_key, \
    source_bytes
from idefics.stage import Resizer, Stage, Staged, key_of

DECODES = ("exact", "fast")
MEMORY = 1 << 29  # bytes of decoded images the workers may hold at once (512 MiB)
PILLOW_BLOCK = 1 << 30  # see _return_freed_images


class Pixels(NamedTuple):
    pixels: torch.Tensor  # (3, H, W) float32
    key: bytes  # images.pixel_key of the pixels


def _return_freed_images():
    """Pillow allocates an image's pixels in blocks (16 MiB by default); glibc serves blocks under its mmap
    threshold (which rises up to 32 MiB as large blocks are freed) from per-thread heaps that keep what is freed, so
    each worker would go on holding a large photo's worth of memory after dropping it. With blocks larger than any
    image under the pixel limit, a large image is one block above that threshold: mapped for it alone and given
    back to the system when it is freed."""
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
    """Bytes that workers take before a large allocation and give back after; a request larger than the whole
    budget waits until nothing else is taken, then runs alone. Shared by the processes forked after it is made."""

    def __init__(self, total: int):
        self.total = total
        fork = multiprocessing.get_context("fork")
        self.free = fork.Value("q", total)  # (its lock is a process-shared one)
        self.changed = fork.Condition(self.free.get_lock())

    def take(self, n: int) -> int:
        n = min(n, self.total)
        with self.changed:
            self.changed.wait_for(lambda: self.free.value >= n)
            self.free.value -= n
        return n

    def give(self, n: int):
        with self.changed:
            self.free.value += n
            self.changed.notify_all()


def decoded_bytes(image: Image.Image) -> int:
    """What decoding an opened image allocates: Pillow keeps 1, 2 or 4 bytes a pixel (RGB takes 4)."""
    per_pixel = 1 if image.mode in ("1", "L", "P") else 2 if image.mode in ("LA", "I;16") else 4
    return image.size[0] * image.size[1] * per_pixel


def prepare(source, transform: ImageTransform, limits: ImageLimits, decode: str, resized: bool = False,
            budget: Budget | None = None):
    """Load, decode, resize and normalize one image, in the calling thread or process -> ((3, H, W) float32 numpy
    pixels, their key); resized: the image at the model's size instead (what the processor turns into the same
    pixels as the source). budget: the pipeline's (in a worker process: the one it was started with). In a worker
    of a pipeline that stages images (stage.py), an RGB image not at the model's size yet is left decoded in the
    slab if there is room: -> its Staged."""
    budget = budget or _worker_budget
    taken = []
    size = (transform.image_size,) * 2

    def opened(image: Image.Image):
        if decode == "fast":
            image.draft(None, size)  # JPEG only: the largest DCT scaling that keeps both sides >= size
        taken.append(budget.take(decoded_bytes(image)))

    try:
        if _worker_stage is not None and not resized and not isinstance(source, Image.Image):
            data = source_bytes(source, limits)
            image = decode_image(data, describe(source), limits, opened)
            if image.size != size and image.info.get("transparency") is None:  # (RGB, as decoded)
                if (staged := _worker_stage.put(image, key_of(data, decode))) is not None:
                    return staged
        else:
            image = load_image(source, limits, opened)  # (a PIL image given as such is decoded already)
        if resized:
            return transform.resized(image)
        x = transform.pixels(image)
        return x, pixel_key(x)
    finally:
        image = None  # the full-size pixels go before the budget is given back
        for n in taken:
            budget.give(n)


_worker_budget: Budget | None = None  # in a worker process, its pipeline's budget
_worker_stage: Stage | None = None  # and its slab, where the pipeline stages images
PARENT_CHECK = 0.5  # seconds between a worker's checks that its parent is alive


def _worker_started(budget: Budget, stage: Stage | None, parent: int):
    global _worker_budget, _worker_stage
    # (handed over at the fork: shared locks, counters and memory cannot travel with each image)
    _worker_budget, _worker_stage = budget, stage
    _return_freed_images()
    _drop_inherited_sockets()
    _exit_with(parent)


def _exit_with(parent: int):
    """End this worker once the process that forked it has ended. A parent killed outright (SIGKILL, the out-of-memory
    killer) runs no cleanup, and its workers, which hold their own ends of the pool's pipes, would wait for work
    forever. (Not the kernel's parent-death signal: it follows the thread that forked, which may end long before
    the process.)"""
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK)
        os._exit(0)

    threading.Thread(target=watch, name="idefics-parent-watch", daemon=True).start()


def _drop_inherited_sockets():
    """A forked worker holds a copy of every descriptor its parent had open: a server's listening socket and its
    clients' connections would stay open in the workers after the server closed them (a client would never see its
    connection end). The workers use none of them (the pool talks through pipes): each is pointed at /dev/null,
    which keeps its number taken, so that nothing still holding the number closes another file by it."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc (not Linux)
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        try:
            if fd != null and stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.dup2(null, fd)
        except OSError:  # (the descriptor that listed the directory, closed since)
            pass
    os.close(null)


class ImagePipeline:
    """Worker processes (and, for images given decoded, threads) that turn image sources into Pixels."""

    def __init__(self, transform: ImageTransform, limits: ImageLimits = ImageLimits(), workers: int | None = None,
                 decode: str = "exact", memory: int | None = None, resize_on: torch.device | str | None = None):
        """resize_on: the device where the workers' decoded images are resized (stage.py; a GPU's is the point, any
        other runs the same arithmetic), None: the workers resize them."""
        self.transform = transform
        self.limits = limits
        self.workers = check_workers(workers)
        self.decode = check_decode(decode)
        self.budget = Budget(MEMORY if memory is None else memory)
        self.resizer = Resizer(Stage(), transform, resize_on) if resize_on is not None else None
        _return_freed_images()
        self._processes: ProcessPoolExecutor | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        weakref.finalize(self, _shut, self.__dict__)

    def submit(self, source, resized: bool = False) -> Future:
        """Start on one image -> a Future of its Pixels (or, resized, of the PIL image at the model's size), or of
        the IdeficsError that says why not."""
        args = (source, self.transform, self.limits, self.decode, resized)
        if isinstance(source, Image.Image) or resized:
            with self._pool_lock:
                if self._threads is None:
                    self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="idefics-images")
                future = self._threads.submit(prepare, *args, self.budget)
            return future if resized else _Then(future, _as_pixels)
        with self._pool_lock:
            if self._processes is not None:
                try:
                    return _Then(self._processes.submit(prepare, *args), self._done)
                except BrokenProcessPool:  # a worker died since the last image: a fresh pool for this one
                    self._processes.shutdown(wait=False, cancel_futures=True)
            # Every Pillow plugin imported before the fork: a thread importing one at that moment (Image.open's
            # first call imports them) holds its module's lock, which the workers would inherit held and wait on
            # forever. Image.init waits for such an import to end.
            Image.init()
            stage = self.resizer.stage if self.resizer is not None else None
            self._processes = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                                  initializer=_worker_started,
                                                  initargs=(self.budget, stage, os.getpid()))
            # The first submit forks every worker. Objects frozen then are left alone by the workers' garbage
            # collector, which would otherwise write to the pages holding them and so copy much of the interpreter
            # into each worker (tests/test_pipeline.py's twelve photos: 1.33 GB, against 0.86 frozen); the caller's
            # collector gets them back at once.
            gc.freeze()
            try:
                return _Then(self._processes.submit(prepare, *args), self._done)
            finally:
                gc.unfreeze()

    def _done(self, result) -> Pixels | Future:
        """A worker's result -> its Pixels, or for a staged image the Future of the resizer's."""
        return self.resizer.submit(result) if isinstance(result, Staged) else _as_pixels(result)

    def pixels(self, source) -> torch.Tensor:
        """Load, decode, resize and normalize one image, in the calling thread -> (3, H, W) float32."""
        x, _ = prepare(source, self.transform, self.limits, self.decode, budget=self.budget)
        return torch.from_numpy(x)

    def close(self):
        _shut(self.__dict__)


def _shut(state: dict):
    with state["_pool_lock"]:
        for name in ("_processes", "_threads"):
            if state[name] is not None:
                state[name].shutdown(wait=False, cancel_futures=True)
                state[name] = None
    if state["resizer"] is not None:
        state["resizer"].close()


def _as_pixels(result) -> Pixels:
    x, key = result
    return Pixels(torch.from_numpy(x), key)


class _Then(Future):
    """A Future of fn(inner's result), whose cancel() cancels the inner one (if it has not started). Where fn returns
    a Future (a staged image's resize), this one ends with that one's result, through _as_pixels."""

    def __init__(self, inner: Future, fn):
        super().__init__()
        self.inner = inner
        inner.add_done_callback(lambda f: self._finish(f, fn))

    def cancel(self) -> bool:
        self.inner.cancel()
        return super().cancel()

    def _finish(self, f: Future, fn):
        if f.cancelled():
            super().cancel()
            return
        error = f.exception()
        if isinstance(error, BrokenProcessPool):  # a worker that died is one image's one-line error
            error = IdeficsError("the image worker decoding it stopped (it crashed or ran out of memory)")
        # fn runs even for a cancelled Future: a staged image's place in the slab is freed by its resize.
        result = fn(f.result()) if error is None else None
        if isinstance(result, Future):  # (not cancelled with this one: it frees the slab)
            result.add_done_callback(lambda g: self._finish(g, _as_pixels))
        elif self.cancelled():
            return
        elif error is not None:
            self.set_exception(error)
        else:
            self.set_result(result)
