"""CUDA graphs: capture a step once per shape key, then replay it. A replay launches every kernel of the step at
once, which removes the per-kernel launch cost that dominates small-batch decoding and short prefills."""
from __future__ import annotations

import threading
from typing import Callable, Hashable

import torch

SLOT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Held while a graph is captured: CUDA work that other threads of this process start (stage.py's resizes) waits
# for it, as a capture fails when another thread allocates or synchronizes meanwhile.
CAPTURE = threading.Lock()


def slot_bucket(n: int, limit: int) -> int:
    return min(next((b for b in SLOT_BUCKETS if b >= n), n), limit)


class Graphs:
    """fn() must read and write only buffers that outlive it (static addresses) and be idempotent: it runs twice
    to warm up (kernel selection, compilation, allocator) before capture."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}

    def run(self, key: Hashable, fn: Callable[[], object]):
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with CAPTURE, torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out
