"""Image sources, their errors, and pixel parity of the transform with transformers' IdeficsImageProcessor."""
import base64
import io

import numpy as np
import pytest
import torch
from helpers import make_image_processor_config, serve
from PIL import Image
from transformers import IdeficsImageProcessorPil
from transformers.image_utils import load_image as reference_load_image

from idefics.errors import IdeficsError
from idefics.images import IDEFICS_MEAN, ImageLimits, ImageTransform, is_image_reference, load_image


def noise(mode: str, size=(37, 23), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


def palette_with_transparency() -> Image.Image:
    image = noise("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return image


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says: rotate 90 degrees to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(noise("RGB", (40, 20)), "JPEG", exif=exif)


IMAGES = {
    "RGB": noise("RGB"),
    "RGBA": noise("RGBA"),
    "LA": noise("LA"),
    "L": noise("L"),
    "1": noise("1"),
    "P": noise("RGB").convert("P"),
    "P+transparency": palette_with_transparency(),
    "CMYK": noise("CMYK"),
    "upscaled": noise("RGB", (9, 5)),
    "downscaled": noise("RGBA", (211, 97)),
}


@pytest.mark.parametrize("name", IMAGES)
def test_transform_matches_reference_pixels(name):
    image = IMAGES[name]
    ours = ImageTransform(image_size=30)([image])
    ref = IdeficsImageProcessorPil(image_size=30)([image], return_tensors="pt")
    assert ours.shape == (1, 3, 30, 30) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    x = ImageTransform(image_size=8)([clear])
    white = (1 - torch.tensor(IDEFICS_MEAN)) / torch.tensor(ImageTransform().image_std)
    assert torch.allclose(x[0, :, 0, 0], white)


def test_transform_from_preprocessor_config(tmp_path):
    make_image_processor_config(tmp_path, image_size=48)
    transform = ImageTransform.from_dir(tmp_path)
    assert transform == ImageTransform(image_size=48)
    assert ImageTransform.from_dir(tmp_path / "absent") == ImageTransform()  # reference defaults: 224, CLIP stats


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    out = {"rgba.png": encoded(IMAGES["RGBA"]), "rotated.jpg": rotated_jpeg(), "gray.png": encoded(IMAGES["L"])}
    for name, data in out.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", ["rgba.png", "rotated.jpg", "gray.png"])
def test_sources_load_as_the_reference_loads_them(files, name):
    path = files / name
    data = path.read_bytes()
    expected = np.asarray(reference_load_image(str(path)))  # EXIF applied, RGB
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, str(path), data, bytearray(data), uri):
        assert np.array_equal(np.asarray(load_image(source)), expected), type(source)
    with serve({"/img": ("image/png", data)}) as base:
        assert np.array_equal(np.asarray(load_image(base + "/img")), np.asarray(reference_load_image(base + "/img")))


def test_exif_orientation_is_applied(files):
    assert load_image(files / "rotated.jpg").size == (20, 40)


def test_pil_image_is_returned_as_given():
    image = IMAGES["RGBA"]
    assert load_image(image) is image


def test_image_references():
    assert is_image_reference("https://example.com/a.jpg?x=1&y=2")
    assert is_image_reference("data:image/png;base64,iVBORw0KGgo=")
    for text in ["User:", "Describe this image.\nAssistant:", "see https://example.com", "data: a table",
                 "/tmp/picture.png", "Answer:"]:
        assert not is_image_reference(text), text


def error_of(source, **limits) -> str:
    with pytest.raises(IdeficsError) as info:
        load_image(source, ImageLimits(**limits))
    return str(info.value)


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.png") == f"{tmp_path / 'nope.png'}: no such image file"


def test_directory_is_unreadable(tmp_path):
    assert "cannot read image file" in error_of(tmp_path)


def test_non_image_file(tmp_path):
    (tmp_path / "notes.txt").write_text("just text")
    assert error_of(tmp_path / "notes.txt") == f"{tmp_path / 'notes.txt'}: not an image (unrecognized format)"


def test_truncated_image():
    assert "cannot decode image" in error_of(encoded(IMAGES["RGB"])[:80])


def test_bad_base64_data_uri():
    assert error_of("data:image/png;base64,@@not-base64@@") == "data URI (36 chars): invalid base64 payload"


def test_non_base64_data_uri():
    assert "only base64 data URIs" in error_of("data:image/png,rawbytes")


def test_byte_limit(files):
    assert "over the limit of 100" in error_of(files / "rgba.png", max_bytes=100)
    assert "over the limit of 100" in error_of((files / "rgba.png").read_bytes(), max_bytes=100)


def test_pixel_limit():
    message = error_of(encoded(noise("RGB", (50, 40))), max_pixels=1999)
    assert message == "image bytes (%d bytes): image is 50x40 pixels, over the limit of 1999" % len(
        encoded(noise("RGB", (50, 40))))


def test_decompression_bomb_is_our_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice this
    assert "too large to decode safely" in error_of(encoded(noise("RGB", (50, 40))))


def test_url_errors():
    with serve({"/page": ("text/html", b"<html>hello</html>"), "/big": ("image/png", encoded(IMAGES["RGB"]))}) as base:
        assert error_of(base + "/page") == f"{base}/page: not an image (unrecognized format)"
        assert error_of(base + "/missing") == f"{base}/missing: HTTP 404 Not Found"
        assert "over the limit of 10" in error_of(base + "/big", max_bytes=10)
    with serve({"/slow": ("image/png", encoded(IMAGES["RGB"]))}, delay=1.0) as base:
        assert "timed out" in error_of(base + "/slow", timeout=0.2)


def test_unreachable_url_and_unsupported_scheme():
    with serve({}) as base:
        closed = base  # the server is shut down below, so its port refuses connections
    assert "cannot fetch" in error_of(closed + "/x.png")
    assert error_of("ftp://example.com/x.png") == "ftp://example.com/x.png: only http(s) URLs can be fetched"
