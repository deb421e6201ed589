"""Shared pieces of the benchmarks: random checkpoints of a given shape, synthetic prompts, timers."""
from __future__ import annotations

import argparse
import time

import torch
from transformers.generation.streamers import BaseStreamer

from idefics import parallel
from idefics.config import IdeficsConfig, to_dict
from idefics.engine import Engine, Prompt
from idefics.graphs import Graphs
from idefics.model import IdeficsModel
from idefics.sampling import GenerationOptions
from idefics.scheduler import Request, Scheduler
from idefics.weights import build_meta, checkpoint_tensors


def power_of_two(value: str) -> int:
    """A flag's launch size (cached positions per block, warps): Triton's blocks and warps are powers of 2."""
    n = int(value) if value.isdigit() else 0
    if n < 1 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{value!r}: a power of 2")
    return n


def random_model(config: IdeficsConfig, device, dtype, seed: int = 0, rank: int = 0, ranks: int = 1) -> IdeficsModel:
    """Our model with random weights at the reference's init scale, gates opened (no download needed). With
    ranks > 1: tensor-parallel rank `rank`'s shard of it alone, with its all-reduces (parallel.py)."""
    torch.manual_seed(seed + rank)
    model = parallel.shard(build_meta(config), rank, ranks)
    for module_name, module in list(model.named_modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            t = random_tensor(module_name, name, p.shape, dtype, device)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    model.reset_buffers()
    return (parallel.add_reduces(model) if ranks > 1 else model).eval()


def random_engine(rank: int, ranks: int, device, config: IdeficsConfig, dtype) -> Engine:
    """A worker rank's engine over a random shard (ranks.Team's build function)."""
    return Engine(random_model(config, device, dtype, rank=rank, ranks=ranks))


def random_tensor(module_name: str, name: str, shape, dtype, device) -> torch.Tensor:
    """Parameter `name` of module `module_name` as random_model draws it."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if "norm" in module_name.rsplit(".", 1)[-1] and name == "weight":
        return t.fill_(1.0)
    if name == "bias":
        return t.zero_()
    if "gate" in name:
        return t.fill_(0.5)
    return t.normal_(0, 0.02)


def reference_from(model: IdeficsModel):
    """transformers' model holding the same weights, built directly on the device (its buffers initialised)."""
    from transformers import IdeficsConfig as ReferenceConfig, IdeficsForVisionText2Text

    w = model.embed.weight
    config = ReferenceConfig(**to_dict(model.config))
    default = torch.get_default_dtype()
    torch.set_default_dtype(w.dtype)
    try:
        with torch.device(w.device):
            ref = IdeficsForVisionText2Text(config)
    finally:
        torch.set_default_dtype(default)
    ref.load_state_dict(checkpoint_tensors(model), strict=True)
    return ref.eval()


def synthetic_prompts(config: IdeficsConfig, batch: int, text_tokens: int = 20, seed: int = 0) -> list[Prompt]:
    """BOS, one image, then `text_tokens` random text tokens; a different random image per prompt."""
    g = torch.Generator().manual_seed(seed)
    fake, image = config.vocab_size, config.vocab_size + 1  # <fake_token_around_image>, <image>
    prompts = []
    for _ in range(batch):
        text = torch.randint(3, config.vocab_size, (text_tokens,), generator=g)
        ids = torch.cat([torch.tensor([1, fake, image, fake]), text])
        mask = torch.zeros(ids.shape[0], 1, dtype=torch.long)
        mask[2:] = 1  # from the <image> token on, every token sees the image
        pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, generator=g)
        prompts.append(Prompt(ids, pixels, mask))
    return prompts


def reference_inputs(prompts: list[Prompt], device) -> dict[str, torch.Tensor]:
    """The same prompts as the reference's padded batch (they all have the same length)."""
    return {
        "input_ids": torch.stack([p.ids for p in prompts]).to(device),
        "attention_mask": torch.ones(len(prompts), prompts[0].ids.shape[0], dtype=torch.long, device=device),
        "pixel_values": torch.stack([p.pixels for p in prompts]).to(device),
        "image_attention_mask": torch.stack([p.image_mask for p in prompts]).to(device),
    }


def forced(new_tokens: int) -> GenerationOptions:
    """Greedy, exactly `new_tokens` tokens: no eos, nothing banned."""
    return GenerationOptions.make(max_new_tokens=new_tokens, eos_token_id=[], banned_token_ids=[])


def run_engine(engine: Engine, prompts: list[Prompt], new_tokens: int) -> tuple[list[list[int]], float, float]:
    """-> (tokens per prompt, seconds to the first token, seconds in all). Each first token is read on the host,
    so the clock stops after the device has produced it."""
    engine.encoder.cache.clear()  # time the image encoding too
    sync()
    start = time.perf_counter()
    scheduler = Scheduler(engine, tokenizer=None, max_batch=len(prompts))
    requests = [Request.make(p, forced(new_tokens), None, engine.model.config.max_position_embeddings)
                for p in prompts]
    for r in requests:
        scheduler.add(r)
    first = None
    while scheduler.busy:
        scheduler.step()
        first = first or time.perf_counter()
    sync()
    return [r.generated for r in requests], first - start, time.perf_counter() - start


class FirstTokenClock(BaseStreamer):
    """A transformers streamer that notes when the first generated token reaches the host."""

    def __init__(self):
        super().__init__()
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            sync()
            self.first = time.perf_counter()

    def end(self):
        pass


def run_reference(ref, prompts: list[Prompt], new_tokens: int) -> tuple[list[list[int]], float, float]:
    inputs = reference_inputs(prompts, ref.device)
    clock = FirstTokenClock()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, streamer=clock)
    sync()
    return out[:, inputs["input_ids"].shape[1]:].tolist(), clock.first - start, time.perf_counter() - start


def replayed(fn):
    """fn captured once as a CUDA graph (the engine's Graphs: warmed up on a side stream first) -> a function that
    replays it."""
    graphs = Graphs()
    return lambda: graphs.run("bench", fn)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, sync: bool = True) -> tuple[float, object]:
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def decoding(engine: Engine, batch: int) -> torch.Tensor:
    """engine running `batch` synthetic prompts (room for 160 tokens each), three decode steps in (kernels compiled,
    graphs captured) -> the tokens to feed each further step."""
    engine.reserve(batch, 160, 1)
    engine.prefill_batch(synthetic_prompts(engine.model.config, batch))
    tokens = torch.zeros(batch, dtype=torch.long)
    for _ in range(3):
        engine.decode(tokens)
    return tokens


def step_seconds(engine: Engine, tokens: torch.Tensor, steps: int = 20, repeats: int = 1) -> float:
    """Seconds per decode step over `steps` steps, the best of `repeats` runs."""
    return min(timed(lambda: [engine.decode(tokens) for _ in range(steps)])[0] for _ in range(repeats)) / steps
