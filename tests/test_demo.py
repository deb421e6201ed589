"""The embedded demo model: shipped in the hub's checkpoint format, loaded by default, and right about scenes it
never saw, including scenes drawn by another renderer at other sizes and through JPEG."""
from __future__ import annotations

import json
import random

import pytest

import idefics
from idefics.demo import data, evaluate
from idefics.demo.scenes import SHAPES, render, render_alt, sample_css_scene, sample_scene
from idefics.hub import DEMO_DIR, resolve

SAMPLE = 100  # fixed held-out scenes per task, half of them drawn by the second renderer


@pytest.fixture(scope="module")
def demo():
    return idefics.load(DEMO_DIR, device="cpu")


@pytest.fixture(scope="module")
def results(demo):
    return evaluate.evaluate(demo, SAMPLE, "mixed", ("caption",) + evaluate.VQA_MAIN + ("classify",))


def test_checkpoint_is_in_the_hub_format_and_small():
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json"} <= names
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 16 << 20
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "idefics" and config["additional_vocab_size"] == 3


def test_special_tokens_follow_the_base_vocabulary(demo):
    t, base = demo.tokenizer, demo.config.vocab_size
    assert (t.fake_image_id, t.image_id, t.end_of_utterance_id) == (base, base + 1, base + 2)


def test_load_without_a_model_is_the_demo(monkeypatch):
    monkeypatch.delenv("IDEFICS_MODEL", raising=False)
    assert resolve(None) == DEMO_DIR


def test_vqa_exact_match_on_held_out_scenes(results):
    hits = sum(results[t][0] for t in evaluate.VQA_MAIN)
    total = sum(results[t][1] for t in evaluate.VQA_MAIN)
    assert hits / total >= 0.95, evaluate.summary(results)


@pytest.mark.parametrize("task", evaluate.VQA_MAIN)
def test_each_kind_of_question(results, task):
    hits, total = results[task]
    assert hits / total >= 0.9, evaluate.summary(results)


def test_classification_on_held_out_scenes(results):
    hits, total = results["classify"]
    assert hits / total >= 0.95, evaluate.summary(results)


def test_captions_name_every_shape_with_its_color(results):
    hits, total = results["caption"]
    assert hits / total >= 0.9, evaluate.summary(results)


def test_answers_do_not_depend_on_the_renderer(demo):
    """One scene drawn four ways (training renderer, second renderer at two sizes, JPEG) gets one answer."""
    scene = sample_scene(random.Random(7), count=1, kind="triangle", color="blue")
    images = [render(scene), render_alt(scene, (120, 120)), render_alt(scene, (400, 300), quality=50),
              render_alt(scene, (224, 224), ring=True)]
    assert demo.ask(images, "What shape is in the image?") == ["triangle"] * 4
    assert demo.ask(images, "What color is the shape?") == ["blue"] * 4


def test_task_formats(demo):
    """Prompted captions, few-shot answers in the examples' format, chat replies ending at <end_of_utterance>."""
    rng = random.Random(11)
    scenes = [sample_css_scene(rng, count=2) for _ in range(3)]
    images = [render_alt(s, (200, 200)) for s in scenes]
    assert demo.caption(images[0], "This is an image of ") == data.describe(scenes[0]) + "."
    style = data.FEW_SHOT_STYLES["colors"]
    assert demo.few_shot([(images[1], style(scenes[1]))], images[2]) == style(scenes[2])
    chat = demo.chat()
    assert chat.send(["What is in this image?", images[2]]) == f"This picture shows {data.describe(scenes[2])}."


def test_ranked_classification_prefers_the_true_shape(demo):
    scene = sample_scene(random.Random(3), count=1, kind="star")
    best = demo.classify(render_alt(scene, (160, 160)), list(SHAPES))[0]
    assert best.label == "star"
