"""The decoder's matrix-vector products at batch 1 (idefics-9b shapes, bfloat16): cuBLAS against the Triton GEMV of
gemv.py over its block shapes, each timed as 20 back-to-back products in one CUDA graph (as in a decode step).
With --chain: 32 decoder layers' products at batch 1 in one CUDA graph, as a decode step runs them one after
another, with the norms between them as separate kernels or folded into the products, launched with or without
programmatic dependent launch and the L2 prefetch, and with other blocks per matrix. gemv.gemv's default blocks
are the best of the chain on an H200. With --chain --fp8: the same chain with the weights in float8_e4m3fn
(fp8.Fp8Linear's layout), over the fp8 GEMV's blocks.

    PYTHONPATH=src python bench/gemv_sweep.py [--chain [--fp8] [--only WORDS...]]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import timed  # noqa: E402

from idefics import fp8, gemv, kernels  # noqa: E402
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


MATRICES = ("qkv", "wo", "w13", "w2")  # a decoder layer's products, in the chain's order
# Per-matrix launch shapes to try in the chain (the other matrices keep gemv.gemv's defaults).
BF16_BLOCKS = (("qkv 4 rows", {"qkv": dict(block_n=4)}), ("qkv 16x512", {"qkv": dict(block_n=16, block_k=512)}),
               ("wo 8 rows", {"wo": dict(block_n=8)}), ("wo 2x2048", {"wo": dict(block_n=2, block_k=2048)}),
               ("w13 2 rows", {"w13": dict(block_n=2)}), ("w13 8x512", {"w13": dict(block_n=8, block_k=512)}),
               ("w2 8 rows", {"w2": dict(block_n=8)}), ("w2 4x2048", {"w2": dict(block_n=4, block_k=2048)}),
               ("8 warps", {m: dict(warps=8) for m in MATRICES}))
FP8_BLOCKS = tuple(
    (f"{m} {bn}x{bk} w{w}", {m: dict(block_n=bn, block_k=bk, warps=w)})
    for m, shapes in (("qkv", ((16, 256, 4), (8, 1024, 4), (16, 1024, 4), (16, 512, 2), (16, 256, 1), (32, 256, 1))),
                      ("wo", ((8, 1024, 4), (4, 1024, 4), (4, 2048, 4), (8, 2048, 8), (8, 512, 2))),
                      ("w13", ((4, 512, 4), (4, 1024, 4), (8, 1024, 4), (8, 512, 2), (2, 1024, 4))),
                      ("w2", ((4, 1024, 4), (4, 2048, 4), (8, 1024, 4), (8, 2048, 8), (8, 512, 2))))
    for bn, bk, w in shapes) + (("4 warps", {m: dict(warps=4) for m in MATRICES}),)


@torch.inference_mode()
def chain(fp8_weights: bool = False, only: list[str] | None = None):
    c = idefics_9b()
    d, f = c.hidden_size, c.intermediate_size
    dev, dt = "cuda", torch.bfloat16
    layers = [{name: torch.randn(n, k, device=dev, dtype=dt) * 0.02
               for name, (n, k) in (("qkv", (3 * d, d)), ("wo", (d, d)), ("w13", (2 * f, d)), ("w2", (d, f)))}
              for _ in range(c.num_hidden_layers)]
    scales = [{} for _ in layers]  # fp8: each matrix's per-row scales
    if fp8_weights:
        for w, s in zip(layers, scales):
            for name in list(w):
                w[name], s[name] = fp8.quantize_weight(w[name])
    nw = torch.ones(d, device=dev, dtype=dt)
    x0 = torch.randn(1, d, device=dev, dtype=dt)

    def separate_norms(cfg):
        x, pending = x0, None
        for w in layers:
            x, n = kernels.add_rms_norm(x, pending, nw, 1e-6)
            pending = gemv.gemv(gemv.gemv(n, w["qkv"])[:, :d].contiguous(), w["wo"])
            x, n = kernels.add_rms_norm(x, pending, nw, 1e-6)
            pending = gemv.gemv(gemv.gemv(n, w["w13"], swiglu=True), w["w2"])

    def folded_norms(cfg):
        x = gemv.Normed(x0, torch.full((512,), float(d) / 512, device=dev))
        for w, s in zip(layers, scales):
            a = gemv.gemv(x, w["qkv"], norm=(nw, 1e-6), scale=s.get("qkv"), **cfg.get("qkv", {}))[:, :d].contiguous()
            x = gemv.gemv(a, w["wo"], residual=x.x, scale=s.get("wo"), **cfg.get("wo", {}))
            h = gemv.gemv(x, w["w13"], swiglu=True, norm=(nw, 1e-6), scale=s.get("w13"), **cfg.get("w13", {}))
            x = gemv.gemv(h, w["w2"], residual=x.x, scale=s.get("w2"), **cfg.get("w2", {}))

    runs = [] if fp8_weights else [("separate norms", separate_norms, {}, False, 0),
                                   ("separate norms, PDL", separate_norms, {}, True, 0)]
    runs += [("folded norms", folded_norms, {}, False, 0), ("folded norms, PDL", folded_norms, {}, True, 0)]
    runs += [(f"folded norms, PDL + prefetch {n} tiles", folded_norms, {}, True, n) for n in (1, 2, 4, 16)]
    for name, cfg in FP8_BLOCKS if fp8_weights else BF16_BLOCKS:
        runs.append((f"folded norms, PDL + prefetch, {name}", folded_norms, cfg, True, 1))
    weight_bytes = sum(t.numel() * t.element_size() for w in layers for t in w.values())
    if fp8_weights:  # the fp8 weights read 16 to a thread, Triton's choice (gemv.FP8_LOAD)
        runs.append(("folded norms, PDL + prefetch, fp8 loads of 16", folded_norms, {"fp8_load": 16}, True, 1))
    for name, fn, cfg, pdl, prefetch in runs:
        if only and not any(word in name for word in only):
            continue
        kernels.PDL, gemv.PREFETCH = pdl, prefetch
        gemv.FP8_LOAD = cfg.pop("fp8_load", 8)
        try:
            fn(cfg)
        except Exception as e:  # a launch shape or pipelining the compiler rejects
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(cfg)
        graph.replay()
        t = min(timed(lambda: [graph.replay() for _ in range(10)])[0] for _ in range(3)) / 10
        print(f"{name}: {t * 1e3:.3f} ms ({weight_bytes / t / 1e12:.2f} TB/s)", flush=True)
    kernels.PDL, gemv.PREFETCH, gemv.FP8_LOAD = True, 1, 8


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chain", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="with --chain: fp8 weights")
    parser.add_argument("--only", nargs="+", metavar="WORDS",
                        help="with --chain: the runs whose names hold one of these")
    args = parser.parse_args()
    if args.chain:
        return chain(args.fp8, args.only)
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
                t = graph_time(lambda i: gemv.gemv(x, ws[i], block_n=bn, block_k=bk, warps=w), 4)
            except Exception as e:  # a shape the compiler rejects
                print(f"  {name} {bn}x{bk} w{w}: {type(e).__name__}")
                continue
            if best is None or t < best[0]:
                best = (t, bn, bk, w)
        got = gemv.gemv(x, ws[0], block_n=best[1], block_k=best[2], warps=best[3])
        err = (got.float() - F.linear(x, ws[0]).float()).abs().max().item()
        gb = n * k * 2 / 1e9
        print(f"{name} ({n}x{k}): cuBLAS {1e6 * t_blas:.1f} us ({gb / t_blas / 1e3:.2f} TB/s), "
              f"triton {1e6 * best[0]:.1f} us ({gb / best[0] / 1e3:.2f} TB/s) at BLOCK_N={best[1]} BLOCK_K={best[2]} "
              f"warps={best[3]}; max diff {err:.3g}", flush=True)


if __name__ == "__main__":
    main()
