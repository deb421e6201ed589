"""CLIP-style ViT image tower (idefics: ViT-H/14 from LAION's OpenCLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefics.config import VisionConfig
from idefics.layers import activation, merge_heads, split_heads


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wqkv(self.norm1(x)).chunk(3, dim=-1)  # (N, T, D) each
        q, k, v = (split_heads(t, self.head_dim) for t in (q, k, v))
        x = x + self.wo(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        d = c.embed_dim
        self.class_embed = nn.Parameter(torch.empty(d))
        # Holds the checkpoint's (D, C, p, p) weight; forward runs it as a matrix product.
        self.patch_embed = nn.Conv2d(c.num_channels, d, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.pos_embed = nn.Parameter(torch.empty(c.num_patches + 1, d))
        self.pre_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_hidden_layers))
        # Loaded for completeness: CLIP applies it to the pooled class token, which IDEFICS never uses.
        self.post_norm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, C, H, W) -> hidden states of the last layer (N, 1 + num_patches, D), no final norm."""
        # The convolution (stride = kernel) as one matrix product over the patches: cuDNN would run a float32
        # convolution in TF32 on CUDA by default, and float32 must stay float32 (matmuls do unless told otherwise).
        w = self.patch_embed.weight  # (D, C, p, p)
        n, c, p = pixels.shape[0], w.shape[1], w.shape[2]
        rows, cols = pixels.shape[2] // p, pixels.shape[3] // p
        patches = pixels[:, :, : rows * p, : cols * p].to(w.dtype).reshape(n, c, rows, p, cols, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, c * p * p)  # (N, P, C*p*p), row-major
        x = patches @ w.flatten(1).T  # (N, P, D)
        x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return x
