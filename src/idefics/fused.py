"""The decode step (one new token per sequence) with the elementwise work fused by kernels.py: per decoder layer
the matrix products and between them three launches (residual add + gate + next norm, SwiGLU, and RoPE + cache
write + attention in one; the cross blocks' attention in one too) instead of some twenty small kernels. The matrix
products are the model's own modules (cuBLAS, or a quantized kernel), except for a single sequence, where gemv.py
streams plain or fp8 weights faster and applies SwiGLU itself; there the norms fold into the GEMVs too (the residual
add into the product before, the normalization into the one after), leaving four launches per layer besides
attention. The same math as IdeficsModel.forward for S = 1, rounded the same way."""
from __future__ import annotations

import torch
from torch import nn

from idefics import fp8, fp8_gemm, kernels
from idefics.cache import KVCache
from idefics.fp8 import Fp8Linear, kernels_ready
from idefics.gemv import Normed, gemv
from idefics.model import IdeficsModel
from idefics.parallel import heads

# Plain products of 2 to GEMM_ROWS rows through the Triton GEMM of fp8_gemm (K split over more programs where a
# matrix has few tiles of rows, its weights heading for L2 before the kernel before it ends, SwiGLU applied by the
# MLP's first product: one launch fewer); 0: the modules' own (cuBLAS). Read when a step is captured. On an H100
# (bench/fp8.py --bf16-gemm-rows, one run) bfloat16 decode at batch 8 and 32 gained 1.11x and 1.05x over cuBLAS, and
# lost at 64 (0.97x): hence 32.
GEMM_ROWS = 32
# fp8 products of several rows: SwiGLU in the GEMM's epilogue (FP8_SWIGLU), and the norm before a product of fp8
# tokens writing them quantized (FP8_NORM_TOKENS, kernels.add_rms_norm's fp8): a launch fewer per block each, the
# same bits (bench/fp8.py --fp8-fusions times them). Off: on an H100 both on decoded batches 8 / 32 / 64 at 0.96 /
# 0.98 / 0.97x both off (w13 with SwiGLU has half the tiles, and the launch rule then splits its K: a second launch
# for the one saved). Read when a step is captured.
FP8_SWIGLU = False
FP8_NORM_TOKENS = False
# Weights of these dtypes only: float32's tiles, twice the bytes, overflow an H100's shared memory with SwiGLU at
# the GEMM's launch shapes (make test-gpu's float32 demo model).
GEMM_DTYPES = (torch.bfloat16,)


def supported(model: IdeficsModel) -> bool:
    """The kernels implement SiLU MLPs in bfloat16 or float32 (their rounding to float16 is not implemented)."""
    return model.config.hidden_act == "silu" and model.norm.weight.dtype in (torch.bfloat16, torch.float32)


def _streamed(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, fp8 scales or None) that gemv reads for this layer, if it is a plain one, or an fp8 one where its
    kernels run (on the CPU: Triton's interpreter); other quantized layers run their own module."""
    if type(linear) is Fp8Linear:
        ready = not linear.weight.is_cuda or kernels_ready(linear.weight, dtype)
        return (linear.weight, linear.scale) if ready else None
    w = linear.weight if type(linear) is nn.Linear and linear.bias is None else None
    if type(w) in (torch.Tensor, nn.Parameter) and w.dtype in (torch.bfloat16, torch.float32) and w.stride(1) == 1:
        return w, None
    return None


class FusedDecoder:
    """Call with the engine's static buffers; graph-capturable (no host sync, no data-dependent shapes)."""

    def __init__(self, model: IdeficsModel):
        self.model = model
        c = model.config
        self.heads, self.head_dim = heads(model), c.head_dim  # this rank's heads under tensor parallelism
        self.dtype = dt = model.embed.weight.dtype
        self.streamed = {id(mod): w for mod in model.modules() if (w := _streamed(mod, dt)) is not None}
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
        sees_image = visible.any(dim=-1)  # (M,)
        kv = iter(image_kv)
        # The residual stream: x, plus the last block's output and its gate and mask, added by the next norm's
        # kernel. At batch 1 the GEMVs do the add and the norm themselves: x is then a Normed.
        x, pending, extra = model.embed(ids), None, {}

        def streams(linear):
            return m == 1 and id(linear) in self.streamed

        def product(inp, linear, swiglu=False, **fold):
            weight, scale = self.streamed[id(linear)]
            return gemv(inp, weight, swiglu, scale=scale, **fold)

        def mm(linear, inp, swiglu=False):
            """linear(inp) for more than one row, SwiGLU'd if asked."""
            weight, scale = self.streamed.get(id(linear), (None, None))
            if scale is not None:  # fp8: its product for m rows (inp may be the norm's fp8 tokens)
                if swiglu and not FP8_SWIGLU:
                    return kernels.silu_mul(fp8.mm(inp, weight, scale))
                return fp8.mm(inp, weight, scale, swiglu)
            if weight is not None and m <= GEMM_ROWS and weight.dtype in GEMM_DTYPES:
                return fp8_gemm.plain_mm(inp, weight, swiglu)
            return kernels.silu_mul(linear(inp)) if swiglu else linear(inp)

        def normed(norm, linear, swiglu=False):
            """linear(norm(x + pending)), SwiGLU'd if asked."""
            nonlocal x, pending, extra
            if isinstance(x, Normed) and pending is None and streams(linear):
                return product(x, linear, swiglu, norm=(norm.weight, norm.eps))
            weight, scale = self.streamed.get(id(linear), (None, None))
            tokens = FP8_NORM_TOKENS and scale is not None and fp8.quantizes_tokens(weight, m, self.dtype)
            x, n = kernels.add_rms_norm(x.x if isinstance(x, Normed) else x, pending, norm.weight, norm.eps,
                                        fp8=tokens, **extra)
            pending, extra = None, {}
            if streams(linear):
                return product(n, linear, swiglu)
            return mm(linear, n, swiglu)

        def add(linear, inp, **gate):
            """x + gate * keep * linear(inp), now or at the next norm."""
            nonlocal x, pending, extra
            assert pending is None  # every add follows a norm, which took the last one in
            if streams(linear):
                x = product(inp, linear, residual=x.x if isinstance(x, Normed) else x, **gate)
            else:
                pending, extra = mm(linear, inp), gate

        for i, layer in enumerate(model.layers):
            if layer.cross is not None:
                b = layer.cross
                attn_gate, mlp_gate = self.gates[id(b)]
                q = normed(b.attn_norm, b.attn.wq)  # (M, H * Dh)
                if b.attn.qk_norms:  # per head, in one launch: (M * H, Dh) rows
                    qn = b.attn.q_norm
                    q = kernels.add_rms_norm(q.reshape(m * h, d), None, qn.weight, qn.eps)[1].view(m, h * d)
                add(b.attn.wo, kernels.cross_attention(q, *next(kv), visible), gate=attn_gate, keep=sees_image)
                add(b.mlp.w2, normed(b.mlp_norm, b.mlp.w13, swiglu=True), gate=mlp_gate)
            qkv = normed(layer.attn_norm, layer.attn.wqkv)
            add(layer.attn.wo, kernels.rope_attention(qkv, cos, sin, pos, cache.k[i], cache.v[i], h))
            add(layer.mlp.w2, normed(layer.mlp_norm, layer.mlp.w13, swiglu=True))
        return normed(model.norm, model.lm_head)
