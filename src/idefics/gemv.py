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

from idefics.kernels import _launch, _prefetch_weights, _round, _swiglu, _wait_inputs

PREFETCH = 1  # with PDL: a GEMV sends this many tiles of its weights to L2 before it waits (see _gemv_kernel)
# fp8 weights read per thread and load: 8, as many as the bfloat16 activations' 16 bytes hold, gives both the same
# layout; 16 (Triton's choice) makes it shuffle the activations through shared memory, behind 4 barriers a tile.
# The activations' tile must fill the program too (BLOCK_K >= 256 * warps), or they are shuffled all the same.
FP8_LOAD = 8


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
def _tile(rows, up, kk, n_ok, K, SWIGLU: tl.constexpr):
    """The weights at columns kk of the program's rows (and of the up projection's, `up` elements on), zero past K."""
    mask = n_ok[:, None] & (kk < K)[None, :]
    w = tl.load(rows + kk[None, :], mask=mask, other=0.0)
    w_up = w
    if SWIGLU:
        w_up = tl.load(rows + up + kk[None, :], mask=mask, other=0.0)
    return w, w_up


@triton.jit
def _output(y, y_up, rn, n_ok, pid, Y, R, PART_OUT, G, KEEP, stride_g, dt: tl.constexpr, SWIGLU: tl.constexpr,
            RESIDUAL: tl.constexpr, GATE: tl.constexpr, MASKED: tl.constexpr):
    """Store the float32 sums of rows rn: rounded, SwiGLU'd, added to the residual stream as asked."""
    y = _round(y, dt)
    if SWIGLU:  # silu(gate) * up, each rounded as in eager
        y = _swiglu(y, _round(y_up, dt), dt)
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
                 S,  # SCALED: W holds fp8 rows, each scaled by S (N,), or (2N,) with SWIGLU
                 SWIGLU: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATE: tl.constexpr,
                 MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH, SCALED: tl.constexpr, FP8_LOAD: tl.constexpr):
    dt = Y.dtype.element_ty
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if SCALED:  # fp8 weights read 8 to a thread, as the bfloat16 activations are: no shuffle between the two layouts
        rk = tl.max_contiguous(rk, FP8_LOAD)
    n_ok = rn < N
    up = N * stride_w  # SWIGLU: the up projection's rows follow the gate's N rows
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # summed over K in place, reduced once
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # Launched early (PDL), the first weight tiles head for L2 while the previous kernel finishes (64 bfloat16
    # columns: a 128-byte line).
    _prefetch_weights(W, rn, N, stride_w, up, 0, K, K, PREFETCH, BLOCK_K, 64, SWIGLU)
    _wait_inputs(PDL)
    rstd = 1.0
    if NORM:
        rstd = _rstd(PART, n_part, K, eps, BLOCK_P)
    rows = W + rn[:, None] * stride_w
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w, w_up = _tile(rows, up, kk, n_ok, K, SWIGLU)  # first: what follows waits for x, and the weights need not
        x = _input(X, NW, kk, kk < K, rstd, dt, NORM)[None, :]
        acc += x * w.to(tl.float32)
        if SWIGLU:
            acc_up += x * w_up.to(tl.float32)
    y, y_up = tl.sum(acc, axis=1), tl.sum(acc_up, axis=1)
    if SCALED:  # each row's scale, once on its float32 sum
        y = y * tl.load(S + rn, mask=n_ok, other=0.0)
        if SWIGLU:
            y_up = y_up * tl.load(S + N + rn, mask=n_ok, other=0.0)
    _output(y, y_up, rn, n_ok, pid, Y, R, PART_OUT, G, KEEP, stride_g, dt,
            SWIGLU, RESIDUAL, GATE, MASKED)


class Normed:
    """The residual stream as a product left it for the next RMSNorm: x (1, K) and its partial sums of squares
    (one per program). A GEMV given it as input normalizes x itself (gemv's norm)."""

    def __init__(self, x: torch.Tensor, partials: torch.Tensor):
        self.x, self.partials = x, partials


def gemv(x: torch.Tensor | Normed, weight: torch.Tensor, swiglu: bool = False, norm: tuple | None = None,
         residual: torch.Tensor | None = None, gate: torch.Tensor | None = None, keep: torch.Tensor | None = None,
         block_n: int | None = None, block_k: int | None = None, warps: int | None = None,
         scale: torch.Tensor | None = None):
    """One row: x (1, K), weight (N, K) -> x @ weight.T (1, N); with swiglu, weight (2N, K) holds the gate rows then
    the up rows and the result is silu(gate) * up (1, N). At batch 1 this streams the weights faster than cuBLAS
    (bench/gemv_sweep.py).

    The norms between the products fold into them (one launch fewer each): with norm (weight, eps), x is a Normed
    and the product is of weight * rms_norm(x.x); with residual (1, N), the result is residual + gate * keep *
    (x @ weight.T), returned as a Normed for the next product (gate (N,) or (1,), already tanh'd; keep (1,) bool).
    Both are rounded as kernels.add_rms_norm rounds them; only the sum of squares is added in another order.
    block_n, block_k and warps override the tuned launch shape.

    With scale (N,), or (2N,) for swiglu, float32: weight is float8_e4m3fn and row i of the product is scaled by
    scale[i] (fp8.Fp8Linear's layout); the weights are converted in registers, the sums stay float32."""
    xin = x.x if isinstance(x, Normed) else x
    k = xin.shape[1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    assert xin.shape[0] == 1 and weight.shape[1] == k and xin.stride(1) == 1 and weight.stride(1) == 1
    assert (norm is not None) == isinstance(x, Normed)
    y = torch.empty(1, n, dtype=xin.dtype, device=xin.device)
    # 4 rows x 1024 columns per program (8 for matrices at least twice as tall as wide, as wqkv): many small
    # programs keep enough loads in flight. The best blocks for every idefics-9b matrix on an H200, timed as a
    # decode step runs them, one after another (bench/gemv_sweep.py --chain).
    # fp8: the best per matrix in the same chain with fp8 weights, on an H100 (bench/gemv_sweep.py --chain --fp8):
    # 16 x 256 for wqkv, 4 x 512 (twice: gate and up rows) for w13, 8 x 1024 for wo, 4 x 1024 for w2, all over 4
    # warps: a batch-1 fp8 decode step 11% faster than with 8 x 1024 over 8 warps everywhere (bench/fp8.py, one
    # run after the other on one H100).
    if scale is not None and block_n is None and block_k is None:
        tall = 2 * k <= n and not swiglu
        block_n, block_k = (16, 256) if tall else (4, 512) if swiglu else (8, 1024) if k <= n else (4, 1024)
    block_n = block_n or (8 if 2 * k <= n <= 16384 and not swiglu else 4)
    # At least 64: the prefetch loop splits a block into 128-byte lines of 64 columns (compiled even when unused).
    block_k = block_k or min(1024, max(64, triton.next_power_of_2(k)))
    warps = warps or 4
    grid = triton.cdiv(n, block_n)
    launch = _launch(xin)
    part_in = x.partials if norm is not None else y
    part_out = torch.empty(grid, dtype=torch.float32, device=xin.device) if residual is not None else y
    nw, eps = norm if norm is not None else (y, 0.0)
    _gemv_kernel[(grid,)](
        xin, weight, y, n, k, weight.stride(0), part_in, part_in.numel(), nw, eps,
        residual if residual is not None else y, part_out, gate if gate is not None else y,
        keep.view(torch.uint8) if keep is not None else y, 1 if gate is not None and gate.numel() > 1 else 0,
        scale if scale is not None else y, SCALED=scale is not None, FP8_LOAD=FP8_LOAD,
        SWIGLU=swiglu, NORM=norm is not None, RESIDUAL=residual is not None, GATE=gate is not None,
        MASKED=keep is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_P=triton.next_power_of_2(part_in.numel()) if norm is not None else 1, num_warps=warps,
        PREFETCH=PREFETCH if launch["PDL"] and xin.dtype == torch.bfloat16 and block_k >= 64 else 0, **launch)
    return Normed(y, part_out) if residual is not None else y
