"""One thread owns the engine: it drives the scheduler, and runs between steps whatever else needs the model (a
scoring pass, a beam search). Callers in any thread hand it requests and read their outputs from queues, so calls
from several threads join the same running batch, and a model on a GPU is only ever used from this thread."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Iterator

from idefics.errors import IdeficsError
from idefics.scheduler import Output, Request, Scheduler


class Busy(Exception):
    """Raised by a call that needs the running batch to drain first (more slots or longer buffers than are free):
    admission pauses, and the call runs once nothing else does."""


class EngineLoop:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[object, object] = {}  # request id -> its outputs
        self.calls: list[tuple[Callable, Future]] = []  # waiting to run between steps
        self.thread: threading.Thread | None = None
        self.start_lock = threading.Lock()
        self.generated_tokens = 0  # by every request so far (progress reports read it)

    def submit(self, requests: list[Request], sinks: list | None = None) -> list:
        """Queue requests -> one queue of Outputs each, the last with its finish_reason set. sinks: where to put
        each request's Outputs instead: anything with a put() (called on the engine thread), and optionally a flush()
        called once after each step's puts (a sink for asyncio hands a whole step over at once)."""
        sinks = [queue.SimpleQueue() for _ in requests] if sinks is None else list(sinks)
        self.inbox.put(("add", list(zip(requests, sinks))))
        self._start()
        return sinks

    def abort(self, id):
        self.inbox.put(("abort", id))

    def call(self, fn: Callable):
        """Run fn() on the engine thread between steps -> its result (or its exception, raised here)."""
        if threading.current_thread() is self.thread:
            return fn()
        future: Future = Future()
        self.inbox.put(("call", (fn, future)))
        self._start()
        return future.result()

    def post(self, fn: Callable):
        """Run fn() on the engine thread between steps, without waiting for it (safe from a finalizer)."""
        self.inbox.put(("call", (fn, Future())))
        self._start()

    def outputs(self, sink: queue.SimpleQueue, id) -> Iterator[Output]:
        """A request's outputs as they come; closing the iterator early aborts the request."""
        finished = False
        try:
            while True:
                o = sink.get()
                if o.error is not None:
                    raise IdeficsError(o.error)
                finished = o.finish_reason is not None
                yield o
                if finished:
                    return
        finally:
            if not finished:
                self.abort(id)

    def _start(self):
        with self.start_lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="idefics-engine", daemon=True)
                self.thread.start()

    def _run(self):
        s = self.scheduler
        while True:
            self._take(block=not s.busy and not self.calls)
            self._run_calls()
            s.hold = bool(self.calls)  # a call waiting for room: admit no one until it has run
            if not s.busy:
                continue
            try:
                outputs = s.step()
            except Exception as e:  # a fault of the engine, not of one request: fail those in flight, carry on
                outputs = self._fail_all(e)
            self.generated_tokens += sum(o.token is not None for o in outputs)
            flushes = set()  # a sink with flush() buffers its puts: flushed once per step (see server.runs)
            for o in outputs:
                sink = self.sinks.get(o.id)
                if sink is not None:
                    sink.put(o)
                    if hasattr(sink, "flush"):
                        flushes.add(sink.flush)
                    if o.finish_reason is not None:
                        del self.sinks[o.id]
            for flush in flushes:
                flush()

    def _take(self, block: bool):
        """Apply what callers sent: everything waiting, after waiting for one message if block."""
        while True:
            try:
                kind, item = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                for request, sink in item:
                    self.sinks[request.id] = sink
                    self.scheduler.add(request)
            elif kind == "abort":
                self.scheduler.abort(item)
            else:
                self.calls.append(item)

    def _run_calls(self):
        for fn, future in list(self.calls):
            try:
                result = fn()
            except Busy:
                if self.scheduler.running or self.scheduler.engine.active:
                    continue  # once the batch has drained
                result, error = None, IdeficsError("the model is busy")
                future.set_exception(error)
            except BaseException as e:  # the caller gets it
                future.set_exception(e)
            else:
                future.set_result(result)
            self.calls.remove((fn, future))

    def _fail_all(self, error: Exception) -> list[Output]:
        s = self.scheduler
        message = str(error) if isinstance(error, IdeficsError) else f"internal error: {type(error).__name__}: {error}"
        failed = [r.id for r in s.running] + [r.id for r in s.waiting]
        s.reset()
        return [Output(id, None, "", "error", error=message.splitlines()[0]) for id in failed]
