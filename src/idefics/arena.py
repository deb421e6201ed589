"""Memory shared by this process and the image workers it forks: decoded images handed over without a pipe.

A worker that decoded a large image takes a run of pages here, copies the image's bytes in and returns only where
they are; this process reads them (the GPU copies them, the pages pinned) and gives the pages back. The pages are an anonymous
shared mapping made before the workers fork, so every worker of every pool sees the same ones; which pages are
taken, and by which process, is an array beside them under one process-shared lock. Nothing waits for pages: a
worker that finds too few free does the work itself."""
from __future__ import annotations

import mmap
import multiprocessing
import os

import numpy as np

PAGE = 1 << 20


class Arena:
    def __init__(self, size: int):
        self.pages = max(1, size // PAGE)
        self.buffer = mmap.mmap(-1, self.pages * PAGE)  # MAP_SHARED | MAP_ANONYMOUS; touched pages only are memory
        self.owners = multiprocessing.get_context("fork").Array("i", self.pages)  # pid per page, 0: free

    def pin(self) -> bool:
        """Lock the pages for the GPU (CUDA reads them by DMA, without a copy by this process's CPU); workers forked
        later still share them. Whether it worked."""
        import ctypes

        import torch

        self._exported = ctypes.c_char.from_buffer(self.buffer)  # (keeps the mapping from being closed under CUDA)
        error = torch.cuda.cudart().cudaHostRegister(ctypes.addressof(self._exported), len(self.buffer), 0)
        return int(error) == 0

    def _table(self) -> np.ndarray:
        return np.frombuffer(self.owners.get_obj(), dtype=np.int32)

    def take(self, n: int) -> int | None:
        """The offset of n bytes of free pages (the first run that fits), now this process's; None if none."""
        need = -(-n // PAGE)
        with self.owners.get_lock():
            owners = self._table()
            free = np.concatenate(([0], (owners == 0).astype(np.int8), [0]))
            edges = np.flatnonzero(np.diff(free))  # starts and ends of the free runs, alternating
            for start, end in zip(edges[::2], edges[1::2]):
                if end - start >= need:
                    owners[start : start + need] = os.getpid()
                    return int(start) * PAGE
        return None

    def give(self, offset: int, n: int):
        first = offset // PAGE
        with self.owners.get_lock():
            self._table()[first : first + -(-n // PAGE)] = 0

    def array(self, offset: int, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 view of the taken bytes at offset."""
        return np.frombuffer(self.buffer, np.uint8, int(np.prod(shape)), offset).reshape(shape)

    def adopt(self, offset: int, n: int):
        """A worker's pages, now this process's (a worker that dies later no longer holds them)."""
        first = offset // PAGE
        with self.owners.get_lock():
            self._table()[first : first + -(-n // PAGE)] = os.getpid()

    def reclaim(self):
        """Give back the pages of workers that are gone (one that died between taking pages and returning them)."""
        with self.owners.get_lock():
            owners = self._table()
            for pid in set(np.unique(owners).tolist()) - {0, os.getpid()}:
                if _gone(pid):
                    owners[owners == pid] = 0

    def taken(self) -> int:
        return int(np.count_nonzero(self._table())) * PAGE


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie has: it writes nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return False
