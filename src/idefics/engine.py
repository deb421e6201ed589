"""The inference engine: slots holding running sequences, image encoding once per image, prefill and decode.

Each sequence (or each beam of one) owns a slot: a row of the self-attention cache and of the cross-attention
keys/values. Active slots are always [0, n), so one decode step runs every active sequence with plain views.
Sequences join (prefill) and leave (release) between steps: this is the continuous batching core."""
from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from idefics.cache import ImageKV, KVCache
from idefics.graphs import Graphs, slot_bucket
from idefics.layers import rope_cos_sin
from idefics.model import IdeficsModel


@dataclass
class Prompt:
    """One processed prompt, unpadded: ids (S,), pixels (N, 3, H, W) and image_mask (S, N) one-hot."""

    ids: torch.Tensor
    pixels: torch.Tensor
    image_mask: torch.Tensor


def split_batch(batch: dict[str, torch.Tensor]) -> list[Prompt]:
    """The processor's padded batch -> one Prompt per row: padding removed, image slots cut to its own images."""
    prompts = []
    for ids, am, pixels, iam in zip(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                    batch["image_attention_mask"]):
        keep = am.bool()
        used = iam[keep].bool().any(dim=0)
        n = int(used.nonzero().max()) + 1 if used.any() else 0
        prompts.append(Prompt(ids[keep], pixels[:n], iam[keep][:, :n]))
    return prompts


SMALL_IMAGE_BATCH = 8


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="idefics-image-hash")


class ImageEncoder:
    """Vision tower + perceiver, batched, with a bounded cache keyed by the image's pixel content."""

    def __init__(self, model: IdeficsModel, capacity: int = 256, batch_size: int = 64, graphs: Graphs | None = None):
        self.model = model
        self.capacity = capacity
        self.batch_size = batch_size
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.graphs = graphs
        self.pixels: torch.Tensor | None = None  # static input of the captured encoders

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        """pixels: one contiguous image on the CPU. hashlib reads the buffer in place and lets go of the GIL."""
        return hashlib.blake2b(memoryview(pixels.numpy()).cast("B"), digest_size=16).digest()

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> features (N, T_img, D_img), encoding only images not seen recently."""
        pixels = pixels.detach().cpu().contiguous()
        keys = list(_hash_pool().map(self.key, pixels)) if len(pixels) > 1 else [self.key(p) for p in pixels]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        first = {k: keys.index(k) for k in todo}
        w = self.model.embed.weight
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            x = pixels[[first[k] for k in chunk]].to(device=w.device).to(w.dtype)
            for k, f in zip(chunk, self._encode(x)):
                self.cache[k] = f.clone()
        out = [self.cache[k] for k in keys]
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        if not out:
            c = self.model.config
            return torch.zeros(0, c.image_seq_len, c.image_dim, dtype=w.dtype, device=w.device)
        return torch.stack(out)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """A few images (the latency case) through a captured graph; larger batches keep the GPU busy anyway."""
        n = x.shape[0]
        if self.graphs is None or n > SMALL_IMAGE_BATCH:
            return self.model.encode_images(x)
        if self.pixels is None:
            self.pixels = torch.zeros(SMALL_IMAGE_BATCH, *x.shape[1:], dtype=x.dtype, device=x.device)
        m = 1 << (n - 1).bit_length()  # power-of-two bucket
        self.pixels[:n] = x
        return self.graphs.run(("encode", m), lambda: self.model.encode_images(self.pixels[:m]))[:n]


KV_BUCKET = 64  # decode attends to the cache in multiples of this many positions (fewer bytes than a fixed length)
LEN_BUCKET = 32  # captured prefills pad prompts to a multiple of this many tokens


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class Engine:
    """graphs: capture decode steps and single-prompt prefills as CUDA graphs (default on CUDA); fused: decode
    steps with their elementwise work in the fused Triton kernels of kernels.py (default on CUDA with Triton, for
    the models fused.supported accepts; not with compile); compile: torch.compile the plain decode step (compiles on
    first use of each shape)."""

    def __init__(self, model: IdeficsModel, image_cache: int = 256, graphs: bool | None = None,
                 fused: bool | None = None, compile: bool = False):
        self.model = model
        self.graphs = Graphs() if (self.device.type == "cuda" if graphs is None else graphs) else None
        self.encoder = ImageEncoder(model, image_cache, graphs=self.graphs)
        self.fused = None
        if fused or (fused is None and not compile and self.device.type == "cuda" and _triton_ready()):
            from idefics import fused as fused_step  # needs Triton

            if fused_step.supported(model):
                self.fused = fused_step.FusedDecoder(model)
        self.step_fn = model
        if compile:
            import torch._inductor.config

            torch._inductor.config.coordinate_descent_tuning = True  # tunes the fused decode kernels' launch shapes
            self.step_fn = torch.compile(model, fullgraph=True, dynamic=False)
        self.cache: KVCache | None = None
        self.images: ImageKV | None = None
        self.active = 0
        self.host_lengths: list[int] = []  # tokens in the cache per active slot, known without a device sync

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def reserve(self, slots: int, max_len: int, max_images: int):
        """Make room for `slots` sequences of up to `max_len` tokens and `max_images` images each. Only grows;
        must be called while no sequence is active."""
        assert self.active == 0, "reserve() with sequences running"
        c, w = self.model.config, self.model.embed.weight
        if self.graphs is not None:
            slots = slot_bucket(slots, 1 << 30)  # a captured step runs a whole bucket of slots
            max_len = _round_up(max_len, KV_BUCKET)
        tokens = max(max_images, 1) * c.image_seq_len
        if self.cache is not None and self.cache.k.shape[1] >= slots and self.cache.max_len >= max_len \
                and self.images.max_tokens >= tokens:
            return
        if self.cache is not None:
            slots = max(slots, self.cache.k.shape[1])
            max_len = max(max_len, self.cache.max_len)
            tokens = max(tokens, self.images.max_tokens)
        self.cache = self.images = None  # free the old buffers before allocating the new ones
        if self.graphs is not None:  # the captured graphs point at the old buffers: start a new pool
            self.graphs = self.encoder.graphs = Graphs()
        dev, dt = w.device, w.dtype
        self.cache = KVCache(c.num_hidden_layers, slots, c.num_attention_heads, max_len, c.head_dim, dt, dev)
        self.images = ImageKV(c.num_cross_layers, slots, c.num_attention_heads, tokens, c.head_dim, dt, dev)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=dev)  # the same as host_lengths, per slot
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)  # the decode step's input
        # The prefill's inputs, padded: ids (B, S), image features (B, T, D), which image tokens each token sees
        # (B, S, T), the slot of each row and the position of its last real token.
        self.pf_ids = torch.zeros(slots, max_len, dtype=torch.long, device=dev)
        self.pf_feats = torch.zeros(slots, tokens, c.image_dim, dtype=dt, device=dev)
        self.pf_image_mask = torch.zeros(slots, max_len, tokens, dtype=torch.bool, device=dev)
        self.pf_slots = torch.zeros(slots, dtype=torch.long, device=dev)
        self.pf_last = torch.zeros(slots, dtype=torch.long, device=dev)
        cos, sin = rope_cos_sin(torch.arange(max_len, device=dev)[None], self.model.inv_freq, dt)
        self.cos, self.sin = cos[0, :, 0], sin[0, :, 0]  # (max_len, Dh): the fused step's RoPE table

    def prefill(self, prompt: Prompt, copies: int = 1) -> torch.Tensor:
        """One prompt -> its next-token logits (V,); see prefill_batch."""
        return self.prefill_batch([prompt], copies)[0]

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[Prompt], copies: int = 1) -> torch.Tensor:
        """Run prompts into the next free slots, each copied to `copies` consecutive slots (beams), in one batch
        -> each prompt's next-token logits (B, V)."""
        b, first = len(prompts), self.active
        assert first + b * copies <= self.cache.k.shape[1], "not enough slots reserved"
        t_img = self.model.config.image_seq_len
        lens = [p.ids.shape[0] for p in prompts]
        n_images = [p.pixels.shape[0] for p in prompts]
        s = _round_up(max(lens), LEN_BUCKET) if self.graphs is not None and b == 1 else max(lens)
        t = max(n_images) * t_img
        # Every host-to-device copy first, padded on the host, one per tensor: a copy from pageable host memory
        # waits for the device's queue, so a copy issued after the image encoder would stall the host behind it.
        ids = torch.zeros(b, s, dtype=torch.long)
        image_mask = torch.zeros(b, s, max(n_images), dtype=torch.bool)  # per image; per image token below
        for i, p in enumerate(prompts):
            ids[i, : lens[i]] = p.ids
            image_mask[i, : lens[i], : n_images[i]] = p.image_mask.bool()
        self.pf_ids[:b, :s] = ids.to(self.device)
        self.pf_image_mask[:b, :s, :t] = image_mask.to(self.device).repeat_interleave(t_img, -1)
        self.pf_last[:b] = torch.tensor(lens, device=self.device) - 1
        feats = self.encoder(torch.cat([p.pixels for p in prompts]))  # (sum N, T, D)
        self.pf_feats[:b, :t] = 0
        offset = 0
        for i, n in enumerate(n_images):
            self.pf_feats[i, : n * t_img] = feats[offset : offset + n].flatten(0, 1)
            offset += n
        slots = torch.arange(b, device=self.device) * copies + first
        self.pf_slots[:b] = slots
        if self.graphs is not None and b == 1:
            logits, kv = self.graphs.run(("prefill", s, t), lambda: self._prefill_step(1, s, t))
        else:
            logits, kv = self._prefill_step(b, s, t)
        # Generated tokens attend to what the last prompt token attends to (its latest image).
        visible = self.pf_image_mask[torch.arange(b, device=self.device), self.pf_last[:b], :t]
        self.images.set(slice(first, first + b * copies, copies), kv, visible)
        for i in range(b):
            for extra in range(1, copies):
                self.cache.copy_slot(first + i * copies, first + i * copies + extra)
                self.images.copy_slot(first + i * copies, first + i * copies + extra)
        self.lengths[first : first + b * copies] = (self.pf_last[:b] + 1).repeat_interleave(copies)
        self.host_lengths += [n for n in lens for _ in range(copies)]
        self.active += b * copies
        return logits[:b].clone()

    def _prefill_step(self, b: int, s: int, t: int):
        """The prompts in the prefill buffers -> (last-token logits (b, V), image keys/values per block)."""
        model, dev = self.model, self.device
        kv = model.image_kv(self.pf_feats[:b, :t])
        pos = torch.arange(s, device=dev)[None].expand(b, s)
        mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None]  # right padding needs no more
        self.cache.rows, self.cache.pos, self.cache.kv_len = self.pf_slots[:b], pos, None
        logits = model(self.pf_ids[:b, :s], pos, mask, kv, self.pf_image_mask[:b, :s, :t], self.cache,
                       logits_at=self.pf_last[:b])
        return logits[:, 0], kv

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n,) for the active slots [0, n) -> next-token logits (n, V). A captured step runs a bucket
        of slots; the extra rows compute on idle slots and are ignored."""
        n = self.active
        self.tokens[:n] = tokens.to(self.device)
        kv_len = max(self.host_lengths) + 1
        if self.graphs is None:
            logits = self._decode_step(n, kv_len)
        else:
            # The fused step reads each sequence's own length on the device: one graph per slot bucket serves all.
            kv_len = 0 if self.fused is not None else min(_round_up(kv_len, KV_BUCKET), self.cache.max_len)
            m = slot_bucket(n, self.cache.k.shape[1])
            # A copy: the graph's output buffer is overwritten by the next replay.
            logits = self.graphs.run(("decode", m, kv_len), lambda: self._decode_step(m, kv_len))[:n].clone()
        self.lengths[:n] += 1
        self.host_lengths = [x + 1 for x in self.host_lengths]
        return logits

    def _decode_step(self, n: int, kv_len: int) -> torch.Tensor:
        """One step over slots [0, n): static shapes, no host sync, and idempotent (the lengths advance outside),
        so it can be captured. The plain step attends to the first kv_len cache positions under a mask; the fused
        step reads each sequence's length on the device and ignores kv_len."""
        pos = self.lengths[:n].clamp(max=self.cache.max_len - 1)  # idle slots stay in bounds
        if self.fused is not None:
            return self.fused(self.tokens[:n], pos, self.images.view(slice(0, n)), self.images.visible[:n],
                              self.cache, self.cos, self.sin)
        pos = pos[:, None]
        self.cache.rows, self.cache.kv_len, self.cache.pos = slice(0, n), kv_len, pos
        hidden = torch.arange(kv_len, device=pos.device)[None] > pos  # (n, kv_len): not yet written
        # Additive, built once per step: a boolean mask would be converted again in every layer.
        dtype = self.cache.k.dtype
        mask = torch.zeros(hidden.shape, dtype=dtype, device=pos.device).masked_fill(hidden, torch.finfo(dtype).min)
        mask = mask[:, None, None]  # (n, 1, 1, kv_len)
        logits = self.step_fn(self.tokens[:n, None], pos, mask, self.images.view(slice(0, n)),
                              self.images.visible[:n, None], self.cache)
        return logits[:, -1]

    def reorder(self, first: int, order: torch.Tensor):
        """Beam search: slots first + i take the state of slots first + order[i]."""
        rows = slice(first, first + order.shape[0])
        order = order.to(self.device)
        self.cache.reorder(rows, order)
        self.lengths[rows] = self.lengths[rows][order]

    def release(self, first: int, count: int):
        """Free slots [first, first + count): later slots move down so active slots stay [0, n)."""
        for src in range(first + count, self.active):
            dst = src - count
            self.cache.copy_slot(src, dst)
            self.images.copy_slot(src, dst)
            self.lengths[dst] = self.lengths[src]
        del self.host_lengths[first : first + count]
        self.active -= count
