"""The HTTP server: FastAPI routes over one loaded model, its limits, API key, metrics and the playground page.

Handlers never block the event loop: images are fetched with httpx and decoded in worker threads, prompts built in
worker threads, and generation runs on the library's engine thread (runs.py)."""
from __future__ import annotations

import asyncio
import ctypes
import hmac
import os
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from idefics import tasks
from idefics.errors import IdeficsError
from idefics.hub import DEMO_DIR
from idefics.scheduler import default_batch
from idefics.scoring import check_labels
from idefics.server import completions
from idefics.server.fetch import Fetcher
from idefics.server.metrics import Metrics
from idefics.server.prompt import PromptBuilder
from idefics.server.protocol import APIError, ChatRequest, ClassifyRequest, CompletionRequest, TaskRequest
from idefics.server.runs import Admission
from idefics.server.settings import Settings
from idefics.tokenizer import END_OF_UTTERANCE_TOKEN, FAKE_IMAGE_TOKEN, IMAGE_TOKEN

STATIC = Path(__file__).parent / "static"
SPECIAL_STRINGS = (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN)


class State:
    """What the handlers share: the model and everything around it."""

    def __init__(self, model, settings: Settings):
        self.model, self.settings = model, settings
        path = Path(model.path)
        self.name = settings.model_name or ("idefics-demo" if path.resolve() == DEMO_DIR.resolve() else path.name)
        self.names = {self.name, str(model.path)}
        if settings.max_concurrent is not None:
            model.scheduler.max_batch = settings.max_concurrent
        running = settings.max_concurrent or default_batch(model.engine)
        self.admission = Admission(running + settings.max_queue)
        self.builder = PromptBuilder(model)
        self.fetcher = Fetcher(settings)
        self.metrics = Metrics(model, lambda: self.admission.count)


def create_app(model, settings: Settings | None = None) -> FastAPI:
    state = State(model, settings or Settings())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await state.fetcher.aclose()

    app = FastAPI(title="idefics", summary="OpenAI-compatible server for the IDEFICS vision-language models",
                  lifespan=lifespan)
    app.state.idefics = state
    app.add_middleware(Gate, state=state)
    _errors(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        return await completions.chat_completions(state, http, body)

    @app.post("/v1/completions", description="OpenAI's completions. Extension: `prompt` may be a list of text "
              "and image_url parts, in order. On an instruct model `<end_of_utterance>` in the text is that token.")
    async def text_completions(body: CompletionRequest, http: HTTPRequest):
        return await completions.completions(state, http, body)

    @app.post("/v1/tasks", description="The guide's tasks on one image: caption (optionally prompted), ask "
              "(visual question answering), story; their templates and default options.")
    async def run_task(body: TaskRequest, http: HTTPRequest):
        return await completions.run_task(state, http, body)

    @app.post("/v1/classify", description="Ranked zero-shot classification: every label with its probability, "
              "best first.")
    async def classify(body: ClassifyRequest):
        completions.check_model(state, body.model)
        try:
            labels = check_labels(tasks.as_labels(body.labels))
        except IdeficsError as e:
            raise APIError(400, str(e), param="labels") from None
        for i, label in enumerate(labels):
            if any(s in label for s in SPECIAL_STRINGS):
                raise APIError(400, f"label {i}: special token strings are not allowed in labels", param="labels")
        ticket = state.admission.take(1)
        try:
            image = await state.fetcher.image(body.image, "image")
            ranked = await asyncio.to_thread(model.classify, image, labels)
        except IdeficsError as e:
            raise APIError(400, str(e)) from None
        finally:
            ticket.release()
        return {"object": "classification", "model": state.name,
                "labels": [{"label": s.label, "probability": s.probability, "log_likelihood": s.log_likelihood}
                           for s in ranked]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "idefics",
                                            "max_model_len": model.config.max_position_embeddings,
                                            "instruct": state.builder.instruct}]}

    @app.get("/health")
    async def health():
        s = model.scheduler
        body = {"status": "draining" if state.admission.draining else "ok", "model": state.name,
                "running": len(s.running), "waiting": len(s.waiting), "in_flight": state.admission.count}
        return JSONResponse(body, status_code=503 if state.admission.draining else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _errors(app: FastAPI):
    """Every error answers in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is (body, character): not a field
            at, why = first.get("loc", ("body", "?"))[-1], first.get("ctx", {}).get("error", "decode error")
            message = f"the body is not valid JSON: {why} at character {at}"
            return JSONResponse(APIError(422, message).body(), status_code=422)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(APIError(422, message, param=where or None).body(), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = "not found" if e.status_code == 404 else str(e.detail)
        return JSONResponse(APIError(e.status_code, f"{request.url.path}: {message}").body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(IdeficsError)
    async def idefics_error(request, e: IdeficsError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        error = APIError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(error.body(), status_code=500)


class Gate:
    """ASGI middleware before the routes: the API key on /v1/, the body size limit (413), and the count of
    requests by route and status."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state
        key = state.settings.api_key
        self.key = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path.startswith("/v1/") or path in ("/health", "/metrics", "/") else "other"
        status = {"code": 499}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.key):
                    raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                   code="invalid_api_key")
            limit = self.state.settings.max_body_bytes
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                raise APIError(413, f"request body of {int(length)} bytes is over the limit of {limit}")
            received = 0

            async def bounded():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise APIError(413, f"request body is over the limit of {limit} bytes")
                return message

            await self.app(scope, bounded, counted)
        except APIError as e:
            response = JSONResponse(e.body(), status_code=e.status,
                                    headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
            await response(scope, receive, counted)
        finally:
            self.state.metrics.requests.labels(route, str(status["code"])).inc()


class Server(uvicorn.Server):
    """uvicorn, draining first on shutdown: new requests get 503 while those running finish."""

    def __init__(self, config: uvicorn.Config, state: State):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None):
        self.state.admission.draining = True
        await super().shutdown(sockets)


MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas():
    """glibc gives threads that allocate arenas of their own (up to 8 per core), and memory freed in one stays there:
    under 64 clients the server's resident memory crept up about 35 MiB a minute on the CPU while no Python object
    grew (tracemalloc), and stayed flat with MALLOC_ARENAS. Called before the server's threads start; a
    MALLOC_ARENA_MAX set in the environment is left as it is, and other C libraries as they are."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


def server(model, settings: Settings | None = None, host: str = "127.0.0.1", port: int = 8000,
           log_level: str = "info") -> Server:
    """A uvicorn server for the model: run() it (blocks; Ctrl-C or SIGTERM drains, then stops), or serve() it."""
    app = create_app(model, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                            access_log=log_level == "debug")
    return Server(config, app.state.idefics)
