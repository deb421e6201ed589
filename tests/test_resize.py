"""resize.py: Pillow's bicubic resize as float64 matrix products gives Pillow's bytes; image workers that hand large
images over to this process (arena.py) for it give the reference processor's pixel values (here on the CPU;
tests/test_gpu.py runs it on the device), and every page they took comes back."""
from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
import torch
from helpers import make_processor_dir, reference_processor
from PIL import Image
from test_pipeline import jpeg, photo
from transformers.image_utils import load_image as reference_load_image

from idefics import handover as handover_module
from idefics import pipeline as pipeline_module
from idefics import resize as resize_module
from idefics.arena import PAGE, Arena
from idefics.errors import IdeficsError
from idefics.images import ImageTransform
from idefics.pipeline import DEVICE_RESIZE_PIXELS, ImagePipeline
from idefics.processor import Processor
from idefics.resize import agrees_with_pillow, resize

SIZES = [
    (1600, 1067), (1067, 1600),  # photos, landscape and portrait
    (224, 224), (224, 500), (500, 224),  # one axis unchanged
    (300, 600), (300, 601), (300, 599), (601, 300),  # either side of Pillow 13's rule for the first pass
    (1, 1), (2, 3), (100, 80), (225, 223),  # growing
    (7919, 13), (13, 7919), (3, 500),  # extreme shapes
    (4000, 3000),  # several bands of rows
]


def pillow(a: np.ndarray, size: int = 224) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))


def ours(a: np.ndarray, size: int = 224) -> np.ndarray:
    return resize(torch.from_numpy(a), size).numpy()


@pytest.mark.parametrize("width,height", SIZES)
def test_the_product_of_the_weights_gives_pillows_bytes(width, height):
    rng = np.random.default_rng(width * 10007 + height)
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    a[::3] = 255  # full-range edges: the filter's overshoot clips at both ends
    a[1::4] = 0
    assert np.array_equal(ours(a), pillow(a))
    smooth = photo(width, height, 1)
    assert np.array_equal(ours(smooth), pillow(smooth))


def test_other_output_sizes_and_narrow_bands(monkeypatch):
    monkeypatch.setattr(resize_module, "BAND_BYTES", 5000)  # a few rows per band: the sums span many of them
    rng = np.random.default_rng(3)
    for (width, height), size in (((640, 427), 30), ((90, 700), 64), ((50, 40), 97)):
        a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        assert np.array_equal(ours(a, size), pillow(a, size)), (width, height, size)


def test_the_check_of_the_installed_pillow_catches_a_wrong_model(monkeypatch):
    assert agrees_with_pillow(224)
    # The other rule for which pass goes first (Pillow before 13 always ran the horizontal one first).
    monkeypatch.setattr(resize_module, "PILLOW_MAJOR", 12 if resize_module.PILLOW_MAJOR >= 13 else 13)
    assert not agrees_with_pillow.__wrapped__(224)


def test_arena_pages_are_taken_first_fit_and_given_back():
    arena = Arena(8 * PAGE)
    a = arena.take(3 * PAGE)
    b = arena.take(PAGE + 1)  # two pages
    assert (a, b) == (0, 3 * PAGE) and arena.taken() == 5 * PAGE
    assert arena.take(4 * PAGE) is None  # 3 free, not 4
    arena.give(a, 3 * PAGE)
    assert arena.take(2 * PAGE) == 0  # the first run that fits
    assert arena.take(4 * PAGE) is None and arena.take(3 * PAGE) == 5 * PAGE
    arena.array(b, (2, PAGE))[...] = 7
    assert arena.array(b, (2 * PAGE,)).sum() == 14 * PAGE


@pytest.fixture(scope="module")
def large_files(tmp_path_factory):
    """Images above the size the workers hand over: a photo, an EXIF-rotated portrait, RGBA and grayscale."""
    root = tmp_path_factory.mktemp("large")
    made = {"a.jpg": jpeg(photo(1024, 683, 1)), "b.jpg": jpeg(photo(700, 1100, 2), orientation=6)}
    for name, mode in (("c.png", "RGBA"), ("d.png", "L")):
        buf = io.BytesIO()
        Image.fromarray(photo(900, 600, 3)).convert(mode).save(buf, "PNG")
        made[name] = buf.getvalue()
    for name, data in made.items():
        (root / name).write_bytes(data)
    return [root / name for name in made]


def test_images_handed_over_give_the_reference_processors_pixels(large_files, tmp_path, monkeypatch):
    processor_dir = make_processor_dir(tmp_path, image_size=224)
    got = Processor.from_dir(processor_dir, workers=3)
    got.images.resize_device = "cpu"  # the device path, run by torch on the CPU
    resized = []
    real = handover_module.resize
    monkeypatch.setattr(handover_module, "resize", lambda x, *a: resized.extend([x.shape[1:3]] * len(x)) or
                        real(x, *a))
    prompts = [[f, "This is an image of "] for f in large_files]
    pixels = got(prompts)["pixel_values"]
    loaded = [[reference_load_image(str(x)), t] for x, t in prompts]
    assert torch.equal(pixels, reference_processor(processor_dir)(text=loaded)["pixel_values"])
    assert len(resized) == len(large_files) and all(h * w >= DEVICE_RESIZE_PIXELS for h, w in resized)
    assert got.images.arena.taken() == 0
    # Keys from the files' bytes: the same file, the same key; another file, another key (the encoder's cache).
    keys = [got.images.submit(f).result().key for f in large_files]
    assert keys == [got.images.submit(f).result().key for f in large_files] and len(set(keys)) == len(keys)


def test_small_images_and_a_full_arena_stay_on_the_workers_core(large_files, monkeypatch):
    pipeline = ImagePipeline(ImageTransform(), workers=1, resize_device="cpu")
    monkeypatch.setattr(handover_module, "resize", lambda *a: pytest.fail("an image went to the device"))
    small = Image.fromarray(photo(300, 200, 4))
    buf = io.BytesIO()
    small.save(buf, "PNG")
    assert np.array_equal(pipeline.submit(buf.getvalue()).result().pixels.numpy(), ImageTransform().pixels(small))
    monkeypatch.setattr(pipeline_module, "HANDOFF_MEMORY", PAGE)  # room for none of the large ones
    full = ImagePipeline(ImageTransform(), workers=1, resize_device="cpu")
    for f in large_files:
        assert torch.equal(full.submit(f).result().pixels, full.pixels(f))


def test_a_failed_device_resize_falls_back_to_pillow_and_gives_the_pages_back(large_files, monkeypatch):
    pipeline = ImagePipeline(ImageTransform(), workers=2, resize_device="cpu")

    def broken(x, *args):
        raise torch.OutOfMemoryError("the device is full")

    monkeypatch.setattr(handover_module, "resize", broken)
    for f in large_files:
        assert torch.equal(pipeline.submit(f).result().pixels, pipeline.pixels(f))
    assert pipeline.arena.taken() == 0


def test_pages_of_a_cancelled_image_and_of_a_killed_worker_come_back(large_files):
    pipeline = ImagePipeline(ImageTransform(), workers=1, resize_device="cpu")
    pipeline.submit(large_files[0]).result()  # the worker and the arena exist
    arena = pipeline.arena
    future = pipeline.submit(large_files[1])
    future.cancel()  # (maybe running already: its pages come back when it returns)
    while not future.inner.done():
        time.sleep(0.01)
    assert arena.taken() == 0
    # A worker killed while it holds pages: they come back when an image next starts a fresh pool.
    worker = next(iter(pipeline._processes._processes.values()))
    held = arena.take(3 * PAGE) // PAGE
    arena.owners[held : held + 3] = [worker.pid] * 3
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    deadline = time.monotonic() + 10
    while True:
        try:
            pixels = pipeline.submit(large_files[2]).result()
            break
        except IdeficsError:  # submitted before the pool saw its worker die: this image alone fails
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert pixels.pixels.shape == (3, 224, 224) and arena.taken() == 0
