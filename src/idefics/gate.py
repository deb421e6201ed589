"""Where ready prompts wait to enter the running batch together.

A prompt is ready once its images are decoded. Prompts trickling in one by one would each start a prefill, and
each prefill reads every weight of the model; so ready prompts wait while others they can join are still loading,
and enter in one prefill once none is loading or `group` of them are waiting. Each generate() call has a gate of
its own (its prompts wait only for each other); calls made to fill one job, such as `idefics batch`'s lines, share
one (Idefics.gather)."""
from __future__ import annotations

import threading
from typing import Callable

from idefics.scheduler import Request


class Gate:
    def __init__(self, submit: Callable[[list[Request], list], object], group: int):
        self.submit = submit  # (requests, sinks): into the running batch
        self.group = group
        self.lock = threading.Lock()
        self.loading = 0  # prompts started whose images are not ready yet
        self.held: list[tuple[Request, object]] = []  # (request, where its outputs go)

    def started(self):
        with self.lock:
            self.loading += 1

    def loaded(self, request: Request | None = None, sink=None) -> bool:
        """One prompt's images are ready: its request waits here (None: the prompt failed, or does not wait).
        -> whether it is waiting still (its images are worth encoding meanwhile)."""
        with self.lock:
            self.loading -= 1
            if request is not None:
                self.held.append((request, sink))
            self._release()
            return request is not None and bool(self.held)

    def leave(self, ids: set, loading: int) -> set:
        """A call ends early: its requests still held go, and its `loading` prompts are no longer waited for.
        -> the ids of its requests that had entered the batch already."""
        with self.lock:
            self.loading -= loading
            gone = {r.id for r, _ in self.held if r.id in ids}
            self.held = [(r, s) for r, s in self.held if r.id not in ids]
            self._release()
        return ids - gone

    def _release(self):  # (under the lock: two releases never interleave their requests)
        if self.held and (self.loading <= 0 or len(self.held) >= self.group):
            held, self.held = self.held, []
            self.submit([r for r, _ in held], [s for _, s in held])
