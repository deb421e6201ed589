"""The choices of one HTTP request on the engine thread, read from the event loop.

The engine loop (idefics.loop) puts each request's Outputs into a sink; here a sink hands them to the event loop
with call_soon_threadsafe, so no handler ever waits on a thread. A Run's outputs are read as they come, from all
its choices; leaving the read early (client gone, timeout, error) aborts the choices not finished, which frees
their slots at the engine's next step."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from idefics.errors import IdeficsError
from idefics.generate import completion
from idefics.scheduler import Output, Request
from idefics.server.protocol import APIError


class Sink:
    """Outputs of one choice from the engine thread -> (choice index, Output) on an asyncio queue."""

    __slots__ = ("loop", "queue", "index")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, output: Output):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, output))


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
        self.model.loop.submit(self.requests, [Sink(loop, queue, i) for i in range(len(self.requests))])
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
