"""The engine's continuous batching: sequences join and leave a running batch between steps, and each one's
tokens equal what it gets alone; images are encoded once."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from checkpoints import make_checkpoint
from idefics.engine import Engine, split_batch


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (36, 44, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return idefics.load(path)


@pytest.fixture(scope="module")
def prompts(model):
    items = [[image(1), "This is an image of "], ["No image, just a longer piece of text here."],
             ["User:", image(2), "Describe it.", image(3), "And this one?"]]
    return [split_batch(model.process([p]))[0] for p in items]


def alone(engine: Engine, prompt, steps: int) -> list[int]:
    engine.reserve(1, 64, 2)
    tokens = [int(engine.prefill(prompt).argmax())]
    for _ in range(steps - 1):
        tokens.append(int(engine.decode(torch.tensor(tokens[-1:]))[0].argmax()))
    engine.release(0, 1)
    return tokens


def test_sequences_join_and_leave_between_steps(model, prompts):
    engine = Engine(model.model)
    expected = [alone(engine, p, 8) for p in prompts]
    engine.reserve(3, 64, 2)
    got = {0: [int(engine.prefill(prompts[0]).argmax())]}
    order = [0]  # sequence held by each active slot

    def step():
        logits = engine.decode(torch.tensor([got[i][-1] for i in order]))
        for i, row in zip(order, logits):
            got[i].append(int(row.argmax()))

    step()
    got[1] = [int(engine.prefill(prompts[1]).argmax())]  # joins a running batch
    order.append(1)
    step()
    step()
    got[2] = [int(engine.prefill(prompts[2]).argmax())]
    order.append(2)
    while len(got[0]) < 8:
        step()
    engine.release(0, 1)  # the first leaves; the others keep their slots
    order.remove(0)
    while len(got[1]) < 8:
        step()
    engine.release(1, 1)
    order.remove(1)
    while len(got[2]) < 8:
        step()
    assert [got[i] for i in range(3)] == expected


def test_a_release_moves_no_other_sequence_and_a_hole_is_refilled(model, prompts):
    engine = Engine(model.model)
    expected = [alone(engine, p, 6) for p in prompts]
    engine.reserve(3, 64, 2)
    first = engine.prefill_batch(prompts).argmax(-1).tolist()
    got = {i: [t] for i, t in enumerate(first)}
    logits = engine.decode(torch.tensor(first))
    for i, row in enumerate(logits):
        got[i].append(int(row.argmax()))
    kept = engine.cache.k[:, 1:].clone(), engine.images.k[:, 1:].clone()
    engine.release(0, 1)
    assert torch.equal(engine.cache.k[:, 1:], kept[0]) and torch.equal(engine.images.k[:, 1:], kept[1])
    assert engine.free_slots(1) == [0]
    while len(got[1]) < 4:  # slots 1 and 2 run on with a hole below them
        for i, row in zip((1, 2), engine.decode(torch.tensor([got[1][-1], got[2][-1]]))):
            got[i].append(int(row.argmax()))
    got[0] = [int(engine.prefill(prompts[0]).argmax())]  # into the hole
    assert engine.free_slots(1) is None
    while len(got[0]) < 6:
        live = [i for i in (0, 1, 2) if len(got[i]) < 6]
        for i, row in zip(live, engine.decode(torch.tensor([got[i][-1] for i in live]), live)):
            got[i].append(int(row.argmax()))
        for i in (1, 2):
            if len(got[i]) == 6 and i in engine.host_lengths:
                engine.release(i)
    assert [got[i] for i in range(3)] == expected


def test_a_repeated_image_is_encoded_once(model, prompts):
    engine = Engine(model.model, image_cache=2)
    calls = []
    encode = engine.model.encode_images
    engine.model.encode_images = lambda x: calls.append(x.shape[0]) or encode(x)
    try:
        engine.reserve(2, 64, 2)
        engine.prefill_batch([prompts[0], prompts[0]])  # the same image twice in one batch
        engine.release(0, 2)
        engine.prefill(prompts[0])  # and again later
        engine.release(0, 1)
        assert calls == [1]
        engine.prefill(prompts[2])  # two new images push the first out of a cache of two
        engine.release(0, 1)
        engine.prefill(prompts[0])
        engine.release(0, 1)
        assert calls == [1, 2, 1]
    finally:
        del engine.model.encode_images
