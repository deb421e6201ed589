"""FP8 weights (quantize="fp8") on one GPU, in one run meant to take under eight minutes on an H200:

    PYTHONPATH=src python bench/fp8.py [--batches 1 8 32 64] [--products auto weight-only scaled] [--new-tokens 128]
    PYTHONPATH=src python bench/fp8.py --small    # the same steps on a small config on the CPU (about a minute)

1. idefics-9b shape, random weights: bfloat16 decode at each batch with the engine's defaults (with
   --bf16-gemm-rows, again with fused.GEMM_ROWS set to each value given: the products of up to that many rows in the
   Triton GEMM of fp8_gemm, cuBLAS above; 0 is cuBLAS for all), then the same model quantized to fp8 in place and
   decoded again with each product for rows > 1 (fp8.PRODUCT: "auto" as fp8.py's table, "weight-only" the Triton
   GEMM of bfloat16 activations, "scaled" torch._scaled_mm with fp8 activations, "scaled-triton" the Triton GEMM
   with fp8 activations). Per run: decode tokens/s over the tokens after the first, time to first token (image
   encoding included), peak memory, and the roofline: the card's copy bandwidth over the bytes a step reads, the
   weights (without the embedding table and the cross-attention key/value projections) plus the KV cache
   (self-attention at the run's mean length, and the image keys/values).
2. Each 9b matrix (wqkv, wo, w13, w2 of all 32 layers, one after another in a CUDA graph) at 1 to 256 rows: bf16
   cuBLAS against each fp8 product (at 1 row fp8 runs its GEMV, bf16 still cuBLAS: the engine's bf16 GEMV is timed
   by bench/gemv_sweep.py).
3. Fidelity: teacher-forced logits (4 prompts + 32 tokens bfloat16 generated) of fp8 against bfloat16, and
   against the bfloat16 model holding fp8's dequantized weights (what the fp8 layers should compute).
4. A 9b-shaped bfloat16 checkpoint written to --dir as the hub lays it out (safetensors shards of --shard-gb,
   each layer's tensors together as save_pretrained writes them, and their index), loaded with the fp8 hook in a
   process of its own: peak GPU memory (goal < 11 GB) and peak host memory (goal < one shard + 2 GB).
5. idefics-80b shape built directly in fp8 on the GPU, one layer at a time (never in bfloat16): batch-1 decode
   against its own roofline, batch 16, peak memory.

Prints a JSON summary at the end and writes it to $OUT/fp8.json when OUT is set."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import power_of_two, random_model, random_tensor, replayed, run_engine, synthetic_prompts  # noqa: E402
from gpu import decode_bytes  # noqa: E402
from quant import cosine, teacher_forced  # noqa: E402

from idefics import fp8, fp8_gemm, fused, kernels, quantize  # noqa: E402
from idefics.config import (IdeficsConfig, PerceiverConfig, VisionConfig, idefics_9b, idefics_80b,  # noqa: E402
                            to_dict)
from idefics.engine import Engine  # noqa: E402
from idefics.weights import build_meta, checkpoint_tensors, load_weights, read_tensors, weight_files  # noqa: E402

GB = 1e9
PROMPT_TOKENS = 24  # synthetic_prompts: BOS, <fake><image><fake>, 20 text tokens


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large copy (median of 10)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 26)
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for i in range(13):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size / sorted(times)[len(times) // 2]


def kv_bytes(config: IdeficsConfig, batch: int, new_tokens: int, size: int) -> float:
    """KV cache bytes a decode step reads, at the mean length over the run: each sequence's keys and values so far in
    every layer, and its image keys and values in every cross block."""
    mean_len = PROMPT_TOKENS + new_tokens / 2
    per_position = 2 * config.hidden_size * size  # a key and a value
    return batch * per_position * (config.num_hidden_layers * mean_len + config.num_cross_layers * config.image_seq_len)


REPEATS = 3


def decode_run(engine: Engine, prompts, new_tokens: int, repeats: int | None = None) -> dict:
    """Decode tokens/s after the first token, time to first token, peak memory: best of `repeats` after a warm-up."""
    dev = engine.device
    run_engine(engine, prompts, 4)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [run_engine(engine, prompts, new_tokens)[1:] for _ in range(repeats or REPEATS)]
    first, total = min(runs, key=lambda r: r[1])
    # decoding from the fastest run; the first token, the fastest of all runs' (one prefill is noisier than 127 steps)
    r = {"decode_tok_s": len(prompts) * (new_tokens - 1) / (total - first), "ttft_ms": min(r[0] for r in runs) * 1e3}
    if dev.type == "cuda":
        r["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return r


def with_roofline(r: dict, batch: int, weights: float, kv: float, bw: float) -> dict:
    steps = r["decode_tok_s"] / batch
    r["roofline_pct"] = 100 * steps * (weights + kv) / bw
    r["weights_only_roofline_pct"] = 100 * steps * weights / bw
    return r


def free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def matrix_times(model, rows: list[int], device: torch.device) -> dict:
    """Microseconds per matrix for each decoder matrix kind and row count: every layer's matrix once per round,
    replayed as a CUDA graph (eager on the CPU)."""
    out = {}
    for kind in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2"):
        mods = [layer.get_submodule(kind) for layer in model.layers]
        for m in rows:
            x = torch.randn(m, mods[0].in_features, device=device, dtype=model.embed.weight.dtype)

            def run():
                for mod in mods:
                    mod(x)

            step = replayed(run) if device.type == "cuda" else run
            step()
            sync(device)
            start = time.perf_counter()
            for _ in range(10):
                step()
            sync(device)
            us = (time.perf_counter() - start) / (10 * len(mods)) * 1e6
            nbytes = sum(p.numel() * p.element_size() for p in mods[0].parameters())
            out[f"{kind} x{m}"] = {"us": us, "tb_s": nbytes / us / 1e6}
    return out


def fp8_random_model(config: IdeficsConfig, device: torch.device, seed: int = 0):
    """The model with random weights as random_model draws them, its decoder linears drawn in bfloat16 one at a
    time and stored in fp8 at once: the bfloat16 model never exists."""
    torch.manual_seed(seed)
    model = build_meta(config)
    method = quantize.METHODS["fp8"]
    for module_name, module in list(model.named_modules()):
        if quantize.is_target(module_name, module, method):
            w = random_tensor(module_name, "weight", module.weight.shape, torch.bfloat16, device)
            layer = fp8.Fp8Linear(*fp8.quantize_weight(w))
            del w
            parent, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            t = random_tensor(module_name, name, p.shape, torch.bfloat16, device)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    model.reset_buffers()
    return model.eval()


def nine_b(args, device: torch.device, bw: float, results: dict):
    config = small_config() if args.small else idefics_9b()
    model = random_model(config, device, torch.bfloat16)
    prompts = {b: synthetic_prompts(config, b, seed=b) for b in args.batches}
    runs = results["9b"] = {"bf16": {}, "fp8": {p: {} for p in args.products}}
    weights = {"bf16": decode_bytes(model)}
    print(f"9b shape, bf16: {weights['bf16'] / GB:.2f} GB of weights per step", flush=True)
    results["matrices"] = {"bf16": matrix_times(model, args.rows, device)}
    engine = Engine(model)
    for b in args.batches:
        r = runs["bf16"][b] = measured(engine, prompts, b, args, weights["bf16"], bw)
        print(f"bf16 batch {b}: {r}", flush=True)
    for rows in args.bf16_gemm_rows:  # products of up to `rows` rows through fp8_gemm.plain_mm, cuBLAS above
        name = f"gemm rows {rows}"
        runs[name] = with_knobs(model, prompts, args, weights["bf16"], bw, runs["bf16"], f"bf16 ({name})",
                                GEMM_ROWS=rows)
    attention = attention_runs(args)
    for name, launch in attention.items():
        runs[name] = with_knobs(model, prompts, args, weights["bf16"], bw, runs["bf16"], f"bf16 ({name})",
                                module=kernels, ATTENTION_LAUNCH=launch)
    fidelity = synthetic_prompts(config, 4, seed=99)
    tokens = run_engine(engine, fidelity, 32)[0]
    ref = teacher_forced(model, fidelity, tokens)
    del engine
    free(device)

    quantize.quantize(model, "fp8")  # in place, layer by layer
    weights["fp8"] = decode_bytes(model)
    print(f"fp8: {weights['fp8'] / GB:.2f} GB of weights per step", flush=True)
    results["weights_gb_per_step"] = {k: v / GB for k, v in weights.items()}
    results["matrices"]["fp8"] = {}
    for product in args.products:
        fp8.PRODUCT = product
        results["matrices"]["fp8"][product] = matrix_times(model, args.rows, device)
        engine = Engine(model)
        for b in args.batches:
            r = runs["fp8"][product][b] = measured(engine, prompts, b, args, weights["fp8"], bw, runs["bf16"])
            print(f"fp8 ({product}) batch {b}: {r}", flush=True)
        del engine
        free(device)
    for swiglu, norm in args.fp8_fusions:  # fp8 (auto) again with fused.FP8_SWIGLU and FP8_NORM_TOKENS as asked
        fp8.PRODUCT = "auto"
        name = f"auto, SwiGLU epilogue {'on' if swiglu else 'off'}, norm's fp8 tokens {'on' if norm else 'off'}"
        runs["fp8"][name] = with_knobs(model, prompts, args, weights["fp8"], bw, runs["bf16"], f"fp8 ({name})",
                                       FP8_SWIGLU=swiglu, FP8_NORM_TOKENS=norm)
        free(device)

    for name, launch in attention.items():  # against bfloat16 with the same launch
        fp8.PRODUCT = "auto"
        runs["fp8"][f"auto, {name}"] = with_knobs(model, prompts, args, weights["fp8"], bw, runs[name],
                                                  f"fp8 (auto, {name})", module=kernels, ATTENTION_LAUNCH=launch)
        free(device)

    fid = results["fidelity_9b_random"] = {}
    got = {}
    for product in ("auto", "weight-only", "scaled-triton"):  # the whole sequence at once: "auto" is _scaled_mm
        fp8.PRODUCT = product
        got[product] = teacher_forced(model, fidelity, tokens)
    fp8.PRODUCT = "auto"
    dequantize(model)
    plain = teacher_forced(model, fidelity, tokens)
    for product, logits in got.items():
        fid[f"fp8 {product} vs bf16"] = stats(cosine(logits, ref))
        fid[f"fp8 {product} vs its dequantized weights in bf16"] = stats(cosine(logits, plain))
    fid["dequantized weights in bf16 vs bf16"] = stats(cosine(plain, ref))
    fid["top1_agree_fp8_vs_bf16"] = (got["auto"].argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"fidelity: {fid}", flush=True)
    del model
    free(device)


def measured(engine: Engine, prompts, b: int, args, weights: float, bw: float, base: dict | None = None) -> dict:
    """decode_run at batch b with its roofline, and against the bfloat16 run at that batch (base) if given."""
    r = decode_run(engine, prompts[b], args.new_tokens)
    r = with_roofline(r, b, weights, kv_bytes(engine.model.config, b, args.new_tokens, 2), bw)
    if base is not None:
        r["vs_bf16"], r["ttft_vs_bf16"] = r["decode_tok_s"] / base[b]["decode_tok_s"], r["ttft_ms"] / base[b]["ttft_ms"]
    return r


def with_knobs(model, prompts: dict, args, weights: float, bw: float, base: dict, label: str, module=fused,
               **knobs) -> dict:
    """Decode at each batch in an engine made with `module`'s settings `knobs` (restored after), against base."""
    saved = {k: getattr(module, k) for k in knobs}
    for k, v in knobs.items():
        setattr(module, k, v)
    engine, out = Engine(model), {}
    try:
        for b in args.batches:
            out[b] = measured(engine, prompts, b, args, weights, bw, base)
            print(f"{label} batch {b}: {out[b]}", flush=True)
    finally:
        for k, v in saved.items():
            setattr(module, k, v)
    return out


def attention_runs(args) -> dict:
    """--attention-few's launches -> {run name: kernels.ATTENTION_LAUNCH with that launch for few rows}."""
    return {f"attention few {b}/{w}": {**kernels.ATTENTION_LAUNCH, "few": (b, w)} for b, w in args.attention_few}


def fusion_pair(value: str) -> tuple[bool, bool]:
    """--fp8-fusions' value: two digits, 0 or 1 -> (FP8_SWIGLU, FP8_NORM_TOKENS)."""
    if len(value) != 2 or set(value) - {"0", "1"}:
        raise argparse.ArgumentTypeError(f"{value!r}: two digits of 0 or 1 (SwiGLU epilogue, norm's fp8 tokens)")
    return value[0] == "1", value[1] == "1"


def dequantize(model):
    """Each fp8 layer -> an nn.Linear holding its dequantized weights in bfloat16."""
    for name, m in list(model.named_modules()):
        if type(m) is fp8.Fp8Linear:
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            linear.weight = torch.nn.Parameter(fp8.dequantize_weight(m.weight, m.scale, torch.bfloat16),
                                               requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, linear)


def stats(cos: torch.Tensor) -> dict:
    return {"min": cos.min().item(), "mean": cos.mean().item()}


def small_config() -> IdeficsConfig:
    """--small: the 9b layout at a size the CPU runs in seconds (the script's steps, not its speed)."""
    return IdeficsConfig(
        vocab_size=1000, additional_vocab_size=2, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=True, use_resampler=True,
        vision=VisionConfig(embed_dim=64, image_size=56, patch_size=14, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128),
        perceiver=PerceiverConfig(n_latents=16, depth=1, n_heads=2, head_dim=32, qk_layer_norms=True),
    )


def natural(name: str) -> list:
    """Sort key: layer numbers as numbers, so that a layer's tensors are written together (as save_pretrained
    writes a state dict, module by module)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def write_child(args):
    """Random bfloat16 weights (drawn on the device) -> config.json and safetensors shards of at most --shard-gb
    with their index, the hub's layout."""
    from safetensors.torch import save_file

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    config = small_config() if args.small else idefics_9b()
    tensors = checkpoint_tensors(random_model(config, torch.device(args.device), torch.bfloat16))
    shards, size = [[]], 0
    for name in sorted(tensors, key=natural):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if size + nbytes > args.shard_gb * GB and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous().cpu() for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (out / "config.json").write_text(json.dumps(to_dict(config)))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    print(f"wrote {len(shards)} shards to {out}", flush=True)


def load_from_disk(args, device: torch.device, bw: float, results: dict):
    """Write the checkpoint (once), then load it with the fp8 hook in a fresh process."""
    passed = ["--dir", args.dir, "--device", args.device, "--shard-gb", str(args.shard_gb)] + \
        (["--small"] if args.small else [])
    if not (Path(args.dir) / "model.safetensors.index.json").exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-child", *passed], check=True)
        print(f"checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--load-child", *passed], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
    r = results["load"] = json.loads(lines[-1][len("RESULT "):])
    r["host_goal_gb"] = r["largest_shard_gb"] + 2
    print(f"load: {r}", flush=True)


def load_child(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.init()
    path = Path(args.dir)
    files = weight_files(path)
    model = build_meta(IdeficsConfig.from_file(path / "config.json"))
    hook = quantize.while_loading(model, "fp8", device, torch.bfloat16)  # what idefics.load(quantize="fp8") does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    start = time.perf_counter()
    load_weights(model, read_tensors(files), device, torch.bfloat16, on_module_ready=hook)
    sync(device)
    r = {"load_s": time.perf_counter() - start, "host_before_gb": before,
         "host_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
         "largest_shard_gb": max(f.stat().st_size for f in files) / GB, "shards": len(files),
         "fp8_layers": sum(type(m) is fp8.Fp8Linear for m in model.modules())}
    if device.type == "cuda":
        r["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / GB
        r["gpu_weights_gb"] = torch.cuda.memory_allocated() / GB
    print("RESULT " + json.dumps(r), flush=True)


def eighty_b(args, device: torch.device, bw: float, results: dict):
    config = small_config() if args.small else idefics_80b()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = fp8_random_model(config, device)
    sync(device)
    r = results["80b"] = {"build_s": time.perf_counter() - start, "weights_gb_per_step": decode_bytes(model) / GB}
    if device.type == "cuda":
        r["weights_gb"] = torch.cuda.memory_allocated() / GB
        r["build_peak_gb"] = torch.cuda.max_memory_allocated() / GB
    print(f"80b shape in fp8: {r}", flush=True)
    engine = Engine(model)
    for b in (1, args.batch_80b):
        run = decode_run(engine, synthetic_prompts(config, b, seed=b), args.new_tokens_80b)
        r[f"batch {b}"] = with_roofline(run, b, decode_bytes(model), kv_bytes(config, b, args.new_tokens_80b, 2), bw)
        print(f"80b fp8 batch {b}: {run}", flush=True)
    del engine, model
    free(device)


def checks(results: dict) -> dict:
    """The issue's goals, each with the figure it is judged on."""
    out = {}
    nine = results.get("9b", {})
    bf16, fp8_auto = nine.get("bf16", {}), nine.get("fp8", {}).get("auto", {})
    for b, goal in ((1, 1.75), (32, 1.4)):
        if b in fp8_auto:
            out[f"fp8 batch {b} >= {goal}x bf16"] = [round(fp8_auto[b]["vs_bf16"], 3), fp8_auto[b]["vs_bf16"] >= goal]
    if 1 in fp8_auto:
        out["fp8 ttft <= bf16 (batch 1)"] = [round(fp8_auto[1]["ttft_vs_bf16"], 3), fp8_auto[1]["ttft_vs_bf16"] <= 1]
    for b, goal in ((32, 75), (64, 70)):
        if b in bf16:
            out[f"bf16 batch {b} >= {goal}% of roofline"] = [round(bf16[b]["roofline_pct"], 1),
                                                           bf16[b]["roofline_pct"] >= goal]
    e = results.get("80b", {})
    if "batch 1" in e:
        pct = e["batch 1"]["weights_only_roofline_pct"]  # its fp8 weight bytes per step over the bandwidth
        out["80b fp8 batch 1 >= 75% of roofline"] = [round(pct, 1), pct >= 75]
    load = results.get("load", {})
    if "gpu_peak_gb" in load:
        out["load gpu peak < 11 GB"] = [round(load["gpu_peak_gb"], 2), load["gpu_peak_gb"] < 11]
    if "host_peak_gb" in load:
        host, goal = load["host_peak_gb"], load["host_goal_gb"]
        out["load host peak < shard + 2 GB"] = [round(host, 2), host < goal]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--products", nargs="+", choices=fp8.PRODUCTS, default=list(fp8.PRODUCTS))
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--bf16-gemm-rows", type=int, nargs="*", default=[], metavar="ROWS",
                        help="bfloat16 decoded again with fused.GEMM_ROWS at each value (0: cuBLAS for every "
                             "product of several rows)")
    parser.add_argument("--gemm-prefetch", type=int, default=fp8_gemm.PREFETCH,
                        help="fp8_gemm.PREFETCH for every product of the Triton GEMM (bfloat16 and fp8)")
    parser.add_argument("--fp8-fusions", nargs="*", default=[], type=fusion_pair,
                        metavar="SN", help="fp8 (auto) decoded again with fused.FP8_SWIGLU and FP8_NORM_TOKENS "
                                           "set by each pair of digits: 00 both off, 01 the norm's tokens only...")
    parser.add_argument("--attention-few", type=power_of_two, nargs=2, action="append", default=[],
                        metavar=("POSITIONS", "WARPS"), help="bf16 and fp8 decoded again with "
                        "kernels.ATTENTION_LAUNCH['few'] set to (cached positions per block, warps); repeatable")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts of the per-matrix timings")
    parser.add_argument("--batch-80b", type=int, default=16)
    parser.add_argument("--new-tokens-80b", type=int)
    parser.add_argument("--skip", nargs="*", default=[], choices=["9b", "load", "80b"])
    parser.add_argument("--dir", help="the 9b-shaped checkpoint (written there if missing)")
    parser.add_argument("--device")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="the checkpoint's shard size")
    parser.add_argument("--small", action="store_true", help="a small config on the CPU: checks the script's steps")
    parser.add_argument("--write-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    fp8_gemm.PREFETCH = args.gemm_prefetch
    small = args.small
    defaults = dict(batches=[1, 2] if small else [1, 8, 32, 64], new_tokens=6 if small else 128,
                    rows=[1, 4] if small else [1, 8, 16, 32, 64, 256], new_tokens_80b=6 if small else 64,
                    dir="/tmp/idefics-small-random" if small else "/tmp/idefics-9b-random",
                    device="cpu" if small else "cuda")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if small:
        global REPEATS
        REPEATS = 1
        args.batch_80b = min(args.batch_80b, 2)
        args.shard_gb = min(args.shard_gb, 0.002)  # several shards of the small checkpoint
    if args.write_child:
        return write_child(args)
    if args.load_child:
        return load_child(args)
    device = torch.device(args.device)
    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "small": small,
               "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "gemm_rows": fused.GEMM_ROWS, "gemm_prefetch": fp8_gemm.PREFETCH}
    bw = bandwidth(device)
    results["bandwidth_tb_s"] = bw / 1e12
    print(f"{results['card']}: copy bandwidth {results['bandwidth_tb_s']:.2f} TB/s", flush=True)
    start = time.perf_counter()
    for name, step in (("9b", nine_b), ("load", load_from_disk), ("80b", eighty_b)):
        if name in args.skip:
            continue
        try:
            step(args, device, bw, results)
        except Exception as e:  # report what ran; the summary says which part failed
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name}: FAILED: {results['errors'][name]}", flush=True)
            free(device)
        if os.environ.get("OUT"):  # a run cut short keeps what it measured
            Path(os.environ["OUT"], "fp8.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = time.perf_counter() - start
    results["checks"] = checks(results)
    print_tables(results)
    print("SUMMARY " + json.dumps(results))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fp8.json").write_text(json.dumps(results, indent=2))
    if results.get("errors"):
        sys.exit(1)


def print_tables(r: dict):
    nine = r.get("9b")
    if nine:
        print(f"\n{r['card']} | {r['date']} | torch {r['torch']} | 9b shape | copy bandwidth "
              f"{r['bandwidth_tb_s']:.2f} TB/s | weights per step (GB): {r['weights_gb_per_step']}")
        print("| weights | product | batch | decode tok/s | vs bf16 | % of roofline (weights + KV) | % weights only "
              "| TTFT ms | vs bf16 | peak GB |\n|---|---|---|---|---|---|---|---|---|---|")
        defaults = f"defaults (gemm rows {r['gemm_rows']})"
        rows = [("bf16", defaults, nine["bf16"])] + [("bf16", k, v) for k, v in nine.items() if k.startswith("gemm")]
        rows += [("fp8", p, v) for p, v in nine["fp8"].items()]
        for weights, product, runs in rows:
            for b, x in runs.items():
                print(f"| {weights} | {product} | {b} | {x['decode_tok_s']:.0f} | {x.get('vs_bf16', 1):.2f}x "
                      f"| {x['roofline_pct']:.0f}% | {x['weights_only_roofline_pct']:.0f}% | {x['ttft_ms']:.1f} "
                      f"| {x.get('ttft_vs_bf16', 1):.2f}x | {x.get('peak_gb', 0):.1f} |")
    mats = r.get("matrices")
    if mats:
        print("\n| matrix x rows | bf16 us | " + " | ".join(f"fp8 {p} us" for p in mats["fp8"]) + " |")
        print("|---|---|" + "---|" * len(mats["fp8"]))
        for key, b in mats["bf16"].items():
            cells = [f"{m[key]['us']:.1f} ({m[key]['tb_s']:.2f} TB/s)" for m in mats["fp8"].values()]
            print(f"| {key} | {b['us']:.1f} ({b['tb_s']:.2f} TB/s) | " + " | ".join(cells) + " |")
    for key in ("fidelity_9b_random", "load", "80b", "checks", "errors"):
        if key in r:
            print(f"\n{key}: {json.dumps(r[key])}")


if __name__ == "__main__":
    main()
