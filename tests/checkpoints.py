"""Tiny random IDEFICS checkpoints written by transformers' save_pretrained, with their tokenizer and processor."""
from __future__ import annotations

from pathlib import Path

import torch

from helpers import make_processor_dir

BASE_VOCAB = 600  # make_tokenizer_dir's trained vocabulary; the image tokens (and <end_of_utterance>) follow it


def tiny_config(**overrides) -> dict:
    """A reference config small enough for CPU tests; every branch is reachable through `overrides`."""
    vision = dict(embed_dim=24, image_size=30, patch_size=10, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=40, hidden_act="gelu")
    perceiver = dict(use_resampler=True, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=2,
                     resampler_head_dim=8, qk_layer_norms_perceiver=True)
    vision.update(overrides.pop("vision", {}))
    perceiver.update(overrides.pop("perceiver", {}))
    config = dict(vocab_size=BASE_VOCAB, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=True,
                  use_resampler=perceiver["use_resampler"], rms_norm_eps=1e-6, max_position_embeddings=256,
                  vision_config=vision, perceiver_config=perceiver)
    config.update(overrides)
    return config


def reference_model(seed: int = 0, **overrides):
    """transformers' IdeficsForVisionText2Text with random weights at unit scale (the reference's 0.02 init leaves
    images with almost no effect), its gates opened (the reference initialises them to zero, which would hide every
    cross-attention difference) and norms away from one."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(IdeficsConfig(**tiny_config(**overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "embed" in name and p.dim() == 2:
                p.normal_(0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)  # unit-variance outputs
    return model


def make_checkpoint(path, *, instruct: bool = False, seed: int = 0, weights: str = "safetensors",
                    max_shard_size: str | None = "40KB", layout: str = "saved", **overrides) -> tuple[Path, object]:
    """Write a full checkpoint directory (config, weights, processor files) -> (path, reference). layout: that of
    the processor files (helpers.make_processor_dir); "hub" has the hub's `"legacy": true` tokenizer config."""
    path = Path(path)
    if instruct:
        overrides.setdefault("additional_vocab_size", 3)
    model = reference_model(seed, **overrides)
    if weights == "bin":  # the older format some fine-tunes still ship
        path.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        model.config.save_pretrained(str(path))
    else:
        model.save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    make_processor_dir(path, instruct=instruct, image_size=model.config.vision_config.image_size, layout=layout,
                       **({"legacy": True} if layout == "hub" else {}))
    return path, model
