"""The image pipeline alone on bench/job.py's photos: images/s of 16 worker processes turning 64 photos into pixels,
each resized by Pillow in its worker, or handed over to this process and resized on the GPU (pipeline.HAND_OVER),
or decoded at a reduced scale ("fast"), the best of a few runs each, with the main process's CPU time.

    PYTHONPATH=src python bench/handover.py [--images 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from job import write_photos  # noqa: E402

from idefics import pipeline as pipeline_module  # noqa: E402
from idefics.images import ImageTransform  # noqa: E402
from idefics.pipeline import ImagePipeline, default_workers  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        files = write_photos(Path(tmp), args.images)
        for name, hand_over, decode in (("exact, Pillow in the workers", False, "exact"),
                                        ("exact, handed over", True, "exact"), ("fast", False, "fast")):
            pipeline_module.HAND_OVER = hand_over
            pipeline = ImagePipeline(ImageTransform(), workers=args.workers, decode=decode, resize_device=device)
            [f.result() for f in [pipeline.submit(x) for x in files]]  # workers forked, weights on the device
            best, cpu = float("inf"), 0.0
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                [f.result() for f in [pipeline.submit(x) for x in files]]
                seconds = time.perf_counter() - start
                if seconds < best:
                    best, cpu = seconds, time.process_time() - start_cpu
            print(f"{name:30s} {len(files) / best:7.1f} images/s ({1e3 * best:.0f} ms), this process's CPU "
                  f"{1e3 * cpu:.0f} ms", flush=True)
            pipeline.close()
    print(f"({os.cpu_count()} CPUs, {args.workers} workers, {device})")


if __name__ == "__main__":
    main()
