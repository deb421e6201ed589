"""The captioning job through `idefics batch` with several row limits of the running batch (its --max-batch), side
by side in one process: each limit timed --rounds times in alternating order after a warm-up, with the API's calls
of 64 as the control; also how often each limit's captions equal the API's.

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
from job import ours, run_api, run_batch, timed, tiny_config, warm_up, write_photos  # noqa: E402

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
        m = ours(tiny_config(), "cpu", torch.float32, 2, batch) if args.small else \
            ours(idefics_9b(), "cuda", torch.bfloat16, 16, batch)
        for limit in sorted(limits, reverse=True):  # (the largest first: the buffers only grow)
            m.scheduler.max_batch = limit
            warm_up(m, files, batch, root)
        m.scheduler.max_batch = batch
        api = run_api(m, files, batch)
        out: dict = {"equal_api": {}}
        for limit in limits:
            m.scheduler.max_batch = limit
            out["equal_api"][limit] = sum(a == b for a, b in zip(run_batch(m, files, root), api)) / n
        names = [f"batch_{limit}" for limit in limits] + ["api"]
        runs: dict = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                m.scheduler.max_batch = batch if name == "api" else int(name.removeprefix("batch_"))
                job = (lambda: run_api(m, files, batch)) if name == "api" else (lambda: run_batch(m, files, root))
                runs[name].append(n / timed(job)[0])
            print({k: round(v[-1], 1) for k, v in runs.items()}, file=sys.stderr, flush=True)
        out |= {"images_s": runs, "median": {k: statistics.median(v) for k, v in runs.items()}, "images": n,
                "cpus": os.cpu_count(), "device": torch.cuda.get_device_name() if not args.small else "cpu"}
        print(json.dumps(out, indent=1))
        if args.out:
            args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
