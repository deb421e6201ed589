"""What a finished request gives its caller."""
from __future__ import annotations

from dataclasses import dataclass

from idefics.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str  # the continuation (or prompt + continuation with include_prompt=True)
    token_ids: list[int]  # generated ids, ending with the eos / stop token when one stopped it
    finish_reason: str  # "stop" (eos or stop string), "length" or "abort"


def completion(tokenizer: Tokenizer, r, include_prompt: bool = False) -> Completion:
    """A finished scheduler.Request -> its Completion: the decoded continuation, cut before a matched stop string."""
    text = tokenizer.decode(r.generated, skip_special_tokens=True)
    cut = len(text) - r.stop_at if r.stop_at is not None else 0  # characters of the stop string and after
    if include_prompt:
        text = tokenizer.decode(r.prompt_ids + r.generated, skip_special_tokens=True)
    return Completion(text[: len(text) - cut], list(r.generated), r.finish or "length")
