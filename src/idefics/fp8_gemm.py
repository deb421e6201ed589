"""Triton kernels of the fp8 layers for a few rows (fp8.py says which product runs when): the weight-only GEMM, and
the per-token quantization of activations that torch._scaled_mm multiplies. Runs on CUDA (Hopper), and on the CPU
under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from idefics.fp8 import FP8_MAX
from idefics.kernels import INTERPRET, _launch, _wait_inputs, _warps


@triton.jit
def _weight_only_kernel(X, W, S, Y, M, N, K, stride_x, stride_w, stride_y, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
                        PDL: tl.constexpr):
    # The product is computed transposed, Y.T (N, M) = W (N, K) @ X.T (K, M): the weight rows fill the tensor
    # cores' tall side, a few tokens their narrow side.
    dt = Y.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok, m_ok = rn < N, rm < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    _wait_inputs(PDL)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            w = tl.load(W + rn[:, None] * stride_w + kk[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(X + rm[None, :] * stride_x + kk[:, None], mask=m_ok[None, :], other=0.0)
        else:
            k_ok = kk < K
            w = tl.load(W + rn[:, None] * stride_w + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(X + rm[None, :] * stride_x + kk[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if DOT_F32:  # Triton's interpreter (3.9) multiplies bfloat16 tiles wrongly; float32 holds them exactly
            acc += tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:  # fp8 -> bfloat16 is exact: the tensor cores see the stored weights
            acc = tl.dot(w.to(dt), x, acc)
    y = acc * tl.load(S + rn, mask=n_ok, other=0.0)[:, None]
    tl.store(Y + rm[None, :] * stride_y + rn[:, None], y.to(dt), mask=n_ok[:, None] & m_ok[None, :])


def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int | None = None,
                   block_k: int | None = None, warps: int = 4, stages: int = 4) -> torch.Tensor:
    """x (M, K) bfloat16 or float32 @ (weight (N, K) float8_e4m3fn * scale (N,)[:, None]).T -> (M, N) in x's dtype,
    float32 sums scaled once per channel. block_n, block_k, warps and stages override the launch shape."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    # Weight tiles of 8 KB either way. Narrow tiles for a few tokens: more programs keep more loads in flight;
    # wide ones past 16 tokens, so that the tokens' tile is read from L2 fewer times.
    block_n = block_n or (32 if m <= 16 else 64)
    block_k = block_k or min(8192 // block_n, triton.next_power_of_2(k))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _weight_only_kernel[grid](x, weight, scale, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
                              DOT_F32=INTERPRET or x.dtype == torch.float32, num_warps=warps, num_stages=stages,
                              **_launch(x))
    return y


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, stride_x, stride_q, MAX: tl.constexpr, BLOCK: tl.constexpr,
                          ROUND_FIRST: tl.constexpr, PDL: tl.constexpr):
    _wait_inputs(PDL)
    row = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    ok = r < K
    x = tl.load(X + row * stride_x + r, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.where(amax > 0, tl.div_rn(amax, MAX), 1.0)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s), -MAX), MAX)
    if ROUND_FIRST:  # to the nearest e4m3 value: 3 mantissa bits, or a multiple of 2^-9 below 2^-6 (subnormals)
        b = q.to(tl.uint32, bitcast=True)
        normal = ((b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        q = tl.where(tl.abs(q) < 0.015625, (q + 24576.0) - 24576.0, normal)  # 24576's float32 step is 2^-9
    tl.store(Q + row * stride_q + r, q.to(Q.dtype.element_ty), mask=ok)
    tl.store(S + row, s)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8_e4m3fn (M, K), float32 scales (M, 1)), each row's largest magnitude mapped to 448, in
    one launch (what fp8.quantize_rows computes in eager PyTorch)."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), MAX=FP8_MAX, BLOCK=block,
                                # Triton's interpreter (3.9) converts to fp8 without the carry of a round-up
                                # into the exponent (124.3 -> 64): round first, and the conversion is exact
                                ROUND_FIRST=INTERPRET, num_warps=_warps(block), **_launch(x))
    return q, s
