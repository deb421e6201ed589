"""Training batches: examples rendered and tokenized exactly as idefics.load's processor would see them, with the
answer tokens as targets. Batch `step` of a run depends only on (seed, step), whichever worker makes it."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idefics.demo import data, scene_head
from idefics.demo.scenes import Scene, render
from idefics.config import IdeficsConfig
from idefics.images import ImageTransform, to_rgb
from idefics.processor import Processor, image_attention_mask
from idefics.tokenizer import Tokenizer

IGNORE = -100  # target of positions without loss (prompt and padding)


class Encoder:
    """Example -> row (ids, targets, images): ids are the processor's prompt ids then the answer's own ids (encoded
    apart, as generation produces them), targets mark the answer and its end token; each image is its resized
    pixels (H, W, 3) uint8 and, when drawn from a Scene here, that scene's labels for the scene head."""

    def __init__(self, checkpoint_dir: str | Path):
        self.tokenizer = Tokenizer.from_dir(checkpoint_dir)
        self.transform = ImageTransform.from_dir(checkpoint_dir)
        self.processor = Processor(self.tokenizer, self.transform)
        vision = IdeficsConfig.from_file(Path(checkpoint_dir) / "config.json").vision
        self.grid = vision.image_size // vision.patch_size
        self.label_count = scene_head.HEADS + 2 * self.grid ** 2  # scene labels, then patch labels

    def labels(self, scene: Scene) -> list[int]:
        return scene_head.labels(scene) + scene_head.patch_labels(scene, self.grid)

    def pixels(self, image: Image.Image) -> np.ndarray:
        # The processor's resize (PIL bicubic on RGB); rescale and normalize happen on the device.
        size = (self.transform.image_size, self.transform.image_size)
        return np.asarray(to_rgb(image).resize(size, resample=Image.Resampling.BICUBIC))

    def encode(self, example: data.Example, draw=None) -> tuple[list[int], list[int], list]:
        """`draw(scene)` gives (PIL image, pixels, labels) for the prompt's Scene items (the same objects for the same
        scene, so that rows can share an image); a prompt may hold PIL images already."""
        drawn = [draw(item) if isinstance(item, Scene) else item for item in example.prompt]
        items = [d[0] if isinstance(d, tuple) else d for d in drawn]
        images = [d[1:] if isinstance(d, tuple) else (self.pixels(d), None) for d in drawn
                  if isinstance(d, (tuple, Image.Image))]
        text, _ = self.processor._layout(items, False, "")
        prompt = self.tokenizer.encode(text)
        answer = self.tokenizer.encode(" " + example.answer)
        if answer[-1] != self.tokenizer.end_of_utterance_id:
            answer.append(self.tokenizer.eos_id)
        ids = prompt + answer
        targets = [IGNORE] * (len(prompt) - 1) + answer + [IGNORE]  # position t predicts ids[t + 1]
        return ids, targets, images

    def collate(self, rows) -> dict[str, torch.Tensor]:
        """-> input_ids, attention_mask, targets (B, S) right-padded; image_attention_mask (B, S, N);
        pixels (M, H, W, 3) uint8, each distinct image of the batch once; labels (M, L) for the heads of
        scene_head; slots (B, N): row b's
        n-th image in pixels, or -1."""
        b, s = len(rows), max(len(ids) for ids, _, _ in rows)
        n = max(1, max(len(images) for _, _, images in rows))
        ids = torch.full((b, s), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        targets = torch.full((b, s), IGNORE, dtype=torch.long)
        slots = torch.full((b, n), -1, dtype=torch.long)
        index: dict[int, int] = {}  # id(pixels) -> position in the batch's image list
        pixels, labels = [], []
        for i, (row_ids, row_targets, images) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            mask[i, :len(row_ids)] = 1
            targets[i, :len(row_targets)] = torch.tensor(row_targets)
            for j, (array, scene_labels) in enumerate(images):
                if id(array) not in index:
                    index[id(array)] = len(pixels)
                    pixels.append(array)
                    labels.append(scene_labels or [scene_head.IGNORE] * self.label_count)
                slots[i, j] = index[id(array)]
        iam = image_attention_mask(ids, self.tokenizer.image_id, self.tokenizer.eos_id, n)
        return dict(input_ids=ids, attention_mask=mask, targets=targets, image_attention_mask=iam,
                    pixels=torch.from_numpy(np.stack(pixels)), labels=torch.tensor(labels), slots=slots)

    def batch(self, seed: int, step: int, size: int) -> dict[str, torch.Tensor]:
        """A training batch. Each drawn scene is drawn once: the several questions asked about one scene share its
        image (rendering is most of the cost of a batch)."""
        rng = random.Random(f"train-{seed}-{step}")
        drawn: dict[int, tuple] = {}  # id(scene) -> (scene, image, pixels, labels); the scene is kept alive

        def draw(scene: Scene) -> tuple:
            if id(scene) not in drawn:
                image = render(scene, rng)
                drawn[id(scene)] = (scene, image, self.pixels(image), self.labels(scene))
            return drawn[id(scene)][1:]

        rows = []
        while len(rows) < size:
            rows += [self.encode(example, draw) for example in data.sample_examples(rng)]
        return self.collate(rows[:size])


class Batches(torch.utils.data.IterableDataset):
    """Batches first..last-1 in order; with DataLoader workers, worker k makes every k-th batch (the loader
    takes them round-robin, so the order holds)."""

    def __init__(self, checkpoint_dir: str | Path, seed: int, size: int, first: int, last: int):
        self.checkpoint_dir, self.seed, self.size, self.first, self.last = checkpoint_dir, seed, size, first, last

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        encoder = Encoder(self.checkpoint_dir)
        for step in range(self.first + k, self.last, workers):
            yield encoder.batch(self.seed, step, self.size)
