"""The inference engine: slots holding running sequences, image encoding once per image, prefill and decode.

Each sequence (or each beam of one) owns a slot: a row of the self-attention cache and of the cross-attention
keys/values. Active slots are always [0, n), so one decode step runs every active sequence with plain views.
Sequences join (prefill) and leave (release) between steps: this is the continuous batching core."""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from idefics.cache import ImageKV, KVCache
from idefics.graphs import DecodeGraphs, slot_bucket
from idefics.model import IdeficsModel


@dataclass
class Prompt:
    """One processed prompt, unpadded: ids (S,), pixels (N, 3, H, W) and image_mask (S, N) one-hot."""

    ids: torch.Tensor
    pixels: torch.Tensor
    image_mask: torch.Tensor


def split_batch(batch: dict[str, torch.Tensor], pad_id: int | None = None) -> list[Prompt]:
    """The processor's padded batch -> one Prompt per row: padding removed, image slots cut to its own images."""
    prompts = []
    for ids, am, pixels, iam in zip(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                    batch["image_attention_mask"]):
        keep = am.bool()
        used = iam[keep].bool().any(dim=0)
        n = int(used.nonzero().max()) + 1 if used.any() else 0
        prompts.append(Prompt(ids[keep], pixels[:n], iam[keep][:, :n]))
    return prompts


class ImageEncoder:
    """Vision tower + perceiver, batched, with a bounded cache keyed by the image's pixel content."""

    def __init__(self, model: IdeficsModel, capacity: int = 256, batch_size: int = 64):
        self.model = model
        self.capacity = capacity
        self.batch_size = batch_size
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        return hashlib.blake2b(pixels.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) -> features (N, T_img, D_img), encoding only images not seen recently."""
        keys = [self.key(p) for p in pixels]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        first = {k: keys.index(k) for k in todo}
        w = self.model.embed.weight
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            x = torch.stack([pixels[first[k]] for k in chunk]).to(device=w.device, dtype=w.dtype)
            for k, f in zip(chunk, self.model.encode_images(x)):
                self.cache[k] = f
        out = [self.cache[k] for k in keys]
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        if not out:
            c = self.model.config
            return torch.zeros(0, c.image_seq_len, c.image_dim, dtype=w.dtype, device=w.device)
        return torch.stack(out)


KV_BUCKET = 256  # decode attends to the cache in multiples of this many positions


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class Engine:
    """graphs: capture decode steps as CUDA graphs (default on CUDA); compile: torch.compile the decode step
    (fuses the small elementwise kernels; costs compilation time on first use of each shape)."""

    def __init__(self, model: IdeficsModel, image_cache: int = 256, graphs: bool | None = None, compile: bool = False):
        self.model = model
        self.encoder = ImageEncoder(model, image_cache)
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self.step_fn = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
        self.graphs: DecodeGraphs | None = None
        self.cache: KVCache | None = None
        self.images: ImageKV | None = None
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens in the cache, per slot (on the device)
        self.host_lengths: list[int] = []  # the same, for the active slots, without reading the device
        self.tokens = torch.zeros(0, dtype=torch.long)  # the decode step's input, per slot
        self.active = 0

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def reserve(self, slots: int, max_len: int, max_images: int):
        """Make room for `slots` sequences of up to `max_len` tokens and `max_images` images each. Only grows;
        must be called while no sequence is active."""
        assert self.active == 0, "reserve() with sequences running"
        c, w = self.model.config, self.model.embed.weight
        if self.use_graphs:
            slots = slot_bucket(slots, 1 << 30)  # a captured step runs a whole bucket of slots
            max_len = _round_up(max_len, KV_BUCKET)
        tokens = max(max_images, 1) * c.image_seq_len
        if (self.cache is None or self.cache.k.shape[1] < slots or self.cache.max_len < max_len
                or self.images.max_tokens < tokens):
            if self.cache is not None:
                slots = max(slots, self.cache.k.shape[1])
                max_len = max(max_len, self.cache.max_len)
                tokens = max(tokens, self.images.max_tokens)
            self.cache = self.images = self.graphs = None  # free the old buffers before allocating the new ones
            self.cache = KVCache(c.num_hidden_layers, slots, c.num_attention_heads, max_len, c.head_dim, w.dtype, w.device)
            self.images = ImageKV(c.num_cross_layers, slots, c.num_attention_heads, tokens, c.head_dim, w.dtype, w.device)
            self.lengths = torch.zeros(slots, dtype=torch.long, device=w.device)
            self.tokens = torch.zeros(slots, dtype=torch.long, device=w.device)
            if self.use_graphs:
                self.graphs = DecodeGraphs(self._step, lambda: self.lengths, slots)

    @torch.inference_mode()
    def prefill(self, prompt: Prompt, copies: int = 1) -> torch.Tensor:
        """Run a prompt into the next free slot (and copy it to `copies` slots, for beams) -> last logits (V,)."""
        model, dev = self.model, self.device
        slot = self.active
        assert slot + copies <= self.cache.k.shape[1], "not enough slots reserved"
        feats = self.encoder(prompt.pixels)  # (N, T, D)
        t_img = model.config.image_seq_len
        kv = model.image_kv(feats.reshape(1, -1, feats.shape[-1]))  # per block (1, H, N*T, Dh)
        image_mask = prompt.image_mask.to(dev).bool().repeat_interleave(t_img, dim=-1)  # (S, N*T)
        s = prompt.ids.shape[0]
        self.cache.rows, self.cache.kv_len = slice(slot, slot + 1), s
        self.cache.pos = torch.arange(s, device=dev)[None]
        mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None]
        logits = model(prompt.ids.to(dev)[None], self.cache.pos, mask, kv, image_mask[None], self.cache, last_only=True)
        # Generated tokens attend to what the last prompt token attends to (its latest image).
        self.images.set(slot, kv, image_mask[-1])
        self.lengths[slot : slot + copies] = s
        for extra in range(slot + 1, slot + copies):
            self.cache.copy_slot(slot, extra)
            self.images.copy_slot(slot, extra)
        self.host_lengths[slot:] = [s] * copies
        self.active += copies
        return logits[0, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (n,) for the active slots [0, n) -> next-token logits (n, V). On CUDA a captured graph runs the
        step for a bucket of slots (the extra rows compute on idle slots and are ignored)."""
        n = self.active
        self.tokens[:n] = tokens.to(self.device)
        kv_len = max(self.host_lengths) + 1
        self.host_lengths = [x + 1 for x in self.host_lengths]
        if self.graphs is None:
            return self._step(n, kv_len)
        return self.graphs.run(n, min(_round_up(kv_len, KV_BUCKET), self.cache.max_len))[:n]

    def _step(self, n: int, kv_len: int) -> torch.Tensor:
        """One decode step over slots [0, n) attending to the first kv_len cache positions; static shapes and no
        host sync, so it can be captured."""
        lengths = self.lengths[:n]
        pos = lengths.clamp(max=self.cache.max_len - 1)[:, None]  # idle slots keep counting; stay in bounds
        self.cache.rows, self.cache.kv_len, self.cache.pos = slice(0, n), kv_len, pos
        mask = (torch.arange(kv_len, device=pos.device)[None] <= pos)[:, None, None]  # (n, 1, 1, kv_len)
        logits = self.step_fn(self.tokens[:n, None], pos, mask, self.images.view(slice(0, n)),
                              self.images.visible[:n, None], self.cache)
        lengths += 1
        return logits[:, -1]

    def reorder(self, first: int, order: torch.Tensor):
        """Beam search: slots first + i take the state of slots first + order[i]."""
        rows = slice(first, first + order.shape[0])
        self.cache.reorder(rows, order.to(self.device))
        self.lengths[rows] = self.lengths[rows][order.to(self.device)]

    def release(self, first: int, count: int):
        """Free slots [first, first + count): later slots move down so active slots stay [0, n)."""
        for src in range(first + count, self.active):
            dst = src - count
            self.cache.copy_slot(src, dst)
            self.images.copy_slot(src, dst)
            self.lengths[dst] = self.lengths[src]
        del self.host_lengths[first : first + count]
        self.active -= count
