"""Registers and spilled bytes of a Triton kernel's launches compiled for Hopper (sm_90) by Triton's own ptxas, on
any machine: no GPU needed. What a launch keeps in flight lives in registers; past 255 a thread (or 65536 over the
program's threads) the compiler spills to local memory, and a kernel that streams a cache through registers slows.

    PYTHONPATH=src python bench/registers.py                  # rope_attention at each (positions per block, warps)
    PYTHONPATH=src python bench/registers.py --launch 128 8   # one launch

The figures come from the Triton installed here; the GPU machines' may allocate a few registers differently."""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the kernels, defined when idefics.kernels is imported, are to be compiled
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import power_of_two  # noqa: E402

from idefics import kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def sm90_usage(fn, pointers: dict, constexprs: dict, aligned: list, warps: int) -> tuple[int, int]:
    """fn (a @triton.jit kernel) compiled for sm_90 -> (registers a thread, bytes a thread spilled to its stack).
    pointers: {argument: Triton pointer type, e.g. "*bf16"}, floats as "fp32"; the other runtime arguments are
    int32. aligned: the arguments specialized as multiples of 16, as the launches of real tensors are."""
    signature = {a: "i32" for a in fn.arg_names} | pointers | {k: "constexpr" for k in constexprs}
    index = {a: i for i, a in enumerate(fn.arg_names)}
    src = ASTSource(fn, signature=signature, constexprs={(index[k],): v for k, v in constexprs.items()},
                    attrs={(index[a],): [["tt.divisibility", 16]] for a in aligned})
    compiled = triton.compile(src, target=HOPPER, options=dict(num_warps=warps))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(found[1]), int(found[2])


def rope_attention_usage(block_kv: int, warps: int, head_dim: int = 128) -> tuple[int, int]:
    """kernels._rope_attention_kernel as rope_attention launches it for bfloat16 heads of head_dim, with PDL."""
    pointers = dict(QKV="*bf16", COS="*bf16", SIN="*bf16", POS="*i64", KC="*bf16", VC="*bf16", OUT="*bf16",
                    scale="fp32")
    half = head_dim // 2
    constexprs = dict(HALF=half, BLOCK=triton.next_power_of_2(half), BLOCK_KV=block_kv, PDL=True)
    aligned = ["QKV", "COS", "SIN", "KC", "VC", "OUT", "stride_qkv", "stride_cos", "stride_kslot", "stride_khead",
               "stride_kpos", "stride_out"]
    return sm90_usage(kernels._rope_attention_kernel, pointers, constexprs, aligned, warps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launch", type=power_of_two, nargs=2, action="append", metavar=("POSITIONS", "WARPS"),
                        help="rope_attention's (cached positions per block, warps); repeatable (default: a grid)")
    args = parser.parse_args()
    launches = args.launch or list(itertools.product((16, 32, 64, 128, 256), (1, 2, 4, 8, 16)))
    print(f"Triton {triton.__version__}, sm_90; rope_attention (bfloat16, heads of 128), kernels.ATTENTION_LAUNCH "
          f"{kernels.ATTENTION_LAUNCH}")
    print("| positions per block | warps | positions a warp | registers a thread | bytes spilled a thread |")
    print("|---|---|---|---|---|")
    for block_kv, warps in launches:
        regs, spilled = rope_attention_usage(block_kv, warps)
        print(f"| {block_kv} | {warps} | {block_kv / warps:g} | {regs} | {spilled} |", flush=True)


if __name__ == "__main__":
    main()
