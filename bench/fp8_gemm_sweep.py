"""The fp8 products of a few rows on the idefics-9b decoder matrices (wqkv, w13, wo, w2 at 8 to 64 tokens):
bfloat16 cuBLAS, torch._scaled_mm with the tokens quantized to fp8 (fp8.scaled_mm, its quantization launch
included), and the two Triton GEMMs at their default launch shape and over a grid of them (block_n, block_k,
split_k, warps, stages): the weight-only one (fp8_gemm.weight_only_mm; at the default shape also with Triton's own
fp8 conversion, fp8_gemm.FAST_CONVERT off), the one of fp8 tokens (fp8_gemm.tokens_fp8_mm, "scaled-triton"), and
the same GEMM on the bfloat16 weights (fp8_gemm.plain_mm, "bf16-triton", against cuBLAS).
Each product is timed as back-to-back calls over copies of its weights larger than L2 in one CUDA graph; the median
replay is reported, in microseconds and in TB/s of the weight bytes read (N * K for fp8, 2 * N * K for bfloat16).
Every Triton shape is checked against x @ the (dequantized) weights in float32 first; one off by more than 1% of the
largest output (5% with fp8 tokens, their own rounding) is dropped. Ends with the sum over the four matrices (one
decoder layer's products) per row count.

    PYTHONPATH=src python bench/fp8_gemm_sweep.py [--rows 8 16 32 64] [--out sweep.json] [--all] [--quick]
    PYTHONPATH=src python bench/fp8_gemm_sweep.py --check    # tiny shapes on the CPU through Triton's interpreter

Meant to take a few minutes on an H100: --jobs compiles the grid's kernels in that many processes first (Triton's
disk cache keeps them for the timed run); --quick keeps 4 warps and 4 stages only (a fifth of the grid). --all
prints every shape's time, not only the best few."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

if "--check" in sys.argv:  # chosen when the kernels are defined: before idefics.fp8_gemm is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from idefics import fp8, fp8_gemm  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402

GRID = dict(block_n=(16, 32, 64, 128), block_k=(64, 128, 256, 512), split_k=(1, 2, 4, 8), warps=(4, 8),
            stages=(3, 4, 5))
CHECK_GRID = dict(block_n=(16, 32), block_k=(64,), split_k=(1, 2, 4), warps=(4,), stages=(3,))
CHECK_SHAPES = {"wqkv": (96, 256), "w13": (176, 256), "wo": (32, 256), "w2": (32, 704)}  # (N, K)
TILE_BYTES = (4096, 16384)  # fp8 weight tile: smaller ones issue too few loads, larger ones spill registers
SHARED_BYTES = 192 * 1024  # stages * (weight tile + bfloat16 tokens' tile), within Hopper's 227 KB
MAX_ERROR = 1e-2  # of the largest output: bfloat16's rounding of the result is 2^-9 of it
SHOWN = 5  # best weight-only shapes printed per matrix and row count
# The Triton products swept, each with the weights it reads: fp8 weights with bfloat16 tokens (weights converted)
# or with tokens quantized to fp8 as scaled_mm does, and the bfloat16 weights themselves (fp8_gemm.plain_mm)
TRITON_PRODUCTS = {"weight-only": (fp8_gemm.weight_only_mm, "fp8"), "scaled-triton": (fp8_gemm.tokens_fp8_mm, "fp8"),
                   "bf16-triton": (fp8_gemm.plain_mm, "bf16")}
MAX_ERRORS = {"weight-only": MAX_ERROR, "scaled-triton": 5 * MAX_ERROR, "bf16-triton": MAX_ERROR}  # fp8 tokens:
# their own rounding too


def shapes() -> dict:
    c = idefics_9b()
    d, f = c.hidden_size, c.intermediate_size
    return {"wqkv": (3 * d, d), "w13": (2 * f, d), "wo": (d, d), "w2": (d, f)}


def launch_shapes(m: int, n: int, k: int, grid: dict, sms: int, check: bool) -> list[dict]:
    """The grid's launch shapes for x (m, k) @ weight (n, k).T, pruned: tiles of TILE_BYTES, shared memory within
    SHARED_BYTES, splits of 2 tiles of K at least, at most 8 programs per SM once K is split, 8 warps for tiles of
    8 KB on; shapes the launch rule makes equal (a split it shortens) kept once."""
    seen, out = set(), []
    for bn, bk, split, warps, stages in itertools.product(*grid.values()):
        c = fp8_gemm.weight_only_config(m, n, k, sms, bn, bk, split, warps, stages)
        tiles = triton.cdiv(n, bn) * triton.cdiv(m, c["block_m"])
        if not check and (not TILE_BYTES[0] <= bn * bk <= TILE_BYTES[1] or (warps == 8 and bn * bk < 8192)
                          or stages * (bn * bk + 2 * c["block_m"] * bk) > SHARED_BYTES):
            continue
        if split > 1 and (triton.cdiv(k, bk) // split < 2 or tiles * split > 8 * sms):
            continue
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(dict(block_n=bn, block_k=bk, split_k=c["split_k"], warps=warps, stages=stages))
    return out


def _compile(jobs: list) -> None:
    """Runs each (m, n, k, launch shape) once on zeros: Triton compiles it into its disk cache."""
    for m, n, k, c in jobs:
        x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
        weights = {"fp8": (torch.zeros(n, k, dtype=fp8.FP8, device="cuda"), torch.ones(n, device="cuda")),
                   "bf16": (torch.zeros(n, k, dtype=torch.bfloat16, device="cuda"),)}
        for product, kind in TRITON_PRODUCTS.values():
            try:
                product(x, *weights[kind], **c)
            except Exception:  # too large for the card: the timed run says so
                pass
    if jobs:
        torch.cuda.synchronize()


def precompile(jobs: list, processes: int) -> None:
    import multiprocessing

    chunks = [jobs[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_compile, chunks)


def median_us(fn, copies: int, iters: int, cuda: bool) -> float:
    """Median time of one fn(i) over `iters` runs of fn(0..copies-1); on CUDA captured in one graph."""
    for i in range(copies):
        fn(i)
    if not cuda:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            for i in range(copies):
                fn(i)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6 / copies
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1e3 / copies


def error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def name(c: dict) -> str:
    return "{block_n}x{block_k} split {split_k} w{warps} s{stages}".format(**c)


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--check", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--iters", type=int, default=30, help="timed graph replays per product")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes compiling the grid first")
    parser.add_argument("--quick", action="store_true", help="4 warps and 4 stages only")
    parser.add_argument("--all", action="store_true", help="print every launch shape's time")
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args()
    began = time.time()
    device = torch.device("cpu" if args.check else "cuda")
    cuda = device.type == "cuda"
    if args.check:
        matrices, grid, rows, iters, sms, flush = CHECK_SHAPES, CHECK_GRID, [5, 16], 2, fp8_gemm.H100_SMS, 0
    else:
        props = torch.cuda.get_device_properties(device)
        matrices, rows, iters = shapes(), args.rows, args.iters
        grid = {**GRID, "warps": (4,), "stages": (4,)} if args.quick else GRID
        sms, flush = props.multi_processor_count, 3 * props.L2_cache_size
    print(torch.cuda.get_device_name() if cuda else "cpu (Triton's interpreter)", f"{sms} SMs", flush=True)

    todo = {(mat, m): launch_shapes(m, n, k, grid, sms, args.check) for mat, (n, k) in matrices.items() for m in rows}
    print(f"{sum(map(len, todo.values()))} weight-only launch shapes", flush=True)
    if cuda and args.jobs > 1:
        t = time.time()
        precompile([(m, *matrices[mat], c) for (mat, m), cs in todo.items() for c in cs], args.jobs)
        print(f"compiled in {time.time() - t:.0f} s", flush=True)

    results, best = [], {}
    for mat, (n, k) in matrices.items():
        torch.manual_seed(0)
        # copies of the weights, together past L2, so that each product reads its weights from memory
        c8, c16 = (max(2, math.ceil(flush / (b * n * k))) if cuda else 1 for b in (1, 2))
        wb = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(c16)]
        q = [fp8.quantize_weight(torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02) for _ in range(c8)]
        deq = fp8.dequantize_weight(*q[0], torch.float32)
        operands = {"fp8": (q, c8, 1), "bf16": ([(w,) for w in wb], c16, 2)}  # weights, copies, bytes per weight
        for m in rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            refs = {"fp8": x.float() @ deq.T, "bf16": x.float() @ wb[0].float().T}

            def record(product, us, nbytes, err, config=None):
                row = dict(matrix=mat, rows=m, n=n, k=k, product=product, config=config, us=us,
                           tbs=nbytes / us / 1e6, error=err)
                results.append(row)
                return row

            lines = [record("bf16", median_us(lambda i: x @ wb[i].T, c16, iters, cuda), 2 * n * k, None),
                     record("scaled", median_us(lambda i: fp8.scaled_mm(x, *q[i]), c8, iters, cuda), n * k,
                            error(fp8.scaled_mm(x, *q[0]), refs["fp8"]))]
            default = fp8_gemm.weight_only_config(m, n, k, sms)
            default = {key: default[key] for key in ("block_n", "block_k", "split_k", "warps", "stages")}
            for label, (fn, kind), fast in (("weight-only default", TRITON_PRODUCTS["weight-only"], True),
                                            ("weight-only default, Triton's conversion", TRITON_PRODUCTS["weight-only"],
                                             False),
                                            ("scaled-triton default", TRITON_PRODUCTS["scaled-triton"], True),
                                            ("bf16-triton default", TRITON_PRODUCTS["bf16-triton"], True)):
                fp8_gemm.FAST_CONVERT = fast
                ws, copies, size = operands[kind]
                lines.append(record(label, median_us(lambda i: fn(x, *ws[i]), copies, iters, cuda), size * n * k,
                                    error(fn(x, *ws[0]), refs[kind]), default))
            fp8_gemm.FAST_CONVERT = True
            swept = []
            for c in todo[mat, m]:
                for product, (fn, kind) in TRITON_PRODUCTS.items():
                    ws, copies, size = operands[kind]
                    try:
                        err = error(fn(x, *ws[0], **c), refs[kind])
                    except Exception as e:  # out of shared memory or registers
                        print(f"  {mat} M={m} {product} {name(c)}: {type(e).__name__}", flush=True)
                        continue
                    if err > MAX_ERRORS[product]:
                        print(f"  {mat} M={m} {product} {name(c)}: WRONG, error {err:.2e}", flush=True)
                        continue
                    us = median_us(lambda i: fn(x, *ws[i], **c), copies, iters, cuda)
                    swept.append(record(product, us, size * n * k, err, c))
            swept.sort(key=lambda r: r["us"])
            for product in TRITON_PRODUCTS:
                mine = [r for r in swept if r["product"] == product]
                if mine:
                    best[mat, m, product] = mine[0]
            print(f"{mat} ({n}x{k}) M={m}", flush=True)
            for r in lines + (swept if args.all else swept[:SHOWN]):
                config = f" [{name(r['config'])}]" if r["config"] else ""
                err = f"  error {r['error']:.1e}" if r["error"] is not None else ""
                print(f"  {r['product']:<40} {r['us']:8.2f} us {r['tbs']:5.2f} TB/s{config}{err}", flush=True)
        wb = q = deq = None  # freed before the next matrix's copies

    print("best launch shape per matrix, row count and Triton product:")
    for (mat, m, product), r in best.items():
        print(f"  {mat:<5} M={m:<3} {product:<13} {name(r['config'])}  {r['us']:.2f} us {r['tbs']:.2f} TB/s")
    layer = {}
    for m in rows:  # one decoder layer's four products
        total = {p: sum(r["us"] for r in results if r["rows"] == m and r["product"] == p)
                 for p in ("bf16", "scaled", "weight-only default", "weight-only default, Triton's conversion",
                           "scaled-triton default", "bf16-triton default")}
        for product in TRITON_PRODUCTS:
            total[f"{product} best"] = sum(r["us"] for (_, mm, p), r in best.items() if mm == m and p == product)
        layer[m] = total
        print(f"layer M={m}: " + ", ".join(f"{p} {us:.1f} us ({total['bf16'] / us:.2f}x bf16)"
                                             for p, us in total.items() if us), flush=True)
    print(f"sweep took {time.time() - began:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", sms=sms, results=results,
                           best=list(best.values()), layer=layer), f,
                      indent=1)


if __name__ == "__main__":
    main()
