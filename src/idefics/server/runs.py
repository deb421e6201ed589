"""The choices of one HTTP request on the engine thread, read from the event loop.

The engine loop (idefics.loop) puts each request's Outputs into a sink; here the sinks of one event loop share a
Channel that hands a whole engine step's outputs to that loop with one call_soon_threadsafe (one wakeup per step,
not one per stream and token), so no handler ever waits on a thread. A Run's outputs are read as they come, from all
its choices; leaving the read early (client gone, timeout, error) aborts the choices not finished, which frees
their slots at the engine's next step."""
from __future__ import annotations

import asyncio
import time
import weakref
from typing import AsyncIterator

from idefics.errors import IdeficsError
from idefics.generate import completion
from idefics.scheduler import Output, Request
from idefics.server.protocol import APIError


class Channel:
    """The engine thread's outputs for one event loop: put() (engine thread) collects a step's outputs, flush() (the
    engine loop calls it once per step) hands them to the event loop in one callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple[int, Output]]] = []

    def put(self, queue: asyncio.Queue, item: tuple[int, Output]):
        self.pending.append((queue, item))

    def flush(self):
        batch, self.pending = self.pending, []
        if batch and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[asyncio.Queue, tuple[int, Output]]]):
    for queue, item in batch:
        queue.put_nowait(item)


_channels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Channel


def channel(loop: asyncio.AbstractEventLoop) -> Channel:
    if loop not in _channels:
        _channels[loop] = Channel(loop)
    return _channels[loop]


class Sink:
    """Outputs of one choice from the engine thread -> (choice index, Output) on an asyncio queue, through its event
    loop's Channel; `flush` tells the engine loop what to call after a step's puts."""

    __slots__ = ("channel", "queue", "index", "flush")

    def __init__(self, channel: Channel, queue: asyncio.Queue, index: int):
        self.channel, self.queue, self.index, self.flush = channel, queue, index, channel.flush

    def put(self, output: Output):
        self.channel.put(self.queue, (self.index, output))


class Admission:
    """Choices admitted and not yet finished. Past the limit a request is refused (429) before any work; while
    draining every new request is (503)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.draining = False

    def take(self, n: int) -> "Ticket":
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining")
        if self.count + n > self.limit:
            raise APIError(429, f"the server is full ({self.count} requests in flight, limit {self.limit}); "
                           "retry later", code="queue_full")
        self.count += n
        return Ticket(self, n)


class Ticket:
    def __init__(self, admission: Admission, n: int):
        self.admission, self.n = admission, n

    def release(self):
        self.admission.count -= self.n
        self.n = 0


class Run:
    def __init__(self, model, requests: list[Request], metrics, arrival: float, timeout: float):
        self.model = model
        self.requests = requests
        self.metrics = metrics
        self.arrival = arrival  # time.monotonic() when the HTTP request came
        self.deadline = arrival + timeout
        self.open = set(range(len(requests)))
        self.last: list[float | None] = [None] * len(requests)  # when each choice's latest token came

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(choice index, Output) as they come, until every choice has finished."""
        if self.requests[0].options.num_beams > 1:
            async for item in self._beams():
                yield item
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sinks = [Sink(channel(loop), queue, i) for i in range(len(self.requests))]
        self.model.loop.submit(self.requests, sinks)
        deadline = loop.time() + (self.deadline - time.monotonic())
        try:
            while self.open:
                try:
                    async with asyncio.timeout_at(deadline):
                        i, o = await queue.get()
                except TimeoutError:
                    raise APIError(504, "the request took longer than the server's request timeout",
                                   code="timeout") from None
                if o.error is not None:
                    raise APIError(500, o.error, code="engine_error")
                self._measure(i, o)
                if o.finish_reason is not None:
                    self.open.discard(i)
                yield i, o
        finally:
            for i in self.open:
                self.model.loop.abort(self.requests[i].id)
            self.open = set()

    async def _beams(self):
        """Beam search runs on the engine thread as one call; its text comes at the end."""
        try:
            await asyncio.to_thread(self.model._beams, self.requests)
        except IdeficsError as e:
            raise APIError(400, str(e)) from None
        for i, r in enumerate(self.requests):
            c = completion(self.model.tokenizer, r)
            self.metrics.tokens_out.inc(len(r.generated))
            self.open.discard(i)
            yield i, Output(r.id, None, c.text, c.finish_reason, completion=c)
        self.metrics.e2e.observe(time.monotonic() - self.arrival)

    def _measure(self, i: int, o: Output):
        now = time.monotonic()
        if o.token is not None:
            self.metrics.tokens_out.inc()
            last = self.last[i]
            if last is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.inter_token.observe(now - last)
            self.last[i] = now
        if o.finish_reason is not None and self.open == {i}:
            self.metrics.e2e.observe(now - self.arrival)
