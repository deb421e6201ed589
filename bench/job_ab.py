"""idefics batch and the API over bench/job.py's photos, side by side in one process, with this tree's batch.py and
processor.py against those of another commit (--against, default HEAD~1): how the line threads start and how a
prompt is built, alone and together. Each variant runs --rounds times, in alternating order, after a warm-up.

    PYTHONPATH=src python bench/job_ab.py [--against REV] [--rounds 4] [--out ab.json] [--small]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from job import alternate, ours, run_api, run_batch, tiny_config, warm_up, write_photos  # noqa: E402

import idefics.batch as batch_module  # noqa: E402
import idefics.processor as processor_module  # noqa: E402
from idefics.config import idefics_9b  # noqa: E402


def module_at(rev: str, name: str, tmp: Path):
    """src/idefics/<name>.py as it was at rev, loaded as a module of its own (its imports from idefics are today's)."""
    path = tmp / f"{name}_{rev.replace('~', '_').replace('/', '_')}.py"
    path.write_bytes(subprocess.check_output(["git", "show", f"{rev}:src/idefics/{name}.py"]))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD~1")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--small", action="store_true", help="the CPU and a tiny model (checks the script)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        old_batch, old_processor = module_at(args.against, "batch", root), module_at(args.against, "processor", root)
        now = batch_module.process, processor_module.Pending.prompt
        variants = {  # name -> (idefics batch's process, Pending.prompt); None: the API
            "batch_now": (now[0], now[1]), "batch_old_threads": (old_batch.process, now[1]),
            "batch_old_both": (old_batch.process, old_processor.Pending.prompt),
            "api_now": (None, now[1]), "api_old_prompt": (None, old_processor.Pending.prompt)}
        n, batch = (64, 8) if args.small else (256, 64)
        files = write_photos(root, n)
        m = ours(tiny_config(), "cpu", torch.float32, 2) if args.small else \
            ours(idefics_9b(), "cuda", torch.bfloat16, 16)
        warm_up(m, files, batch, root)

        def setup(process, prompt):
            batch_module.process, processor_module.Pending.prompt = process or now[0], prompt
            return (lambda: run_api(m, files, batch)) if process is None else (lambda: run_batch(m, files, root))

        try:
            out = alternate({name: lambda v=v: setup(*v) for name, v in variants.items()}, args.rounds, n)
        finally:
            batch_module.process, processor_module.Pending.prompt = now
        out |= {"against": args.against, "images": n, "cpus": os.cpu_count(),
                "device": torch.cuda.get_device_name() if not args.small else "cpu"}
        print(json.dumps(out, indent=1))
        if args.out:
            args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
