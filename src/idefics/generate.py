"""The decoding loop over the engine: per-prompt stop rules, greedy, sampled or beam-searched tokens, streaming
events."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from idefics.engine import Engine, Prompt
from idefics.errors import IdeficsError
from idefics.sampling import BeamSearch, GenerationOptions, Processors, StopStrings, choose
from idefics.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str  # the continuation (or prompt + continuation with include_prompt=True)
    token_ids: list[int]  # generated ids, ending with the eos / stop token when one stopped it
    finish_reason: str  # "stop" (eos or stop string) or "length"


@dataclass
class _Row:
    prompt: Prompt
    prompt_ids: list[int]
    budget: int  # new tokens allowed
    tokens: list[int]
    finish: str | None = None
    stop_at: int | None = None  # character offset of a matched stop string in the decoded text


def default_eos(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.eos_id, tokenizer.end_of_utterance_id]
    return [i for i in ids if i is not None]


def default_banned(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.image_id, tokenizer.fake_image_id]
    return [i for i in ids if i is not None]


class TextStream:
    """One row's tokens -> text pieces that join to its Completion text: the detokenizer's final text, and of that
    what may begin a stop string waits until it cannot."""

    def __init__(self, tokenizer: Tokenizer, stops: StopStrings):
        self.detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters given out

    def push(self, token: int) -> str:
        self.text += self.detokenizer.push(token)
        shown = self.stops.shown(self.text)
        piece, self.sent = self.text[self.sent : shown], shown
        return piece

    def end(self, text: str) -> str:
        """The rest of the row's final text."""
        return text[self.sent :]


@dataclass
class _Rules:
    """What ends a continuation, and the score edits, for one call."""

    eos: list[int]
    stops: StopStrings
    process: Processors


class Generator:
    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer

    def _rows(self, prompts: list[Prompt], o: GenerationOptions) -> list[_Row]:
        config = self.engine.model.config
        o.within_vocabulary(config.total_vocab_size)
        context = config.max_position_embeddings
        rows = []
        for i, p in enumerate(prompts):
            n = p.ids.shape[0]
            budget = o.new_tokens(n)
            if n >= context:
                raise IdeficsError(f"prompt {i} has {n} tokens; the model's context is {context}")
            if budget <= 0:
                raise IdeficsError(f"prompt {i} has {n} tokens, already at max_length {o.max_length}")
            if n + budget > context:
                raise IdeficsError(
                    f"prompt {i} has {n} tokens; with {budget} new tokens it exceeds the model's context of {context}"
                )
            rows.append(_Row(p, p.ids.tolist(), budget, []))
        self._check_memory(rows, o.num_beams)
        return rows

    def _check_memory(self, rows: list[_Row], beams: int):
        """Refuse a call whose cache cannot be allocated, before the engine tries."""
        engine = self.engine
        # (slots, tokens per slot, image tokens per slot), as Engine.reserve takes them
        want = (len(rows) * beams, max(r.prompt.ids.shape[0] + r.budget for r in rows),
                max(1, max(r.prompt.pixels.shape[0] for r in rows)) * engine.model.config.image_seq_len)
        have = (0, 0, 0)
        if engine.cache is not None:
            have = (engine.cache.k.shape[1], engine.cache.max_len, engine.images.max_tokens)
        if all(w <= h for w, h in zip(want, have)):
            return
        # reserve() frees what it holds, then allocates room for both.
        held, needed = cache_bytes(engine.model, *have), cache_bytes(engine.model, *map(max, want, have))
        free = free_memory(engine.device)
        if free is not None and needed > free + held:
            raise IdeficsError(
                f"{len(rows)} prompts x {beams} beams of up to {want[1]} tokens need about {needed / 2**30:.1f} GiB "
                f"of cache, and {engine.device} has {(free + held) / 2**30:.1f} GiB free: use fewer prompts, beams or "
                "new tokens")

    def _rules(self, o: GenerationOptions) -> _Rules:
        eos = o.eos_token_id if o.eos_token_id is not None else default_eos(self.tokenizer)
        eos = [eos] if isinstance(eos, int) else list(eos)
        banned = o.banned_token_ids if o.banned_token_ids is not None else default_banned(self.tokenizer)
        banned = [b for b in banned if b not in eos]  # as the reference, an eos id is never banned
        return _Rules(eos, StopStrings(o.stop), Processors(o, eos, banned))

    def start(self, prompts: list[Prompt], o: GenerationOptions) -> tuple[list[_Row], Iterator[tuple[int, int | None]]]:
        """Check the prompts, then decode lazily: the iterator yields (row index, new token) as tokens arrive
        (greedy and sampling only: beam search knows its tokens at the end) and (row index, None) when a row
        finishes; the rows hold the results."""
        rows = self._rows(prompts, o)
        steps = self._beam_steps if o.num_beams > 1 else self._steps
        return rows, steps(rows, o, self._rules(o))

    def _reserve(self, rows: list[_Row], slots_per_row: int):
        self.engine.reserve(len(rows) * slots_per_row, max(r.prompt.ids.shape[0] + r.budget for r in rows),
                            max(r.prompt.pixels.shape[0] for r in rows))

    def _steps(self, rows: list[_Row], o: GenerationOptions, rules: _Rules) -> Iterator[tuple[int, int | None]]:
        generator = None
        if o.do_sample:
            generator = torch.Generator(device=self.engine.device)
            generator.manual_seed(o.seed if o.seed is not None else torch.seed())
        engine = self.engine
        self._reserve(rows, 1)
        running = list(range(len(rows)))  # row index of each active slot, in slot order
        # Without a repetition penalty the next step needs nothing from the host: it is launched before this
        # step's tokens are read, so the host's bookkeeping overlaps the device's work. A row that ends is then
        # computed one step too far, and that step is dropped.
        ahead = o.repetition_penalty == 1.0
        try:
            logits = engine.prefill_batch([r.prompt for r in rows])
            while running:
                active = [rows[i] for i in running]
                scores = rules.process(logits.to(torch.float32, copy=True), lambda: [r.prompt_ids + r.tokens for r in active],
                                       [len(r.tokens) for r in active])
                next_tokens = choose(scores, o, generator)
                read = _host_copy(next_tokens)
                if ahead:
                    logits = engine.decode(next_tokens)
                tokens = read()
                done = []
                for slot, (i, t) in enumerate(zip(running, tokens)):
                    r = rows[i]
                    r.tokens.append(t)
                    yield i, t
                    if self._ends(r.tokens, r.budget, rules):
                        self._settle(r, r.tokens, rules)
                        done.append(slot)
                        yield i, None
                for slot in reversed(done):
                    engine.release(slot, 1)
                    del running[slot]
                    tokens.pop(slot)
                if ahead and done and running:
                    keep = [s for s in range(len(running) + len(done)) if s not in done]
                    logits = logits[torch.tensor(keep, device=logits.device)]
                elif not ahead and running:
                    logits = engine.decode(torch.tensor(tokens))
        finally:
            engine.release(0, engine.active)

    def _beam_steps(self, rows: list[_Row], o: GenerationOptions, rules: _Rules) -> Iterator[tuple[int, int | None]]:
        """Each row's k beams hold k consecutive slots; a row leaves when its search is over."""
        engine, k = self.engine, o.num_beams
        self._reserve(rows, k)
        running = list(range(len(rows)))  # row index of each active group of slots, in slot order
        search = BeamSearch(len(rows), o, len(rules.eos), [r.budget for r in rows], engine.device)
        try:
            logits = engine.prefill_batch([r.prompt for r in rows], copies=k).repeat_interleave(k, dim=0)
            while running:
                log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
                log_probs = rules.process(
                    log_probs, lambda: [rows[i].prompt_ids + beam for i, beams in zip(running, search.beams) for beam in beams],
                    [search.length] * log_probs.shape[0])
                candidates = search.expand(log_probs)
                ends = torch.tensor([[self._ends(c, rows[i].budget, rules) for c in group]
                                     for i, group in zip(running, candidates)], device=log_probs.device)
                sources = search.select(ends)
                done = search.done(ends)
                for g in reversed(range(len(running))):
                    if done[g]:
                        r = rows[running[g]]
                        self._settle(r, search.hypotheses[g][0], rules)
                        engine.release(g * k, k)
                        yield running.pop(g), None
                left = [g for g, d in enumerate(done) if not d]
                if not left:
                    break
                search.keep(left)
                # Beams only trade state within their own group, whose slots share the same images.
                offsets = torch.arange(len(left), device=sources.device)[:, None] * k
                engine.reorder(0, (sources[left] + offsets).flatten())
                logits = engine.decode(torch.tensor([beam[-1] for beams in search.beams for beam in beams]))
        finally:
            engine.release(0, engine.active)

    def _ends(self, tokens: list[int], budget: int, rules: _Rules) -> bool:
        """Whether a continuation ends with its last token: eos, a completed stop string, or the length limit."""
        if tokens[-1] in rules.eos or len(tokens) >= budget:
            return True
        return bool(rules.stops.strings) and rules.stops.find(self._text(tokens)) is not None

    def _settle(self, r: _Row, tokens: list[int], rules: _Rules):
        r.tokens = tokens
        r.stop_at = rules.stops.find(self._text(tokens)) if rules.stops.strings else None
        r.finish = "stop" if r.stop_at is not None or (tokens and tokens[-1] in rules.eos) else "length"

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def completions(self, prompts: list[Prompt], o: GenerationOptions, include_prompt: bool = False) -> list[Completion]:
        rows, steps = self.start(prompts, o)
        for _ in steps:
            pass
        return [self.completion(r, include_prompt) for r in rows]

    def completion(self, r: _Row, include_prompt: bool = False) -> Completion:
        text = self._text(r.tokens)
        cut = len(text) - r.stop_at if r.stop_at is not None else 0  # characters of the stop string and after
        if include_prompt:
            text = self._text(r.prompt_ids + r.tokens)
        return Completion(text[: len(text) - cut], list(r.tokens), r.finish or "length")


def cache_bytes(model, slots: int, max_len: int, image_tokens: int) -> int:
    """Bytes of Engine.reserve's buffers for these slots (their leading terms): self-attention K/V, image K/V,
    the prefill's image features and mask, and float32 logits (scores are a copy)."""
    c, size = model.config, model.embed.weight.dtype.itemsize
    per_slot = (2 * c.num_hidden_layers * c.num_attention_heads * max_len * c.head_dim * size
                + 2 * c.num_cross_layers * c.num_attention_heads * image_tokens * c.head_dim * size
                + image_tokens * c.image_dim * size + max_len * image_tokens + 2 * 4 * c.total_vocab_size)
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


def _host_copy(t: torch.Tensor):
    """Start copying t to the host now, ahead of what is queued after it -> a function that waits for that copy
    alone and returns t's values as a list. (tolist() after the next step is queued would wait for that step.)"""
    if t.device.type != "cuda":
        return t.tolist
    host = t.to("cpu", non_blocking=True)  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]
