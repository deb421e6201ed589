"""Logits -> next token: the reference's logits processors (same order and arithmetic), greedy and sampling."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from idefics.errors import IdeficsError


@dataclass
class GenerationOptions:
    max_new_tokens: int | None = None  # default 20 when max_length is not given either
    min_new_tokens: int = 0
    max_length: int | None = None  # prompt + new tokens, per prompt
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # sampling only, as the reference's defaults
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | list[int] | None = None  # default: the tokenizer's eos and <end_of_utterance> if present
    stop: list[str] | str | None = None  # stop strings; the text is cut before them
    seed: int | None = None
    banned_token_ids: list[int] | None = None  # default: <image> and <fake_token_around_image>

    @classmethod
    def make(cls, **options) -> "GenerationOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise IdeficsError(f"unknown generation option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        o = cls(**options)
        o.validate()
        return o

    def validate(self):
        def bad(msg):
            raise IdeficsError(f"invalid generation options: {msg}")

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0):
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= 0):
            bad(f"max_length must be a positive integer, got {self.max_length!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            bad(f"min_new_tokens must be >= 0, got {self.min_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            bad(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be >= 0, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            bad(f"num_beams must be >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.do_sample:
            bad("beam search with sampling is not supported; use num_beams=1 or do_sample=False")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop and not all(isinstance(s, str) and s for s in self.stop):
            bad("stop strings must be non-empty strings")

    def new_tokens(self, prompt_len: int) -> int:
        """How many tokens a prompt of this length may generate (max_new_tokens wins over max_length)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return self.max_length - prompt_len
        return 20


@dataclass
class Processors:
    """The per-step score edits, in the reference's order: repetition penalty, banned tokens, min length."""

    options: GenerationOptions
    eos_ids: list[int]
    banned_ids: list[int]

    def __call__(self, scores: torch.Tensor, context: list[list[int]], new_tokens: list[int]) -> torch.Tensor:
        """scores (B, V) float32; context: each row's prompt and generated ids; new_tokens: generated so far."""
        o = self.options
        if o.repetition_penalty != 1.0:
            for row, ids in enumerate(context):
                idx = torch.tensor(ids, device=scores.device)
                s = scores[row].gather(0, idx)
                s = torch.where(s < 0, s * o.repetition_penalty, s / o.repetition_penalty)
                scores[row].scatter_(0, idx, s)
        if self.banned_ids:
            scores[:, self.banned_ids] = -float("inf")
        if o.min_new_tokens and self.eos_ids:
            short = torch.tensor([n < o.min_new_tokens for n in new_tokens], device=scores.device)
            eos = torch.tensor(self.eos_ids, device=scores.device)
            scores[short[:, None] & torch.isin(torch.arange(scores.shape[1], device=scores.device), eos)[None]] = -float("inf")
        return scores


def warp(scores: torch.Tensor, o: GenerationOptions) -> torch.Tensor:
    """Sampling warpers in the reference's order: temperature, top-k, top-p. scores (B, V)."""
    if o.temperature != 1.0:
        scores = scores / o.temperature
    if o.top_k and o.top_k < scores.shape[-1]:
        kth = torch.topk(scores, o.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if o.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - o.top_p
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return scores


def choose(scores: torch.Tensor, o: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed scores -> (B,) next tokens: argmax, or a draw from the warped distribution."""
    if not o.do_sample:
        return scores.argmax(dim=-1)
    probs = warp(scores, o).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
