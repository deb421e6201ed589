"""Small building blocks shared by the vision tower, the perceiver and the decoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation '{name}' (known: {', '.join(ACTIVATIONS)})") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 (inside rms_norm), rounded to the weight's dtype before the scale, as LLaMA does.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(self.weight.dtype)


class SwiGLU(nn.Module):
    """LLaMA MLP: w2(act(x @ w1) * (x @ w3)); w1 (gate) and w3 (up) are stored fused as w13."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(self.act(gate) * up)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, S) -> cos, sin (B, S, 1, D), computed in float32 then cast."""
    freqs = pos[..., None].float() * inv_freq  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, D): rotate the two halves of the head dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)"""
    b, s, d = x.shape
    return x.view(b, s, d // head_dim, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H*D)"""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
