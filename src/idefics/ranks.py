"""The ranks of a tensor-parallel model on one host, started without torchrun: rank 0 is the calling process, ranks
1..N-1 are worker processes it spawns. Each rank loads only its shard (parallel.py, weights.py).

Rank 0 runs the scheduler. Every engine call it makes (reserve, warmup, prefill_batch, decode, reorder, release,
call) is first sent to each worker, which makes the same call on its own engine: all ranks hold the same slots and
run the same forward passes, meeting at the same all-reduces. Sampling happens on rank 0 alone: the tokens it picks
reach the workers as the next decode call's input. A call travels as a pickle through a pipe per worker, except its
tensors on the model's device, which follow by broadcast (on a GPU, no copy to the host and no wait: the scheduler
launches the next step before it reads the tokens of this one).

Workers end when rank 0's model is closed or collected (a stop message), when rank 0's process ends (their pipe
closes; a thread watching the parent covers a worker inside a collective) and are terminated if they linger."""
from __future__ import annotations

import atexit
import io
import os
import pickle
import sys
import threading
import types
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from idefics.engine import Engine
from idefics.errors import IdeficsError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
TIMEOUT = timedelta(minutes=10)  # a collective that waits longer than this fails (a rank died or hangs)
STOP_WAIT = 10.0  # seconds a closing worker gets before it is terminated
MIRRORED = ("reserve", "warmup", "prefill_batch", "decode", "reorder", "release", "release_all", "call")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU from the one asked for; the CPU for every rank on the CPU."""
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def _send(conns, device: torch.device, message):
    """Pickle `message` to every pipe, then broadcast its tensors on `device`, in the order they were met."""
    tensors = []

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.Tensor) and obj.device == device:
                tensors.append(obj.contiguous())
                return len(tensors) - 1, tuple(obj.shape), obj.dtype
            return None

        def reducer_override(self, obj):
            # A view pickles its whole storage (a prompt's images are a slice of its batch's): send its elements.
            if isinstance(obj, torch.Tensor) and obj.untyped_storage().nbytes() > obj.nbytes:
                return _same, (obj.clone(memory_format=torch.contiguous_format),)
            return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    for conn in conns:
        conn.send_bytes(buffer.getbuffer())
    for t in tensors:
        dist.broadcast(t, src=0)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _receive(conn, device: torch.device):
    """The other end of _send."""
    tensors = []

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            _, shape, dtype = pid
            tensors.append(torch.empty(shape, dtype=dtype, device=device))
            return tensors[-1]

    message = Unpickler(io.BytesIO(conn.recv_bytes())).load()
    for t in tensors:
        dist.broadcast(t, src=0)
    return message


class Team:
    """The worker ranks and the process group, from rank 0. One per process at a time (the default group)."""

    current: "Team | None" = None

    def __init__(self, ranks: int, device: torch.device, build, args: tuple):
        """Each worker's engine is build(rank, ranks, device, *args): a module-level function (api.build_shard reads
        the rank's shard of a checkpoint), so that it travels by name."""
        if not dist.is_available():
            raise IdeficsError("tensor_parallel needs torch.distributed, which this torch build lacks")
        old = Team.current
        if old is not None and not old.done.is_set():
            if not (old.retiring or old.closed):
                raise IdeficsError("a tensor-parallel model is already loaded in this process: close() it first")
            # A collected model's engine thread is stopping its workers: its group must be gone before ours forms.
            if not old.done.wait(4 * STOP_WAIT):
                raise IdeficsError("the previous tensor-parallel model is still shutting down")
        if dist.is_initialized():
            raise IdeficsError("tensor_parallel: this process already has a torch.distributed process group "
                               "(close the other tensor-parallel model first)")
        if device.type not in BACKENDS:
            raise IdeficsError(f"tensor_parallel runs on cpu or cuda, not {device.type}")
        if device.type == "cuda" and (device.index or 0) + ranks > torch.cuda.device_count():
            raise IdeficsError(f"tensor_parallel={ranks} from {device} needs {ranks} GPUs, and "
                               f"{torch.cuda.device_count()} are visible")
        # The device with its index (cuda:0, not cuda): what tensors on it compare equal to.
        self.ranks, self.device, self.backend = ranks, rank_device(device, 0), BACKENDS[device.type]
        self.closed = self.joined = self.retiring = False
        self.done, self.lock = threading.Event(), threading.Lock()
        self.post = None  # the model's EngineLoop.post (set by api.Idefics): runs a function on its engine thread
        self.conns, self.processes, self.store = [], [], None
        Team.current = self
        try:
            # The store listens on a free port it picks itself (port 0): no race with other programs.
            self.store = dist.TCPStore("127.0.0.1", 0, ranks, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
            ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
            for rank in range(1, ranks):
                ours, theirs = ctx.Pipe()
                # The environment goes with them (spawn copies os.environ): NCCL_NVLS_ENABLE=0 and the like stay set.
                p = ctx.Process(target=_worker, args=(rank, ranks, device, self.store.port, build, args, theirs),
                                name=f"idefics-rank-{rank}", daemon=True)
                _start_plain(p)
                theirs.close()
                self.conns.append(ours)
                self.processes.append(p)
        except BaseException:
            self.close()
            raise

    def join(self):
        """Wait until every worker has loaded its shard (or raise the first failure), then form the group."""
        waiting = dict(enumerate(zip(self.conns, self.processes), 1))  # rank -> (pipe, process)
        try:
            while waiting:
                wait([x for conn, p in waiting.values() for x in (conn, p.sentinel)])
                for rank, (conn, p) in list(waiting.items()):
                    if conn.poll():  # a message, or the end of the pipe
                        try:
                            error = conn.recv()
                        except EOFError:
                            error = f"exited while loading (exit code {p.exitcode})"
                    elif not p.is_alive():
                        error = f"exited while loading (exit code {p.exitcode})"
                    else:
                        continue
                    if error is not None:
                        raise IdeficsError(f"tensor-parallel rank {rank}: {error}")
                    del waiting[rank]
            kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
            dist.init_process_group(self.backend, store=self.store, rank=0, world_size=self.ranks, timeout=TIMEOUT,
                                    **kwargs)
            self.joined = True
        except BaseException:
            self.close()
            raise

    def leader(self, model, **options) -> "Leader":
        return Leader(model, self, **options)

    def send(self, message):
        if self.closed:
            raise IdeficsError("the model is closed")
        _send(self.conns, self.device, message)

    def retire(self):
        """The model was collected, or the program ends: have its engine thread close the team between steps."""
        if not self.retiring:
            self.retiring = True
            self.post(self.close)

    def close(self):
        """Stop the workers (waiting up to STOP_WAIT seconds each, then terminating them) and leave the group."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._stop()
            finally:
                self.done.set()

    def _stop(self):
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:  # that worker has gone already
                pass
        for p in self.processes:
            if self.joined:  # else a worker may be loading, or waiting for the group: nothing to finish
                p.join(STOP_WAIT)
            if p.is_alive():
                p.terminate()
                p.join(STOP_WAIT)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = None


@atexit.register
def _finish_at_exit():
    """At the program's end, stop the workers of a model not closed, on its engine thread, and wait for it: the
    interpreter must not end with the process group alive, or in the middle of its teardown (the process would
    abort in the C++ runtime's exit)."""
    team = Team.current
    if team is not None and team.post is not None and not team.done.is_set():
        team.retire()
        team.done.wait(2 * STOP_WAIT)


class Leader(Engine):
    """Rank 0's engine: each call in MIRRORED goes to every worker, then runs here."""

    def __init__(self, model, team: Team, **options):
        super().__init__(model, **options)
        self.team = team


def _mirrored(name: str):
    plain = getattr(Engine, name)

    def method(self, *args, **kwargs):
        self.team.send((name, args, kwargs))
        return plain(self, *args, **kwargs)

    method.__name__, method.__doc__ = name, plain.__doc__
    return method


for _name in MIRRORED:
    setattr(Leader, _name, _mirrored(_name))


def _start_plain(process):
    """Start a spawned process without it importing the caller's main script first (what spawn does, so that the
    target may live there): a script that loads a tensor-parallel model at its top level, with no
    `if __name__ == "__main__"` guard, would run again in every worker. The workers need only this package."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")  # as in an interactive session: nothing to import
    try:
        process.start()
    finally:
        sys.modules["__main__"] = main


def _exit_with_parent():
    """End this worker when rank 0's process ends, whatever it is doing then (e.g. waiting in a collective)."""
    parent = mp.parent_process()

    def watch():
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="idefics-parent-watch", daemon=True).start()


def _worker(rank: int, ranks: int, device: torch.device, port: int, build, args: tuple, conn):
    """A worker rank: load its shard, join the group, then make each call rank 0 sends until told to stop."""
    _exit_with_parent()
    device = rank_device(device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // ranks))  # the ranks share the cores
    try:
        engine = build(rank, ranks, device, *args)
    except BaseException as e:  # reported by rank 0, where the user sees it
        conn.send((str(e).splitlines() or [type(e).__name__])[0])
        return
    conn.send(None)
    store = dist.TCPStore("127.0.0.1", port, ranks, is_master=False, timeout=TIMEOUT)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(BACKENDS[device.type], store=store, rank=rank, world_size=ranks, timeout=TIMEOUT,
                            **kwargs)
    try:
        while True:
            try:
                message = _receive(conn, engine.device)
            except EOFError:  # rank 0's end of the pipe closed: its process ended
                return
            if message is None:
                return
            name, args, kwargs = message
            try:
                getattr(engine, name)(*args, **kwargs)
            except Exception as e:  # rank 0 made the same call on the same state: it reports the failure
                print(f"idefics: tensor-parallel rank {rank}: {name}: {type(e).__name__}: {e}".splitlines()[0],
                      file=sys.stderr)
    finally:
        dist.destroy_process_group()
