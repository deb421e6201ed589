"""`idefics batch --ray` against the local mode: the same captioning job, same files, same run.

    PYTHONPATH=src python bench/ray_job.py --model CHECKPOINT_DIR [--images 256] [--replicas 1 2] [--out x.json]
    PYTHONPATH=src python bench/ray_job.py --small      # the demo model on the CPU, in about a minute

Writes photo-sized JPEGs (smooth gradients and noise, so that their size is a photo's), a task file captioning each
("This is an image of ", max_new_tokens 10), then times the job: in this process with `idefics.batch` (the model
loaded and warmed up first), and with `idefics.ray_batch` on a local Ray for each replica count asked for (one GPU
each, each warmed up the same way). Ray's images/s is counted from the moment the first replica is ready to the
last record's write, so that neither Ray's start, a model load nor Ray's shutdown is counted (the decoding tasks,
which start at once, get a head start: use more --images to make it small); the time with the start and shutdown
is given too, and each replica call's start and end. Each run's records are compared with the local mode's (equal
in float32; in bfloat16 another batch composition rounds differently, which flips some greedy choices on random
weights). Prints one JSON object and writes it to --out (or $OUT/ray_job.json when OUT is set).
On a machine of several GPUs, `--replicas 1 2` gives the scaling."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import idefics
from idefics import batch, ray_batch


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    names = []
    for i in range(n):
        a, b, c = rng.uniform(0.5, 3, 3)
        base = np.stack([np.sin(x / w * a * np.pi + i), np.cos(y / h * b * np.pi), np.sin((x + y) / (w + h) * c)], -1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        names.append(f"photo{i:04d}.jpg")
        Image.fromarray(pixels).save(folder / names[-1], quality=90)
    return names


def warm(m, files: list[Path], batch_size: int, options: dict) -> None:
    """One batch of the job's captions: kernels, graphs and caches made before the clock starts."""
    m.caption(files[:batch_size], "This is an image of ", **options)


class Ready:
    """A replica's model, loaded and warmed up as the local mode's is; the time it was ready is appended to a file."""

    def __init__(self, loader: ray_batch.Loader, marker: Path, files: list[Path], batch_size: int, options: dict):
        self.loader, self.marker, self.files, self.batch_size, self.options = loader, marker, files, batch_size, options

    def __call__(self):
        m = self.loader()
        warm(m, self.files, self.batch_size, self.options)
        caption, calls = m.caption, self.marker.with_suffix(".calls")

        def timed_caption(images, *args, **kwargs):  # each call's start, end and images, for the report
            start = time.time()
            out = caption(images, *args, **kwargs)
            with calls.open("a") as f:
                f.write(f"{start} {time.time()} {len(images) if isinstance(images, list) else 1}\n")
            return out

        m.caption = timed_caption
        with self.marker.open("a") as f:
            f.write(f"{time.time()}\n")
        return m

    def image_size(self):  # the decoding tasks resize the images, as they do for the command's own loader
        return self.loader.image_size()


def records(path: Path) -> dict:
    return {r["line"]: r for r in map(json.loads, path.read_text().splitlines())}


def same(got: dict, expected: dict) -> float:
    """The fraction of lines whose records are equal."""
    return sum(got.get(line) == record for line, record in expected.items()) / len(expected)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (bench/job.py's) or hub id; --small: the demo model")
    p.add_argument("--images", type=int, help="default 256 (--small: 16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--replicas", type=int, nargs="+", default=[1], help="replica counts to time with --ray")
    p.add_argument("--small", action="store_true", help="the demo model on the CPU, few small images")
    p.add_argument("--out")
    args = p.parse_args()
    device, gpus = ("cpu", 0) if args.small else ("cuda", 1)
    n, size = (args.images or 16, (320, 240)) if args.small else (args.images or 256, (1600, 1067))
    options = {"max_new_tokens": 10}

    work = Path(tempfile.mkdtemp(prefix="ray_job."))
    (work / "images").mkdir()
    names = write_images(work / "images", n, size)
    tasks = work / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task": "caption", "image": name, "prompt": "This is an image of "}) + "\n"
                             for name in names))
    result = {"model": args.model or "demo", "device": device, "images": n, "image_size": list(size),
              "batch_size": args.batch_size, "max_new_tokens": options["max_new_tokens"]}
    if not args.small:
        import torch

        result["gpu"] = torch.cuda.get_device_name()

    files = [work / "images" / name for name in names]
    m = idefics.load(args.model, device=device)
    warm(m, files, args.batch_size, options)
    local = work / "local.jsonl"
    start = time.time()
    batch.run_file(str(tasks), local, work / "images", options, args.batch_size, lambda: m)
    seconds = time.time() - start
    result["local"] = {"images_per_s": round(n / seconds, 2), "seconds": round(seconds, 2)}
    expected = records(local)
    m = None  # the replicas get the GPU to themselves
    gc.collect()
    if not args.small:
        torch.cuda.empty_cache()

    for replicas in args.replicas:
        out, marker = work / f"ray{replicas}.jsonl", work / f"ready{replicas}"
        loader = ray_batch.Loader(args.model, device=None if gpus else "cpu")
        start = time.time()
        ray_batch.run_file(str(tasks), out, options=options, image_root=work / "images", batch_size=args.batch_size,
                           replicas=replicas, gpus_per_replica=gpus,
                           load=Ready(loader, marker, files, args.batch_size, options))
        finished = time.time()
        end = out.stat().st_mtime  # the last record's write (the driver flushes each one); Ray's shutdown after it
        ready = min(map(float, marker.read_text().split()))  # the first replica's: its head start is counted
        result[f"ray_{replicas}"] = {
            "images_per_s": round(n / (end - ready), 2), "seconds": round(end - ready, 2),
            "seconds_with_start_and_shutdown": round(finished - start, 2),
            "records_equal_local": round(same(records(out), expected), 3),
            "vs_local": round(n / (end - ready) / result["local"]["images_per_s"], 3),
            # the replicas' caption calls: start and end in seconds from the first replica's readiness, images
            "calls": sorted([round(float(a) - ready, 3), round(float(b) - ready, 3), int(c)]
                            for a, b, c in map(str.split, marker.with_suffix(".calls").read_text().splitlines()))}
    if len(args.replicas) > 1 and 1 in args.replicas:
        most = max(args.replicas)
        scaling = result[f"ray_{most}"]["images_per_s"] / result["ray_1"]["images_per_s"]
        result[f"scaling_{most}_vs_1"] = round(scaling, 3)

    print(json.dumps(result, indent=1))
    target = args.out or (os.path.join(os.environ["OUT"], "ray_job.json") if os.environ.get("OUT") else None)
    if target:
        Path(target).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
