"""The decode step (one new token per sequence) with the elementwise work fused by kernels.py: per decoder layer
the matrix products and between them three launches (residual add + gate + next norm, SwiGLU, and RoPE + cache
write + attention in one) instead of some twenty small kernels. The matrix products are the model's own modules
(cuBLAS, or a quantized kernel), except for a single sequence, where kernels.gemv streams plain weights faster
and applies SwiGLU itself. The same math as IdeficsModel.forward for S = 1, rounded the same way."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefics import kernels
from idefics.cache import KVCache
from idefics.model import IdeficsModel


def supported(model: IdeficsModel) -> bool:
    """The kernels implement SiLU MLPs in bfloat16 or float32 (their rounding to float16 is not implemented)."""
    return model.config.hidden_act == "silu" and model.norm.weight.dtype in (torch.bfloat16, torch.float32)


def _streamable(linear: nn.Linear) -> bool:
    """A plain weight kernels.gemv can read (a quantized one runs its own module)."""
    w = linear.weight
    return type(linear) is nn.Linear and linear.bias is None and type(w) in (torch.Tensor, nn.Parameter) \
        and w.dtype in (torch.bfloat16, torch.float32) and w.stride(1) == 1


class FusedDecoder:
    """Call with the engine's static buffers; graph-capturable (no host sync, no data-dependent shapes)."""

    def __init__(self, model: IdeficsModel):
        self.model = model
        c = model.config
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.streamable = {id(mod) for mod in model.modules() if isinstance(mod, nn.Linear) and _streamable(mod)}
        # tanh of the gates once, in the model's dtype, as the reference's tanh(alpha) rounds it
        self.gates = {id(b): (torch.tanh(b.attn_gate.detach()).reshape(-1), torch.tanh(b.mlp_gate.detach()).reshape(-1))
                      for b in model.cross_layers}

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, image_kv, visible: torch.Tensor, cache: KVCache,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """ids, pos (M,): the new token of each sequence and its position; image_kv per cross block (M, H, T, Dh)
        each; visible (M, T) bool; cache rows 0..M-1 hold the sequences, whose tokens at 0..pos are attended to;
        cos, sin (max_len, Dh) -> logits (M, V)."""
        model = self.model
        m, h, d = ids.shape[0], self.heads, self.head_dim
        x = model.embed(ids)  # (M, D), the residual stream
        cross_mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
        cross_mask = cross_mask.masked_fill(~visible, torch.finfo(x.dtype).min)[:, None, None]  # (M, 1, 1, T)
        sees_image = visible.any(dim=-1)  # (M,)
        kv = iter(image_kv)
        pending, gate = None, None  # the last block's output, added to x by the next norm's kernel

        def project(linear, inp, swiglu=False):
            if m == 1 and id(linear) in self.streamable:
                return kernels.gemv(inp, linear.weight, swiglu)
            return kernels.silu_mul(linear(inp)) if swiglu else linear(inp)

        def add_norm(norm, **extra):
            nonlocal x
            x, y = kernels.add_rms_norm(x, pending, norm.weight, norm.eps, **extra)
            return y

        for i, layer in enumerate(model.layers):
            if layer.cross is not None:
                b = layer.cross
                attn_gate, mlp_gate = self.gates[id(b)]
                q = project(b.attn.wq, add_norm(b.attn_norm, gate=gate)).view(m, h, 1, d)
                if b.attn.qk_norms:
                    q = b.attn.q_norm(q)
                a = F.scaled_dot_product_attention(q, *next(kv), attn_mask=cross_mask)
                pending = project(b.attn.wo, a.reshape(m, h * d))
                n = add_norm(b.mlp_norm, gate=attn_gate, keep=sees_image)
                pending, gate = project(b.mlp.w2, project(b.mlp.w13, n, swiglu=True)), mlp_gate
            n = add_norm(layer.attn_norm, gate=gate)
            a = kernels.rope_attention(project(layer.attn.wqkv, n), cos, sin, pos, cache.k[i], cache.v[i], h)
            pending = project(layer.attn.wo, a)
            n = add_norm(layer.mlp_norm)
            pending, gate = project(layer.mlp.w2, project(layer.mlp.w13, n, swiglu=True)), None
        return project(model.lm_head, add_norm(model.norm, gate=gate))
