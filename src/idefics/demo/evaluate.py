"""Accuracy of a model on held-out scenes, per task: `python -m idefics.demo.evaluate` (the demo model, 500 scenes).

Each task gets its own held-out scene per index (seeds no training batch uses). Suites: "train" draws like the
training data (Pillow, random size, outlines, blur, JPEG); "other" uses the second renderer (numpy coverage,
CSS shades, other geometry, sizes and JPEG); "mixed" alternates the two."""
from __future__ import annotations

import argparse
import random
import time

from idefics import tasks
from idefics.demo import data
from idefics.demo.scenes import Scene, render, render_alt, sample_css_scene, sample_scene

TASKS = ("caption", "prompted_caption", "vqa/color", "vqa/shape", "vqa/count", "vqa/yes/no", "vqa/position",
         "vqa/size", "classify", "few_shot", "story", "chat")
VQA_MAIN = ("vqa/color", "vqa/shape", "vqa/count", "vqa/yes/no")  # the questions the accuracy goal names
OTHER_SIZES = [(100, 100), (160, 160), (224, 224), (300, 200), (240, 320), (400, 400)]
# The guide's settings, except the story: greedy (exact answers), long enough for the demo's stories.
OPTIONS = {"caption": tasks.DEFAULTS["caption"], "prompted_caption": tasks.DEFAULTS["prompted_caption"],
           "classify": tasks.DEFAULTS["classify"], "few_shot": tasks.DEFAULTS["few_shot"],
           "story": {"max_new_tokens": 80}, "chat": tasks.DEFAULTS["chat"], "vqa": tasks.DEFAULTS["ask"]}


def draw_train(scene: Scene, rng: random.Random):
    return render(scene, rng)


def draw_other(scene: Scene, rng: random.Random):
    return render_alt(scene, rng.choice(OTHER_SIZES), ring=rng.random() < 0.2, quality=rng.choice([None, 40, 60, 85]))


SUITES = {"train": (sample_scene, draw_train), "other": (sample_css_scene, draw_other)}


def build(task: str, rng: random.Random, sample) -> data.Example:
    if task.startswith("vqa/"):
        return data.vqa(rng, sample, kind=task[4:])
    return data.BUILDERS[task](rng, sample)


def heldout(task: str, index: int, suite: str) -> tuple[data.Example, list]:
    """Held-out example `index` of a task, and its prompt with the scenes drawn."""
    if suite == "mixed":
        suite = ("train", "other")[index % 2]
    rng = random.Random(f"heldout-{suite}-{task}-{index}")
    sample, draw = SUITES[suite]
    example = build(task, rng, sample)
    return example, [draw(item, rng) if isinstance(item, Scene) else item for item in example.prompt]


def scores(task: str, text: str, answer: str) -> dict[str, bool]:
    """Whether the output is right, by each measure of the task. Captions: every colored shape of the scene named,
    none that is not there (the measure the accuracy goal names); and "exact": each with its count too. Other
    tasks: the exact answer, ignoring case, spacing and a final period."""
    if task in ("caption", "prompted_caption"):
        want, got = data.named_objects(answer), data.named_objects(text)
        return {task: set(want) == set(got), f"{task} exact": want == got}
    return {task: data.normalize(text) == data.normalize(answer)}


def evaluate(model, scenes: int = 500, suite: str = "train", task_names=TASKS, batch: int = 50,
             failures: list | None = None) -> dict[str, tuple[int, int]]:
    """measure -> (correct, total); a task's main measure is named as the task. Wrong answers are appended to
    `failures` as (task, answer, output)."""
    results: dict[str, tuple[int, int]] = {}
    for task in task_names:
        items = [heldout(task, i, suite) for i in range(scenes)]
        options = OPTIONS["vqa" if task.startswith("vqa/") else task]
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            outputs = model.generate([prompt for _, prompt in chunk], **options)
            for (example, _), out in zip(chunk, outputs):
                for measure, ok in scores(task, out.text, example.answer).items():
                    hits, total = results.get(measure, (0, 0))
                    results[measure] = (hits + ok, total + 1)
                    if not ok and measure == task and failures is not None:
                        failures.append((task, example.answer, out.text))
    return results


def summary(results: dict[str, tuple[int, int]]) -> list[str]:
    lines = [f"{task:18s} {hits / total:7.1%}  ({hits}/{total})" for task, (hits, total) in results.items()]
    main = [results[t] for t in VQA_MAIN if t in results]
    if main:
        hits, total = sum(h for h, _ in main), sum(t for _, t in main)
        lines.append(f"{'vqa (main four)':18s} {hits / total:7.1%}  ({hits}/{total})")
    return lines


def main(argv=None) -> None:
    import idefics

    parser = argparse.ArgumentParser(prog="python -m idefics.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the demo model)")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes per task")
    parser.add_argument("--suite", choices=["train", "other", "mixed", "all"], default="all")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--device")
    parser.add_argument("--quantize")
    parser.add_argument("--show-failures", type=int, default=0, metavar="N", help="print N wrong answers per suite")
    args = parser.parse_args(argv)
    model = idefics.load(args.model, device=args.device, quantize=args.quantize)
    for suite in (["train", "other"] if args.suite == "all" else [args.suite]):
        start, failures = time.time(), []
        results = evaluate(model, args.scenes, suite, args.tasks, failures=failures)
        print(f"suite {suite}: {args.scenes} held-out scenes per task ({time.time() - start:.0f}s)")
        for line in summary(results):
            print("  " + line)
        for task, answer, output in failures[:args.show_failures]:
            print(f"  wrong {task}: expected {answer!r}, got {output!r}")


if __name__ == "__main__":
    main()
