"""The HTTP server under load, on idefics-9b-shaped random bfloat16 weights (GPU), through the official openai client.

    PYTHONPATH=src python bench/serve.py --out results.json [--concurrency 1 8 32 64] [--new-tokens 128]
        [--seconds 20]

A worker process builds the model (random weights, a 32000-token tokenizer written here: no download), measures
the engine's offline throughput on the server's own workload (64 requests submitted at once to the engine thread,
no HTTP), then serves it on 127.0.0.1. This process drives it with AsyncOpenAI at each concurrency for --seconds:
every client sends streaming chat requests, one new 224x224 image each (a data URI) and a short question, exactly
--new-tokens tokens back (min_tokens = max_tokens). Reported per concurrency: generated tokens/s, time to first
token p50/p99 (request sent -> first text), inter-token p50/p99 (between text chunks of a stream), and at 64 the
ratio to the offline tokens/s; TTFT p50 at concurrency 1 is the one-image latency. --shape tiny runs the demo
model on the CPU (a smoke test of this script)."""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

QUESTION = "Describe this image in detail."
MODEL = "idefics-9b-random"


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A Llama-style tokenizer of vocab_size ids (bytes, characters, filler words), <fake_token_around_image> and
    <image> after them, as the 9b's."""
    from tokenizers import AddedToken, Tokenizer, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"▁w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    specials = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>"]
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "legacy": False, "padding_side": "left"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": specials[3:]}))
    return path


def random_images(n: int, size: int = 224, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # blocky: a PNG of a few KB
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def build(shape: str, device: str, directory: Path):
    """The 9b's shape with random weights and a written tokenizer, or ("tiny") the demo model itself."""
    import torch

    import idefics
    from common import random_model
    from idefics.config import idefics_9b
    from idefics.images import ImageTransform
    from idefics.processor import Processor
    from idefics.tokenizer import Tokenizer

    if shape == "tiny":
        return idefics.load(device=device)
    config = idefics_9b()
    model = random_model(config, device, torch.bfloat16)
    tokenizer = Tokenizer.from_dir(write_tokenizer(directory, config.vocab_size))
    processor = Processor(tokenizer, ImageTransform(image_size=config.vision.image_size))
    return idefics.api.Idefics(model, tokenizer, processor, directory)


def offline(m, images: list[str], batch: int, new_tokens: int) -> dict:
    """The server's workload without HTTP: `batch` chat requests of one image each, submitted at once to the engine
    thread; best of two runs (the first also sizes the buffers and captures the graphs)."""
    from idefics.images import load_image
    from idefics.sampling import GenerationOptions
    from idefics.scheduler import Request
    from idefics.server.prompt import PromptBuilder

    builder = PromptBuilder(m)
    options = GenerationOptions.make(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    context = m.config.max_position_embeddings
    prompts = [builder.build(builder.chat([("user", [load_image(images[i]), QUESTION])])) for i in range(batch)]
    best = None
    for _ in range(2):
        m.engine.encoder.cache.clear()
        requests = [Request.make(p, options, m.tokenizer, context) for p in prompts]
        start = time.perf_counter()
        for r, sink in zip(requests, m.loop.submit(requests)):
            for _ in m.loop.outputs(sink, r.id):
                pass
        seconds = time.perf_counter() - start
        tokens = sum(len(r.generated) for r in requests)
        best = max(best or 0, tokens / seconds)
    return {"batch": batch, "new_tokens": new_tokens, "tokens_per_s": best, "prompt_tokens": int(prompts[0].ids.shape[0])}


def worker(args):
    from idefics.server.app import server
    from idefics.server.settings import Settings

    directory = Path(args.dir)
    m = build(args.shape, args.device, directory / "tokenizer")
    m.scheduler.max_batch = max(args.concurrency)
    result = offline(m, random_images(max(args.concurrency), seed=1), max(args.concurrency), args.new_tokens)
    (directory / "offline.json").write_text(json.dumps(result))
    settings = Settings(model_name=MODEL, max_concurrent=max(args.concurrency), max_tokens=args.new_tokens)
    server(m, settings, port=args.port, log_level="warning").run()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def drive(url: str, clients: int, seconds: float, new_tokens: int, images: list[str], offset: int) -> dict:
    import httpx
    import openai

    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                           http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=clients)))
    ttft, gaps, tokens, failed = [], [], 0, []
    start = time.perf_counter()
    end = start + seconds

    async def one(k: int):
        nonlocal tokens
        i = k
        while time.perf_counter() < end:
            image = images[(offset + i) % len(images)]
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                     {"type": "text", "text": QUESTION}]}]
            sent = time.perf_counter()
            first = last = None
            try:
                stream = await c.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=new_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_body={"min_tokens": new_tokens})
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            ttft.append(now - sent)
                        else:
                            gaps.append(now - last)
                        last = now
            except Exception as e:  # reported, not raised
                failed.append(repr(e))
            i += clients

    await asyncio.gather(*(one(k) for k in range(clients)))
    elapsed = time.perf_counter() - start
    await c.close()
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"concurrency": clients, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "requests": len(ttft), "failed": len(failed), "first_failure": failed[0] if failed else None,
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "inter_token_p50_ms": ms(percentile(gaps, 50)), "inter_token_p99_ms": ms(percentile(gaps, 99))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency")
    parser.add_argument("--shape", choices=["9b", "tiny"], default="9b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if args.shape == "9b" else "cpu")
    if args.worker:
        return worker(args)

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="idefics-bench-serve-"))
    command = [sys.executable, __file__, "--worker", "--port", str(port), "--dir", str(directory), "--shape",
               args.shape, "--device", args.device, "--new-tokens", str(args.new_tokens), "--concurrency",
               *map(str, args.concurrency)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent / "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 1800
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server process ended with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not start")
            time.sleep(1)
        base = json.loads((directory / "offline.json").read_text())
        images = random_images(2048, size=224, seed=2)
        runs = []
        for i, clients in enumerate(args.concurrency):
            asyncio.run(drive(url, clients, 2.0, args.new_tokens, images, offset=1500))  # warm: connections
            result = asyncio.run(drive(url, clients, args.seconds, args.new_tokens, images, offset=i * 300))
            runs.append(result)
            print(json.dumps(result), flush=True)
        top = max(runs, key=lambda r: r["concurrency"])
        results = {
            "model": "idefics-9b shape, random bfloat16 weights" if args.shape == "9b" else "the demo model",
            "new_tokens": args.new_tokens, "offline": base, "server": runs,
            "ratio_at_max_concurrency": round(top["tokens_per_s"] / base["tokens_per_s"], 3),
            "ttft_one_image_c1_p50_ms": next((r["ttft_p50_ms"] for r in runs if r["concurrency"] == 1), None),
        }
        try:
            import torch

            results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except Exception:
            pass
        print(json.dumps({k: v for k, v in results.items() if k != "server"}, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
