"""Quantized loading on the GPU: idefics-9b-shaped random bfloat16 weights, written once as a sharded safetensors
checkpoint, then loaded through the real shard-by-shard path unquantized and with each quantization method.

    PYTHONPATH=src python bench/quant.py [--methods bf16 int4 nf4 int8 fp4] [--compiled bf16 int4]

Per method: weights in GPU memory after loading, peak GPU memory while loading, peak host memory of the loading
process, batch-1 decode tokens/s through the engine (CUDA graphs where the method allows them), and teacher-forced
logits against bfloat16's: 4 prompts (one image, 20 text tokens) followed by 32 tokens bfloat16 generated, scored
in one forward pass; cosine per position (min and mean) and how often the top token agrees. Two checks say where
a difference comes from: each quantized layer's output against its bfloat16 layer's on random inputs (while
loading), and the logits against those of the bfloat16 model holding the dequantized weights (the layers compute
exactly what their stored weights say when this is ~1). Also: one decoder w13 (4096 -> 2 x 11008) at batch 1,
and the decode speed again with the step under torch.compile (--compiled). Each method runs in its own process
so that host and GPU peaks are its own.

    PYTHONPATH=src python bench/quant.py --demo [--model DIR]

The same fidelity figures on trained weights: the demo model (CPU, float32) scoring held-out prompts of every
task followed by their answers, each method against the unquantized model. Writes the numbers as JSON to $OUT/quant.json when OUT is
set. `--device cpu --small` runs the same steps on a small config (a smoke test without a GPU)."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import random_model, replayed, run_engine, synthetic_prompts  # noqa: E402

from idefics.config import IdeficsConfig, idefics_9b, to_dict  # noqa: E402
from idefics.engine import Engine  # noqa: E402
from idefics.inputs import causal_mask, full_logits, image_features, image_token_mask, positions  # noqa: E402
from idefics.quantize import METHODS, is_target, while_loading  # noqa: E402
from idefics.weights import build_meta, checkpoint_tensors, load_weights, read_tensors, weight_files  # noqa: E402

SHARD_BYTES = 4 * 10**9
GB = 1e9
BACKENDS = {"bf16": "-", "int8": "bitsandbytes LLM.int8()", "nf4": "bitsandbytes nf4", "fp4": "bitsandbytes fp4",
            "int4": "torchao int4 weight-only, tinygemm"}


def config_for(args) -> IdeficsConfig:
    if args.small:
        from cpu import small_config

        return small_config()
    return idefics_9b()


def write_checkpoint(args):
    """Random bfloat16 weights -> config.json, model-0000i-of-0000n.safetensors shards and their index."""
    from safetensors.torch import save_file

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_for(args)
    model = random_model(config, args.device, torch.bfloat16)
    tensors = checkpoint_tensors(model)
    shards, size = [[]], 0
    for name, t in tensors.items():
        if size + t.numel() * t.element_size() > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous().cpu() for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(to_dict(config)))
    print(f"wrote {len(shards)} shards to {out}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def teacher_forced(model, prompts, tokens: list[list[int]]) -> torch.Tensor:
    """Logits (B, S + new, V) of the prompts followed by the given tokens, in one pass with no cache."""
    dev = model.embed.weight.device
    ids = torch.cat([torch.stack([p.ids for p in prompts]), torch.tensor(tokens)], 1).to(dev)
    am = torch.ones_like(ids)
    iam = torch.stack([p.image_mask for p in prompts])
    iam = torch.cat([iam, iam[:, -1:].expand(-1, len(tokens[0]), -1)], 1).to(dev)
    pixels = torch.stack([p.pixels for p in prompts]).to(dev)
    feats = image_features(model, pixels, iam)
    return model(ids, positions(am), causal_mask(am), model.image_kv(feats),
                 image_token_mask(iam, model.config.image_seq_len)).float().cpu()


def decode_speed(engine: Engine, prompts, new_tokens: int, repeats: int = 2) -> float:
    """Batch-1 decode tokens/s over the tokens after the first, best of `repeats` after a warm-up."""
    run_engine(engine, prompts, 4)
    best = min((run_engine(engine, prompts, new_tokens)[1:] for _ in range(repeats)), key=lambda r: r[1] - r[0])
    first, total = best
    return (new_tokens - 1) / (total - first)


def one(args):
    """Load with one method and measure it; prints one RESULT line of JSON."""
    name = args.one
    device = torch.device(args.device)
    config = config_for(args)
    path = Path(args.dir)
    r = {"method": name, "backend": BACKENDS[name]}
    if device.type == "cuda":
        torch.cuda.init()
        r["card"] = torch.cuda.get_device_name()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    model = build_meta(config)
    hook, layer_cos, quantized = None, [], {}
    if name != "bf16":
        quantize_layer = while_loading(model, name, device, torch.bfloat16)

        @torch.no_grad()
        def hook(module_name, module):
            if not is_target(module_name, module, METHODS[name]):
                return
            x = torch.randn(8, module.in_features, device=device, dtype=torch.bfloat16)
            y = module(x).float()
            quantized[module_name] = module.in_features
            quantize_layer(module_name, module)
            y_q = model.get_submodule(module_name)(x).float()
            layer_cos.append(torch.nn.functional.cosine_similarity(y, y_q, dim=-1).mean().item())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_weights(model, read_tensors(weight_files(path)), device, torch.bfloat16, on_module_ready=hook)
    sync(device)
    r["load_s"] = time.perf_counter() - start
    gc.collect()
    r["host_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    r["host_before_load_gb"] = rss_before
    if device.type == "cuda":
        r["load_peak_gb"] = torch.cuda.max_memory_allocated() / GB
        r["weights_gb"] = torch.cuda.memory_allocated() / GB
    if layer_cos:
        r["layers"], r["layer_cosine_min"] = len(layer_cos), min(layer_cos)
        r["layer_cosine_mean"] = sum(layer_cos) / len(layer_cos)
    print(f"{name}: loaded {r}", flush=True)

    graphs = device.type == "cuda" and (name == "bf16" or METHODS[name].graphs)
    prompt = synthetic_prompts(config, 1, seed=1)
    if args.compile:  # the same step through torch.compile (and graphs): decode speed only
        r["decode_tok_s"] = decode_speed(Engine(model, graphs=graphs, compile=True), prompt, args.new_tokens)
        r["mode"] = "CUDA graphs + torch.compile"
        print("RESULT " + json.dumps(r), flush=True)
        return
    if device.type == "cuda":
        try:
            r["w13_us"] = layer_time([layer.mlp.w13 for layer in model.layers], config.hidden_size, graphs)
            print(f"{name}: one decoder w13 at batch 1: {r['w13_us']:.1f} us", flush=True)
        except Exception as e:
            print(f"{name}: w13 timing failed: {e}", flush=True)
    engine = None
    try:
        engine = Engine(model, graphs=graphs)
        r["decode_tok_s"] = decode_speed(engine, prompt, args.new_tokens if graphs else args.eager_tokens)
        r["mode"] = "CUDA graphs" if graphs else "eager"
    except Exception as e:  # a layer the graphs cannot capture: say so, and measure without them
        if not graphs:
            raise
        r["mode"] = f"eager (capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})"
        del engine
        gc.collect()
        engine = Engine(model, graphs=False)
        r["decode_tok_s"] = decode_speed(engine, prompt, args.eager_tokens)
    print(f"{name}: decode {r['decode_tok_s']:.1f} tok/s ({r['mode']})", flush=True)

    prompts = synthetic_prompts(config, 4, seed=2)
    ref_file = path / "bf16_logits.pt"
    if name == "bf16":
        tokens = run_engine(engine, prompts, 32)[0]
        torch.save({"tokens": tokens, "logits": teacher_forced(model, prompts, tokens)}, ref_file)
    else:
        ref = torch.load(ref_file)
        logits = teacher_forced(model, prompts, ref["tokens"])
        cos = cosine(logits, ref["logits"])
        r["cosine_min"], r["cosine_mean"] = cos.min().item(), cos.mean().item()
        r["top1_agree"] = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
        print(f"{name}: teacher-forced cosine min {r['cosine_min']:.4f} mean {r['cosine_mean']:.4f}", flush=True)
        del engine
        dequantize(model, quantized)
        plain = teacher_forced(model, prompts, ref["tokens"])
        r["dequantized_cosine_min"] = cosine(logits, plain).min().item()
        r["dequantized_vs_bf16_cosine_min"] = cosine(plain, ref["logits"]).min().item()
        print(f"{name}: vs its dequantized weights in bfloat16: min cosine {r['dequantized_cosine_min']:.5f}; "
              f"those against bfloat16: {r['dequantized_vs_bf16_cosine_min']:.4f}", flush=True)
    print("RESULT " + json.dumps(r), flush=True)


@torch.inference_mode()
def layer_time(modules, width: int, graphs: bool) -> float:
    """Microseconds per layer at batch 1, each layer once per round (no cache reuse), replayed as a graph."""
    x = torch.randn(1, 1, width, device="cuda", dtype=torch.bfloat16)

    def run():
        for m in modules:
            m(x)

    step = replayed(run) if graphs else run
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (10 * len(modules)) * 1e6


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@torch.no_grad()
def dequantize(model, layers: dict[str, int]):
    """Each quantized layer (name -> input width) -> an nn.Linear holding the weights it computes with: its
    output for the identity."""
    w = model.embed.weight
    for module_name, width in layers.items():
        weight = model.get_submodule(module_name)(torch.eye(width, device=w.device, dtype=w.dtype)).t().contiguous()
        linear = torch.nn.Linear(width, weight.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear)


def demo_fidelity(args):
    """Teacher-forced logits of the demo model (trained weights) with each method against float32."""
    import idefics
    from idefics.demo.evaluate import TASKS, heldout

    items = [heldout(task, i, "mixed") for task in TASKS for i in range(args.demo_prompts)]
    prompts = [prompt + [" " + example.answer] for example, prompt in items]
    plain = idefics.load(args.model, device="cpu")
    batch = plain.process(prompts)
    real = batch["attention_mask"].bool()
    ref = full_logits(plain.model, batch).float()[real]
    print(f"demo model, {len(prompts)} held-out prompts with their answers, {int(real.sum())} positions")
    print("| method | logits cosine to float32, min / mean | top-1 agrees |\n|---|---|---|")
    for name in [m for m in args.methods if m in METHODS and "cpu" in METHODS[m].devices]:
        model = idefics.load(args.model, device="cpu", quantize=name).model
        logits = full_logits(model, batch).float()[real]
        cos = cosine(logits, ref)
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {name} | {cos.min().item():.4f} / {cos.mean().item():.4f} | {100 * agree:.1f}% |", flush=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in ("bitsandbytes", "torchao"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["bf16", "int4", "nf4", "int8", "fp4"],
                        choices=["bf16", *METHODS])
    parser.add_argument("--dir", default="/tmp/idefics-9b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small config instead of idefics-9b's")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eager-tokens", type=int, default=32, help="new tokens when decoding without graphs")
    parser.add_argument("--compiled", nargs="*", default=["bf16", "int4"], choices=["bf16", *METHODS],
                        help="methods measured again with the decode step under torch.compile")
    parser.add_argument("--compile-timeout", type=int, default=150)
    parser.add_argument("--demo", action="store_true", help="fidelity on the demo model's trained weights (CPU)")
    parser.add_argument("--model", help="with --demo: a checkpoint directory instead of the shipped demo model")
    parser.add_argument("--demo-prompts", type=int, default=8, help="with --demo: held-out prompts per task")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        return write_checkpoint(args)
    if args.one:
        return one(args)
    if args.demo:
        return demo_fidelity(args)

    passed = ["--dir", args.dir, "--device", args.device, "--new-tokens", str(args.new_tokens),
              "--eager-tokens", str(args.eager_tokens)] + (["--small"] if args.small else [])
    if not (Path(args.dir) / "model.safetensors.index.json").exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write", *passed], check=True)
        print(f"checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
    results = {"date": datetime.date.today().isoformat(), "versions": versions(), "methods": {}}
    runs = [(name, []) for name in args.methods] + [(name, ["--compile"]) for name in args.compiled or []]
    for name, extra in runs:
        key = name + (" compiled" if extra else "")
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name, *extra, *passed], capture_output=True,
                                  text=True, timeout=args.compile_timeout if extra else None)
        except subprocess.TimeoutExpired:
            print(f"{key}: not measured: over {args.compile_timeout} s", flush=True)
            results["methods"][key] = {"method": key, "backend": BACKENDS[name],
                                       "error": f"compiling took over {args.compile_timeout} s"}
            continue
        sys.stdout.write(proc.stdout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{key}: FAILED: {err}\n{proc.stderr[-3000:]}", flush=True)
            results["methods"][key] = {"method": key, "backend": BACKENDS[name], "error": err}
            continue
        results["methods"][key] = r = json.loads(lines[-1][len("RESULT "):])
        results.setdefault("card", r.get("card"))
        if os.environ.get("OUT"):  # after each method: a run cut short keeps what it measured
            Path(os.environ["OUT"], "quant.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict):
    m = results["methods"]
    print(f"\n{results.get('card') or 'CPU'} | {results['date']} | {results['versions']}")
    print("| method | backend | weights GB | peak GPU while loading GB | peak host GB | load s | decode tok/s (batch 1) "
          "| vs bf16 (same mode) | mode | w13 at batch 1, us | logits cosine to bf16, min / mean | top-1 agrees | layer output cosine, min / mean "
          "| logits cosine to own dequantized weights, min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in m.items():
        if "error" in r:
            print(f"| {name} | {r['backend']} | failed: {r['error']} |" + " |" * 11)
            continue
        speed = r["decode_tok_s"]
        base = m.get("bf16 compiled" if name.endswith("compiled") else "bf16", {}).get("decode_tok_s")
        cells = [name, r["backend"], f"{r.get('weights_gb', 0):.2f}", f"{r.get('load_peak_gb', 0):.2f}",
                 f"{r['host_peak_gb']:.1f}", f"{r['load_s']:.0f}", f"{speed:.1f}",
                 f"{speed / base:.2f}x" if base else "-", r["mode"], f"{r['w13_us']:.1f}" if "w13_us" in r else "-",
                 f"{r['cosine_min']:.4f} / {r['cosine_mean']:.4f}" if "cosine_min" in r else "1 (reference)",
                 f"{100 * r['top1_agree']:.1f}%" if "top1_agree" in r else "-",
                 f"{r['layer_cosine_min']:.4f} / {r['layer_cosine_mean']:.4f}" if "layers" in r else "-",
                 f"{r['dequantized_cosine_min']:.5f}" if "dequantized_cosine_min" in r else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
