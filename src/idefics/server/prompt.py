"""What clients send (chat messages, completion prompts, the guide's tasks) -> the engine's Prompts, with their text
kept as text.

The library's process() reads special tokens written in a text item, as the reference processor does: "<image>"
typed by a user would become an image slot, "<end_of_utterance>" the end of a turn. Here the tokens that shape the
prompt (BOS, image slots, <end_of_utterance> after a turn) are placed by the template, and every text is tokenized
with special tokens read as plain characters (as transformers' `split_special_tokens=True` does). For text without
such strings the ids are exactly process()'s with add_end_of_utterance_token=False: the same layout, each text item
stripped of spaces and tokenized between the same special tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from idefics.engine import Prompt, split_batch
from idefics.processor import image_attention_mask
from idefics.tokenizer import END_OF_UTTERANCE_TOKEN


@dataclass(frozen=True)
class Token:
    """A special token placed by a template, never read from text."""

    text: str


class Raw(str):
    """Text in which "<end_of_utterance>" is that token (a completion prompt on an instruct model)."""


EOU = Token(END_OF_UTTERANCE_TOKEN)
Item = str | Image.Image | Token


def _literal(backend: Backend) -> Backend:
    """A copy of the tokenizer that reads special tokens' strings as text and never prepends "▁" for being first:
    every text here follows BOS, where the processor's "first" scheme prepends nothing."""
    copy = Backend.from_str(backend.to_str())
    pre = copy.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        copy.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="never",
                                                      split=pre.split)
    copy.encode_special_tokens = True
    return copy


class PromptBuilder:
    def __init__(self, model):
        self.tokenizer = model.tokenizer
        self.transform = model.processor.image_transform
        self.backend = _literal(model.tokenizer.backend)
        self.instruct = self.tokenizer.end_of_utterance_id is not None
        self.context = model.config.max_position_embeddings

    def text_ids(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    def check_text(self, items: list, where: str):
        """Refuses text items that together cannot fit the model's context (Tokenizer.fits): by their length."""
        self.tokenizer.check_fits(sum(len(x) for x in items if isinstance(x, str)), self.context, f"{where}: ")

    def build(self, items: list[Item], where: str = "prompt") -> Prompt:
        """Items in order -> one Prompt. Consecutive images share the separator between them, as in process().
        A text too long for the model's context is refused before it is tokenized (Tokenizer.fits)."""
        self.check_text(items, where)
        t = self.tokenizer
        ids, images, text, last_was_image = [t.bos_id], [], "", False

        def flush():
            nonlocal text
            ids.extend(self.text_ids(text))
            text = ""

        for item in items:
            if isinstance(item, Raw):
                for i, piece in enumerate(item.strip(" ").split(EOU.text)):
                    if i:
                        flush()
                        ids.append(t.end_of_utterance_id)
                    text += piece
                last_was_image = False
            elif isinstance(item, str):
                text += item.strip(" ")
                last_was_image = False
            elif isinstance(item, Token):
                flush()
                ids.append(t.token_to_id(item.text))
                last_was_image = False
            else:
                flush()
                ids += [t.image_id, t.fake_image_id] if last_was_image else [t.fake_image_id, t.image_id, t.fake_image_id]
                images.append(item)
                last_was_image = True
        flush()
        input_ids = torch.tensor([ids])
        size = self.transform.image_size
        pixels = torch.zeros(1, max(1, len(images)), self.transform.image_num_channels, size, size)
        if images:
            pixels[0, : len(images)] = self.transform(images)
            mask = image_attention_mask(input_ids, t.image_id, t.eos_id, len(images))
        else:
            mask = torch.zeros(*input_ids.shape, 1, dtype=torch.bool)
        batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                     image_attention_mask=mask)
        return split_batch(batch)[0]

    # Templates. A message's content here is a list of text and PIL images, in order.

    def chat(self, messages: list[tuple[str, list]]) -> list[Item]:
        """The guide's conversation format: "User: ...<end_of_utterance>\\nAssistant: ...<end_of_utterance>\\nUser:
        ...", ending with the assistant's cue "\\nAssistant:". System messages come first as plain text. A base
        model (no <end_of_utterance> in its vocabulary) gets the same turns without it, as the guide's few-shot
        prompts; its replies then stop at "\\nUser:" (see stop_strings)."""
        system = [text for role, content in messages if role == "system" for text in content]
        items: list[Item] = ["\n".join(system)] if system else []
        first = not items
        for role, content in messages:
            if role == "user":
                head = ("" if first else "\n") + "User:"
                content = list(content)
                items += [head + " " + content.pop(0)] if content and isinstance(content[0], str) else [head]
                items += content
                items += [EOU] if self.instruct else []
                first = False
            elif role == "assistant":
                items += ["\nAssistant: " + "".join(content).strip()] + ([EOU] if self.instruct else [])
        return items + ["\nAssistant:"]

    def stop_strings(self) -> list[str]:
        return [] if self.instruct else ["\nUser:"]

    def raw(self, content: list) -> list[Item]:
        """A completion prompt: the caller writes the whole prompt, turns included, so on an instruct model
        "<end_of_utterance>" in its text is that token; "<image>" and the other special strings stay text (images
        come only as image parts)."""
        return [Raw(x) if isinstance(x, str) and self.instruct else x for x in content]
