"""Quantization passes: the decoder's nn.Linear layers become 8-bit or 4-bit layers, on a built model or one layer
at a time while the checkpoint loads (so the bfloat16 copy of a layer is freed before the next one arrives).

What stays in the model dtype, and why: the embeddings and lm_head (the logits are most sensitive to them, and
the head is a small share of the bytes read per step), norms and gates (tiny), and the vision tower and perceiver
(about 8% of the weights, run once per image, never per step).

    int8  bitsandbytes LLM.int8(): int8 weights, activation outliers (> 6.0) kept in 16-bit; CPU and CUDA.
          Its outlier search reads a device value on the host, so CUDA graphs cannot capture it: decoding runs
          without them (a tenth of bfloat16's batch-1 speed on an H200: for memory, not speed).
    nf4   bitsandbytes 4-bit NormalFloat (QLoRA's format), blocks of 64.
    fp4   bitsandbytes 4-bit float, blocks of 64 (the guide's load_in_4bit, whose default type this is).
          Both double-quantize the block scales (6.2 GB for idefics-9b instead of 6.5) and run as CUDA graphs;
          they save memory, not time (their batch-1 kernel is about as fast as bfloat16's).
    int4  torchao weight-only int4, groups of 128, PyTorch's tinygemm kernel: the fast one for decoding.
          CUDA, bfloat16.
    fp8   float8_e4m3fn weights with one float32 scale per output channel (fp8.py): half of bfloat16's bytes, close
          to lossless. On Hopper its own kernels (an fp8 GEMV at batch 1, a weight-only fp8 GEMM for a few rows,
          fp8 tensor cores through torch._scaled_mm for many); elsewhere it upcasts (CPU and CUDA, bfloat16 or
          float32; float16's narrower range is not offered).
The bitsandbytes layers compute in the model dtype (bfloat16 on CUDA by default), never in float32 by default."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from idefics import fp8
from idefics.errors import IdeficsError
from idefics.fp8 import Fp8Linear

THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, as transformers' BitsAndBytesConfig default
INT4_GROUP = 128


def _import(package: str, method: str):
    try:
        if package == "bitsandbytes":
            # Its CPU backend warns on import when an optional hub kernel is absent; the built-in path is used.
            log = logging.getLogger("bitsandbytes.backends.cpu.ops")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                return importlib.import_module(package)
            finally:
                log.setLevel(level)
        return importlib.import_module(package)
    except ImportError:
        raise IdeficsError(f"quantize={method!r} needs the {package} package: pip install {package} "
                           f"(or pip install 'idefics[quant]')") from None


def _int8(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    bnb = _import("bitsandbytes", "int8")
    # Weights are quantized row-wise from float16, as bitsandbytes' own Int8Params does.
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
    with torch.device("meta"):
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                threshold=THRESHOLD)
    q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    return Float16Input(q, dtype)


def _four_bit(kind: str) -> Callable[[nn.Linear, torch.dtype], nn.Module]:
    def replace(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        bnb = _import("bitsandbytes", kind)
        with torch.device("meta"):
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=True, quant_type=kind)
        w = linear.weight.detach()
        # Moving an unquantized Params4bit to a device quantizes it there (here: where the weight already is).
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type=kind,
                                     module=q).to(w.device)
        return q

    return replace


def _int4(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    _import("torchao", "int4")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    # tile_packed_to_4d is the layout of PyTorch's own tinygemm kernel (aten._weight_int4pack_mm): no extra
    # kernel library, and CUDA graphs capture it. set_inductor_config=False: leave torch.compile's settings alone.
    quantize_(linear, Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d",
                                           set_inductor_config=False))
    return linear


def _fp8(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    return Fp8Linear.from_linear(linear)


class Float16Input(nn.Module):
    """LLM.int8() quantizes activations from float16: cast them here, once, rather than have bitsandbytes cast
    (and warn about it) in every call; the output returns to the model dtype."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).to(self.dtype)


@dataclass(frozen=True)
class Method:
    package: str
    replace: Callable[[nn.Linear, torch.dtype], nn.Module]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    graphs: bool  # whether CUDA graphs can capture the quantized layers
    block: int = 1  # values sharing a scale along a row: narrower or ragged layers stay unquantized


_HALF = (torch.bfloat16, torch.float16)
METHODS = {
    "int8": Method("bitsandbytes", _int8, ("cpu", "cuda"), _HALF + (torch.float32,), graphs=False),
    "nf4": Method("bitsandbytes", _four_bit("nf4"), ("cpu", "cuda"), _HALF + (torch.float32,), graphs=True, block=64),
    "fp4": Method("bitsandbytes", _four_bit("fp4"), ("cpu", "cuda"), _HALF + (torch.float32,), graphs=True, block=64),
    "int4": Method("torchao", _int4, ("cuda",), (torch.bfloat16,), graphs=True, block=INT4_GROUP),
    "fp8": Method("torch", _fp8, ("cpu", "cuda"), (torch.bfloat16, torch.float32), graphs=True),
}


def method(name: str, device: torch.device, dtype: torch.dtype) -> Method:
    """The method `name`, checked against the device and dtype, its package imported: fails before any loading."""
    if name not in METHODS:
        raise IdeficsError(f"unknown quantize {name!r} (valid: {', '.join(METHODS)})")
    m = METHODS[name]
    if device.type not in m.devices:
        raise IdeficsError(f"quantize={name!r} runs on {' or '.join(m.devices)}, not {device.type}"
                           + (" (on the CPU, use int8)" if device.type == "cpu" else ""))
    if dtype not in m.dtypes:
        valid = ", ".join(str(d).removeprefix("torch.") for d in m.dtypes)
        raise IdeficsError(f"quantize={name!r} needs dtype {valid}, not {str(dtype).removeprefix('torch.')}")
    if name == "fp8" and fp8.PRODUCT not in fp8.PRODUCTS:
        raise IdeficsError(f"IDEFICS_FP8_PRODUCT={fp8.PRODUCT!r} is not a product (valid: {', '.join(fp8.PRODUCTS)})")
    _import(m.package, name)
    return m


def is_target(name: str, module: nn.Module, m: Method) -> bool:
    """The decoder's linear layers: self-attention, MLPs, cross-attention and its MLPs (not lm_head)."""
    return name.startswith("layers.") and type(module) is nn.Linear and module.in_features % m.block == 0


def _swap(model: nn.Module, name: str, old: nn.Module, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    # The mode matters: in training mode bitsandbytes' int8 layers take another (dequantizing) path.
    setattr(model.get_submodule(parent), attr, new.train(old.training))


def quantize(model: nn.Module, name: str) -> nn.Module:
    """Quantize a built model in place (its weights already on their device)."""
    w = model.embed.weight
    m = method(name, w.device, w.dtype)
    for module_name, module in list(model.named_modules()):
        if is_target(module_name, module, m):
            _swap(model, module_name, module, m.replace(module, w.dtype))
    return model


def while_loading(model: nn.Module, name: str, device: torch.device, dtype: torch.dtype):
    """The on_module_ready hook of weights.load_weights: each target layer is quantized as soon as its weights
    are in, and its unquantized weights are freed before the next layer loads."""
    m = method(name, device, dtype)

    def ready(module_name: str, module: nn.Module):
        if is_target(module_name, module, m):
            _swap(model, module_name, module, m.replace(module, dtype))

    return ready
