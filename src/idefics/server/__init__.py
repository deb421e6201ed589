"""`idefics serve`: an OpenAI-compatible HTTP server with a playground page, over the library's engine thread."""
from idefics.server.app import create_app, server
from idefics.server.settings import Settings

__all__ = ["create_app", "server", "Settings"]
