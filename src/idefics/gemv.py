"""Matrix-vector products for a single sequence's decode step (Triton): the weights stream from memory once, in
many small programs, with no split-K reduction launch.

Each product can take over the work between products (kernels.add_rms_norm's): the residual add in its epilogue,
which also writes partial sums of squares of the new residual stream, and the next RMSNorm in the prologue of the
product after, which normalizes its input from those sums. A decoder layer is then four launches and attention.
Rounding is eager PyTorch's (kernels._round): only the float32 sums run in their own order."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from idefics.kernels import INTERPRET, _launch, _round, _wait_inputs

PREFETCH = 1  # with PDL: a GEMV sends this many tiles of its weights to L2 before it waits (see _gemv_kernel)


@triton.jit
def _prefetch_l2(ptrs):
    """Start loading the cache lines at ptrs into L2; nothing is returned or awaited."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _rstd(PART, n_part, K, eps, BLOCK_P: tl.constexpr):
    """RMSNorm's 1 / rms from the previous product's partial sums of squares."""
    rp = tl.arange(0, BLOCK_P)
    return 1.0 / tl.sqrt_rn(tl.sum(tl.load(PART + rp, mask=rp < n_part, other=0.0), axis=0) / K + eps)


@triton.jit
def _input(X, NW, kk, k_ok, rstd, dt: tl.constexpr, NORM: tl.constexpr):
    """x at columns kk (float32); with NORM, weight * x * rstd, rounded as eager rounds it."""
    x = tl.load(X + kk, mask=k_ok, other=0.0).to(tl.float32)
    if NORM:
        x = _round(_round(x * rstd, dt) * tl.load(NW + kk, mask=k_ok, other=0.0).to(tl.float32), dt)
    return x


@triton.jit
def _output(y, y_up, rn, n_ok, pid, Y, R, PART_OUT, G, KEEP, stride_g, dt: tl.constexpr, SWIGLU: tl.constexpr,
            RESIDUAL: tl.constexpr, GATE: tl.constexpr, MASKED: tl.constexpr):
    """Store the float32 sums of rows rn: rounded, SwiGLU'd, added to the residual stream as asked."""
    y = _round(y, dt)
    if SWIGLU:  # silu(gate) * up, each rounded as in eager
        y = _round(_round(y / (1.0 + tl.exp(-y)), dt) * _round(y_up, dt), dt)
    if RESIDUAL:  # the residual add of add_rms_norm, and this block's share of the next norm's sum of squares
        if GATE:
            if MASKED:
                y = tl.where(tl.load(KEEP) != 0, y, 0.0)
            y = _round(y * tl.load(G + rn * stride_g, mask=n_ok, other=0.0).to(tl.float32), dt)
        y = _round(tl.load(R + rn, mask=n_ok, other=0.0).to(tl.float32) + y, dt)
        tl.store(PART_OUT + pid, tl.sum(tl.where(n_ok, y * y, 0.0), axis=0))
    tl.store(Y + rn, y.to(dt), mask=n_ok)


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_w,
                 PART, n_part, NW, eps,  # NORM: X is the residual stream, normalized here
                 R, PART_OUT, G, KEEP, stride_g,  # RESIDUAL: Y = R + gate * keep * (X @ W.T), with partial sums
                 SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATE: tl.constexpr,
                 MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH):
    dt = Y.dtype.element_ty
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # summed over K in place, reduced once
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # Launched early (PDL), the first weight tiles head for L2 while the previous kernel finishes.
    for t in range(0, tl.minimum(PREFETCH, tl.cdiv(K, BLOCK_K))):
        cols = tl.minimum(t * BLOCK_K + tl.arange(0, BLOCK_K // 64) * 64, K - 1)  # one per 128-byte line
        lines = tl.minimum(rn, N - 1)[:, None] * stride_w + cols[None, :]
        _prefetch_l2(W + lines)
        if SWIGLU:
            _prefetch_l2(W + N * stride_w + lines)
    _wait_inputs(PDL)
    rstd = 1.0
    if NORM:
        rstd = _rstd(PART, n_part, K, eps, BLOCK_P)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        # the weights' loads are issued first: what follows waits for x, and they need not
        w_mask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(W + rn[:, None] * stride_w + kk[None, :], mask=w_mask, other=0.0)
        if SWIGLU:  # the up projection's rows follow the gate's N rows
            w_up = tl.load(W + (rn + N)[:, None] * stride_w + kk[None, :], mask=w_mask, other=0.0)
        x = _input(X, NW, kk, k_ok, rstd, dt, NORM)[None, :]
        acc += x * w.to(tl.float32)
        if SWIGLU:
            acc_up += x * w_up.to(tl.float32)
    _output(tl.sum(acc, axis=1), tl.sum(acc_up, axis=1), rn, n_ok, pid, Y, R, PART_OUT, G, KEEP, stride_g, dt,
            SWIGLU, RESIDUAL, GATE, MASKED)


@triton.jit
def _gemm_rows_kernel(X, W, Y, M, N, K, stride_x, stride_w,
                      PART, n_part, NW, eps, R, PART_OUT, G, KEEP, stride_g,
                      SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATE: tl.constexpr,
                      MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """_gemv_kernel for a few rows (M <= 16): each weight tile is read once for all of them, on the tensor cores.
    Partial sums of squares are per row: PART (M, n_part), PART_OUT (M, programs); Y and R are (M, N)."""
    dt = Y.dtype.element_ty
    pid = tl.program_id(0)
    rm = tl.arange(0, 16)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    _wait_inputs(PDL)
    rstd = tl.full([16], 1.0, dtype=tl.float32)
    if NORM:
        rp = tl.arange(0, BLOCK_P)
        sumsq = tl.load(PART + rm[:, None] * n_part + rp[None, :], mask=m_ok[:, None] & (rp < n_part)[None, :],
                        other=0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(sumsq, axis=1) / K + eps)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(W + rn[:, None] * stride_w + kk[None, :], mask=w_mask, other=0.0)
        if SWIGLU:
            w_up = tl.load(W + (rn + N)[:, None] * stride_w + kk[None, :], mask=w_mask, other=0.0)
        x = tl.load(X + rm[:, None] * stride_x + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            nw = tl.load(NW + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = _round(_round(x.to(tl.float32) * rstd[:, None], dt) * nw[None, :], dt).to(w.dtype)
        if UPCAST:  # Triton's interpreter multiplies bfloat16 wrongly; bfloat16 products are exact in float32
            x, w = x.to(tl.float32), w.to(tl.float32)
            if SWIGLU:
                w_up = w_up.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if SWIGLU:
            acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
    y = _round(acc, dt)
    if SWIGLU:
        y = _round(_round(y / (1.0 + tl.exp(-y)), dt) * _round(acc_up, dt), dt)
    ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        if GATE:
            if MASKED:
                y = tl.where(tl.load(KEEP + rm, mask=m_ok, other=0)[:, None] != 0, y, 0.0)
            y = _round(y * tl.load(G + rn * stride_g, mask=n_ok, other=0.0).to(tl.float32)[None, :], dt)
        y = _round(tl.load(R + rm[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32) + y, dt)
        tl.store(PART_OUT + rm * tl.num_programs(0) + pid, tl.sum(tl.where(ok, y * y, 0.0), axis=1), mask=m_ok)
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(dt), mask=ok)


class Normed:
    """The residual stream as a product left it for the next RMSNorm: x (M, K) and its partial sums of squares
    (M, programs). A GEMV given it as input normalizes x itself (gemv's norm)."""

    def __init__(self, x: torch.Tensor, partials: torch.Tensor):
        self.x, self.partials = x, partials


ROWS = 8  # up to this many rows go through the GEMV kernels; more through the model's own products (cuBLAS)


def gemv(x: torch.Tensor | Normed, weight: torch.Tensor, swiglu: bool = False, norm: tuple | None = None,
         residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, keep: torch.Tensor | None = None,
         block_n: int | None = None, block_k: int | None = None, warps: int = 4, stages: int = 3):
    """A few rows: x (M, K), weight (N, K) -> x @ weight.T (M, N); with swiglu, weight (2N, K) holds the gate rows
    then the up rows and the result is silu(gate) * up (M, N). One row streams the weights faster than cuBLAS
    (bench/gemv_sweep.py); up to ROWS rows read each weight tile once for all.

    The norms between the products fold into them (one launch fewer each): with norm (weight, eps), x is a Normed
    and the product is of weight * rms_norm(x.x); with residual (M, N), the result is residual + gate * keep *
    (x @ weight.T), returned as a Normed for the next product (gate (N,) or (1,), already tanh'd; keep (M,) bool).
    Both are rounded as kernels.add_rms_norm rounds them; only the sum of squares is added in another order.
    block_n, block_k, warps and stages override the tuned launch shape."""
    xin = x.x if isinstance(x, Normed) else x
    m, k = xin.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    assert m <= 16 and weight.shape[1] == k and xin.stride(1) == 1 and weight.stride(1) == 1
    assert (norm is not None) == isinstance(x, Normed)
    assert residual is None or residual.is_contiguous()
    y = torch.empty(m, n, dtype=xin.dtype, device=xin.device)
    if m == 1:
        # 4 rows x 1024 columns per program (8 for matrices at least twice as tall as wide, as wqkv): many small
        # programs keep enough loads in flight. The best blocks for every idefics-9b matrix on an H200, timed as
        # a decode step runs them, one after another (bench/gemv_sweep.py --chain).
        block_n = block_n or (8 if 2 * k <= n <= 16384 and not swiglu else 4)
        block_k = block_k or min(1024, triton.next_power_of_2(k))
    else:
        block_n = block_n or 32
        block_k = block_k or min(256, triton.next_power_of_2(k))
    grid = triton.cdiv(n, block_n)
    launch = _launch(xin)
    part_in = x.partials if norm is not None else y
    part_out = torch.empty(m, grid, dtype=torch.float32, device=xin.device) if residual is not None else y
    nw, eps = norm if norm is not None else (y, 0.0)
    n_part = part_in.shape[-1] if norm is not None else 1
    common = (n_part, nw, eps, residual if residual is not None else y, part_out, gate if gate is not None else y,
              keep.view(torch.uint8) if keep is not None else y, 1 if gate is not None and gate.numel() > 1 else 0)
    flags = dict(SWIGLU=swiglu, NORM=norm is not None, RESIDUAL=residual is not None, GATE=gate is not None,
                 MASKED=keep is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                 BLOCK_P=triton.next_power_of_2(n_part), num_warps=warps, **launch)
    if m == 1:
        _gemv_kernel[(grid,)](
            xin, weight, y, n, k, weight.stride(0), part_in, *common,
            PREFETCH=PREFETCH if launch["PDL"] and xin.dtype == torch.bfloat16 and block_k >= 64 else 0, **flags)
    else:
        _gemm_rows_kernel[(grid,)](xin, weight, y, m, n, k, xin.stride(0), weight.stride(0), part_in, *common,
                                   PRECISION="ieee" if xin.dtype == torch.float32 or INTERPRET else "tf32",
                                   UPCAST=INTERPRET, num_stages=stages, **flags)
    return Normed(y, part_out) if residual is not None else y
