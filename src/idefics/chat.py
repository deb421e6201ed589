"""A conversation with an instruct model, kept as one growing prompt in the guide's format."""
from __future__ import annotations

from contextlib import closing
from typing import Iterator

from idefics import tasks
from idefics.errors import IdeficsError


class Conversation:
    """send() a user turn (text and images), get the assistant's reply; every turn stays in `history`, the prompt
    items so far. Generation stops at <end_of_utterance>, as in the guide."""

    def __init__(self, model, **options):
        eou = model.tokenizer.end_of_utterance_id
        if eou is None:
            raise IdeficsError("chat needs an instruct model: this tokenizer has no <end_of_utterance> token")
        self.model = model
        self.options = tasks.options("chat", {"eos_token_id": eou} | options)
        self.history: list = []

    def prompt(self, message=None, images=None) -> list:
        """The prompt a send() of this message would run: the history, the user turn and the assistant's cue."""
        return self.history + self._user_turn(message, images) + tasks.assistant_turn()

    def send(self, message=None, images=None, **options) -> str:
        """message: text, or a list of text and image items in order; images: one image or a list, shown before
        the text. -> the reply."""
        user = self._user_turn(message, images)
        [completion] = self.model.generate([self.history + user + tasks.assistant_turn()], **(self.options | options))
        return self._record(user, completion.text)

    def stream(self, message=None, images=None, **options) -> Iterator[str]:
        """As send(), yielding the reply in pieces; the turn joins the history once the reply ends (or the
        caller stops reading)."""
        user = self._user_turn(message, images)
        opts = self.options | options
        pieces: list[str] = []
        try:
            with closing(self.model.stream(self.history + user + tasks.assistant_turn(), **opts)) as stream:
                for piece in stream:  # closed with this one: the reply's request ends at once
                    pieces.append(piece)
                    yield piece
        except GeneratorExit:
            self._record(user, "".join(pieces))
            raise
        self._record(user, "".join(pieces))

    def reset(self) -> None:
        self.history = []

    def _user_turn(self, message, images) -> list:
        if isinstance(message, (list, tuple)):
            items = [x if tasks.is_text(x) else tasks.as_image(x, f"item {i}")
                     for i, x in enumerate(message)]
        else:
            items = [] if message is None or not str(message).strip() else [str(message)]
        if images is not None:
            items = tasks.as_images(images)[0] + items
        if not items:
            raise IdeficsError("empty message: give text, images or both")
        return tasks.user_turn(items, first=not self.history)

    def _record(self, user: list, reply: str) -> str:
        reply = reply.strip()
        self.history += user + tasks.assistant_turn(reply)
        return reply
