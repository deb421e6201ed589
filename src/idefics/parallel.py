"""Tensor parallelism, a pass over a built model: each of N ranks keeps 1/N of every decoder block's attention heads
and MLP columns, and one all-reduce after each block's output product sums the ranks' parts (Megatron's split).

Per decoder layer and per cross-attention block:
  self-attention   wqkv by rows, keeping q, k and v each split by heads; wo by columns, then all-reduce
  cross-attention  wq and wkv by rows (heads); wo by columns, then all-reduce; the q/k norms act on one head's
                   dims, so every rank keeps them whole
  MLP              w13 by rows, keeping gate and up aligned; w2 by columns, then all-reduce
Everything else is replicated: the embeddings and lm_head (V x D each: about 0.6% of idefics-80b's bytes per rank
at two ranks; splitting them by vocabulary would add a gather per step), the norms, the gates, the vision tower
and the perceiver (they run once per image, not per token). After each all-reduce every rank holds the same
residual stream, so every rank computes the same logits.

shard() works on a meta-built model (shapes only, before weights.py reads each rank's blocks of the checkpoint)
and on a model with its weights (the blocks are cut out of them); add_reduces() then inserts the sums, around
whatever module holds the product (a quantized one included). model.py stays plain math: it reads its head and
MLP widths from its modules."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from idefics.config import IdeficsConfig
from idefics.errors import IdeficsError
from idefics.model import IdeficsModel


def check(config: IdeficsConfig, ranks: int):
    """One clear error if the model cannot be split over `ranks` ranks."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise IdeficsError(f"tensor_parallel must be a whole number >= 1, got {ranks!r}")
    for what, n in (("attention heads", config.num_attention_heads), ("MLP columns", config.intermediate_size)):
        if n % ranks:
            raise IdeficsError(f"tensor_parallel={ranks}: the model's {n} {what} do not divide into {ranks} "
                               f"equal parts (choose a divisor of {n})")


def _set(linear: nn.Linear, weight: torch.Tensor):
    """Give a Linear its block: a copy (a view would keep the whole tensor alive)."""
    weight = weight.contiguous() if weight.is_meta else weight.clone()
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def _rows(linear: nn.Linear, parts: int, rank: int, ranks: int):
    """A weight (parts * out, in) of fused equal parts (q/k/v, gate/up) -> rank's rows of each part, in order."""
    w = linear.weight
    _set(linear, w.view(parts, ranks, -1, w.shape[1])[:, rank].reshape(-1, w.shape[1]))


def _columns(linear: nn.Linear, rank: int, ranks: int):
    """A weight (out, in) whose input is split over the ranks -> rank's columns."""
    n = linear.weight.shape[1] // ranks
    _set(linear, linear.weight[:, rank * n : (rank + 1) * n])


def _mlps(model: IdeficsModel):
    for layer in model.layers:
        yield layer.mlp
        if layer.cross is not None:
            yield layer.cross.mlp


def shard(model: IdeficsModel, rank: int, ranks: int) -> IdeficsModel:
    """Keep rank's part of every split weight (see the module's table); in place."""
    check(model.config, ranks)
    if ranks == 1:
        return model
    for layer in model.layers:
        _rows(layer.attn.wqkv, 3, rank, ranks)
        _columns(layer.attn.wo, rank, ranks)
        layer.attn.heads //= ranks
        if layer.cross is not None:
            a = layer.cross.attn
            _rows(a.wq, 1, rank, ranks)
            _rows(a.wkv, 2, rank, ranks)
            _columns(a.wo, rank, ranks)
    for mlp in _mlps(model):
        _rows(mlp.w13, 2, rank, ranks)
        _columns(mlp.w2, rank, ranks)
        mlp.hidden //= ranks
    return model


class AllReduce(nn.Module):
    """A product whose input is split over the ranks: this rank's partial sum, then the sum over all ranks."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner = inner
        self.group = group  # None: the default process group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y


def add_reduces(model: IdeficsModel, group=None) -> IdeficsModel:
    """Wrap every output product of a sharded model (attention wo, MLP w2) in an AllReduce; in place. The fused
    decode step (fused.py) streams only plain Linears itself, so it runs these through the wrapper too."""
    for layer in model.layers:
        layer.attn.wo = AllReduce(layer.attn.wo, group)
        if layer.cross is not None:
            layer.cross.attn.wo = AllReduce(layer.cross.attn.wo, group)
    for mlp in _mlps(model):
        mlp.w2 = AllReduce(mlp.w2, group)
    return model


def parallelize(model: IdeficsModel, rank: int, ranks: int, group=None) -> IdeficsModel:
    """A model with its weights -> rank's shard, with its all-reduces (the process group must exist to run it)."""
    return add_reduces(shard(model, rank, ranks), group) if ranks > 1 else model


def heads(model: IdeficsModel) -> int:
    """Attention heads this rank computes (the config's count over the ranks): what its caches hold."""
    return model.layers[0].attn.heads
