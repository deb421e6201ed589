"""Logits -> next token: the reference's logits processors (same order and arithmetic), greedy, sampling and beam
search, and stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Literal

import torch

from idefics.checks import FieldError, check, limited, show
from idefics.errors import IdeficsError
from idefics.runtime import to_device


MAX_BEAMS = 64  # the reference takes any number, but beams past a few dozen gain nothing and each holds a cache row
MAX_EOS = 64  # each eos id widens beam search's candidates by num_beams
MAX_STOP = 64  # each stop string is searched for in the text at every token
MAX_STOP_CHARS = 256
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MIN_DIVISOR = 1e-6  # temperature and repetition penalty divide the scores: much smaller ones overflow to inf


@dataclass
class GenerationOptions:
    """Each field's type and limits are checked on make() (bools are not numbers, numbers are finite); token ids
    are held to the vocabulary once it is known (within_vocabulary)."""

    max_new_tokens: int | None = limited(None, low=1)  # default 20 when max_length is not given either
    min_new_tokens: int = limited(0, low=0)
    max_length: int | None = limited(None, low=1)  # prompt + new tokens, per prompt
    do_sample: bool = False
    temperature: float = limited(1.0, low=0)  # at least MIN_DIVISOR when sampling
    top_k: int = limited(50, low=0)  # sampling only, as the reference's defaults
    top_p: float = limited(1.0, above=0, high=1)
    repetition_penalty: float = limited(1.0, low=MIN_DIVISOR)
    num_beams: int = limited(1, low=1, high=MAX_BEAMS)
    length_penalty: float = limited(1.0, low=-10, high=10)  # an exponent of the length
    early_stopping: bool | Literal["never"] = False
    # default: the tokenizer's eos and <end_of_utterance> if present
    eos_token_id: int | list[int] | None = limited(None, low=0, items=MAX_EOS)
    stop: str | list[str] | None = limited(None, items=MAX_STOP, chars=MAX_STOP_CHARS)  # the text is cut before them
    seed: int | None = limited(None, low=0, high=MAX_SEED)
    banned_token_ids: list[int] | None = limited(None, low=0)  # default: <image> and <fake_token_around_image>

    @classmethod
    def make(cls, **options) -> "GenerationOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise IdeficsError(f"unknown generation option {show(unknown[0])} (known: {', '.join(sorted(known))})")
        o = cls(**options)
        o.validate()
        return o

    def validate(self):
        try:
            check(self)
        except FieldError as e:
            raise IdeficsError(f"invalid generation option {e.name}: {e.problem}") from None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop and not all(self.stop):
            raise IdeficsError("invalid generation option stop: stop strings must be non-empty")
        if self.do_sample and self.temperature < MIN_DIVISOR:
            raise IdeficsError(f"invalid generation option temperature: must be at least {MIN_DIVISOR} when sampling, "
                               f"got {self.temperature}")
        if self.num_beams > 1 and self.do_sample:
            raise IdeficsError("beam search with sampling is not supported; use num_beams=1 or do_sample=False")

    def within_vocabulary(self, size: int):
        """Token ids must name tokens of a vocabulary of this size."""
        for name in ("eos_token_id", "banned_token_ids"):
            ids = getattr(self, name)
            for i in [ids] if isinstance(ids, int) else ids or []:
                if i >= size:
                    raise IdeficsError(f"invalid generation option {name}: {i} is past the vocabulary "
                                       f"(ids 0 to {size - 1})")

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
    masks: dict = field(default_factory=dict, repr=False, compare=False)  # _vocab_mask's, per device

    def __call__(self, scores: torch.Tensor, context: Callable[[], list[list[int]]], new_tokens: list[int]) -> torch.Tensor:
        """scores (B, V) float32; context() gives each row's prompt and generated ids (built only for the
        repetition penalty, not on every step); new_tokens: generated so far."""
        o = self.options
        if o.repetition_penalty != 1.0:
            for row, ids in enumerate(context()):
                idx = torch.tensor(ids, device=scores.device)
                s = scores[row].gather(0, idx)
                s = torch.where(s < 0, s * o.repetition_penalty, s / o.repetition_penalty)
                scores[row].scatter_(0, idx, s)
        # Token masks live on the device (made once): indexing with a host list would copy it every step, and a
        # copy from the host waits for the device, which would stall decoding that runs a step ahead.
        if self.banned_ids:
            scores.masked_fill_(self._vocab_mask("banned", self.banned_ids, scores), -float("inf"))
        if o.min_new_tokens and self.eos_ids:
            short = [n < o.min_new_tokens for n in new_tokens]
            if any(short):
                rows = torch.tensor(short, device=scores.device)[:, None]
                scores.masked_fill_(rows & self._vocab_mask("eos", self.eos_ids, scores), -float("inf"))
        return scores

    def _vocab_mask(self, name: str, ids: list[int], scores: torch.Tensor) -> torch.Tensor:
        """(V,) bool, True at ids; cached per name, vocabulary size and device."""
        key = (name, scores.shape[-1], scores.device)
        if key not in self.masks:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool)
            mask[[i for i in ids if 0 <= i < scores.shape[-1]]] = True
            self.masks[key] = mask.to(scores.device)
        return self.masks[key]


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


class StopStrings:
    """Stop rules on the decoded continuation: it ends once its text contains one of the strings."""

    def __init__(self, strings: list[str] | None):
        self.strings = strings or []
        self.longest = max(map(len, self.strings), default=0)

    def find(self, text: str, start: int = 0) -> int | None:
        """Offset of the earliest stop string in text[start:], or None. A growing text is searched from
        len(text before) - longest + 1: earlier matches would have been found before."""
        hits = [i for i in (text.find(s, start) for s in self.strings) if i >= 0]
        return min(hits) if hits else None

    def held(self, text: str) -> int:
        """The length of the longest tail of text that begins a stop string."""
        return max((n for s in self.strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class RowSampler:
    """Next tokens for a running batch whose rows each have their own options, on the device and without a host
    sync: the score edits and warpers of `Processors`, `warp` and `choose`, applied per row with the same
    arithmetic, so a row gets what it would get alone. Rows are objects with `options`, `eos`, `banned`,
    `generator`, `slot` and `generated` (tokens so far). The repetition penalty reads each slot's tokens from a
    device copy of its history (`start` and `append` keep it)."""

    def __init__(self, slots: int, max_len: int, device):
        # (slots, max_len) each slot's prompt and generated ids; positions past its length repeat its first id, so a
        # penalty gathered over a whole row touches only tokens the row has (penalizing one twice is idempotent).
        self.history = torch.zeros(slots, max_len, dtype=torch.long, device=device)
        self.device = torch.device(device)
        self.masks: dict = {}  # (V,) bool per token tuple and vocabulary size

    def start(self, slot: int, ids: list[int]):
        row = torch.full((self.history.shape[1],), ids[0], dtype=torch.long)
        row[: len(ids)] = torch.tensor(ids)
        self.history[slot] = to_device(row, self.device)

    def append(self, slots: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor):
        """slots, positions, tokens (B,) device tensors: each row's new token at its position."""
        self.history[slots, positions.clamp(max=self.history.shape[1] - 1)] = tokens

    def __call__(self, logits: torch.Tensor, rows: list, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, V) of the rows, in order; slots (B,) their slots on the device -> (B,) next tokens, and (B,)
        bool: rows with no token to pick (a NaN or +inf score, or every token banned). Their tokens mean nothing,
        and the draw that gives them cannot fail, so one such row harms no other."""
        scores = logits.to(torch.float32, copy=True)
        penalties = [r.options.repetition_penalty for r in rows]
        if any(p != 1.0 for p in penalties):
            seen = self.history[slots]  # (B, max_len)
            p = to_device(torch.tensor(penalties, dtype=torch.float32)[:, None], self.device)
            s = scores.gather(1, seen)
            scores.scatter_(1, seen, torch.where(s < 0, s * p, s / p))  # p = 1: s * 1 and s / 1 are exact
        for ids, where in _groups(rows, lambda r: tuple(r.banned)).items():
            if ids:
                self._mask(scores, where, len(rows), ids)
        short = [i for i, r in enumerate(rows) if r.eos and len(r.generated) < r.options.min_new_tokens]
        for ids, where in _groups([rows[i] for i in short], lambda r: tuple(r.eos)).items():
            self._mask(scores, [short[i] for i in where], len(rows), ids)
        bad = ~((scores.isfinite() | (scores == -float("inf"))).all(dim=-1) & scores.isfinite().any(dim=-1))
        tokens = scores.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.options.do_sample]
        for warping, where in _groups([rows[i] for i in sampled], _warping).items():
            index = [sampled[i] for i in where]
            at = _rows(index, self.device)
            probs = warp(scores[at], rows[index[0]].options).softmax(dim=-1).masked_fill(bad[at][:, None], 1.0)
            for j, i in enumerate(index):
                tokens[i : i + 1] = torch.multinomial(probs[j : j + 1], 1, generator=rows[i].generator)[:, 0]
        return tokens, bad

    def _mask(self, scores: torch.Tensor, where: list[int], n: int, ids: tuple[int, ...]):
        key = (ids, scores.shape[-1])
        if key not in self.masks:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool)
            mask[[i for i in ids if 0 <= i < scores.shape[-1]]] = True
            self.masks[key] = to_device(mask, self.device)
        if len(where) == n:
            scores.masked_fill_(self.masks[key], -float("inf"))
        else:
            index = _rows(where, self.device)
            scores[index] = scores[index].masked_fill(self.masks[key], -float("inf"))


def _warping(row) -> tuple:
    o = row.options
    return o.temperature, o.top_k, o.top_p


def _groups(rows: list, key) -> dict:
    """key(row) -> positions of the rows with that key, in order."""
    out: dict = {}
    for i, r in enumerate(rows):
        out.setdefault(key(r), []).append(i)
    return out


def _rows(index: list[int], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(index, dtype=torch.long), device)
