"""Logits -> next token: the reference's logits processors (same order and arithmetic), greedy, sampling and beam
search, and stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Literal

import torch

from idefics.checks import FieldError, check, limited, show
from idefics.errors import IdeficsError


MAX_BEAMS = 64  # the reference takes any number, but beams past a few dozen gain nothing and each holds a cache row
MAX_EOS = 64  # each eos id widens beam search's candidates by num_beams
MAX_STOP = 64  # each stop string is searched for in the text at every token
MAX_STOP_CHARS = 256
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
    seed: int | None = limited(None, low=0, high=2**64 - 1)  # what torch.Generator.manual_seed takes
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

    def find(self, text: str) -> int | None:
        """Offset of the earliest stop string in text, or None."""
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else None

    def shown(self, text: str) -> int:
        """How much of a growing text can be shown: none of a stop string, nor of a tail that may begin one."""
        at = self.find(text)
        if at is not None:
            return at
        held = max((n for s in self.strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return len(text) - held


NEG = -1.0e9  # the reference's score for "never pick this"


class BeamSearch:
    """The reference's beam search (transformers `_beam_search`) for G prompts of k beams each, with the same
    tensor arithmetic, so that the same beams win. Each step takes the `width` best continuations of a prompt over
    all its beams (width = max(2, 1 + number of eos ids) * k, so k of them are always open), keeps the k best
    open ones running and merges those among the k best that end into the prompt's k best finished hypotheses,
    scored by sum of log-probs / generated length ** length_penalty."""

    def __init__(self, groups: int, o: GenerationOptions, eos_count: int, budgets: list[int], device):
        k = o.num_beams
        self.k, self.width = k, max(2, 1 + eos_count) * k
        self.length_penalty, self.early_stopping = o.length_penalty, o.early_stopping
        self.budgets = budgets  # new tokens allowed, per prompt
        self.length = 0  # tokens generated by every running beam
        # Only the first beam starts live, so the first step does not pick k copies of one token.
        self.scores = torch.zeros(groups, k, device=device)  # (G, k) running beams' summed log-probs, best first
        self.scores[:, 1:] = NEG
        self.best = torch.full((groups, k), NEG, device=device)  # (G, k) finished hypotheses' scores, best first
        self.ended = torch.zeros(groups, k, dtype=torch.bool, device=device)  # (G, k) which of those are real
        self.first_k = torch.arange(self.width, device=device) < k  # (width,)
        self.beams: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(groups)]  # running tokens
        self.hypotheses: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(groups)]  # finished tokens

    def expand(self, log_probs: torch.Tensor) -> list[list[list[int]]]:
        """log_probs (G*k, V), processed -> each prompt's `width` best continuations (tokens), best first."""
        g, k = self.scores.shape
        v = log_probs.shape[-1]
        total = (log_probs.view(g, k, v) + self.scores[:, :, None]).view(g, k * v)
        self.top, index = torch.topk(total, self.width)  # (G, width)
        self.sources = index // v
        tokens = (index % v).tolist()
        self.candidates = [[beams[b] + [t] for b, t in zip(src, tok)]
                           for beams, src, tok in zip(self.beams, self.sources.tolist(), tokens)]
        return self.candidates

    def select(self, ends: torch.Tensor) -> torch.Tensor:
        """ends (G, width) bool: which continuations end there (eos, stop string, length). Advances every prompt
        one token -> (G, k) the running beam each new running beam continues."""
        open_scores = self.top + ends.to(torch.float32) * NEG
        keep = torch.topk(open_scores, self.k)[1]
        self.scores = open_scores.gather(1, keep)
        sources = self.sources.gather(1, keep)
        self.beams = [[c[j] for j in row] for c, row in zip(self.candidates, keep.tolist())]
        self._finish(ends & self.first_k[None])
        self.length += 1
        self.improvable = self._improvable()
        return sources

    def _finish(self, just_ended: torch.Tensor):
        # The reference also blocks new hypotheses once a prompt's search is over; here that prompt has left.
        scores = self.top / ((self.length + 1) ** self.length_penalty)
        scores += (~just_ended) * NEG
        merged = torch.cat((self.best, scores), dim=1)  # (G, k + width)
        pick = torch.topk(merged, self.k)[1]
        self.best = merged.gather(1, pick)
        self.ended = torch.cat((self.ended, just_ended), dim=1).gather(1, pick)
        pools = [h + c for h, c in zip(self.hypotheses, self.candidates)]
        self.hypotheses = [[pool[j] for j in row] for pool, row in zip(pools, pick.tolist())]

    def _improvable(self) -> torch.Tensor:
        """(G,) whether a running beam could still beat the worst finished hypothesis. With early_stopping False
        (or "never" with length_penalty <= 0) the reference assumes the best beam's length stays as it is now;
        with "never" and a positive length_penalty it assumes the longest allowed length."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best = torch.cat([self.scores[g : g + 1, :1] / (budget ** self.length_penalty)
                              for g, budget in enumerate(self.budgets)])
        else:
            best = self.scores[:, :1] / (self.length ** self.length_penalty)
        worst = torch.where(self.ended, torch.min(self.best, dim=1, keepdim=True)[0], NEG)
        return torch.any(best > worst, dim=-1)

    def done(self, ends: torch.Tensor) -> list[bool]:
        """ends (G, width) as given to select -> whether each prompt's search is over."""
        full = torch.all(self.ended, dim=-1) & (self.early_stopping is True)
        return (~self.improvable | full | torch.all(ends, dim=-1)).tolist()

    def keep(self, groups: list[int]):
        """Continue only these prompts (indices into the current ones), in this order."""
        index = torch.tensor(groups, dtype=torch.long, device=self.scores.device)
        self.scores, self.best, self.ended = self.scores[index], self.best[index], self.ended[index]
        self.budgets = [self.budgets[g] for g in groups]
        self.beams = [self.beams[g] for g in groups]
        self.hypotheses = [self.hypotheses[g] for g in groups]
