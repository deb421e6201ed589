"""Image sources, their errors, and pixel parity of the transform with transformers' IdeficsImageProcessor."""
import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_image_processor_config, make_processor_dir, redirect, serve
from PIL import Image
from transformers import IdeficsImageProcessorPil
from transformers.image_utils import load_image as reference_load_image

from idefics.errors import IdeficsError
from idefics.fetch import fetch
from idefics.images import IDEFICS_MEAN, MAX_JPEG_SCANS, ImageLimits, ImageTransform, is_image_reference, load_image, \
    read_stream
from idefics.processor import Processor


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


def many_scans(scans: int) -> bytes:
    """A progressive JPEG whose last scan (a refinement) is repeated until the file holds `scans` scans: valid
    for Pillow's decoder, which passes over the whole image once per scan."""
    data = encoded(noise("RGB", (64, 48)), "JPEG", progressive=True)
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    have = data.count(b"\xff\xda")
    return data[:end] + data[last:end] * (scans - have) + data[end:]


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    """5000 scans of a 6000 x 6000 JPEG (436 KB) took 164 s to decode: over MAX_JPEG_SCANS the file is refused
    from its markers; up to it, it decodes."""
    assert load_image(many_scans(MAX_JPEG_SCANS)).size == (64, 48)
    data = many_scans(MAX_JPEG_SCANS + 1)
    assert error_of(data) == f"image bytes ({len(data)} bytes): JPEG of 101 scans, over the limit of 100"


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


# Formats: an allow-list of raster formats, so that no other decoder (Ghostscript for EPS) sees the user's bytes.

def eps_file() -> bytes:
    """A real EPS file, as Pillow writes one; Pillow opens it with its EPS plugin, which runs Ghostscript."""
    data = encoded(noise("RGB", (8, 6)), "EPS")
    assert data.startswith(b"%!PS-Adobe") and Image.open(io.BytesIO(data)).format == "EPS"
    return data


def test_eps_never_reaches_a_decoder(tmp_path):
    data = eps_file()
    assert error_of(data) == f"image bytes ({len(data)} bytes): not an image (unrecognized format)"
    (tmp_path / "figure.eps").write_bytes(data)
    assert error_of(tmp_path / "figure.eps") == f"{tmp_path / 'figure.eps'}: not an image (unrecognized format)"
    uri = "data:application/postscript;base64," + base64.b64encode(data).decode()
    assert error_of(uri).endswith(": not an image (unrecognized format)")
    with serve({"/figure.png": ("image/png", data)}) as base:
        assert error_of(base + "/figure.png") == f"{base}/figure.png: not an image (unrecognized format)"
    opened = Image.open(io.BytesIO(data))  # a caller's lazily opened EPS: its pixels are not decoded here either
    assert error_of(opened) == "PIL image 8x6: EPS images are not decoded (accepted: PNG, JPEG, GIF, WEBP, BMP, TIFF)"


def test_raster_formats_outside_the_list_are_refused():
    for fmt in ("PPM", "ICO", "TGA"):
        assert error_of(encoded(noise("RGB"), fmt)).endswith("not an image (unrecognized format)"), fmt


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF", "MPO"])
def test_accepted_formats_load_as_the_reference_loads_them(fmt):
    options = {"save_all": True, "append_images": [noise("RGB", seed=1)]} if fmt in ("GIF", "WEBP", "MPO") else {}
    data = encoded(noise("RGB"), fmt, **options)  # GIF, WEBP, MPO: two frames, the first is used
    expected = np.asarray(reference_load_image(Image.open(io.BytesIO(data))))
    assert np.array_equal(np.asarray(load_image(data)), expected)
    if fmt in ("GIF", "WEBP"):
        first = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.asarray(load_image(data)), first)


def test_truncated_png_opened_by_the_caller_is_one_line():
    opened = Image.open(io.BytesIO(encoded(noise("RGB", (64, 64)))[:300]))  # the header reads, the pixels do not
    message = error_of(opened)
    assert message.startswith("PIL image 64x64: cannot decode image (") and "truncated" in message
    assert "\n" not in message


def test_a_caller_image_is_decoded_once_and_kept():
    opened = Image.open(io.BytesIO(encoded(noise("RGB"), "PNG")))
    assert load_image(opened) is opened and not opened.tile  # tile empties once the pixels are decoded


# Paths: regular files only, read with the byte cap; a bad path is one line.

NOT_REGULAR = "cannot read image file (not a regular file; give - to read an image from stdin)"

def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = {}
    reader = threading.Thread(target=lambda: result.update(message=error_of(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():
        with open(fifo, "wb"):  # lets the blocked open go on, so the thread ends
            pass
        pytest.fail("reading a FIFO hung")
    assert result["message"] == f"{fifo}: {NOT_REGULAR}"


def test_endless_device_is_refused_before_reading():
    assert error_of("/dev/zero") == f"/dev/zero: {NOT_REGULAR}"


def test_an_endless_stream_stops_at_the_byte_cap():
    with open("/dev/zero", "rb") as endless:
        assert read_stream(io.BytesIO(b"abc"), "x") == b"abc"
        with pytest.raises(IdeficsError) as info:
            read_stream(endless, "stdin", ImageLimits(max_bytes=1000))
    assert str(info.value) == "stdin: over the limit of 1000 bytes"


def test_nul_and_unencodable_paths_are_one_line(tmp_path):
    assert error_of("pic\x00.png") == "pic\\x00.png: the path contains a NUL character"
    assert error_of(Path("pic\x00.png")) == "pic\\x00.png: the path contains a NUL character"
    message = error_of("pic\ud800.png")  # a lone surrogate that no file name on this system can hold
    assert message == "pic\\ud800.png: the path cannot be encoded for the file system"
    message.encode("utf-8")  # printable as it is
    assert error_of("line\nbreak.png") == "line\\nbreak.png: no such image file"


def test_undecodable_file_names_still_load(tmp_path):
    """A file name that is not UTF-8 reaches Python (sys.argv, os.listdir) with surrogate escapes: it opens."""
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(encoded(noise("RGB")))
    assert load_image(os.path.join(tmp_path, "caf\udce9.png")).size == (37, 23)
    missing = error_of(os.path.join(tmp_path, "gone\udce9.png"))
    assert missing.endswith("gone\\udce9.png: no such image file")
    missing.encode("utf-8")


# URLs: every redirect checked and counted, credentials redacted, one deadline for the whole fetch.

def test_redirects_are_followed_checked_and_counted():
    png = encoded(noise("RGB"))
    routes = {"/img": ("image/png", png), "/to-img": redirect("/img", 301), "/loop": redirect("/loop"),
              "/to-ftp": redirect("ftp://example.com/x.png"), "/to-file": redirect("file:///etc/passwd", 307),
              "/to-bad-port": redirect("http://127.0.0.1:abc/x.png")}
    for i in range(3):
        routes[f"/chain{i}"] = redirect(f"/chain{i + 1}" if i < 2 else "/img")
    with serve(routes) as base:
        assert load_image(base + "/to-img").size == (37, 23)
        assert load_image(base + "/chain0").size == (37, 23)  # 3 redirects
        assert error_of(base + "/chain0", max_redirects=2) == f"{base}/chain0: more than 2 redirects"
        assert error_of(base + "/loop") == f"{base}/loop: more than 5 redirects"
        assert error_of(base + "/to-ftp") == (
            f"{base}/to-ftp: redirect to ftp://example.com/x.png: only http(s) URLs can be fetched")
        assert error_of(base + "/to-file") == (
            f"{base}/to-file: redirect to file:///etc/passwd: only http(s) URLs can be fetched")
        assert error_of(base + "/to-bad-port").startswith(
            f"{base}/to-bad-port: redirect to http://127.0.0.1:abc/x.png: invalid URL (Port")


def echo_authorization(handler):
    body = (handler.headers.get("Authorization") or "none").encode()
    handler.send_response(200 if body != b"none" else 401)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_credentials_are_sent_to_their_host_only_and_never_shown():
    with serve({"/auth": echo_authorization, "/to-auth": redirect("/auth")}) as base:
        with_credentials = base.replace("http://", "http://alice:s%40cret@")
        expected = "Basic " + base64.b64encode(b"alice:s@cret").decode()
        assert fetch(with_credentials + "/auth", 1000, 5.0, 5) == expected.encode()
        message = error_of(with_credentials + "/to-auth")  # the redirect's target gets no credentials
        assert message == base.replace("http://", "http://***@") + "/to-auth: HTTP 401 Unauthorized"
        message = error_of(with_credentials + "/auth")  # the answer is no image
        assert "cret" not in message and "alice" not in message and message.endswith("(unrecognized format)")
    assert "cret" not in error_of("http://alice:secret@127.0.0.1:abc/x.png")
    assert "cret" not in error_of("ftp://alice:secret@example.com/x.png")


def drip(before_body: bool, count: int = 100, pause: float = 0.02):
    """An answer that sends one byte every `pause` seconds: in a header line, or in the body."""
    def answer(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n")
        if before_body:
            handler.wfile.write(b"X-Slow: ")
        else:
            handler.wfile.write(b"Content-Length: %d\r\n\r\n" % count)
        for _ in range(count):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(pause)
    return answer


@pytest.mark.parametrize("before_body", [True, False], ids=["headers", "body"])
def test_a_slow_drip_is_cut_at_the_timeout(before_body):
    # 100 bytes at one per 20 ms: each read is quick, the whole answer takes 2 s
    with serve({"/slow": drip(before_body)}) as base:
        start = time.monotonic()
        message = error_of(base + "/slow", timeout=0.5)
        elapsed = time.monotonic() - start
    assert message == f"{base}/slow: timed out after 0.5 s"
    assert 0.45 < elapsed < 1.2


def test_a_slow_tls_handshake_is_cut_at_the_timeout():
    """A server that answers a TLS hello with a record header promising 16 kB, then one byte every 20 ms."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drip_record():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)  # the client's hello
            try:
                connection.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16384 bytes
                for _ in range(100):
                    connection.sendall(b"\x00")
                    time.sleep(0.02)
            except OSError:
                pass  # the client gave up, as intended

    server = threading.Thread(target=drip_record, daemon=True)
    server.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/x.png"
    start = time.monotonic()
    message = error_of(url, timeout=0.5)
    elapsed = time.monotonic() - start
    server.join(timeout=5)
    listener.close()
    assert message == f"{url}: timed out after 0.5 s"
    assert 0.45 < elapsed < 1.2


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:abc/x.png", "invalid URL (Port could not be cast to integer value as 'abc')"),
    ("http://127.0.0.1:99999/x.png", "invalid URL (Port out of range 0-65535)"),
    ("http://[::1/x.png", "invalid URL (Invalid IPv6 URL)"),
    ("http://[::zz]/x.png", "invalid URL ('::zz' does not appear to be an IPv4 or IPv6 address)"),
    ("http://" + "a" * 64 + ".example.com/x.png", "invalid host name (a label is empty or longer than 63 characters)"),
    ("http://a..b/x.png", "invalid host name (a label is empty or longer than 63 characters)"),
    ("http://" + "abcdefgh." * 30 + "com/x.png", "invalid host name (longer than 253 characters)"),
    ("http://example.com/a\x01b.png", "invalid URL (control characters)"),
    ("http://example.com/a\x7fb.png", "invalid URL (control characters)"),
    ("http://:80/x.png", "invalid URL (no host)"),
])
def test_malformed_urls_are_one_line(url, message):
    assert is_image_reference(url)  # a prompt item, so the processor fetches it and says what is wrong
    error = error_of(url)
    assert error.endswith(": " + message) and "\n" not in error
    error.encode("utf-8")


def test_non_ascii_url_paths_are_percent_encoded():
    with serve({"/caf%C3%A9%20noir.png": ("image/png", encoded(noise("RGB")))}) as base:
        assert load_image(base + "/café%20noir.png").size == (37, 23)


def test_a_large_answer_stops_at_the_byte_cap():
    def endless(handler):  # no Content-Length: the cap applies while reading
        handler.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n")
        for _ in range(1000):
            handler.wfile.write(b"\0" * 65536)
    with serve({"/endless": endless}) as base:
        assert error_of(base + "/endless", max_bytes=100_000) == (
            f"{base}/endless: response is over the limit of 100000 bytes")


def test_an_answer_shorter_than_its_length_is_an_error():
    def short(handler):
        handler.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    with serve({"/short": short}) as base:
        assert error_of(base + "/short") == f"{base}/short: the answer ended after 10 of its 1000 bytes"


# Prompts: a limit on their number of images, checked before any is loaded.

def test_images_per_prompt_are_limited(tmp_path):
    processor = Processor.from_dir(make_processor_dir(tmp_path), ImageLimits(max_images=3))
    image = noise("RGB")
    assert processor(["a", image, image, image])["pixel_values"].shape[1] == 3
    with pytest.raises(IdeficsError) as info:
        processor([["a", image], ["b"] + [tmp_path / "never-read.png"] * 4])
    assert str(info.value) == "prompt 1, 4 images in one prompt, over the limit of 3"
    assert ImageLimits().max_images == 256
