"""`idefics serve`: real servers on 127.0.0.1 driven by the official openai client, raw HTTP, schemathesis and a
headless Chromium; the demo model answers, so right answers are known."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import redirect, reference_tokenizer, serve

import idefics
from idefics import tasks
from idefics.demo.examples import paths
from idefics.engine import split_batch
from idefics.hub import DEMO_DIR
from idefics.images import load_image
from idefics.server.app import server
from idefics.server.prompt import EOU, PromptBuilder
from idefics.server.protocol import MAX_MESSAGES, MAX_PARTS
from idefics.server.settings import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "test-key"
CIRCLE, STARS, TRIANGLE, THREE = paths()  # circle_and_square.png, stars.png, triangle.png, three_shapes.png


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()




@pytest.fixture(scope="module")
def demo():
    return idefics.load(DEMO_DIR, device="cpu")


@contextlib.contextmanager
def live(model, **settings):
    """A uvicorn server for the model on 127.0.0.1 in a thread -> (base URL, the uvicorn Server)."""
    s = server(model, Settings(**settings), port=0, log_level="warning")
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    while not s.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = s.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", s
    finally:
        s.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def image_host():
    """An HTTP server on 127.0.0.1 serving the bundled images, a redirect loop, a redirect to file:, an HTML page and
    a large body; `hits` counts every request it gets."""
    routes = {f"/{p.name}": ("image/png", p.read_bytes()) for p in paths()}
    routes["/page.html"] = ("text/html", b"<html></html>")
    routes["/big.png"] = ("image/png", b"\x89PNG" + b"\0" * (2 << 20))
    routes |= {"/loop": redirect("/loop"), "/to-file": redirect("file:///etc/passwd"),
               "/moved.png": redirect(f"/{CIRCLE.name}")}
    hits = []
    with serve(routes, hits=hits) as base:
        yield base, hits


@pytest.fixture(scope="module")
def images():
    with image_host() as host:
        yield host


@pytest.fixture(scope="module")
def api(demo):
    with live(demo, api_key=KEY, allow_private_image_urls=True, max_image_bytes=1 << 20, max_body_bytes=4 << 20) \
            as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key=KEY, max_retries=0)


def user(text, image=None, first_image=False):
    parts = [{"type": "text", "text": text}]
    if image is not None:
        part = {"type": "image_url", "image_url": {"url": image}}
        parts = [part] + parts if first_image else parts + [part]
    return {"role": "user", "content": parts}


def generate(demo, items, **options):
    """The library's answer to a chat of one user turn (items in order), as the guide's chat prompt."""
    prompt = tasks.user_turn(items, first=True) + tasks.assistant_turn()
    return demo.generate([prompt], add_end_of_utterance_token=False, **options)[0]


# The openai client

def test_chat_with_an_image_by_url_and_by_data_uri_answers_as_generate(demo, client, images):
    host, _ = images
    expected = generate(demo, ["What is in this image?", CIRCLE], max_new_tokens=30)
    assert expected.text == "This picture shows a red circle and a blue square."
    for image in (f"{host}/{CIRCLE.name}", data_uri(CIRCLE), f"{host}/moved.png"):
        r = client.chat.completions.create(model="idefics-demo", messages=[user("What is in this image?", image)],
                                           max_tokens=30)
        assert r.choices[0].message.content == expected.text
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(expected.token_ids)


def test_a_conversation_with_history_is_the_guides_format(demo, client):
    items = (tasks.user_turn(["What is in this image?", STARS], first=True)
             + tasks.assistant_turn("This picture shows stars.")
             + tasks.user_turn([TRIANGLE, "And what is in this one?"]) + tasks.assistant_turn())
    expected = demo.generate([items], add_end_of_utterance_token=False, max_new_tokens=30)[0].text
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                             {"type": "image_url", "image_url": {"url": data_uri(STARS)}}]},
                {"role": "assistant", "content": "This picture shows stars."},
                user("And what is in this one?", data_uri(TRIANGLE), first_image=True)]
    r = client.chat.completions.create(model="idefics-demo", messages=messages, max_tokens=30)
    assert r.choices[0].message.content == expected


def test_streamed_pieces_join_to_the_answer_with_usage_last(demo, client):
    expected = generate(demo, [THREE, "What is in this image?"], max_new_tokens=30)
    stream = client.chat.completions.create(model="idefics-demo", messages=[user("What is in this image?",
                                            data_uri(THREE), first_image=True)], max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_n_choices_sample_reproducibly_with_a_seed(demo, client):
    ask = dict(model="idefics-demo", messages=[user("What is in this image?")], max_tokens=12, temperature=2,
               seed=7, n=2)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    for i, text in enumerate(texts):  # choice i samples with seed + i
        alone = generate(demo, ["What is in this image?"], max_new_tokens=12, do_sample=True, temperature=2.0,
                         seed=7 + i)
        assert text == alone.text
    assert texts[0] != texts[1]
    e = error_of(lambda: client.chat.completions.create(**{**ask, "seed": 2**64 - 1}))
    assert e.status_code == 400 and "seed: 2 choices sample with seeds 18446744073709551615 to" in e.message


def test_logprobs_are_the_models(demo, client):
    r = client.chat.completions.create(model="idefics-demo", messages=[user("What is in this image?", data_uri(CIRCLE))],
                                       max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    prompt = tasks.user_turn(["What is in this image?", CIRCLE], first=True) + tasks.assistant_turn()
    lp = torch.log_softmax(demo.logits([prompt], add_end_of_utterance_token=False)[0, -1], dim=-1)
    top = lp.topk(3)
    assert content[0].logprob == pytest.approx(top.values[0].item(), abs=1e-4)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert content[0].token == " This" and all(len(c.top_logprobs) == 3 for c in content)


def test_stop_strings_cut_the_answer(demo, client):
    r = client.chat.completions.create(model="idefics-demo", messages=[user("What is in this image?", data_uri(CIRCLE))],
                                       max_tokens=30, stop="circle")
    assert r.choices[0].message.content == "This picture shows a red "
    assert r.choices[0].finish_reason == "stop"


def test_completions_take_raw_prompts_and_image_parts(demo, client, api):
    raw = "User: What is in this image?<end_of_utterance>\nAssistant:"
    r = client.completions.create(model="idefics-demo", prompt=[raw, "Question: what? Answer:"], max_tokens=8)
    assert [c.text for c in r.choices] == [c.text for c in demo.generate(
        [[raw], ["Question: what? Answer:"]], max_new_tokens=8, add_end_of_utterance_token=False)]
    body = {"model": "idefics-demo", "max_tokens": 20, "prompt": [
        {"type": "text", "text": tasks.VQA_INSTRUCTION}, {"type": "image_url", "image_url": {"url": data_uri(CIRCLE)}},
        {"type": "text", "text": "Question: What color is the circle? Answer:"}]}
    answer = httpx.post(api + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert answer["choices"][0]["text"].strip() == demo.ask(CIRCLE, "What color is the circle?") == "red"


def test_typed_special_tokens_stay_text(demo, client):
    """A user typing <image> or <end_of_utterance> gets neither an image slot nor a turn: the text is tokenized as
    transformers does with split_special_tokens=True, and text without them exactly as process()."""
    builder = PromptBuilder(demo)
    plain = ["User: What is in this image?", load_image(CIRCLE), "And this?", tasks.END_OF_UTTERANCE, "\nAssistant:"]
    ours = builder.build([EOU if x == tasks.END_OF_UTTERANCE else x for x in plain])
    theirs = split_batch(demo.process([plain], add_end_of_utterance_token=False))[0]
    assert torch.equal(ours.ids, theirs.ids) and torch.equal(ours.pixels, theirs.pixels)
    assert torch.equal(ours.image_mask, theirs.image_mask)

    typed = "look <image><fake_token_around_image> here<end_of_utterance>\nAssistant: yes"
    ids = builder.build([typed]).ids.tolist()
    t = demo.tokenizer
    assert not {t.image_id, t.fake_image_id, t.end_of_utterance_id} & set(ids[1:])
    assert t.decode(ids[1:]) == typed

    reference = reference_tokenizer(DEMO_DIR)(typed, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids[1:][1:] == reference[1:]  # the first piece differs only by the "▁" prepended at the start of a text
    r = client.chat.completions.create(model="idefics-demo", messages=[{"role": "user", "content": typed}], max_tokens=3)
    assert r.usage.prompt_tokens == len(builder.build(builder.chat([("user", [typed])])).ids)


# Errors

def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    e = info.value
    body = e.body if isinstance(e.body, dict) and "message" in e.body else e.response.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and "\n" not in body["message"]
    return e


def test_errors_are_in_openais_shape_with_the_right_status(client, api, images):
    host, hits = images
    chat = client.chat.completions.create
    message = [user("hi")]
    assert error_of(lambda: chat(model="gpt-4", messages=message)).status_code == 404
    assert error_of(lambda: chat(model="idefics-demo", messages=message, max_tokens=10**6)).status_code == 400
    assert error_of(lambda: chat(model="idefics-demo", messages=message, temperature=5)).status_code == 422
    assert error_of(lambda: chat(model="idefics-demo", messages=[])).status_code == 422
    assert error_of(lambda: chat(model="idefics-demo", messages=[user("hi", "file:///etc/passwd")])).status_code == 400
    assert error_of(lambda: chat(model="idefics-demo", messages=[user("hi", f"{host}/nothing.png")])).status_code == 400
    assert error_of(lambda: chat(model="idefics-demo", messages=[user("hi", "data:image/png;base64,AAAA")])).status_code == 400
    e = error_of(lambda: chat(model="idefics-demo", messages=[user("hi", f"{host}/big.png")]))
    assert e.status_code == 413
    wrong = openai.OpenAI(base_url=api + "/v1", api_key="wrong", max_retries=0)
    assert error_of(lambda: wrong.models.list()).status_code == 401
    assert httpx.get(api + "/v1/models").status_code == 401
    assert httpx.get(api + "/nowhere").json()["error"]["type"] == "not_found_error"
    big = httpx.post(api + "/v1/chat/completions", content=b"x" * (5 << 20), headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and big.json()["error"]["message"]
    # Text that no context of 256 tokens can hold, within the body limit: refused by its length, not tokenized
    long = "a" * (3 << 20)
    fetched = len(hits)
    e = error_of(lambda: chat(model="idefics-demo", messages=[user("hi"), user(long, f"{host}/{CIRCLE.name}")]))
    assert e.status_code == 400 and "messages: text of 3145730 characters" in e.message
    assert "context of 512 tokens" in e.message and len(hits) == fetched  # refused before fetching its image
    task = httpx.post(api + "/v1/tasks", json={"task": "ask", "image": f"{host}/{CIRCLE.name}", "question": long},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert task.status_code == 400 and len(hits) == fetched
    assert task.json()["error"]["message"].startswith("question: text of 3145728 characters: more than the model's")
    e = error_of(lambda: client.completions.create(model="idefics-demo", prompt=["hi", long]))
    assert e.status_code == 400 and "- prompt 1: text of 3145728 characters: more than" in e.message
    bad = httpx.post(api + "/v1/chat/completions", content=b'{"model": [1, 2',
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert bad.status_code == 422
    assert bad.json()["error"]["message"] == "the body is not valid JSON: Expecting ',' delimiter at character 15"


def test_lists_past_their_limits_are_refused_before_their_items_are_read(api):
    """Messages, parts and prompts are counted before pydantic reads them (a 64 MB body of 3 million messages held
    the server's loop 28 s): past the limit 422 in one line; at it, the request goes on (here to the context's
    check)."""
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path, **body):
        return httpx.post(api + path, json={"model": "idefics-demo", **body}, headers=headers, timeout=60)

    hi, part = {"role": "user", "content": "hi"}, {"type": "text", "text": "a"}
    for r, message in [
        (post("/v1/chat/completions", messages=[hi] * (MAX_MESSAGES + 1)),
         "messages: 4097 items, over the limit of 4096"),
        (post("/v1/chat/completions", messages=[hi, {"role": "user", "content": [part] * (MAX_PARTS + 1)}]),
         "messages[1].content: 4097 items, over the limit of 4096"),
        (post("/v1/completions", prompt=[part] * (MAX_PARTS + 1)), "prompt: 4097 items, over the limit of 4096"),
        (post("/v1/completions", prompt=["a"] * (MAX_PARTS + 1)), "prompt: 4097 items, over the limit of 4096"),
    ]:
        assert r.status_code == 422 and r.json()["error"]["message"] == message
    r = post("/v1/chat/completions", messages=[{"role": "user", "content": [part] * MAX_PARTS}])
    assert r.status_code == 400 and "the model's context is 512" in r.json()["error"]["message"]


@pytest.mark.parametrize("endpoint, field, value", [
    ("chat", "logit_bias", {"50": 100}), ("chat", "response_format", {"type": "json_object"}),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]), ("chat", "tool_choice", "required"),
    ("chat", "modalities", ["text", "audio"]), ("completions", "echo", True), ("completions", "suffix", "end"),
    ("completions", "best_of", 3), ("completions", "logit_bias", {"7": -100}),
])
def test_openai_fields_that_would_change_the_answer_are_refused_not_ignored(client, endpoint, field, value):
    """A field this server does not implement is refused where it would change the answer (a client asking for
    JSON or a bias must not get a plain answer as if served); neutral values and fields that change nothing pass."""
    if endpoint == "chat":
        def call(**extra):
            return client.chat.completions.create(model="idefics-demo", messages=[user("hi")], max_tokens=2, **extra)
    else:
        def call(**extra):
            return client.completions.create(model="idefics-demo", prompt="hi", max_tokens=2, **extra)
    e = error_of(lambda: call(extra_body={field: value}))
    assert e.status_code == 400 and f"{field} is not supported by this server" in e.message
    neutral = {"logit_bias": {}, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
               "modalities": ["text"], "echo": False, "suffix": "", "best_of": 1}[field]
    assert call(extra_body={field: neutral, "user": "someone", "metadata": {"k": "v"}}).choices


def test_image_fetches_are_checked_hop_by_hop(demo, images):
    host, hits = images
    with live(demo) as (url, _):  # private addresses refused
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        before = len(hits)
        for target in (f"{host}/{CIRCLE.name}", host.replace("127.0.0.1", "localhost") + "/x.png",
                       "http://[::1]/x.png", "http://169.254.169.254/latest"):
            e = error_of(lambda: c.chat.completions.create(model="idefics-demo", messages=[user("hi", target)]))
            assert e.status_code == 400 and "refused" in e.message
        assert len(hits) == before
    with live(demo, allow_private_image_urls=True) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for path, words in (("/loop", "more than 3 redirects"), ("/to-file", "only http(s)"),
                            ("/page.html", "not an image")):
            e = error_of(lambda: c.chat.completions.create(model="idefics-demo", messages=[user("hi", host + path)]))
            assert e.status_code == 400 and words in e.message
        assert hits.count("/loop") == 4


# Limits, disconnects, shutdown

class Slowed:
    """The engine's steps, each made slower by `delay` seconds, and the finish reasons they gave, by request id."""

    def __init__(self, model, delay: float):
        self.model, self.delay, self.finished = model, delay, {}
        self.step = model.scheduler.step
        model.scheduler.step = self

    def __call__(self):
        time.sleep(self.delay)
        outputs = self.step()
        for o in outputs:
            if o.finish_reason:
                self.finished[o.id] = o.finish_reason
        return outputs


@pytest.fixture
def small(tmp_path):
    """A server that runs one request at a time and queues none, its engine slowed to 10 ms a step."""
    model = idefics.load(DEMO_DIR, device="cpu")
    slowed = Slowed(model, 0.01)
    with image_host() as (host, hits), live(model, max_concurrent=1, max_queue=0, allow_private_image_urls=True) \
            as (url, s):
        yield model, slowed, url, s, host, hits


def long_chat(stream=True):
    """200 tokens, 2 s on the slowed engine (min_tokens, an extension, goes in the body as is)."""
    return dict(model="idefics-demo", messages=[user("What is in this image?", data_uri(CIRCLE))], max_tokens=200,
                stream=stream)


def wait_until(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_full_queue_answers_429_before_fetching_and_a_disconnect_frees_the_slot(small):
    model, slowed, url, s, host, hits = small
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    stream = c.chat.completions.create(**long_chat(), extra_body={"min_tokens": 200})
    chunks = iter(stream)
    for _ in range(4):  # the role, then tokens: it is running
        next(chunks)
    e = error_of(lambda: c.chat.completions.create(model="idefics-demo", messages=[user("hi", f"{host}/{CIRCLE.name}")]))
    assert e.status_code == 429 and hits == []
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: slowed.finished and not model.scheduler.running)
    assert list(slowed.finished.values()) == ["abort"]
    wait_until(lambda: s.config.app.state.idefics.admission.count == 0)
    r = c.chat.completions.create(model="idefics-demo", messages=[user("What is in this image?", f"{host}/{CIRCLE.name}")])
    assert r.choices[0].message.content == "This picture shows a red circle and a blue square."


def test_a_client_gone_before_its_answer_aborts_it(small):
    model, slowed, url, s, host, hits = small
    body = long_chat(stream=False) | {"min_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
    wait_until(lambda: slowed.finished)
    assert list(slowed.finished.values()) == ["abort"]
    wait_until(lambda: s.config.app.state.idefics.admission.count == 0)


def test_shutdown_finishes_running_requests_and_refuses_new_ones(small):
    model, slowed, url, s, host, hits = small
    got = {}

    def read():
        with httpx.stream("POST", url + "/v1/chat/completions", json=long_chat() | {"min_tokens": 200}) as r:
            got["events"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: model.scheduler.running)
    s.should_exit = True
    state = s.config.app.state.idefics
    wait_until(lambda: state.admission.draining)
    try:  # the listener closes as draining starts; a request that slips in before gets 503
        assert httpx.post(url + "/v1/chat/completions", json=long_chat(stream=False)).status_code == 503
    except httpx.ConnectError:
        pass
    reader.join(30)
    assert got["events"][-1] == "data: [DONE]"
    finish = json.loads(got["events"][-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish == "length" and list(slowed.finished.values()) == ["length"]


def test_a_request_past_its_timeout_is_aborted_with_504():
    model = idefics.load(DEMO_DIR, device="cpu")
    slowed = Slowed(model, 0.01)
    with live(model, request_timeout=0.5) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json=long_chat(stream=False) | {"min_tokens": 200}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        wait_until(lambda: slowed.finished)
        assert list(slowed.finished.values()) == ["abort"]


def test_metrics_count_requests_tokens_and_image_cache_hits(client, api):
    def metric(name):
        text = httpx.get(api + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    hits, tokens = metric("idefics_image_cache_hits_total"), metric("idefics_generated_tokens_total")
    for _ in range(2):
        client.chat.completions.create(model="idefics-demo", messages=[user("What is in this image?", data_uri(STARS))])
    assert metric("idefics_image_cache_hits_total") >= hits + 1
    assert metric("idefics_generated_tokens_total") > tokens
    assert metric('idefics_requests_total{route="/v1/chat/completions",status="200"}') >= 2
    assert metric("idefics_time_to_first_token_seconds_count") >= 2
    assert httpx.get(api + "/health").json()["status"] == "ok"


# Native endpoints

def test_tasks_and_ranked_classification_match_the_library(demo, api):
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path, body):
        r = httpx.post(api + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    image = data_uri(THREE)
    assert post("/v1/tasks", {"task": "caption", "image": image})["choices"][0]["text"] == demo.caption(THREE)
    assert post("/v1/tasks", {"task": "ask", "image": image, "question": "How many shapes are there?"})[
        "choices"][0]["text"] == demo.ask(THREE, "How many shapes are there?")
    assert post("/v1/tasks", {"task": "story", "image": image})["choices"][0]["text"] == demo.story(THREE)
    labels = ["circle", "square", "triangle", "star"]
    ranked = post("/v1/classify", {"image": data_uri(TRIANGLE), "labels": labels})["labels"]
    expected = demo.classify(TRIANGLE, labels)
    assert [x["label"] for x in ranked] == [x.label for x in expected] and ranked[0]["label"] == "triangle"
    assert [x["probability"] for x in ranked] == pytest.approx([x.probability for x in expected])
    bad = httpx.post(api + "/v1/classify", json={"image": image, "labels": ["<image>"]}, headers=headers)
    assert bad.status_code == 400


def test_serve_flags_are_checked_in_one_line():
    from idefics.cli import main

    assert main(["serve", "--max-queue", "-1"]) == 1
    assert main(["serve", "--request-timeout", "0"]) == 1


# Load, fuzzing, the browser

SOAK_SECONDS = float(os.environ.get("IDEFICS_SOAK_SECONDS", "60"))
QUESTIONS = [(p, q) for p in paths() for q in ("What is in this image?", "How many shapes are there?")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_64_concurrent_clients_for_a_minute(demo, images, tmp_path):
    """The CLI's server in its own process: no request lost or failed, every greedy answer equal to its answer
    alone, the server's memory flat."""
    import psutil

    host, _ = images
    expected = [generate(demo, [q, p], max_new_tokens=24).text for p, q in QUESTIONS]
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "idefics", "serve", "--port", str(port), "--device", "cpu",
                             "--max-concurrent", "64", "--allow-private-image-urls"], stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is None and _healthy(url), timeout=90)
        rss, counts = [], {"ok": 0, "wrong": [], "failed": []}
        done = threading.Event()

        def sample():
            p = psutil.Process(proc.pid)
            while not done.wait(1.0):
                rss.append(p.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        asyncio.run(_clients(url, host, expected, counts))
        done.set()
        sampler.join()
        assert not counts["failed"] and not counts["wrong"], (counts["failed"][:3], counts["wrong"][:3])
        assert counts["ok"] >= 64
        # Flat: after the first fifth (buffers growing to the load) the resident memory grows by under 32 MiB.
        settled = rss[len(rss) // 5:]
        assert max(settled) - settled[0] < 32 << 20, [r >> 20 for r in rss]
        print(f"soak: {counts['ok']} requests in {SOAK_SECONDS:.0f} s, server RSS MiB {[r >> 20 for r in rss[::5]]}")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def _clients(url, host, expected, counts, clients=64):
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                           http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=clients)))
    end = time.monotonic() + SOAK_SECONDS

    async def one(k):
        i = k
        while time.monotonic() < end:
            image_path, question = QUESTIONS[i % len(QUESTIONS)]
            image = f"{host}/{image_path.name}" if i % 3 == 0 else data_uri(image_path)
            ask = dict(model="idefics-demo", messages=[user(question, image, first_image=True)], max_tokens=24)
            try:
                if i % 2:
                    text = "".join([ch.choices[0].delta.content or "" async for ch in
                                    await c.chat.completions.create(**ask, stream=True) if ch.choices])
                else:
                    text = (await c.chat.completions.create(**ask)).choices[0].message.content
            except Exception as e:  # counted, not raised: every failure is reported at the end
                counts["failed"].append(repr(e))
            else:
                if text == expected[i % len(QUESTIONS)]:
                    counts["ok"] += 1
                else:
                    counts["wrong"].append((i % len(QUESTIONS), text))
            i += clients

    await asyncio.gather(*(one(k) for k in range(clients)))
    await c.close()


def test_fuzzing_the_openapi_schema_finds_no_server_error(demo):
    """Bodies generated from /openapi.json; most keep the random model and images (-> 404, 400), the others get
    the served model and a real image so that they reach the engine with random options."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies as st

    image = data_uri(STARS)

    def aim(body):
        if isinstance(body, dict):
            for key, value in body.items():
                if key == "model":
                    body[key] = "idefics-demo"
                elif key in ("image", "url") and isinstance(value, str):
                    body[key] = image
                else:
                    aim(value)
        elif isinstance(body, list):
            for x in body:
                aim(x)

    statuses = []
    with live(demo, image_urls=False, max_tokens=16, max_n=4) as (url, _):
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy(), aimed=st.booleans())
            @settings(max_examples=40, deadline=None, database=None, derandomize=True,  # (the same bodies every run)
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case, aimed):
                if aimed:
                    aim(case.body)
                response = case.call(base_url=url, timeout=60)
                statuses.append(response.status_code)
                assert response.status_code < 500, (case.body, response.text)

            no_server_error()
    assert max(statuses) < 500 and statuses.count(200) >= 10, sorted(statuses)


def test_the_playground_answers_a_question_in_a_real_browser(demo, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,800"):
        options.add_argument(flag)
    with live(demo) as (url, _):
        browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            browser.get(url + "/")
            browser.find_element(By.ID, "file").send_keys(str(CIRCLE))
            WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "preview").get_attribute("src"))
            browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=ask]").click()
            browser.find_element(By.ID, "question").send_keys("What color is the circle?")
            browser.find_element(By.ID, "run").click()
            WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "stats").text)
            assert browser.find_element(By.ID, "answer").text == "red"
            assert "time to first token" in browser.find_element(By.ID, "stats").text
            assert browser.find_element(By.ID, "error").text == ""
            browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=classify]").click()
            browser.find_element(By.ID, "run").click()
            WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#bars .bar"))
            best = demo.classify(CIRCLE, ["circle", "square", "triangle", "star"])[0].label
            assert browser.find_element(By.ID, "answer").text == best
            assert browser.save_screenshot(str(tmp_path / "playground.png"))
        finally:
            browser.quit()
