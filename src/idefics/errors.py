class IdeficsError(Exception):
    """A user-facing error: the message is one line that says what is wrong and where."""
