"""The guide's prompt templates, as data, and the checks on the tasks' arguments. Each builder returns one prompt:
a list of text and image items."""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from idefics.checks import show
from idefics.errors import IdeficsError
from idefics.images import is_image_reference, is_image_source

CAPTION_PROMPT = "This is an image of "
VQA_INSTRUCTION = "Instruction: Provide an answer to the question. Use the image to answer.\n"
VQA_QUESTION = "Question: {question} Answer:"
CLASSIFY_INSTRUCTION = "Instruction: Classify the following image into a single category from the following list: {labels}.\n"
CLASSIFY_ANSWER = "Category: "
STORY_INSTRUCTION = "Instruction: Use the image to write a story. \n"
STORY_ANSWER = "Story: \n"
FEW_SHOT_USER = "User:"
FEW_SHOT_QUESTION = "Describe this image.\nAssistant:"
END_OF_UTTERANCE = "<end_of_utterance>"

# The guide's generation settings per task. The prompts with consecutive texts keep the guide's processing on
# instruct checkpoints too: its chat passes add_end_of_utterance_token=False, its few-shot runs on a base model.
DEFAULTS: dict[str, dict[str, Any]] = {
    "caption": {"max_new_tokens": 10},
    "prompted_caption": {"max_new_tokens": 20},
    "few_shot": {"max_new_tokens": 30, "add_end_of_utterance_token": False},
    "ask": {"max_new_tokens": 20},
    "classify": {"max_new_tokens": 6},
    "story": {"num_beams": 2, "max_new_tokens": 200},
    "chat": {"max_new_tokens": 100, "add_end_of_utterance_token": False},
}


def options(task: str, given: dict) -> dict:
    """The task's defaults under the caller's options. A given max_length replaces the default max_new_tokens,
    which would otherwise win over it."""
    merged = dict(DEFAULTS[task])
    if "max_length" in given and "max_new_tokens" not in given:
        merged.pop("max_new_tokens", None)
    return merged | given


def as_image(item, where: str = "image"):
    """A task's image argument as a prompt item: a str that is not a URL or data URI names a file."""
    if item is None:
        raise IdeficsError(f"{where}: missing image")
    if isinstance(item, str):
        return item if is_image_reference(item) else Path(item)
    if isinstance(item, os.PathLike):
        return Path(item)
    if not is_image_source(item):
        raise IdeficsError(f"{where}: unsupported image of type {type(item).__name__} "
                           "(expected a PIL image, path, URL, data URI or bytes)")
    return item


def as_images(image) -> tuple[list, bool]:
    """One image or a list of them -> (prompt items, whether one was given)."""
    single = not isinstance(image, (list, tuple))
    images = [image] if single else list(image)
    if not images:
        raise IdeficsError("no image given: pass an image or a non-empty list of images")
    if single:
        return [as_image(image)], True
    return [as_image(x, f"image {i}") for i, x in enumerate(images)], False


def as_labels(labels) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise IdeficsError(f"labels must be a list of strings, got {type(labels).__name__}")
    labels = list(labels)
    if not labels:
        raise IdeficsError("no labels given: classification needs at least one label")
    for i, label in enumerate(labels):
        as_text(label, f"label {i}")
    if len(set(labels)) != len(labels):
        raise IdeficsError(f"duplicate label {show(next(x for x in labels if labels.count(x) > 1))}")
    return labels


def as_text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise IdeficsError(f"{name}: expected a non-empty string, got {show(value)}")
    return valid_text(value, name)


def valid_text(text: str, where: str) -> str:
    """Text the tokenizer can read: a lone surrogate (half of a UTF-16 pair, as a bad decode leaves behind) has
    no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise IdeficsError(f"{where}: text is not valid Unicode ({show(text[e.start])} at character {e.start})") \
            from None
    return text


def as_examples(examples) -> list[tuple[Any, str]]:
    """Few-shot examples: (image, answer) pairs."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not examples:
        raise IdeficsError("few-shot examples must be a non-empty list of (image, text) pairs")
    pairs = []
    for i, pair in enumerate(examples):
        if not isinstance(pair, Sequence) or isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise IdeficsError(f"example {i}: expected an (image, text) pair")
        pairs.append((as_image(pair[0], f"example {i}"), as_text(pair[1], f"example {i} text")))
    return pairs


def caption(image, prompt: str | None = None) -> list:
    """No prompt: the model captions from BOS; with one: prompted captioning."""
    return [image] if prompt is None else [image, prompt]


def ask(image, question: str) -> list:
    return [VQA_INSTRUCTION, image, VQA_QUESTION.format(question=question)]


def classify(image, labels: Sequence[str]) -> list:
    # The guide formats the label list as a Python list: ['animals', 'vegetables', ...]
    return [CLASSIFY_INSTRUCTION.format(labels=list(labels)), image, CLASSIFY_ANSWER]


def story(image, instruction: str | None = None) -> list:
    return [instruction or STORY_INSTRUCTION, image, STORY_ANSWER]


def few_shot(examples: Sequence[tuple[Any, str]], image, question: str = FEW_SHOT_QUESTION) -> list:
    """examples: (image, answer) pairs, each shown as a finished User/Assistant exchange."""
    prompt: list = []
    for example_image, answer in examples:
        prompt += [FEW_SHOT_USER, example_image, f"{question} {answer.strip()}\n"]
    return prompt + [FEW_SHOT_USER, image, question]


def user_turn(items: Sequence, first: bool = False) -> list:
    """A user turn of an instruct conversation, items (text and images) in order, in the guide's format:
    ["What is in this image?", img] -> ["User: What is in this image?", img, "<end_of_utterance>"];
    [img, "And who is that?"] -> ["\nUser:", img, "And who is that?<end_of_utterance>"]."""
    head = ("" if first else "\n") + "User:"
    items = list(items)
    out: list = [head + " " + items.pop(0)] if items and is_text(items[0]) else [head]
    out += items
    if len(out) > 1 and is_text(out[-1]):
        out[-1] += END_OF_UTTERANCE
    else:
        out.append(END_OF_UTTERANCE)
    return out


def assistant_turn(reply: str | None = None) -> list:
    """The assistant's cue, or a finished reply kept in the history."""
    return ["\nAssistant:"] if reply is None else [f"\nAssistant: {reply.strip()}{END_OF_UTTERANCE}"]


def is_text(item) -> bool:
    return isinstance(item, str) and not is_image_reference(item)


@dataclass(frozen=True)
class Task:
    """A task as the command line and batch files name it: the fields it reads besides its images and options,
    and its call on a model (one image -> one result, a list -> a list)."""

    fields: tuple[str, ...]
    run: Callable  # (model, images, fields: dict, options: dict) -> result(s)


def _classify(m, images, f: dict, o: dict):
    mode = f.get("mode") or "rank"
    return m.classify(images, f.get("labels"), mode, **(o if mode != "rank" else {}))  # rank takes no options


TASKS: dict[str, Task] = {
    "caption": Task(("prompt",), lambda m, images, f, o: m.caption(images, f.get("prompt"), **o)),
    "ask": Task(("question",), lambda m, images, f, o: m.ask(images, f.get("question"), **o)),
    "classify": Task(("labels", "mode"), _classify),
    "story": Task(("instruction",), lambda m, images, f, o: m.story(images, f.get("instruction"), **o)),
    "few_shot": Task(("examples",), lambda m, images, f, o: m.few_shot(f.get("examples"), images, **o)),
}
