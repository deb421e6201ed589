"""Prompts (interleaved text and images) -> the tensors transformers' IdeficsProcessor returns."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from idefics.engine import Prompt, images_seen
from idefics.errors import IdeficsError
from idefics.images import ImageLimits, ImageTransform, is_image_reference, is_image_source
from idefics.pipeline import ImagePipeline
from idefics.tokenizer import END_OF_UTTERANCE_TOKEN, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, Tokenizer


def as_batch(prompts) -> list[list]:
    """A batch (list of prompts), one prompt (list of items) or one lone item -> a list of prompts."""
    if not isinstance(prompts, (list, tuple)):
        return [[prompts]]
    if not any(isinstance(p, (list, tuple)) for p in prompts):
        return [list(prompts)]
    for b, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)):
            raise IdeficsError(f"prompt {b}: expected a list of items in a batch, got {type(prompt).__name__}")
    return [list(p) for p in prompts]


def image_attention_mask(input_ids: torch.Tensor, image_id: int, eos_id: int | None, num_images: int) -> torch.Tensor:
    """(B, S) ids -> (B, S, num_images) int64, one-hot of the latest image at or before each token. Tokens before
    any image, after an EOS with no image since, or whose image index is >= num_images see none."""
    return torch.from_numpy(_image_mask(input_ids.cpu().numpy(), image_id, eos_id, num_images).astype(np.int64))


def _image_mask(ids: np.ndarray, image_id: int, eos_id: int | None, num_images: int) -> np.ndarray:
    """(B, S) ids -> (B, S, num_images) bool: image_attention_mask's, in NumPy. A prompt's ids are few, and each
    torch call lets go of the interpreter's lock and takes it back, which waits its turn (up to the switch
    interval, 5 ms) while other threads run: the dozen calls of this mask held up every prompt of a busy process."""
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    is_image = ids == image_id
    latest = np.cumsum(is_image, axis=1) - 1  # index of the latest image; -1 before the first
    last_image_pos = np.maximum.accumulate(np.where(is_image, pos, -1), axis=1)
    eos_pos = np.maximum.accumulate(np.where(ids == eos_id, pos, -1), axis=1) if eos_id is not None \
        else np.full(ids.shape, -1)
    eos_before = np.concatenate([np.full_like(eos_pos[:, :1], -1), eos_pos[:, :-1]], axis=1)  # EOS strictly before
    blind = (latest < 0) | (latest >= num_images) | (eos_before > last_image_pos)
    return (np.clip(latest, 0, num_images - 1)[..., None] == np.arange(num_images)) & ~blind[..., None]


class Pending:
    """One prompt on its way: its token ids at once, its images as the pipeline's workers finish them."""

    def __init__(self, processor: Processor, ids: list[int], images: list[tuple[str, Future]]):
        self.processor = processor
        self.ids = ids
        self.images = images  # (where, future of pipeline.Pixels)
        self.left = len(images)
        self.keys: dict[Future, bytes] = {}  # each image's key for the encoder's cache
        self.callbacks: list[Callable[[], None]] = []
        self.lock = threading.Lock()
        for _, future in images:
            future.add_done_callback(self._done)

    def _done(self, future: Future):
        # The workers hashed the pixels they made: the key is not left to the engine's thread. (A raising callback
        # would leave the prompt waiting forever: the count goes down whatever happens.)
        key = None
        try:
            key = future.result().key if not future.cancelled() and future.exception() is None else None
        finally:
            with self.lock:
                if key is not None:
                    self.keys[future] = key
                self.left -= 1
                callbacks = self.callbacks if self.left == 0 else []
            for fn in callbacks:
                fn()

    def when_ready(self, fn: Callable[[], None]):
        """Call fn() once every image is done (now if they are), in whichever thread finishes the last."""
        with self.lock:
            if self.left:
                self.callbacks.append(fn)
                return
        fn()

    def pixels(self) -> list[torch.Tensor]:
        """Each image's (3, H, W) pixels, waiting for them; the first failure as IdeficsError naming its item."""
        out = []
        for where, future in self.images:
            try:
                out.append(future.result().pixels)
            except IdeficsError as e:
                self.cancel()
                raise type(e)(f"{where}: {e}") from None  # (a TooLarge stays one: the server's 413)
        return out

    def prompt(self) -> Prompt:
        """-> the engine's Prompt: what the reference processor gives this prompt alone, padding removed and image
        slots cut to the images its tokens see (as engine.split_batch cuts a batch's rows). (In NumPy and Python
        but for three torch calls: see _image_mask.)"""
        pixels = self.pixels()
        p = self.processor
        used = pixels[: self.ids.count(p.tokenizer.image_id)]
        mask = _image_mask(np.array([self.ids]), p.tokenizer.image_id, p.tokenizer.eos_id, max(1, len(used)))[0]
        n = images_seen(mask)
        t = p.image_transform
        images = torch.stack(used[:n]) if n else torch.zeros(0, 3, t.image_size, t.image_size)
        keys = tuple(self.keys.get(future) for _, future in self.images[:n])
        return Prompt(torch.tensor(self.ids, dtype=torch.long), images,
                      torch.from_numpy(mask[:, :n].astype(np.int64)), keys if None not in keys else None)

    def cancel(self):
        for _, future in self.images:
            future.cancel()


class Processor:
    def __init__(self, tokenizer: Tokenizer, image_transform: ImageTransform, limits: ImageLimits = ImageLimits(),
                 workers: int | None = None, image_decode: str = "exact", resize_on: torch.device | str | None = None):
        if tokenizer.image_id is None or tokenizer.fake_image_id is None:
            raise IdeficsError(f"the tokenizer lacks the {IMAGE_TOKEN} or {FAKE_IMAGE_TOKEN} token")
        if tokenizer.bos_token is None:
            raise IdeficsError("the tokenizer has no BOS token")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.limits = limits
        # Decodes, resizes and normalizes every image in parallel processes, or decodes them there and resizes them on
        # the device resize_on (see idefics.pipeline and idefics.stage).
        self.images = ImagePipeline(image_transform, limits, workers, image_decode, resize_on=resize_on)

    def __call__(self, prompts, add_end_of_utterance_token: bool | None = None,
                 within: int | None = None) -> dict[str, torch.Tensor]:
        """-> input_ids (B, S) and attention_mask (B, S) int64, pixel_values (B, N, 3, H, W) float32 zero-padded to
        the batch's largest image count N >= 1, image_attention_mask (B, S, N) int64 (when no prompt has an image:
        (B, S, 1) bool zeros, as the reference). With add_end_of_utterance_token, <end_of_utterance> goes between
        two consecutive text items. None (the default) means true when the tokenizer lists <end_of_utterance>
        among its additional special tokens (the instruct checkpoints do), as transformers 4.37.2 decides it;
        transformers 5 never finds it there and always takes false. within: as start's."""
        batch = as_batch(prompts)
        started = self._wait_all(self._start_all(batch, self.end_of_utterance(add_end_of_utterance_token), within))
        images = [p.pixels() for p in started]

        input_ids, attention_mask = self._pad([p.ids for p in started])

        num_images = max(1, max(len(x) for x in images))
        t = self.image_transform
        pixel_values = torch.zeros(len(batch), num_images, t.image_num_channels, t.image_size, t.image_size)
        for b, prompt_images in enumerate(images):
            # As the reference: as many images as the text has <image> tokens.
            used = prompt_images[:int((input_ids[b] == self.tokenizer.image_id).sum())]
            if used:
                pixel_values[b, :len(used)] = torch.stack(used)

        if any(images):
            mask = image_attention_mask(input_ids, self.tokenizer.image_id, self.tokenizer.eos_id, num_images)
        else:
            mask = torch.zeros(*input_ids.shape, 1, dtype=torch.bool)
        return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    image_attention_mask=mask)

    def prompts(self, prompts, add_end_of_utterance_token: bool | None = None,
                within: int | None = None) -> list[Prompt]:
        """Each prompt as the engine takes it: what __call__ gives it alone, unpadded (see Pending.prompt). within:
        as start's."""
        batch = as_batch(prompts)
        started = self._start_all(batch, self.end_of_utterance(add_end_of_utterance_token), within)
        return [p.prompt() for p in self._wait_all(started)]

    def _start_all(self, batch: list[list], add_end_of_utterance_token: bool,
                   within: int | None = None) -> list[Pending | IdeficsError]:
        """Every prompt's images start decoding before any is waited for."""
        started = []
        for b, prompt in enumerate(batch):
            try:
                started.append(self.start(prompt, add_end_of_utterance_token, self.where(b, len(batch)), within))
            except IdeficsError as e:
                started.append(e)
        return started

    def _wait_all(self, started: list[Pending | IdeficsError]) -> list[Pending]:
        """Wait for every image; raise the first error in the prompts' order, as a one-by-one processor meets it."""
        try:
            for p in started:
                if isinstance(p, IdeficsError):
                    raise p
                p.pixels()
        except IdeficsError:
            for p in started:
                if isinstance(p, Pending):
                    p.cancel()
            raise
        return started

    def end_of_utterance(self, add_end_of_utterance_token: bool | None) -> bool:
        if add_end_of_utterance_token is None:
            return END_OF_UTTERANCE_TOKEN in self.tokenizer.additional_special_tokens
        if not isinstance(add_end_of_utterance_token, bool):
            raise IdeficsError(f"add_end_of_utterance_token must be true, false or None, "
                               f"got {add_end_of_utterance_token!r}")
        return add_end_of_utterance_token

    @staticmethod
    def where(b: int, prompts: int) -> str:
        """How errors name prompt b of a batch: not at all when it is alone."""
        return f"prompt {b}, " if prompts > 1 else ""

    def start(self, prompt: list, add_end_of_utterance_token: bool, where: str = "",
              within: int | None = None) -> Pending:
        """Lay out and tokenize one prompt now, and hand its images to the pipeline -> a Pending. An error of the
        prompt's text or items is raised here; an image's, by the Pending. within: the model's context; a text too
        long to fit it is refused before it is tokenized (Tokenizer.fits)."""
        text, sources = self._layout(prompt, add_end_of_utterance_token, where)
        if within is not None:
            self.tokenizer.check_fits(len(text), within, where)
        return Pending(self, self.tokenizer.encode(text),
                       [(f"{where}item {i}", self.images.submit(src)) for i, src in sources])

    def _layout(self, prompt: list, add_end_of_utterance_token: bool, where: str) -> tuple[str, list]:
        """One prompt -> its text with image tokens, and the (item index, source) of each image."""
        if not prompt:
            raise IdeficsError(f"{where}empty prompt: give at least one text or image item")
        text, sources = self.tokenizer.bos_token, []
        last_was_image = False
        for i, item in enumerate(prompt):
            if isinstance(item, str):
                item = item.strip(" ")  # as the reference, which also decides what a URL is after this strip
            if isinstance(item, str) and not is_image_reference(item):
                if add_end_of_utterance_token and i > 0 and not last_was_image:
                    text += END_OF_UTTERANCE_TOKEN
                text += item
                last_was_image = False
            elif isinstance(item, str) or is_image_source(item):
                # Consecutive images share the separator between them.
                text += IMAGE_TOKEN + FAKE_IMAGE_TOKEN if last_was_image else FAKE_IMAGE_TOKEN + IMAGE_TOKEN + FAKE_IMAGE_TOKEN
                sources.append((i, item))
                last_was_image = True
            else:
                raise IdeficsError(f"{where}item {i}: unsupported item of type {type(item).__name__}; "
                                   "expected text or an image (PIL image, path, URL, data URI, bytes)")
        self.limits.check_count(len(sources), where)
        return text, sources

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, S) padded on the tokenizer's padding side, and the attention mask (B, S)."""
        longest = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_id
        if pad_id is None:
            if any(len(r) != longest for r in rows):
                raise IdeficsError("prompts of different lengths need padding, but the tokenizer has no pad token")
            pad_id = 0  # fills nothing: every row is full length
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for b, r in enumerate(rows):
            span = slice(longest - len(r), None) if self.tokenizer.padding_side == "left" else slice(0, len(r))
            ids[b, span] = torch.tensor(r)
            mask[b, span] = 1
        return ids, mask

    @classmethod
    def from_dir(cls, path: str | Path, limits: ImageLimits = ImageLimits(), workers: int | None = None,
                 image_decode: str = "exact", resize_on: torch.device | str | None = None) -> Processor:
        return cls(Tokenizer.from_dir(path), ImageTransform.from_dir(path), limits, workers, image_decode, resize_on)
