"""Checkpoint tensors -> our parameters: one name table, a meta-device build, tensors assigned as they are read.

Fused parameters (q/k/v, gate/up, base/additional vocabulary) are filled slice by slice, so a tensor may come
from any shard in any order; every parameter must be covered exactly once."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from idefics.config import IdeficsConfig
from idefics.errors import IdeficsError
from idefics.model import IdeficsModel


class WeightsError(IdeficsError):
    pass


# (checkpoint name pattern, our name template, slot). A slot says which rows of our parameter the tensor fills:
# None for all of it, ("part", i, n) for the i-th of n equal row blocks, "base" / "extra" for the two vocabularies.
_V = r"model\.vision_model\."
_P = r"model\.perceiver_resampler\.blocks\.(\d+)\."
_X = r"model\.gated_cross_attn_layers\.(\d+)\."
_L = r"model\.layers\.(\d+)\."
_TABLE: list[tuple[str, str, object]] = [
    (r"model\.embed_tokens\.weight", "embed.weight", "base"),
    (r"model\.embed_tokens\.additional_embedding\.weight", "embed.weight", "extra"),
    (r"lm_head\.weight", "lm_head.weight", "base"),
    (r"lm_head\.additional_fc\.weight", "lm_head.weight", "extra"),
    (r"model\.norm\.weight", "norm.weight", None),
    (_L + r"self_attn\.q_proj\.weight", "layers.{0}.attn.wqkv.weight", ("part", 0, 3)),
    (_L + r"self_attn\.k_proj\.weight", "layers.{0}.attn.wqkv.weight", ("part", 1, 3)),
    (_L + r"self_attn\.v_proj\.weight", "layers.{0}.attn.wqkv.weight", ("part", 2, 3)),
    (_L + r"self_attn\.o_proj\.weight", "layers.{0}.attn.wo.weight", None),
    (_L + r"mlp\.gate_proj\.weight", "layers.{0}.mlp.w13.weight", ("part", 0, 2)),
    (_L + r"mlp\.up_proj\.weight", "layers.{0}.mlp.w13.weight", ("part", 1, 2)),
    (_L + r"mlp\.down_proj\.weight", "layers.{0}.mlp.w2.weight", None),
    (_L + r"input_layernorm\.weight", "layers.{0}.attn_norm.weight", None),
    (_L + r"post_attention_layernorm\.weight", "layers.{0}.mlp_norm.weight", None),
    (_X + r"cross_attn\.q_proj\.weight", "{X}.attn.wq.weight", None),
    (_X + r"cross_attn\.k_proj\.weight", "{X}.attn.wkv.weight", ("part", 0, 2)),
    (_X + r"cross_attn\.v_proj\.weight", "{X}.attn.wkv.weight", ("part", 1, 2)),
    (_X + r"cross_attn\.o_proj\.weight", "{X}.attn.wo.weight", None),
    (_X + r"cross_attn\.q_layer_norm\.weight", "{X}.attn.q_norm.weight", None),
    (_X + r"cross_attn\.k_layer_norm\.weight", "{X}.attn.k_norm.weight", None),
    (_X + r"mlp\.gate_proj\.weight", "{X}.mlp.w13.weight", ("part", 0, 2)),
    (_X + r"mlp\.up_proj\.weight", "{X}.mlp.w13.weight", ("part", 1, 2)),
    (_X + r"mlp\.down_proj\.weight", "{X}.mlp.w2.weight", None),
    (_X + r"input_layernorm\.weight", "{X}.attn_norm.weight", None),
    (_X + r"post_attention_layernorm\.weight", "{X}.mlp_norm.weight", None),
    (_X + r"alpha_cross_attn", "{X}.attn_gate", None),
    (_X + r"alpha_dense", "{X}.mlp_gate", None),
    (_V + r"embeddings\.class_embedding", "vision.class_embed", None),
    (_V + r"embeddings\.patch_embedding\.weight", "vision.patch_embed.weight", None),
    (_V + r"embeddings\.position_embedding\.weight", "vision.pos_embed", None),
    (_V + r"pre_layrnorm\.(weight|bias)", "vision.pre_norm.{0}", None),
    (_V + r"post_layernorm\.(weight|bias)", "vision.post_norm.{0}", None),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "vision.layers.{0}.wqkv.{1}", ("part", 0, 3)),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "vision.layers.{0}.wqkv.{1}", ("part", 1, 3)),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "vision.layers.{0}.wqkv.{1}", ("part", 2, 3)),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "vision.layers.{0}.wo.{1}", None),
    (_V + r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", "vision.layers.{0}.norm1.{1}", None),
    (_V + r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", "vision.layers.{0}.norm2.{1}", None),
    (_V + r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "vision.layers.{0}.fc1.{1}", None),
    (_V + r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "vision.layers.{0}.fc2.{1}", None),
    (r"model\.perceiver_resampler\.latents", "perceiver.latents", None),
    (r"model\.perceiver_resampler\.layer_norm\.(weight|bias)", "perceiver.norm.{0}", None),
    (_P + r"0\.context_layer_norm\.(weight|bias)", "perceiver.attn.{0}.context_norm.{1}", None),
    (_P + r"0\.latents_layer_norm\.(weight|bias)", "perceiver.attn.{0}.latents_norm.{1}", None),
    (_P + r"0\.q_layer_norm\.(weight|bias)", "perceiver.attn.{0}.q_norm.{1}", None),
    (_P + r"0\.k_layer_norm\.(weight|bias)", "perceiver.attn.{0}.k_norm.{1}", None),
    (_P + r"0\.q_proj\.weight", "perceiver.attn.{0}.wq.weight", None),
    (_P + r"0\.k_proj\.weight", "perceiver.attn.{0}.wkv.weight", ("part", 0, 2)),
    (_P + r"0\.v_proj\.weight", "perceiver.attn.{0}.wkv.weight", ("part", 1, 2)),
    (_P + r"0\.output_proj\.weight", "perceiver.attn.{0}.wo.weight", None),
    (_P + r"1\.ln\.(weight|bias)", "perceiver.mlp.{0}.norm.{1}", None),
    (_P + r"1\.fc\.weight", "perceiver.mlp.{0}.fc.weight", None),
    (_P + r"1\.c_proj\.weight", "perceiver.mlp.{0}.proj.weight", None),
]
_COMPILED = [(re.compile(p), t, s) for p, t, s in _TABLE]
# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r".*(position_ids|rotary_emb\.inv_freq)$")


def map_name(name: str, config: IdeficsConfig) -> tuple[str, object] | None:
    """Checkpoint tensor name -> (our parameter name, slot), or None if it is not ours."""
    for pattern, template, slot in _COMPILED:
        m = pattern.fullmatch(name)
        if m:
            groups = m.groups()
            if template.startswith("{X}"):  # cross block j sits before decoder layer j * interval
                j = int(groups[0])
                return f"layers.{j * config.cross_layer_interval}.cross" + template[3:].format(*groups[1:]), slot
            return template.format(*groups), slot
    return None


def _rows(slot, config: IdeficsConfig, total: int) -> tuple[int, int]:
    """(first row, row count) of our parameter that a checkpoint tensor fills."""
    if slot is None:
        return 0, total
    if slot == "base":
        return 0, config.vocab_size
    if slot == "extra":
        return config.vocab_size, config.additional_vocab_size
    _, i, n = slot
    return i * total // n, total // n


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred over pytorch .bin; shards through their index."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index).exists():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise WeightsError(f"{directory / index}: unreadable index ({e})") from None
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise WeightsError(f"{f}: shard listed in {index} is missing")
            return files
        if (directory / single).exists():
            return [directory / single]
    raise WeightsError(f"{directory}: no model weights (model.safetensors or pytorch_model.bin, or their index)")


def read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, on the CPU; a .bin shard is memory-mapped, never fully copied."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for name in st.keys():
                        yield name, st.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{f}: unreadable safetensors file ({e})") from None
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt pickles / zips
                raise WeightsError(f"{f}: unreadable PyTorch weights file ({e})") from None
            for name, t in state.items():
                yield name, t
            del state


def build_meta(config: IdeficsConfig) -> IdeficsModel:
    """The model's structure with no storage: parameter shapes and counts without allocating memory."""
    with torch.device("meta"):
        return IdeficsModel(config)


def load_weights(
    model: IdeficsModel,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    on_module_ready: Callable[[str, nn.Module], None] | None = None,
) -> IdeficsModel:
    """Fill a meta-built model from (checkpoint name, tensor) pairs. Each parameter is allocated on `device` when
    its first tensor arrives; `on_module_ready(name, module)` runs once all of a module's parameters are full
    (the hook for quantizing while loading)."""
    config = model.config
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}  # our name -> rows filled so far (a 0-dim parameter counts as one row)
    pending = {name: len(list(m.parameters(recurse=False))) for name, m in model.named_modules()}
    for ckpt_name, t in tensors:
        mapped = map_name(ckpt_name, config)
        if mapped is None or mapped[0] not in params:
            if mapped is None and _IGNORED.fullmatch(ckpt_name):
                continue
            raise WeightsError(f"unexpected tensor '{ckpt_name}' in the checkpoint (not part of this model's config)")
        ours, slot = mapped
        p = params[ours]
        total = p.shape[0] if p.dim() else 1
        start, rows = _rows(slot, config, total)
        want = p.shape if slot is None else (rows, *p.shape[1:])
        if tuple(t.shape) != tuple(want):
            raise WeightsError(f"tensor '{ckpt_name}' has shape {tuple(t.shape)}, expected {tuple(want)}")
        module_name, _, attr = ours.rpartition(".")
        module = model.get_submodule(module_name)
        if p.is_meta:
            p = params[ours] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
            setattr(module, attr, p)
        with torch.no_grad():
            (p if slot is None else p[start:start + rows]).copy_(t)
        filled[ours] = filled.get(ours, 0) + rows
        if filled[ours] > total:
            raise WeightsError(f"tensor '{ckpt_name}' appears more than once in the checkpoint")
        if filled[ours] == total:
            pending[module_name] -= 1
            if pending[module_name] == 0 and on_module_ready is not None:
                on_module_ready(module_name, module)
    missing = [n for n, p in params.items() if filled.get(n, 0) < (p.shape[0] if p.dim() else 1)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"checkpoint is missing tensors for: {', '.join(missing[:3])}{more}")
    model.reset_buffers()
    return model.eval()

