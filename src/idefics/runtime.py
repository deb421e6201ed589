"""How the model's work runs: without autograd, and with attention kernels that need no plan per shape."""
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
