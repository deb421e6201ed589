"""Checkpoint tensors -> our parameters: one name table, a meta-device build, tensors assigned as they are read.

Fused parameters (q/k/v, gate/up, base/additional vocabulary) are filled slice by slice, so a tensor may come
from any shard in any order; every parameter must be covered exactly once."""
from __future__ import annotations

import itertools
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


# (checkpoint name, our name, slot), with placeholders {i} decoder layer, {j} cross block (it sits before decoder
# layer j * cross_layer_interval: {ji}), {v} vision layer, {p} perceiver block, {wb} "weight" or "bias". A slot says
# which rows of our parameter the tensor fills: None for all, ("part", i, n) for the i-th of n equal row blocks,
# "base" / "extra" for the two vocabularies. The last column is the dimension tensor-parallel ranks divide (each
# reads only its block of it, see parallel.py): 0 for the heads and MLP columns a rank computes (q/k/v, gate/up),
# 1 for the products that sum over them (o, down, then an all-reduce); None where every rank holds all of it.
_TABLE: list[tuple[str, str, object, int | None]] = [
    ("model.embed_tokens.weight", "embed.weight", "base", None),
    ("model.embed_tokens.additional_embedding.weight", "embed.weight", "extra", None),
    ("lm_head.weight", "lm_head.weight", "base", None),
    ("lm_head.additional_fc.weight", "lm_head.weight", "extra", None),
    ("model.norm.weight", "norm.weight", None, None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.wqkv.weight", ("part", 0, 3), 0),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.wqkv.weight", ("part", 1, 3), 0),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.wqkv.weight", ("part", 2, 3), 0),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.wo.weight", None, 1),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.w13.weight", ("part", 0, 2), 0),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.w13.weight", ("part", 1, 2), 0),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.w2.weight", None, 1),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight", None, None),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight", None, None),
    ("model.gated_cross_attn_layers.{j}.cross_attn.q_proj.weight", "layers.{ji}.cross.attn.wq.weight", None, 0),
    ("model.gated_cross_attn_layers.{j}.cross_attn.k_proj.weight", "layers.{ji}.cross.attn.wkv.weight", ("part", 0, 2), 0),
    ("model.gated_cross_attn_layers.{j}.cross_attn.v_proj.weight", "layers.{ji}.cross.attn.wkv.weight", ("part", 1, 2), 0),
    ("model.gated_cross_attn_layers.{j}.cross_attn.o_proj.weight", "layers.{ji}.cross.attn.wo.weight", None, 1),
    ("model.gated_cross_attn_layers.{j}.cross_attn.q_layer_norm.weight", "layers.{ji}.cross.attn.q_norm.weight", None, None),
    ("model.gated_cross_attn_layers.{j}.cross_attn.k_layer_norm.weight", "layers.{ji}.cross.attn.k_norm.weight", None, None),
    ("model.gated_cross_attn_layers.{j}.mlp.gate_proj.weight", "layers.{ji}.cross.mlp.w13.weight", ("part", 0, 2), 0),
    ("model.gated_cross_attn_layers.{j}.mlp.up_proj.weight", "layers.{ji}.cross.mlp.w13.weight", ("part", 1, 2), 0),
    ("model.gated_cross_attn_layers.{j}.mlp.down_proj.weight", "layers.{ji}.cross.mlp.w2.weight", None, 1),
    ("model.gated_cross_attn_layers.{j}.input_layernorm.weight", "layers.{ji}.cross.attn_norm.weight", None, None),
    ("model.gated_cross_attn_layers.{j}.post_attention_layernorm.weight", "layers.{ji}.cross.mlp_norm.weight", None, None),
    ("model.gated_cross_attn_layers.{j}.alpha_cross_attn", "layers.{ji}.cross.attn_gate", None, None),
    ("model.gated_cross_attn_layers.{j}.alpha_dense", "layers.{ji}.cross.mlp_gate", None, None),
    ("model.vision_model.embeddings.class_embedding", "vision.class_embed", None, None),
    ("model.vision_model.embeddings.patch_embedding.weight", "vision.patch_embed.weight", None, None),
    ("model.vision_model.embeddings.position_embedding.weight", "vision.pos_embed", None, None),
    ("model.vision_model.pre_layrnorm.{wb}", "vision.pre_norm.{wb}", None, None),
    ("model.vision_model.post_layernorm.{wb}", "vision.post_norm.{wb}", None, None),
    ("model.vision_model.encoder.layers.{v}.self_attn.q_proj.{wb}", "vision.layers.{v}.wqkv.{wb}", ("part", 0, 3), None),
    ("model.vision_model.encoder.layers.{v}.self_attn.k_proj.{wb}", "vision.layers.{v}.wqkv.{wb}", ("part", 1, 3), None),
    ("model.vision_model.encoder.layers.{v}.self_attn.v_proj.{wb}", "vision.layers.{v}.wqkv.{wb}", ("part", 2, 3), None),
    ("model.vision_model.encoder.layers.{v}.self_attn.out_proj.{wb}", "vision.layers.{v}.wo.{wb}", None, None),
    ("model.vision_model.encoder.layers.{v}.layer_norm1.{wb}", "vision.layers.{v}.norm1.{wb}", None, None),
    ("model.vision_model.encoder.layers.{v}.layer_norm2.{wb}", "vision.layers.{v}.norm2.{wb}", None, None),
    ("model.vision_model.encoder.layers.{v}.mlp.fc1.{wb}", "vision.layers.{v}.fc1.{wb}", None, None),
    ("model.vision_model.encoder.layers.{v}.mlp.fc2.{wb}", "vision.layers.{v}.fc2.{wb}", None, None),
    ("model.perceiver_resampler.latents", "perceiver.latents", None, None),
    ("model.perceiver_resampler.layer_norm.{wb}", "perceiver.norm.{wb}", None, None),
    ("model.perceiver_resampler.blocks.{p}.0.context_layer_norm.{wb}", "perceiver.attn.{p}.context_norm.{wb}", None, None),
    ("model.perceiver_resampler.blocks.{p}.0.latents_layer_norm.{wb}", "perceiver.attn.{p}.latents_norm.{wb}", None, None),
    ("model.perceiver_resampler.blocks.{p}.0.q_layer_norm.{wb}", "perceiver.attn.{p}.q_norm.{wb}", None, None),
    ("model.perceiver_resampler.blocks.{p}.0.k_layer_norm.{wb}", "perceiver.attn.{p}.k_norm.{wb}", None, None),
    ("model.perceiver_resampler.blocks.{p}.0.q_proj.weight", "perceiver.attn.{p}.wq.weight", None, None),
    ("model.perceiver_resampler.blocks.{p}.0.k_proj.weight", "perceiver.attn.{p}.wkv.weight", ("part", 0, 2), None),
    ("model.perceiver_resampler.blocks.{p}.0.v_proj.weight", "perceiver.attn.{p}.wkv.weight", ("part", 1, 2), None),
    ("model.perceiver_resampler.blocks.{p}.0.output_proj.weight", "perceiver.attn.{p}.wo.weight", None, None),
    ("model.perceiver_resampler.blocks.{p}.1.ln.{wb}", "perceiver.mlp.{p}.norm.{wb}", None, None),
    ("model.perceiver_resampler.blocks.{p}.1.fc.weight", "perceiver.mlp.{p}.fc.weight", None, None),
    ("model.perceiver_resampler.blocks.{p}.1.c_proj.weight", "perceiver.mlp.{p}.proj.weight", None, None),
]
_GROUPS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "v": r"(?P<v>\d+)", "p": r"(?P<p>\d+)", "wb": r"(?P<wb>weight|bias)"}
_COMPILED = [(re.compile(re.escape(name).replace(r"\{", "{").replace(r"\}", "}").format(**_GROUPS)), ours, slot, split)
             for name, ours, slot, split in _TABLE]
# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r".*(position_ids|rotary_emb\.inv_freq)$")


def map_name(name: str, config: IdeficsConfig) -> tuple[str, object] | None:
    """Checkpoint tensor name -> (our parameter name, slot), or None if it is not ours."""
    for pattern, ours, slot, _ in _COMPILED:
        m = pattern.fullmatch(name)
        if m:
            groups = m.groupdict()
            if "j" in groups:
                groups["ji"] = int(groups["j"]) * config.cross_layer_interval
            return ours.format(**groups), slot
    return None


def split_dim(name: str) -> int | None:
    """The dimension of checkpoint tensor `name` that tensor-parallel ranks divide, None if each holds it whole."""
    return next((split for pattern, _, _, split in _COMPILED if pattern.fullmatch(name)), None)


def checkpoint_tensors(model: IdeficsModel) -> dict[str, torch.Tensor]:
    """Our parameters under the reference's checkpoint names (what save_pretrained would write)."""
    c = model.config
    ranges = {"i": range(c.num_hidden_layers), "j": range(c.num_cross_layers), "v": range(c.vision.num_hidden_layers),
              "p": range(c.perceiver.depth), "wb": ("weight", "bias")}
    params = dict(model.named_parameters())
    out = {}
    for name, ours, slot, _ in _TABLE:
        keys = [k for k in ranges if "{" + k + "}" in name]
        for values in itertools.product(*(ranges[k] for k in keys)):
            groups = dict(zip(keys, values))
            if "j" in groups:
                groups["ji"] = groups["j"] * c.cross_layer_interval
            p = params.get(ours.format(**groups))
            if p is None:
                continue  # a part this config does not have (no resampler, no qk norms, no extra vocab)
            start, rows = _rows(slot, c, p.shape[0])
            if rows:
                out[name.format(**groups)] = p.detach()[start : start + rows]
    return out


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


def read_tensors(files: list[Path], rank: int = 0, ranks: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, on the CPU; a .bin shard is memory-mapped, never fully copied. With
    ranks > 1, only tensor-parallel rank `rank`'s block of each divided tensor (split_dim) is read."""
    from safetensors import SafetensorError, safe_open

    def block(name: str, shape) -> tuple[int, slice] | None:
        """(dimension, rows or columns) of this rank's block, None for the whole tensor."""
        d = split_dim(name) if ranks > 1 else None
        if d is None:
            return None
        if shape[d] % ranks:
            raise WeightsError(f"tensor '{name}' has {shape[d]} rows/columns along dim {d}: not divisible by "
                               f"{ranks} tensor-parallel ranks")
        n = shape[d] // ranks
        return d, slice(rank * n, (rank + 1) * n)

    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for name in st.keys():
                        part = st.get_slice(name)
                        b = block(name, part.get_shape())
                        yield name, st.get_tensor(name) if b is None else part[b[1]] if b[0] == 0 else part[:, b[1]]
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{f}: unreadable safetensors file ({e})") from None
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt pickles / zips
                raise WeightsError(f"{f}: unreadable PyTorch weights file ({e})") from None
            for name, t in state.items():
                b = block(name, t.shape)
                yield name, t if b is None else t.narrow(b[0], b[1].start, b[1].stop - b[1].start)
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
    shapes = {name: p.shape for name, p in params.items()}
    filled: dict[str, int] = {}  # our name -> rows filled so far (a 0-dim parameter counts as one row)
    pending = {name: len(list(m.parameters(recurse=False))) for name, m in model.named_modules()}
    for ckpt_name, t in tensors:
        mapped = map_name(ckpt_name, config)
        if mapped is None or mapped[0] not in shapes:
            if mapped is None and _IGNORED.fullmatch(ckpt_name):
                continue
            raise WeightsError(f"unexpected tensor '{ckpt_name}' in the checkpoint (not part of this model's config)")
        ours, slot = mapped
        shape = shapes[ours]
        total = shape[0] if len(shape) else 1
        start, rows = _rows(slot, config, total)
        want = shape if slot is None else (rows, *shape[1:])
        if tuple(t.shape) != tuple(want):
            raise WeightsError(f"tensor '{ckpt_name}' has shape {tuple(t.shape)}, expected {tuple(want)}")
        if filled.get(ours, 0) + rows > total:
            raise WeightsError(f"tensor '{ckpt_name}' appears more than once in the checkpoint")
        module_name, _, attr = ours.rpartition(".")
        module = model.get_submodule(module_name)
        p = params[ours]
        if p.is_meta:
            p = params[ours] = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
            setattr(module, attr, p)
        with torch.no_grad():
            (p if slot is None else p[start:start + rows]).copy_(t)
        filled[ours] = filled.get(ours, 0) + rows
        if filled[ours] == total:
            del params[ours]  # the module holds it now; a quantizing hook frees it by replacing the module
            pending[module_name] -= 1
            if pending[module_name] == 0 and on_module_ready is not None:
                on_module_ready(module_name, module)
    missing = [n for n, s in shapes.items() if filled.get(n, 0) < (s[0] if len(s) else 1)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"checkpoint is missing tensors for: {', '.join(missing[:3])}{more}")
    model.reset_buffers()
    return model.eval()

