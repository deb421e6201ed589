"""The IDEFICS decoder: LLaMA layers, each cross_layer_interval-th preceded by a gated cross-attention block
that reads the image latents. Plain math: caches, batching and quantization live elsewhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefics.config import IdeficsConfig
from idefics.layers import RMSNorm, SwiGLU, apply_rope, merge_heads, rope_cos_sin, rope_inv_freq, split_heads
from idefics.perceiver import Perceiver
from idefics.vision import VisionTower


class SelfAttention(nn.Module):
    def __init__(self, c: IdeficsConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=False)  # q, k, v fused
        self.wo = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0):
        """x (B, S, D); mask (B, 1, S, S_kv) bool or additive; cache.update returns all keys/values so far."""
        b, s, _ = x.shape
        h = self.heads
        qkv = self.wqkv(x).view(b, s, 3 * h, self.head_dim)
        qk = apply_rope(qkv[:, :, : 2 * h], cos, sin)  # q and k rotated together: (B, S, 2H, Dh)
        q, k, v = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2), qkv[:, :, 2 * h :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S_kv, Dh)
        return self.wo(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class CrossAttention(nn.Module):
    def __init__(self, c: IdeficsConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.wq = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.wkv = nn.Linear(c.image_dim, 2 * c.hidden_size, bias=False)  # k, v fused, from image features
        self.wo = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.qk_norms = c.qk_layer_norms
        if c.qk_layer_norms:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, T_img, D_img) -> k, v (B, H, T_img, Dh). Done once per sequence, not per step."""
        k, v = (split_heads(t, self.head_dim) for t in self.wkv(images).chunk(2, dim=-1))
        return (self.k_norm(k) if self.qk_norms else k), v

    def forward(self, x, kv, mask):
        """x (B, S, D); kv from project(); mask (B, 1, S, T_img) additive (0 or -inf-like)."""
        if kv[0].shape[2] == 0:  # a batch without any image: nothing to attend to
            return torch.zeros_like(x)
        q = split_heads(self.wq(x), self.head_dim)
        if self.qk_norms:
            q = self.q_norm(q)
        return self.wo(merge_heads(F.scaled_dot_product_attention(q, *kv, attn_mask=mask)))


class GatedCrossBlock(nn.Module):
    """x + tanh(a) * cross_attn(x) (zero for tokens that see no image), then x + tanh(b) * mlp(x)."""

    def __init__(self, c: IdeficsConfig):
        super().__init__()
        gate_shape = (1,) if c.alpha_type == "float" else (1, 1, c.hidden_size)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = CrossAttention(c)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.mlp_gate = nn.Parameter(torch.zeros(gate_shape))

    def forward(self, x, kv, mask, sees_image):
        """sees_image (B, S, 1) bool: tokens with no image before them get no cross-attention output."""
        h = self.attn(self.attn_norm(x), kv, mask)
        x = x + torch.tanh(self.attn_gate) * h.masked_fill(~sees_image, 0.0)
        # The dense part is not gated per token: every token goes through it.
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: IdeficsConfig, has_cross: bool):
        super().__init__()
        self.cross = GatedCrossBlock(c) if has_cross else None
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = SelfAttention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, c.hidden_act)


class IdeficsModel(nn.Module):
    def __init__(self, c: IdeficsConfig):
        super().__init__()
        self.config = c
        self.vision = VisionTower(c.vision)
        self.perceiver = Perceiver(c.image_dim, c.perceiver) if c.use_resampler else None
        # Base and additional vocabularies in one table: ids >= vocab_size are the additional tokens.
        self.embed = nn.Embedding(c.total_vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(c, has_cross=i % c.cross_layer_interval == 0) for i in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.total_vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def reset_buffers(self):
        """Recompute non-persistent buffers (needed after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device=self.embed.weight.device)

    @property
    def cross_layers(self) -> list[GatedCrossBlock]:
        return [layer.cross for layer in self.layers if layer.cross is not None]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> image features (N, T_img, D_img): vision tower, then the perceiver if any."""
        h = self.vision(pixels)
        return self.perceiver(h) if self.perceiver is not None else h

    def image_kv(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, n_img * T_img, D_img): one sequence's image features in order -> (k, v) per cross block."""
        return [cross.attn.project(images) for cross in self.cross_layers]

    def forward(self, ids, pos, mask, image_kv, image_mask, cache=None, logits_at: torch.Tensor | None = None):
        """ids, pos (B, S); mask (B, 1, S, S_kv) for self-attention; image_kv from image_kv();
        image_mask (B, S, T_img_total) bool: which image tokens each text token attends to.
        Returns logits (B, S, V), or (B, 1, V) at one position per row with logits_at (B,)."""
        x = self.embed(ids)
        cos, sin = rope_cos_sin(pos, self.inv_freq, x.dtype)
        cross_mask = torch.zeros(image_mask.shape, dtype=x.dtype, device=x.device)
        cross_mask = cross_mask.masked_fill(~image_mask, torch.finfo(x.dtype).min)[:, None]  # (B, 1, S, T)
        sees_image = image_mask.any(dim=-1, keepdim=True)  # (B, S, 1)
        kv = iter(image_kv)
        for i, layer in enumerate(self.layers):
            if layer.cross is not None:
                x = layer.cross(x, next(kv), cross_mask, sees_image)
            x = x + layer.attn(layer.attn_norm(x), cos, sin, mask, cache, i)
            x = x + layer.mlp(layer.mlp_norm(x))
        if logits_at is not None:
            x = x.gather(1, logits_at.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        return self.lm_head(self.norm(x))
