"""Where one call of bench/job.py's captioning job spends its time: a timeline of the image workers, the engine
thread's prefills, encodes and decode steps (host time, and device time between CUDA events recorded around each),
for one m.caption call of --batch photos after a warm-up, in the exact and the fast decode.

    PYTHONPATH=src python bench/job_trace.py [--batch 64] [--slots 64] [--workers 16] [--path api|batch]
                                             [--ahead 16] [--decodes exact fast] [--resize-on-device 1|0] [--small]
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import sync  # noqa: E402
from job import NEW_TOKENS, PROMPT, ours, run_batch, tiny_config, write_photos  # noqa: E402

from idefics import api  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402
from idefics.encoder import ImageEncoder  # noqa: E402
from idefics.engine import Engine  # noqa: E402
from idefics.pipeline import ImagePipeline, default_workers  # noqa: E402
from idefics.scheduler import Scheduler  # noqa: E402
from idefics.stage import Resizer  # noqa: E402

EVENTS: list = []


def traced(cls, name, label, extra=lambda *a: "", gpu=False):
    fn = getattr(cls, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        ev = None
        if gpu and torch.cuda.is_available():
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        out = fn(*args, **kwargs)
        if ev:
            ev[1].record()
        EVENTS.append((label, start, time.perf_counter(), extra(*args), ev))
        return out

    setattr(cls, name, wrapper)


def trace_images():
    """Each image from its submit to its pixels' arrival in this process (the workers are processes)."""
    submit = ImagePipeline.submit

    @functools.wraps(submit)
    def wrapper(self, source, *args, **kwargs):
        start = time.perf_counter()
        future = submit(self, source, *args, **kwargs)
        future.add_done_callback(lambda f: EVENTS.append(("load", start, time.perf_counter(), "", None)))
        return future

    ImagePipeline.submit = wrapper


def report(t0: float):
    sync()
    loads = [e for e in EVENTS if e[0] == "load"]
    engine = sorted((e for e in EVENTS if e[0] != "load"), key=lambda e: e[1])
    ends = [1e3 * (e[2] - t0) for e in loads]
    waits = 1e3 * sum(e[2] - e[1] for e in loads) / max(1, len(loads))
    print(f"  images: {len(loads)} loaded, {waits:.1f} ms each from submit, first done at {min(ends):.0f} ms, last at "
          f"{max(ends):.0f} ms")
    totals: dict = {}
    for label, a, b, extra, ev in engine:
        gpu = ev[0].elapsed_time(ev[1]) if ev else 0.0
        tot = totals.setdefault(label, [0, 0.0, 0.0])
        tot[0] += 1
        tot[1] += 1e3 * (b - a)
        tot[2] += gpu
        if label != "step":
            print(f"  {1e3 * (a - t0):8.1f} ms {label:8s} host {1e3 * (b - a):7.2f} ms device {gpu:7.2f} ms {extra}")
    for label, (n, host, gpu) in totals.items():
        print(f"  total {label}: {n} calls, host {host:.1f} ms, device {gpu:.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--small", action="store_true", help="the CPU and a tiny model (checks the script)")
    parser.add_argument("--path", choices=["api", "batch"], default="api",
                        help="one m.caption call of the photos, or idefics batch over one line per photo")
    parser.add_argument("--slots", type=int, help="the running batch's slots (default --batch)")
    parser.add_argument("--ahead", type=int, default=api.AHEAD_IMAGES, help="images encoded ahead at once, at least")
    parser.add_argument("--decodes", nargs="+", default=["exact", "fast"], choices=["exact", "fast"])
    parser.add_argument("--warm-ups", type=int, default=3, help="untimed calls of other photos before each trace")
    parser.add_argument("--resize-on-device", type=int, choices=[0, 1], default=1,
                        help="0: the workers resize (on the GPU the default is 1: the GPU resizes, stage.py)")
    args = parser.parse_args()
    api.AHEAD_IMAGES = args.ahead
    trace_images()
    traced(Engine, "prefill_batch", "prefill", lambda self, prompts, *a, **k: f"{len(prompts)} prompts "
           f"{max(p.ids.shape[0] for p in prompts)} tokens", gpu=True)
    traced(Engine, "decode", "decode", lambda self, tokens, *a, **k: f"{tokens.shape[0]} rows", gpu=True)
    traced(ImageEncoder, "__call__", "encode", lambda self, pixels, *a: f"{sum(map(len, pixels))} images", gpu=True)
    traced(Scheduler, "step", "step")
    traced(Resizer, "_on_device", "resize", lambda self, images: f"{len(images)} images")  # (it waits for its copies)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_photos(Path(tmp), 2 * args.batch)
        slots = args.slots or args.batch
        m = ours(tiny_config(), "cpu", torch.float32, args.workers) if args.small else \
            ours(idefics_9b(), "cuda", torch.bfloat16, args.workers)
        m.scheduler.max_batch = slots
        if not args.resize_on_device:
            m.processor.images.resizer = None
        if args.path == "batch":  # the same photos as lines of a tasks.jsonl, through idefics batch
            def job(photos):
                run_batch(m, photos, Path(tmp))
        else:
            def job(photos):
                m.caption(photos, PROMPT, max_new_tokens=NEW_TOKENS)
        for decode in args.decodes:
            m.processor.images.decode = decode
            for _ in range(args.warm_ups):  # (the shapes a call meets depend on how its photos arrive)
                m.engine.encoder.cache.clear()
                job(files[args.batch:])
            m.engine.encoder.cache.clear()
            EVENTS.clear()
            sync()
            t0 = time.perf_counter()
            job(files[: args.batch])
            sync()
            wall = time.perf_counter() - t0
            print(f"{decode} ({args.path}): {args.batch} images in {1e3 * wall:.0f} ms ({args.batch / wall:.1f} "
                  "images/s)", flush=True)
            report(t0)


if __name__ == "__main__":
    main()
