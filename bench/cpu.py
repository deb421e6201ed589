"""CPU benchmark: batched greedy generation on a small random checkpoint, this engine against transformers'
generate, side by side in one process on the same weights and prompts.

    PYTHONPATH=src python bench/cpu.py [--batch 8] [--new-tokens 32] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, reference_from, run_engine, run_reference, synthetic_prompts  # noqa: E402

from idefics.config import IdeficsConfig, PerceiverConfig, VisionConfig  # noqa: E402
from idefics.engine import Engine  # noqa: E402


def small_config() -> IdeficsConfig:
    """The 9b layout scaled down: perceiver, qk norms, a cross block every 4th layer."""
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, cross_layer_interval=4, qk_layer_norms=True, use_resampler=True,
        vision=VisionConfig(embed_dim=256, image_size=112, patch_size=14, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024),
        perceiver=PerceiverConfig(n_latents=64, depth=2, n_heads=4, head_dim=64, qk_layer_norms=True),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = small_config()
    model = random_model(config, "cpu", torch.float32)
    ref = reference_from(model)
    prompts = synthetic_prompts(config, args.batch)
    engine = Engine(model)
    runs = {"ours": lambda: run_engine(engine, prompts, args.new_tokens),
            "transformers": lambda: run_reference(ref, prompts, args.new_tokens)}
    times, tokens = {}, {}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, run in runs.items():
            out, _, total = run()
            tokens[name] = out
            times[name] = min(times.get(name, float("inf")), total)
    same = tokens["ours"] == tokens["transformers"]
    n = args.batch * args.new_tokens
    print(f"CPU, {args.threads} threads, float32, batch {args.batch}, 1 image + 20 text tokens each, "
          f"{args.new_tokens} new tokens (greedy), best of {args.repeats}")
    print("| | seconds | tokens/s |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.2f} | {n / t:.0f} |")
    print(f"speed-up: {times['transformers'] / times['ours']:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
