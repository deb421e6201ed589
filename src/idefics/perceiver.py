"""Perceiver resampler: a fixed set of learned latents cross-attends to an image's vision tokens."""
from __future__ import annotations

import torch
from torch import nn

from idefics.config import PerceiverConfig
from idefics.layers import merge_heads, split_heads


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, c: PerceiverConfig):
        super().__init__()
        inner = c.n_heads * c.head_dim
        self.head_dim = c.head_dim
        self.context_norm = nn.LayerNorm(dim)
        self.latents_norm = nn.LayerNorm(dim)
        self.qk_norms = c.qk_layer_norms
        if c.qk_layer_norms:
            self.q_norm = nn.LayerNorm(c.head_dim)
            self.k_norm = nn.LayerNorm(c.head_dim)
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wkv = nn.Linear(dim, 2 * inner, bias=False)  # k, v fused
        self.wo = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context (N, T, D), latents (N, L, D) -> (N, L, D). Keys are the context and the latents together."""
        context, latents = self.context_norm(context), self.latents_norm(latents)
        q = split_heads(self.wq(latents), self.head_dim)  # (N, H, L, Dh)
        k, v = (split_heads(t, self.head_dim) for t in self.wkv(torch.cat([context, latents], 1)).chunk(2, -1))
        if self.qk_norms:
            q, k = self.q_norm(q), self.k_norm(k)
        # Softmax in the model's dtype, as the checkpoints were trained (a fused kernel's float32 softmax drifts
        # from them in bfloat16).
        scores = (q * self.head_dim**-0.5) @ k.transpose(-1, -2)  # (N, H, L, T + L)
        attn = (scores - scores.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        return self.wo(merge_heads(attn @ v))


class PerceiverMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(self.norm(x))))


class Perceiver(nn.Module):
    def __init__(self, dim: int, c: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(c.n_latents, dim))
        self.attn = nn.ModuleList(PerceiverAttention(dim, c) for _ in range(c.depth))
        self.mlp = nn.ModuleList(PerceiverMLP(dim, 4 * dim) for _ in range(c.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context (N, T, D) -> (N, n_latents, D)"""
        x = self.latents.expand(context.shape[0], -1, -1)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(context, x)
            x = x + mlp(x)
        return self.norm(x)
