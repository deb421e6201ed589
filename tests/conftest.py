import os

import pytest
import torch

# The fused decode kernels (Triton) run on the CPU through Triton's interpreter; it is chosen when they are defined.
# `make test-gpu` sets TRITON_INTERPRET=0, so that on a GPU they are compiled.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs the public API on CUDA against the CPU (tests/test_gpu.py, "
                                       "make test-gpu); skipped where no CUDA GPU is present")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): more threads only add
    synchronisation, and slow down badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
