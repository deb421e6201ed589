"""The decode step's attention kernels, alone and inside whole decode steps, against a baseline: idefics-9b shape
(32 heads of 128), bfloat16, each kernel called for 8 layers of their own buffers in one CUDA graph (no cache of the
card holds them all), replayed and timed per call.

    PYTHONPATH=src python bench/attention.py [--baseline old_kernels.py] [--batches 1 32 64] [--lengths 32 128 512]
    PYTHONPATH=src python bench/attention.py --sweep [--batches 32 64] [--lengths 32 96]

--baseline: another version of src/idefics/kernels.py (`git show <commit>:src/idefics/kernels.py > old.py`), whose
rope_attention is timed beside this one's, and whose absence of cross_attention means PyTorch's attention with the
additive mask (what the fused step ran before); the whole decode steps (random weights, one image and about 20 text
tokens per prompt, captured) then run once with each set of kernels, in this process. --sweep: rope_attention at
each launch that keeps its registers (cached positions per block 16 to 128, warps 1 to 16, at most 16 positions a
warp; kernels.ATTENTION_LAUNCH), batch and context."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import decoding, random_model, step_seconds, timed  # noqa: E402

from idefics import fused, kernels  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402
from idefics.engine import Engine  # noqa: E402

HEADS, HEAD_DIM, LAYERS, IMAGE_TOKENS = 32, 128, 8, 64


def sdpa_cross_attention(q, k, v, visible):
    """The fused step's cross attention before kernels.cross_attention."""
    m, h, _, d = k.shape
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill(~visible, torch.finfo(q.dtype).min)[:, None, None]
    return F.scaled_dot_product_attention(q.view(m, h, 1, d), k, v, attn_mask=mask).reshape(m, h * d)


def per_call_us(calls) -> float:
    """calls: one closure per layer; their launches captured in one graph, replayed."""
    for call in calls:
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    seconds = min(timed(lambda: [graph.replay() for _ in range(20)])[0] for _ in range(3))
    return 1e6 * seconds / 20 / len(calls)


def self_attention_calls(fn, batch: int, length: int):
    dev, dt = "cuda", torch.bfloat16
    qkv = torch.randn(batch, 3 * HEADS * HEAD_DIM, device=dev, dtype=dt)
    angles = torch.randn(length + 1, HEAD_DIM, device=dev)
    cos, sin = angles.cos().to(dt), angles.sin().to(dt)
    pos = torch.full((batch,), length, device=dev)
    caches = [(torch.randn(batch, HEADS, length + 1, HEAD_DIM, device=dev, dtype=dt),
               torch.randn(batch, HEADS, length + 1, HEAD_DIM, device=dev, dtype=dt)) for _ in range(LAYERS)]
    return [lambda k=k, v=v: fn(qkv, cos, sin, pos, k, v, HEADS) for k, v in caches]


def cross_attention_calls(fn, batch: int):
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(batch, HEADS * HEAD_DIM, device=dev, dtype=dt)
    kv = [(torch.randn(batch, HEADS, IMAGE_TOKENS, HEAD_DIM, device=dev, dtype=dt),
           torch.randn(batch, HEADS, IMAGE_TOKENS, HEAD_DIM, device=dev, dtype=dt)) for _ in range(LAYERS)]
    visible = torch.ones(batch, IMAGE_TOKENS, dtype=torch.bool, device=dev)
    return [lambda k=k, v=v: fn(q, k, v, visible) for k, v in kv]


@torch.inference_mode()
def decode_step_ms(model, batch: int) -> float:
    engine = Engine(model)
    seconds = step_seconds(engine, decoding(engine, batch), repeats=3)
    engine.release(0, engine.active)
    return 1e3 * seconds


def sweep(batches: list[int], lengths: list[int]):
    print(f"{torch.cuda.get_device_name()}; rope_attention, us per call at (positions per block, warps)")
    default = dict(kernels.ATTENTION_LAUNCH)
    with torch.inference_mode():
        for b in batches:
            for length in lengths:
                row = []
                # more than 16 positions a warp, or 256 a block, spill registers (bench/registers.py)
                for launch in itertools.product((16, 32, 64, 128), (1, 2, 4, 8, 16)):
                    if launch[0] > 16 * launch[1]:
                        continue
                    kernels.ATTENTION_LAUNCH = {"few": launch, "many": launch}
                    row.append(f"{launch[0]}/{launch[1]}: "
                               f"{per_call_us(self_attention_calls(kernels.rope_attention, b, length)):.1f}")
                print(f"batch {b} context {length}: " + ", ".join(row), flush=True)
    kernels.ATTENTION_LAUNCH = default


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="another version of src/idefics/kernels.py")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--sweep", action="store_true", help="rope_attention at each launch shape")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args.batches, args.lengths)
    ours = {"self": kernels.rope_attention, "cross": kernels.cross_attention}
    sets = {"this": ours}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_kernels", args.baseline)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        sets["baseline"] = {"self": old.rope_attention,
                            "cross": getattr(old, "cross_attention", sdpa_cross_attention)}
    else:
        sets["PyTorch"] = {"cross": sdpa_cross_attention}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per call (per layer)")
    print("| kernel | batch | context | " + " | ".join(sets) + " |")
    print("|---|---|---|" + "---|" * len(sets))
    with torch.inference_mode():
        for b in args.batches:
            for length in args.lengths:
                row = [f"{per_call_us(self_attention_calls(s['self'], b, length)):.1f}" if "self" in s else "-"
                       for s in sets.values()]
                print(f"| self-attention | {b} | {length} | " + " | ".join(row) + " |", flush=True)
            row = [f"{per_call_us(cross_attention_calls(s['cross'], b)):.1f}" for s in sets.values()]
            print(f"| cross-attention | {b} | {IMAGE_TOKENS} | " + " | ".join(row) + " |", flush=True)
    if args.baseline:
        model = random_model(idefics_9b(), "cuda", torch.bfloat16)
        print("| decode step, captured | batch | | " + " | ".join(sets) + " |")
        for b in args.batches:
            row = []
            for s in sets.values():
                fused.kernels.rope_attention, fused.kernels.cross_attention = s["self"], s["cross"]
                row.append(f"{decode_step_ms(model, b):.3f} ms")
            fused.kernels.rope_attention, fused.kernels.cross_attention = ours["self"], ours["cross"]
            print(f"| decode step | {b} | | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
