"""`idefics serve`: an OpenAI-compatible HTTP server with a playground page, over the library's engine thread.
idefics.server.app has create_app() and server(); idefics.server.settings the limits."""
