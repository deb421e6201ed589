"""Processed batch (the reference processor's tensors) -> the decoder's inputs."""
from __future__ import annotations

import torch

from idefics.model import IdeficsModel
from idefics.runtime import model_work


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 -> RoPE positions counting real tokens only; padding gets 1 (as the reference)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, 1, S, S) bool: causal, padding keys hidden. Every query keeps its own key so padding rows stay
    finite (their outputs are never used)."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(s, dtype=torch.bool, device=attention_mask.device)
    return ((causal & attention_mask.bool()[:, None, :]) | eye)[:, None]


def image_features(model: IdeficsModel, pixel_values: torch.Tensor, image_attention_mask: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, N, 3, H, W) -> features (B, N * T_img, D_img). Only images some token attends to are
    encoded; the padding slots stay zero (no token can see them)."""
    b, n = pixel_values.shape[:2]
    c = model.config
    feats = torch.zeros(b, n, c.image_seq_len, c.image_dim, dtype=model.embed.weight.dtype, device=model.embed.weight.device)
    used = image_attention_mask.bool().any(dim=1)  # (B, N)
    if used.any():
        # The mask indexes the pixels where they are (the host, usually) and the features on the model's device.
        pixels = pixel_values[used.to(pixel_values.device)].to(device=feats.device, dtype=feats.dtype)
        feats[used.to(feats.device)] = model.encode_images(pixels)
    return feats.view(b, n * c.image_seq_len, c.image_dim)


def image_token_mask(image_attention_mask: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """(B, S, N) one-hot image per text token -> (B, S, N * T_img) bool over image tokens."""
    return image_attention_mask.bool().repeat_interleave(image_seq_len, dim=-1)


@model_work
def full_logits(model: IdeficsModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at every position of a processed batch, (B, S, V), no cache."""
    device = model.embed.weight.device
    ids = batch["input_ids"].to(device)
    am = batch["attention_mask"].to(device)
    iam = batch["image_attention_mask"].to(device)
    feats = image_features(model, batch["pixel_values"], iam)
    return model(ids, positions(am), causal_mask(am), model.image_kv(feats),
                 image_token_mask(iam, model.config.image_seq_len))
