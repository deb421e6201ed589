"""Ranked classification on a tiny checkpoint: log-likelihoods equal transformers' full forward pass over prompt +
label, while each image is encoded once, the prompt runs through the decoder once, and the work a label list can
cause is bounded before any of it is done."""

import threading

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from helpers import reference_processor
from PIL import Image

import idefics
from idefics import tasks
from idefics.errors import IdeficsError
from idefics.scoring import MAX_LABEL_CHARS, MAX_LABELS, continuation_log_likelihoods


def noise(seed, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


A, B, C = noise(1), noise(2, (64, 20)), noise(3, (30, 50))
CATEGORIES = ["animals", "vegetables", "city landscape", "cars", "office"]
PROMPTS = [
    tasks.classify(A, CATEGORIES),
    [A, "This is an ima"],  # "ge" merges with "ima": that continuation starts before the prompt's end
    ["User:", A, "Describe this image.\nAssistant: a photo.\n", "User:", B, C, "Describe these.\nAssistant:"],
    ["Category: no image at all."],
    ["Ca"],  # "tegory" merges with the first token after BOS: nothing of the prompt runs on its own
]
CONTINUATIONS = ["ge", " animals", "ge of a city landscape", " 東京 is a city", " café au lait", "tegory"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, ref = make_checkpoint(tmp_path_factory.mktemp("scoring"))
    return idefics.load(path, device="cpu", dtype="float32"), ref, reference_processor(path)


def reference_log_likelihoods(ref, processor, prompt, continuations) -> list[float]:
    """transformers' processor and model over prompt + continuation, one at a time: the summed log-probabilities of
    the tokens past the common prefix with the prompt's own tokens."""
    own = processor(text=[prompt])["input_ids"][0].tolist()
    out = []
    for text in continuations:
        batch = processor(text=[prompt[:-1] + [prompt[-1] + text]])
        ids = batch["input_ids"][0].tolist()
        k = next(i for i, (x, y) in enumerate(zip(own + [None], ids)) if x != y)
        with torch.no_grad():
            logp = ref(**batch).logits[0].log_softmax(-1)
        out.append(sum(logp[i - 1, ids[i]].item() for i in range(k, len(ids))))
    return out


@pytest.fixture
def encoded(setup, monkeypatch):
    """Images through the vision tower and perceiver, counted at the model's encode_images."""
    m = setup[0]
    counts, real = [], m.model.encode_images

    def counting(pixels):
        counts.append(pixels.shape[0])
        return real(pixels)

    monkeypatch.setattr(m.model, "encode_images", counting)
    return counts


@pytest.fixture
def decoded(setup):
    """(tokens in, logits out) of every decoder pass."""
    m, passes = setup[0], []

    def tokens_in(module, args):
        passes.append([args[0].numel(), None])

    def logits_out(module, args, out):
        passes[-1][1] = out.shape[:-1].numel()

    handles = [m.model.register_forward_pre_hook(tokens_in), m.model.lm_head.register_forward_hook(logits_out)]
    yield passes
    for h in handles:
        h.remove()


def test_some_continuations_start_before_the_prompts_last_token(setup):
    """So that the parity test below covers a merge across the boundary, and one with only BOS before it."""
    m = setup[0]

    def divergence(prompt, joined) -> int:
        own, full = (m.process(p)["input_ids"][0].tolist() for p in (prompt, joined))
        return next(i for i, (x, y) in enumerate(zip(own, full)) if x != y)

    assert divergence(PROMPTS[1], [A, "This is an image"]) == len(m.process(PROMPTS[1])["input_ids"][0]) - 1
    assert divergence(PROMPTS[4], ["Category"]) == 1


@pytest.fixture(scope="module")
def expected(setup):
    _, ref, processor = setup
    return [reference_log_likelihoods(ref, processor, prompt, CONTINUATIONS) for prompt in PROMPTS]


@pytest.mark.parametrize("tokens_per_pass", [1, 7, 512])  # each continuation alone, a few per pass, all in one
def test_log_likelihoods_equal_the_references_full_forward_pass(setup, expected, tokens_per_pass):
    m = setup[0]
    got = continuation_log_likelihoods(m, PROMPTS, CONTINUATIONS, tokens_per_pass=tokens_per_pass)
    assert got.shape == (len(PROMPTS), len(CONTINUATIONS)) and got.dtype == torch.float64
    for b in range(len(PROMPTS)):
        assert got[b].tolist() == pytest.approx(expected[b], abs=2e-5), b


def test_ranked_probabilities_are_the_softmax_of_the_references_log_likelihoods(setup):
    m, ref, processor = setup
    ranked = m.classify(A, CATEGORIES)
    expected = torch.tensor(reference_log_likelihoods(ref, processor, PROMPTS[0], CATEGORIES), dtype=torch.float64)
    assert [s.label for s in ranked] == [CATEGORIES[i] for i in expected.argsort(descending=True)]
    probs = dict(zip(CATEGORIES, expected.softmax(-1).tolist()))
    assert [s.probability for s in ranked] == pytest.approx([probs[s.label] for s in ranked], abs=1e-6)


def test_each_image_is_encoded_once_whatever_the_number_of_labels(setup, encoded):
    m = setup[0]
    m.classify(noise(11), CATEGORIES)
    assert encoded == [1]
    encoded.clear()
    m.classify([noise(12), noise(13)], CATEGORIES)
    assert sum(encoded) == 2
    encoded.clear()
    m.classify([noise(12), noise(14), noise(14)], CATEGORIES)  # the engine's image cache knows one; two are alike
    assert sum(encoded) == 1


def test_the_prompt_runs_through_the_decoder_once(setup, decoded):
    m = setup[0]
    own = len(m.process(PROMPTS[0])["input_ids"][0])
    label_tokens = sum(len(m.process(PROMPTS[0][:-1] + [PROMPTS[0][-1] + c])["input_ids"][0]) - own
                       for c in CATEGORIES)
    m.classify(A, CATEGORIES)
    # The prompt but its last token, then every label's tokens (each after that last token) in one pass.
    assert decoded == [[own - 1, 1], [label_tokens, label_tokens]]


def test_the_models_work_runs_on_the_engine_thread(setup):
    m, threads = setup[0], set()

    def record(module, args):
        threads.add(threading.current_thread())

    handles = [m.model.register_forward_pre_hook(record), m.model.vision.register_forward_pre_hook(record)]
    try:
        m.classify(noise(21), CATEGORIES)
    finally:
        for h in handles:
            h.remove()
    assert threads == {m.loop.thread}


def test_logits_per_pass_are_bounded_by_the_token_budget(setup, decoded):
    m = setup[0]
    labels = [f" label number {i}" for i in range(12)]
    scores = continuation_log_likelihoods(m, PROMPTS[:1], labels, tokens_per_pass=30)[0]
    assert len(decoded) > 3 and all(logits <= 30 for _, logits in decoded)
    in_one_pass = continuation_log_likelihoods(m, PROMPTS[:1], labels)[0]
    assert scores.tolist() == pytest.approx(in_one_pass.tolist(), abs=1e-5)


@pytest.mark.parametrize("labels, message", [
    ([f"label {i}" for i in range(MAX_LABELS + 1)],
     f"{MAX_LABELS + 1} labels; classification takes at most {MAX_LABELS}"),
    (["cars", "x" * 10_000_000], f"label 1 has 10000000 characters; a label may have at most {MAX_LABEL_CHARS}"),
])
@pytest.mark.parametrize("mode", ["rank", "generate"])
def test_label_lists_beyond_the_limits_fail_before_any_work(setup, encoded, decoded, labels, message, mode):
    with pytest.raises(IdeficsError, match=message) as error:
        setup[0].classify(A, labels, mode=mode)
    assert "\n" not in str(error.value)
    assert encoded == [] and decoded == []


def test_a_prompt_past_the_context_fails_before_any_work(setup, encoded, decoded):
    labels = [f"{i} " + "word " * 39 for i in range(5)]  # within the limits, but the prompt lists them all
    with pytest.raises(IdeficsError, match="prompt 0 has [0-9]+ tokens; the model's context is 256"):
        setup[0].classify(A, labels)
    assert encoded == [] and decoded == []


def test_a_continuation_past_the_context_fails_before_any_work(setup, encoded, decoded):
    long = " " + "ÿ" * MAX_LABEL_CHARS  # byte fallback: two tokens a character
    with pytest.raises(IdeficsError, match="prompt 0 with ' ÿÿÿ.*' has [0-9]+ tokens; the model's context is 256"):
        continuation_log_likelihoods(setup[0], PROMPTS[:1], [" cars", long])
    assert encoded == [] and decoded == []


@pytest.mark.parametrize("prompts, continuations, message", [
    (PROMPTS[:1], [], "no continuations"),
    ([[A]], [" cars"], "prompt 0: a scored prompt must end with text"),
    ([PROMPTS[0], [A, "https://example.com/a.png"]], [" cars"], "prompt 1: a scored prompt must end with text"),
    ([[A, ""]], ["https://example.com/a.png"], "turns the end of prompt 0 into an image reference"),
    (PROMPTS[:1], [" cars", " "], "' ' adds no tokens to the prompt"),
])
def test_unscorable_continuations_raise_idefics_error(setup, encoded, prompts, continuations, message):
    with pytest.raises(IdeficsError, match=message):
        continuation_log_likelihoods(setup[0], prompts, continuations)
    assert encoded == []
