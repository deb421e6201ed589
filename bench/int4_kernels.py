"""int4 weight-only matrix-vector products at batch 1, idefics-9b shapes, bfloat16 activations: torchao's tinygemm
(what `quantize="int4"` uses) against GemLite's Triton kernels on the same group-wise int4 weights, with cuBLAS
bfloat16 for scale; 20 products per CUDA graph, as in a decode step.

    PYTHONPATH=src python bench/int4_kernels.py    # needs torchao and gemlite
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemv_sweep import graph_time  # noqa: E402

from idefics.config import idefics_9b  # noqa: E402


def quantize(w: torch.Tensor, group: int = 128):
    """Asymmetric int4 per group of columns -> (W_q uint8 (N, K) in 0..15, scales, zeros (N, K/group)) with
    w ~ (W_q - zeros) * scales."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = -lo / scales
    q = (g / scales[..., None] + zeros[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, k)
    return q, scales, zeros


@torch.inference_mode()
def main():
    import gemlite
    from gemlite.helper import A16Wn
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    c = idefics_9b()
    d, f = c.hidden_size, c.intermediate_size
    shapes = {"wqkv": (3 * d, d), "wo": (d, d), "w13": (2 * f, d), "w2": (d, f)}
    print(torch.cuda.get_device_name(), "gemlite", getattr(gemlite, "__version__", "?"))
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        q, scales, zeros = quantize(w)
        deq = ((q.float().view(n, k // 128, 128) - zeros[..., None]) * scales[..., None]).view(n, k).to(torch.bfloat16)
        ref = F.linear(x, deq).float()
        lins, gls = [], []
        for _ in range(4):  # four copies of each: no product finds its weights in L2
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
            lins.append(lin)
            gls.append(A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
                q, scales.to(torch.bfloat16), zeros.to(torch.bfloat16), W_nbits=4, group_size=128))
        for _ in range(3):
            out = gls[0](x)
        cos = F.cosine_similarity(out.float(), ref, dim=-1).item()
        mats = [w.clone() for _ in range(4)]
        t_bf16 = graph_time(lambda i: F.linear(x, mats[i]), 4)
        t_tiny = graph_time(lambda i: lins[i](x), 4)
        t_gl = graph_time(lambda i: gls[i](x), 4)
        print(f"{name} ({n}x{k}): bf16 cuBLAS {1e6 * t_bf16:.1f} us, tinygemm {1e6 * t_tiny:.1f} us, "
              f"gemlite {1e6 * t_gl:.1f} us (cosine to the dequantized product {cos:.5f})", flush=True)


if __name__ == "__main__":
    main()
