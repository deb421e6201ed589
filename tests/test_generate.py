"""Generation against transformers' generate(): greedy, beam search, eos, lengths, processors, sampling; stop
strings, streaming, include_prompt and bad options."""
from collections import Counter

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from helpers import reference_processor
from PIL import Image

import idefics
from idefics.errors import IdeficsError

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: more threads only add synchronisation (and slow down badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_token=5), "unknown generation option 'max_new_token'"),
    (dict(num_beams=0), "num_beams"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(max_new_tokens=250), "context of 256"),
])
def test_bad_options_raise_one_line(pair, options, message):
    with pytest.raises(IdeficsError, match=message) as info:
        pair[0].generate(PROMPTS, **options)
    assert "\n" not in str(info.value)


def test_prompt_longer_than_the_context_raises(pair):
    m = pair[0]
    with pytest.raises(IdeficsError, match="context is 256") as info:
        m.generate([PROMPTS[0], ["a red door, a pumpkin, a ghost. " * 40]], max_new_tokens=4)
    assert "\n" not in str(info.value)
    assert m.generate(PROMPTS[:1], max_new_tokens=4)[0].token_ids  # the engine is still usable
