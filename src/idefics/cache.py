"""Preallocated caches: self-attention keys/values per slot, and each slot's cross-attention keys/values.

A sequence keeps its slot from prefill to release; a decode step runs the slots [0, m) on plain views and never
gathers the cache."""
from __future__ import annotations

import torch


class KVCache:
    """Self-attention cache, (layers, slots, heads, max_len, head_dim) for keys and for values. A forward pass gets
    `at(...)`: the rows it runs, where its new tokens go and how much it reads, with the one method the model
    calls."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, slots, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def at(self, rows: slice | torch.Tensor, pos: torch.Tensor, kv_len: int | None) -> Rows:
        """rows: a slice of slots, or (B,) slot indices; pos (B, S) where the new tokens are written; kv_len: how many
        key positions attention reads (None: a prefill from position 0, which attends to the new keys alone)."""
        return Rows(self, rows, pos, kv_len)

    def copy_slot(self, src: int, dst: int):
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def reorder(self, slots: torch.Tensor, sources: torch.Tensor):
        """Beam search: slots[i] takes the cache of sources[i] (both (n,) slot indices)."""
        self.k[:, slots] = self.k[:, sources]
        self.v[:, slots] = self.v[:, sources]


class Rows:
    """The cache as one forward pass sees it."""

    def __init__(self, cache: KVCache, rows: slice | torch.Tensor, pos: torch.Tensor, kv_len: int | None):
        self.cache, self.rows, self.pos, self.kv_len = cache, rows, pos, kv_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, S, Dh) written at pos -> the keys/values to attend to, (B, H, kv_len, Dh)."""
        c = self.cache
        # Written through the whole buffer (not a view of it) so that a compiled step updates it in place.
        rows = self.rows if isinstance(self.rows, torch.Tensor) else \
            torch.arange(self.rows.start, self.rows.stop, device=k.device)
        c.k[layer, rows[:, None], :, self.pos] = k.transpose(1, 2)  # (B, S, H, Dh) at [layer, row, :, pos]
        c.v[layer, rows[:, None], :, self.pos] = v.transpose(1, 2)
        if self.kv_len is None:
            return k, v
        return c.k[layer, self.rows, :, : self.kv_len], c.v[layer, self.rows, :, : self.kv_len]


class ImageKV:
    """Cross-attention keys/values of each slot's images: per cross block (slots, heads, max_image_tokens, Dh),
    and for each slot the image tokens its generated tokens attend to (those of its last image)."""

    def __init__(self, blocks: int, slots: int, heads: int, max_tokens: int, head_dim: int, dtype, device):
        shape = (blocks, slots, heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.visible = torch.zeros(slots, max_tokens, dtype=torch.bool, device=device)
        self.max_tokens = max_tokens

    def set(self, slots: slice | torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], visible: torch.Tensor):
        """slots: B slots (a slice, or a device tensor of indices); kv per block (B, H, T, Dh) with T <= max_tokens;
        visible (B, T) bool."""
        t = visible.shape[1]
        for i, (k, v) in enumerate(kv):
            self.k[i, slots, :, :t] = k
            self.v[i, slots, :, :t] = v
        row = visible.new_zeros(visible.shape[0], self.max_tokens)  # (a device tensor: a graph can capture this)
        row[:, :t] = visible
        self.visible[slots] = row

    def copy_slot(self, src: int, dst: int):
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.visible[dst] = self.visible[src : src + 1]

    def view(self, rows: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i, rows], self.v[i, rows]) for i in range(self.k.shape[0])]
