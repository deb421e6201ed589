"""The scheduler and the engine thread: requests joining a running batch, aborts, per-request options, several
threads and streams on one model, each getting what it gets alone."""
import threading

import numpy as np
import pytest
from checkpoints import make_checkpoint
from PIL import Image

import idefics
from idefics import scheduler
from idefics.engine import Engine, split_batch
from idefics.errors import IdeficsError
from idefics.sampling import GenerationOptions
from idefics.scheduler import Request, Scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def noise(size, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


A, B = noise((40, 30), 1), noise((64, 20), 2)
PROMPTS = [
    ["Question: Where are these people and what's the weather like? Answer:"],
    [A, "This is an image of"],
    ["User:", A, "Describe this image.\nAssistant:", B, "Category:"],
    [B, "Story: \n"],
]




@pytest.fixture(scope="module")
def m(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("scheduler"), instruct=True)
    return idefics.load(path, device="cpu", dtype="float32")


def alone(m, prompt, **options):
    return m.generate([prompt], **options)[0]


def requests(m, prompts, **options):
    o = GenerationOptions.make(**options)
    return [Request.make(p, o, m.tokenizer, m.config.max_position_embeddings)
            for p in split_batch(m.process(prompts))]


def run(scheduler: Scheduler, joins: dict[int, list[Request]], aborts: dict[int, object] = {}):
    """Step until idle; joins[k] are added before step k, aborts[k] aborted before step k -> slots used per step."""
    used, k = [], 0
    while scheduler.busy or any(j >= k for j in joins):
        for r in joins.get(k, []):
            scheduler.add(r)
        if k in aborts:
            scheduler.abort(aborts[k])
        scheduler.step()
        used.append(sorted(r.slot for r in scheduler.running))
        k += 1
    return used


def test_requests_joining_mid_run_give_their_tokens_alone(m):
    expected = [alone(m, p, max_new_tokens=12).token_ids for p in PROMPTS]
    rs = requests(m, PROMPTS, max_new_tokens=12)
    run(Scheduler(m.engine, m.tokenizer), {0: rs[:1], 3: rs[1:3], 7: rs[3:]})
    assert [r.generated for r in rs] == expected


def test_an_abort_frees_its_slot_for_the_next_request(m):
    rs = requests(m, PROMPTS[:2], max_new_tokens=12)
    later = requests(m, PROMPTS[2:3], max_new_tokens=6)[0]
    s = Scheduler(m.engine, m.tokenizer, max_batch=2)
    used = run(s, {0: rs, 1: [later]}, {4: rs[0].id})
    assert rs[0].finish == "abort" and len(rs[0].generated) == 4
    assert used[3] == [0, 1] and later.slot is None and later.finish == "length"
    # The waiting request took the aborted one's slot at the step the abort took effect.
    assert used[4] == [0, 1] and len(later.generated) == 6
    assert rs[1].generated == alone(m, PROMPTS[1], max_new_tokens=12).token_ids
    assert later.generated == alone(m, PROMPTS[2], max_new_tokens=6).token_ids


def test_one_batch_with_different_options_per_request_equals_each_alone(m):
    options = [dict(max_new_tokens=10), dict(max_new_tokens=7, repetition_penalty=1.8),
               dict(max_new_tokens=9, do_sample=True, seed=3, temperature=0.7, top_k=20),
               dict(max_new_tokens=12, min_new_tokens=10, do_sample=True, seed=5, top_p=0.8)]
    rs = [requests(m, [p], **o)[0] for p, o in zip(PROMPTS, options)]
    run(Scheduler(m.engine, m.tokenizer), {0: rs})
    assert [r.generated for r in rs] == [alone(m, p, **o).token_ids for p, o in zip(PROMPTS, options)]


def test_threads_calling_tasks_on_one_model_get_their_single_thread_answers(m):
    calls = [lambda: m.caption(A), lambda: m.ask(B, "What is it?"), lambda: m.caption(B, "This is an image of "),
             lambda: m.classify(A, ["animals", "cars"], mode="generate"), lambda: m.story(A, max_new_tokens=12),
             lambda: m.few_shot([(A, "A picture.")], B), lambda: m.classify(B, ["animals", "cars"]),
             lambda: m.generate([PROMPTS[2]], max_new_tokens=9)[0].token_ids]
    expected = [call() for call in calls]
    got, errors = [None] * len(calls), []

    def worker(i):
        try:
            for _ in range(2):
                got[i] = calls[i]()
                assert got[i] == expected[i]
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == expected


def test_two_streams_consumed_alternately_give_their_single_answers(m):
    expected = [alone(m, p, max_new_tokens=14).text for p in PROMPTS[:2]]
    streams = [m.stream(p, max_new_tokens=14) for p in PROMPTS[:2]]
    pieces = [[], []]
    live = [0, 1]
    while live:
        for i in list(live):
            try:
                pieces[i].append(next(streams[i]))
            except StopIteration:
                live.remove(i)
    assert ["".join(p) for p in pieces] == expected


def test_a_stream_closed_early_aborts_its_request(m):
    stream = m.stream(PROMPTS[1], max_new_tokens=60, min_new_tokens=60)
    next(stream)
    stream.close()
    # The request leaves at the next step; the engine is then free for others, which still get their answers.
    assert alone(m, PROMPTS[0], max_new_tokens=5) == m.generate([PROMPTS[0]], max_new_tokens=5)[0]
    assert m.engine.active == 0 and not m.scheduler.running


def test_a_bad_request_fails_alone(m):
    with pytest.raises(IdeficsError, match="prompt 0 has .* tokens"):
        m.generate([["word " * 400]], max_new_tokens=4)
    assert m.generate([PROMPTS[0]], max_new_tokens=4)[0].token_ids == alone(m, PROMPTS[0], max_new_tokens=4).token_ids


def test_stop_strings_are_checked_on_new_text_only(m):
    full = alone(m, PROMPTS[1], max_new_tokens=16)
    stop = full.text[len(full.text) // 2:][:3]
    rs = requests(m, [PROMPTS[1]], max_new_tokens=16, stop=stop)
    starts = []
    find = rs[0].stops.find
    rs[0].stops.find = lambda text, start=0: starts.append((start, len(text))) or find(text, start)
    run(Scheduler(m.engine, m.tokenizer), {0: rs})
    assert rs[0].finish == "stop" and rs[0].generated == alone(m, PROMPTS[1], max_new_tokens=16, stop=stop).token_ids
    # Searches start near the end of the text final so far (a match could first end in the new text), not at 0.
    assert starts[-1][0] > 0 and sum(n - start for start, n in starts) < sum(n for _, n in starts) / 2


def test_log_probabilities_are_the_models(m):
    rs = requests(m, PROMPTS[:2], max_new_tokens=4)
    for r in rs:
        r.logprobs = 3
    s = Scheduler(m.engine, m.tokenizer)
    for r in rs:
        s.add(r)
    outputs = []
    while s.busy:
        outputs += s.step()
    logits = m.logits([PROMPTS[0]])[0, -1].log_softmax(-1)
    first = next(o for o in outputs if o.id == rs[0].id)
    assert first.logprob == pytest.approx(float(logits[first.token]), abs=1e-4)
    assert [t for t, _ in first.top_logprobs] == logits.topk(3).indices.tolist()


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_row_with_nothing_to_pick_fails_alone(m, do_sample):
    """Every token banned but the end-of-sequence ones, which min_new_tokens masks, leaves a row no finite score:
    that request ends with its error, the batch runs on."""
    expected = [alone(m, p, max_new_tokens=8).token_ids for p in PROMPTS[:2]]
    good = requests(m, PROMPTS[:2], max_new_tokens=8)
    vocab = m.engine.model.config.vocab_size + m.engine.model.config.additional_vocab_size
    bad = requests(m, PROMPTS[2:3], max_new_tokens=8, min_new_tokens=4, do_sample=do_sample,
                   banned_token_ids=list(range(vocab)))[0]
    s = Scheduler(m.engine, m.tokenizer)
    for r in (good[0], bad, good[1]):
        s.add(r)
    outputs = []
    while s.busy:
        outputs += s.step()
    failed = [o for o in outputs if o.id == bad.id]
    assert [o.finish_reason for o in failed] == ["error"] and "not finite" in failed[0].error
    assert [r.generated for r in good] == expected
    assert not s.engine.active
    with pytest.raises(IdeficsError, match="every token is banned"):
        m.generate([PROMPTS[0]], max_new_tokens=3, min_new_tokens=2, banned_token_ids=list(range(vocab)))
    assert alone(m, PROMPTS[0], max_new_tokens=8).token_ids == expected[0]


def test_admission_takes_a_lone_arrival_at_once_and_groups_a_backlog(m):
    """A request added while others run is admitted at the next step when a slot is free; with more waiting than
    free slots, admission waits to prefill several at once, but never past ADMIT_WAIT steps."""
    from idefics.scheduler import ADMIT_WAIT

    s = Scheduler(m.engine, m.tokenizer, max_batch=16)  # groups of 2
    long = requests(m, PROMPTS * 4, max_new_tokens=ADMIT_WAIT + 8, eos_token_id=[])
    for r in long[:14]:
        s.add(r)
    s.step()
    assert len(s.running) == 14
    s.add(long[14])
    s.step()
    assert long[14].slot is not None and len(long[14].generated) == 1  # 2 free slots, 1 waiting: at once
    backlog = requests(m, PROMPTS[:3], max_new_tokens=4)
    for r in backlog:
        s.add(r)
    steps = 0
    while all(r.slot is None for r in backlog):
        s.step()
        steps += 1
    assert steps == ADMIT_WAIT + 1 and [r.slot is not None for r in backlog] == [True, False, False]
    while s.busy:
        s.step()
    assert all(r.finish == "length" for r in long[:15] + backlog)


def test_a_backlog_groups_the_oldest_with_the_closest_lengths_and_aborts_any_waiting_request(m):
    """With more waiting than free slots, the oldest request is admitted with those whose prompts are closest to its
    length (one prefill pads to its longest); a request waiting anywhere in the queue can be aborted."""
    s = Scheduler(m.engine, m.tokenizer, max_batch=16)  # groups of 2
    long = requests(m, PROMPTS * 4, max_new_tokens=8, eos_token_id=[])
    for r in long[:14]:
        s.add(r)
    s.step()
    backlog = requests(m, [PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[0]], max_new_tokens=3)
    for r in backlog:
        s.add(r)
    s.abort(backlog[4].id)  # the last one waiting
    s.step()
    size = lambda r: r.prompt.ids.shape[0]  # noqa: E731
    closest = min(backlog[1:4], key=lambda r: abs(size(r) - size(backlog[0])))
    assert [r for r in backlog if r.slot is not None] == [backlog[0], closest]
    assert backlog[4].finish == "abort"
    while s.busy:
        s.step()
    assert all(r.finish == "length" for r in backlog[:4])
    assert [r.generated for r in backlog[:4]] == [alone(m, p, max_new_tokens=3).token_ids for p in
                                                   (PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3])]


def test_more_slots_after_a_long_single_sequence_size_the_length_again(m, monkeypatch):
    """The buffers grow to the slots a new batch needs at the length it needs, not at the length a single long
    sequence had before (slots x the whole context could exceed the memory)."""
    monkeypatch.setattr(scheduler, "LEN_RESERVE", 64)  # lengths below the tiny model's 256-token context
    e, context = Engine(m.model), m.config.max_position_embeddings
    e.reserve(1, context, 1)
    rs = requests(m, PROMPTS, max_new_tokens=4)
    run(Scheduler(e, m.tokenizer, max_batch=8), {0: rs})
    assert (e.slots, e.max_len) == (8, 64)
    assert [r.generated for r in rs] == [alone(m, p, max_new_tokens=4).token_ids for p in PROMPTS]
