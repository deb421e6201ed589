"""Task examples from scenes, in the guide's prompt formats (idefics.tasks): a prompt whose images are still
Scene objects, and the answer the model should give. The training data and the evaluation are both made here."""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from idefics import tasks
from idefics.demo.scenes import COLORS, SHAPES, Scene, sample_scene

NUMBERS = ("zero", "one", "two", "three")
FACTS = {"circle": "a circle has no corners.", "square": "a square has four equal sides.",
         "triangle": "a triangle has three corners.", "star": "this star has five points."}
COUNT_LABELS = ("one shape", "two shapes", "three shapes")
DESCRIBE = ("What is in this image?", "Describe this image.", "What do you see?")
NEXT_IMAGE = ("And what is in this one?", "And this one?", "What about this image?")
VQA_KINDS = ("color", "shape", "count", "yes/no", "position", "size")


@dataclass
class Example:
    task: str  # caption, prompted_caption, vqa/<kind>, classify, few_shot, story, chat
    prompt: list  # text items and Scene objects, in the order of tasks.py's templates
    answer: str  # the continuation, without its leading space


def article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def groups(scene: Scene) -> list[tuple[int, str, str]]:
    """(count, color, kind) of each kind of object, in a fixed order: by shape, then by color."""
    counts = Counter((s.kind, s.color) for s in scene.shapes)
    keys = sorted(counts, key=lambda kc: (SHAPES.index(kc[0]), COLORS.index(kc[1])))
    return [(counts[k], k[1], k[0]) for k in keys]


def phrase(count: int, color: str, kind: str) -> str:
    return f"{article(color)} {color} {kind}" if count == 1 else f"{NUMBERS[count]} {color} {kind}s"


def listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(scene: Scene) -> str:
    """"a red circle and two blue squares" """
    return listing([phrase(*g) for g in groups(scene)])


def caption_text(scene: Scene) -> str:
    text = describe(scene)
    return text[0].upper() + text[1:] + "."


def unique(items) -> list:
    return list(dict.fromkeys(items))


def questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every question this scene answers unambiguously, by VQA kind: (question, answer)."""
    kinds = Counter(s.kind for s in scene.shapes)
    colors = Counter(s.color for s in scene.shapes)
    pairs = Counter((s.color, s.kind) for s in scene.shapes)
    alone = [s for s in scene.shapes if kinds[s.kind] == 1]
    q: dict[str, list[tuple[str, str]]] = {k: [] for k in VQA_KINDS}
    for s in alone:
        q["color"].append((f"What color is the {s.kind}?", s.color))
        q["size"].append((f"Is the {s.kind} small or large?", "large" if s.large else "small"))
        if abs(s.x - 0.5) > 0.1:
            q["position"].append((f"Is the {s.kind} on the left or on the right?", "left" if s.x < 0.5 else "right"))
        if abs(s.y - 0.5) > 0.1:
            q["position"].append((f"Is the {s.kind} at the top or at the bottom?", "top" if s.y < 0.5 else "bottom"))
    for s in scene.shapes:
        if colors[s.color] == 1:
            q["shape"].append((f"What shape is the {s.color} shape?", s.kind))
    if len(scene.shapes) == 1:
        q["color"].append(("What color is the shape?", scene.shapes[0].color))
        q["shape"].append(("What shape is in the image?", scene.shapes[0].kind))
    q["count"].append(("How many shapes are there?", NUMBERS[len(scene.shapes)]))
    q["count"] += [(f"How many {k}s are there?", NUMBERS[kinds[k]]) for k in SHAPES]
    q["count"] += [(f"How many {c} shapes are there?", NUMBERS[colors[c]]) for c in COLORS]
    q["yes/no"] += [(f"Is there a {k}?", "yes" if kinds[k] else "no") for k in SHAPES]
    q["yes/no"] += [(f"Is there {article(c)} {c} shape?", "yes" if colors[c] else "no") for c in COLORS]
    # Colored shapes: all present ones, and near misses (a present color or a present shape, not together).
    q["yes/no"] += [(f"Is there {article(c)} {c} {k}?", "yes" if pairs[(c, k)] else "no")
                    for c in COLORS for k in SHAPES if pairs[(c, k)] or colors[c] or kinds[k]]
    return q


def pick_balanced(rng: random.Random, candidates: list[tuple[str, str]]) -> tuple[str, str]:
    """An answer value first, then a question with it: "zero" and "no" do not drown the rest."""
    answer = rng.choice(unique(a for _, a in candidates))
    return rng.choice([qa for qa in candidates if qa[1] == answer])


def vqa(rng: random.Random, sample=sample_scene, kind: str | None = None) -> Example:
    for _ in range(100):
        s = sample(rng)
        q = questions(s)
        k = kind or rng.choice([k for k in VQA_KINDS if q[k]])
        if q[k]:
            question, answer = pick_balanced(rng, q[k])
            return Example(f"vqa/{k}", tasks.ask(s, question), answer)
    raise RuntimeError(f"no scene with a {kind} question")


def vqa_set(rng: random.Random, sample=sample_scene, n: int = 3) -> list[Example]:
    """Up to n questions of different kinds about one scene."""
    s = sample(rng)
    q = questions(s)
    picked = rng.sample([k for k in VQA_KINDS if q[k]], min(n, sum(bool(v) for v in q.values())))
    return [Example(f"vqa/{k}", tasks.ask(s, question), answer)
            for k in picked for question, answer in [pick_balanced(rng, q[k])]]


def caption(rng: random.Random, sample=sample_scene) -> Example:
    s = sample(rng)
    return Example("caption", tasks.caption(s), caption_text(s))


def prompted_caption(rng: random.Random, sample=sample_scene) -> Example:
    s = sample(rng)
    return Example("prompted_caption", tasks.caption(s, tasks.CAPTION_PROMPT), describe(s) + ".")


def classify(rng: random.Random, sample=sample_scene, scheme: str | None = None) -> Example:
    """Labels of one kind (shapes, colors or counts) in random order and number; the answer is the label that
    holds, spelled as the list spells it."""
    scheme = scheme or rng.choice(["shape", "color", "count"])
    if scheme == "shape":
        s = sample(rng, kind=rng.choice(SHAPES))
        pool, answer = SHAPES, s.shapes[0].kind
    elif scheme == "color":
        s = sample(rng, color=rng.choice(COLORS))
        pool, answer = COLORS, s.shapes[0].color
    else:
        s = sample(rng)
        pool, answer = COUNT_LABELS, COUNT_LABELS[len(s.shapes) - 1]
    labels = rng.sample([p for p in pool if p != answer], rng.randint(1, len(pool) - 1)) + [answer]
    rng.shuffle(labels)
    if rng.random() < 0.3:
        labels, answer = [x.capitalize() for x in labels], answer.capitalize()
    return Example("classify", tasks.classify(s, labels), answer)


FEW_SHOT_STYLES = {
    "image_of": lambda s: f"An image of {describe(s)}.",
    "fun_fact": lambda s: f"An image of {describe(s)}. Fun fact: {FACTS[groups(s)[0][2]]}",
    "caption": caption_text,
    "colors": lambda s: "Colors: " + ", ".join(unique(c for _, c, _ in groups(s))) + ".",
    "shapes": lambda s: "Shapes: " + ", ".join(unique(k for _, _, k in groups(s))) + ".",
    "count": lambda s: f"Count: {NUMBERS[len(s.shapes)]}.",
}


def few_shot(rng: random.Random, sample=sample_scene, style: str | None = None, shots: int | None = None) -> Example:
    """1 to 3 solved examples in one answer style; the answer about the last image follows that style."""
    write = FEW_SHOT_STYLES[style or rng.choice(list(FEW_SHOT_STYLES))]
    shots = shots or rng.choice([1, 1, 2, 3])
    examples = [(s, write(s)) for s in (sample(rng) for _ in range(shots))]
    s = sample(rng)
    return Example("few_shot", tasks.few_shot(examples, s), write(s))


def story_text(scene: Scene) -> str:
    main, *others = groups(scene)
    one = main[0] == 1
    text = f"Once upon a time, {phrase(*main)} lived on a {'dark' if scene.dark else 'light'} page. "
    if others:
        text += (f"One day, {'it' if one else 'they'} met {listing([phrase(*g) for g in others])}. "
                 "They became good friends and played together every day.")
    else:
        text += "It was alone, but it was happy." if one else "They were never alone, and they were happy."
    return text + " The end."


def story(rng: random.Random, sample=sample_scene) -> Example:
    s = sample(rng)
    return Example("story", tasks.story(s), story_text(s))


def chat_reply(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A user question about one image and the assistant's reply."""
    choice = rng.random()
    alone = [s for s in scene.shapes if sum(t.kind == s.kind for t in scene.shapes) == 1]
    if choice < 0.25 and alone:
        s = rng.choice(alone)
        return f"What color is the {s.kind}?", f"The {s.kind} is {s.color}."
    if choice < 0.4:
        n = len(scene.shapes)
        return "How many shapes are there?", "There is one shape." if n == 1 else f"There are {NUMBERS[n]} shapes."
    return rng.choice(DESCRIBE), f"This picture shows {describe(scene)}."


def chat(rng: random.Random, sample=sample_scene) -> Example:
    """One or two turns in the instruct format; the second turn shows a new image or asks about the first."""
    first = sample(rng)
    question, reply = chat_reply(rng, first)
    turn = [question, first] if rng.random() < 0.7 else [first, question]
    prompt = tasks.user_turn(turn, first=True)
    if rng.random() < 0.5:
        prompt += tasks.assistant_turn(reply)
        if rng.random() < 0.6:
            second = sample(rng)
            reply = f"This picture shows {describe(second)}."
            prompt += tasks.user_turn([second, rng.choice(NEXT_IMAGE)])
        else:
            question, reply = chat_reply(rng, first)
            prompt += tasks.user_turn([question])
    return Example("chat", prompt + tasks.assistant_turn(), reply + tasks.END_OF_UTTERANCE)


BUILDERS = {"caption": caption, "prompted_caption": prompted_caption, "vqa": vqa, "classify": classify,
            "few_shot": few_shot, "story": story, "chat": chat}
# Shares of the training mix (a "vqa" draw asks three questions about one scene): questions are many-sided,
# stories and chats long but regular.
MIX = {"caption": 0.14, "prompted_caption": 0.12, "vqa": 0.22, "classify": 0.17, "few_shot": 0.15, "story": 0.07,
       "chat": 0.13}


def sample_examples(rng: random.Random) -> list[Example]:
    name = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    return vqa_set(rng) if name == "vqa" else [BUILDERS[name](rng)]


_ITEM = re.compile(r"\b(an?|one|two|three)\s+(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def named_objects(text: str) -> Counter:
    """(color, kind) -> count, from every "a red circle" / "two blue squares" in a text."""
    found: Counter = Counter()
    for amount, color, kind in _ITEM.findall(text.lower()):
        found[(color, kind)] += 1 if amount in ("a", "an") else NUMBERS.index(amount)
    return found


def normalize(text: str) -> str:
    return " ".join(text.replace(tasks.END_OF_UTTERANCE, "").split()).strip().rstrip(".").lower()
