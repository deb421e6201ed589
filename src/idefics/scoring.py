"""Ranked classification: how likely each label is as the continuation of a prompt.

Each image is encoded once (through the engine's image cache) and its cross-attention keys/values projected once
per prompt; the prompt's tokens run through the decoder once, and every label is scored as a continuation of
them: the labels' tokens are packed into one sequence, each attending to the prompt's keys/values and to its own
earlier tokens, and logits are computed at the labels' positions only."""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch

from idefics.errors import IdeficsError
from idefics.images import is_image_reference
from idefics.inputs import image_token_mask
from idefics.processor import image_attention_mask
from idefics.runtime import model_work

# The guide's prompt lists every label, so the model's context bounds the count anyway (256 short labels fill
# most of the 9b models' 2048 tokens); a category name needs far fewer characters than this.
MAX_LABELS = 256
MAX_LABEL_CHARS = 200
# Label tokens scored per decoder pass: bounds the logits held at once to this many rows of the vocabulary.
TOKENS_PER_PASS = 512


class LabelScore(NamedTuple):
    label: str
    probability: float  # softmax of the labels' log-likelihoods, over the labels given
    log_likelihood: float  # summed log-probability of the label's tokens after the prompt


class Continuation(NamedTuple):
    """A continuation as the model reads it: ids of the prompt and continuation tokenized together; the
    continuation's tokens are ids[start:]; image_mask (len(ids) - start, N) one-hot: the image each of its
    input tokens, ids[start - 1 : -1], sees."""

    ids: torch.Tensor
    start: int
    image_mask: torch.Tensor


def check_labels(labels: list[str]) -> list[str]:
    """Bounds the work a label list can cause before any of it is done."""
    if len(labels) > MAX_LABELS:
        raise IdeficsError(f"{len(labels)} labels; classification takes at most {MAX_LABELS}")
    for i, label in enumerate(labels):
        if len(label) > MAX_LABEL_CHARS:
            raise IdeficsError(f"label {i} has {len(label)} characters; a label may have at most {MAX_LABEL_CHARS}")
    return labels


def rank(m, prompts: list[list], labels: list[str]) -> list[list[LabelScore]]:
    """For each prompt, every label with its probability, best first."""
    ll = continuation_log_likelihoods(m, prompts, labels)
    probs = ll.softmax(dim=-1)
    ranked = []
    for row_ll, row_p in zip(ll.tolist(), probs.tolist()):
        scores = [LabelScore(label, p, s) for label, p, s in zip(labels, row_p, row_ll)]
        ranked.append(sorted(scores, key=lambda x: -x.log_likelihood))
    return ranked


def continuation_log_likelihoods(m, prompts: list[list], continuations: list[str],
                                 tokens_per_pass: int = TOKENS_PER_PASS) -> torch.Tensor:
    """-> (B, L) summed log-likelihood of each continuation (appended to the last text item of each prompt).

    The continuation is read as the model reads prompt + continuation: the joined text is tokenized as a whole,
    and the continuation's tokens are those past the longest common prefix with the prompt's own tokens. Where a
    merge crosses the boundary, the merged token (with the prompt characters it absorbs) counts as the
    continuation's, so every continuation is scored on exactly the tokens that follow the prompt in its sequence.
    Everything is tokenized and checked against the model's context before any image or token is computed, on
    the calling thread; the model's work runs on the engine thread, a prompt at a time, so that a running batch
    steps in between."""
    if not continuations:
        raise IdeficsError("no continuations to score")
    plans, counts = _plans(m, prompts, continuations)
    batches = [m.process([prompt]) for prompt in prompts]
    pixels = torch.cat([batch["pixel_values"][0, :n] for batch, n in zip(batches, counts)])
    # Each distinct image encoded once: (N_b, T_img, D_img) per prompt.
    features = m.loop.call(lambda: m.engine.encoder(pixels)).split(counts)
    scores = torch.zeros(len(prompts), len(continuations), dtype=torch.float64)
    for b, (batch, plan) in enumerate(zip(batches, plans)):
        image_mask = batch["image_attention_mask"][0, :, : counts[b]]
        scores[b] = m.loop.call(partial(m.engine.call, _score, batch["input_ids"][0], image_mask, features[b], plan,
                                        tokens_per_pass))
    return scores


def _plans(m, prompts: list[list], continuations: list[str]) -> tuple[list[list[Continuation]], list[int]]:
    """Each prompt's continuations and its number of images, without loading any image. Prompts whose text is
    the same (a batch of images to classify) share their continuations' tokens: tokenized once."""
    plans, counts, done = [], [], {}
    for b, prompt in enumerate(prompts):
        if not prompt or not isinstance(prompt[-1], str) or is_image_reference(prompt[-1].strip(" ")):
            raise IdeficsError(f"prompt {b}: a scored prompt must end with text")
        text, n_images = _layout(m, prompt, b)
        m.tokenizer.check_fits(len(text) + max(map(len, continuations)), m.config.max_position_embeddings,
                               f"prompt {b} with its longest continuation: ")
        key = (text, prompt[-1])  # the joined texts follow from these
        if key not in done:
            done[key] = _continuations(m, b, prompt, m.tokenizer.encode(text), n_images, continuations)
        plans.append(done[key])
        counts.append(n_images)
    return plans, counts


def _continuations(m, b: int, prompt: list, own: list[int], n_images: int,
                   continuations: list[str]) -> list[Continuation]:
    """Prompt b (own: its ids) tokenized with each continuation, each checked against the model's context."""
    context = m.config.max_position_embeddings
    if len(own) >= context:
        raise IdeficsError(f"prompt {b} has {len(own)} tokens; the model's context is {context}")
    tok, plan = m.tokenizer, []
    for text in continuations:
        joined, n = _layout(m, prompt[:-1] + [prompt[-1] + text], b)
        if n != n_images:
            raise IdeficsError(f"{text!r} turns the end of prompt {b} into an image reference")
        ids = tok.encode(joined)
        if len(ids) > context:
            raise IdeficsError(f"prompt {b} with {text!r} has {len(ids)} tokens; the model's context is {context}")
        k = _common_prefix(own, ids)
        if k == len(ids):
            raise IdeficsError(f"{text!r} adds no tokens to the prompt")
        ids = torch.tensor(ids)
        seen = image_attention_mask(ids[None], tok.image_id, tok.eos_id, max(n_images, 1))[0, :, :n_images]
        plan.append(Continuation(ids, k, seen[k - 1 : -1].bool()))
    return plan


def _layout(m, prompt: list, b: int) -> tuple[str, int]:
    """A prompt's text as the processor tokenizes it (image tokens in place) and its number of images, without
    loading the images."""
    text, images = m.processor._layout(prompt, False, f"prompt {b}, ")
    return text, len(images)


@model_work
def _score(model, ids: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor, plan: list[Continuation],
           tokens_per_pass: int) -> torch.Tensor:
    """One prompt: ids (S,), image_mask (S, N), features (N, T_img, D_img) -> each continuation's log-likelihood.
    The prompt runs once up to the last token any continuation shares with it; a continuation that starts earlier
    (a merge across the boundary) sees only the prompt's keys before its own start."""
    device = model.embed.weight.device
    image_kv = model.image_kv(features.flatten(0, 1)[None])  # per block (1, H, N * T_img, Dh)
    p = max(c.start for c in plan) - 1
    prefix = SharedPrefix()
    if p > 0:
        pos = torch.arange(p, device=device)[None]
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()[None, None]
        seen = image_token_mask(image_mask[None, :p].to(device), model.config.image_seq_len)
        model(ids[None, :p].to(device), pos, causal, image_kv, seen, prefix, logits_at=pos[:, -1])
    prefix.recording = False
    return torch.cat([_score_pack(model, prefix, p, image_kv, pack) for pack in _packs(plan, tokens_per_pass)]).cpu()


def _packs(plan: list[Continuation], tokens: int) -> list[list[Continuation]]:
    """Consecutive continuations of at most `tokens` tokens in all (a longer one alone)."""
    packs, size = [[]], 0
    for c in plan:
        n = len(c.ids) - c.start
        if packs[-1] and size + n > tokens:
            packs.append([])
            size = 0
        packs[-1].append(c)
        size += n
    return packs


def _score_pack(model, prefix: SharedPrefix, p: int, image_kv, pack: list[Continuation]) -> torch.Tensor:
    """Continuations packed into one row: each token at its own position, attending to the prefix keys before its
    continuation's start and to its continuation's earlier tokens."""
    device = model.embed.weight.device
    ids = torch.cat([c.ids[c.start - 1 : -1] for c in pack]).to(device)  # (n,)
    targets = torch.cat([c.ids[c.start :] for c in pack]).to(device)
    pos = torch.cat([torch.arange(c.start - 1, len(c.ids) - 1) for c in pack]).to(device)
    sizes = torch.tensor([len(c.ids) - c.start for c in pack], device=device)
    which = torch.arange(len(pack), device=device).repeat_interleave(sizes)  # (n,) continuation of each token
    first = torch.tensor([c.start - 1 for c in pack], device=device)[which]  # (n,) its continuation's first position
    sees_prefix = torch.arange(p, device=device)[None] < first[:, None]  # (n, p): the prompt before that
    own = (which[:, None] == which[None]) & (pos[:, None] >= pos[None])  # (n, n): its own tokens so far
    mask = torch.cat([sees_prefix, own], dim=1)[None, None]  # (1, 1, n, p + n)
    seen = image_token_mask(torch.cat([c.image_mask for c in pack])[None].to(device), model.config.image_seq_len)
    logits = model(ids[None], pos[None], mask, image_kv, seen, prefix)[0]  # (n, V): label positions only
    logp = logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    return torch.zeros(len(pack), dtype=torch.float64, device=device).index_add_(0, which, logp.double())


class SharedPrefix:
    """The decoder's cache interface (KVCache.update) for continuations of one prompt. While recording (the prompt's
    pass, one row) it keeps each layer's keys/values; afterwards a pass attends to those followed by its own, so
    the prompt's keys/values exist once however many continuations read them."""

    def __init__(self):
        self.k: list[torch.Tensor] = []  # per layer (1, H, P, Dh)
        self.v: list[torch.Tensor] = []
        self.recording = True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.k.append(k)
            self.v.append(v)
            return k, v
        if not self.k:  # an empty prefix
            return k, v
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
