class IdeficsError(Exception):
    """A user-facing error: the message is one line that says what is wrong and where."""


class TooLarge(IdeficsError):
    """Input over one of its size limits (bytes, pixels, images): HTTP's 413."""


class ItemErrors(IdeficsError):
    """Some items of a list call failed and the others did not. The message is the first failure's (one line, naming
    its item) with a count; `results` holds every item's result in order, None where it failed, and `errors` maps
    each failed item's index to its own one-line message."""

    def __init__(self, results: list, errors: dict[int, str]):
        first = min(errors)
        more = f" ({len(errors)} of {len(results)} items failed)" if len(errors) > 1 else ""
        super().__init__(errors[first] + more)
        self.results = results
        self.errors = errors

    def map(self, fn) -> "ItemErrors":
        """The same failures, fn applied to each result that succeeded."""
        return ItemErrors([None if i in self.errors else fn(r) for i, r in enumerate(self.results)], self.errors)


def printable(text: str) -> str:
    """Text as a message shows it: on one line and encodable, with control characters and lone surrogates
    escaped (a newline as \\n)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def reason(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none), for "cannot ... (reason)"."""
    return printable(" ".join(str(e).split())) or type(e).__name__
