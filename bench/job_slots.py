"""The captioning job through `idefics batch` with its default rows (its window's lines, where they fit) and several
row limits of the running batch (its --max-batch), side by side in one process: each timed --rounds times in
alternating order after a warm-up, with the API's calls of 64 as the control; also how often each one's captions
equal the API's.

    PYTHONPATH=src python bench/job_slots.py --out slots.json [--max-batch 64 128 256] [--rounds 4]
    PYTHONPATH=src python bench/job_slots.py --small        # the CPU, a tiny model (checks the script)

Single runs of job.py's --slots moved with their order (each setting timed once, the later ones faster); this
alternates them."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from job import alternate, ours, run_api, run_batch, tiny_config, warm_up, write_photos  # noqa: E402

from idefics.config import idefics_9b  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-batch", type=int, nargs="+", help="row limits (default 64 128 256; 8 16 with --small)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    limits = args.max_batch or ([8, 16] if args.small else [64, 128, 256])
    n, batch = (32, 8) if args.small else (256, 64)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_photos(root, n)
        m = ours(tiny_config(), "cpu", torch.float32, 2) if args.small else \
            ours(idefics_9b(), "cuda", torch.bfloat16, 16)
        limits = [None] + sorted(limits, reverse=True)  # None: idefics batch's default; the largest first (the
        for limit in limits:                                # buffers only grow)
            m.scheduler.max_batch = limit
            warm_up(m, files, batch, root)
        m.scheduler.max_batch = batch
        api = run_api(m, files, batch)
        out: dict = {"equal_api": {}}
        for limit in limits:
            m.scheduler.max_batch = limit
            out["equal_api"][limit or "default"] = sum(a == b for a, b in zip(run_batch(m, files, root), api)) / n

        def setup(rows: int, job):
            m.scheduler.max_batch = rows
            return job

        variants = {f"batch_{limit or 'default'}": lambda limit=limit: setup(limit, lambda: run_batch(m, files, root))
                    for limit in limits}
        variants["api"] = lambda: setup(batch, lambda: run_api(m, files, batch))
        runs = alternate(variants, args.rounds, n)
        out |= {"images_s": runs, "median": {k: statistics.median(v) for k, v in runs.items()}, "images": n,
                "cpus": os.cpu_count(), "device": torch.cuda.get_device_name() if not args.small else "cpu"}
        print(json.dumps(out, indent=1))
        if args.out:
            args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
