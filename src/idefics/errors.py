class IdeficsError(Exception):
    """A user-facing error: the message is one line that says what is wrong and where."""


class TooLarge(IdeficsError):
    """Input over one of its size limits (bytes, pixels, images): HTTP's 413."""


def printable(text: str) -> str:
    """Text as a message shows it: on one line and encodable, with control characters and lone surrogates
    escaped (a newline as \\n)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reason(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none), for "cannot ... (reason)"."""
    return printable(" ".join(str(e).split())) or type(e).__name__
