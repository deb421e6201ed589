"""The device's side of the images that the workers hand over (pipeline.py, arena.py): one thread of this process
that takes every image waiting, copies each to the device, resizes those of one size together (resize.py, Pillow's
bytes), looks their normalized values up there, copies them back, and gives their pages back.

One thread and few launches: this process's interpreter also launches the model's work, and every operation here
holds it for a moment; images of one size share each launch. The wait for the device sleeps (a blocking event)
instead of spinning a core that the workers decode on. Its work runs on a stream of its own, so it does not wait for
the model's steps, nor they for it."""
from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future
from typing import NamedTuple

import torch
from PIL import Image

from idefics.arena import Arena
from idefics.errors import IdeficsError, reason
from idefics.images import ImageTransform
from idefics.resize import cpu_weights, resize


class Handed(NamedTuple):
    """A decoded RGB image a worker left in the arena: its bytes at offset, (H, W, 3), and its key for the
    encoder's cache (images.source_key)."""
    offset: int
    shape: tuple[int, int, int]
    key: bytes

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * 3


class Resizer:
    """resize(handed) -> a Future of ((3, size, size) float32 numpy pixels, key), the processor's transform applied
    (on the host, by Pillow, if the device fails)."""

    def __init__(self, arena: Arena, device: torch.device | str, transform: ImageTransform):
        self.arena, self.device, self.transform = arena, torch.device(device), transform
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.weights: dict[tuple[int, int], torch.Tensor] = {}
        threading.Thread(target=self._run, name="idefics-resize", daemon=True).start()

    def resize(self, handed: Handed) -> Future:
        future = Future()
        self.waiting.put((handed, future))
        return future

    def close(self):
        self.waiting.put(None)

    def _run(self):
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext(), torch.no_grad():
            table = torch.from_numpy(self.transform.table).to(self.device)
            while True:
                batch = [self.waiting.get()]  # everything waiting: one launch per size for all of them
                while not self.waiting.empty():
                    batch.append(self.waiting.get())
                by_shape: dict[tuple, list] = {}
                for handed, future in filter(None, batch):
                    if future.set_running_or_notify_cancel():
                        by_shape.setdefault(handed.shape, []).append((handed, future))
                    else:
                        self.arena.give(handed.offset, handed.size)
                for shape, group in by_shape.items():
                    self._resize(shape, group, table, cuda)
                if None in batch:  # closed
                    return

    def _on_device(self, in_size: int, out_size: int) -> torch.Tensor:
        if (in_size, out_size) not in self.weights:
            if len(self.weights) >= 16:
                self.weights.pop(next(iter(self.weights)))
            self.weights[in_size, out_size] = cpu_weights(in_size, out_size).to(self.device)
        return self.weights[in_size, out_size]

    def _resize(self, shape: tuple[int, int, int], group: list, table: torch.Tensor, cuda: bool):
        size = self.transform.image_size
        try:
            x = torch.empty((len(group), *shape), dtype=torch.uint8, device=self.device)
            for i, (handed, _) in enumerate(group):  # (pinned pages: the copies are the device's DMA)
                x[i].copy_(torch.from_numpy(self.arena.array(handed.offset, shape)), non_blocking=True)
            out = resize(x, size, self._on_device)  # (N, size, size, 3) uint8
            out = table.gather(1, out.permute(3, 0, 1, 2).reshape(3, -1).long())  # (3, N * size * size)
            out = out.view(3, len(group), size, size).transpose(0, 1)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=cuda)
            host.copy_(out, non_blocking=cuda)
            if cuda:
                done = torch.cuda.Event(blocking=True)  # (the wait sleeps)
                done.record()
                done.synchronize()
            results = [(host[i].numpy(), handed.key) for i, (handed, _) in enumerate(group)]
        except Exception:  # noqa: BLE001 - the device's failure (out of memory): Pillow, here
            results = [self._on_host(handed) for handed, _ in group]
        for (handed, future), result in zip(group, results):
            self.arena.give(handed.offset, handed.size)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _on_host(self, handed: Handed):
        try:
            image = Image.fromarray(self.arena.array(handed.offset, handed.shape))
            return self.transform.pixels(image), handed.key
        except Exception as e:  # noqa: BLE001 - its one-line error
            return IdeficsError(f"cannot resize image ({reason(e)})")
