"""Kernels compiled for Hopper (sm_90) on this machine by Triton's own ptxas: what they keep in registers."""
import subprocess
import sys

import pytest
from helpers import BENCH, bench_error

from idefics import kernels


def attention_usage(launches) -> dict:
    """bench/registers.py's table for these (positions per block, warps) -> {launch: (registers, bytes spilled)}."""
    args = [a for launch in launches for a in ("--launch", *map(str, launch))]
    r = subprocess.run([sys.executable, str(BENCH / "registers.py"), *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.strip("|").split("|") for line in r.stdout.splitlines() if line[:2] == "| " and line[2].isdigit()]
    return {(int(b), int(w)): (int(regs), int(spilled)) for b, w, _, regs, spilled in rows}


def test_self_attentions_launches_spill_no_registers_on_hopper():
    """Each launch of kernels.ATTENTION_LAUNCH keeps a block of the cache and the next one in registers: spilled,
    such a launch ran 1.2-10x slower on an H100 (BENCHMARKS). 64 positions in one warp is there to show that the
    count sees a spill."""
    launches = sorted(set(kernels.ATTENTION_LAUNCH.values()))
    usage = attention_usage([*launches, (64, 1)])
    assert usage[(64, 1)][1] > 0, usage
    for launch in launches:
        assert usage[launch][1] == 0, (launch, usage[launch])


@pytest.mark.parametrize("flags, message", [
    (["--launch", "64"], "argument --launch: expected 2 arguments"),
    (["--launch", "96", "4"], "argument --launch: '96': a power of 2"),
    (["--launch", "64", "-4"], "argument --launch: '-4': a power of 2"),
    (["--launch", "0", "4"], "argument --launch: '0': a power of 2"),
])
def test_the_registers_script_refuses_a_bad_launch_in_one_line(flags, message):
    """Triton's blocks and warps are powers of 2: anything else ends in argparse's one line, before compiling."""
    assert bench_error("registers.py", flags) == f"registers.py: error: {message}"
