"""resize.py: Pillow's bicubic resize as float64 matrix products gives Pillow's bytes, and the image workers that
use it give the reference processor's pixel values (here on the CPU; tests/test_gpu.py runs it on the device)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import make_processor_dir, reference_processor
from PIL import Image
from test_pipeline import jpeg, photo
from transformers.image_utils import load_image as reference_load_image

from idefics import resize as resize_module
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


def pillow(image: Image.Image, size: int = 224) -> np.ndarray:
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("width,height", SIZES)
def test_the_product_of_the_weights_gives_pillows_bytes(width, height):
    rng = np.random.default_rng(width * 10007 + height)
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    a[::3] = 255  # full-range edges: the filter's overshoot clips at both ends
    a[1::4] = 0
    image = Image.fromarray(a)
    assert np.array_equal(resize(image, 224, "cpu"), pillow(image))
    smooth = Image.fromarray(photo(width, height, 1))
    assert np.array_equal(resize(smooth, 224, "cpu"), pillow(smooth))


def test_other_output_sizes_and_narrow_bands(monkeypatch):
    monkeypatch.setattr(resize_module, "BAND_BYTES", 5000)  # a few rows per band: the sums span many of them
    rng = np.random.default_rng(3)
    for (width, height), size in (((640, 427), 30), ((90, 700), 64), ((50, 40), 97)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert np.array_equal(resize(image, size, "cpu"), pillow(image, size)), (width, height, size)


def test_the_check_of_the_installed_pillow_catches_a_wrong_model(monkeypatch):
    assert agrees_with_pillow(224)
    # The other rule for which pass goes first (Pillow before 13 always ran the horizontal one first).
    monkeypatch.setattr(resize_module, "PILLOW_MAJOR", 12 if resize_module.PILLOW_MAJOR >= 13 else 13)
    assert not agrees_with_pillow.__wrapped__(224)


@pytest.fixture(scope="module")
def large_files(tmp_path_factory):
    """Images above the size the workers send to the device: a photo, an EXIF-rotated portrait, RGBA and grayscale."""
    root = tmp_path_factory.mktemp("large")
    made = {"a.jpg": jpeg(photo(1024, 683, 1)), "b.jpg": jpeg(photo(700, 1100, 2), orientation=6)}
    for name, mode in (("c.png", "RGBA"), ("d.png", "L")):
        buf = io.BytesIO()
        Image.fromarray(photo(900, 600, 3)).convert(mode).save(buf, "PNG")
        made[name] = buf.getvalue()
    for name, data in made.items():
        (root / name).write_bytes(data)
    return [root / name for name in made]


def test_workers_resizing_on_a_device_give_the_reference_processors_pixels(large_files, tmp_path, monkeypatch):
    processor_dir = make_processor_dir(tmp_path, image_size=224)
    ours = Processor.from_dir(processor_dir, workers=3)
    ours.images.resize_device = "cpu"  # the device path, run by torch on the CPU
    resized = []
    real = resize_module.resize
    monkeypatch.setattr("idefics.pipeline.resize", lambda *a: resized.append(a[0].size) or real(*a))
    prompts = [[f, "This is an image of "] for f in large_files]
    got = ours(prompts)
    loaded = [[reference_load_image(str(x)), t] for x, t in prompts]
    expected = reference_processor(processor_dir)(text=loaded)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert len(resized) == len(large_files) and all(w * h >= DEVICE_RESIZE_PIXELS for w, h in resized)


def test_small_images_stay_on_the_workers_core(monkeypatch):
    pipeline = ImagePipeline(ImageTransform(), workers=1, resize_device="cpu")
    monkeypatch.setattr("idefics.pipeline.resize", lambda *a: pytest.fail("a small image went to the device"))
    image = Image.fromarray(photo(300, 200, 4))
    assert torch.equal(pipeline.pixels(image), ImageTransform().pixels(image))
