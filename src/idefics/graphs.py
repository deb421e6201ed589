"""CUDA graphs for the decode step: one capture per (slot bucket, attended-length bucket), replayed every step.

A replay launches the whole step (every layer, every kernel) at once, which removes the per-kernel launch cost
that dominates a batch-1 decode step."""
from __future__ import annotations

from typing import Callable

import torch

SLOT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def slot_bucket(n: int, limit: int) -> int:
    return min(next((b for b in SLOT_BUCKETS if b >= n), n), limit)


class DecodeGraphs:
    """step(n, kv_len) -> logits must use only static buffers. Capturing runs it (warm-up) with `state` saved and
    restored around, so capture has no visible effect."""

    def __init__(self, step: Callable[[int, int], torch.Tensor], state: Callable[[], torch.Tensor], slots: int):
        self.step = step
        self.state = state
        self.slots = slots
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, n: int, kv_len: int) -> torch.Tensor:
        key = (slot_bucket(n, self.slots), kv_len)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, n: int, kv_len: int):
        saved = self.state().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernel selection, compilation, allocator
                self.step(n, kv_len)
                self.state().copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(n, kv_len)
        self.state().copy_(saved)
        return graph, out
