"""The image encoder: vision tower + perceiver, batched, with a bounded cache keyed by each image's pixels, so an
image seen again (a second label, a resumed chat, a repeated photo) is not encoded again."""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from idefics.graphs import Graphs
from idefics.images import pixel_key
from idefics.model import IdeficsModel
from idefics.runtime import model_work, to_device

if TYPE_CHECKING:
    from idefics.engine import Prompt

GRAPHED_IMAGES = 64  # the largest image batch captured; n images run as the powers of two that add up to n


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="idefics-image-hash")


class ImageEncoder:
    """Vision tower + perceiver, batched, with a bounded cache keyed by the image's pixel content."""

    def __init__(self, model: IdeficsModel, capacity: int = 256, batch_size: int = 64, graphs: Graphs | None = None):
        self.model = model
        self.capacity = capacity
        self.batch_size = batch_size
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.graphs = graphs
        self.pixels: torch.Tensor | None = None  # static input of the captured encoders
        self.hits = self.misses = 0  # images found in the cache / encoded, since the start

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        """pixels: one image, (3, H, W) -> its images.pixel_key."""
        return pixel_key(pixels.detach().cpu().contiguous().numpy())

    @model_work
    def __call__(self, pixels: torch.Tensor | list[torch.Tensor], keys: list[bytes] | None = None) -> torch.Tensor:
        """pixels (N, 3, H, W), or a list of such taken one after another -> features (N, T_img, D_img), encoding only
        images not seen recently. keys: the images' `key`s where the caller has them (the image workers hash what
        they make): then the engine's thread neither hashes the images nor copies those found in the cache."""
        rows = list(pixels) if isinstance(pixels, torch.Tensor) else [row for part in pixels for row in part]
        if keys is None:
            rows = [row.detach().cpu().contiguous() for row in rows]
            keys = list(_hash_pool().map(self.key, rows)) if len(rows) > 1 else [self.key(row) for row in rows]
        assert len(keys) == len(rows), "one key per image"
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        first = {k: keys.index(k) for k in todo}
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        w = self.model.embed.weight
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            x = to_device(torch.stack([rows[first[k]] for k in chunk]), w.device).to(w.dtype)
            for k, f in zip(chunk, self._encode(x)):
                self.cache[k] = f.clone()
        out = [self.cache[k] for k in keys]
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        if not out:
            c = self.model.config
            return torch.zeros(0, c.image_seq_len, c.image_dim, dtype=w.dtype, device=w.device)
        return torch.stack(out)

    def of_prompts(self, prompts: list[Prompt]) -> torch.Tensor:
        """The images of prompts, one prompt's after another -> features (sum N, T_img, D_img), given their keys
        where every prompt carries them."""
        keys = None if any(p.keys is None for p in prompts) else [k for p in prompts for k in p.keys]
        return self([p.pixels for p in prompts], keys)

    def warmup(self):
        """Capture the encoders now (see Engine.warmup): one per power of two up to GRAPHED_IMAGES."""
        if self.graphs is None:
            return
        w, size = self.model.embed.weight, self.model.config.vision.image_size
        for n in (1 << i for i in range(GRAPHED_IMAGES.bit_length())):
            self._encode(torch.zeros(n, 3, size, size, dtype=w.dtype, device=w.device))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, 3, H, W), n <= batch_size, through captured graphs: 13 images run as 8 + 4 + 1, no padding. The
        engine's thread, which launches them, shares the interpreter with the image workers: a replay is a few
        calls where an eager encoder is hundreds, each waiting its turn while the workers decode."""
        n = x.shape[0]
        if self.graphs is None or n > GRAPHED_IMAGES:
            return self.model.encode_images(x)
        if self.pixels is None:
            self.pixels = torch.zeros(GRAPHED_IMAGES, *x.shape[1:], dtype=x.dtype, device=x.device)
        out, start = [], 0
        for m in (1 << i for i in reversed(range(n.bit_length()))):
            if n & m:
                self.pixels[:m] = x[start : start + m]
                features = self.graphs.run(("encode", m), lambda m=m: self.model.encode_images(self.pixels[:m]))
                # Copied before the next replay: graphs share one memory pool, so another graph's replay may write
                # where this one's output lies.
                out.append(features.clone())
                start += m
        return out[0] if len(out) == 1 else torch.cat(out)
