"""Request bodies in OpenAI's shape (chat completions, completions) and the native ones (tasks, classify), and the
error every failure answers with: {"error": {"message", "type", "param", "code"}} and its HTTP status."""
from __future__ import annotations

import typing
from dataclasses import fields
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError

from idefics.sampling import GenerationOptions

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message.splitlines()[0], param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# Content parts

class ImageURL(BaseModel):
    url: str = Field(description="http(s) URL or data URI (data:image/png;base64,...)")
    detail: str | None = None  # accepted, unused: every image is resized to the model's size


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


# Messages in a conversation and parts in a message or prompt: more than any context holds (each adds a token or
# more), far fewer than a 64 MB body of tiny ones (3 million messages held the server's loop 28 s). Counted before
# pydantic validates the items, which it does before it checks a list's length.
MAX_MESSAGES = 4096
MAX_PARTS = 4096
Parts = Annotated[list[Part], Field(max_length=MAX_PARTS)]


def _count(items, limit: int, what: str):
    if isinstance(items, list) and len(items) > limit:
        raise PydanticCustomError("too_long", "{what}: {n} items, over the limit of {limit}",
                                  {"what": what, "n": len(items), "limit": limit})


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Parts | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI's fields that would change the answer and that this server does not implement: refused unless absent
# or neutral (name -> the test of a neutral value, given the request). Other fields it does not know (user,
# metadata, store, ...) change nothing and are ignored.
UNSUPPORTED = {
    "logit_bias": lambda v, body: not v,
    "response_format": lambda v, body: v is None or v == {"type": "text"},
    "tools": lambda v, body: not v,
    "functions": lambda v, body: not v,
    "tool_choice": lambda v, body: v in (None, "none", "auto"),
    "function_call": lambda v, body: v in (None, "none", "auto"),
    "audio": lambda v, body: v is None,
    "modalities": lambda v, body: v in (None, ["text"]),
    "echo": lambda v, body: not v,
    "suffix": lambda v, body: not v,
    "best_of": lambda v, body: v is None or v == body.n,
}


class Sampling(BaseModel):
    """The options shared by both OpenAI endpoints, with the extensions top_k, repetition_penalty, min_tokens.
    Fields it does not define are kept aside (model_extra) for UNSUPPORTED's check."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy, as the reference")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, description="choice i samples with seed + i")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0, description="extension; 0 turns it off (the reference's default is 50)")
    repetition_penalty: float | None = Field(None, gt=0, description="extension")
    min_tokens: int | None = Field(None, ge=0, description="extension: no end of text before this many tokens")
    frequency_penalty: float | None = Field(None, description="accepted only as 0")
    presence_penalty: float | None = Field(None, description="accepted only as 0")


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="before")
    @classmethod
    def _counts(cls, data):
        messages = data.get("messages") if isinstance(data, dict) else None
        _count(messages, MAX_MESSAGES, "messages")
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            _count(message.get("content") if isinstance(message, dict) else None, MAX_PARTS, f"messages[{i}].content")
        return data


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(max_length=MAX_PARTS)] | Parts = Field(
        description="text, a list of texts (one prompt each), or (extension) a list of text and image_url parts")
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="before")
    @classmethod
    def _counts(cls, data):
        _count(data.get("prompt") if isinstance(data, dict) else None, MAX_PARTS, "prompt")
        return data


def _task_options() -> type[BaseModel]:
    """GenerationOptions' fields that a client may set, as a pydantic model: the options are defined once."""
    hints = typing.get_type_hints(GenerationOptions)
    hidden = {"eos_token_id", "banned_token_ids"}  # token ids: the server's own business
    defined = {f.name: (hints[f.name] | None, None) for f in fields(GenerationOptions) if f.name not in hidden}
    return create_model("TaskOptions", __config__=ConfigDict(extra="forbid"), **defined)


TaskOptions = _task_options()


class TaskRequest(BaseModel):
    """One of the guide's tasks on one image, its prompt built from the guide's template."""

    model: str | None = None
    task: Literal["caption", "ask", "story"]
    image: str = Field(description="http(s) URL or data URI")
    prompt: str | None = Field(None, description="caption: a prompt to continue, e.g. 'This is an image of '")
    question: str | None = Field(None, description="ask: the question")
    instruction: str | None = Field(None, description="story: replaces the guide's instruction")
    options: TaskOptions | None = Field(None, description="generation options over the task's defaults")
    stream: bool = False
    stream_options: StreamOptions | None = None


class ClassifyRequest(BaseModel):
    model: str | None = None
    image: str = Field(description="http(s) URL or data URI")
    labels: list[str] = Field(min_length=1)


def options_dict(o: BaseModel | None) -> dict[str, Any]:
    return {} if o is None else {k: v for k, v in o.model_dump().items() if v is not None}
