"""Tensor parallelism (tensor_parallel=N) on one host with N GPUs, random weights built on the GPUs (no checkpoint):

    PYTHONPATH=src python bench/tp.py [--ranks 2] [--new-tokens 64] [--batches-80b 1 16] [--skip 9b 80b]
    PYTHONPATH=src python bench/tp.py --small    # the same steps on a small config, 2 ranks on the CPU (gloo)

1. idefics-9b shape in bfloat16: batch-1 decode tokens/s on one GPU, then split over N GPUs (goal at N = 2:
   >= 1.6x one GPU).
2. idefics-80b shape in bfloat16 split over N GPUs (160 GB: it fits no single GPU), each rank building only its
   shard: decode at each batch against the N-GPU roofline, its weight bytes per GPU per step (the decoder of one
   rank, replicated lm_head included, without the embedding table and the cross-attention key/value projections)
   plus its share of the KV cache, over one GPU's copy bandwidth (goal: >= 70%).

The decode step is the engine's default: CUDA graphs and the fused kernels, the all-reduces inside the graphs.
Prints a JSON summary at the end and writes it to $OUT/tp.json when OUT is set."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_engine, random_model, synthetic_prompts  # noqa: E402
from fp8 import GB, bandwidth, decode_run, free, kv_bytes, small_config, sync, with_roofline  # noqa: E402
from gpu import decode_bytes  # noqa: E402

from idefics.config import idefics_9b, idefics_80b  # noqa: E402
from idefics.engine import Engine  # noqa: E402
from idefics.ranks import Team  # noqa: E402


def split_engine(config, device: torch.device, dtype, ranks: int) -> tuple[Team, Engine]:
    """Rank 0's engine over a random shard, the other ranks in their worker processes (as load() starts them)."""
    team = Team(ranks, device, random_engine, (config, dtype))
    try:
        model = random_model(config, device, dtype, rank=0, ranks=ranks)
        team.join()
    except BaseException:
        team.close()
        raise
    return team, team.leader(model)


def nine_b(args, device: torch.device, dtype, results: dict):
    config = small_config() if args.small else idefics_9b()
    prompts = synthetic_prompts(config, 1)
    model = random_model(config, device, dtype)
    one = decode_run(Engine(model), prompts, args.new_tokens)
    print(f"9b one device: {one}", flush=True)
    del model
    free(device)
    team, engine = split_engine(config, device, dtype, args.ranks)
    try:
        split = decode_run(engine, prompts, args.new_tokens)
    finally:
        team.close()
    print(f"9b tensor_parallel={args.ranks}: {split}", flush=True)
    results["9b"] = {"one": one, f"tp{args.ranks}": split, "speedup": split["decode_tok_s"] / one["decode_tok_s"]}
    del engine
    free(device)


def eighty_b(args, device: torch.device, dtype, bw: float, results: dict):
    config = small_config() if args.small else idefics_80b()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    team, engine = split_engine(config, device, dtype, args.ranks)
    try:
        sync(device)
        per_gpu = decode_bytes(engine.model)
        r = results["80b"] = {"ranks": args.ranks, "build_s": time.perf_counter() - start,
                              "weights_gb_per_gpu_per_step": per_gpu / GB}
        if device.type == "cuda":
            r["gpu0_weights_gb"] = torch.cuda.memory_allocated(device) / GB
        for b in args.batches_80b:
            run = decode_run(engine, synthetic_prompts(config, b, seed=b), args.new_tokens)
            kv = kv_bytes(config, b, args.new_tokens, torch.tensor([], dtype=dtype).element_size()) / args.ranks
            r[f"batch {b}"] = with_roofline(run, b, per_gpu, kv, bw)
            print(f"80b tensor_parallel={args.ranks} batch {b}: {r[f'batch {b}']}", flush=True)
    finally:
        team.close()
    if device.type == "cuda":
        r["gpu0_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--batches-80b", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip", nargs="*", default=[], choices=["9b", "80b"])
    parser.add_argument("--device")
    parser.add_argument("--small", action="store_true", help="a small config, ranks on the CPU: checks the steps")
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.small else "cuda"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    args.new_tokens = args.new_tokens or (8 if args.small else 64)
    if args.small:
        args.batches_80b = [1, 2]
    bw = bandwidth(device)
    results = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "gpus": torch.cuda.device_count(), "ranks": args.ranks,
               "new_tokens": args.new_tokens, "copy_bandwidth_gb_s": bw / GB}
    if "9b" not in args.skip:
        nine_b(args, device, dtype, results)
    if "80b" not in args.skip:
        eighty_b(args, device, dtype, bw, results)
    if "9b" in results:
        results["goal_9b_speedup_1.6x"] = results["9b"]["speedup"] >= 1.6
    if "80b" in results:
        results["goal_80b_roofline_70pct"] = all(results["80b"][f"batch {b}"]["roofline_pct"] >= 70
                                                 for b in args.batches_80b)
    print(json.dumps(results, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tp.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
