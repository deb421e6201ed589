"""tokenizer.json via `tokenizers`, with the special tokens and padding side that transformers reads beside it."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from idefics.errors import IdeficsError

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers maps the idefics model type to this class, which rebuilds the pipeline around tokenizer.json's vocab.
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # Llama's byte-fallback pieces


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IdeficsError(f"cannot read {path}: {e}") from None


def _token_text(value) -> str | None:
    # Special tokens are stored either as a string or as a serialized AddedToken.
    return value.get("content") if isinstance(value, dict) else value


def _additional_tokens(settings: dict) -> tuple[str, ...]:
    """The extra special tokens listed beside the named ones: "additional_special_tokens" in the hub's files,
    "extra_special_tokens" in transformers 5's (there a dict names model-specific tokens instead, which the list
    does not hold)."""
    listed = settings.get("extra_special_tokens")
    if not isinstance(listed, list) or not listed:
        listed = settings.get("additional_special_tokens")
    if not isinstance(listed, list):
        return ()
    return tuple(t for t in map(_token_text, listed) if isinstance(t, str))


def _llama_pipeline(backend: Backend, settings: dict) -> None:
    """What transformers' LlamaTokenizer does with tokenizer.json: keep the vocab, merges and added tokens, replace
    normalizer, pre-tokenizer and decoder. With `legacy` false (its default) no "▁" is prepended after a special
    token, unlike the raw tokenizer.json."""
    add_prefix_space = settings.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    if not add_prefix_space:
        scheme = "never"
    else:
        scheme = "always" if settings.get("legacy", False) else "first"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)


def _piece_chars(backend: Backend) -> int | None:
    """The most characters of text one token can stand for, where the llama pipeline makes it known: no
    normalizer, a Metaspace that turns " " into "▁" one for one, added tokens that take no space around them,
    and a BPE that never fuses unknown characters into one <unk> (byte fallback holds every byte's piece). A token
    covers at most its piece's length then. None elsewhere."""
    bpe = backend.model
    if backend.normalizer is not None or not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace) \
            or not isinstance(bpe, models.BPE):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    if bpe.fuse_unk and not (bpe.byte_fallback and all(f"<0x{b:02X}>" in vocab for b in range(256))):
        return None
    if any(t.lstrip or t.rstrip or t.single_word for t in backend.get_added_tokens_decoder().values()):
        return None
    return max(map(len, vocab))


class Tokenizer:
    def __init__(self, backend: Backend, *, bos_token: str | None, eos_token: str | None,
                 unk_token: str | None, pad_token: str | None, padding_side: str,
                 additional_special_tokens: tuple[str, ...] = ()):
        self.backend = backend
        self.piece_chars = _piece_chars(backend)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.padding_side = padding_side
        self.additional_special_tokens = additional_special_tokens
        self.bos_id = self.token_to_id(bos_token)
        self.eos_id = self.token_to_id(eos_token)
        self.unk_id = self.token_to_id(unk_token)
        self.pad_id = self.token_to_id(pad_token)
        self.fake_image_id = self.token_to_id(FAKE_IMAGE_TOKEN)
        self.image_id = self.token_to_id(IMAGE_TOKEN)
        self.end_of_utterance_id = self.token_to_id(END_OF_UTTERANCE_TOKEN)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Reads tokenizer.json, tokenizer_config.json and special_tokens_map.json as transformers does: the hub's
        layout (special tokens in special_tokens_map.json) and transformers 5's (all in tokenizer_config.json)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise IdeficsError(f"no tokenizer.json in {path}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise IdeficsError(f"cannot load {file}: {e}") from None

        settings = _read_json(path / "tokenizer_config.json")
        tokenizer_class = settings.get("tokenizer_class") or "LlamaTokenizer"
        llama = tokenizer_class in _LLAMA_CLASSES
        if "added_tokens_decoder" not in settings:  # older checkpoints: the map file overrides the config
            settings.update(_read_json(path / "special_tokens_map.json"))
        defaults = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>") if llama else {}
        padding = backend.padding or {}
        defaults["pad_token"] = padding.get("pad_token")
        tokens = {key: _token_text(settings[key] if key in settings else defaults.get(key)) for key in _SPECIAL_KEYS}
        padding_side = settings.get("padding_side") or padding.get("direction") or ("left" if llama else "right")

        if llama:
            _llama_pipeline(backend, settings)
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, padding_side=padding_side, additional_special_tokens=_additional_tokens(settings),
                   **tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def fits(self, chars: int, tokens: int) -> bool:
        """False when text of `chars` characters cannot be `tokens` ids or fewer, which its length alone shows: a
        text too long for the model's context is refused before tokenizing it (whose time and memory grow with the
        text). True when it may fit, or where the pipeline does not bound a token's characters (see _piece_chars)."""
        return self.piece_chars is None or chars <= tokens * self.piece_chars

    def check_fits(self, chars: int, tokens: int, where: str = "") -> None:
        """Raises, `where` heading the message, when text of `chars` characters cannot fit `tokens` (fits)."""
        if not self.fits(chars, tokens):
            raise IdeficsError(f"{where}text of {chars} characters: more than the model's context of {tokens} tokens "
                               "can hold")

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in it are recognized, none are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Text pieces as ids arrive, which concatenate to decode() of all ids. Each piece is the growth of the decode
    of a window that starts at the last emitted boundary, so decoder steps that look at the window's first token
    apply alike to both sides. Text waits while the last id may still change it: a byte-fallback piece (a run of
    them decodes as one group, and an invalid group as U+FFFD per byte, its ASCII bytes included), an id that
    decodes to nothing (a skipped special token inside such a run joins its two sides), or text ending in U+FFFD."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # window start: the boundary before the last emitted piece
        self.emitted = 0  # ids[:emitted] are fully reflected in the text given out

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def _closes(self, token: int) -> bool:
        """Whether text before and at this id is final whatever comes next."""
        if BYTE_TOKEN.fullmatch(self.tokenizer.backend.id_to_token(token) or ""):
            return False
        return bool(self._text([token]))

    def push(self, ids: int | Iterable[int]) -> str:
        """Adds ids; returns the newly final text ("" while the last id may still change it)."""
        self.ids.extend([ids] if isinstance(ids, int) else ids)
        if not self.ids or not self._closes(self.ids[-1]):
            return ""
        piece = self._pending()
        if piece and not piece.endswith("\ufffd"):
            self.start, self.emitted = self.emitted, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is held back; the pieces then concatenate to the decode of all ids."""
        piece = self._pending()
        self.start, self.emitted = self.emitted, len(self.ids)
        return piece

    def held(self) -> str:
        """The text held back so far: the final text given out plus this is the decode of all ids."""
        return self._pending()

    def _pending(self) -> str:
        done = self._text(self.ids[self.start:self.emitted])
        return self._text(self.ids[self.start:])[len(done):]
