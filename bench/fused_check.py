"""The fused decode kernels on the GPU, idefics-9b shapes, bfloat16: each against its eager composition (how many
outputs differ, by how many bfloat16 steps), and whole decode steps, fused against plain, both as CUDA graphs
(time per step; logits over teacher-forced steps: identical share, cosine).

    PYTHONPATH=src python bench/fused_check.py [--vision]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, run_engine, synthetic_prompts, timed  # noqa: E402

from idefics import gemv, kernels  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402
from idefics.engine import Engine  # noqa: E402


def ulps(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """-> (share of elements that differ, largest difference in bfloat16 steps)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    same_sign = (ia >= 0) == (ib >= 0)
    d = torch.where(same_sign, (ia - ib).abs(), torch.full_like(ia, 1 << 15))
    return (a != b).float().mean().item(), int(d.max())


def check_kernels():
    """Each kernel against eager PyTorch on the GPU, idefics-9b widths, bfloat16."""
    from idefics.layers import RMSNorm, apply_rope, rope_cos_sin

    dev, dt = "cuda", torch.bfloat16
    c = idefics_9b()
    d, f, h, hd = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim
    rows = 8
    x, r = (torch.randn(rows, d, device=dev, dtype=dt) for _ in range(2))
    norm = RMSNorm(d, 1e-6).to(dev, dt)
    norm.weight.data.uniform_(0.5, 1.5)
    keep = torch.arange(rows, device=dev) % 3 != 0
    for name, gate in (("plain", None), ("scalar gate", torch.tanh(torch.tensor([0.7], device=dev, dtype=dt))),
                       ("vector gate", torch.tanh(torch.randn(d, device=dev, dtype=dt)))):
        x2, y = kernels.add_rms_norm(x, r, norm.weight, 1e-6, gate=gate, keep=keep if gate is not None else None)
        ex = x + (gate * r.masked_fill(~keep[:, None], 0.0) if gate is not None else r)
        print(f"add_rms_norm ({name}): sum {ulps(x2, ex)}, norm {ulps(y, norm(ex))}  (share differing, max steps)")
    gu = torch.randn(rows, 2 * f, device=dev, dtype=dt) * 3
    g, u = gu.chunk(2, dim=-1)
    print(f"silu_mul: {ulps(kernels.silu_mul(gu), F.silu(g) * u)}")
    max_len = 256
    qkv = torch.randn(4, 3 * h * hd, device=dev, dtype=dt)
    pos = torch.tensor([0, 17, 100, 255], device=dev)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    cos, sin = rope_cos_sin(torch.arange(max_len, device=dev)[None], inv, dt)
    kc, vc = (torch.randn(4, h, max_len, hd, device=dev, dtype=dt) for _ in range(2))
    out = kernels.rope_attention(qkv, cos[0, :, 0], sin[0, :, 0], pos, kc, vc, h)
    qk = apply_rope(qkv.view(4, 1, 3 * h, hd)[:, :, : 2 * h], *rope_cos_sin(pos[:, None], inv, dt))
    k = torch.stack([kc[i, :, pos[i]] for i in range(4)])
    hidden = torch.arange(max_len, device=dev)[None] > pos[:, None]
    ref = F.scaled_dot_product_attention(qk[:, :, :h].transpose(1, 2), kc, vc, attn_mask=~hidden[:, None, None])
    ref = ref.transpose(1, 2).reshape(4, -1)
    print(f"rope_attention: k written {ulps(k, qk[:, 0, h:])}, output against SDPA {ulps(out, ref)}, "
          f"cosine {F.cosine_similarity(out.float(), ref.float(), dim=-1).min().item():.6f}")
    for name, fn in (("add_rms_norm", lambda: kernels.add_rms_norm(x[:1], r[:1], norm.weight, 1e-6)),
                     ("eager add + rms_norm", lambda: norm(x[:1] + r[:1])),
                     ("silu_mul", lambda: kernels.silu_mul(gu[:1])), ("eager silu * up", lambda: F.silu(g[:1]) * u[:1])):
        print(f"{name} (1 row): {do_bench(fn) * 1e3:.1f} us")


@torch.inference_mode()
def check_steps(batches):
    model = random_model(idefics_9b(), "cuda", torch.bfloat16)
    for b in batches:
        prompts = synthetic_prompts(model.config, b)
        results = {}
        # plain, then fused with kernels launched one after another, then with programmatic dependent launch
        for name, fused, pdl, prefetch in (("plain", False, False, 0), ("fused", True, False, 0),
                                           ("fused+pdl", True, True, 0), ("fused+pdl+prefetch", True, True, 1)):
            kernels.PDL, gemv.PREFETCH = pdl, prefetch
            engine = Engine(model, fused=fused)
            engine.reserve(b, 160, 1)
            first = engine.prefill_batch(prompts)
            tokens = first.argmax(-1)
            logits = []
            forced = results["plain"][1] if "plain" in results else None
            for i in range(32):
                out = engine.decode(tokens)
                logits.append(out.float())
                tokens = forced[i].argmax(-1) if forced is not None else out.argmax(-1)
            steps = 50
            t, _ = timed(lambda: [engine.decode(tokens) for _ in range(steps)])
            key = max((k for k in engine.graphs.graphs if k[0] == "decode"), key=lambda k: k[2])
            graph = engine.graphs.graphs[key][0]
            t_graph = min(timed(lambda: [graph.replay() for _ in range(steps)])[0] for _ in range(3))
            engine.release(0, engine.active)
            _, first, total = run_engine(engine, prompts, 128)
            print(f"batch {b} {name}: graph replay {1e3 * t_graph / steps:.2f} ms/step, decode() "
                  f"{1e3 * t / steps:.2f} ms/step, generate {127 * b / (total - first):.0f} tok/s", flush=True)
            results[name] = (1e3 * t / steps, logits)
        base = results["plain"]
        for name in list(results)[1:]:
            got = results[name]
            cos = min(F.cosine_similarity(a, p, dim=-1).min().item() for a, p in zip(got[1], base[1]))
            same = sum(torch.equal(a, p) for a, p in zip(got[1], base[1]))
            agree = sum((a.argmax(-1) == p.argmax(-1)).float().mean().item() for a, p in zip(got[1], base[1])) / 32
            print(f"batch {b}: plain {base[0]:.2f} ms/step, {name} {got[0]:.2f} ms/step ({base[0] / got[0]:.2f}x); "
                  f"logits identical in {same}/32 steps, min cosine {cos:.5f}, top-1 agrees {100 * agree:.1f}%",
                  flush=True)
        kernels.PDL, gemv.PREFETCH = True, 1


def check_vision():
    """The image encoder's non-matrix kernels at batch 64: LayerNorm, attention backends (head dim 80), GELU."""
    x = torch.randn(64, 257, 1280, device="cuda", dtype=torch.bfloat16)
    ln = torch.nn.LayerNorm(1280, eps=1e-5).to("cuda", torch.bfloat16)
    print(f"layer_norm (64, 257, 1280): {do_bench(lambda: ln(x)) * 1e3:.1f} us")
    q, k, v = (torch.randn(64, 16, 257, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ref = F.scaled_dot_product_attention(q, k, v)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v)
                t = do_bench(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3
            print(f"sdpa {backend.name}: {t:.1f} us, max diff to default {(out - ref).abs().max().item():.4f}")
        except RuntimeError as e:
            print(f"sdpa {backend.name}: {str(e).splitlines()[0]}")
    t = do_bench(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3
    print(f"sdpa default: {t:.1f} us")
    h = torch.randn(64 * 257, 5120, device="cuda", dtype=torch.bfloat16)
    print(f"gelu (16448, 5120): {do_bench(lambda: F.gelu(h)) * 1e3:.1f} us")
    # the whole encoder at batch 64: kernel time by kernel, then images/s eager and compiled
    from gpu import images_per_second

    model = random_model(idefics_9b(), "cuda", torch.bfloat16)
    pixels = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model.encode_images(pixels)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
            model.encode_images(pixels)
            torch.cuda.synchronize()
        print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
        print(f"encode_images eager: {images_per_second(model.encode_images, pixels):.0f} images/s", flush=True)
        compiled = torch.compile(model.encode_images, dynamic=False)
        t0 = time.perf_counter()
        compiled(pixels)
        torch.cuda.synchronize()
        print(f"torch.compile: {time.perf_counter() - t0:.0f} s to compile, "
              f"{images_per_second(compiled, pixels):.0f} images/s", flush=True)


@torch.inference_mode()
def decode_parity(batches: list[int]):
    """Teacher-forced logits of each decode path against the model's own full forward pass (which matches
    transformers, bench/gpu.py), per position."""
    from gpu import engine_teacher_forced

    from common import reference_inputs
    from idefics.inputs import causal_mask, image_features, image_token_mask, positions

    model = random_model(idefics_9b(), "cuda", torch.bfloat16)
    for batch in batches:
        prompts = synthetic_prompts(model.config, batch)
        tokens = run_engine(Engine(model, graphs=False, fused=False), prompts, 16)[0]
        b = reference_inputs(prompts, "cuda")
        ids = torch.cat([b["input_ids"], torch.tensor(tokens, device="cuda")], 1)
        am = torch.ones_like(ids)
        iam = torch.cat([b["image_attention_mask"], b["image_attention_mask"][:, -1:].expand(-1, 16, -1)], 1)
        feats = image_features(model, b["pixel_values"], iam)
        full = model(ids, positions(am), causal_mask(am), model.image_kv(feats),
                     image_token_mask(iam, model.config.image_seq_len))
        start = prompts[0].ids.shape[0] - 1
        full = full[:, start : start + 16].float()
        for graphs in (False, True):
            for fused in (False, True):
                got = engine_teacher_forced(Engine(model, graphs=graphs, fused=fused), prompts, tokens)
                cos = F.cosine_similarity(got, full, dim=-1).min(dim=0).values
                print(f"batch {batch} graphs={graphs} fused={fused}: cosine per position "
                      + " ".join(f"{c:.4f}" for c in cos.tolist()), flush=True)


@torch.inference_mode()
def profile_first_token(batch: int):
    """Where the host's time goes until the first token of `batch` prompts (each with its own image)."""
    import cProfile
    import pstats

    model = random_model(idefics_9b(), "cuda", torch.bfloat16)
    engine = Engine(model)
    prompts = synthetic_prompts(model.config, batch)
    run_engine(engine, prompts, 2)
    _, first, _ = run_engine(engine, prompts, 2)
    print(f"batch {batch}: first token after {1e3 * first:.1f} ms")
    prof = cProfile.Profile()
    prof.runcall(run_engine, engine, prompts, 1)
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tp:
        run_engine(engine, prompts, 1)
    print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--first-token", type=int, help="only profile the time to the first token at this batch")
    parser.add_argument("--decode-parity", type=int, nargs="+", help="only compare the decode paths at these batches")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--vision", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    if args.first_token:
        return profile_first_token(args.first_token)
    if args.decode_parity:
        return decode_parity(args.decode_parity)
    check_kernels()
    if args.vision:
        check_vision()
    check_steps(args.batches)


if __name__ == "__main__":
    main()
