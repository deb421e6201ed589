"""The guide's prompt templates, as data. Each builder returns one prompt: a list of text and image items."""
from __future__ import annotations

from typing import Any, Sequence

from idefics.images import is_image_reference

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

# The guide's generation settings per task.
DEFAULTS: dict[str, dict[str, Any]] = {
    "caption": {"max_new_tokens": 10},
    "prompted_caption": {"max_new_tokens": 20},
    "few_shot": {"max_new_tokens": 30},
    "ask": {"max_new_tokens": 20},
    "classify": {"max_new_tokens": 6},
    "story": {"num_beams": 2, "max_new_tokens": 200},
    "chat": {"max_new_tokens": 100},
}


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
    out: list = [head + " " + items.pop(0)] if items and _is_text(items[0]) else [head]
    out += items
    if len(out) > 1 and _is_text(out[-1]):
        out[-1] += END_OF_UTTERANCE
    else:
        out.append(END_OF_UTTERANCE)
    return out


def assistant_turn(reply: str | None = None) -> list:
    """The assistant's cue, or a finished reply kept in the history."""
    return ["\nAssistant:"] if reply is None else [f"\nAssistant: {reply.strip()}{END_OF_UTTERANCE}"]


def _is_text(item) -> bool:
    return isinstance(item, str) and not is_image_reference(item)
