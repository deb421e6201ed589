"""Generation against transformers' generate(): greedy, beam search, eos, lengths, processors, sampling; stop
strings, streaming, include_prompt and bad options."""
import os
from collections import Counter

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from helpers import reference_processor
from PIL import Image

import idefics
from idefics.engine import split_batch
from idefics.errors import IdeficsError
from idefics.scheduler import Request
from idefics.sampling import GenerationOptions

pytestmark = pytest.mark.usefixtures("one_thread")

BANNED = [[600], [601]]  # <fake_token_around_image>, <image>: banned by default in ours, as in the guide's calls


def noise(size, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


A, B, C = noise((40, 30), 1), noise((64, 20), 2), noise((17, 33), 3)
PROMPTS = [  # 0 to 3 images, different lengths
    ["Question: Where are these people and what's the weather like? Answer:"],
    [A, "This is an image of"],
    ["User:", A, "Describe this image.\nAssistant:", B, "Category:"],
    ["Look:", A, B, " and then ", C, "Story: \n"],
    [C],
]




@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path, ref = make_checkpoint(tmp_path_factory.mktemp("generate"))
    return idefics.load(path, device="cpu", dtype="float32"), ref, reference_processor(path)


def reference(pair, prompt, **options) -> list[int]:
    """transformers' continuation of one prompt, run alone."""
    _, ref, processor = pair
    inputs = processor(text=[prompt])
    options.setdefault("eos_token_id", 2)
    with torch.no_grad():
        out = ref.generate(**inputs, bad_words_ids=BANNED, do_sample=options.pop("do_sample", False), **options)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def ours(pair, prompts, **options) -> list[list[int]]:
    return [c.token_ids for c in pair[0].generate(prompts, **options)]


def assert_matches_reference(pair, **options):
    """Our batch equals the reference run on each prompt alone, and equals ours run on each prompt alone."""
    batch = ours(pair, PROMPTS, **options)
    assert batch == [reference(pair, p, **options) for p in PROMPTS]
    assert batch == [ours(pair, [p], **options)[0] for p in PROMPTS]
    return batch


@pytest.fixture(scope="module")
def eos(pair) -> int:
    """A token the model emits after a few steps for several prompts, to serve as eos."""
    counts = Counter(t for p in PROMPTS for t in set(reference(pair, p, max_new_tokens=12)[2:]))
    return counts.most_common(1)[0][0]


def test_greedy_matches_reference(pair):
    assert_matches_reference(pair, max_new_tokens=12)


def test_eos_ends_each_prompt_as_reference(pair, eos):
    results = pair[0].generate(PROMPTS, max_new_tokens=12, eos_token_id=eos)
    assert [c.token_ids for c in results] == [reference(pair, p, max_new_tokens=12, eos_token_id=eos) for p in PROMPTS]
    stopped = [c for c in results if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] == eos and eos not in c.token_ids[:-1] for c in stopped)
    assert all(len(c.token_ids) == 12 and eos not in c.token_ids for c in results if c.finish_reason == "length")
    assert len({len(c.token_ids) for c in results}) > 1  # rows leave the batch at different steps



def test_an_eos_id_is_never_banned(pair, eos):
    """As the reference, an id that is both eos and banned still ends the sequence."""
    plain = pair[0].generate(PROMPTS, max_new_tokens=12, eos_token_id=eos)
    banned = pair[0].generate(PROMPTS, max_new_tokens=12, eos_token_id=eos, banned_token_ids=[eos, 600, 601])
    assert [c.token_ids for c in banned] == [c.token_ids for c in plain]
    assert any(c.finish_reason == "stop" for c in banned)


BEAMS = [
    dict(num_beams=2),
    dict(num_beams=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=2.0),
    dict(num_beams=2, early_stopping="never", length_penalty=0.0),
    dict(num_beams=4, length_penalty=-0.5),
    dict(num_beams=3, early_stopping="never", max_new_tokens=16),
]


@pytest.mark.parametrize("options", BEAMS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_beam_search_matches_reference(pair, eos, options):
    assert_matches_reference(pair, eos_token_id=eos, **{"max_new_tokens": 10, **options})


def test_beam_search_without_eos_runs_to_the_length(pair):
    results = pair[0].generate(PROMPTS, max_new_tokens=6, num_beams=3)
    assert [c.token_ids for c in results] == [reference(pair, p, max_new_tokens=6, num_beams=3) for p in PROMPTS]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in results)


def test_beam_search_finish_reasons_and_early_stopping(pair, eos):
    """The beam options above reach both ends and change the result (so the tests above can tell them apart);
    the best beam ends with eos when it stopped."""
    def run(**options):
        return pair[0].generate(PROMPTS, num_beams=3, eos_token_id=eos, **options)

    default = run(max_new_tokens=10)
    assert {c.finish_reason for c in default} == {"stop", "length"}
    assert all(c.token_ids[-1] == eos for c in default if c.finish_reason == "stop")
    assert run(max_new_tokens=10, early_stopping=True) != default
    assert run(max_new_tokens=16, early_stopping="never") != run(max_new_tokens=16)


def test_max_length_counts_the_prompt(pair, eos):
    m, _, processor = pair
    lengths = [processor(text=[p])["input_ids"].shape[1] for p in PROMPTS]
    n = max(lengths) + 3
    greedy = assert_matches_reference(pair, max_length=n)
    assert [len(t) for t in greedy] == [n - k for k in lengths]
    assert_matches_reference(pair, max_length=n, num_beams=3, early_stopping="never", length_penalty=1.5,
                             eos_token_id=eos)
    with pytest.raises(IdeficsError, match="max_length"):
        m.generate(PROMPTS, max_length=max(lengths))


def test_min_new_tokens_as_reference(pair, eos):
    greedy = assert_matches_reference(pair, max_new_tokens=10, min_new_tokens=6, eos_token_id=eos)
    assert all(eos not in t[:6] for t in greedy)
    assert_matches_reference(pair, max_new_tokens=10, min_new_tokens=6, eos_token_id=eos, num_beams=2)


def test_repetition_penalty_as_reference(pair):
    plain = ours(pair, PROMPTS, max_new_tokens=12)
    penalized = assert_matches_reference(pair, max_new_tokens=12, repetition_penalty=1.8)
    assert penalized != plain
    assert_matches_reference(pair, max_new_tokens=8, repetition_penalty=1.8, num_beams=3)


def test_sampling_follows_the_seed(pair):
    first = ours(pair, PROMPTS, max_new_tokens=10, do_sample=True, seed=7)
    assert ours(pair, PROMPTS, max_new_tokens=10, do_sample=True, seed=7) == first
    assert ours(pair, PROMPTS, max_new_tokens=10, do_sample=True, seed=8) != first


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=20, top_p=0.9)], ids=["default", "warped"])
def test_sampling_draws_as_reference(pair, options):
    """A prompt alone draws as the reference does from the global generator seeded alike."""
    for prompt in PROMPTS:
        got = ours(pair, [prompt], max_new_tokens=10, do_sample=True, seed=7, **options)[0]
        torch.manual_seed(7)
        assert got == reference(pair, prompt, max_new_tokens=10, do_sample=True, **options)


def _stop_case(m, prompt):
    """The unstopped continuation, and a stop string of 3 printable ASCII characters from its second half (random
    weights also emit lone bytes, which decode to U+FFFD)."""
    full = m.generate([prompt], max_new_tokens=16)[0]
    text = full.text
    starts = [i for i in range(len(text) // 2, len(text) - 2)
              if text[i : i + 3].strip() and all(c.isascii() and c.isprintable() for c in text[i : i + 3])]
    assert starts, text
    return full, text[starts[0] : starts[0] + 3]


@pytest.mark.parametrize("index", [0, 1, 3])
def test_stop_string_cuts_text_and_tokens(pair, index):
    m = pair[0]
    full, stop = _stop_case(m, PROMPTS[index])
    got = m.generate([PROMPTS[index]], max_new_tokens=16, stop=[stop, "never appears \u2603"])[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[: full.text.index(stop)]
    done = next(j for j in range(1, 17) if stop in m.tokenizer.decode(full.token_ids[:j], skip_special_tokens=True))
    assert got.token_ids == full.token_ids[:done]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stop_strings_end_as_reference(pair, num_beams):
    """The reference's stop_strings criterion ends a continuation at the token that completes the string, in
    greedy search and for each beam candidate."""
    m, _, processor = pair
    reasons = []
    for prompt in PROMPTS:
        stop = _stop_case(m, prompt)[1]
        got = m.generate([prompt], max_new_tokens=16, num_beams=num_beams, stop=stop)[0]
        assert got.token_ids == reference(pair, prompt, max_new_tokens=16, num_beams=num_beams, stop_strings=[stop],
                                          tokenizer=processor.tokenizer)
        stopped = stop in m.tokenizer.decode(got.token_ids, skip_special_tokens=True)
        assert got.finish_reason == ("stop" if stopped else "length") and stop not in got.text
        reasons.append(got.finish_reason)
    assert "stop" in reasons


@pytest.mark.parametrize("options", [dict(), dict(stop="stop"), dict(num_beams=2), dict(do_sample=True, seed=3)],
                         ids=["greedy", "stop", "beams", "sampling"])
@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_stream_yields_generate_text(pair, index, options):
    m = pair[0]
    if "stop" in options:
        options = dict(options, stop=_stop_case(m, PROMPTS[index])[1])
    pieces = list(m.stream(PROMPTS[index], max_new_tokens=16, **options))
    assert "".join(pieces) == m.generate([PROMPTS[index]], max_new_tokens=16, **options)[0].text
    if "num_beams" not in options:
        assert len(pieces) > 1


def _boundaries(pieces: list[str]) -> list[int]:
    return [len("".join(pieces[: i + 1])) for i in range(len(pieces) - 1)]


def test_stream_holds_back_a_possible_stop_string(pair):
    """A stop string whose first three characters straddle a piece boundary of the plain stream, and which never
    completes: those characters wait until the next one rules the string out, and nothing is lost."""
    m = pair[0]
    plain = list(m.stream(PROMPTS[0], max_new_tokens=16))
    text = "".join(plain)
    b = next(b for b in _boundaries(plain) if b >= 4 and b + 2 < len(text))
    stop = text[b - 1 : b + 2] + "\u2603"
    pieces = list(m.stream(PROMPTS[0], max_new_tokens=16, stop=stop))
    assert "".join(pieces) == text
    first = text.index(stop[:3])
    assert not [x for x in _boundaries(pieces) if first < x <= first + 3]


def test_include_prompt_as_reference_decode(pair):
    m, ref, processor = pair
    results = m.generate(PROMPTS, max_new_tokens=8, include_prompt=True)
    for prompt, c in zip(PROMPTS, results):
        inputs = processor(text=[prompt])
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, bad_words_ids=BANNED)
        assert c.text == processor.batch_decode(out, skip_special_tokens=True)[0]
        assert c.text.endswith(m.generate([prompt], max_new_tokens=8)[0].text)


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens: must be at least 1, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens: must be an integer or None, got True"),
    (dict(max_new_token=5), "unknown generation option 'max_new_token'"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=65), "num_beams: must be from 1 to 64, got 65"),
    (dict(num_beams=10**6), "num_beams: must be from 1 to 64"),
    (dict(early_stopping="sometimes"), "early_stopping: must be True or False or 'never'"),
    (dict(early_stopping=1), "early_stopping"),
    (dict(do_sample="no"), "do_sample: must be True or False, got 'no'"),
    (dict(temperature="0.5", do_sample=True), "temperature: must be a finite number, got '0.5'"),
    (dict(temperature=float("inf"), do_sample=True), "temperature: must be a finite number, got inf"),
    (dict(temperature=float("nan")), "temperature: must be a finite number, got nan"),
    (dict(temperature=-1.0), "temperature: must be at least 0"),
    (dict(temperature=0, do_sample=True), "temperature: must be at least 1e-06 when sampling"),
    (dict(temperature=1e-38, do_sample=True), "temperature: must be at least 1e-06 when sampling"),
    (dict(top_p="x"), "top_p: must be a finite number, got 'x'"),
    (dict(top_p=0.0), "top_p: must be above 0 and at most 1"),
    (dict(top_k=2.5), "top_k: must be an integer"),
    (dict(repetition_penalty=1e-300, do_sample=True), "repetition_penalty: must be at least 1e-06"),
    (dict(length_penalty=1e300, num_beams=2), "length_penalty: must be from -10 to 10"),
    (dict(seed="abc", do_sample=True), "seed: must be an integer or None, got 'abc'"),
    (dict(seed=2**70, do_sample=True), "seed: must be from 0 to 18446744073709551615, got 1180591620717411303424"),
    (dict(seed=-1, do_sample=True), "seed: must be from 0 to"),
    (dict(stop=5), "stop: must be a string, a list of strings or None, got 5"),
    (dict(stop=["ok", 5]), "stop: must be a string, a list of strings or None"),
    (dict(stop=["ok", ""]), "stop strings must be non-empty"),
    (dict(stop=["x" * 257]), "stop: must be at most 256 characters long"),
    (dict(stop=[f"s{i}" for i in range(65)]), "stop: takes at most 64 items, got 65"),
    (dict(eos_token_id=1.5), "eos_token_id: must be an integer, a list of integers or None, got 1.5"),
    (dict(eos_token_id="x"), "eos_token_id: must be an integer, a list of integers or None, got 'x'"),
    (dict(eos_token_id=[2, -1]), "eos_token_id: must be at least 0, got -1"),
    (dict(eos_token_id=602), r"eos_token_id: 602 is past the vocabulary \(ids 0 to 601\)"),
    (dict(banned_token_ids=7), "banned_token_ids: must be a list of integers or None, got 7"),
    (dict(banned_token_ids=["a"]), r"banned_token_ids: must be a list of integers or None, got \['a'\]"),
    (dict(banned_token_ids=[600, 10**6]), "banned_token_ids: 1000000 is past the vocabulary"),
    (dict(include_prompt="yes"), "generate\\(\\): include_prompt must be True or False, got 'yes'"),
    (dict(add_end_of_utterance_token=1), "process\\(\\): add_end_of_utterance_token must be True or False"),
    (dict(max_new_tokens=250), "context of 256"),
])
def test_bad_options_raise_one_line(pair, options, message):
    with pytest.raises(IdeficsError, match=message) as info:
        pair[0].generate(PROMPTS, **options)
    assert "\n" not in str(info.value)


def test_options_of_other_python_number_types_are_taken():
    """numpy integers and floats, tuples for lists, an int temperature: accepted as the values they are."""
    o = GenerationOptions.make(seed=np.uint64(2**64 - 1), eos_token_id=(np.int64(2), 5), temperature=1,
                               top_p=np.float32(0.5), banned_token_ids=(600,), stop="x")
    got = (o.seed, o.eos_token_id, o.temperature, o.top_p, o.banned_token_ids, o.stop)
    assert got == (2**64 - 1, [2, 5], 1.0, 0.5, [600], ["x"])
    assert type(o.seed) is int and type(o.eos_token_id[0]) is int and type(o.temperature) is float


def test_extreme_but_valid_options_generate(pair):
    m = pair[0]
    greedy = ours(pair, PROMPTS[:1], max_new_tokens=3)
    assert ours(pair, PROMPTS[:1], max_new_tokens=3, temperature=0) == greedy  # greedy ignores the temperature
    top_seed = ours(pair, PROMPTS[:1], max_new_tokens=4, do_sample=True, seed=2**64 - 1)
    assert top_seed == ours(pair, PROMPTS[:1], max_new_tokens=4, do_sample=True, seed=2**64 - 1)
    cold = ours(pair, PROMPTS[:1], max_new_tokens=4, do_sample=True, seed=1, temperature=1e-6, top_k=10**30)
    assert cold == ours(pair, PROMPTS[:1], max_new_tokens=4)  # so cold it draws the argmax
    assert len(m.generate(PROMPTS[:1], max_new_tokens=3, eos_token_id=[])[0].token_ids) == 3
    assert len(m.generate(PROMPTS[:1], max_new_tokens=3, num_beams=64)[0].token_ids) == 3


@pytest.mark.parametrize("call, message", [
    (lambda m: m.process(PROMPTS[0], padding=True),
     r"process\(\): unknown option 'padding' \(known: add_end_of_utterance_token\)"),
    (lambda m: m.logits(PROMPTS[0], return_tensors="pt"), r"logits\(\): unknown option 'return_tensors'"),
    (lambda m: m.logits(PROMPTS[0], add_end_of_utterance_token="no"), "add_end_of_utterance_token must be True or"),
    (lambda m: m.process(["Hello \ud800 there"]), r"item 0: text is not valid Unicode \('\\ud800' at character 6\)"),
    (lambda m: m.logits([PROMPTS[0], [A, "caf\udce9"]]), "prompt 1, item 1: text is not valid Unicode"),
    (lambda m: m.generate([[A, "\udfff"]]), "item 1: text is not valid Unicode"),
    (lambda m: list(m.stream(["\ud83d"])), "item 0: text is not valid Unicode"),
    (lambda m: m.logits(["a red door, a pumpkin, a ghost. " * 40]), "prompt 0 has 281 tokens; the model's context is"),
])
def test_bad_process_and_logits_calls_raise_one_line(pair, call, message):
    with pytest.raises(IdeficsError, match=message) as info:
        call(pair[0])
    assert "\n" not in str(info.value)


def test_logits_take_a_prompt_that_fills_the_context_and_no_more(pair):
    m = pair[0]
    ids = m.process(["a red door, a pumpkin, a ghost. " * 40])["input_ids"][0]
    full, over = (m.tokenizer.decode(ids[1:n].tolist()) for n in (256, 257))  # BOS + 255 or 256 tokens
    assert m.logits([full]).shape == (1, 256, 602)
    with pytest.raises(IdeficsError, match="prompt 1 has 257 tokens; the model's context is 256"):
        m.logits([[full], [over]])


def test_a_call_whose_cache_cannot_fit_in_memory_is_refused(pair):
    """Enough beams of enough prompts to need more cache than the machine has memory (each slot holds at least
    2 x 4 layers x 4 heads x 8 dims x 4 bytes per token) is one clear error, before anything is allocated."""
    m = pair[0]
    prompt = split_batch(m.process(PROMPTS[1]))[0]
    max_len = prompt.ids.shape[0] + 200
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = physical // (64 * max_len * 1024) + 1
    with pytest.raises(IdeficsError, match=f"{count} prompts x 64 beams of up to {max_len} tokens need about") as info:
        o = GenerationOptions.make(num_beams=64, max_new_tokens=200)
        m._beams([Request.make(prompt, o, m.tokenizer, m.config.max_position_embeddings)] * count)
    assert "\n" not in str(info.value) and "GiB of cache" in str(info.value)
    assert m.generate(PROMPTS[:1], max_new_tokens=4)[0].token_ids  # the engine is still usable


@pytest.mark.parametrize("call", [
    lambda m, p: m.generate(p, max_new_tokens=4),
    lambda m, p: list(m.stream(p[0], max_new_tokens=4)),
    lambda m, p: m.logits(p),
])
def test_text_too_long_for_the_context_is_refused_by_its_length(pair, call):
    """A million characters cannot be 256 tokens: refused by the text's length before the tokenizer reads it (its
    time and memory grow with the text), one line naming the prompt."""
    m = pair[0]
    with pytest.raises(IdeficsError, match="text of 1000003 characters: more than the model's context of 256 tokens "
                                           "can hold") as info:
        call(m, [["a" * 10**6]])
    assert "\n" not in str(info.value)
    with pytest.raises(IdeficsError, match="prompt 1, text of") as info:
        m.generate([PROMPTS[0], ["a" * 10**6]], max_new_tokens=4)
    assert "\n" not in str(info.value)


def test_prompt_longer_than_the_context_raises(pair):
    m = pair[0]
    with pytest.raises(IdeficsError, match="context is 256") as info:
        m.generate([PROMPTS[0], ["a red door, a pumpkin, a ghost. " * 40]], max_new_tokens=4)
    assert "\n" not in str(info.value)
    assert m.generate(PROMPTS[:1], max_new_tokens=4)[0].token_ids  # the engine is still usable
