"""The inference engine, a runner: prefill prompts into slots, decode steps over slots, release slots.

Each sequence (or each beam of one) owns a slot: a row of the self-attention cache and of the cross-attention
keys/values. Sequences join (prefill) and leave (release) between steps, and a slot keeps its row for the
sequence's whole life: a release moves no other sequence's cache. A step runs the slots [0, m) for the smallest
captured bucket m above the highest slot it needs; free slots in between compute on whatever they hold and are
ignored. New sequences take the lowest free slots, so holes fill first. Who runs is the scheduler's decision."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from idefics.cache import ImageKV, KVCache
from idefics.encoder import ImageEncoder
from idefics.errors import IdeficsError
from idefics.graphs import Graphs, slot_bucket
from idefics.layers import rope_cos_sin
from idefics.model import IdeficsModel
from idefics.parallel import heads
from idefics.runtime import model_work, to_device


@dataclass
class Prompt:
    """One processed prompt, unpadded: ids (S,), pixels (N, 3, H, W) and image_mask (S, N) one-hot; keys: each
    image's content key for the encoder's cache (ImageEncoder.key), where the processor's workers computed them."""

    ids: torch.Tensor
    pixels: torch.Tensor
    image_mask: torch.Tensor
    keys: tuple[bytes, ...] | None = None


def images_seen(image_mask: torch.Tensor | np.ndarray) -> int:
    """(S, N) which image each token sees, on the CPU -> how many image slots the prompt needs: up to the last one
    seen. (In NumPy: the processor calls it for every prompt, where torch's calls would each wait for the
    interpreter's lock; see processor._image_mask.)"""
    seen = np.flatnonzero(np.asarray(image_mask).any(axis=0))
    return int(seen[-1]) + 1 if seen.size else 0


def split_batch(batch: dict[str, torch.Tensor]) -> list[Prompt]:
    """The processor's padded batch -> one Prompt per row: padding removed, image slots cut to its own images."""
    prompts = []
    for ids, am, pixels, iam in zip(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                    batch["image_attention_mask"]):
        keep = am.bool()
        n = images_seen(iam[keep])
        prompts.append(Prompt(ids[keep], pixels[:n], iam[keep][:, :n]))
    return prompts


KV_BUCKET = 64  # decode attends to the cache in multiples of this many positions (fewer bytes than a fixed length)
LEN_BUCKET = 32  # captured prefills pad prompts to a multiple of this many tokens
WARM_PREFILL = 512  # warmup() captures single-prompt prefills of one image up to this many tokens
# Prefills of several prompts are captured where the prompts are this short: there launching the eager step's ~1000
# kernels costs more host time than its GPU work (64 prompts of 9 tokens: 39 ms of host for 31 ms of GPU, and
# 110-190 ms while image workers decode photos), and a replay is one call. Rows are padded to a slot bucket, lengths
# to BATCH_LEN_BUCKET (to 32 the GPU's work grew 2.3x for 9 tokens); each shape is captured at its first use. Longer
# prompts keep the GPU busier than the launches, and their shapes are many. Lengths unpadded (1) against padded to 4:
# m.caption of 64 photos 1.29x and 1.10x faster in two H100 runs, one of each order (bench/job.py --batch-len-bucket),
# for at most 32 lengths per slot bucket captured.
BATCH_GRAPH_LEN = 32
BATCH_LEN_BUCKET = 1


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cache_bytes(model: IdeficsModel, slots: int, max_len: int, images: int) -> int:
    """Bytes of Engine.reserve's buffers for these slots (their leading terms): self-attention K/V, image K/V, the
    prefill's image features and mask, and float32 logits (scores are a copy)."""
    c, size, h = model.config, model.embed.weight.dtype.itemsize, heads(model)
    t = max(images, 1) * c.image_seq_len
    per_slot = (2 * c.num_hidden_layers * h * max_len * c.head_dim * size
                + 2 * c.num_cross_layers * h * t * c.head_dim * size
                + t * c.image_dim * size + max_len * t + 2 * 4 * c.total_vocab_size)
    return slots * per_slot


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate, None where unknown: on CUDA what is free plus what torch's allocator
    holds unused; on the CPU the kernel's estimate of available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def cache_room(engine: "Engine") -> int | None:
    """Bytes reserve() can allocate: the device's free memory and the old buffers, which it frees first; None where
    unknown."""
    free = free_memory(engine.device)
    if free is None or engine.cache is None:
        return free
    return free + cache_bytes(engine.model, engine.slots, engine.max_len, engine.max_images)


def check_room(engine: "Engine", slots: int, max_len: int, images: int, what: str,
               advice: str = "use fewer prompts, beams or new tokens"):
    """Refuse, before reserve() tries, buffers that cannot be allocated."""
    needed, room = cache_bytes(engine.model, slots, max_len, images), cache_room(engine)
    if room is not None and needed > room:
        raise IdeficsError(f"{what} need about {needed / 2**30:.1f} GiB of cache, and {engine.device} has "
                           f"{room / 2**30:.1f} GiB free: {advice}")


class Engine:
    """graphs: capture decode steps, single-prompt prefills and prefills of short prompts as CUDA graphs (default
    on CUDA); fused: decode steps with their elementwise work in the fused Triton kernels of kernels.py (default on
    CUDA with Triton, for the models fused.supported accepts; not with compile); compile: torch.compile the plain
    decode step (compiles on first use of each shape)."""

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
        self.host_lengths: dict[int, int] = {}  # tokens in the cache of each live slot, known without a device sync
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # slot lists as device tensors, made once each

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def slots(self) -> int:
        """Slots reserved; with graphs the buffers hold one more, the scratch slot (prefill_batch)."""
        return 0 if self.cache is None else len(self.lengths)

    @property
    def active(self) -> int:
        """Live slots."""
        return len(self.host_lengths)

    @property
    def max_len(self) -> int:
        return 0 if self.cache is None else self.cache.max_len

    @property
    def max_images(self) -> int:
        return 0 if self.images is None else self.images.max_tokens // self.model.config.image_seq_len

    def free_slots(self, count: int | None = None, consecutive: bool = False) -> list[int] | None:
        """The lowest `count` free slots (a run of consecutive ones if asked), or None if there are not enough;
        all free slots if no count is given."""
        free = [s for s in range(self.slots) if s not in self.host_lengths]
        if count is None:
            return free
        if not consecutive:
            return free[:count] if len(free) >= count else None
        for i in range(len(free) - count + 1):
            if free[i + count - 1] - free[i] == count - 1:
                return free[i : i + count]
        return None

    def reserve(self, slots: int, max_len: int, max_images: int):
        """Make room for `slots` sequences of up to `max_len` tokens and `max_images` images each: buffers that hold
        that much already stay, others are reallocated at these sizes (a caller that must keep the current room
        passes the maxima). Only while no sequence is live (the captured graphs go with the buffers)."""
        assert not self.host_lengths, "reserve() with sequences running"
        c, w = self.model.config, self.model.embed.weight
        if self.graphs is not None:
            slots = slot_bucket(slots, 1 << 30)  # a captured step runs a whole bucket of slots
            max_len = _round_up(max_len, KV_BUCKET)
        tokens = max(max_images, 1) * c.image_seq_len
        if self.cache is not None and self.slots >= slots and self.cache.max_len >= max_len \
                and self.images.max_tokens >= tokens:
            return
        self.cache = self.images = None  # free the old buffers before allocating the new ones
        self._index.clear()
        if self.graphs is not None:  # the captured graphs point at the old buffers: start a new pool
            self.graphs = self.encoder.graphs = Graphs()
        dev, dt, h = w.device, w.dtype, heads(self.model)  # h: this rank's heads under tensor parallelism
        # With graphs, one slot more: the padding rows of a captured prefill write their keys and values there.
        rows = slots + (self.graphs is not None)
        self.cache = KVCache(c.num_hidden_layers, rows, h, max_len, c.head_dim, dt, dev)
        self.images = ImageKV(c.num_cross_layers, rows, h, tokens, c.head_dim, dt, dev)
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

    @model_work
    def warmup(self):
        """Capture now, while no sequence is live, the decode step for every slot bucket, the image encoders
        (ImageEncoder.warmup) and the prefill of one prompt with one image for every length bucket up to
        WARM_PREFILL, so that no request joining a running batch waits for a capture (tens of milliseconds each,
        several decode steps)."""
        if self.graphs is None or self.fused is None or self.cache is None:
            return  # the plain step's graphs are keyed by attention length too: they are captured as they come
        self.encoder.warmup()
        assert not self.host_lengths, "warmup() with sequences running"
        for m in sorted({slot_bucket(n, self.slots) for n in range(1, self.slots + 1)}):
            self.graphs.run(("decode", m, 0), lambda m=m: self._decode_step(m, 0))
        t = self.model.config.image_seq_len
        self.pf_slots[:1], self.pf_last[:1] = self.slots, 0  # the steps write the scratch slot
        for s in range(LEN_BUCKET, min(self.max_len, WARM_PREFILL) + 1, LEN_BUCKET):
            self.graphs.run(("prefill", 1, s, t), lambda s=s: self._prefill_step(1, s, t))

    def index(self, slots: list[int]) -> torch.Tensor:
        """A list of slots as a device tensor, copied once per distinct list (a running batch keeps its list for many
        steps)."""
        key = tuple(slots)
        if key not in self._index:
            if len(self._index) > 4096:
                self._index.clear()
            self._index[key] = to_device(torch.tensor(key, dtype=torch.long), self.device)
        return self._index[key]

    def prefill(self, prompt: Prompt, copies: int = 1) -> torch.Tensor:
        """One prompt -> its next-token logits (V,); see prefill_batch."""
        return self.prefill_batch([prompt], copies)[0]

    @model_work
    def prefill_batch(self, prompts: list[Prompt], copies: int = 1, slots: list[int] | None = None) -> torch.Tensor:
        """Run prompts into slots, each copied to `copies` consecutive slots (beams), in one batch -> each prompt's
        next-token logits (B, V). slots: the first slot of each prompt; default the lowest free ones."""
        b = len(prompts)
        if slots is None:
            run = self.free_slots(b * copies, consecutive=copies > 1)
            assert run is not None, "not enough slots reserved"
            slots = run[::copies] if copies > 1 else run
        assert len(slots) == b and all(s + copies <= self.slots for s in slots), "not enough slots reserved"
        taken = [s + j for s in slots for j in range(copies)]
        assert not any(s in self.host_lengths for s in taken), "prefill into a live slot"
        t_img = self.model.config.image_seq_len
        lens = [p.ids.shape[0] for p in prompts]
        n_images = [p.pixels.shape[0] for p in prompts]
        padded = _round_up(max(lens), LEN_BUCKET if b == 1 else BATCH_LEN_BUCKET)  # a captured graph's length
        graphed = self.graphs is not None and (b == 1 or padded <= BATCH_GRAPH_LEN)
        s = padded if graphed else max(lens)
        m = slot_bucket(b, self.slots) if graphed else b  # rows run: padding rows write the scratch slot
        t = max(n_images) * t_img
        # Padded on the host, one copy per tensor, through pinned memory (runtime.to_device): the host goes on
        # launching the prefill while the decode step before it runs.
        ids = torch.zeros(b, s, dtype=torch.long)
        image_mask = torch.zeros(b, s, max(n_images), dtype=torch.bool)  # per image; per image token below
        for i, p in enumerate(prompts):
            ids[i, : lens[i]] = p.ids
            image_mask[i, : lens[i], : n_images[i]] = p.image_mask.bool()
        self.pf_ids[:b, :s] = to_device(ids, self.device)
        self.pf_image_mask[:b, :s, :t] = to_device(image_mask, self.device).repeat_interleave(t_img, -1)
        self.pf_last[:b] = to_device(torch.tensor(lens), self.device) - 1
        self.pf_slots[:b] = self.index(slots)
        if m > b:  # the padding rows: the scratch slot, logits at position 0 (stale rows may hold longer prompts')
            self.pf_slots[b:m], self.pf_last[b:m] = self.slots, 0
        taken_index = self.index(taken)
        feats = self.encoder.of_prompts(prompts)  # (sum N, T, D)
        if len(set(n_images)) == 1:  # one copy, not one per prompt
            self.pf_feats[:b, :t] = feats.reshape(b, t, feats.shape[-1])
        else:
            self.pf_feats[:b, :t] = 0
            offset = 0
            for i, n in enumerate(n_images):
                self.pf_feats[i, : n * t_img] = feats[offset : offset + n].flatten(0, 1)
                offset += n
        if graphed:
            logits = self.graphs.run(("prefill", m, s, t), lambda: self._prefill_step(m, s, t))
        else:
            logits = self._prefill_step(b, s, t)
        for slot in slots:
            for extra in range(1, copies):
                self.cache.copy_slot(slot, slot + extra)
                self.images.copy_slot(slot, slot + extra)
        self.lengths[taken_index] = (self.pf_last[:b] + 1).repeat_interleave(copies)
        for slot, n in zip(slots, lens):
            for j in range(copies):
                self.host_lengths[slot + j] = n
        return logits[:b].clone()

    def _prefill_step(self, b: int, s: int, t: int) -> torch.Tensor:
        """The first b rows of the prefill buffers into their slots (keys and values, image ones too) -> last-token
        logits (b, V)."""
        model, dev = self.model, self.device
        kv = model.image_kv(self.pf_feats[:b, :t])
        pos = torch.arange(s, device=dev)[None].expand(b, s)
        mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None]  # right padding needs no more
        logits = model(self.pf_ids[:b, :s], pos, mask, kv, self.pf_image_mask[:b, :s, :t],
                       self.cache.at(self.pf_slots[:b], pos, None), logits_at=self.pf_last[:b])
        # Generated tokens attend to what the last prompt token attends to (its latest image).
        visible = self.pf_image_mask[torch.arange(b, device=dev), self.pf_last[:b], :t]
        self.images.set(self.pf_slots[:b], kv, visible)
        return logits[:, 0]

    @model_work
    def decode(self, tokens: torch.Tensor, slots: list[int] | None = None) -> torch.Tensor:
        """tokens (n,) for the live slots `slots` (default: all live slots, lowest first) -> their next-token logits
        (n, V), in that order. Other slots below the step's bucket compute on what they hold and are ignored: their
        lengths stay, so what they write lands past their tokens and is overwritten by their next real step."""
        if slots is None:
            slots = sorted(self.host_lengths)
        n = len(slots)
        dense = slots == list(range(n))  # the usual case: plain views, no gather
        idx = None if dense else self.index(slots)
        if dense:
            self.tokens[:n] = tokens.to(self.device)
        else:
            self.tokens[idx] = tokens.to(self.device)
        top = slots[-1] + 1 if dense else max(slots) + 1
        kv_len = max(self.host_lengths[s] for s in slots) + 1
        if self.graphs is None:
            logits = self._decode_step(top, kv_len)
        else:
            # The fused step reads each sequence's own length on the device: one graph per slot bucket serves all.
            kv_len = 0 if self.fused is not None else min(_round_up(kv_len, KV_BUCKET), self.cache.max_len)
            m = slot_bucket(top, self.slots)
            logits = self.graphs.run(("decode", m, kv_len), lambda: self._decode_step(m, kv_len))
        # A copy (the graph's output buffer is overwritten by the next replay), of the asked rows only.
        logits = logits[:n].clone() if dense else logits[idx]
        if dense:
            self.lengths[:n] += 1
        else:
            self.lengths[idx] += 1
        for s in slots:
            self.host_lengths[s] += 1
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
        kv_len = min(kv_len, self.cache.max_len)
        hidden = torch.arange(kv_len, device=pos.device)[None] > pos  # (n, kv_len): not yet written
        # Additive, built once per step: a boolean mask would be converted again in every layer.
        dtype = self.cache.k.dtype
        mask = torch.zeros(hidden.shape, dtype=dtype, device=pos.device).masked_fill(hidden, torch.finfo(dtype).min)
        mask = mask[:, None, None]  # (n, 1, 1, kv_len)
        logits = self.step_fn(self.tokens[:n, None], pos, mask, self.images.view(slice(0, n)),
                              self.images.visible[:n, None], self.cache.at(slice(0, n), pos, kv_len))
        return logits[:, -1]

    def call(self, fn, *args):
        """fn(model, *args): model work outside the slots (full logits, scoring). fn is a module-level function, so
        that a tensor-parallel engine can have every rank run it (ranks.py)."""
        return fn(self.model, *args)

    def reorder(self, slots: list[int], sources: torch.Tensor):
        """Beam search: slots[i] takes the state of slot sources[i] (a device tensor: no host sync)."""
        dst = self.index(slots)
        self.cache.reorder(dst, sources)
        self.lengths[dst] = self.lengths[sources]

    def release(self, first: int, count: int = 1):
        """Free slots [first, first + count). Nothing moves: the slots are simply free for the next prefill."""
        for s in range(first, first + count):
            self.host_lengths.pop(s, None)

    def release_all(self):
        self.host_lengths.clear()
