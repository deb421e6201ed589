"""Continuous batching against static batches, on idefics-9b-shaped random bfloat16 weights (GPU).

    PYTHONPATH=src python bench/mixed.py [--requests 512] [--batch 64] [--groups 8 16] [--waits 16 24]

The workload: `--requests` requests, one image each, prompts of 20-200 text tokens and 10-200 new tokens (seeded
draws), each prompt with its image's key as the image workers give it, all submitted at once, greedy, no eos (each
runs to its length). Static: groups of `--batch` in arrival order, each group prefilled together and decoded until
its longest request ends before the next group starts (a fixed batch, as main ran them before the scheduler).
Continuous: the scheduler admits a waiting request whenever a slot frees (with a backlog, in prefill groups:
--groups runs it once per group size). Both run in the same process on the same engine and weights. Then the latency
of a late arrival: 63 requests decoding, one more added; its first token's delay is reported in decode steps of the
running batch. Each run also reports its steps that admitted requests (a prefill and a decode) apart from those
that only decoded.
Writes $OUT/mixed.json when OUT is set."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, sync, synthetic_prompts  # noqa: E402

from idefics import scheduler  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402
from idefics.encoder import ImageEncoder  # noqa: E402
from idefics.engine import Engine  # noqa: E402
from idefics.sampling import GenerationOptions  # noqa: E402
from idefics.scheduler import Request, Scheduler  # noqa: E402


def workload(config, n: int, seed: int = 0):
    """n (prompt, new tokens) pairs; each prompt carries its image's key, as the processor's image workers give it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        [p] = synthetic_prompts(config, 1, text_tokens=rng.randint(20, 200), seed=seed * 100_000 + i)
        p.keys = (ImageEncoder.key(p.pixels[0]),)
        out.append((p, rng.randint(10, 200)))
    return out


def requests(config, work):
    return [Request.make(p, GenerationOptions.make(max_new_tokens=k, eos_token_id=[], banned_token_ids=[]), None,
                         config.max_position_embeddings) for p, k in work]


def drive(scheduler: Scheduler, groups: list[list[Request]], steps: dict | None = None) -> tuple[int, float]:
    """Run the groups one after another (one group: continuous batching) -> (tokens generated, seconds). steps: filled
    with where the time went, steps that admitted (prefilled) requests apart from those that only decoded. A step
    returns once its tokens are on the host, so its time is the device's for its prefill and the decode before."""
    sync()
    start = time.perf_counter()
    admit, plain = [0, 0.0, 0, 0], [0, 0.0, 0]  # [steps, seconds, rows(, prompt tokens)]
    for group in groups:
        for r in group:
            scheduler.add(r)
        while scheduler.busy:
            t, waiting = time.perf_counter(), len(scheduler.waiting)
            rows = len(scheduler.step())
            kind = admit if waiting > len(scheduler.waiting) else plain
            kind[0], kind[1], kind[2] = kind[0] + 1, kind[1] + time.perf_counter() - t, kind[2] + rows
            if kind is admit:
                admit[3] += sum(r.prompt.ids.shape[0] for r in scheduler.running if len(r.generated) == 1)
    sync()
    if steps is not None:
        steps.update({"admitting_steps": admit[0], "admitting_s": admit[1],
                      "admitting_mean_rows": admit[2] / max(1, admit[0]), "prompt_tokens_admitted": admit[3],
                      "decode_only_steps": plain[0], "decode_only_s": plain[1],
                      "decode_only_mean_rows": plain[2] / max(1, plain[0])})
    return sum(len(r.generated) for g in groups for r in g), time.perf_counter() - start


def late_arrival(engine: Engine, config, batch: int) -> dict:
    """batch - 1 requests decode; one more is added -> its prefill time and its first token's delay in steps."""
    scheduler = Scheduler(engine, None, max_batch=batch)
    long = min(400, config.max_position_embeddings - 210)  # they outlast the measurement
    running = requests(config, [(p, long) for p, _ in workload(config, batch - 1, seed=7)])
    for r in running:
        scheduler.add(r)
    for _ in range(20):  # the batch is decoding
        scheduler.step()
    step_times = []
    for _ in range(10):
        sync()
        t = time.perf_counter()
        scheduler.step()
        sync()
        step_times.append(time.perf_counter() - t)
    [late] = requests(config, workload(config, 1, seed=8))
    late.options.max_new_tokens = late.budget = 40
    sync()
    t = time.perf_counter()
    scheduler.add(late)
    steps = 0
    while not late.generated:
        scheduler.step()
        steps += 1
    sync()
    delay = time.perf_counter() - t
    # Its prefill alone, measured on an idle engine of the same size.
    for r in running:
        scheduler.abort(r.id)
    scheduler.step()
    while scheduler.busy:
        scheduler.step()
    [alone] = requests(config, workload(config, 1, seed=8))
    alone.options.max_new_tokens = alone.budget = 1
    engine.encoder.cache.clear()
    sync()
    t = time.perf_counter()
    scheduler.add(alone)
    while scheduler.busy:
        scheduler.step()
    sync()
    prefill = time.perf_counter() - t
    step = sorted(step_times)[len(step_times) // 2]
    return {"first_token_s": delay, "steps_until_first_token": steps, "decode_step_s": step, "prefill_alone_s": prefill,
            "delay_in_steps_beyond_prefill": (delay - prefill) / step}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    defaults = scheduler.ADMIT_GROUP, scheduler.ADMIT_SHARE, scheduler.ADMIT_WAIT
    ap.add_argument("--groups", type=int, nargs="+", default=[min(defaults[0], 64 // defaults[1])],
                    help="continuous runs with these prefill group sizes under a backlog (scheduler.ADMIT_GROUP)")
    ap.add_argument("--waits", type=int, nargs="+", default=[defaults[2]],
                    help="and with these waits for a group, in steps (scheduler.ADMIT_WAIT); the first reported")
    args = ap.parse_args()
    config = idefics_9b()
    model = random_model(config, "cuda", torch.bfloat16)
    engine = Engine(model)
    work = workload(config, args.requests)
    # Warm-up: buffers sized for the longest request, graphs captured, kernels compiled.
    drive(Scheduler(engine, None, max_batch=args.batch), [requests(config, [(p, 4) for p, _ in work[: args.batch]])])
    engine.encoder.cache.clear()
    reqs = requests(config, work)
    static_steps, steps = {}, {}
    static_tokens, static_s = drive(Scheduler(engine, None, max_batch=args.batch),
                                    [reqs[i : i + args.batch] for i in range(0, len(reqs), args.batch)], static_steps)
    print(f"static: {static_s:.2f} s", json.dumps(static_steps), flush=True)
    by_run = {}
    for g, w in itertools.product(args.groups, args.waits):
        scheduler.ADMIT_GROUP, scheduler.ADMIT_SHARE, scheduler.ADMIT_WAIT = g, max(1, args.batch // g), w
        engine.encoder.cache.clear()
        reqs = requests(config, work)
        steps[g, w] = {}
        by_run[g, w] = drive(Scheduler(engine, None, max_batch=args.batch), [reqs], steps[g, w])
        assert by_run[g, w][0] == static_tokens
        print(f"continuous, prefill groups of {g}, waiting up to {w} steps: {by_run[g, w][1]:.2f} s, "
              f"{static_s / by_run[g, w][1]:.3f}x static", json.dumps(steps[g, w]), flush=True)
    scheduler.ADMIT_GROUP, scheduler.ADMIT_SHARE, scheduler.ADMIT_WAIT = defaults
    first = args.groups[0], args.waits[0]
    cont_tokens, cont_s = by_run[first]
    result = {
        "card": torch.cuda.get_device_name(), "requests": args.requests, "batch": args.batch, "tokens": cont_tokens,
        "static_s": static_s, "static_tok_s": static_tokens / static_s,
        "continuous_s": cont_s, "continuous_tok_s": cont_tokens / cont_s, "ratio": static_s / cont_s,
        "prefill_group": first[0], "admit_wait": first[1],
        "static_steps": static_steps, "continuous_steps": steps[first],
        "late_arrival": late_arrival(engine, config, args.batch),
    }
    if len(by_run) > 1:
        result["continuous_s_by_run"] = {f"groups of {g}, wait {w}": t for (g, w), (_, t) in by_run.items()}
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "mixed.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
