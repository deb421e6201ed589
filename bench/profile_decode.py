"""Where a decode step's time goes: kernel time by kernel (one eager step under the profiler) against the step's
wall time when replayed as a CUDA graph. idefics-9b shape, random bfloat16 weights.

    PYTHONPATH=src python bench/profile_decode.py [--batches 1 32] [--compile] [--quantize fp8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import decoding, random_model, step_seconds, timed  # noqa: E402

from idefics import quantize  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402
from idefics.engine import Engine  # noqa: E402


@torch.inference_mode()
def blas_libraries():
    """Each idefics-9b decoder matrix at batch 1, 20 back-to-back products captured in one CUDA graph (as in a
    decode step), under each BLAS library PyTorch can use."""
    c = idefics_9b()
    d, f = c.hidden_size, c.intermediate_size
    shapes = {"wqkv": (3 * d, d), "wo": (d, d), "w13": (2 * f, d), "w2": (d, f), "lm_head": (c.total_vocab_size, d)}
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        line = []
        for name, (n, k) in shapes.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]  # 4 copies: no L2 reuse
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for w in ws:
                torch.nn.functional.linear(x, w)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(5):
                    for w in ws:
                        torch.nn.functional.linear(x, w)
            graph.replay()
            t, _ = timed(graph.replay)
            line.append(f"{name} {1e6 * t / 20:.1f} us ({n * k * 2 * 20 / t / 1e12:.2f} TB/s)")
        print(f"{library}: " + ", ".join(line), flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--vision", action="store_true", help="also profile the image encoder at batch 64")
    parser.add_argument("--blas", action="store_true", help="time one token's matrix products per BLAS library")
    parser.add_argument("--quantize", choices=["fp8"], help="the decoder's layers quantized in place first")
    args = parser.parse_args()
    if args.blas:
        blas_libraries()
    model = random_model(idefics_9b(), "cuda", torch.bfloat16)
    if args.quantize:
        quantize.quantize(model, args.quantize)
    if args.vision:
        pixels = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            model.encode_images(pixels)
        t, _ = timed(lambda: model.encode_images(pixels))
        print(f"encode 64 images: {1e3 * t:.1f} ms ({64 / t:.0f}/s)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.encode_images(pixels)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
    for b in args.batches:
        for graphs in (False, True):
            engine = Engine(model, graphs=graphs, compile=args.compile)
            tokens = decoding(engine, b)
            print(f"batch {b} graphs={graphs}: {1e3 * step_seconds(engine, tokens):.2f} ms/step", flush=True)
            if b == args.batches[0]:  # eager: each kernel's own time; graphed: as replayed, gaps excluded
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    engine.decode(tokens)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
            engine.release(0, engine.active)


if __name__ == "__main__":
    main()
