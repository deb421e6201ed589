"""`idefics batch --ray`: the JSONL job of idefics.batch on a Ray cluster, with the same task lines, result records,
per-line errors and resume.

The driver reads the task file, skips the lines its output already holds, and streams the rest through Ray Data:
  lines -> CPU tasks: parse each line, read, decode and resize its image (path on shared storage, URL or data URI)
        -> an actor pool of model replicas (one per GPU, or on CPUs): batch_size lines a call, several calls at a
           time, from threads that share the replica's running batch
        -> back to the driver, the output's only writer, which appends each record as it arrives.
A replica that dies is restarted and its calls retried (Ray's actor fault tolerance); a record that comes back
twice is written once."""
from __future__ import annotations

import logging
import math
import os
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from idefics import batch
from idefics.batch import Job
from idefics.errors import IdeficsError
from idefics.images import ImageLimits

CALLS_PER_REPLICA = 4  # batch_size-line calls a replica runs at once: its batch refills while results go back
DECODE_MEMORY = ImageLimits.max_bytes + 3 * ImageLimits.max_pixels  # bytes: the encoded image and its RGB pixels
LINES_PER_BLOCK = 128  # lines per decoding task at most: many tasks start at once, yet few enough that overhead
# stays small; a job of fewer lines than that per CPU of the cluster is split into one task per CPU instead (256
# photos in 2 tasks would decode on 2 cores)


@dataclass(frozen=True)
class Loader:
    """idefics.load's arguments, called in each replica. No device: the GPU Ray gave the replica, else the CPU."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None

    def __call__(self):
        import ray

        import idefics

        device = self.device or ("cuda" if ray.get_gpu_ids() else "cpu")
        return idefics.load(self.model, device=device, dtype=self.dtype, quantize=self.quantize)

    def image_size(self) -> int | None:
        """The side the model's images are resized to, where it can be read here: from a checkpoint directory (or
        the demo model's); None for a hub id, whose files only the replicas fetch."""
        from idefics.hub import resolve
        from idefics.images import ImageTransform

        if self.model is not None and not Path(self.model).is_dir():
            return None
        return ImageTransform.from_dir(resolve(self.model)).image_size


def run_file(source: str | Path, output: str | Path, *, model: str | None = None, device: str | None = None,
             dtype: str | None = None, quantize: str | None = None, options: dict | None = None,
             image_root: str | Path = ".", batch_size: int = 8, address: str | None = None,
             replicas: int | None = None, gpus_per_replica: float | None = None, cpus_per_replica: float | None = None,
             load: Callable | None = None) -> int:
    """Run a task file (or - for stdin) into an output file on Ray, resumed when the output exists; the same job as
    `idefics.batch.run_file`. address: None starts a local Ray for the job (or joins the one this process is
    connected to, or $RAY_ADDRESS's); "auto" or an address joins a running cluster. replicas: default one per GPU
    of the cluster (gpus_per_replica each, default 1), or 1 on a cluster without GPUs. load: builds the model in
    each replica (pickled to them; default: Loader(model, device, dtype, quantize)); where it has an image_size()
    method, as Loader has, the decoding tasks resize the images too. -> exit status."""
    check(batch_size, replicas, gpus_per_replica, cpus_per_replica)
    output, root = Path(output), Path(image_root).absolute()  # the workers' current directories are their own
    if load is None:
        model = model or os.environ.get("IDEFICS_MODEL")  # as the driver's environment says, not each worker's
        local = model is not None and Path(model).exists()  # a checkpoint directory, as the workers will see it
        load = Loader(str(Path(model).absolute()) if local else model, device, dtype, quantize)
    job = batch.open_job(source, output)
    if job is None:
        return 0
    lines, todo, out = job
    with out:
        image_size = getattr(load, "image_size", lambda: None)()
        ray, started = connect(address)
        try:
            failures = stream(pipeline(ray, started, todo, root, options or {}, image_size, batch_size, load,
                                       replicas, gpus_per_replica, cpus_per_replica), out, output)
        finally:
            if started:
                ray.shutdown()
    print(f"idefics: batch: {len(todo) - failures} done, {failures} failed, results in {output}", file=sys.stderr)
    return 0


def pipeline(ray, started: bool, todo: list, image_root: Path, defaults: dict, image_size: int | None,
             batch_size: int, load: Callable, replicas, gpus, cpus):
    """The pending lines -> a Ray dataset of their records (pickled), in the order they finish."""
    pool = size_pool(ray, started, replicas, gpus, cpus)
    rows = [{"line": line.number, "item": pickle.dumps(line)} for line in todo]
    cores = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(math.ceil(len(rows) / LINES_PER_BLOCK), min(len(rows), cores))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # Each decoding task asks for the memory of the largest image it may decode, a resource the replicas do not ask
    # for: so Ray places no more decodes on a node than its memory holds, and keeps them out of the replicas.
    ds = ds.map(decode, fn_kwargs=dict(image_root=image_root, defaults=defaults, image_size=image_size), num_cpus=1,
                memory=DECODE_MEMORY)
    # One replica call per block of batch_size lines: calls run side by side, and each one's records come back
    # as soon as it ends.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    # Ray Data's actor pools restart a dead actor and retry its calls (max_restarts and max_task_retries: -1).
    return ds.map_batches(
        Replica, fn_constructor_args=(load,), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.replicas, max_concurrent_calls_per_actor=CALLS_PER_REPLICA,
                                           enable_true_multi_threading=True),
        num_gpus=pool.gpus, num_cpus=pool.cpus)


def stream(ds, out, output: Path) -> int:
    """Append each record to the output as it comes back, once per line, and report each failure. -> failures."""
    written, failures = set(), 0
    for records in iterate(ds.iter_batches(batch_size=None, batch_format="numpy")):
        for raw in records["record"]:
            record = pickle.loads(raw)
            key = ("id", record["id"]) if "id" in record else ("line", record["line"])
            if key in written:  # a retried call's second answer
                continue
            written.add(key)
            try:
                out.write(batch.encode(record))
                out.flush()  # a killed driver loses no finished line
            except OSError as e:
                raise IdeficsError(f"{output}: cannot write ({batch.reason_of(e)})") from None
            if "error" in record:
                failures += 1
                print(batch.said(record["error"]), file=sys.stderr)
    return failures


def check(batch_size, replicas, gpus_per_replica, cpus_per_replica) -> None:
    def number(value, name: str, least: float, strict: bool, integer: bool = False) -> None:
        kinds = (int,) if integer else (int, float)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                or value < least or (strict and value == least):
            raise IdeficsError(f"--{name} must be {'an integer' if integer else 'a number'} "
                               f"{'>' if strict else '>='} {least}, got {value!r}")

    number(batch_size, "batch-size", 1, False, integer=True)
    number(replicas, "replicas", 1, False, integer=True)
    number(gpus_per_replica, "gpus-per-replica", 0, False)
    number(cpus_per_replica, "cpus-per-replica", 0, True)


def connect(address: str | None):
    """-> (the ray module, whether this call started Ray)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise IdeficsError("--ray needs Ray Data: pip install 'idefics[ray]'") from None
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address or None, logging_level=logging.WARNING)
    except Exception as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise IdeficsError(f"cannot start or join {where} ({first_line(e)})") from None
    return ray, True


@dataclass(frozen=True)
class Pool:
    replicas: int
    gpus: float
    cpus: float


def size_pool(ray, started: bool, replicas, gpus, cpus) -> Pool:
    """The pool's size from the flags and the cluster. A cluster started for the job has all it will ever have,
    so a pool it cannot hold is refused; a running cluster may grow, so it is trusted."""
    have = ray.cluster_resources()
    gpus = (1 if have.get("GPU", 0) >= 1 else 0) if gpus is None else gpus
    if replicas is None:
        replicas = max(1, int(have.get("GPU", 0) // gpus)) if gpus else 1
    pool = Pool(replicas, gpus, 1 if cpus is None else cpus)
    if started:
        need_gpus, need_cpus = pool.replicas * pool.gpus, pool.replicas * pool.cpus
        if need_gpus > have.get("GPU", 0):
            raise IdeficsError(f"{pool.replicas} replicas of {pool.gpus:g} GPUs need {need_gpus:g} GPUs; "
                               f"this machine has {have.get('GPU', 0):g}")
        if need_cpus >= have.get("CPU", 0):  # at least one CPU is left to decode images
            raise IdeficsError(f"{pool.replicas} replicas of {pool.cpus:g} CPUs need {need_cpus:g} CPUs, and images "
                               f"one more; this machine has {have.get('CPU', 0):g}")
    return pool


def decode(row: dict, image_root: Path, defaults: dict, image_size: int | None = None) -> dict:
    """A CPU task: one line -> its Job, its image read, decoded and, where image_size is known, resized as the
    model's processor resizes it (which then resizes it to the size it has: a copy, so the pixels are the same); or
    the line's error record. The images of few-shot examples and generate prompts stay as given (they belong to
    what batches lines together) and load in the replica. An image that fails to load stays as given too: the
    replica's call fails on it with the local mode's message."""
    from idefics.images import ImageTransform, load_image

    job = batch.prepare(pickle.loads(row["item"]), image_root, defaults)
    if isinstance(job, Job) and job.image is not None:
        try:
            image = load_image(job.image)
        except Exception:
            pass
        else:
            if image_size:
                image = ImageTransform(image_size=image_size).resized(image)
            job = replace(job, image=image)
    return {"line": row["line"], "item": pickle.dumps(job)}


class Replica:
    """One model in an actor; each call runs batch_size lines (Jobs, or error records passed through)."""

    def __init__(self, load: Callable):
        self.m = load()

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        items = [pickle.loads(raw) for raw in rows["item"]]
        records = {item["line"]: item for item in items if isinstance(item, dict)}
        for job, record in batch.run(self.m, [item for item in items if isinstance(item, Job)]):
            records[job.line] = record
        done = [pickle.dumps(batch.finish(records[int(n)])) for n in rows["line"]]
        return {"record": np.array(done, dtype=object)}


def iterate(batches):
    """Ray's batches; a failure inside Ray becomes one line: the user's error it reports (Ray passes it on as the
    text of a traceback, whose line "idefics.errors.IdeficsError: ..." is the error's one line), else its first line."""
    try:
        yield from batches
    except IdeficsError:
        raise
    except Exception as e:
        ours = [line for line in str(e).splitlines() if line.startswith(USER_ERROR)]
        raise IdeficsError(f"a replica failed: {ours[-1][len(USER_ERROR):] if ours else first_line(e)}") from None


USER_ERROR = f"{IdeficsError.__module__}.{IdeficsError.__qualname__}: "


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
