"""Train the demo model from a seed: `python -m idefics.demo.train --seed 0 --out DIR` writes a checkpoint directory
in the hub's layout (config.json, model.safetensors, tokenizer files, preprocessor_config.json).

The shipped checkpoint took 5.5 minutes on one H200 (1.4M examples, about 4,200 a second, drawn by 15 CPU worker
processes that kept ahead of it). A 2-core CPU manages about 25 examples a second: some 15 hours. Data and
initialization follow from the seed; GPU arithmetic is not bit-for-bit repeatable."""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from idefics.config import IdeficsConfig, PerceiverConfig, VisionConfig, to_dict
from idefics.demo import data, evaluate, scene_head
from idefics.demo.batches import IGNORE, Batches, Encoder
from idefics.demo.vocab import build_tokenizer
from idefics.images import IDEFICS_MEAN, IDEFICS_STD
from idefics.inputs import causal_mask, image_token_mask, positions
from idefics.model import IdeficsModel
from idefics.tokenizer import Tokenizer
from idefics.weights import checkpoint_tensors

IMAGE_SIZE = 96
# The released checkpoint's run: --minutes 5.6 on one H200 chose 5435 steps of 256 examples.
STEPS = 5435
WARMUP = 300
HEAD_WEIGHT = 0.5  # of the training-only heads' losses (scene_head), beside the answers' loss


def demo_config(vocab_size: int) -> IdeficsConfig:
    """About 7M parameters: a 4-layer ViT on 12x12 patches of 8 pixels, 32 perceiver latents, a 4-layer decoder
    with a gated cross-attention block before layers 0 and 2."""
    return IdeficsConfig(
        vocab_size=vocab_size, additional_vocab_size=3, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=512, cross_layer_interval=2,
        qk_layer_norms=True, use_resampler=True,
        vision=VisionConfig(embed_dim=160, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=640, hidden_act="gelu"),
        perceiver=PerceiverConfig(n_latents=32, depth=2, n_heads=4, head_dim=40, qk_layer_norms=True),
    )


def write_files(out: Path, seed: int) -> IdeficsConfig:
    """Tokenizer, preprocessor_config.json and config.json; the weights come at the end."""
    build_tokenizer(out, seed)
    preprocessor = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                    "image_mean": list(IDEFICS_MEAN), "image_num_channels": 3,
                    "image_processor_type": "IdeficsImageProcessor", "image_size": IMAGE_SIZE,
                    "image_std": list(IDEFICS_STD), "processor_class": "IdeficsProcessor", "resample": 3,
                    "rescale_factor": 1 / 255, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    tokenizer = Tokenizer.from_dir(out)
    config = demo_config(tokenizer.vocab_size - 3)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    return config


def initialise(model: IdeficsModel) -> None:
    """GPT-style init: N(0, 0.02), residual outputs scaled down by depth; gates half open so that the decoder
    reads the image from the first step (the reference starts them shut)."""
    depth = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
            elif "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("wo.weight", "w2.weight", "fc2.weight", "proj.weight")):
                p.normal_(0, 0.02 / math.sqrt(2 * depth))
            else:
                p.normal_(0, 0.02)


def pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    """(M, H, W, 3) uint8 -> (M, 3, H, W) float32, rescaled and normalized as the processor does."""
    x = pixels.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IDEFICS_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IDEFICS_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def forward(model: IdeficsModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference path (idefics.inputs) with gradients, each distinct image encoded once:
    -> logits (B, S, V), the vision tower's tokens (M, 1 + P, D) and the image features (M, T, D)."""
    c = model.config
    tokens = model.vision(pixel_values(batch["pixels"]))  # (M, 1 + P, D)
    feats = model.perceiver(tokens)  # (M, T, D)
    slots = batch["slots"]
    b, n = slots.shape
    images = feats.new_zeros(b, n, c.image_seq_len, c.image_dim)
    images[slots >= 0] = feats[slots[slots >= 0]]
    am, iam = batch["attention_mask"], batch["image_attention_mask"]
    kv = model.image_kv(images.view(b, n * c.image_seq_len, c.image_dim))
    logits = model(batch["input_ids"], positions(am), causal_mask(am), kv, image_token_mask(iam, c.image_seq_len))
    return logits, tokens, feats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


@torch.no_grad()
def heldout_exact(model: IdeficsModel, encoder: Encoder, device: torch.device, suite: str, scenes: int = 200) -> dict:
    """task -> share of held-out examples whose every answer token is the argmax given the right prefix: what
    greedy decoding scores on exact answers."""
    model.eval()
    results = {}
    for task in evaluate.TASKS:
        rows = [encoder.encode(data.Example(task, prompt, example.answer))
                for example, prompt in (evaluate.heldout(task, i, suite) for i in range(scenes))]
        hits = 0
        for start in range(0, len(rows), 100):
            batch = to_device(encoder.collate(rows[start:start + 100]), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                predicted = forward(model, batch)[0].argmax(-1)
            t = batch["targets"]
            hits += int(((predicted == t) | (t == IGNORE)).all(dim=1).sum())
        results[task] = hits / len(rows)
    model.train()
    return results


def save(model: IdeficsModel, out: Path) -> None:
    """The weights under the hub checkpoints' names, in float16."""
    tensors = {k: v.to("cpu", torch.float16).contiguous() for k, v in checkpoint_tensors(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def fit(model: IdeficsModel, out: Path, args, device: torch.device, workers: int) -> None:
    """The training loop: answers' loss plus the training-only heads' (scene_head), AdamW, warmup then cosine."""
    config = model.config
    heads = [scene_head.SceneHead(config.image_dim).to(device).train(),
             scene_head.PatchHead(config.vision.embed_dim).to(device).train()]
    named = list(model.named_parameters()) + [(f"heads.{i}.{n}", p) for i, h in enumerate(heads)
                                              for n, p in h.named_parameters()]
    params = [p for _, p in named]
    decay = [p for n, p in named if p.dim() >= 2]
    keep = [p for n, p in named if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": keep, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    limit = args.steps if args.minutes is None else 10 ** 6
    loader = torch.utils.data.DataLoader(
        Batches(out, args.seed, args.batch, 0, limit), batch_size=None, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=6 if workers else None, persistent_workers=False)
    total, start, seen, timed_from, waited = args.steps, time.time(), 0, None, 0.0
    running = torch.zeros(3, device=device)  # losses summed since the last report, kept on the device
    fetched = start
    model.train()
    for step, batch in enumerate(loader):
        if step == 300:
            timed_from = time.time()
        if args.minutes is not None and step == 600:
            # Steps that fit the budget, at the speed of steps 300..600 (the data workers are up to speed).
            rate = 300 / (time.time() - timed_from)
            total = max(600, int(600 + rate * (args.minutes * 60 - (time.time() - start))))
            print(f"{rate:.1f} steps/s: training for {total} steps", flush=True)
        if step >= total:
            break
        lr = learning_rate(step, total, args.lr, WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        waited += time.time() - fetched
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out_logits, tokens, feats = forward(model, batch)
            labels = batch["labels"]
            scene_loss = heads[0].loss(feats, labels[:, :scene_head.HEADS])
            patch_loss = heads[1].loss(tokens, labels[:, scene_head.HEADS:])
        loss = F.cross_entropy(out_logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        (loss + HEAD_WEIGHT * (scene_loss + patch_loss)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seen += batch["input_ids"].shape[0]
        running += torch.stack([loss.detach(), scene_loss.detach(), patch_loss.detach()])
        if (step + 1) % 100 == 0 or step == total - 1:
            answer_avg, scene_avg, patch_avg = (running / (step % 100 + 1)).tolist()
            print(f"step {step + 1:6d}  loss {answer_avg:.4f}  scene {scene_avg:.4f}  patches {patch_avg:.4f}  "
                  f"lr {lr:.2e}  {seen / (time.time() - start):.0f} examples/s  waited for data {waited:.0f}s  "
                  f"{time.time() - start:.0f}s", flush=True)
            running.zero_()
        if step + 1 == int(0.8 * total):
            save(model, out)  # a usable checkpoint should the run be cut short
        fetched = time.time()
    print(f"trained {total} steps, {seen} examples in {time.time() - start:.0f}s", flush=True)
    save(model, out)


def train(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = write_files(out, args.seed)
    torch.manual_seed(args.seed)
    model = IdeficsModel(config)
    initialise(model)
    model.to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}", flush=True)
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    fit(model, out, args, device, workers)
    print(f"saved {out / 'model.safetensors'}", flush=True)
    if args.check:
        encoder = Encoder(out)
        for suite in ("train", "other"):
            check = heldout_exact(model, encoder, device, suite, args.check)
            print(f"held-out exact answers, suite {suite}, {args.check} per task (teacher-forced): "
                  + "  ".join(f"{task} {acc:.3f}" for task, acc in check.items()), flush=True)
    return out


def main(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data workers are forked processes
    parser = argparse.ArgumentParser(prog="python -m idefics.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--minutes", type=float, help="train for about this long instead of --steps")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, help="data workers (default: CPU count - 1)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--check", type=int, default=100, help="held-out examples per task for the final check")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
