"""GPU benchmark: this engine against transformers' generate on idefics-9b-shaped random bfloat16 weights.

    PYTHONPATH=src python bench/gpu.py [--batches 1 8 32 64] [--new-tokens 128] [--compile]

Prints one table: decode tokens/s, time to first token, images encoded per second, peak GPU memory, each with its
ratio to transformers and (decode) to the bandwidth roofline: decoder weight bytes read per step over the card's
measured copy bandwidth. Both run in the same process on the same weights and prompts. Writes the numbers as
JSON to $OUT/bench.json when OUT is set."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (random_model, reference_from, reference_inputs, run_engine, run_reference,  # noqa: E402
                    synthetic_prompts, timed)

from idefics.config import idefics_9b  # noqa: E402
from idefics.engine import Engine  # noqa: E402
from idefics.inputs import causal_mask, image_features, image_token_mask, positions  # noqa: E402


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 10)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = sorted(timed(lambda: y.copy_(x))[0] for _ in range(10))
    return 2 * (1 << 30) / times[len(times) // 2]


def decode_bytes(model) -> int:
    """Weight bytes one decode step must read: the decoder without its embedding table (one row is read) and
    without the cross-attention key/value projections (computed once per sequence here)."""
    skip = ("embed.", "vision.", "perceiver.")
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if not n.startswith(skip) and ".cross.attn.wkv." not in n)


def images_per_second(encode, pixels, repeats: int = 5) -> float:
    for _ in range(2):
        encode(pixels)
    times = sorted(timed(lambda: encode(pixels))[0] for _ in range(repeats))
    return pixels.shape[0] / times[repeats // 2]


def measure_generate(run, prompts, new_tokens: int, repeats: int = 2) -> dict:
    """run(prompts, new_tokens) -> (tokens, seconds to first token, seconds in all). Time to first token and
    decode throughput over the tokens after the first, from the best of `repeats` runs after a warm-up."""
    run(prompts, 4)  # warm-up: kernels, graphs, compilation for this batch size
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    first, total = min((run(prompts, new_tokens)[1:] for _ in range(repeats)), key=lambda r: r[1])
    b = len(prompts)
    return {"ttft_ms": first * 1e3, "decode_tok_s": b * (new_tokens - 1) / (total - first), "total_s": total,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


@torch.inference_mode()
def teacher_forced_logits(model, ref, prompts, tokens: list[list[int]]):
    """Both models score the prompts followed by our generated tokens -> (ours, transformers sdpa, eager)."""
    batch = reference_inputs(prompts, "cuda")
    gen = torch.tensor(tokens, device="cuda")
    ids = torch.cat([batch["input_ids"], gen], 1)
    am = torch.ones_like(ids)
    iam = batch["image_attention_mask"]
    iam = torch.cat([iam, iam[:, -1:].expand(-1, gen.shape[1], -1)], 1)
    feats = image_features(model, batch["pixel_values"], iam)
    ours = model(ids, positions(am), causal_mask(am), model.image_kv(feats), image_token_mask(iam, model.config.image_seq_len))
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=batch["pixel_values"], image_attention_mask=iam)
    sdpa = ref(**inputs).logits
    ref.set_attn_implementation("eager")
    eager = ref(**inputs).logits
    ref.set_attn_implementation("sdpa")
    return ours.float(), sdpa.float(), eager.float()


@torch.inference_mode()
def engine_teacher_forced(engine, prompts, tokens: list[list[int]]) -> torch.Tensor:
    """The engine's own path (prefill, then decode steps: fused kernels and CUDA graphs where it uses them) fed
    the given tokens -> logits at the last prompt position and each fed token but the last, (B, T, V)."""
    n = len(tokens[0])
    engine.reserve(len(prompts), max(p.ids.shape[0] for p in prompts) + n + 1, 1)
    out = [engine.prefill_batch(prompts)]
    for j in range(n - 1):
        out.append(engine.decode(torch.tensor([t[j] for t in tokens])))
    engine.release(0, engine.active)
    return torch.stack(out, 1).float()


def min_cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--compile-vision", action="store_true", help="torch.compile the image encoder")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    config = idefics_9b()
    model = random_model(config, "cuda", torch.bfloat16)
    step_bytes = decode_bytes(model)
    roofline = bandwidth / step_bytes  # steps per second
    print(f"{card}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, decode reads {step_bytes / 1e9:.2f} GB/step, "
          f"roofline {roofline:.0f} steps/s", flush=True)

    prompts = {b: synthetic_prompts(config, b, seed=b) for b in args.batches}
    engine = Engine(model, compile=args.compile)
    ours = {}
    for b in args.batches:
        ours[b] = r = measure_generate(lambda p, k: run_engine(engine, p, k), prompts[b], args.new_tokens)
        print(f"ours  batch {b}: {r}", flush=True)
    pixels = torch.randn(64, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    encode = torch.compile(model.encode_images, dynamic=False) if args.compile_vision else model.encode_images
    with torch.inference_mode():
        ours_images = images_per_second(encode, pixels)
    print(f"ours images/s (batch 64): {ours_images:.0f}", flush=True)
    tokens = run_engine(engine, prompts[args.batches[0]], 16)[0]

    results = {"card": card, "bandwidth_tb_s": bandwidth / 1e12, "decode_gb_per_step": step_bytes / 1e9,
               "roofline_steps_s": roofline, "ours": ours, "ours_images_s": ours_images, "compile": args.compile,
               "compile_vision": args.compile_vision}
    if not args.skip_reference:
        ref = reference_from(model)
        got, sdpa, eager = teacher_forced_logits(model, ref, prompts[args.batches[0]], tokens)
        results["teacher_forced_min_cosine"] = min_cosine(got, sdpa)
        results["reference_sdpa_vs_eager_min_cosine"] = min_cosine(sdpa, eager)
        # The same positions through the engine's decode path; the prompts share one length.
        start = prompts[args.batches[0]][0].ids.shape[0] - 1
        decoded = engine_teacher_forced(engine, prompts[args.batches[0]], tokens)
        results["decode_path_min_cosine"] = min_cosine(decoded, sdpa[:, start : start + decoded.shape[1]])
        print(f"teacher-forced min cosine: ours vs transformers {results['teacher_forced_min_cosine']:.5f} "
              f"(through the decode path: {results['decode_path_min_cosine']:.5f}); "
              f"transformers sdpa vs eager {results['reference_sdpa_vs_eager_min_cosine']:.5f}", flush=True)
        del engine, model, got, sdpa, eager
        gc.collect()
        torch.cuda.empty_cache()
        theirs = {}
        for b in args.batches:
            theirs[b] = r = measure_generate(lambda p, k: run_reference(ref, p, k), prompts[b], args.new_tokens,
                                             repeats=1)
            print(f"transformers batch {b}: {r}", flush=True)

        def ref_encode(x):
            with torch.inference_mode():
                return ref.model.perceiver_resampler(ref.model.vision_model(pixel_values=x).last_hidden_state)

        results["reference"] = theirs
        results["reference_images_s"] = images_per_second(ref_encode, pixels)
    print_table(results)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench.json").write_text(json.dumps(results, indent=2))


def print_table(r: dict):
    ref = r.get("reference", {})
    flags = "".join(f" | {f.replace('_', ' ')}" for f in ("compile", "compile_vision") if r[f])
    print(f"\n{r['card']} | bf16 | idefics-9b shape | 1 image + 20 text tokens | {r.get('new_tokens', 128)} new tokens"
          f"{flags} | roofline {r['roofline_steps_s']:.0f} steps/s ({r['bandwidth_tb_s']:.2f} TB/s, "
          f"{r['decode_gb_per_step']:.2f} GB/step)")
    print("| batch | decode tok/s | vs transformers | % of roofline | TTFT ms | vs transformers | peak GiB "
          "| transformers tok/s | transformers TTFT ms | transformers peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b, o in r["ours"].items():
        t = ref.get(b)
        roof = 100 * o["decode_tok_s"] / int(b) / r["roofline_steps_s"]
        cells = [b, f"{o['decode_tok_s']:.0f}", f"{o['decode_tok_s'] / t['decode_tok_s']:.1f}x" if t else "-",
                 f"{roof:.0f}%", f"{o['ttft_ms']:.1f}", f"{t['ttft_ms'] / o['ttft_ms']:.1f}x" if t else "-",
                 f"{o['peak_gib']:.1f}"]
        cells += [f"{t['decode_tok_s']:.0f}", f"{t['ttft_ms']:.1f}", f"{t['peak_gib']:.1f}"] if t else ["-"] * 3
        print("| " + " | ".join(map(str, cells)) + " |")
    line = f"images/s (vision + perceiver, batch 64): ours {r['ours_images_s']:.0f}"
    if "reference_images_s" in r:
        line += f", transformers {r['reference_images_s']:.0f} ({r['ours_images_s'] / r['reference_images_s']:.2f}x)"
    print(line)
    if "teacher_forced_min_cosine" in r:
        print(f"teacher-forced logits, min cosine over positions: ours vs transformers "
              f"{r['teacher_forced_min_cosine']:.5f}, through the decode path {r.get('decode_path_min_cosine', 0):.5f} "
              f"(transformers sdpa vs its eager attention: "
              f"{r['reference_sdpa_vs_eager_min_cosine']:.5f})")


if __name__ == "__main__":
    main()
