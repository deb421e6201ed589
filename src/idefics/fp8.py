"""FP8 weights: a linear layer stored as float8_e4m3fn with one float32 scale per output channel, and its products.

    rows == 1      gemv.gemv reads the fp8 weights itself (the fused decode step calls it with the norms folded in)
    2-16 rows      fp8_gemm.weight_only_mm: a Triton GEMM converting each fp8 weight tile to bfloat16 in registers,
                   the activations untouched, K split over more programs where a matrix has few tiles of rows (the
                   splits' float32 sums added by a second launch)
    17-64 rows     fp8_gemm.tokens_fp8_mm ("scaled-triton"): activations quantized to fp8 per token (one scale
                   each), fp8 tensor cores, the per-token and per-channel scales applied to the float32 sums, in the
                   Triton GEMM's launch shapes
    more rows      torch._scaled_mm: the same arithmetic in cuBLAS (prefill)

On an H100 (bench/fp8.py, one run, 2026-12-07; all 32 layers' wqkv, wo, w13 and w2 one after another) the four
products of 32 rows took 99 us with tokens_fp8_mm, 117 with the weight-only GEMM, 130 with scaled_mm and 159 in
bfloat16 (cuBLAS); at 64 rows 105, 134, 129 and 163; at 256 rows scaled_mm leads (145 against 264 for
tokens_fp8_mm). Decoding at batch 32: 1.44x cuBLAS bfloat16's tokens/s with tokens_fp8_mm, 1.27x weight-only, 1.19x
scaled_mm (in a later run 1.40x the bfloat16 default's, which has its own Triton GEMM: fused.GEMM_ROWS). Up to 16
rows the weight-only GEMM keeps the activations in bfloat16 (logits cosine 0.9988 against the dequantized weights on
random 9b-shaped weights, fp8 tokens 0.963), though tokens_fp8_mm is faster there too (batch 8: 1.64x against
1.43x): a decode step of a few sequences stays as close to bfloat16 as fp8 weights allow, and larger batches, like
every prefill, take fp8 tokens. PRODUCT (IDEFICS_FP8_PRODUCT) forces one product for every row count above one:
"weight-only", "scaled" (scaled_mm) or "scaled-triton".

Those kernels need Hopper (fp8 conversion in Triton and row-wise scaled_mm), bfloat16 activations and dimensions
that are multiples of 16. Anywhere else (the CPU, older GPUs, float32) the layer upcasts: the fp8 weights are
converted to the activations' dtype, multiplied, and the product scaled in float32, so tests and the demo model
compute exactly what the stored weights say."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value: each row's largest weight maps onto it
PRODUCTS = ("auto", "weight-only", "scaled", "scaled-triton")
# Which product serves rows > 1 on Hopper (IDEFICS_FP8_PRODUCT, default "auto"); bench/fp8.py sets it to time each.
PRODUCT = os.environ.get("IDEFICS_FP8_PRODUCT", "auto")  # (checked where fp8 is asked for: quantize.method)
WEIGHT_ONLY_ROWS = 16  # "auto": the weight-only GEMM up to this many rows
TRITON_ROWS = 64  # tokens_fp8_mm up to this many, scaled_mm above
_CHUNK = 2048  # rows quantized at a time: the float32 temporaries stay small next to the layer


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (float8_e4m3fn (N, K), float32 scales (N,)) with w ~ q * scale[:, None]; on w's device. Each row's
    largest magnitude becomes 448 (an all-zero row gets scale 1); values round to nearest."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], _CHUNK):
        rows = w[start : start + _CHUNK].float()
        amax = rows.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale[start : start + _CHUNK] = s
        q[start : start + _CHUNK] = (rows / s[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights an fp8 layer computes with, rounded to dtype (N, K)."""
    return (q.float() * scale[:, None]).to(dtype)


@functools.cache
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def kernels_ready(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fp8 kernels serve this weight for activations of dtype (else the layer upcasts)."""
    n, k = weight.shape
    return weight.is_cuda and dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0 and _hopper(weight.device)


class Fp8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T, bias-free; weight (N, K) float8_e4m3fn, scale (N,) float32."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        return cls(*quantize_weight(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = mm(x.reshape(-1, self.in_features), self.weight, self.scale)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def _product(rows: int) -> str:
    """The product that serves `rows` rows (more than one) on Hopper."""
    if PRODUCT != "auto":
        return PRODUCT
    return "weight-only" if rows <= WEIGHT_ONLY_ROWS else "scaled-triton" if rows <= TRITON_ROWS else "scaled"


def quantizes_tokens(weight: torch.Tensor, rows: int, dtype: torch.dtype) -> bool:
    """Whether mm quantizes `rows` activations of dtype to fp8 for this weight first (tokens_fp8_mm, scaled_mm): a
    kernel that writes the activations can hand them over quantized instead (kernels.add_rms_norm's fp8), one
    launch fewer."""
    return rows > 1 and kernels_ready(weight, dtype) and _product(rows) in ("scaled-triton", "scaled")


def mm(x, weight: torch.Tensor, scale: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """x (M, K) @ the fp8 weight (N, K) with its scales (N,) -> (M, N) in x's dtype, by the product the table above
    picks for M rows; where quantizes_tokens says so, x may come quantized as quantize_rows makes it (fp8 (M, K),
    scales (M, 1)), for bfloat16 activations. swiglu: the weight holds gate rows then up rows (2N, K) -> silu(gate)
    * up (M, N), applied by the Triton products' epilogue (one launch fewer), else by kernels.silu_mul: the same
    bits."""
    tokens = isinstance(x, tuple)
    (rows, _), dtype = (x[0].shape, torch.bfloat16) if tokens else (x.shape, x.dtype)
    assert not tokens or quantizes_tokens(weight, rows, dtype)
    x = x if tokens else x.contiguous()
    product = _product(rows)
    if not kernels_ready(weight, dtype):
        y = upcast_mm(x, weight, scale)
    elif rows == 1:
        from idefics.gemv import gemv

        return gemv(x, weight, swiglu, scale=scale)
    elif product == "weight-only":
        from idefics.fp8_gemm import weight_only_mm

        return weight_only_mm(x, weight, scale, swiglu)
    elif product == "scaled-triton":
        from idefics.fp8_gemm import tokens_fp8_mm

        return tokens_fp8_mm(x, weight, scale, swiglu)
    else:
        y = scaled_mm(x, weight, scale)
    if swiglu:
        from idefics.kernels import silu_mul

        return silu_mul(y)
    return y


def upcast_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ the fp8 weight, computed in x's dtype, scaled per channel in float32 -> (M, N) in x's dtype."""
    return (F.linear(x, weight.to(x.dtype)) * scale).to(x.dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8_e4m3fn (M, K), float32 scales (M, 1)): one scale per token, as quantize_weight does rows.
    One Triton launch on CUDA."""
    if x.is_cuda:
        from idefics.fp8_gemm import quantize_rows as kernel

        return kernel(x)
    amax = x.float().abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8), s


def scaled_mm(x, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) bfloat16 -> (M, N) bfloat16 through fp8 tensor cores: activations quantized per token (or x comes
    quantized: fp8 (M, K), scales (M, 1)), the row-wise scales (M, 1) and (1, N) applied by torch._scaled_mm
    (CUTLASS on Hopper)."""
    xq, xs = x if isinstance(x, tuple) else quantize_rows(x)
    return torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale[None], out_dtype=torch.bfloat16)
