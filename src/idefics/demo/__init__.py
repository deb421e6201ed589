"""The embedded demo IDEFICS: a 7M-parameter model of the IDEFICS architecture trained on synthetic scenes of
colored shapes (train.py), shipped in checkpoint/ and loaded by `idefics.load()` when no model is named.

run() shows every task of the guide on the bundled images (`make demo`, `idefics demo`)."""
from __future__ import annotations

import time

from idefics.hub import DEMO_DIR


def _show(title: str, lines) -> None:
    print(f"\n== {title}")
    for line in lines:
        print("  " + line)


def run() -> int:
    import idefics
    from idefics.demo.examples import paths

    start = time.time()
    m = idefics.load(DEMO_DIR)
    s = m.summary()
    print(f"idefics demo: the embedded model ({s['parameters'] / 1e6:.1f}M parameters, {s['device']}), "
          "trained on pictures of colored shapes")
    images = paths()
    first, second, third, fourth = images
    names = {p: p.name for p in images}

    _show("Image captioning: [image]", (f"{names[p]:22s} -> {m.caption(p)}" for p in images))
    _show('Prompted captioning: [image, "This is an image of "]',
          (f"{names[p]:22s} -> This is an image of {m.caption(p, 'This is an image of ')}" for p in images))

    example = "An image of a purple triangle. Fun fact: a triangle has three corners."
    _show("Few-shot prompting (1 shot): the answer follows the example's format",
          [f"example: {names[third]} -> {example}",
           f"{names[first]:22s} -> {m.few_shot([(third, example)], first)}",
           f"{names[second]:22s} -> {m.few_shot([(third, example)], second)}"])

    questions = [(first, "What color is the circle?"), (first, "Is the square small or large?"),
                 (second, "How many stars are there?"), (second, "Is there a triangle?"),
                 (second, "Is there a red square?"), (third, "What shape is in the image?"),
                 (fourth, "What color is the star?"), (fourth, "How many shapes are there?")]
    _show("Visual question answering: [instruction, image, question]",
          (f"{names[p]:22s} {q} -> {m.ask(p, q)}" for p, q in questions))

    shapes, colors = ["circle", "square", "triangle", "star"], ["red", "green", "blue", "yellow", "purple"]
    _show(f"Image classification: categories {shapes} / {colors}",
          [f"{names[third]:22s} -> {m.classify(third, shapes, mode='generate')} / "
           f"{m.classify(third, colors, mode='generate')}",
           f"{names[third]:22s} ranked: " + ", ".join(f"{x.label} {x.probability:.2f}" for x in m.classify(third, shapes))])

    _show("Image-guided story (num_beams=2): [instruction, image, \"Story: \\n\"]",
          [f"{names[second]:22s} -> {m.story(second)}"])

    _show('Batch inference: three prompts [image, "This is an image of "] in one call',
          (f"{names[p]:22s} -> {text}"
           for p, text in zip(images[:3], m.caption(images[:3], "This is an image of "))))

    chat = m.chat()
    turns = [["What is in this image?", first], [fourth, "And what is in this one?"]]
    lines = []
    for turn in turns:
        said = " ".join(names.get(x, x) if not isinstance(x, str) else x for x in turn)
        lines += [f"User: {said}", f"Assistant: {chat.send(turn)}"]
    _show("Chat (instruct format, stops at <end_of_utterance>)", lines)

    print(f"\n({time.time() - start:.1f}s. Any IDEFICS checkpoint runs the same way: idefics.load(\"HuggingFaceM4/"
          "idefics-9b-instruct\"), or --model / $IDEFICS_MODEL on the command line.)")
    return 0
