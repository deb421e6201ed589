"""OpenAI's chat completions and completions, and the guide's tasks, over the engine: request bodies -> checked
scheduler Requests -> responses, whole or as server-sent events."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from idefics import tasks
from idefics.engine import Prompt
from idefics.errors import IdeficsError
from idefics.sampling import MAX_SEED, GenerationOptions
from idefics.scheduler import Output, Request
from idefics.server.protocol import UNSUPPORTED, APIError, ChatRequest, CompletionRequest, ImagePart, Sampling, \
    TaskRequest, options_dict
from idefics.server.runs import Run, Ticket
from idefics.tokenizer import BYTE_TOKEN


class ImageRef:
    """An image part of a request, before it is fetched."""

    def __init__(self, url: str, where: str):
        self.url, self.where = url, where


def check_model(state, name: str | None):
    if name is not None and name not in state.names:
        raise APIError(404, f"model {name!r} not found; this server runs {state.name!r}", param="model",
                       code="model_not_found")


def sampling_options(body: Sampling, settings, max_tokens: int | None) -> dict:
    """OpenAI's fields -> GenerationOptions' (max_new_tokens is set per prompt, see make_requests). Without a
    temperature, decoding is greedy unless top_p or top_k asks for sampling; temperature 0 is greedy."""
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens}",
                       param="max_tokens")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (use repetition_penalty)", param=name)
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and not UNSUPPORTED[name](value, body):
            raise APIError(400, f"{name} is not supported by this server (got {str(value)[:80]})", param=name)
    o: dict = {}
    t = body.temperature
    if (t is not None and t > 0) or (t is None and (body.top_p is not None or body.top_k is not None)):
        o.update(do_sample=True, temperature=1.0 if t is None else t)
    for ours, theirs in (("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repetition_penalty"),
                         ("min_new_tokens", "min_tokens"), ("seed", "seed"), ("stop", "stop")):
        if getattr(body, theirs) is not None:
            o[ours] = getattr(body, theirs)
    if max_tokens is not None:
        o["max_new_tokens"] = max_tokens
    return o


def make_requests(state, prompts: list[Prompt], options: dict, n: int, logprobs: int | None,
                  rid: str) -> list[Request]:
    """n choices of each prompt (choice p * n + i is prompt p's i-th); with a seed, choice i samples with seed + i."""
    m, context = state.model, state.model.config.max_position_embeddings
    try:
        base = GenerationOptions.make(**options)
        base.within_vocabulary(m.config.total_vocab_size)
        if base.seed is not None and n > 1 and base.seed + n - 1 > MAX_SEED:
            raise IdeficsError(f"seed: {n} choices sample with seeds {base.seed} to {base.seed} + {n - 1}, past "
                               f"{MAX_SEED}")
        out = []
        for p, prompt in enumerate(prompts):
            o = base
            if o.max_new_tokens is None:  # as many as fit, up to the server's limit
                o = replace(o, max_new_tokens=max(1, min(state.settings.max_tokens, context - prompt.ids.shape[0])))
            for i in range(n):
                oi = replace(o, seed=o.seed + i) if o.seed is not None and i else o
                oi.validate()
                where = f"prompt {p}" if len(prompts) > 1 else "prompt"
                out.append(Request.make(prompt, oi, m.tokenizer, context, id=f"{rid}/{p * n + i}",
                                        logprobs=logprobs, where=where))
        return out
    except IdeficsError as e:
        raise APIError(400, str(e)) from None


async def fetch_images(state, items: list) -> list:
    """Items with ImageRefs -> items with PIL images. The count is checked first; the admission before this."""
    refs = [x for x in items if isinstance(x, ImageRef)]
    images = iter(await state.fetcher.images([(r.url, r.where) for r in refs]))
    return [next(images) if isinstance(x, ImageRef) else x for x in items]


def count_images(state, contents: list[list]):
    n = sum(isinstance(x, ImageRef) for items in contents for x in items)
    if n > state.settings.max_images:
        raise APIError(400, f"{n} images; this server takes at most {state.settings.max_images} per request",
                       param="messages")


def chat_contents(body: ChatRequest) -> list[tuple[str, list]]:
    """Messages -> (role, items): text and ImageRefs in order, adjacent texts joined by a newline."""
    out = []
    for mi, message in enumerate(body.messages):
        role = "system" if message.role in ("system", "developer") else message.role
        content = message.content
        parts = [content] if isinstance(content, str) else content or []
        items: list = []
        texts: list[str] = []  # the run of texts since the last image, joined once (a += per part is quadratic)
        for pi, part in enumerate(parts):
            if isinstance(part, ImagePart):
                if role != "user":
                    raise APIError(400, f"messages[{mi}]: only user messages may hold images", param="messages")
                if texts:
                    items.append("\n".join(texts))
                    texts = []
                items.append(ImageRef(part.image_url.url, f"messages[{mi}].content[{pi}]"))
            else:
                texts.append(part if isinstance(part, str) else part.text)
        if texts:
            items.append("\n".join(texts))
        if role == "user" and not items:
            raise APIError(400, f"messages[{mi}]: a user message needs text or an image", param="messages")
        out.append((role, items))
    if not any(role == "user" for role, _ in out):
        raise APIError(400, "messages: at least one user message is needed", param="messages")
    return out


def valid(text: str, where: str) -> str:
    try:
        return tasks.valid_text(text, where)
    except IdeficsError as e:
        raise APIError(400, str(e)) from None


class Shape:
    """How one endpoint writes its answers: chat.completion or text_completion objects and their chunks."""

    def __init__(self, state, kind: str, rid: str, logprobs: int | None, strip: bool = False):
        self.state, self.kind, self.rid, self.logprobs, self.strip = state, kind, rid, logprobs, strip
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.state.name}

    def token(self, token: int) -> tuple[str, list[int]]:
        piece = self.state.model.tokenizer.backend.id_to_token(token) or ""
        if BYTE_TOKEN.fullmatch(piece):
            data = bytes([int(piece[3:5], 16)])
            return data.decode("utf-8", "replace"), list(data)
        text = piece.replace("▁", " ")
        return text, list(text.encode("utf-8"))

    def logprob_entries(self, o: Output) -> list:
        if self.logprobs is None or o.token is None:
            return []
        text, data = self.token(o.token)
        if self.kind == "chat":
            top = [dict(zip(("token", "bytes"), self.token(t)), logprob=lp) for t, lp in (o.top_logprobs or [])]
            return [{"token": text, "logprob": o.logprob, "bytes": data, "top_logprobs": top}]
        return [(text, o.logprob, {self.token(t)[0]: lp for t, lp in (o.top_logprobs or [])})]

    def logprobs_object(self, entries: list, offset: int = 0) -> dict | None:
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": entries}
        offsets, at = [], offset
        for text, _, _ in entries:
            offsets.append(at)
            at += len(text)
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries] if self.logprobs else None, "text_offset": offsets}

    def choice(self, i: int, text: str, finish: str | None, entries: list) -> dict:
        if self.kind == "chat":
            return {"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": self.logprobs_object(entries), "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": self.logprobs_object(entries), "finish_reason": finish}

    def whole(self, choices: list[dict], usage: dict) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return self.head(obj) | {"choices": choices, "usage": usage}

    def chunk(self, i: int, text: str | None, finish: str | None, entries: list, offset: int = 0,
              first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            body = {"index": i, "delta": delta, "logprobs": self.logprobs_object(entries) if entries else None,
                    "finish_reason": finish}
            return self.head("chat.completion.chunk") | {"choices": [body]}
        body = {"index": i, "text": text or "", "logprobs": self.logprobs_object(entries, offset) if entries else None,
                "finish_reason": finish}
        return self.head("text_completion") | {"choices": [body]}


def finish_reason(o: Output) -> str:
    return "length" if o.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def respond(state, http: HTTPRequest, run: Run, ticket: Ticket, shape: Shape, stream: bool,
                  include_usage: bool, prompt_tokens: int) -> Response:
    """Run the choices and answer: one JSON object, or events as tokens come. A client that goes away aborts."""
    if stream:
        # The events release the ticket when they end; the background task too, should they never start (a client
        # gone before the first byte).
        return StreamingResponse(events(run, ticket, shape, include_usage, prompt_tokens),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(ticket.release))
    task = asyncio.ensure_future(collect(run, shape, prompt_tokens))
    gone = asyncio.ensure_future(disconnected(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()  # the run's generator aborts what is still running
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
        return JSONResponse(task.result())
    finally:
        gone.cancel()
        ticket.release()


async def disconnected(http: HTTPRequest):
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def collect(run: Run, shape: Shape, prompt_tokens: int) -> dict:
    n = len(run.requests)
    texts, entries, finish, tokens = [""] * n, [[] for _ in range(n)], [None] * n, [0] * n
    async for i, o in run.outputs():
        texts[i] += o.text
        entries[i] += shape.logprob_entries(o)
        tokens[i] += o.token is not None
        if o.finish_reason is not None:
            finish[i] = finish_reason(o)
            if o.completion is not None:
                texts[i] = o.completion.text
                tokens[i] = len(o.completion.token_ids)
    if shape.strip:
        texts = [t.strip() for t in texts]
    choices = [shape.choice(i, texts[i], finish[i], entries[i]) for i in range(n)]
    return shape.whole(choices, usage(prompt_tokens, sum(tokens)))


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def events(run: Run, ticket: Ticket, shape: Shape, include_usage: bool, prompt_tokens: int):
    n = len(run.requests)
    tokens, offsets, started = [0] * n, [0] * n, [not shape.strip] * n
    try:
        if shape.kind == "chat":
            for i in range(n):
                yield sse(shape.chunk(i, None, None, [], first=True) | ({"usage": None} if include_usage else {}))
        async for i, o in run.outputs():
            text = o.text
            if not started[i]:  # a task's text starts at its first non-space character, as the library's
                text = text.lstrip()
                started[i] = bool(text)
            entries = shape.logprob_entries(o)
            tokens[i] += o.token is not None
            if o.completion is not None:
                tokens[i] = len(o.completion.token_ids)
            finish = finish_reason(o) if o.finish_reason is not None else None
            if text or entries or finish:
                chunk = shape.chunk(i, text, finish, entries, offsets[i])
                yield sse(chunk | ({"usage": None} if include_usage else {}))
            offsets[i] += len(text)
        if include_usage:
            yield sse(shape.head(shape.kind == "chat" and "chat.completion.chunk" or "text_completion")
                      | {"choices": [], "usage": usage(prompt_tokens, sum(tokens))})
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield sse(e.body())
        yield "data: [DONE]\n\n"
    finally:
        ticket.release()


# Endpoints

async def chat_completions(state, http: HTTPRequest, body: ChatRequest) -> Response:
    check_model(state, body.model)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give one", param="max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    options = sampling_options(body, state.settings, body.max_completion_tokens or body.max_tokens)
    stop = options.get("stop") or []
    options["stop"] = ([stop] if isinstance(stop, str) else list(stop)) + state.builder.stop_strings() or None
    contents = chat_contents(body)
    for mi, (_, items) in enumerate(contents):
        for x in items:
            if isinstance(x, str):
                valid(x, f"messages[{mi}]")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await run_prompts(state, http, body, [contents], options, logprobs, "chatcmpl", "chat",
                             lambda contents: state.builder.chat(contents))


async def completions(state, http: HTTPRequest, body: CompletionRequest) -> Response:
    check_model(state, body.model)
    options = sampling_options(body, state.settings, body.max_tokens)
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [[prompt]]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [[p] for p in prompt]
    elif prompt:
        prompts = [[ImageRef(p.image_url.url, f"prompt[{i}]") if isinstance(p, ImagePart) else p.text
                    for i, p in enumerate(prompt)]]
    else:
        raise APIError(400, "prompt: empty list", param="prompt")
    for p in prompts:
        for x in p:
            if isinstance(x, str):
                valid(x, "prompt")
    return await run_prompts(state, http, body, prompts, options, body.logprobs, "cmpl", "text",
                             lambda items: state.builder.raw(items))


TASK_OPTIONS = {"caption": lambda b: "caption" if b.prompt is None else "prompted_caption", "ask": lambda b: "ask",
                "story": lambda b: "story"}


async def run_task(state, http: HTTPRequest, body: TaskRequest) -> Response:
    """One of the guide's tasks: its template, its default options under the caller's."""
    check_model(state, body.model)
    image = ImageRef(body.image, "image")
    fields = {"caption": "prompt", "ask": "question", "story": "instruction"}
    text = getattr(body, fields[body.task])
    if text is not None:
        text = valid(text, fields[body.task])
        if not text.strip():
            raise APIError(400, f"{fields[body.task]}: empty", param=fields[body.task])
        state.builder.check_text([text], fields[body.task])  # before the image is fetched
    if body.task == "ask" and text is None:
        raise APIError(400, "ask needs a question", param="question")
    build = {"caption": tasks.caption, "ask": tasks.ask, "story": tasks.story}[body.task]
    options = tasks.options(TASK_OPTIONS[body.task](body), options_dict(body.options))
    options.pop("add_end_of_utterance_token", None)
    if options.get("max_new_tokens", 0) > state.settings.max_tokens:
        raise APIError(400, f"max_new_tokens is {options['max_new_tokens']}; this server allows at most "
                       f"{state.settings.max_tokens}", param="options.max_new_tokens")
    return await run_prompts(state, http, body, [[image]], options, None, "task", "text",
                             lambda items: build(items[0], text) if text is not None else build(items[0]),
                             strip=True)


async def run_prompts(state, http: HTTPRequest, body, prompts: list[list], options: dict, logprobs: int | None,
                      prefix: str, kind: str, template, strip: bool = False) -> Response:
    """The common path: limits, admission (before any image is fetched), images, prompts, requests, answer."""
    arrival = time.monotonic()
    n = getattr(body, "n", 1)
    if n * len(prompts) > state.settings.max_n:
        raise APIError(400, f"{n * len(prompts)} choices; this server gives at most {state.settings.max_n} per "
                       "request", param="n")
    given = [[x for _, items in prompts[0] for x in items]] if kind == "chat" else prompts  # chat: one prompt
    count_images(state, given)
    where = "messages" if kind == "chat" else "prompt"
    names = [f"{where} {p}" if len(given) > 1 else where for p in range(len(given))]
    for items, name in zip(given, names):  # the client's text alone may not fit: refused before any image is fetched
        state.builder.check_text(items, name)
    ticket = state.admission.take(n * len(prompts))
    try:
        if kind == "chat":
            contents = prompts[0]
            flat = await fetch_images(state, [x for _, items in contents for x in items])
            it = iter(flat)
            items = [template([(role, [next(it) for _ in content]) for role, content in contents])]
        else:
            items = [template(await fetch_images(state, p)) for p in prompts]
        built = await asyncio.to_thread(lambda: [state.builder.build(x, name) for x, name in zip(items, names)])
        rid = f"{prefix}-{uuid.uuid4().hex}"
        requests = make_requests(state, built, options, n, logprobs, rid)
        prompt_tokens = sum(int(p.ids.shape[0]) for p in built)
        state.metrics.tokens_in.inc(prompt_tokens)
        run = Run(state.model, requests, state.metrics, arrival, state.settings.request_timeout)
        shape = Shape(state, kind, rid, logprobs, strip=strip)
        include_usage = bool(getattr(body, "stream_options", None) and body.stream_options.include_usage)
    except BaseException:
        ticket.release()
        raise
    return await respond(state, http, run, ticket, shape, body.stream, include_usage, prompt_tokens)
