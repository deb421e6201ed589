"""Triton kernels of the fp8 layers for a few rows (fp8.py says which product runs when): the weight-only GEMM, and
the per-token quantization of activations that torch._scaled_mm multiplies. Runs on CUDA (Hopper), and on the CPU
under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from idefics.kernels import (INTERPRET, _launch, _prefetch_weights, _round, _store_fp8_row, _swiglu, _wait_inputs,
                             _warps)

H100_SMS = 132  # the streaming multiprocessors the launch rule plans for off CUDA (the interpreter)

# float8_e4m3fn -> bfloat16, two values at a time (16 bits in, a bfloat16 pair out). Each byte s.eeee.mmm is placed as
# the bfloat16 s.0000eeee.mmm0000, which is worth the e4m3 value times 2^-120 (the exponent biases are 127 and 7;
# e4m3's subnormals land on bfloat16's), then multiplied by 2^120 (0x7B80), exactly: bit moves on the integer units
# and one bfloat16 multiply per pair. Triton's own conversion takes three conversion instructions per pair (one to a
# float16 pair, one per value to bfloat16), of which Hopper retires 16 a cycle per SM (the CUDA guide's throughput
# table): at most about 2.8 TB/s of fp8 weights on an H200. There, a decoder layer's four products at 8 rows took
# 89.9 us against 111.5 us with Triton's conversion (bench/fp8_gemm_sweep.py).
FAST_CONVERT = True  # False: Triton's conversion (bench/fp8_gemm_sweep.py times both)
# With PDL: weight tiles a program sends to L2 before it waits for the kernel before, as gemv.PREFETCH does (0: none).
# On an H100, bfloat16 decode through plain_mm at batches 8 and 32: 1.11x and 1.05x cuBLAS's tokens/s with 1 tile,
# 1.09x and 1.03x with none (bench/fp8.py, one run).
PREFETCH = 1
_E4M3_TO_BF16 = tl.constexpr("""{
.reg .b32 t, u, k;
mov.b32 k, 0x7B807B80;
cvt.u32.u16 t, $1;
prmt.b32 t, t, 0, 0x1404;
shr.b32 u, t, 4;
and.b32 u, u, 0x07F007F0;
and.b32 t, t, 0x80008000;
or.b32 t, t, u;
mul.rn.bf16x2 $0, t, k;
}""")


@triton.jit
def to_bf16(w, FAST: tl.constexpr):
    """w float8_e4m3fn -> bfloat16 (exact); FAST: by bit moves (_E4M3_TO_BF16, CUDA only), else Triton's conversion."""
    if FAST:
        return tl.inline_asm_elementwise(_E4M3_TO_BF16, "=r,h", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
    return w.to(tl.bfloat16)


@triton.jit
def _weights(rows, kk, n_ok, K, EVEN_K: tl.constexpr):
    """The tile of weights at columns kk of the program's rows (zero past K)."""
    if EVEN_K:
        return tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0)
    return tl.load(rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _dot(acc, w, x, SCALED: tl.constexpr, X_FP8: tl.constexpr, DOT_F32: tl.constexpr, FAST_CVT: tl.constexpr):
    if DOT_F32:  # Triton's interpreter (3.9) multiplies bfloat16 tiles wrongly; float32 holds them exactly
        return acc + tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
    elif X_FP8 or not SCALED:
        return tl.dot(w, x, acc)
    else:  # fp8 -> bfloat16 is exact: the tensor cores see the stored weights
        return tl.dot(to_bf16(w, FAST_CVT), x, acc)


@triton.jit
def _finish(g, u, dt: tl.constexpr, SWIGLU: tl.constexpr):
    """Scaled float32 sums -> the output: themselves, or with SWIGLU silu(gate g) * up u, rounded to dt as
    kernels.silu_mul rounds the products' rounded outputs."""
    if SWIGLU:
        return _swiglu(_round(g, dt), _round(u, dt), dt)
    return g


@triton.jit
def _mm_kernel(X, XS, W, S, Y, P, M, N, K, K_SPLIT, stride_x, stride_w, stride_y, PREFETCH, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PARTIAL: tl.constexpr,
               SCALED: tl.constexpr, X_FP8: tl.constexpr, SWIGLU: tl.constexpr, DOT_F32: tl.constexpr,
               FAST_CVT: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr):
    # The product is computed transposed, Y.T (N, M) = W (N, K) @ X.T (K, M): the weight rows fill the tensor
    # cores' tall side, a few tokens their narrow side. Program (n, m, s) sums K[s * K_SPLIT, (s + 1) * K_SPLIT).
    # SCALED: W is fp8 with a scale per row in S (N,), X bfloat16 (the weight-only product: the weights converted to
    # bfloat16 on the way to the tensor cores), or with X_FP8 the tokens in fp8 with a scale each in XS (M,): fp8
    # tensor cores, nothing converted. Else W and X are bfloat16 (or float32), unscaled.
    # SWIGLU: W (2N, K) holds the gate rows then the up rows (S (2N,)); a program sums both for its N rows and Y gets
    # silu(gate) * up.
    dt = Y.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok, m_ok = rn < N, rm < M
    up = N * stride_w  # SWIGLU: the up rows follow the gate's N rows
    k_start = tl.program_id(2) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = acc
    # Launched early (PDL), the program's first weight tiles head for L2 while the kernel before finishes (LINE
    # elements: a 128-byte line).
    _prefetch_weights(W, rn, N, stride_w, up, k_start, k_end, K, PREFETCH, BLOCK_K, LINE, SWIGLU)
    _wait_inputs(PDL)
    rows = W + rn[:, None] * stride_w
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        w = _weights(rows, kk, n_ok, K, EVEN_K)
        if EVEN_K:
            x = tl.load(X + rm[None, :] * stride_x + kk[:, None], mask=m_ok[None, :], other=0.0)
        else:
            x = tl.load(X + rm[None, :] * stride_x + kk[:, None], mask=(kk < K)[:, None] & m_ok[None, :], other=0.0)
        acc = _dot(acc, w, x, SCALED, X_FP8, DOT_F32, FAST_CVT)
        if SWIGLU:
            acc_up = _dot(acc_up, _weights(rows + up, kk, n_ok, K, EVEN_K), x, SCALED, X_FP8, DOT_F32, FAST_CVT)
    if X_FP8:  # each token's scale (a split's share is scaled alike: the sum is linear)
        xs = tl.load(XS + rm, mask=m_ok, other=0.0)[None, :]
        acc, acc_up = acc * xs, acc_up * xs
    mask = n_ok[:, None] & m_ok[None, :]
    if PARTIAL:  # this split's float32 sums into P (splits, M, N, or 2N with SWIGLU); _sum_splits_kernel adds them
        width = 2 * N if SWIGLU else N
        p = P + tl.program_id(2) * M * width + rm[None, :] * width + rn[:, None]
        tl.store(p, acc, mask=mask)
        if SWIGLU:
            tl.store(p + N, acc_up, mask=mask)
    else:
        if SCALED:
            acc = acc * tl.load(S + rn, mask=n_ok, other=0.0)[:, None]
            if SWIGLU:
                acc_up = acc_up * tl.load(S + N + rn, mask=n_ok, other=0.0)[:, None]
        tl.store(Y + rm[None, :] * stride_y + rn[:, None], _finish(acc, acc_up, dt, SWIGLU).to(dt), mask=mask)


@triton.jit
def _sum_splits_kernel(P, S, Y, M, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, SCALED: tl.constexpr,
                       SWIGLU: tl.constexpr, PDL: tl.constexpr):
    # P (SPLIT_K, M, N) float32 -> Y (M, N) contiguous: the splits added in their order (the same sums every run),
    # then scaled per channel if SCALED; with SWIGLU, P (SPLIT_K, M, 2N) holds the gate's sums then the up's
    _wait_inputs(PDL)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < M * N
    width = 2 * N if SWIGLU else N
    col = r % N
    at = (r // N) * width + col
    g = tl.load(P + at, mask=ok, other=0.0)
    u = g
    if SWIGLU:
        u = tl.load(P + at + N, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        g += tl.load(P + s * M * width + at, mask=ok, other=0.0)
        if SWIGLU:
            u += tl.load(P + s * M * width + at + N, mask=ok, other=0.0)
    if SCALED:
        g = g * tl.load(S + col, mask=ok, other=0.0)
        if SWIGLU:
            u = u * tl.load(S + N + col, mask=ok, other=0.0)
    tl.store(Y + r, _finish(g, u, Y.dtype.element_ty, SWIGLU).to(Y.dtype.element_ty), mask=ok)


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS


def weight_only_config(m: int, n: int, k: int, sms: int = H100_SMS, block_n: int | None = None,
                       block_k: int | None = None, split_k: int | None = None, warps: int | None = None,
                       stages: int | None = None) -> dict:
    """The launch shape of weight_only_mm for x (m, k) and a weight (n, k); arguments given are kept. Defaults, from
    bench/fp8_gemm_sweep.py on an H100 (the 9b's four matrices at 8-64 rows): weight tiles of 64 x 128 (8 KB), 4
    warps, 4 stages, and K split in 2 or 4 until there are 2 programs per SM, while each split keeps 4 tiles of K
    at least (wqkv: 2 splits, w13: none, wo and w2: 4; each the best or within 5% of it up to 32 rows)."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = block_n or 64
    block_k = block_k or min(128, triton.next_power_of_2(k))
    if split_k is None:
        tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        split_k = 1
        while split_k < 4 and tiles * split_k < 2 * sms and k // (2 * split_k * block_k) >= 4:
            split_k *= 2
    # Splits are whole tiles of K; none is left empty (the last may be shorter)
    steps = triton.cdiv(k, block_k)
    per_split = triton.cdiv(steps, min(split_k, steps))
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=triton.cdiv(steps, per_split),
                k_split=per_split * block_k, warps=warps or 4, stages=stages or 4)


def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, swiglu: bool = False,
                   **launch) -> torch.Tensor:
    """x (M, K) bfloat16 or float32 @ (weight (N, K) float8_e4m3fn * scale (N,)[:, None]).T -> (M, N) in x's dtype,
    float32 sums scaled once per channel. `launch` (block_n, block_k, split_k, warps, stages) overrides
    weight_only_config's launch shape; with K split, each split's sums go to a float32 workspace and a second launch
    adds them in a fixed order. swiglu: weight (2N, K) holds gate rows then up rows -> silu(gate) * up (M, N)."""
    return _mm(x, None, weight, scale, x.dtype, swiglu, **launch)


def plain_mm(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False, **launch) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T in x's dtype (bfloat16, or float32), float32 sums: the same GEMM on plain
    weights (nothing converted, nothing scaled), for a bfloat16 decode step's products of a few rows; swiglu as
    weight_only_mm's (kernels.silu_mul's rounding)."""
    return _mm(x, None, weight, None, x.dtype, swiglu, **launch)


def tokens_fp8_mm(x, weight: torch.Tensor, scale: torch.Tensor, swiglu: bool = False, **launch) -> torch.Tensor:
    """x (M, K) bfloat16 @ the fp8 weight as fp8.scaled_mm computes it (each token quantized to fp8 with a scale of
    its own, fp8 tensor cores, float32 sums scaled per token and per channel), in Triton with weight_only_mm's
    launch shapes (split K for few rows) -> (M, N) bfloat16; x may come quantized, (fp8 (M, K), scales (M, 1)) as
    quantize_rows makes them; swiglu as weight_only_mm's."""
    (xq, xs), dtype = (x, torch.bfloat16) if isinstance(x, tuple) else (quantize_rows(x), x.dtype)
    return _mm(xq, xs, weight, scale, dtype, swiglu, **launch)


def _mm(x: torch.Tensor, xs: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor | None,
        dtype: torch.dtype, swiglu: bool = False, block_n: int | None = None, block_k: int | None = None,
        split_k: int | None = None, warps: int | None = None, stages: int | None = None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]  # the output's columns
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    c = weight_only_config(m, n, k, _sms(x.device), block_n, block_k, split_k, warps, stages)
    y = torch.empty(m, n, dtype=dtype, device=x.device)
    partial = c["split_k"] > 1
    p = torch.empty(c["split_k"], m, weight.shape[0], dtype=torch.float32, device=x.device) if partial else y
    grid = (triton.cdiv(n, c["block_n"]), triton.cdiv(m, c["block_m"]), c["split_k"])
    launch, s = _launch(x), scale if scale is not None else y
    line = min(128 // weight.element_size(), c["block_k"])  # a 128-byte line, or the whole tile if that is narrower
    _mm_kernel[grid](x, xs if xs is not None else s, weight, s, y, p, m, n, k, c["k_split"], x.stride(0),
                     weight.stride(0), y.stride(0), PREFETCH if launch["PDL"] else 0,
                     BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], EVEN_K=k % c["block_k"] == 0,
                     PARTIAL=partial, SCALED=scale is not None, X_FP8=xs is not None, SWIGLU=swiglu,
                     DOT_F32=INTERPRET or dtype == torch.float32, FAST_CVT=FAST_CONVERT and not INTERPRET, LINE=line,
                     num_warps=c["warps"], num_stages=c["stages"], **launch)
    if partial:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](p, s, y, m, n, SPLIT_K=c["split_k"], BLOCK=block,
                                                         SCALED=scale is not None, SWIGLU=swiglu, num_warps=4,
                                                         **launch)
    return y


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_inputs(PDL)
    row = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    ok = r < K
    _store_fp8_row(tl.load(X + row * stride_x + r, mask=ok, other=0.0).to(tl.float32), Q + row * stride_q + r,
                   S + row, ok)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8_e4m3fn (M, K), float32 scales (M, 1)), each row's largest magnitude mapped to 448, in
    one launch (what fp8.quantize_rows computes in eager PyTorch)."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, num_warps=_warps(block),
                                **_launch(x))
    return q, s
