"""The server's limits and switches: one dataclass, read by `idefics serve`'s flags (each field's help is its
flag's) and by create_app()."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from idefics.errors import IdeficsError


def setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    model_name: str | None = setting(None, 'the id clients send as "model" (default: --model as given, else the '
                                           "checkpoint's directory name; idefics-demo for the demo)")
    api_key: str | None = setting(None, 'clients must send "Authorization: Bearer KEY" (default: $IDEFICS_API_KEY; '
                                        "none: no key needed)")
    max_concurrent: int | None = setting(None, "requests decoded at once (default: the engine's batch, 64 on a GPU, "
                                               "16 on the CPU)")
    max_queue: int = setting(256, "requests waiting beyond those; past that a request gets 429 before any work")
    max_tokens: int = setting(2048, "new tokens a request may ask for; also the default, within the context")
    max_n: int = setting(16, "choices per request")
    max_images: int = setting(16, "images per request")
    max_image_bytes: int = setting(20 << 20, "encoded bytes of one image")
    max_image_pixels: int = setting(40_000_000, "width x height of one decoded image")
    max_body_bytes: int = setting(64 << 20, "bytes of one request body, data URIs included")
    request_timeout: float = setting(600.0, "seconds from a request's arrival to its last token; then it is aborted")
    image_timeout: float = setting(10.0, "seconds to fetch one image URL, redirects included")
    max_redirects: int = setting(3, "redirects followed per image URL")
    image_urls: bool = setting(True, "fetch http(s) image URLs (off: data URIs only)")
    allow_private_image_urls: bool = setting(False, "fetch image URLs from loopback, private and link-local "
                                                    "addresses too (refused by default)")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_") and value is not None and (isinstance(value, bool) or
                                                                    not isinstance(value, int) or value < 0):
                raise IdeficsError(f"{f.name} must be a whole number >= 0, got {value!r}")
        for name in ("max_concurrent", "max_tokens", "max_n", "max_images", "max_image_bytes", "max_image_pixels",
                     "max_body_bytes"):
            if getattr(self, name) == 0:
                raise IdeficsError(f"{name} must be at least 1")
        for name in ("request_timeout", "image_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise IdeficsError(f"{name} must be a positive number of seconds, got {value!r}")
