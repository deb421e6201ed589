"""The public API on CUDA, in float32 and bfloat16, against the same calls on the CPU: `make test-gpu` (`make test`
leaves these out; without a CUDA GPU they skip). Tiny random checkpoints (checkpoints.py) and the demo model.

What "the same" means here:
- float32: greedy and beam tokens, texts, finish reasons and answers equal the CPU's; logits within
  F32_ATOL + F32_RTOL * |cpu| (a float32 product summed in another order).
- bfloat16 (and float16, for the logits and greedy tokens): logits within BF16_ATOL + BF16_RTOL * |cpu float32|
  (about three times what bfloat16 on the CPU differs by); each greedy token within BF16_MARGIN of the best
  allowed logit of the CPU's float32 model, teacher-forced on the generated sequence; what does not depend on
  rounding (stop rules, lengths, seeds) is checked as in float32.
- the demo model's evaluation accuracy (held-out scenes) within 1 point of the CPU's, in both dtypes.
- quantized layers against the model with their dequantized weights (not the bfloat16 model: 4 and 8 bits lose
  what they lose).

IDEFICS_TEST_GPU_DEVICE (default cuda) runs the suite on another device; with "cpu" it checks its own logic."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from checkpoints import make_checkpoint
from idefics import quantize
from idefics.api import Idefics
from idefics.demo import evaluate
from idefics.demo.examples import paths as demo_images
from idefics.batch import run_file
from idefics.engine import BATCH_LEN_BUCKET, Engine, _round_up, cache_bytes, free_memory, split_batch
from idefics.graphs import slot_bucket
from idefics.hub import DEMO_DIR
from idefics.images import ImageTransform
from idefics.inputs import full_logits
from idefics.pipeline import ImagePipeline
from idefics.resize import resize
from idefics.sampling import GenerationOptions
from idefics.scheduler import ROWS, Request, Scheduler, default_banned

DEVICE = os.environ.get("IDEFICS_TEST_GPU_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="no CUDA GPU")]

# Hopper: where the fp8 layers run their own kernels (fp8.kernels_ready)
HOPPER = CUDA and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
DTYPES = ["float32", "bfloat16"]
F32_ATOL, F32_RTOL = 2e-4, 2e-4
BF16_ATOL, BF16_RTOL = 0.2, 0.05  # logits of unit-scale weights: std ~1, max ~5; bf16 on the CPU is off by < 0.08
BF16_MARGIN = 0.5
DEMO_SCENES = 100  # held-out scenes per task for the accuracy comparison (600 answers: 1 point is 6 of them)
DEMO_TASKS = ("caption",) + evaluate.VQA_MAIN + ("classify",)
SRC = Path(idefics.__file__).resolve().parents[1]
DEMO_IMAGE = demo_images()[0]


def noise(size, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny instruct checkpoint and two images as PNG files (the command line reads the same files)."""
    root = tmp_path_factory.mktemp("gpu")
    path, _ = make_checkpoint(root / "tiny", instruct=True)
    a, b = root / "a.png", root / "b.png"
    noise((40, 30), 1).save(a)
    noise((64, 20), 2).save(b)
    return path, a, b


@pytest.fixture(scope="module")
def prompts(files):
    _, a, b = files
    return [["Question: Where are these people and what's the weather like? Answer:"], [a, "This is an image of"],
            ["User:", a, "Describe this image.\nAssistant:", b, "Category:"], [b, "Story: \n"]]


@pytest.fixture(scope="module")
def cpu(files):
    return idefics.load(files[0], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def models(files):
    """dtype -> the tiny checkpoint on the device, loaded once each."""
    return cache(lambda dtype: idefics.load(files[0], device=DEVICE, dtype=dtype))


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, dtype: str, where=None):
    got, expected = got.float().cpu(), expected.float().cpu()
    if where is not None:
        got, expected = got[where], expected[where]
    atol, rtol = (F32_ATOL, F32_RTOL) if dtype == "float32" else (BF16_ATOL, BF16_RTOL)
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


def teacher_forced(m: Idefics, prompt: list, tokens: list[int]) -> torch.Tensor:
    """m's logits (T, V) before each of `tokens`, read after the prompt in one pass (no cache), generated tokens
    seeing the prompt's last image as in generation; the banned image tokens at -inf."""
    batch = m.process([prompt])
    s, t = batch["input_ids"].shape[1], len(tokens)
    iam = batch["image_attention_mask"]
    batch = {"input_ids": torch.cat([batch["input_ids"], torch.tensor([tokens])], dim=1),
             "attention_mask": torch.ones(1, s + t, dtype=torch.long), "pixel_values": batch["pixel_values"],
             "image_attention_mask": torch.cat([iam, iam[:, -1:].expand(1, t, iam.shape[2])], dim=1)}
    logits = full_logits(m.model, batch)[0, s - 1 : s + t - 1].float().cpu().clone()  # not an inference tensor
    logits[:, default_banned(m.tokenizer)] = -float("inf")
    return logits


def assert_near_greedy(cpu: Idefics, prompt: list, tokens: list[int]):
    """Each token is within BF16_MARGIN of the CPU float32 model's best at its position."""
    logits = teacher_forced(cpu, prompt, tokens)
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    gap = logits.max(dim=1).values - chosen
    assert gap.max() <= BF16_MARGIN, (tokens, gap.tolist())


def same_completions(got, expected):
    assert [(c.token_ids, c.text, c.finish_reason) for c in got] == \
        [(c.token_ids, c.text, c.finish_reason) for c in expected]


# The model on the device

def test_the_device_runs_fused_decoding_and_cuda_graphs(models):
    for dtype in DTYPES:
        s = models(dtype).summary()
        assert s["device"].startswith(DEVICE) and s["dtype"] == dtype
        if CUDA:  # the paths the rest of this file exercises
            assert s["fused_decode"] and s["cuda_graphs"], s


def test_images_resized_on_the_device_equal_pillows(tmp_path):
    """resize.py on the device at shapes of both pass orders, and a pipeline staging JPEG photos there (stage.py),
    against Pillow's resize and the workers' own pixels."""
    rng = np.random.default_rng(0)
    for width, height in ((1600, 1067), (1067, 1600), (300, 1000), (4000, 3000), (120, 90), (1, 1), (2000, 10)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        assert np.array_equal(resize(torch.from_numpy(image).to(DEVICE), 224).cpu().numpy(), want), (width, height)
    paths = []
    for i, size in enumerate([(1600, 1067), (900, 1600), (150, 100)]):
        paths.append(tmp_path / f"{i}.jpg")
        noise(size, i).save(paths[-1], quality=85)
    transform = ImageTransform()
    staged = ImagePipeline(transform, workers=2, resize_on=DEVICE)
    for path in paths:
        got = staged.submit(path).result()
        assert np.array_equal(got.pixels.numpy(), transform.pixels(Image.open(path).convert("RGB")))
    assert staged.resizer.checked and staged.resizer.stage.enabled.value
    staged.close()


def test_the_captured_image_encoders_equal_the_eager_one(models):
    """13 new images through the encoders captured at warm-up (8 + 4 + 1), each row as the eager encoder gives it; the
    last graph's replay does not overwrite the first's output (the graphs share a memory pool)."""
    m = models("float32")
    m.generate([["A first request: the engine reserves its buffers and captures its graphs."]], max_new_tokens=2)
    encoder, size = m.engine.encoder, m.config.vision.image_size
    x = torch.randn(13, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = m.model.encode_images(x.to(DEVICE))
    captured = len(encoder.graphs.graphs) if encoder.graphs else 0
    encoder.cache.clear()
    got = encoder(x)
    if encoder.graphs:  # no capture on a request's path: warm-up made them all
        assert len(encoder.graphs.graphs) == captured and ("encode", 8) in encoder.graphs.graphs
    torch.testing.assert_close(got, expected, atol=F32_ATOL, rtol=F32_RTOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_captured_prefill_of_several_prompts_equals_the_eager_one(models, dtype, files):
    """Short prompts prefilled together run a captured graph, rows padded to a slot bucket (3 prompts run 4 rows, the
    padding row writing the scratch slot), lengths to BATCH_LEN_BUCKET: logits and the decode steps after it as the
    eager prefill gives them (after longer prompts left their rows in the prefill's buffers), and a sequence already
    live in another slot keeps its cache; the same shape again replays the graph."""
    m, (_, a, b) = models(dtype), files
    first = split_batch(m.process([[b, "Story: \n"]]))
    three = split_batch(m.process([[a, "This is an image of"], [b, "Question: What is it? Answer:"], [a, "A"]]))
    long = split_batch(m.process([[a, "Question: " + "what is in this picture and why? " * 6 + "Answer:"]] * 4))
    assert max(p.ids.shape[0] for p in three) <= 32 and all(p.pixels.shape[0] == 1 for p in three)
    assert min(p.ids.shape[0] for p in long) > 32  # prefilled eagerly
    key = ("prefill", 4, _round_up(max(p.ids.shape[0] for p in three), BATCH_LEN_BUCKET), m.config.image_seq_len)

    def run(engine: Engine) -> list[torch.Tensor]:
        engine.reserve(8, 128, 1)
        engine.warmup()
        out, captured = [], None
        for again in range(2):
            out.append(engine.prefill_batch(long, slots=[0, 1, 2, 3]).float().cpu())
            engine.release_all()
            out.append(engine.prefill_batch(first, slots=[5]).float().cpu())
            out.append(engine.prefill_batch(three, slots=[0, 2, 3]).float().cpu())
            if engine.graphs:
                assert key in engine.graphs.graphs and (not again or set(engine.graphs.graphs) == captured)
                captured = set(engine.graphs.graphs)  # the second time, replayed: nothing new
            for i in range(4):
                out.append(engine.decode(torch.tensor([7 + i, 11, 13, 17 + i]), [0, 2, 3, 5]).float().cpu())
            engine.release_all()
        return out

    got, expected = run(Engine(m.model, graphs=CUDA)), run(Engine(m.model, graphs=False))
    for g, e in zip(got, expected):
        assert_logits_close(g, e, dtype)


def test_process_is_the_cpus(models, cpu, prompts):
    got, expected = models("bfloat16").process(prompts), cpu.process(prompts)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("dtype", DTYPES + ["float16"])  # float16: the plain decode step (no fused kernels)
def test_logits_close_to_the_cpus(models, cpu, prompts, dtype):
    got, expected = models(dtype).logits(prompts), cpu.logits(prompts)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    real = cpu.process(prompts)["attention_mask"].bool()  # padding positions are not compared
    assert_logits_close(got, expected, dtype, real)


@pytest.mark.parametrize("dtype", DTYPES + ["float16"])
def test_greedy_generate(models, cpu, prompts, dtype):
    m = models(dtype)
    got = m.generate(prompts, max_new_tokens=12, eos_token_id=[])
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in got)
    if dtype == "float32":
        same_completions(got, cpu.generate(prompts, max_new_tokens=12, eos_token_id=[]))
        # A batch gives each prompt what it gets alone (in bfloat16 a batch's products round differently).
        assert [c.token_ids for c in got] == \
            [m.generate([p], max_new_tokens=12, eos_token_id=[])[0].token_ids for p in prompts]
    else:
        for p, c in zip(prompts, got):
            assert_near_greedy(cpu, p, c.token_ids)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_with_a_seed(models, prompts, dtype):
    m = models(dtype)
    options = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=[])
    first = m.generate(prompts, seed=7, **options)
    assert [c.token_ids for c in m.generate(prompts, seed=7, **options)] == [c.token_ids for c in first]
    assert [c.token_ids for c in m.generate(prompts, seed=8, **options)] != [c.token_ids for c in first]
    if dtype == "float32":  # each request draws from its own generator: alone, a prompt draws what it drew in the batch
        assert m.generate(prompts[2:3], seed=7, **options)[0].token_ids == first[2].token_ids
    # top_k=1 samples the greedy token.
    greedy = m.generate(prompts, max_new_tokens=12)
    assert [c.token_ids for c in m.generate(prompts, max_new_tokens=12, do_sample=True, top_k=1, seed=3)] == \
        [c.token_ids for c in greedy]


@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_search(models, cpu, prompts, dtype):
    options = dict(num_beams=3, max_new_tokens=10, length_penalty=0.5)
    got = models(dtype).generate(prompts, **options)
    assert all(len(c.token_ids) <= 10 for c in got)
    if dtype == "float32":
        same_completions(got, cpu.generate(prompts, **options))
        same_completions(models(dtype).generate(prompts[:2], num_beams=2, max_new_tokens=8, early_stopping=True),
                         cpu.generate(prompts[:2], num_beams=2, max_new_tokens=8, early_stopping=True))


def _stop_string(text: str) -> str:
    """Two printable characters that first occur a few characters into the text."""
    for i in range(3, len(text) - 2):
        s = text[i : i + 2]
        if s.isprintable() and s.strip() and text.find(s) == i and "\ufffd" not in s:
            return s
    raise AssertionError(f"no stop string in {text!r}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_stop_strings(models, cpu, prompts, dtype):
    m = models(dtype)
    reference = cpu if dtype == "float32" else m
    free = reference.generate(prompts[1:2], max_new_tokens=16)[0].text
    stop = _stop_string(free)
    [got] = m.generate(prompts[1:2], max_new_tokens=16, stop=[stop, "never there"])
    assert got.finish_reason == "stop" and got.text == free[: free.index(stop)]
    if dtype == "float32":
        same_completions([got], cpu.generate(prompts[1:2], max_new_tokens=16, stop=[stop, "never there"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_repetition_penalty_and_token_limits(models, cpu, prompts, dtype):
    m = models(dtype)
    reference = cpu if dtype == "float32" else m
    free = reference.generate(prompts[:1], max_new_tokens=8)[0].token_ids
    eos = free[2]  # would stop the greedy continuation at its third token
    cases = [dict(max_new_tokens=10, repetition_penalty=1.8),
             dict(max_new_tokens=10, eos_token_id=eos),
             dict(max_new_tokens=10, min_new_tokens=6, eos_token_id=eos),
             dict(max_length=m.process(prompts[:1])["input_ids"].shape[1] + 5, eos_token_id=[])]
    results = [m.generate(prompts[:1], **o)[0] for o in cases]
    assert results[1].token_ids[-1] == eos and results[1].finish_reason == "stop" and len(results[1].token_ids) <= 3
    assert eos not in results[2].token_ids[:6] and len(results[2].token_ids) >= 6
    assert len(results[3].token_ids) == 5 and results[3].finish_reason == "length"
    if dtype == "float32":
        same_completions(results, [cpu.generate(prompts[:1], **o)[0] for o in cases])


@pytest.mark.parametrize("dtype", DTYPES)
def test_stream(models, cpu, prompts, dtype):
    m = models(dtype)
    for options in (dict(max_new_tokens=12), dict(max_new_tokens=6, num_beams=2)):
        pieces = list(m.stream(prompts[2], **options))
        assert "".join(pieces) == m.generate([prompts[2]], **options)[0].text
        if dtype == "float32":
            assert "".join(pieces) == cpu.generate([prompts[2]], **options)[0].text
    # A stream closed early ends its request: nothing stays in the batch.
    stream = m.stream(prompts[3], max_new_tokens=50)
    next(stream)
    stream.close()
    assert m.generate(prompts[:1], max_new_tokens=4)[0].token_ids  # the engine goes on
    left = m.loop.call(lambda: (m.engine.active, [(len(r.generated), r.budget) for r in m.scheduler.running]))
    assert left == (0, []), left


def _tasks(m: Idefics, a, b) -> list:
    return [m.caption(a), m.caption([a, b], "This is an image of "), m.ask(b, "What is it?"),
            m.few_shot([(a, "A picture.")], b, max_new_tokens=10), m.story(b, max_new_tokens=16),
            m.classify([a, b], ["animals", "city landscape", "cars"], mode="generate")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tasks(models, cpu, files, dtype):
    _, a, b = files
    got = _tasks(models(dtype), a, b)
    assert [type(x) for x in got] == [str, list, str, str, str, list]
    if dtype == "float32":
        assert got == _tasks(cpu, a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ranked_classification(models, cpu, files, dtype):
    _, a, b = files
    m, labels = models(dtype), ["animals", "vegetables", "city landscape", "cars", "office"]
    single = m.classify(a, labels)
    batched = m.classify([a, b, a], labels)
    expected = cpu.classify([a, b], labels)
    # Probabilities and log-likelihoods against the CPU's, label by label.
    p_tol, ll_tol = (1e-4, 1e-3) if dtype == "float32" else (0.1, 1.0)
    for got, want in zip([single, *batched], [expected[0], *expected, expected[0]]):
        got, want = sorted(got), sorted(want)  # by label
        assert [x.label for x in got] == [x.label for x in want]
        assert max(abs(x.probability - y.probability) for x, y in zip(got, want)) <= p_tol
        assert max(abs(x.log_likelihood - y.log_likelihood) for x, y in zip(got, want)) <= ll_tol
    if dtype == "float32":  # the batch gives each image what it gets alone, ranked as on the CPU
        assert batched[0] == single and batched[2] == single
        assert [[x.label for x in r] for r in batched[:2]] == [[x.label for x in r] for r in expected]


@pytest.mark.parametrize("dtype", DTYPES)
def test_chat(models, cpu, files, dtype):
    _, a, b = files

    def talk(m):
        chat = m.chat(max_new_tokens=10)
        replies = [chat.send("What is in this image?", images=a), chat.send(["And here?", b])]
        replies.append("".join(chat.stream("Which one is larger?")))
        return replies, chat.history

    replies, history = talk(models(dtype))
    assert len(replies) == 3 and len(history) > 6
    if dtype == "float32":
        assert (replies, history) == talk(cpu)


# The scheduler and the engine on the device

def test_threads_joining_one_batch_get_their_single_answers(models, cpu, files, prompts):
    """float32 greedy: calls from several threads at once, joining and leaving the running batch."""
    m, (_, a, b) = models("float32"), files

    def calls(m):
        return [lambda: m.caption(a), lambda: m.ask(b, "What is it?"), lambda: m.story(a, max_new_tokens=12),
                lambda: m.classify(b, ["animals", "cars"]), lambda: m.few_shot([(a, "A picture.")], b),
                *[lambda p=p, i=i: m.generate([p], max_new_tokens=9 + i)[0].token_ids for i, p in enumerate(prompts)]]

    expected = [call() for call in calls(cpu)]
    with ThreadPoolExecutor(len(expected)) as pool:
        for _ in range(2):
            got = list(pool.map(lambda call: call(), calls(m)))
            assert got[:3] == expected[:3] and got[4:] == expected[4:]
            assert [x.label for x in got[3]] == [x.label for x in expected[3]]


def _requests(m: Idefics, prompts, **options) -> list[Request]:
    o = GenerationOptions.make(**options)
    return [Request.make(p, o, m.tokenizer, m.config.max_position_embeddings) for p in split_batch(m.process(prompts))]


def test_an_abort_frees_its_slot_for_the_next_request(models, cpu, prompts):
    m = models("float32")
    s = Scheduler(Engine(m.model), m.tokenizer, max_batch=2)
    first, later = _requests(m, prompts[:2], max_new_tokens=12), _requests(m, prompts[2:3], max_new_tokens=6)[0]
    for r in first + [later]:
        s.add(r)
    steps, freed = 0, None
    while s.busy:
        if steps == 4:
            s.abort(first[0].id)
            freed = first[0].slot
        s.step()
        if steps == 3:
            assert sorted(r.slot for r in s.running) == [0, 1] and later.slot is None
        if steps == 4:  # the waiting request took the aborted one's slot at the step the abort took effect
            assert any(r is later for r in s.running) and later.slot == freed
        steps += 1
    assert first[0].finish == "abort" and len(first[0].generated) == 4
    assert first[1].generated == cpu.generate(prompts[1:2], max_new_tokens=12)[0].token_ids
    assert later.generated == cpu.generate(prompts[2:3], max_new_tokens=6)[0].token_ids
    assert s.engine.active == 0


def _drive(m: Idefics, prompts, **options) -> list[list]:
    """The prompts through a Scheduler of their own on m's model -> per request, its outputs' (token, log-probability,
    top tokens, top log-probabilities)."""
    s = Scheduler(Engine(m.model), m.tokenizer)
    rs = m.requests(prompts, **options)
    for r in rs:
        s.add(r)
    got = {r.id: [] for r in rs}
    while s.busy:
        for o in s.step():
            if o.token is not None:
                got[o.id].append((o.token, o.logprob, [t for t, _ in o.top_logprobs], [p for _, p in o.top_logprobs]))
    return [got[r.id] for r in rs]


def test_scheduler_outputs_with_log_probabilities(models, cpu, prompts):
    """Driving a Scheduler directly (float32): tokens, and their log-probabilities and the most likely tokens."""
    got, expected = (_drive(m, prompts, max_new_tokens=8, logprobs=3) for m in (models("float32"), cpu))
    for g, e in zip(got, expected):
        assert [x[0] for x in g] == [x[0] for x in e] and [x[2] for x in g] == [x[2] for x in e]
        torch.testing.assert_close(torch.tensor([[x[1], *x[3]] for x in g]), torch.tensor([[x[1], *x[3]] for x in e]),
                                   atol=F32_ATOL, rtol=F32_RTOL)


def test_buffers_grow_between_requests(files):
    """A request longer, or with more images, than the reserved buffers hold: they grow (new CUDA graphs in a new
    pool) and every answer stays the CPU's (the demo model, float32)."""
    m = idefics.load(DEMO_DIR, device=DEVICE, dtype="float32")
    reference = idefics.load(DEMO_DIR, device="cpu", dtype="float32")
    images = [prompt[1] for _, prompt in (evaluate.heldout("vqa/color", i, "mixed") for i in range(3))]
    short = ["User:", images[0], "What is in this image?\nAssistant:"]
    many = [x for im in images for x in ("User:", im, "Describe this image.\nAssistant: shapes.\n")] + ["User: and?"]
    calls = [(short, dict(max_new_tokens=5)), (many, dict(max_new_tokens=240, eos_token_id=[])),
             (short, dict(max_new_tokens=5))]
    got = [m.generate([p], **o)[0] for p, o in calls]
    assert m.engine.max_images >= 3 and m.engine.max_len > 256 and len(got[1].token_ids) == 240
    same_completions(got, [reference.generate([p], **o)[0] for p, o in calls])


def test_rows_past_the_cards_memory_fail_their_request_and_the_buffers_stay(models, prompts):
    """max_batch far past what the card holds (idefics batch --max-batch): the request fails with one sentence before
    reserve() frees anything; the buffers and graphs already there serve the next requests, with the same answers."""
    m = models("bfloat16")
    before = m.generate(prompts[:2], max_new_tokens=4)
    held = (m.engine.slots, m.engine.max_len, m.engine.max_images)
    kept, m.scheduler.max_batch = m.scheduler.max_batch, 10**9
    try:
        with pytest.raises(idefics.IdeficsError, match=r"^1000000000 rows of up to \d+ tokens need about [\d.]+ GiB "
                                                       rf"of cache, and {DEVICE}\S* has [\d.]+ GiB free: lower"):
            m.generate(prompts[:2], max_new_tokens=4)
    finally:
        m.scheduler.max_batch = kept
    assert (m.engine.slots, m.engine.max_len, m.engine.max_images) == held
    same_completions(m.generate(prompts[:2], max_new_tokens=4), before)


def test_idefics_batch_reserves_its_window_of_rows_and_the_model_its_own_after(files, cpu, tmp_path):
    """Without --max-batch, idefics batch reserves rows for its window of lines (where they fit: the tiny model's
    do), more than the model's own 64; the captions are the CPU's; the model's setting is back after the job."""
    path, a, b = files
    m = idefics.load(path, device=DEVICE, dtype="float32")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task": "caption", "image": str(f)}) + "\n" for f in [a, b] * 3))
    out = tmp_path / "out.jsonl"
    assert run_file(str(tasks), out, tmp_path, {"max_new_tokens": 4}, 100, lambda: m) == 0
    got = {r["line"]: r["result"] for r in map(json.loads, out.read_text().splitlines())}
    assert [got[i] for i in range(1, 7)] == cpu.caption([a, b] * 3, max_new_tokens=4)
    assert m.scheduler.rows == ROWS and m.engine.slots >= (100 if CUDA else 16)


@pytest.mark.skipif(not CUDA, reason="capacity() sizes the rows from a GPU's memory")
def test_the_default_rows_shrink_for_a_request_the_kept_ones_cannot_hold(tmp_path, cpu):
    """The cache given twice the bytes of 64 rows of 256 tokens (Scheduler.memory): short requests reserve 64 rows;
    a request of 1,024 tokens, when nothing runs, gets fewer rows of its length (64 of them would take twice the
    share: before, the rows were kept and their cache passed it); the next short one 64 rows again; every answer is
    the CPU's."""
    path, _ = make_checkpoint(tmp_path / "long", max_position_embeddings=2048, hidden_size=256)
    m, reference = (idefics.load(path, device=d, dtype="float32") for d in (DEVICE, "cpu"))
    short, long = ([["Question: what is it? Answer:"]], 4), ([["Story:" + " and then" * 300]], 40)  # 903 tokens
    m.scheduler.memory = 2 * cache_bytes(m.model, 64, 256, 1) / free_memory(m.engine.device)
    got = [m.generate(short[0], max_new_tokens=short[1])[0]]
    assert m.engine.slots == 64, m.engine.slots
    got.append(m.generate(long[0], max_new_tokens=long[1])[0])
    assert m.engine.max_len >= 1024 and 0 < m.engine.slots < 64, (m.engine.slots, m.engine.max_len)
    got.append(m.generate(short[0], max_new_tokens=short[1])[0])
    assert m.engine.slots == 64, m.engine.slots
    same_completions(got, [reference.generate(p, max_new_tokens=t)[0] for p, t in (short, long, short)])


def _decode_logits(engine: Engine, prompts, steps: int = 6) -> list[torch.Tensor]:
    """The prompts prefilled, then `steps` decode steps on fixed tokens -> the logits of every step (n, V)."""
    engine.release_all()
    engine.reserve(len(prompts), 64, max(p.pixels.shape[0] for p in prompts))
    engine.warmup()
    out = [engine.prefill_batch(prompts).float().cpu()]
    tokens = torch.tensor([[(97 * i + 31 * j) % 500 + 3 for j in range(len(prompts))] for i in range(steps)])
    for t in tokens:
        out.append(engine.decode(t).float().cpu())
    engine.release_all()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 130], ids=["gemv", "batch", "wide"])
def test_fused_and_captured_decode_equal_the_plain_step(models, cpu, prompts, dtype, rows):
    """The fused decode step (Triton; at one row the GEMV kernels) captured in CUDA graphs, against the plain
    model's step run eagerly, and in float32 against the CPU. "wide": past 64 rows (a larger --max-batch), slot
    buckets up to 192."""
    m = models(dtype)
    ps = split_batch(m.process((prompts * rows)[1 : 1 + rows]))
    fused = Engine(m.model, graphs=CUDA, fused=True)
    assert fused.fused is not None
    plain = Engine(m.model, graphs=False, fused=False)
    got = _decode_logits(fused, ps)
    if CUDA:  # every slot bucket captured at warm-up; the steps replayed them
        buckets = {slot_bucket(n, fused.slots) for n in range(1, fused.slots + 1)}
        assert {k[1] for k in fused.graphs.graphs if k[0] == "decode"} == buckets
    for g, want in zip(got, _decode_logits(plain, ps)):
        assert_logits_close(g, want, dtype)
    if dtype == "float32":
        for g, want in zip(got, _decode_logits(Engine(cpu.model), ps)):
            assert_logits_close(g, want, dtype)
    # The same fused step run eagerly (prefill unpadded, decode over the live rows only), and the plain step
    # captured (one graph per slot bucket and attention length, as models the kernels do not cover run).
    for g, eager in zip(got, _decode_logits(Engine(m.model, graphs=False, fused=True), ps)):
        assert_logits_close(g, eager, dtype)
    for g, captured in zip(_decode_logits(Engine(m.model, graphs=CUDA, fused=False), ps), _decode_logits(plain, ps)):
        assert_logits_close(g, captured, dtype)


@pytest.mark.skipif(CUDA and not HOPPER, reason="the fp8 kernels need Hopper")
# (On the CPU every count upcasts; Triton's interpreter would take a quarter of an hour over the fused step of 80)
@pytest.mark.parametrize("rows", [3, 24, 80] if CUDA else [3, 24])
@pytest.mark.parametrize("fusions", [(False, False), (False, True), (True, True)], ids=["none", "norm", "both"])
def test_fused_fp8_decode_equals_the_plain_step(files, prompts, rows, fusions, monkeypatch):
    """quantize="fp8" at each product's row counts: the fused step, captured (with fusions: SwiGLU in the fp8 GEMM's
    epilogue, and for fp8 tokens the norm handing them over quantized), against the plain step run eagerly, whose
    fp8 layers quantize their own inputs."""
    from idefics import fp8, fused as fused_step

    monkeypatch.setattr(fused_step, "FP8_SWIGLU", fusions[0])
    monkeypatch.setattr(fused_step, "FP8_NORM_TOKENS", fusions[1])
    m = idefics.load(files[0], device=DEVICE, dtype="bfloat16", quantize="fp8")
    ps = split_batch(m.process((prompts * rows)[:rows]))
    fused = Engine(m.model, graphs=CUDA, fused=True)
    assert fused.fused is not None
    # Where the steps' bfloat16 activations differ by a rounding (the attention's sums, the captured prefill's
    # padding), fp8 tokens may round to the neighbouring fp8 value (1/16 of them apart): twice bfloat16's atol
    atol = BF16_ATOL if rows <= fp8.WEIGHT_ONLY_ROWS else 2 * BF16_ATOL
    for got, want in zip(_decode_logits(fused, ps), _decode_logits(Engine(m.model, graphs=False, fused=False), ps)):
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol, rtol=BF16_RTOL)


# The command line, as a subprocess on the device

@pytest.fixture(scope="module")
def cli(files, tmp_path_factory):
    """Every command at once (each its own process) -> name -> (stdout, stderr, exit status)."""
    path, a, b = files
    root = tmp_path_factory.mktemp("cli")
    jobs = [{"task": "caption", "image": str(a), "id": "c", "options": {"max_new_tokens": 6}},
            {"task": "ask", "image": str(b), "question": "What is it?", "options": {"max_new_tokens": 6}},
            {"task": "classify", "image": str(a), "labels": ["animals", "cars"], "id": 7},
            {"task": "generate", "prompt": ["User:", {"image": str(b)}, "Hi\nAssistant:"],
             "options": {"max_new_tokens": 6}}]
    (root / "tasks.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    model = ["--model", str(path), "--device", DEVICE, "--dtype", "float32"]
    short = ["--max-new-tokens", "6", "--json"]
    commands = {
        "caption": ["caption", str(a), str(b), *model, *short],
        "caption-prompt": ["caption", str(a), "--prompt", "This is an image of ", *model, *short],
        "caption-bf16": ["caption", str(a), "--model", str(path), "--device", DEVICE, "--dtype", "bfloat16", *short],
        "ask": ["ask", str(a), "-q", "What is it?", *model, *short],
        "classify": ["classify", str(a), str(b), "--labels", "animals", "city landscape", "cars", *model, "--json"],
        "classify-generate": ["classify", str(a), "--labels", "animals", "cars", "--mode", "generate", *model, *short],
        "story": ["story", str(b), *model, "--max-new-tokens", "12", "--json"],
        "few-shot": ["few-shot", str(b), "--example", str(a), "A picture.", *model, *short],
        "generate": ["generate", "-t", "User:", "-i", str(a), "-t", "Describe this image.\nAssistant:", *model, *short],
        "generate-stream": ["generate", "-t", "User:", "-i", str(a), "-t", "Describe this image.\nAssistant:", *model,
                            "--max-new-tokens", "6"],
        "chat": ["chat", "--image", str(a), *model, *short],
        "batch": ["batch", str(root / "tasks.jsonl"), "-o", str(root / "results.jsonl"), *model],
        "info": ["info", *model, "--json"],
        "demo": ["demo"],
    }
    if importlib.util.find_spec("bitsandbytes"):  # optional: quantized loading from the command line
        commands["caption-nf4"] = ["caption", str(DEMO_IMAGE), "--model", str(DEMO_DIR), "--device", DEVICE,
                                   "--dtype", "bfloat16", "--quantize", "nf4", "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    stdin = {"chat": "What is in this image?\nAnd now?\n"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "idefics", *args], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
             for name, args in commands.items()}
    out = {name: (*p.communicate(stdin.get(name, ""), timeout=600), p.returncode) for name, p in procs.items()}
    out["batch-results"] = ((root / "results.jsonl").read_text(), "", 0)
    return out


def run_cli(cli, name: str) -> list:
    stdout, stderr, status = cli[name]
    assert status == 0, stderr[-3000:]
    return [json.loads(line) for line in stdout.splitlines()] if stdout.startswith("{") else stdout


def test_cli_tasks_equal_the_cpu_api(cli, cpu, models, files):
    _, a, b = files
    results = lambda name: [r["result"] for r in run_cli(cli, name)]  # noqa: E731
    assert results("caption") == cpu.caption([a, b], max_new_tokens=6)
    assert results("caption-prompt") == [cpu.caption(a, "This is an image of ", max_new_tokens=6)]
    assert results("caption-bf16") == [models("bfloat16").caption(a, max_new_tokens=6)]
    assert results("ask") == [cpu.ask(a, "What is it?", max_new_tokens=6)]
    assert results("classify-generate") == [cpu.classify(a, ["animals", "cars"], mode="generate", max_new_tokens=6)]
    assert results("story") == [cpu.story(b, max_new_tokens=12)]
    assert results("few-shot") == [cpu.few_shot([(a, "A picture.")], b, max_new_tokens=6)]
    ranked = results("classify")
    for got, want in zip(ranked, cpu.classify([a, b], ["animals", "city landscape", "cars"])):
        assert [x["label"] for x in got] == [x.label for x in want]
        assert all(abs(x["probability"] - y.probability) <= 1e-4 for x, y in zip(got, want))


def test_cli_generate_chat_batch_info(cli, cpu, files):
    _, a, b = files
    [c] = cpu.generate([["User:", a, "Describe this image.\nAssistant:"]], max_new_tokens=6)
    assert run_cli(cli, "generate") == [{"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}]
    assert run_cli(cli, "generate-stream") == c.text + "\n"
    chat = cpu.chat(max_new_tokens=6)
    expected = [chat.send("What is in this image?", images=a), chat.send("And now?")]
    assert [r["reply"] for r in run_cli(cli, "chat")] == expected
    run_cli(cli, "batch")
    records = {r["line"]: r for r in run_cli(cli, "batch-results")}
    assert all("error" not in r for r in records.values()), records
    assert records[1]["result"] == cpu.caption(a, max_new_tokens=6) and records[1]["id"] == "c"
    assert records[2]["result"] == cpu.ask(b, "What is it?", max_new_tokens=6)
    assert [x["label"] for x in records[3]["result"]] == [x.label for x in cpu.classify(a, ["animals", "cars"])]
    assert records[4]["result"] == cpu.generate([["User:", b, "Hi\nAssistant:"]], max_new_tokens=6)[0].text
    info = run_cli(cli, "info")[0]
    assert info["device"].startswith(DEVICE) and info["dtype"] == "float32"
    assert not CUDA or (info["fused_decode"] and info["cuda_graphs"])


def test_cli_demo(cli):
    text = run_cli(cli, "demo")
    assert f"parameters, {DEVICE}" in text and "== Chat" in text and "error" not in text


def test_cli_quantized(cli):
    pytest.importorskip("bitsandbytes")
    q = idefics.load(DEMO_DIR, device=DEVICE, dtype="bfloat16", quantize="nf4")
    assert [r["result"] for r in run_cli(cli, "caption-nf4")] == [q.caption(DEMO_IMAGE)]


# The demo model

@pytest.fixture(scope="module")
def demo_accuracy():
    def accuracy(device: str, dtype: str) -> float:
        results = evaluate.evaluate(idefics.load(DEMO_DIR, device=device, dtype=dtype), DEMO_SCENES, "mixed",
                                    DEMO_TASKS, batch=100)
        return 100 * sum(results[t][0] for t in DEMO_TASKS) / sum(results[t][1] for t in DEMO_TASKS)

    return cache(accuracy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_demo_accuracy_within_one_point_of_the_cpus(demo_accuracy, dtype):
    on_cpu, on_device = demo_accuracy("cpu", "float32"), demo_accuracy(DEVICE, dtype)
    assert on_cpu >= 90 and abs(on_device - on_cpu) <= 1.0, (on_cpu, on_device)


# Quantized loading (the packages are optional: skipped where absent)

QUANT_PACKAGES = {name: m.package for name, m in quantize.METHODS.items()}


def _dequantized(quantized: Idefics) -> Idefics:
    """The demo model in the same dtype, each quantized layer's weight replaced by what the layer computes with:
    its output for the identity matrix (exact for weight-only layers; int8's rows of the identity quantize
    without loss too)."""
    ref = idefics.load(DEMO_DIR, device=DEVICE, dtype=quantized.dtype)
    method = quantize.METHODS[quantized.quantize]
    names = [n for n, mod in ref.model.named_modules() if quantize.is_target(n, mod, method)]
    assert names and all(type(quantized.model.get_submodule(n)) is not torch.nn.Linear
                         or type(quantized.model.get_submodule(n).weight) is not torch.nn.Parameter for n in names)
    with torch.no_grad():
        for n in names:
            linear = ref.model.get_submodule(n)
            eye = torch.eye(linear.in_features, dtype=quantized.dtype, device=quantized.device)
            linear.weight.copy_(quantized.model.get_submodule(n)(eye).T)
    return ref


@pytest.mark.parametrize("rows", [16, 48])
@pytest.mark.skipif(CUDA and not HOPPER, reason="the fp8 kernels need Hopper")
def test_the_fp8_gemm_converts_every_e4m3_value_exactly(rows):
    """The weight-only GEMM converts fp8 weights by bit moves (fp8_gemm._E4M3_TO_BF16): each of the 254 finite
    codes (subnormals and both zeros included) read back through one-hot rows equals torch's conversion, with 16
    rows and with 48 (part of a tile of 64)."""
    from idefics import fp8_gemm

    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes: a NaN weight would spread over its whole output row
    w = codes.view(torch.float8_e4m3fn).reshape(16, 16).repeat(1, rows // 16).to(DEVICE)  # (N 16, K rows)
    x = torch.eye(rows, dtype=torch.bfloat16, device=DEVICE)  # row i picks column i of w
    got = fp8_gemm.weight_only_mm(x, w.contiguous(), torch.ones(16, device=DEVICE))
    assert torch.equal(got.cpu(), w.T.to(torch.bfloat16).cpu())


@pytest.mark.parametrize("m", [5, 32, 64])
@pytest.mark.skipif(CUDA and not HOPPER, reason="the fp8 kernels need Hopper")
def test_the_triton_scaled_product_equals_scaled_mm(m):
    """fp8_gemm.tokens_fp8_mm ("scaled-triton") and torch._scaled_mm multiply the same fp8 tokens by the same fp8
    weights: equal but for the float32 sums' order and the last rounding."""
    from idefics import fp8, fp8_gemm

    torch.manual_seed(0)
    q, s = fp8.quantize_weight(torch.randn(320, 1024, device=DEVICE) * 0.02)
    x = (torch.randn(m, 1024, device=DEVICE) * torch.logspace(-1, 1, m, device=DEVICE)[:, None]).to(torch.bfloat16)
    got, want = fp8_gemm.tokens_fp8_mm(x, q, s).float(), fp8.scaled_mm(x, q, s).float()
    assert ((got - want).abs() / want.abs().amax(1, keepdim=True)).max() <= 1e-2


@pytest.mark.parametrize("m", [5, 32, 64])
def test_the_gemm_of_bf16_weights_equals_the_float32_product(m, monkeypatch):
    """fp8_gemm.plain_mm (fused.GEMM_ROWS) at its default launch shapes (K split for wo's and w2's shapes), its
    weight tiles prefetched before the PDL wait: the float32 product rounded once to bfloat16; with swiglu (w13's
    shape), kernels.silu_mul of that product."""
    from idefics import fp8_gemm, kernels

    torch.manual_seed(0)
    for n, k, swiglu in ((4096, 4096, False), (4096, 11008, False), (12288, 4096, False), (22016, 4096, True)):
        w = (torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
        want = x.float() @ w.float().T
        # one rounding to bfloat16: half a step on the GPU; Triton's interpreter truncates (a whole step)
        bound = 2 ** -7 if kernels.INTERPRET else 2 ** -8
        if swiglu:  # and the gate and up rounded from sums of another order: one bfloat16 step apart at most
            want, bound = kernels.silu_mul(want.to(torch.bfloat16)).float(), 2 ** -7
        for prefetch in (0, 1):
            monkeypatch.setattr(fp8_gemm, "PREFETCH", prefetch)
            got = fp8_gemm.plain_mm(x, w, swiglu).float()
            assert ((got - want).abs() / want.abs().amax(1, keepdim=True)).max() <= bound


@pytest.mark.parametrize("m", [8, 32, 100])
@pytest.mark.skipif(CUDA and not HOPPER, reason="the fp8 kernels need Hopper")
def test_fp8_products_apply_swiglu_as_silu_mul_does(m):
    """fp8.mm with swiglu at each product's row counts (weight-only, fp8 tokens, scaled_mm; w13's shape, K split at
    8 rows): SwiGLU in the Triton GEMMs' epilogue gives kernels.silu_mul's bits of the plain product; and tokens
    handed over quantized (as the fused step's norm does) give the bits of tokens the product quantizes itself."""
    from idefics import fp8, kernels

    torch.manual_seed(0)
    q, s = fp8.quantize_weight(torch.randn(2 * 2048, 4096, device=DEVICE) * 0.02)
    x = torch.randn(m, 4096, device=DEVICE).to(torch.bfloat16)
    assert torch.equal(fp8.mm(x, q, s, swiglu=True), kernels.silu_mul(fp8.mm(x, q, s)))
    if fp8.quantizes_tokens(q, m, x.dtype):
        assert torch.equal(fp8.mm(fp8.quantize_rows(x), q, s, swiglu=True), fp8.mm(x, q, s, swiglu=True))
    assert fp8.quantizes_tokens(q, m, x.dtype) == (HOPPER and m > fp8.WEIGHT_ONLY_ROWS)


@pytest.mark.parametrize("method", list(QUANT_PACKAGES))
def test_quantized_loading(method):
    pytest.importorskip(QUANT_PACKAGES[method])
    if DEVICE not in quantize.METHODS[method].devices and not CUDA:
        pytest.skip(f"{method} runs on CUDA only")
    q = idefics.load(DEMO_DIR, device=DEVICE, dtype="bfloat16", quantize=method)
    assert q.summary()["quantize"] == method
    ref = _dequantized(q)
    items = [(task, *evaluate.heldout(task, i, "mixed")) for task in evaluate.VQA_MAIN for i in range(5)]
    prompts = [prompt for _, _, prompt in items]
    got, want = q.logits(prompts[:8]), ref.logits(prompts[:8])
    real = q.process(prompts[:8])["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(got[real], want[real], dim=-1)
    # int8: LLM.int8() rounds the activations to 8 bits too; so does fp8 on Hopper, where these 8 prompts' rows go
    # through scaled_mm with each token's activations in fp8 (worst position 0.994 on an H100). Where the fp8 layer
    # upcasts, the scale multiplies the bfloat16 product instead of being folded into the weights, a rounding of
    # bfloat16's size (bfloat16's own worst position against float32 on this model is 0.997).
    fp8_scaled = method == "fp8" and HOPPER
    floor = {"int8": 0.99, "fp8": 0.99 if fp8_scaled else 0.998}.get(method, 0.999)
    assert cosine.min() >= floor, cosine.min()
    # Generation through the engine (CUDA graphs and the fused step around the quantized layers): the answers of
    # the dequantized model, and right ones.
    answers = [c.text for c in q.generate(prompts, **evaluate.OPTIONS["vqa"])]
    expected = [c.text for c in ref.generate(prompts, **evaluate.OPTIONS["vqa"])]
    assert sum(x == y for x, y in zip(answers, expected)) >= 0.9 * len(prompts), list(zip(answers, expected))
    right = sum(evaluate.scores(task, text, example.answer)[task] for (task, example, _), text in zip(items, answers))
    assert right >= 0.8 * len(items), list(zip(answers, [example.answer for _, example, _ in items]))
