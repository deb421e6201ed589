"""The image pipeline alone, files to pixels: photo-sized JPEGs (bench/job.py's) through ImagePipeline with its
workers resizing, and with the workers only decoding and the GPU resizing (stage.py), side by side in one run, each
the best of a few rounds of one call's images, after a round that starts the workers.

    PYTHONPATH=src python bench/pipeline.py [--workers 16 8] [--images 64] [--rounds 5] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL

sys.path.insert(0, str(Path(__file__).parent))
from job import write_photos  # noqa: E402

from idefics.images import ImageTransform  # noqa: E402
from idefics.pipeline import ImagePipeline, default_workers  # noqa: E402


def rate(pipeline: ImagePipeline, files: list[Path], rounds: int) -> float:
    """Images per second, the best round, after one that starts the workers (and checks the device's resize)."""

    def one_round() -> float:
        start = time.perf_counter()
        for future in [pipeline.submit(f) for f in files]:
            future.result()
        return time.perf_counter() - start

    one_round()
    return len(files) / min(one_round() for _ in range(rounds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[default_workers()])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="where the staged images are resized")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_photos(Path(tmp), args.images)
        for workers in args.workers:
            for name, resize_on in (("workers resize", None), (f"{args.device} resizes", args.device)):
                pipeline = ImagePipeline(ImageTransform(), workers=workers, resize_on=resize_on)
                print(f"{workers:3d} workers, {name:16s}: {rate(pipeline, files, args.rounds):7.1f} images/s",
                      flush=True)
                pipeline.close()
    print(f"({os.cpu_count()} CPUs, numpy {np.__version__}, Pillow {PIL.__version__})")


if __name__ == "__main__":
    main()
