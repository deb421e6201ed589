"""The decoder's matrix-vector products at batch 1 (idefics-9b shapes, bfloat16): cuBLAS against the Triton GEMV of
kernels.py over its block shapes, each timed as 20 back-to-back products in one CUDA graph (as in a decode step).
kernels.gemv's default blocks are the best of this sweep on an H200.

    PYTHONPATH=src python bench/gemv_sweep.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import timed  # noqa: E402

from idefics import kernels  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402


def graph_time(fn, copies: int) -> float:
    for i in range(copies):
        fn(i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(5):
            for i in range(copies):
                fn(i)
    graph.replay()
    return min(timed(graph.replay)[0] for _ in range(3)) / (5 * copies)


@torch.inference_mode()
def main():
    argparse.ArgumentParser(description=__doc__).parse_args()
    c = idefics_9b()
    d, f = c.hidden_size, c.intermediate_size
    shapes = {"wqkv": (3 * d, d), "wo": (d, d), "w13": (2 * f, d), "w2": (d, f), "lm_head": (c.total_vocab_size, d)}
    configs = [(bn, bk, w) for bn in (1, 2, 4, 8) for bk in (512, 1024, 2048, 4096) for w in (4, 8)
               if bn * bk <= 8192 and bn * bk >= 32 * w * 4]
    print(torch.cuda.get_device_name())
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]  # beyond L2
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        t_blas = graph_time(lambda i: F.linear(x, ws[i]), 4)
        best = None
        for bn, bk, w in configs:
            if bk > 2 * k:
                continue
            try:
                t = graph_time(lambda i: kernels.gemv(x, ws[i], block_n=bn, block_k=bk, warps=w), 4)
            except Exception as e:  # a shape the compiler rejects
                print(f"  {name} {bn}x{bk} w{w}: {type(e).__name__}")
                continue
            if best is None or t < best[0]:
                best = (t, bn, bk, w)
        got = kernels.gemv(x, ws[0], block_n=best[1], block_k=best[2], warps=best[3])
        err = (got.float() - F.linear(x, ws[0]).float()).abs().max().item()
        gb = n * k * 2 / 1e9
        print(f"{name} ({n}x{k}): cuBLAS {1e6 * t_blas:.1f} us ({gb / t_blas / 1e3:.2f} TB/s), "
              f"triton {1e6 * best[0]:.1f} us ({gb / best[0] / 1e3:.2f} TB/s) at BLOCK_N={best[1]} BLOCK_K={best[2]} "
              f"warps={best[3]}; max diff {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
