"""The guide's tasks on a tiny checkpoint: each builds the guide's exact prompt with the guide's settings, returns one
result per image, ranks labels by their log-likelihood, and chats in the guide's format until <end_of_utterance>."""

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from helpers import reference_processor
from PIL import Image

import idefics
from idefics import tasks
from idefics.errors import IdeficsError
from idefics.scoring import LabelScore, continuation_log_likelihoods


def noise(size, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


A, B = noise((40, 30), 1), noise((64, 20), 2)
CATEGORIES = ["animals", "vegetables", "city landscape", "cars", "office"]
EIFFEL = "An image of the Eiffel Tower at night. Fun fact: the Eiffel Tower is the same height as an 81-storey building."
QUESTION = "Where are these people and what's the weather like?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("tasks"), instruct=True)
    return idefics.load(path, device="cpu", dtype="float32"), reference_processor(path)


@pytest.fixture
def calls(setup, monkeypatch):
    """Records every generate() call (prompts, options) and runs it with at most 4 new tokens."""
    m, _ = setup
    real, seen = m.generate, []

    def spy(prompts, **options):
        seen.append((prompts, dict(options)))
        run = dict(options, max_new_tokens=min(options.get("max_new_tokens") or 4, 4))
        return real(prompts, **run)

    monkeypatch.setattr(m, "generate", spy)
    return seen


def assert_guide_prompt(setup, ours, guide, add_end_of_utterance_token=None):
    """Our processed prompts equal the reference processor's for the guide's literal prompt list."""
    m, ref = setup
    got = m.process(ours, add_end_of_utterance_token=add_end_of_utterance_token)
    want = ref(text=guide, add_end_of_utterance_token=add_end_of_utterance_token)
    for key in ("input_ids", "attention_mask", "image_attention_mask", "pixel_values"):
        assert torch.equal(got[key], want[key]), key


GUIDE = {  # task call -> (the guide's prompt, the guide's options)
    "caption": (lambda m: m.caption(A), [A], {"max_new_tokens": 10}),
    "prompted caption": (lambda m: m.caption(A, "This is an image of "), [A, "This is an image of "],
                         {"max_new_tokens": 20}),
    "few-shot": (lambda m: m.few_shot([(A, EIFFEL)], B),
                 ["User:", A, f"Describe this image.\nAssistant: {EIFFEL}\n", "User:", B, "Describe this image.\nAssistant:"],
                 {"max_new_tokens": 30, "add_end_of_utterance_token": False}),  # as on the guide's base model
    "ask": (lambda m: m.ask(A, QUESTION),
            ["Instruction: Provide an answer to the question. Use the image to answer.\n", A,
             f"Question: {QUESTION} Answer:"], {"max_new_tokens": 20}),
    "classify": (lambda m: m.classify(A, CATEGORIES, mode="generate"),
                 [f"Instruction: Classify the following image into a single category from the following list: "
                  f"{CATEGORIES}.\n", A, "Category: "], {"max_new_tokens": 6}),
    "story": (lambda m: m.story(A), ["Instruction: Use the image to write a story. \n", A, "Story: \n"],
              {"num_beams": 2, "max_new_tokens": 200}),
}


@pytest.mark.parametrize("task", GUIDE)
def test_task_builds_the_guides_prompt_with_its_settings(setup, calls, task):
    call, guide, options = GUIDE[task]
    result = call(setup[0])
    assert isinstance(result, str)
    [(prompts, given)] = calls
    assert given == options
    assert_guide_prompt(setup, prompts, guide, given.get("add_end_of_utterance_token"))


def test_a_list_of_images_runs_as_one_batch_with_one_result_each(setup, calls):
    m, _ = setup
    captions = m.caption([A, B], "This is an image of ")
    assert isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)
    [(prompts, _)] = calls
    assert_guide_prompt(setup, prompts, [[A, "This is an image of "], [B, "This is an image of "]])
    assert captions == [m.caption(A, "This is an image of "), m.caption(B, "This is an image of ")]


def test_options_override_the_task_defaults(setup, calls):
    m, _ = setup
    m.ask(A, "What?", max_new_tokens=3, repetition_penalty=1.2)
    m.story(A, num_beams=1)
    m.caption(A, max_length=30)
    assert [c[1] for c in calls] == [{"max_new_tokens": 3, "repetition_penalty": 1.2},
                                     {"num_beams": 1, "max_new_tokens": 200},
                                     {"max_length": 30}]  # max_length replaces the default max_new_tokens


def test_task_results_are_the_stripped_continuations(setup):
    m, _ = setup
    [completion] = m.generate([tasks.ask(A, "What?")], max_new_tokens=5)
    assert m.ask(A, "What?", max_new_tokens=5) == completion.text.strip()


def test_string_images_are_paths_unless_urls(setup, tmp_path, calls):
    m, _ = setup
    A.save(tmp_path / "a.png")
    m.caption(str(tmp_path / "a.png"))
    assert calls[0][0] == [[tmp_path / "a.png"]]
    assert tasks.as_image("https://example.com/a.png") == "https://example.com/a.png"
    with pytest.raises(IdeficsError, match="no such image file"):
        m.caption(str(tmp_path / "missing.png"))


def ranked_reference(m, image, labels) -> list[float]:
    """Each label's summed log-likelihood, one prompt at a time through logits()."""
    prompt = tasks.classify(image, labels)
    prefix = m.process(prompt)["input_ids"][0]
    out = []
    for label in labels:
        full = prompt[:-1] + [prompt[-1] + label]
        ids = m.process(full)["input_ids"][0]
        assert torch.equal(ids[: len(prefix)], prefix)  # these labels do not merge with "Category:"
        logp = m.logits(full)[0].log_softmax(-1)
        out.append(sum(logp[i - 1, ids[i]].item() for i in range(len(prefix), len(ids))))
    return out


def test_ranked_classification_is_the_softmax_of_summed_log_likelihoods(setup):
    m, _ = setup
    ranked = m.classify(A, CATEGORIES)
    assert all(isinstance(s, LabelScore) for s in ranked)
    assert sorted(s.label for s in ranked) == sorted(CATEGORIES)
    probs = [s.probability for s in ranked]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    expected_ll = torch.tensor(ranked_reference(m, A, CATEGORIES), dtype=torch.float64)
    expected = dict(zip(CATEGORIES, expected_ll.softmax(-1).tolist()))
    for s, ll in zip(ranked, expected_ll.tolist()):
        assert s.probability == pytest.approx(expected[s.label], abs=1e-4)
    by_label = {s.label: s.log_likelihood for s in ranked}
    assert [by_label[c] for c in CATEGORIES] == pytest.approx(expected_ll.tolist(), abs=1e-3)


def test_ranked_classification_of_a_batch_equals_one_by_one(setup):
    m, _ = setup
    batch = m.classify([A, B], CATEGORIES)
    for image, ranked in zip([A, B], batch):
        alone = m.classify(image, CATEGORIES)
        assert [s.label for s in ranked] == [s.label for s in alone]
        assert [s.probability for s in ranked] == pytest.approx([s.probability for s in alone], abs=1e-4)


def test_a_token_merging_across_the_boundary_counts_as_the_continuations(setup):
    m, _ = setup
    prompt = [A, "This is an ima"]
    prefix = m.process(prompt)["input_ids"][0].tolist()
    full = m.process([A, "This is an image"])["input_ids"][0].tolist()
    k = next(i for i, (x, y) in enumerate(zip(prefix, full)) if x != y)
    assert k < len(prefix)  # "image" is one token of the tiny vocabulary: it swallows "ima"
    logp = m.logits([A, "This is an image"])[0].log_softmax(-1)
    expected = sum(logp[i - 1, full[i]].item() for i in range(k, len(full)))
    assert continuation_log_likelihoods(m, [prompt], ["ge"])[0, 0].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.classify(A, []), "no labels"),
    (lambda m: m.classify(A, "animals"), "list of strings"),
    (lambda m: m.classify(A, ["cars", "office", "cars"]), "duplicate label 'cars'"),
    (lambda m: m.classify(A, ["cars", " "]), "label 1"),
    (lambda m: m.classify(A, ["cars", "bus\udc80"]), r"label 1: text is not valid Unicode \('\\udc80' at character 3"),
    (lambda m: m.classify(A, ["cars", "bus\ud800"], mode="generate"), "label 1: text is not valid Unicode"),
    (lambda m: m.classify(A, CATEGORIES, mode="vote"), "unknown classification mode"),
    (lambda m: m.classify(A, CATEGORIES, max_new_tokens=3), "no generation options"),
    (lambda m: m.caption(None), "missing image"),
    (lambda m: m.caption([]), "no image given"),
    (lambda m: m.caption([A, None]), "image 1: missing image"),
    (lambda m: m.classify([A, None], CATEGORIES), "image 1: missing image"),
    (lambda m: m.caption(3), "unsupported image"),
    (lambda m: m.ask(A, ""), "question"),
    (lambda m: m.ask(A, "Who is \ud83d?"), "question: text is not valid Unicode"),
    (lambda m: m.caption(A, "This is \udfff"), "prompt: text is not valid Unicode"),
    (lambda m: m.story(A, "Write \ud800"), "instruction: text is not valid Unicode"),
    (lambda m: m.few_shot([(A, "A \udc00 tower")], B), "example 0 text: text is not valid Unicode"),
    (lambda m: m.chat().send("Hi \ud800", images=A), "item 2: text is not valid Unicode"),
    (lambda m: m.chat().send(["Hi", A, "and \ud800"]), "item 2: text is not valid Unicode"),
    (lambda m: m.few_shot([], A), "few-shot examples"),
    (lambda m: m.few_shot([(A,)], A), "example 0"),
    (lambda m: m.caption(A, max_new_tokens=0), "max_new_tokens"),
])
def test_user_errors_raise_idefics_error(setup, call, message):
    with pytest.raises(IdeficsError, match=message) as info:
        call(setup[0])
    assert "\n" not in str(info.value)


# Chat

@pytest.fixture
def end_after(setup):
    """end_after(n): the model says <end_of_utterance> as its (n+1)-th token of every reply."""
    m, _ = setup
    eou, state = m.tokenizer.end_of_utterance_id, {"n": None, "calls": 0}

    def hook(module, inputs, output):
        if inputs[0].shape[1] > 1:  # ids (B, S) of a prefill: a new reply starts
            state["calls"] = 0
        state["calls"] += 1
        if state["calls"] == state["n"] + 1:
            output[..., eou] = 1e4
        return output

    handle = m.model.register_forward_hook(hook)
    yield lambda n: state.update(n=n)
    handle.remove()


def test_chat_follows_the_guides_format_and_stops_at_end_of_utterance(setup, end_after):
    m, _ = setup
    end_after(3)
    chat = m.chat()
    first = chat.send(["What is in this image?", A])
    assert isinstance(first, str) and "<end_of_utterance>" not in first
    guide = ["User: What is in this image?", A, "<end_of_utterance>", f"\nAssistant: {first}<end_of_utterance>",
             "\nUser:", B, "And who is that?<end_of_utterance>", "\nAssistant:"]
    assert_guide_prompt(setup, [chat.prompt("And who is that?", images=B)], [guide], add_end_of_utterance_token=False)
    second = chat.send("And who is that?", images=B)
    assert chat.history == guide[:-1] + [f"\nAssistant: {second}<end_of_utterance>"]


def test_chat_stops_at_end_of_utterance_and_uses_the_guides_settings(setup, end_after, calls):
    m, _ = setup
    end_after(2)
    chat = m.chat()
    chat.send("Hi", images=A)
    [(_, options)] = calls
    assert options == {"max_new_tokens": 100, "eos_token_id": m.tokenizer.end_of_utterance_id,
                       "add_end_of_utterance_token": False}
    [completion] = m.generate([chat.history[:3] + ["\nAssistant:"]], **options)
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == m.tokenizer.end_of_utterance_id
    assert len(completion.token_ids) == 3


def test_chat_stream_joins_to_the_reply_and_keeps_the_turn(setup, end_after):
    m, _ = setup
    end_after(4)
    streamed = m.chat()
    pieces = list(streamed.stream("Describe it.", images=[A]))
    sent = m.chat()
    assert "".join(pieces).strip() == sent.send("Describe it.", images=[A])
    assert streamed.history == sent.history
    streamed.reset()
    assert streamed.history == []


def test_chat_needs_an_instruct_model_and_a_message(setup, tmp_path):
    path, _ = make_checkpoint(tmp_path / "base")
    with pytest.raises(IdeficsError, match="instruct model"):
        idefics.load(path).chat()
    with pytest.raises(IdeficsError, match="empty message"):
        setup[0].chat().send("  ")
