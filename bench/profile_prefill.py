"""Where a prefill's time goes: groups of prompts (one image, --tokens text tokens each) prefilled into free slots of
an engine reserved for 64, as the scheduler admits them (one prompt: the captured prefill; more: eager). For each
group size: the wall time of the whole prefill (its images encoded too), the host's time to launch it, the GPU's
kernel time, and that time by kernel under the profiler. idefics-9b shape, random bfloat16 weights.

    PYTHONPATH=src python bench/profile_prefill.py [--groups 1 8 64] [--tokens 110] [--rows 25]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, sync, synthetic_prompts  # noqa: E402

from idefics.config import idefics_9b  # noqa: E402
from idefics.encoder import ImageEncoder  # noqa: E402
from idefics.engine import Engine  # noqa: E402

ACTIVITY = torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU


def kernel_time(prof) -> float:
    """Milliseconds of GPU kernel time in a profile."""
    total = 0.0
    for e in prof.key_averages():
        total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total / 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--tokens", type=int, default=110, help="text tokens per prompt")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed per group size")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = idefics_9b()
    engine = Engine(random_model(config, "cuda", torch.bfloat16))
    engine.reserve(64, 512, 1)
    engine.warmup()
    for b in args.groups:
        prompts = synthetic_prompts(config, b, text_tokens=args.tokens, seed=b)
        for p in prompts:  # as the image workers give them: keyed, so the engine's thread hashes nothing
            p.keys = (ImageEncoder.key(p.pixels[0]),)
        tokens = b * prompts[0].ids.shape[0]
        engine.encoder.cache.clear()
        sync()
        t0 = time.perf_counter()
        engine.encoder.of_prompts(prompts)
        sync()
        encode = time.perf_counter() - t0

        def once():
            engine.encoder.cache.clear()  # every group's images are new, as in a running job
            sync()
            t0 = time.perf_counter()
            engine.prefill_batch(prompts)
            host = time.perf_counter() - t0
            sync()
            wall = time.perf_counter() - t0
            engine.release_all()
            return wall, host

        once()
        runs = sorted(once() for _ in range(args.repeats))
        wall, host = runs[len(runs) // 2]
        engine.encoder.cache.clear()
        with torch.profiler.profile(activities=[ACTIVITY]) as prof:
            engine.prefill_batch(prompts)
            sync()
        engine.release_all()
        print(f"group of {b} ({tokens} tokens): wall {1e3 * wall:.1f} ms ({1e6 * wall / tokens:.1f} us/token), host "
              f"{1e3 * host:.1f} ms, kernels {kernel_time(prof):.1f} ms; its images alone {1e3 * encode:.1f} ms",
              flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60),
              flush=True)


if __name__ == "__main__":
    main()
