"""Images decoded by the workers and resized elsewhere (resize.py, stage.py): the matrix products give Pillow's
bicubic resize bit for bit at every shape, in both of its pass orders; a staged pipeline gives the reference
processor's pixels; a full slab, a cancelled image and a device whose resize differs from Pillow's lose nothing and
leave the slab empty. On the CPU here; tests/test_gpu.py runs the same on CUDA."""
import io
import warnings

import numpy as np
import pytest
import torch
from helpers import make_processor_dir, reference_processor
from PIL import Image
from transformers.image_utils import load_image as reference_load_image

from idefics import resize as resize_module
from idefics import stage as stage_module
from idefics.errors import IdeficsError
from idefics.images import ImageTransform, pixel_key
from idefics.pipeline import ImagePipeline
from idefics.processor import Processor
from idefics.resize import resize, vertical_first
from idefics.stage import CHUNK, Stage

SHAPES = [(1600, 1067), (1067, 1600), (224, 224), (1, 1), (1, 500), (500, 1), (3, 7), (225, 223), (223, 1000),
          (1000, 223), (438, 2033), (2033, 438), (100, 60), (448, 448), (2000, 10), (10, 2000), (300, 1000)]


def pillow(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [224, 30])
def test_the_resize_equals_pillows_at_every_shape(size):
    """Random shapes too; noise, and hard 0/255 edges that push the sums past a byte on both sides."""
    rng = np.random.default_rng(size)
    shapes = SHAPES + [tuple(int(v) for v in rng.integers(1, 1800, 2)) for _ in range(12)]
    assert any(vertical_first(w, h, size) for w, h in shapes) == resize_module.PILLOW_13
    for width, height in shapes:
        for image in (rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                      (rng.integers(0, 2, (height, width, 3)) * 255).astype(np.uint8)):
            got = resize(torch.from_numpy(image), size)
            assert got.dtype == torch.uint8 and got.shape == (3, size, size)
            assert np.array_equal(got.numpy(), pillow(image, size)), (width, height)


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height))
    noisy = np.asarray(field, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEGs wide, tall (resized vertically first by Pillow 13), small (enlarged), at the model's size, and one of
    more than a CHUNK decoded."""
    root = tmp_path_factory.mktemp("stage")
    paths = []
    for i, (width, height) in enumerate([(640, 427), (300, 900), (120, 90), (224, 224), (500, 333), (800, 600)]):
        paths.append(root / f"p{i}.jpg")
        paths[-1].write_bytes(jpeg(width, height, i))
    return paths


def used(pipeline: ImagePipeline) -> int:
    return bytes(pipeline.resizer.stage.used.get_obj()).count(1)


def drain(pipeline: ImagePipeline):
    """Wait until every worker's and the resizer's work is done."""
    pipeline._processes.shutdown(wait=True)
    thread = pipeline.resizer.thread
    pipeline.resizer.close()
    thread.join()


def test_a_staged_pipeline_gives_the_reference_processors_pixels(photos, tmp_path):
    processor_dir = make_processor_dir(tmp_path, image_size=224)
    ours = Processor.from_dir(processor_dir, workers=3, resize_on="cpu")
    prompts = [[f, "This is an image of "] for f in photos] + [["Two:", photos[1], "and", photos[0]]]
    got = ours(prompts)
    expected = reference_processor(processor_dir)(
        text=[[reference_load_image(str(x)) if not isinstance(x, str) else x for x in p] for p in prompts])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert ours.images.resizer.checked and used(ours.images) == 0  # staged, and every place given back


def test_a_full_slab_leaves_the_resize_to_the_workers_and_a_bad_image_fails_alone(photos, tmp_path):
    """A slab of one CHUNK: the largest photo never fits, the others when it is free."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:400])
    transform = ImageTransform()
    pipeline = ImagePipeline(transform, workers=4, resize_on="cpu")
    pipeline.resizer.stage = Stage(CHUNK)
    sources = photos * 3 + [broken]
    futures = [pipeline.submit(s) for s in sources]
    staged = []
    for source, future in zip(sources[:-1], futures):
        got = future.result()
        assert np.array_equal(got.pixels.numpy(), transform.pixels(Image.open(source).convert("RGB")))
        staged.append(got.key != pixel_key(got.pixels.numpy()))  # (a staged image's key is its bytes')
    assert any(staged) and not any(s for s, source in zip(staged, sources) if source == photos[-1])
    with pytest.raises(IdeficsError, match="broken.jpg: cannot decode image"):
        futures[-1].result()
    drain(pipeline)
    assert used(pipeline) == 0


def test_cancelled_images_give_their_places_back(photos):
    pipeline = ImagePipeline(ImageTransform(), workers=2, resize_on="cpu")
    futures = [pipeline.submit(p) for p in photos * 4]
    for f in futures[1:]:
        f.cancel()
    futures[0].result()
    drain(pipeline)
    assert used(pipeline) == 0


def wrong(image, size):
    return resize(image, size) ^ 1


def failing(image, size):
    raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")


@pytest.mark.parametrize("resized, said", [(wrong, "does not give Pillow"), (failing, "failed (CUBLAS_STATUS")])
def test_a_device_whose_resize_differs_from_pillow_or_fails_stops_the_staging(photos, monkeypatch, resized, said):
    """(A GPU without int8 tensor-core products fails the check as one whose arithmetic differs does.)"""
    monkeypatch.setattr(stage_module.resize, "resize", resized)
    transform = ImageTransform()
    pipeline = ImagePipeline(transform, workers=2, resize_on="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = pipeline.submit(photos[0]).result()
    assert any(said in str(w.message) and "\n" not in str(w.message) for w in caught)
    assert not pipeline.resizer.stage.enabled.value and not pipeline.resizer.checked
    later = [pipeline.submit(p).result() for p in photos]
    for source, got in zip([photos[0]] + photos, [first] + later):
        assert np.array_equal(got.pixels.numpy(), transform.pixels(Image.open(source).convert("RGB")))
    drain(pipeline)
    assert used(pipeline) == 0
