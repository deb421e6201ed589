"""The IDEFICS decoder: LLaMA layers, each cross_layer_interval-th preceded by a gated cross-attention block
that reads the image latents. Plain math: caches, batching and quantization live elsewhere."""
from __future__ import annotations

from typing import NamedTuple

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

    def attend(self, qkv, cos, sin, mask, cache=None, layer: int = 0):
        """qkv (B, S, 3 * H * Dh): wqkv's output; mask (B, 1, S, S_kv) bool or additive; cache.update returns all
        keys/values so far -> attention's output (B, S, H * Dh), before wo."""
        b, s, _ = qkv.shape
        h = self.heads
        qkv = qkv.view(b, s, 3 * h, self.head_dim)
        qk = apply_rope(qkv[:, :, : 2 * h], cos, sin)  # q and k rotated together: (B, S, 2H, Dh)
        q, k, v = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2), qkv[:, :, 2 * h :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S_kv, Dh)
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


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

    def attend(self, q, kv, mask):
        """q (B, S, H * Dh): wq's output; kv from project(); mask (B, 1, S, T_img) additive (0 or -inf-like) ->
        attention's output (B, S, H * Dh), before wo."""
        if kv[0].shape[2] == 0:  # rows without any image: nothing to attend to
            return torch.zeros_like(q)
        q = split_heads(q, self.head_dim)
        if self.qk_norms:
            q = self.q_norm(q)
        return merge_heads(F.scaled_dot_product_attention(q, *kv, attn_mask=mask))


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

    def forward(self, x, attend, sees_image):
        """x (N, D): the tokens of a forward pass; attend(attn, q): cross-attention's output (N, D) before wo, each
        row against its own images (CrossAttention.attend), or None for a pass without any image; sees_image (N, 1)
        bool: tokens with no image before them get no cross-attention output."""
        if attend is not None:
            h = self.attn.wo(attend(self.attn, self.attn.wq(self.attn_norm(x))))
            x = x + torch.tanh(self.attn_gate).flatten() * h.masked_fill(~sees_image, 0.0)
        # The dense part is not gated per token: every token goes through it.
        return x + torch.tanh(self.mlp_gate).flatten() * self.mlp(self.mlp_norm(x))


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
        return self.forward_parts([Part(ids, pos, mask, image_kv, image_mask, cache, logits_at)])[0]

    def forward_parts(self, parts: list[Part]) -> list[torch.Tensor]:
        """Batches of different shapes in one pass (the engine's decode step and a prefill), each with its own
        attention inputs: their N tokens in all go through the norms, the products and the MLPs together as (N, D),
        so every weight is read once for all of them, and through attention part by part. -> each part's logits,
        as forward gives them."""
        dt = self.embed.weight.dtype
        shapes = [tuple(p.ids.shape) for p in parts]
        sizes = [b * s for b, s in shapes]
        x = _cat([self.embed(p.ids).flatten(0, 1) for p in parts])  # (N, D)
        rope = [rope_cos_sin(p.pos, self.inv_freq, dt) for p in parts]
        cross_masks = [torch.zeros(p.image_mask.shape, dtype=dt, device=x.device)
                       .masked_fill(~p.image_mask, torch.finfo(dt).min)[:, None] for p in parts]  # (B, 1, S, T)
        sees_image = _cat([p.image_mask.any(dim=-1).flatten() for p in parts])[:, None]  # (N, 1)
        image_kv = [iter(p.image_kv) for p in parts]

        def each(y, fn):
            """y (N, E) -> fn(j, part j's rows as (B, S, E)) for each part, as (N, E')."""
            return _cat([fn(j, t.view(*shapes[j], -1)).flatten(0, 1) for j, t in enumerate(y.split(sizes))])

        for i, layer in enumerate(self.layers):
            if layer.cross is not None:
                kv = [next(it) for it in image_kv]
                attend = None if all(k.shape[2] == 0 for k, _ in kv) else \
                    lambda attn, q: each(q, lambda j, q: attn.attend(q, kv[j], cross_masks[j]))
                x = layer.cross(x, attend, sees_image)
            attn = layer.attn
            qkv = attn.wqkv(layer.attn_norm(x))
            x = x + attn.wo(each(qkv, lambda j, t: attn.attend(t, *rope[j], parts[j].mask, parts[j].cache, i)))
            x = x + layer.mlp(layer.mlp_norm(x))
        rows = []  # each part's rows whose logits are asked: (B, S or 1, D)
        for p, shape, t in zip(parts, shapes, x.split(sizes)):
            t = t.view(*shape, -1)
            at = p.logits_at
            rows.append(t if at is None else t.gather(1, at.view(-1, 1, 1).expand(-1, 1, t.shape[-1])))
        logits = self.lm_head(self.norm(_cat([r.flatten(0, 1) for r in rows])))
        counts = [r.shape[0] * r.shape[1] for r in rows]
        return [out.view(*r.shape[:2], -1) for out, r in zip(logits.split(counts), rows)]


class Part(NamedTuple):
    """Rows of a forward pass with their own attention inputs (IdeficsModel.forward's arguments)."""

    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    image_kv: list
    image_mask: torch.Tensor
    cache: object = None
    logits_at: torch.Tensor | None = None


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
