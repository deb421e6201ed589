"""The server's limits and switches: one dataclass, read by `idefics serve`'s flags and by create_app()."""
from __future__ import annotations

from dataclasses import dataclass, fields

from idefics.errors import IdeficsError


@dataclass
class Settings:
    model_name: str | None = None  # the id clients send as "model" (default: the checkpoint's directory name)
    api_key: str | None = None  # clients send "Authorization: Bearer KEY"; None: no key needed
    max_concurrent: int | None = None  # requests decoded at once (default: the engine's batch, 64 on a GPU)
    max_queue: int = 256  # requests waiting beyond those; past that a request gets 429 before any work
    max_tokens: int = 2048  # new tokens a request may ask for (and the default, within the model's context)
    max_n: int = 16  # choices per request
    max_images: int = 16  # images per request
    max_image_bytes: int = 20 << 20  # encoded size of one image
    max_image_pixels: int = 40_000_000  # width * height of one decoded image
    max_body_bytes: int = 64 << 20  # one request body, data URIs included
    request_timeout: float = 600.0  # seconds from arrival to the last token; then the request is aborted
    image_timeout: float = 10.0  # seconds to fetch one image URL, redirects included
    max_redirects: int = 3
    image_urls: bool = True  # fetch http(s) image URLs at all (else only data URIs)
    allow_private_image_urls: bool = False  # fetch from loopback, private and link-local addresses too

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_") and value is not None and (not isinstance(value, int) or value < 0):
                raise IdeficsError(f"{f.name.replace('_', '-')} must be a whole number >= 0, got {value!r}")
        for name in ("max_concurrent", "max_tokens", "max_n", "max_images", "max_image_bytes", "max_image_pixels",
                     "max_body_bytes"):
            if getattr(self, name) == 0:
                raise IdeficsError(f"{name.replace('_', '-')} must be at least 1")
        for name in ("request_timeout", "image_timeout"):
            if not getattr(self, name) > 0:
                raise IdeficsError(f"{name.replace('_', '-')} must be a positive number of seconds")
