"""Triton kernels for the decode step, where the many small elementwise kernels between the matrix products cost
as much as the products themselves. Each one does in a single launch what eager PyTorch does in several:

- `add_rms_norm`: the residual add (with the cross blocks' tanh gate and per-row image mask) and the next RMSNorm;
- `silu_mul`: SwiGLU's silu(gate) * up;
- `rope_attention`: rotate q and k of the new token, write k and v into the cache, attend (one program per row
  and head);
(The batch-1 matrix-vector products, which also take over add_rms_norm's work there, are in gemv.py.)

Rounding follows eager PyTorch step by step: every intermediate that eager keeps in the model's dtype is rounded to
it here too (`_round`), so the elementwise results (norms, gates, SwiGLU, RoPE) are the eager ones bit for bit;
the attention's float32 sums run in their own order. On Hopper the kernels use programmatic dependent launch
(below). Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from idefics.fp8 import FP8_MAX

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programmatic dependent launch (Hopper on): a kernel is launched while the one before it is still finishing, and
# waits (gdc_wait) only where it first reads what earlier kernels wrote; the weight loads and the launch itself
# overlap the previous kernel's tail. Set IDEFICS_PDL=0 to launch them one after another.
PDL = os.environ.get("IDEFICS_PDL", "1") != "0"
_FP8_MAX = tl.constexpr(FP8_MAX)
_ROUND_TO_FP8 = tl.constexpr(INTERPRET)  # _store_fp8_row


@functools.cache
def _pdl_ready(device: torch.device) -> bool:
    """Hopper or later, and a Triton that launches with PDL (3.4 on)."""
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def _launch(t: torch.Tensor) -> dict:
    """The launch options for kernels whose inputs are on t's device."""
    pdl = PDL and not INTERPRET and t.is_cuda and _pdl_ready(t.device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def _wait_inputs(PDL: tl.constexpr):
    """From here on the kernel reads what earlier kernels wrote (and writes what they read): wait for the previous
    kernel to finish, then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs):
    """Start loading the cache lines at ptrs into L2; nothing is returned or awaited."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_weights(W, rn, N, stride_w, up, k_start, k_end, K, PREFETCH, BLOCK_K: tl.constexpr,
                      LINE: tl.constexpr, SWIGLU: tl.constexpr):
    """Send the first PREFETCH tiles of BLOCK_K columns (from k_start, before k_end) of weight rows rn to L2, and
    with SWIGLU the up rows' (`up` elements on): one address per LINE columns. A product launched early (PDL) calls
    it before it waits: the weights are no earlier kernel's output."""
    for t in range(0, tl.minimum(PREFETCH, tl.cdiv(k_end - k_start, BLOCK_K))):
        cols = tl.minimum(k_start + t * BLOCK_K + tl.arange(0, BLOCK_K // LINE) * LINE, K - 1)
        lines = tl.minimum(rn, N - 1)[:, None] * stride_w + cols[None, :]
        _prefetch_l2(W + lines)
        if SWIGLU:
            _prefetch_l2(W + up + lines)


@triton.jit
def _round(x, dt: tl.constexpr):
    """float32 x rounded to dt, bfloat16 or float32 (to nearest, ties to even), returned as float32. Done on the
    bits: on the GPU a cast there and back did not round (its results differed from eager)."""
    if dt == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _store_fp8_row(x, Q, S, ok):
    """One row x (float32) quantized to fp8 as fp8.quantize_rows does (its largest magnitude mapped to FP8_MAX,
    values to nearest) into Q at ok, its scale into S."""
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.where(amax > 0, tl.div_rn(amax, _FP8_MAX), 1.0)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s), -_FP8_MAX), _FP8_MAX)
    if _ROUND_TO_FP8:  # Triton's interpreter (3.9) converts to fp8 without the carry of a round-up into the exponent
        # (124.3 -> 64): round to the nearest e4m3 value first (3 mantissa bits, or a multiple of 2^-9 below 2^-6,
        # the subnormals), and the conversion is exact
        b = q.to(tl.uint32, bitcast=True)
        normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        q = tl.where(tl.abs(q) < 0.015625, (q + 24576.0) - 24576.0, normal)  # 24576's float32 step is 2^-9
    tl.store(Q, q.to(Q.dtype.element_ty), mask=ok)
    tl.store(S, s)


@triton.jit
def _add_rms_norm_kernel(X, H, G, KEEP, NW, XO, Y, YS, N, eps, stride_x, stride_h, stride_xo, stride_y, stride_g,
                         ADD: tl.constexpr, GATE: tl.constexpr, MASKED: tl.constexpr, FP8: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_inputs(PDL)
    row = tl.program_id(0)
    dt = XO.dtype.element_ty
    r = tl.arange(0, BLOCK)
    ok = r < N
    x = tl.load(X + row * stride_x + r, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        h = tl.load(H + row * stride_h + r, mask=ok, other=0.0).to(tl.float32)
        if GATE:  # x + tanh(alpha) * h, h zeroed on rows that see no image
            if MASKED:
                h = tl.where(tl.load(KEEP + row) != 0, h, 0.0)
            h = _round(h * tl.load(G + r * stride_g, mask=ok, other=0.0).to(tl.float32), dt)
        x = _round(x + h, dt)
        tl.store(XO + row * stride_xo + r, x.to(dt), mask=ok)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    y = _round(_round(x * rstd, dt) * tl.load(NW + r, mask=ok, other=0.0).to(tl.float32), dt)
    if FP8:  # y as the fp8 tokens of the next product: what fp8.quantize_rows makes of y rounded to dt
        _store_fp8_row(y, Y + row * stride_y + r, YS + row, ok)
    else:
        tl.store(Y + row * stride_y + r, y.to(dt), mask=ok)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 gate: torch.Tensor | None = None, keep: torch.Tensor | None = None, fp8: bool = False):
    """x, h (M, D) -> (x', weight * rms_norm(x')) with x' = x + gate * keep * h (x' = x without h); gate (D,) or
    (1,), already tanh'd; keep (M,) bool. fp8: the norm's output as fp8.quantize_rows quantizes it, (float8_e4m3fn
    (M, D), float32 scales (M, 1)), for a product that takes fp8 tokens (fp8.quantizes_tokens)."""
    m, d = x.shape
    xo = torch.empty_like(x) if h is not None else x
    y = torch.empty(m, d, dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    ys = torch.empty(m, 1, dtype=torch.float32, device=x.device) if fp8 else y
    block = triton.next_power_of_2(d)
    _add_rms_norm_kernel[(m,)](
        x, h if h is not None else x, gate if gate is not None else x, keep.view(torch.uint8) if keep is not None else x,
        weight, xo, y, ys, d, eps, x.stride(0), h.stride(0) if h is not None else 0, xo.stride(0), y.stride(0),
        1 if gate is not None and gate.numel() > 1 else 0, ADD=h is not None, GATE=gate is not None,
        MASKED=keep is not None, FP8=fp8, BLOCK=block, num_warps=_warps(block), **_launch(x))
    return xo, ((y, ys) if fp8 else y)


@triton.jit
def _swiglu(g, u, dt: tl.constexpr):
    """silu(g) * u of float32 g and u already rounded to dt: the silu rounded, then the product, as eager rounds."""
    return _round(_round(g / (1.0 + tl.exp(-g)), dt) * u, dt)


@triton.jit
def _silu_mul_kernel(X, Y, N, stride_x, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_inputs(PDL)
    row, col = tl.program_id(0), tl.program_id(1)
    dt = Y.dtype.element_ty
    r = col * BLOCK + tl.arange(0, BLOCK)
    ok = r < N
    g = tl.load(X + row * stride_x + r, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + r, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + r, _swiglu(g, u, dt).to(dt), mask=ok)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x (M, 2N): gate then up -> silu(gate) * up (M, N)."""
    m, n = x.shape[0], x.shape[1] // 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n), 1024)
    _silu_mul_kernel[(m, triton.cdiv(n, block))](x, y, n, x.stride(0), y.stride(0), BLOCK=block, num_warps=4,
                                                       **_launch(x))
    return y


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@triton.jit
def _rotate(x1, x2, c, s, dt: tl.constexpr):
    """x * cos + rotate_half(x) * sin of one head given as its two halves, each product rounded as in eager."""
    o1 = _round(_round(x1 * c, dt) + _round(-x2 * s, dt), dt)
    o2 = _round(_round(x2 * c, dt) + _round(x1 * s, dt), dt)
    return o1, o2


@triton.jit
def _tile(kbase, vbase, offs, stride, n, r, ok, HALF: tl.constexpr):
    """Keys and values at positions offs (those < n; zeros past it) of one head, each as its two halves
    (BLOCK_KV, BLOCK), in the cache's dtype."""
    tile = offs[:, None] * stride + r[None, :]
    t_ok = (offs < n)[:, None] & ok[None, :]
    return (tl.load(kbase + tile, mask=t_ok, other=0.0), tl.load(kbase + HALF + tile, mask=t_ok, other=0.0),
            tl.load(vbase + tile, mask=t_ok, other=0.0), tl.load(vbase + HALF + tile, mask=t_ok, other=0.0))


@triton.jit
def _scores(q1, q2, kt1, kt2):
    """q's dot product with each key of a block (float32 sums), q and the keys given as their two halves."""
    return tl.sum(kt1.to(tl.float32) * q1[None, :], axis=1) + tl.sum(kt2.to(tl.float32) * q2[None, :], axis=1)


@triton.jit
def _attend(scores, vt1, vt2, m_i, l_i, acc1, acc2, dt: tl.constexpr):
    """One block's scaled scores (-inf where a key does not count) and values into an online softmax (float32;
    probabilities rounded to dt before they weight the values, as flash attention does)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    p = _round(p, dt)
    acc1 = acc1 * alpha + tl.sum(p[:, None] * vt1.to(tl.float32), axis=0)
    acc2 = acc2 * alpha + tl.sum(p[:, None] * vt2.to(tl.float32), axis=0)
    return m_new, l_i, acc1, acc2


@triton.jit
def _rope_attention_kernel(QKV, COS, SIN, POS, KC, VC, OUT, H, scale, stride_qkv, stride_cos, stride_kslot,
                           stride_khead, stride_kpos, stride_out, HALF: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_KV: tl.constexpr, PDL: tl.constexpr):
    m, h = tl.program_id(0), tl.program_id(1)
    dt = KC.dtype.element_ty
    d = 2 * HALF  # the head size
    r = tl.arange(0, BLOCK)
    ok = r < HALF
    # Before waiting for the product before (which writes QKV): what earlier steps wrote, the position, its angles
    # and the first block of cached keys and values, so that these round trips overlap that kernel's end.
    pos = tl.load(POS + m)
    c = tl.load(COS + pos * stride_cos + r, mask=ok, other=0.0).to(tl.float32)  # both halves hold the same angles
    s = tl.load(SIN + pos * stride_cos + r, mask=ok, other=0.0).to(tl.float32)
    head = KC + m * stride_kslot + h * stride_khead
    vhead = VC + m * stride_kslot + h * stride_khead
    offs = tl.arange(0, BLOCK_KV)
    kt1, kt2, vt1, vt2 = _tile(head, vhead, offs, stride_kpos, pos, r, ok, HALF)
    _wait_inputs(PDL)
    src = QKV + m * stride_qkv + h * d
    q1 = tl.load(src + r, mask=ok, other=0.0).to(tl.float32)
    q2 = tl.load(src + HALF + r, mask=ok, other=0.0).to(tl.float32)
    k1 = tl.load(src + H * d + r, mask=ok, other=0.0).to(tl.float32)
    k2 = tl.load(src + H * d + HALF + r, mask=ok, other=0.0).to(tl.float32)
    v1 = tl.load(src + 2 * H * d + r, mask=ok, other=0.0)
    v2 = tl.load(src + 2 * H * d + HALF + r, mask=ok, other=0.0)
    q1, q2 = _rotate(q1, q2, c, s, dt)
    k1, k2 = _rotate(k1, k2, c, s, dt)
    tl.store(head + pos * stride_kpos + r, k1.to(dt), mask=ok)
    tl.store(head + pos * stride_kpos + HALF + r, k2.to(dt), mask=ok)
    tl.store(vhead + pos * stride_kpos + r, v1, mask=ok)
    tl.store(vhead + pos * stride_kpos + HALF + r, v2, mask=ok)
    # Attention: the new key from registers first, then the cached keys 0..pos-1 a block at a time, the next block
    # loaded before the current one is used.
    m_i = (tl.sum(k1 * q1, axis=0) + tl.sum(k2 * q2, axis=0)) * scale
    l_i = 1.0
    acc1, acc2 = v1.to(tl.float32), v2.to(tl.float32)
    for start in range(0, pos, BLOCK_KV):
        nxt = _tile(head, vhead, start + BLOCK_KV + offs, stride_kpos, pos, r, ok, HALF)
        scores = tl.where(start + offs < pos, _scores(q1, q2, kt1, kt2) * scale, -float("inf"))
        m_i, l_i, acc1, acc2 = _attend(scores, vt1, vt2, m_i, l_i, acc1, acc2, dt)
        kt1, kt2, vt1, vt2 = nxt
    out = OUT + m * stride_out + h * d
    tl.store(out + r, (acc1 / l_i).to(dt), mask=ok)
    tl.store(out + HALF + r, (acc2 / l_i).to(dt), mask=ok)


# rope_attention's launch, (cached positions per block, warps per program), for fewer than ATTENTION_ROWS rows and
# from there on. On an H100 (bench/attention.py --sweep, 2026-12-07) at 32 rows of 32 and 96 positions and 64 rows
# of 96, blocks of 16 positions in one warp took 7.2, 18.8 and 37.0 us a call against 17.8, 29.5 and 54.5 with 64
# in 4 warps: a program per row and head is latency-bound, and small ones run more at once. A few rows keep 64 in
# 4 warps (32 programs a row: each must keep more of the cache in flight). A block and the next one live in
# registers: past 16 positions a warp, or 256 a block, they spill (bench/registers.py); in that sweep a spilled
# launch (32/1, 64/2, 64/1) took 1.2-10x the time of its block over more warps. tests/test_registers.py holds both
# launches here to no spill.
ATTENTION_LAUNCH = {"few": (64, 4), "many": (16, 1)}
ATTENTION_ROWS = 8


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int) -> torch.Tensor:
    """One decode step of self-attention: qkv (M, 3*H*Dh) of the new token of each row; cos, sin (max_len, Dh);
    pos (M,) its position; k_cache, v_cache (slots, H, max_len, Dh) of one layer, rows 0..M-1. Rotates q and k,
    writes k and v at pos, attends to positions 0..pos -> (M, H*Dh)."""
    m = qkv.shape[0]
    d = qkv.shape[1] // (3 * heads)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and qkv.stride(1) == 1
    out = torch.empty(m, heads * d, dtype=qkv.dtype, device=qkv.device)
    block_kv, warps = ATTENTION_LAUNCH["many" if m >= ATTENTION_ROWS else "few"]
    _rope_attention_kernel[(m, heads)](
        qkv, cos, sin, pos, k_cache, v_cache, out, heads, d ** -0.5, qkv.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), HALF=d // 2,
        BLOCK=triton.next_power_of_2(d // 2), BLOCK_KV=16 if INTERPRET else block_kv, num_warps=warps,
        **_launch(qkv))
    return out


@triton.jit
def _cross_attention_kernel(Q, K, V, VIS, OUT, T, scale, masked, stride_q, stride_kslot, stride_khead, stride_kpos,
                            stride_vis, stride_out, HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_KV: tl.constexpr,
                            BLOCK_VIS: tl.constexpr, PDL: tl.constexpr):
    m, h = tl.program_id(0), tl.program_id(1)
    dt = K.dtype.element_ty
    d = 2 * HALF  # the head size
    r = tl.arange(0, BLOCK)
    ok = r < HALF
    kbase = K + m * stride_kslot + h * stride_khead
    vbase = V + m * stride_kslot + h * stride_khead
    # Which image tokens the row sees span [lo, hi) (its last image's): only those blocks are read, however many
    # images the buffer holds. What the prefill wrote (the mask, the first block of keys and values) is read before
    # the wait for q.
    lo = T
    hi = 0
    for start in range(0, T, BLOCK_VIS):
        t = start + tl.arange(0, BLOCK_VIS)
        seen = tl.load(VIS + m * stride_vis + t, mask=t < T, other=0) != 0
        lo = tl.minimum(lo, tl.min(tl.where(seen, t, T), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(seen, t + 1, 0), axis=0))
    offs = tl.arange(0, BLOCK_KV)
    kt1, kt2, vt1, vt2 = _tile(kbase, vbase, lo + offs, stride_kpos, hi, r, ok, HALF)
    _wait_inputs(PDL)
    q1 = tl.load(Q + m * stride_q + h * d + r, mask=ok, other=0.0).to(tl.float32)
    q2 = tl.load(Q + m * stride_q + h * d + HALF + r, mask=ok, other=0.0).to(tl.float32)
    m_i = tl.full((), -float("inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc1 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_KV):
        nxt = _tile(kbase, vbase, start + BLOCK_KV + offs, stride_kpos, hi, r, ok, HALF)
        t = start + offs
        seen = tl.load(VIS + m * stride_vis + t, mask=t < hi, other=0) != 0
        # An image token not seen in between gets the additive mask's finfo.min, as in PyTorch's attention.
        scores = tl.where(seen, _scores(q1, q2, kt1, kt2) * scale, masked)
        m_i, l_i, acc1, acc2 = _attend(tl.where(t < hi, scores, -float("inf")), vt1, vt2, m_i, l_i, acc1, acc2, dt)
        kt1, kt2, vt1, vt2 = nxt
    l_i = tl.where(l_i > 0, l_i, 1.0)  # a row that sees no image token: zeros (the gate's mask drops them)
    out = OUT + m * stride_out + h * d
    tl.store(out + r, (acc1 / l_i).to(dt), mask=ok)
    tl.store(out + HALF + r, (acc2 / l_i).to(dt), mask=ok)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One decode step of a cross block's attention: q (M, H*Dh) of each row's new token; k, v (M, H, T, Dh) its
    images' keys and values; visible (M, T) bool, which of them it sees -> (M, H*Dh). PyTorch's attention with the
    additive mask the model uses (0 or finfo.min), in one launch that reads only the span of tokens a row sees, and
    reads it before q is ready. A row that sees no image token gets zeros (PyTorch's attention averages every
    token there; the model drops either)."""
    m, heads, t, d = k.shape
    assert k.stride() == v.stride() and k.stride(3) == 1 and q.stride(1) == 1 and visible.stride(1) == 1
    if t == 0:  # no image in the batch: nothing to attend to (the gate's mask drops every row)
        return torch.zeros_like(q)
    out = torch.empty(m, heads * d, dtype=q.dtype, device=q.device)
    _cross_attention_kernel[(m, heads)](
        q, k, v, visible.view(torch.uint8), out, t, d ** -0.5, torch.finfo(q.dtype).min, q.stride(0), k.stride(0),
        k.stride(1), k.stride(2), visible.stride(0), out.stride(0),
        HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2), BLOCK_KV=16 if INTERPRET else 64,
        BLOCK_VIS=16 if INTERPRET else 1024, num_warps=4, **_launch(q))
    return out
