"""Image sources (PIL image, path, http(s) URL, data URI, bytes) -> PIL images -> normalized pixel tensors."""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageOps

from idefics import fetch
from idefics.errors import IdeficsError, TooLarge, printable, reason

IDEFICS_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STD = (0.26862954, 0.26130258, 0.27577711)
ImageSource = Image.Image | str | Path | bytes | bytearray
# The formats decoded (Pillow's names; its JPEG opens a camera's multi-picture JPEG as MPO). Anything else, EPS
# above all (Pillow hands it to Ghostscript), is refused before any decoder sees it. GIF and WEBP give their
# first frame.
RASTER_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# A progressive JPEG's decoder passes over the whole image once per scan, so a small file of many scans takes
# minutes (5000 copies of one scan of a 6000 x 6000 image: 436 KB, 164 s in Pillow). Encoders write at most a few
# dozen; each start-of-scan marker (FF DA, which entropy-coded data cannot hold) counts, a thumbnail's too.
MAX_JPEG_SCANS = 100


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 << 20  # encoded size, for every source read from bytes (file, stdin, URL, data URI)
    max_pixels: int = 89_478_485  # decoded width * height; PIL's own decompression-bomb threshold
    timeout: float = 20.0  # seconds for a whole URL fetch: connecting, redirects, headers and body
    max_redirects: int = 5
    max_images: int = 256  # in one prompt

    def check_count(self, count: int, where: str = "") -> None:
        """`where` prefixes the error, e.g. "prompt 3, "."""
        if count > self.max_images:
            raise TooLarge(f"{where}{count} images in one prompt, over the limit of {self.max_images}")


def is_image_reference(text: str) -> bool:
    """Whether a prompt string names an image rather than being text: a URL as the reference processor decides it
    (no space, a scheme and a host), or a data URI. A malformed URL ("http://[::1") counts as one, so that its
    fetch says what is wrong with it."""
    if " " in text:
        return False
    if text.startswith("data:") and "," in text and not any(c.isspace() for c in text):
        return True
    try:
        parsed = urlparse(text)
    except ValueError:
        return "://" in text
    return bool(parsed.scheme and parsed.netloc)


def is_image_source(item) -> bool:
    return isinstance(item, (Image.Image, Path, bytes, bytearray))


def describe(source) -> str:
    """A short name for an image source, for error messages: one line, credentials in a URL redacted."""
    if isinstance(source, Image.Image):
        return f"PIL image {source.size[0]}x{source.size[1]}"
    if isinstance(source, (bytes, bytearray)):
        return f"image bytes ({len(source)} bytes)"
    text = str(source)
    if text.startswith("data:"):
        return f"data URI ({len(text)} chars)"
    if isinstance(source, str) and is_image_reference(source):
        return fetch.shown(text)
    text = printable(text)
    return text if len(text) <= 120 else text[:117] + "..."


def load_image(source: ImageSource, limits: ImageLimits = ImageLimits(), prepare=None) -> Image.Image:
    """A PIL image is returned as given, its pixels loaded. Anything decoded here is loaded as the reference loads
    a URL (transformers' `load_image`): EXIF orientation applied, then converted to RGB (alpha dropped).
    prepare(image), when given, sees the opened image (size and mode read from its header) before its pixels are
    decoded: to set a draft mode or to reserve memory for it."""
    if isinstance(source, Image.Image):
        return _loaded(source, describe(source))
    return decode(source_bytes(source, limits), describe(source), limits, prepare)


def source_bytes(source: str | Path | bytes | bytearray, limits: ImageLimits = ImageLimits()) -> bytes:
    """The encoded image a source names (a file's, a URL's, a data URI's bytes), refused past limits.max_bytes."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, str) and source.startswith("data:"):
        return _data_uri_bytes(source)
    if isinstance(source, str) and is_image_reference(source):
        return fetch.fetch(source, limits.max_bytes, limits.timeout, limits.max_redirects, describe(source))
    if isinstance(source, (str, Path)):
        return _read_file(source, limits)
    raise IdeficsError(f"unsupported image source of type {type(source).__name__}")


def read_stream(stream: BinaryIO, name: str, limits: ImageLimits = ImageLimits()) -> bytes:
    """A stream's bytes up to its end, refused past limits.max_bytes (an endless stream stops there)."""
    data = stream.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{name}: over the limit of {limits.max_bytes} bytes")
    return data


def _read_file(path: str | Path, limits: ImageLimits) -> bytes:
    name = describe(path)
    try:
        # Non-blocking, so that a FIFO without a writer opens at once (and is then refused) instead of hanging.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise IdeficsError(f"{name}: no such image file") from None
    except UnicodeEncodeError:
        raise IdeficsError(f"{name}: the path cannot be encoded for the file system") from None
    except ValueError:
        raise IdeficsError(f"{name}: the path contains a NUL character") from None
    except OSError as e:
        raise IdeficsError(f"{name}: cannot read image file ({e.strerror or e})") from None
    info, problem = os.fstat(fd), None
    if info.st_size > limits.max_bytes and stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TooLarge(f"{name}: file is {info.st_size} bytes, over the limit of {limits.max_bytes}")
    if stat.S_ISDIR(info.st_mode):
        problem = "cannot read image file (a directory)"
    elif not stat.S_ISREG(info.st_mode):  # a FIFO, device or socket, which may never end
        problem = "cannot read image file (not a regular file; give - to read an image from stdin)"
    if problem:
        os.close(fd)
        raise IdeficsError(f"{name}: {problem}")
    with open(fd, "rb") as f:
        try:
            return read_stream(f, name, limits)  # capped again: the file may grow while it is read
        except OSError as e:
            raise IdeficsError(f"{name}: cannot read image file ({e.strerror or e})") from None


def _data_uri_bytes(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise IdeficsError(f"{describe(uri)}: only base64 data URIs are supported")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise IdeficsError(f"{describe(uri)}: invalid base64 payload") from None


def _loaded(image: Image.Image, name: str) -> Image.Image:
    """A caller's PIL image with its pixels decoded, so that truncated data fails here, in one line. Pixels not
    decoded yet are decoded only from RASTER_FORMATS."""
    if getattr(image, "tile", None) and image.format not in (*RASTER_FORMATS, "MPO"):
        raise IdeficsError(f"{name}: {image.format} images are not decoded (accepted: {', '.join(RASTER_FORMATS)})")
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 - whatever Pillow's decoder raises on bad data
        raise IdeficsError(f"{name}: cannot decode image ({reason(e)})") from None
    return image


def decode(data: bytes, name: str, limits: ImageLimits = ImageLimits(), prepare=None) -> Image.Image:
    """Encoded bytes -> an RGB image, as load_image decodes them; `name` heads its errors."""
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{name}: image data is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit replaces PIL's warning; its hard error is still caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
            width, height = image.size  # from the header, before decoding
            if width * height > limits.max_pixels:
                raise TooLarge(
                    f"{name}: image is {width}x{height} pixels, over the limit of {limits.max_pixels}")
            if image.format in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
                raise TooLarge(f"{name}: JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS}")
            if prepare is not None:
                prepare(image)
            image.load()
            # In place, and no conversion of what is RGB already: one decoded copy of a large photo at a time, not
            # three.
            ImageOps.exif_transpose(image, in_place=True)
            return image if image.mode == "RGB" else image.convert("RGB")
    except IdeficsError:
        raise
    except Image.DecompressionBombError:
        raise IdeficsError(f"{name}: image is too large to decode safely") from None
    except Image.UnidentifiedImageError:
        raise IdeficsError(f"{name}: not an image (unrecognized format)") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data: whatever Pillow's decoders raise
        raise IdeficsError(f"{name}: cannot decode image ({reason(e)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """As the reference: any transparency is composited on white, every other mode converted to RGB."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """The reference image processor at inference (its PIL backend): RGB, bicubic resize to a square without
    crop, rescale, normalize."""
    image_size: int = 224
    image_mean: tuple[float, ...] = IDEFICS_MEAN
    image_std: tuple[float, ...] = IDEFICS_STD
    image_num_channels: int = 3
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, path: str | Path) -> ImageTransform:
        """The image processor's settings where transformers looks for them: the "image_processor" object of
        processor_config.json (transformers 5's save_pretrained), else preprocessor_config.json (the hub's
        checkpoints). Reference defaults for what they leave out, or when neither file is there."""
        path = Path(path)
        file = path / "processor_config.json"
        config = _json_object(file)
        if "image_processor" in config:
            settings, where = config["image_processor"], f"{file}: image_processor."
            if not isinstance(settings, dict):
                raise IdeficsError(f"{file}: image_processor must be a JSON object")
        else:
            file = path / "preprocessor_config.json"
            settings, where = _json_object(file), f"{file}: "
        return cls(**_transform_fields(settings, where))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """-> (N, 3, image_size, image_size) float32."""
        return torch.from_numpy(np.stack([self.pixels(im) for im in images]))

    def resized(self, image: Image.Image) -> Image.Image:
        """One image -> RGB, image_size x image_size, as the reference resizes it: PIL's bicubic resize on uint8 RGB,
        as transformers' resize() does. (Resizing the result again is a copy: the same pixels.)"""
        if image.mode != "RGB" or image.info.get("transparency") is not None:
            image = to_rgb(image)  # (converting what is RGB already would only copy it)
        return image.resize((self.image_size,) * 2, resample=Image.Resampling.BICUBIC)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image -> (3, image_size, image_size) float32."""
        x = np.asarray(self.resized(image))  # (H, W, 3) uint8
        # One look-up per pixel, in numpy: single-threaded, as many of these run side by side in the workers.
        return self.table[_CHANNELS, x.transpose(2, 0, 1)]

    @functools.cached_property
    def table(self) -> np.ndarray:
        """(3, 256) float32: every normalized value a uint8 pixel can give, per channel, computed as the reference
        computes each pixel (rescale in float64 then round to float32, normalize in float32), so a look-up is exact."""
        x = (torch.arange(256, dtype=torch.float64) * self.rescale_factor).float()
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1)
        return ((x - mean) / std).numpy()


_CHANNELS = np.arange(3).reshape(3, 1, 1)


def pixel_key(pixels: np.ndarray) -> bytes:
    """One image's (3, H, W) float32 pixels -> the key the encoder's cache knows it by. hashlib reads the buffer (C
    order) in place and lets go of the GIL."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(pixels)).cast("B"), digest_size=16).digest()


def _json_object(file: Path) -> dict:
    """A JSON object file's contents; {} when there is no such file."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IdeficsError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise IdeficsError(f"{file}: expected a JSON object")
    return config


def _transform_fields(config: dict, where: str) -> dict:
    """ImageTransform's fields from an image processor config, checked. `where` prefixes each error: the file and
    the path of the settings in it."""
    fields = {}
    size = config.get("image_size")  # as in the reference, image_size wins over size
    if size is None and config.get("size") is not None:
        square = config["size"]
        if not isinstance(square, dict) or "height" not in square or square["height"] != square.get("width"):
            raise IdeficsError(f"{where}size must be a square {{height, width}}, got {square!r}")
        size = square["height"]
    if size is not None:
        fields["image_size"] = _positive(size, f"{where}image_size", integer=True)
    if (channels := config.get("image_num_channels")) is not None:
        if channels != 3 or isinstance(channels, bool):
            raise IdeficsError(f"{where}image_num_channels must be 3 (images are RGB), got {channels!r}")
    if (factor := config.get("rescale_factor")) is not None:
        fields["rescale_factor"] = _positive(factor, f"{where}rescale_factor")
    for name, positive in (("image_mean", False), ("image_std", True)):
        if (value := config.get(name)) is not None:
            fields[name] = _per_channel(value, f"{where}{name}", positive)
    return fields


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and bool(np.isfinite(value)))


def _positive(value, name: str, integer: bool = False):
    if not _is_number(value) or value <= 0 or (integer and not isinstance(value, int)):
        kind = "a positive integer" if integer else "a positive number"
        raise IdeficsError(f"{name} must be {kind}, got {value!r}")
    return value


def _per_channel(value, name: str, positive: bool) -> tuple[float, ...]:
    """One number for all three channels, or a list of three (the reference accepts both)."""
    values = [value] * 3 if _is_number(value) else value
    kind = "positive numbers" if positive else "numbers"
    if (not isinstance(values, list) or len(values) != 3 or not all(_is_number(v) for v in values)
            or (positive and min(values) <= 0)):
        raise IdeficsError(f"{name} must be a number or a list of 3 {kind}, got {value!r}")
    return tuple(float(v) for v in values)
