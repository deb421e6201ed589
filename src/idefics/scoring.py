"""Ranked classification: how likely each label is as the continuation of a prompt."""
from __future__ import annotations

from typing import NamedTuple

import torch

from idefics.errors import IdeficsError
from idefics.inputs import full_logits


class LabelScore(NamedTuple):
    label: str
    probability: float  # softmax of the labels' log-likelihoods, over the labels given
    log_likelihood: float  # summed log-probability of the label's tokens after the prompt


def continuation_log_likelihoods(m, prompts: list[list], continuations: list[str], rows_per_pass: int = 16) -> torch.Tensor:
    """-> (B, L) summed log-likelihood of each continuation (appended to the last text item of each prompt).

    The continuation is read as the model reads prompt + continuation: the joined text is tokenized as a whole,
    and the continuation's tokens are those past the longest common prefix with the prompt's own tokens. Where a
    merge crosses the boundary, the merged token (with the prompt characters it absorbs) counts as the
    continuation's, so every continuation is scored on exactly the tokens that follow the prompt in its sequence."""
    for b, prompt in enumerate(prompts):
        if not prompt or not isinstance(prompt[-1], str):
            raise IdeficsError(f"prompt {b}: a scored prompt must end with text")
    prefixes = [m.process([p])["input_ids"][0].tolist() for p in prompts]
    rows = [(b, l) for b in range(len(prompts)) for l in range(len(continuations))]
    scores = torch.zeros(len(prompts), len(continuations), dtype=torch.float64)
    for start in range(0, len(rows), rows_per_pass):
        chunk = rows[start : start + rows_per_pass]
        batch = m.process([prompts[b][:-1] + [prompts[b][-1] + continuations[l]] for b, l in chunk])
        logits = full_logits(m.model, batch).float()  # (n, S, V)
        for r, (b, l) in enumerate(chunk):
            keep = batch["attention_mask"][r].bool()
            ids, row_logits = batch["input_ids"][r][keep], logits[r][keep.to(logits.device)]
            k = _common_prefix(prefixes[b], ids.tolist())
            if k == len(ids):
                raise IdeficsError(f"{continuations[l]!r} adds no tokens to the prompt")
            # Logits at position i predict token i + 1.
            logp = row_logits[k - 1 : -1].log_softmax(-1)
            scores[b, l] = logp.gather(-1, ids[k:, None].to(logp.device)).sum().item()
    return scores


def rank(m, prompts: list[list], labels: list[str]) -> list[list[LabelScore]]:
    """For each prompt, every label with its probability, best first."""
    ll = continuation_log_likelihoods(m, prompts, labels)
    probs = ll.softmax(dim=-1)
    ranked = []
    for row_ll, row_p in zip(ll.tolist(), probs.tolist()):
        scores = [LabelScore(label, p, s) for label, p, s in zip(labels, row_p, row_ll)]
        ranked.append(sorted(scores, key=lambda x: -x.log_likelihood))
    return ranked


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
