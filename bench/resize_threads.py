"""How the image workers scale with threads: 64 photo-sized JPEGs (bench/job.py's) turned into pixels by 1 to 16
threads, decoding only, and decoding + resizing + normalizing (the pipeline's exact path), each the best of a few
runs: the ceiling the machine's cores put on the job's exact path.

    PYTHONPATH=src python bench/resize_threads.py [--threads 1 4 8 16] [--images 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from job import write_photos  # noqa: E402

from idefics.images import ImageTransform  # noqa: E402
from idefics.pipeline import ImagePipeline  # noqa: E402


def decode_only(path: Path):
    with Image.open(path) as image:
        image.load()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_photos(Path(tmp), args.images)
        ways = {"decode": lambda threads: decode_only,
                "decode+resize (Pillow)": lambda threads: ImagePipeline(ImageTransform(), workers=threads).pixels}
        for name, make in ways.items():
            for threads in args.threads:
                fn = make(threads)
                best = float("inf")
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(fn, files[: 2 * threads]))  # threads, streams, weights on the device
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        list(pool.map(fn, files))
                        best = min(best, time.perf_counter() - start)
                per_image = 1e3 * best * threads / len(files)
                print(f"{name:28s} {threads:3d} threads: {len(files) / best:7.1f} images/s, "
                      f"{per_image:6.1f} ms per image per thread", flush=True)
    print(f"({os.cpu_count()} CPUs, numpy {np.__version__}, Pillow {PIL.__version__})")


if __name__ == "__main__":
    main()
