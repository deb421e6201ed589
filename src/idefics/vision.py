"""CLIP-style ViT image tower (idefics: ViT-H/14 from LAION's OpenCLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefics.config import VisionConfig
from idefics.layers import activation, add_norm, merge_heads, split_heads


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        d = c.embed_dim
        self.head_dim = c.head_dim
        self.norm1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.wqkv = nn.Linear(d, 3 * d)  # q, k, v fused
        self.wo = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(d, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, d)
        self.act = activation(c.hidden_act)

    def attend(self, n: torch.Tensor) -> torch.Tensor:
        """n = norm1(x) -> what the attention adds to x."""
        q, k, v = self.wqkv(n).chunk(3, dim=-1)  # (N, T, D) each
        q, k, v = (split_heads(t, self.head_dim) for t in (q, k, v))
        return self.wo(merge_heads(F.scaled_dot_product_attention(q, k, v)))

    def feed(self, n: torch.Tensor) -> torch.Tensor:
        """n = norm2(x) -> what the MLP adds to x."""
        return self.fc2(self.act(self.fc1(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.feed(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        d = c.embed_dim
        self.class_embed = nn.Parameter(torch.empty(d))
        self.patch_embed = nn.Conv2d(c.num_channels, d, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.pos_embed = nn.Parameter(torch.empty(c.num_patches + 1, d))
        self.pre_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_hidden_layers))
        # Loaded for completeness: CLIP applies it to the pooled class token, which IDEFICS never uses.
        self.post_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, H, W) -> hidden states of the last layer (N, 1 + num_patches, D), no final norm."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, D)
        x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed
        x = add_norm(x, None, self.pre_norm)[1]
        # Each block's forward, with its last residual add joined to the next block's first norm (add_norm).
        added = None
        for layer in self.layers:
            x, n = add_norm(x, added, layer.norm1)
            x, n = add_norm(x, layer.attend(n), layer.norm2)
            added = layer.feed(n)
        return x + added if added is not None else x
