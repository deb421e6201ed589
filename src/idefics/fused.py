"""The decode step (one new token per sequence) with the elementwise work fused by kernels.py: per decoder layer
the matrix products (the model's own modules: cuBLAS, or a quantized kernel), attention, and between them three
launches — residual add + gate + next norm, SwiGLU, RoPE + cache write — instead of some twenty small kernels.
The same math as IdeficsModel.forward for S = 1, rounded the same way."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from idefics import kernels
from idefics.cache import KVCache
from idefics.model import IdeficsModel


def supported(model: IdeficsModel) -> bool:
    """The kernels implement SiLU MLPs in bfloat16 or float32 (float16 rounding could not be pinned there)."""
    return model.config.hidden_act == "silu" and model.norm.weight.dtype in (torch.bfloat16, torch.float32)


class FusedDecoder:
    """Call with the engine's static buffers; graph-capturable (no host sync, no data-dependent shapes)."""

    def __init__(self, model: IdeficsModel):
        self.model = model
        c = model.config
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        # tanh of the gates once, in the model's dtype, as the reference's tanh(alpha) rounds it
        self.gates = {id(b): (torch.tanh(b.attn_gate.detach()).reshape(-1), torch.tanh(b.mlp_gate.detach()).reshape(-1))
                      for b in model.cross_layers}

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, image_kv, visible: torch.Tensor,
                 cache: KVCache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """ids, pos (M,); mask (M, 1, 1, kv_len) additive; image_kv per cross block (M, H, T, Dh) each; visible
        (M, T) bool; cache rows 0..M-1 hold the sequences and cache.kv_len positions are read; cos, sin
        (max_len, Dh) -> logits (M, V)."""
        model = self.model
        m, h, d = ids.shape[0], self.heads, self.head_dim
        x = model.embed(ids)  # (M, D), the residual stream
        cross_mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
        cross_mask = cross_mask.masked_fill(~visible, torch.finfo(x.dtype).min)[:, None, None]  # (M, 1, 1, T)
        sees_image = visible.any(dim=-1)  # (M,)
        kv = iter(image_kv)
        pending, gate = None, None  # the last block's output, added to x by the next norm's kernel

        def add_norm(norm, **extra):
            nonlocal x
            x, y = kernels.add_rms_norm(x, pending, norm.weight, norm.eps, **extra)
            return y

        for i, layer in enumerate(model.layers):
            if layer.cross is not None:
                b = layer.cross
                attn_gate, mlp_gate = self.gates[id(b)]
                q = b.attn.wq(add_norm(b.attn_norm, gate=gate)).view(m, h, 1, d)
                if b.attn.qk_norms:
                    q = b.attn.q_norm(q)
                pending = b.attn.wo(F.scaled_dot_product_attention(q, *next(kv), attn_mask=cross_mask).reshape(m, h * d))
                n = add_norm(b.mlp_norm, gate=attn_gate, keep=sees_image)
                pending, gate = b.mlp.w2(kernels.silu_mul(b.mlp.w13(n))), mlp_gate
            n = add_norm(layer.attn_norm, gate=gate)
            k_cache, v_cache = cache.k[i], cache.v[i]
            q = kernels.rope_cache(layer.attn.wqkv(n), cos, sin, pos, k_cache, v_cache, h)  # (M, H, 1, Dh)
            k, v = k_cache[:m, :, : cache.kv_len], v_cache[:m, :, : cache.kv_len]
            pending = layer.attn.wo(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(m, h * d))
            n = add_norm(layer.mlp_norm)
            pending, gate = layer.mlp.w2(kernels.silu_mul(layer.mlp.w13(n))), None
        return model.lm_head(add_norm(model.norm, gate=gate))
