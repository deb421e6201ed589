"""Requests in and out of one running batch: who runs, with which options, until which stop rule.

`add()` puts a request in the waiting queue (or fails that request alone), `abort()` takes effect at the next
step, and `step()` admits waiting requests into free slots (one batched prefill), samples every running row's next
token with that row's own options, launches the next decode step before reading those tokens on the host (so the
host's bookkeeping overlaps the device's work) and returns each request's new token, text piece and finish
reason. Admission takes the oldest waiting request first (with a backlog, grouped with those closest to its length),
bounded by free slots and an images-per-step budget, so a request with many images delays the others by one
prefill, not more. The engine (engine.py) executes; this file decides."""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from idefics.engine import Engine, Prompt, cache_bytes, cache_room, check_room
from idefics.errors import IdeficsError
from idefics.generate import completion
from idefics.sampling import GenerationOptions, RowSampler, StopStrings
from idefics.tokenizer import Tokenizer

IMAGES_PER_STEP = 64  # images a step's prefill may encode; a request with more is admitted alone
LEN_RESERVE = 256  # the cache's length is reserved in multiples of this many tokens
ROWS = 64  # a GPU's rows without max_batch, where they fit (idefics batch: up to its window of lines in flight)
MEMORY = 0.5  # the share of a GPU's free memory (the old buffers counted as free) capacity() gives the cache
# With a backlog (more waiting than free slots), admission gathers free slots for one prefill (1/ADMIT_SHARE of the
# batch, at most ADMIT_GROUP), waiting at most ADMIT_WAIT steps: a prefill reads every weight once however many
# prompts it holds, so one prefill of 8 costs about what 3 of one cost. Without a backlog a request is admitted at
# once. (bench/mixed.py on an H100, two runs: waiting up to 24 steps 1.53x static batches, up to 16 1.47-1.48x.)
ADMIT_GROUP = 8
ADMIT_SHARE = 8
ADMIT_WAIT = 24
ADMIT_LOOKAHEAD = 64  # with a backlog, a group is the oldest request and the closest in length among this many


def default_eos(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.eos_id, tokenizer.end_of_utterance_id]
    return [i for i in ids if i is not None]


def default_banned(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.image_id, tokenizer.fake_image_id]
    return [i for i in ids if i is not None]


_ids = itertools.count()


@dataclass
class Output:
    """What one step gave a request."""

    id: object
    token: int | None  # the new token (None when the request ends without one: aborted, failed)
    text: str  # the new text: final, and holding back what may begin a stop string
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once the request has ended
    logprob: float | None = None  # the new token's log-probability under the model, if asked
    top_logprobs: list[tuple[int, float]] | None = None  # the n most likely tokens there, if asked
    error: str | None = None
    completion: object = None  # the request's Completion, once it has ended


@dataclass(eq=False)  # a request is itself: queues find and remove it by identity, not by comparing its tensors
class Request:
    """One prompt to continue. Built by `Request.make`, which checks it against the model."""

    prompt: Prompt
    options: GenerationOptions
    eos: list[int]
    banned: list[int]
    budget: int  # new tokens allowed
    id: object = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely
    generator: torch.Generator | None = None
    prompt_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    finish: str | None = None
    stop_at: int | None = None  # character offset of a matched stop string in the decoded continuation

    @classmethod
    def make(cls, prompt: Prompt, options: GenerationOptions, tokenizer: Tokenizer, context: int, *,
             id=None, logprobs: int | None = None, where: str = "prompt") -> Request:
        n = prompt.ids.shape[0]
        budget = options.new_tokens(n)
        if n >= context:
            raise IdeficsError(f"{where} has {n} tokens; the model's context is {context}")
        if budget <= 0:
            raise IdeficsError(f"{where} has {n} tokens, already at max_length {options.max_length}")
        if n + budget > context:
            raise IdeficsError(f"{where} has {n} tokens; with {budget} new tokens it exceeds the model's context "
                               f"of {context}")
        eos = options.eos_token_id if options.eos_token_id is not None else default_eos(tokenizer)
        eos = [eos] if isinstance(eos, int) else list(eos)
        banned = options.banned_token_ids if options.banned_token_ids is not None else default_banned(tokenizer)
        banned = [b for b in banned if b not in eos]  # as the reference, an eos id is never banned
        r = cls(prompt, options, eos, banned, budget, next(_ids) if id is None else id, logprobs,
                prompt_ids=prompt.ids.tolist())
        r.stops = StopStrings(options.stop)
        # No tokenizer (benchmarks, token-level callers): tokens only, no text and no stop strings.
        r.detokenizer = tokenizer.detokenizer(skip_special_tokens=True) if tokenizer is not None else None
        r.final = ""  # the detokenizer's final text so far
        r.sent = 0  # characters given out as pieces
        r.text_of = lambda ids: tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
        return r

    def seed(self, device: torch.device):
        if self.options.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.options.seed if self.options.seed is not None else torch.seed())

    def push(self, token: int) -> str:
        """Record a token -> the text that can be shown now. Sets `finish` when the token ends the request. Stop
        strings are looked for in the new text only (and the tail that could begin one)."""
        self.generated.append(token)
        if self.detokenizer is None:
            self.finish = "stop" if token in self.eos else "length" if len(self.generated) >= self.budget else None
            return ""
        before = len(self.final)
        self.final += self.detokenizer.push(token)
        text = self.final + self.detokenizer.held()
        start = max(0, before - self.stops.longest + 1)
        if self.stops.strings:
            self.stop_at = self.stops.find(text, start)
        if self.stop_at is not None or token in self.eos:
            self.finish = "stop"
        elif len(self.generated) >= self.budget:
            self.finish = "length"
        if self.finish:
            return ""  # the last piece comes from the completion's final text
        shown = len(text) - self.stops.held(text) if self.stops.strings else len(self.final)
        shown = min(shown, len(self.final))
        piece, self.sent = self.final[self.sent : shown], max(self.sent, shown)
        return piece


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, max_batch: int | None = None,
                 images_per_step: int = IMAGES_PER_STEP):
        self.engine = engine
        self.tokenizer = tokenizer
        self.context = engine.model.config.max_position_embeddings
        self.max_batch = max_batch
        self.rows = ROWS  # the most rows capacity() reserves without max_batch (see there)
        self.memory = MEMORY
        self.images_per_step = images_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order of `logits`' rows
        self.aborted: set = set()
        self.logits: torch.Tensor | None = None  # the last decode step's output, for `running`
        self.sampler: RowSampler | None = None
        self.hold = False  # admit no one (something waits for the running batch to drain)
        self.deferred = 0  # steps admission has waited to gather a group

    def add(self, request: Request):
        """Queue a request made by Request.make (which checks it, so a bad one fails alone, before it is queued)."""
        self.waiting.append(request)

    def abort(self, id):
        self.aborted.add(id)

    @property
    def busy(self) -> bool:
        return bool(self.running or (self.waiting and not self.hold))

    def reset(self):
        """Forget every request (after a fault of the engine)."""
        self.waiting.clear()
        self.running, self.logits = [], None
        self.aborted.clear()
        self.engine.release_all()

    def step(self) -> list[Output]:
        out = self._apply_aborts()
        new, new_logits = self._admit()
        rows = self.running + new
        if not rows:
            return out
        logits = new_logits if not self.running else \
            self.logits if not new else torch.cat([self.logits, new_logits])
        slots = self.engine.index([r.slot for r in rows])
        tokens, bad = self.sampler(logits, rows, slots)
        picks = self._logprobs(logits, tokens, rows)
        read = _host_copy([tokens, bad, *picks])
        lengths = self.engine.lengths[slots]
        self.sampler.append(slots, lengths, tokens)
        # Launch the next step before reading this one's tokens, unless every row ends now whatever it picked.
        ahead = any(len(r.generated) + 1 < r.budget for r in rows)
        if ahead:
            self.logits = self.engine.decode(tokens, [r.slot for r in rows])
        values, failed, *picked = read()
        running = []
        for i, (r, t) in enumerate(zip(rows, values)):
            if failed[i]:
                o = self._fail(r, "the model's scores for this request are not finite (NaN or infinity), "
                                  "or every token is banned")
                out.append(o)
                continue
            piece = r.push(t)
            o = Output(r.id, t, piece)
            if picked:
                o.logprob = picked[0][i]
                if r.logprobs:
                    o.top_logprobs = list(zip(picked[1][i][: r.logprobs], picked[2][i][: r.logprobs]))
            if r.finish:
                self._settle(r, o)
            else:
                running.append(r)
            out.append(o)
        if ahead and len(running) < len(rows):
            keep = [i for i, r in enumerate(rows) if not r.finish]
            self.logits = self.logits[self.engine.index(keep)] if keep else None
        self.running = running
        assert ahead or not running, "a row continues without a next step"
        return out

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[Request]) -> list[torch.Tensor]:
        """If any row asked: each row's chosen token's log-probability under the model, and the most likely ones."""
        if all(r.logprobs is None for r in rows):
            return []
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(1, tokens[:, None])[:, 0]
        n = max(r.logprobs or 0 for r in rows)
        if not n:
            return [chosen]
        top = lp.topk(n, dim=-1)
        return [chosen, top.indices, top.values]

    def _fail(self, r: Request, error: str) -> Output:
        """The request ends alone with an error: its slot is freed, the others run on."""
        self.engine.release(r.slot)
        r.slot, r.finish = None, "error"
        return Output(r.id, None, "", "error", error=error)

    def _settle(self, r: Request, o: Output):
        """The request has ended: free its slot, and give its last piece and its completion."""
        self.engine.release(r.slot)
        r.slot = None
        if self.tokenizer is None:
            o.finish_reason = r.finish
            return
        c = completion(self.tokenizer, r)
        o.finish_reason, o.completion = r.finish, c
        o.text = c.text[r.sent :]
        r.sent = len(c.text)

    def _apply_aborts(self) -> list[Output]:
        out = []
        if not self.aborted:
            return out
        for r in [r for r in self.waiting if r.id in self.aborted]:
            self.waiting.remove(r)
            r.finish = "abort"
            out.append(Output(r.id, None, "", "abort"))
        keep = []
        for i, r in enumerate(self.running):
            if r.id in self.aborted:
                self.engine.release(r.slot)
                r.finish = "abort"
                out.append(Output(r.id, None, "", "abort"))
            else:
                keep.append(i)
        if len(keep) < len(self.running):
            self.logits = self.logits[self.engine.index(keep)] if keep else None
            self.running = [self.running[i] for i in keep]
        self.aborted.clear()
        return out

    def _admit(self) -> tuple[list[Request], torch.Tensor | None]:
        """Waiting requests into free slots (in the order of _candidates) -> those admitted and their first logits."""
        if not self.waiting or self.hold:
            return [], None
        self._reserve()
        batch, images = [], 0
        free = self.engine.free_slots()  # lowest first
        limit = self.max_batch or self.engine.slots
        room = min(len(free), limit - len(self.running))
        if room <= 0:
            return [], None
        group = max(1, min(ADMIT_GROUP, limit // ADMIT_SHARE))
        if self.running and len(self.waiting) > room and room < group and self.deferred < ADMIT_WAIT:
            self.deferred += 1
            return [], None
        self.deferred = 0
        for r in self._candidates(room):
            n = r.prompt.pixels.shape[0]
            if batch and images + n > self.images_per_step:
                break
            if not self._fits(r):
                break  # it waits for the running batch to drain, then the buffers grow (see _reserve)
            batch.append(r)
            images += n
            if len(batch) == room:
                break
        if not batch:
            return [], None
        for r in batch:
            self.waiting.remove(r)
        for r, slot in zip(batch, free):
            r.slot = slot
            r.seed(self.engine.device)
            self.sampler.start(slot, r.prompt_ids)
        logits = self.engine.prefill_batch([r.prompt for r in batch], slots=[r.slot for r in batch])
        return batch, logits

    def _candidates(self, room: int) -> list[Request]:
        """The order admission considers waiting requests in: first come, first served; with a backlog, the oldest
        first, then the next ADMIT_LOOKAHEAD by how close their prompts are to its length, since a prefill pads
        every prompt to its group's longest. The oldest always goes first, so no request waits forever."""
        if len(self.waiting) <= room:
            return list(self.waiting)
        head, *rest = itertools.islice(self.waiting, ADMIT_LOOKAHEAD)
        n = head.prompt.ids.shape[0]
        return [head] + sorted(rest, key=lambda r: abs(r.prompt.ids.shape[0] - n))

    def _fits(self, r: Request) -> bool:
        e = self.engine
        return r.prompt.ids.shape[0] + r.budget <= e.max_len and r.prompt.pixels.shape[0] <= e.max_images

    def _reserve(self):
        """Size the buffers when nothing runs (the slots only grow, but for default ones a longer request's length
        cannot hold): the slots and length `capacity` gives, never less than the waiting requests need; and the
        sampler's with them."""
        e = self.engine
        if not (self.running or e.active):
            need = list(self.waiting)
            length = min(-(-max(r.prompt.ids.shape[0] + r.budget for r in need) // LEN_RESERVE) * LEN_RESERVE,
                         self.context)
            images = max(r.prompt.pixels.shape[0] for r in need)
            slots = capacity(e, length, images, self.max_batch, self.rows, self.memory)[0]
            if e.cache is None or e.slots < slots or not self._fits(need[0]):
                # Growing the slots and the length separately could ask for their product (a 1-slot cache of
                # the whole context, then 64 slots): the length is sized again for the slots kept. Without
                # max_batch, only the kept slots that fit capacity's share of the memory at this length are kept
                # (256 rows for short captions, then one long story: fewer rows, not a failed request).
                images = max(images, e.max_images)
                kept = e.slots if self.max_batch else capacity(e, length, images, None, e.slots, self.memory)[0]
                slots, length = capacity(e, length, images, max(slots, kept), memory=self.memory)
                # (a max_batch set too high for the memory fails the requests with this sentence, not the process)
                check_room(e, slots, length, images, f"{slots} rows of up to {length} tokens",
                           "lower the rows decoded at once (max_batch: idefics batch --max-batch, idefics serve "
                           "--max-concurrent) or the prompts' length")
                e.reserve(slots, length, images)
                e.warmup()
        if self.sampler is None or tuple(self.sampler.history.shape) != (e.slots, e.max_len):
            self.sampler = RowSampler(e.slots, e.max_len, e.device)


def capacity(engine: Engine, length: int, images: int, max_batch: int | None, rows: int = ROWS,
             memory: float = MEMORY) -> tuple[int, int]:
    """Slots and cache length to reserve for requests needing `length` tokens and `images` images. On the CPU:
    max_batch (default 16) at that length. On a GPU, a share (`memory`, half) of the memory left (the old buffers
    counted as free): max_batch slots (default as many as fit at that length, up to `rows`), each as long as fits,
    up to the context, so that later, longer requests rarely wait for the batch to drain."""
    if engine.device.type != "cuda":
        return max_batch or 16, length
    m = engine.model
    budget = int(cache_room(engine) * memory)
    slots = max_batch or max(1, min(rows, budget // cache_bytes(m, 1, length, images)))
    context = m.config.max_position_embeddings
    longest = max((n for n in range(length, context + 1, LEN_RESERVE) if cache_bytes(m, slots, n, images) <= budget),
                  default=length)
    return slots, longest


def default_batch(engine: Engine) -> int:
    """The slots a scheduler without max_batch reserves for short requests (16 on the CPU, up to 64 on a GPU)."""
    return capacity(engine, LEN_RESERVE, 1, None)[0]


def _host_copy(tensors: list[torch.Tensor]):
    """Start copying the tensors to the host now, ahead of what is queued after them -> a function that waits for
    that copy alone and returns their values as lists. (tolist() after the next step is queued would wait for that
    step.)"""
    if tensors[0].device.type != "cuda":
        return lambda: [t.tolist() for t in tensors]
    host = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), [h.tolist() for h in host])[1]
