"""The decoding loop over the engine: per-prompt stop rules, greedy or sampled tokens, streaming events."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from idefics.engine import Engine, Prompt
from idefics.errors import IdeficsError
from idefics.sampling import GenerationOptions, Processors, choose
from idefics.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str  # the continuation (or prompt + continuation with include_prompt=True)
    token_ids: list[int]  # generated ids, ending with the eos / stop token when one stopped it
    finish_reason: str  # "stop" (eos or stop string) or "length"


@dataclass
class _Row:
    prompt: Prompt
    budget: int  # new tokens allowed
    tokens: list[int]
    context: list[int]  # prompt ids + generated, for the repetition penalty
    finish: str | None = None
    stop_at: int | None = None  # character offset of a matched stop string in the decoded text


def default_eos(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.eos_id, tokenizer.end_of_utterance_id]
    return [i for i in ids if i is not None]


def default_banned(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.image_id, tokenizer.fake_image_id]
    return [i for i in ids if i is not None]


class Generator:
    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer

    def _rows(self, prompts: list[Prompt], o: GenerationOptions) -> list[_Row]:
        context = self.engine.model.config.max_position_embeddings
        rows = []
        for i, p in enumerate(prompts):
            n = p.ids.shape[0]
            budget = o.new_tokens(n)
            if budget <= 0:
                raise IdeficsError(f"prompt {i} has {n} tokens, already at max_length {o.max_length}")
            if n + budget > context:
                raise IdeficsError(
                    f"prompt {i} has {n} tokens; with {budget} new tokens it exceeds the model's context of {context}"
                )
            rows.append(_Row(p, budget, [], p.ids.tolist()))
        return rows

    def start(self, prompts: list[Prompt], o: GenerationOptions) -> tuple[list[_Row], Iterator[tuple[int, int | None]]]:
        """Check the prompts, then decode lazily: the iterator yields (row index, new token) as tokens arrive and
        (row index, None) when a row finishes; the rows hold the results."""
        if o.num_beams > 1:
            raise IdeficsError("beam search is not available in this loop")
        rows = self._rows(prompts, o)
        return rows, self._steps(rows, o)

    def _steps(self, rows: list[_Row], o: GenerationOptions) -> Iterator[tuple[int, int | None]]:
        eos = o.eos_token_id if o.eos_token_id is not None else default_eos(self.tokenizer)
        eos = [eos] if isinstance(eos, int) else list(eos)
        banned = o.banned_token_ids if o.banned_token_ids is not None else default_banned(self.tokenizer)
        process = Processors(o, eos, banned)
        generator = None
        if o.do_sample:
            generator = torch.Generator(device=self.engine.device)
            generator.manual_seed(o.seed if o.seed is not None else torch.seed())
        engine = self.engine
        engine.reserve(len(rows), max(r.prompt.ids.shape[0] + r.budget for r in rows),
                       max(r.prompt.pixels.shape[0] for r in rows))
        running = list(range(len(rows)))  # row index of each active slot, in slot order
        try:
            logits = torch.stack([engine.prefill(r.prompt) for r in rows])
            while running:
                active = [rows[i] for i in running]
                scores = process(logits.to(torch.float32, copy=True), [r.context for r in active], [len(r.tokens) for r in active])
                tokens = choose(scores, o, generator).tolist()
                done = []
                for slot, (i, t) in enumerate(zip(running, tokens)):
                    r = rows[i]
                    r.tokens.append(t)
                    r.context.append(t)
                    yield i, t
                    if t in eos:
                        r.finish = "stop"
                    elif o.stop and self._stopped(r, o.stop):
                        r.finish = "stop"
                    elif len(r.tokens) >= r.budget:
                        r.finish = "length"
                    if r.finish:
                        done.append(slot)
                        yield i, None
                for slot in reversed(done):
                    engine.release(slot, 1)
                    del running[slot]
                    tokens.pop(slot)
                if running:
                    logits = engine.decode(torch.tensor(tokens))
        finally:
            engine.release(0, engine.active)

    def _stopped(self, r: _Row, stops: list[str]) -> bool:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            r.stop_at = min(hits)
        return bool(hits)

    def completions(self, prompts: list[Prompt], o: GenerationOptions, include_prompt: bool = False) -> list[Completion]:
        rows, steps = self.start(prompts, o)
        for _ in steps:
            pass
        return [self.completion(r, include_prompt) for r in rows]

    def completion(self, r: _Row, include_prompt: bool = False) -> Completion:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        cut = len(text) - r.stop_at if r.stop_at is not None else 0  # characters of the stop string and after
        if include_prompt:
            text = self.tokenizer.decode(r.prompt.ids.tolist() + r.tokens, skip_special_tokens=True)
        return Completion(text[: len(text) - cut], list(r.tokens), r.finish or "length")
