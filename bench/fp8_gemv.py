"""FP8 matrix-vector products at batch 1 (idefics-9b decoder shapes): how fast each way of reading float8_e4m3fn
weights streams them, against bfloat16's GEMV on the same matrices, each timed as back-to-back products in one CUDA
graph over copies larger than L2 (as in a decode step).

    convert   gemv.gemv's kernel (each weight converted to float32 by Triton's fp8 conversion)
    bits      the e4m3 bits moved into a float32's place by integer ops, one multiply by 2^120 making it exact
    dot       tensor cores: the one row padded to 16, the weights converted to float16 (exact), float32 sums

    PYTHONPATH=src python bench/fp8_gemv.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from gemv_sweep import graph_time  # noqa: E402

from idefics import fp8, gemv  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402


@triton.jit
def _bits_kernel(X, W, S, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        b = tl.load(W + rn[:, None] * K + kk[None, :]).to(tl.uint8, bitcast=True).to(tl.uint32)
        w = (((b & 0x80) << 24) | ((b & 0x7F) << 20)).to(tl.float32, bitcast=True)
        x = tl.load(X + kk).to(tl.float32)
        acc += x[None, :] * w
    y = tl.sum(acc, axis=1) * (tl.load(S + rn) * 1.329227995784916e36)  # 2^120
    tl.store(Y + rn, y.to(tl.bfloat16))


@triton.jit
def _dot_kernel(X, W, S, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, 16)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(W + rn[:, None] * K + kk[None, :]).to(tl.float16)
        x = tl.load(X + kk).to(tl.float16)
        xs = tl.where(rm[:, None] == 0, x[None, :], 0.0).to(tl.float16)
        acc = tl.dot(xs, tl.trans(w), acc)
    y = tl.sum(acc, axis=0) * tl.load(S + rn)
    tl.store(Y + rn, y.to(tl.bfloat16))


def run(kernel, x, w, s, bn, bk, warps):
    n, k = w.shape
    y = torch.empty(1, n, device=x.device, dtype=torch.bfloat16)
    kernel[(n // bn,)](x, w, s, y, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y


@torch.inference_mode()
def main():
    c = idefics_9b()
    d, f = c.hidden_size, c.intermediate_size
    shapes = {"wqkv": (3 * d, d), "wo": (d, d), "w13": (2 * f, d), "w2": (d, f)}
    print(torch.cuda.get_device_name(), flush=True)
    for name, (n, k) in shapes.items():
        copies = 8
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q = [fp8.quantize_weight(w) for w in wb]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ fp8.dequantize_weight(*q[0], torch.float32).T)
        gb16, gb8 = n * k * 2 / 1e9, n * k / 1e9
        t = graph_time(lambda i: gemv.gemv(x, wb[i]), copies)
        print(f"{name} {n}x{k}: bf16 gemv {t * 1e6:.1f} us {gb16 / t / 1e3:.2f} TB/s", flush=True)
        t = graph_time(lambda i: gemv.gemv(x, q[i][0], scale=q[i][1]), copies)
        print(f"  fp8 gemv default {t * 1e6:.1f} us {gb8 / t / 1e3:.2f} TB/s", flush=True)
        results = []
        for variant in ("convert", "bits", "dot"):
            for bn in (4, 8, 16, 32, 64):
                for bk in (256, 512, 1024, 2048):
                    for warps in (4, 8):
                        if bn * bk > 32768 or bn * bk < 32 * warps * 16 or k % bk or n % bn:
                            continue
                        if variant == "dot" and bn < 16:
                            continue
                        try:
                            if variant == "convert":
                                fn = lambda i: gemv.gemv(x, q[i][0], scale=q[i][1],  # noqa: E731
                                                         block_n=bn, block_k=bk, warps=warps)
                            else:
                                kern = _bits_kernel if variant == "bits" else _dot_kernel
                                fn = lambda i: run(kern, x, q[i][0], q[i][1], bn, bk, warps)  # noqa: E731
                            t = graph_time(fn, copies)
                            err = ((fn(0).float() - ref).abs().max() / ref.abs().max()).item()
                        except Exception as e:  # a shape the compiler rejects
                            print(f"  {variant} {bn}x{bk} w{warps}: {type(e).__name__} {str(e)[:80]}", flush=True)
                            continue
                        results.append((t, variant, bn, bk, warps, err))
        for variant in ("convert", "bits", "dot"):
            best = sorted(r for r in results if r[1] == variant)[:3]
            for t, v, bn, bk, warps, err in best:
                print(f"  {v:8s} {bn:3d}x{bk:<5d} w{warps}: {t * 1e6:.1f} us {gb8 / t / 1e3:.2f} TB/s "
                      f"rel err {err:.2e}", flush=True)
        wb = q = None  # the next shape's copies fit
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
