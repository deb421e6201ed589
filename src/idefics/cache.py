"""Preallocated caches: self-attention keys/values per slot, and each slot's cross-attention keys/values.

Active sequences always occupy the slots [0, n): a leaving sequence's slot is refilled by moving the last one
down, so a decode step works on plain views and never gathers the cache."""
from __future__ import annotations

import torch


class KVCache:
    """Self-attention cache, (layers, slots, heads, max_len, head_dim) for keys and for values.

    Before a forward pass the caller points the cache at the slots it runs (`rows`), the positions the new
    tokens are written to (`pos`, (B, S)) and how many key positions attention reads (`kv_len`)."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, slots, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.rows = slice(0, slots)
        self.pos: torch.Tensor | None = None
        self.kv_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, S, Dh) written at self.pos -> all keys/values of these rows, (B, H, kv_len, Dh)."""
        kc, vc = self.k[layer, self.rows], self.v[layer, self.rows]
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        kc[b, :, self.pos] = k.transpose(1, 2)  # (B, S, H, Dh) at [row, :, pos]
        vc[b, :, self.pos] = v.transpose(1, 2)
        return kc[:, :, : self.kv_len], vc[:, :, : self.kv_len]

    def copy_slot(self, src: int, dst: slice | int):
        self.k[:, dst] = self.k[:, src : src + 1]
        self.v[:, dst] = self.v[:, src : src + 1]

    def reorder(self, rows: slice, order: torch.Tensor):
        """Beam search: rows[i] takes the cache of rows[order[i]]."""
        self.k[:, rows] = self.k[:, rows][:, order]
        self.v[:, rows] = self.v[:, rows][:, order]


class ImageKV:
    """Cross-attention keys/values of each slot's images: per cross block (slots, heads, max_image_tokens, Dh),
    and for each slot the image tokens its generated tokens attend to (those of its last image)."""

    def __init__(self, blocks: int, slots: int, heads: int, max_tokens: int, head_dim: int, dtype, device):
        shape = (blocks, slots, heads, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.visible = torch.zeros(slots, max_tokens, dtype=torch.bool, device=device)
        self.max_tokens = max_tokens

    def set(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], visible: torch.Tensor):
        """kv per block (1, H, T, Dh) with T <= max_tokens; visible (T,) bool."""
        t = visible.shape[0]
        for i, (k, v) in enumerate(kv):
            self.k[i, slot, :, :t] = k[0]
            self.v[i, slot, :, :t] = v[0]
        self.visible[slot] = False
        self.visible[slot, :t] = visible

    def copy_slot(self, src: int, dst: slice | int):
        self.k[:, dst] = self.k[:, src : src + 1]
        self.v[:, dst] = self.v[:, src : src + 1]
        self.visible[dst] = self.visible[src : src + 1]

    def view(self, rows: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i, rows], self.v[i, rows]) for i in range(self.k.shape[0])]
