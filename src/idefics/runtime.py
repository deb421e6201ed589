"""How the model's work runs: without autograd, with attention kernels that need no plan per shape, and with inputs
copied to the device without waiting for its queue."""
from __future__ import annotations

import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN's attention builds a plan for each new shape: about 30 ms of host time per layer call (H100, 2026-12-06), so
# a prefill of a new length took 1.2 s where its GPU work took 58 ms. Prompts come in many lengths; flash and
# memory-efficient attention need no plan.
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def model_work(fn):
    """Decorate a function that runs the model."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(), sdpa_kernel(ATTENTION):
            return fn(*args, **kwargs)
    return run


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device, copied through pinned memory: a copy from pageable memory waits for everything
    queued on the device before it, which would hold the host (and the launches it has still to make) behind a
    running decode step."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
