"""The parallel input pipeline: pixel values equal transformers' processor bit for bit whatever the number of
workers; each prompt, prepared alone, equals its row of the batch; a bad image in a list fails only its item; a
prompt of 12 large photos stays under 1 GB; the fast JPEG path stays close to the exact one."""
import io
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_processor_dir, reference_processor
from PIL import Image
from transformers.image_utils import load_image as reference_load_image

import idefics
from idefics import api
from idefics.encoder import ImageEncoder
from idefics.engine import split_batch
from idefics.errors import IdeficsError, ItemErrors
from idefics.images import ImageTransform
from idefics.pipeline import ImagePipeline, prepare
from idefics.processor import Processor

DEMO_IMAGES = Path(idefics.__file__).parent / "demo" / "images"


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 that looks like a photo to a JPEG encoder: smooth colour fields plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6, 3)
    image = np.stack([128 + 100 * np.sin(x / (width / 5) + p) * np.cos(y / (height / 4) - p) for p in phase], -1)
    image += rng.normal(0, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(array: np.ndarray, orientation: int | None = None, quality: int = 88) -> bytes:
    image = Image.fromarray(array)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # EXIF Orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Photos as JPEG (one EXIF-rotated), a PNG with alpha, a palette GIF, a grayscale PNG."""
    root = tmp_path_factory.mktemp("pipeline")
    made = {
        "a.jpg": jpeg(photo(320, 213, 1)),
        "b.jpg": jpeg(photo(200, 300, 2), orientation=6),
        "c.jpg": jpeg(photo(640, 427, 3), quality=70),
    }
    for name, mode, fmt in (("d.png", "RGBA", "PNG"), ("e.gif", "P", "GIF"), ("f.png", "L", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(photo(90, 60, len(made))).convert(mode).save(buf, fmt)
        made[name] = buf.getvalue()
    for name, data in made.items():
        (root / name).write_bytes(data)
    return [root / name for name in made]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    return make_processor_dir(tmp_path_factory.mktemp("proc"), image_size=224)


@pytest.mark.parametrize("workers", [1, 4])
def test_pixel_values_equal_the_reference_processors(files, processor_dir, workers):
    ours = Processor.from_dir(processor_dir, workers=workers)
    ref = reference_processor(processor_dir)
    prompts = [[f, "This is an image of "] for f in files] + [["Two:", files[0], files[1], "and", files[3]]]
    got = ours(prompts)
    loaded = [[reference_load_image(str(x)) if isinstance(x, Path) else x for x in p] for p in prompts]
    expected = ref(text=loaded)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_attention_mask"):
        assert torch.equal(got[key], expected[key]), key


def test_a_prompt_prepared_alone_equals_its_row_of_the_batch(files, processor_dir):
    p = Processor.from_dir(processor_dir, workers=3)
    prompts = [["User:", files[0], "Describe.", files[1]], [files[2]], ["no image at all"], [files[3], "x", files[4]]]
    for alone, row in zip(p.prompts(prompts), split_batch(p(prompts))):
        assert torch.equal(alone.ids, row.ids)
        assert torch.equal(alone.pixels, row.pixels)
        assert torch.equal(alone.image_mask, row.image_mask)


def test_the_table_normalizes_exactly_as_the_reference_arithmetic():
    """Every uint8 value of every channel, through the look-up, equals rescale-in-float64 then normalize."""
    t = ImageTransform(image_size=16, image_mean=(0.1, 0.5, 0.9), image_std=(0.3, 0.2, 0.7), rescale_factor=1 / 255)
    values = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(values, (16, 1))] * 3, -1))  # (16, 256, 3): each value, each channel
    x = torch.from_numpy(np.array(image.resize((16, 16), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    expected = ((x.double() * t.rescale_factor).float() - torch.tensor(t.image_mean).view(3, 1, 1)) \
        / torch.tensor(t.image_std).view(3, 1, 1)
    assert torch.equal(torch.from_numpy(t.pixels(image)), expected)
    table = t.table
    direct = ((torch.arange(256, dtype=torch.float64) * t.rescale_factor).float()
              - torch.tensor(t.image_mean)[:, None]) / torch.tensor(t.image_std)[:, None]
    assert torch.equal(torch.from_numpy(table), direct)


@pytest.fixture(scope="module")
def demo():
    return idefics.load(None, device="cpu", workers=3)


def test_a_bad_image_in_a_list_fails_only_its_item(demo, tmp_path):
    good = sorted(DEMO_IMAGES.iterdir())[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpeg(photo(64, 48))[:300])  # cut short
    images = [good[0], tmp_path / "missing.png", good[1], broken]
    with pytest.raises(ItemErrors) as info:
        demo.caption(images, max_new_tokens=3)
    e = info.value
    assert set(e.errors) == {1, 3} and "\n" not in str(e)
    assert e.errors[1].startswith("prompt 1, item 0: ") and "missing.png: no such image file" in e.errors[1]
    assert e.errors[3].startswith("prompt 3, item 0: ") and "broken.jpg" in e.errors[3]
    assert str(e) == e.errors[1] + " (2 of 4 items failed)"
    alone = [demo.caption(x, max_new_tokens=3) for x in good]
    assert e.results == [alone[0], None, alone[1], None]
    with pytest.raises(IdeficsError, match="missing.png: no such image file") as single:  # one prompt: its error
        demo.caption(tmp_path / "missing.png")
    assert not isinstance(single.value, ItemErrors)


def test_the_prompts_of_one_call_enter_the_batch_in_one_prefill(demo, monkeypatch):
    # Their images finish decoding one by one; the prompts ready first wait for the others (their images encoded
    # meanwhile) instead of each starting a prefill that reads every weight.
    some = sorted(DEMO_IMAGES.iterdir())[:4]
    alone = [demo.caption(x, max_new_tokens=3) for x in some]
    prefills, prefill = [], demo.engine.prefill_batch

    def counted(prompts, *args, **kwargs):
        prefills.append(len(prompts))
        return prefill(prompts, *args, **kwargs)

    monkeypatch.setattr(demo.engine, "prefill_batch", counted)
    demo.engine.encoder.cache.clear()
    assert demo.caption(some * 3, max_new_tokens=3) == alone * 3
    assert prefills == [12]


def test_images_ahead_of_their_prefill_are_encoded_several_at_a_time_and_once(demo, monkeypatch):
    monkeypatch.setattr(api, "AHEAD_IMAGES", 3)
    images = sorted(DEMO_IMAGES.iterdir())[:4]
    requests = demo.requests([[image, "This is"] for image in images] + [[images[0], "Here is"]])
    encoded, encode = [], demo.engine.encoder._encode
    monkeypatch.setattr(demo.engine.encoder, "_encode", lambda x: encoded.append(x.shape[0]) or encode(x))
    demo.engine.encoder.cache.clear()
    demo._ahead.extend(requests[:2])
    demo._encode_ahead()
    assert encoded == [] and list(demo._ahead) == requests[:2]  # two images wait for a third
    requests[1].finish = "abort"  # ended while waiting: dropped, not encoded
    demo._ahead.extend(requests[2:4])
    demo._encode_ahead()
    assert encoded == [3] and not demo._ahead
    requests[4].slot = 0  # admitted meanwhile: its prefill encoded it
    demo._ahead.extend(requests[:1] + requests[4:])
    demo._encode_ahead()
    assert encoded == [3] and list(demo._ahead) == requests[:1]  # the first waits on (its image is in the cache)
    demo._ahead.clear()


def test_the_workers_hash_the_images_and_the_encoder_uses_their_keys(demo, monkeypatch):
    images = sorted(DEMO_IMAGES.iterdir())[:2]
    pending, ready = demo.processor.start([images[0], "One", images[1], "two"], False), threading.Event()
    pending.when_ready(ready.set)  # (the keys come with readiness; a prompt taken before has none)
    assert ready.wait(60)
    prompt = pending.prompt()
    assert prompt.keys == tuple(ImageEncoder.key(p) for p in prompt.pixels) and len(prompt.keys) == 2
    hashed = []
    monkeypatch.setattr(ImageEncoder, "key", staticmethod(lambda p: hashed.append(p) or b""))
    demo.engine.encoder.cache.clear()
    given = demo.engine.encoder([prompt.pixels], list(prompt.keys))
    assert hashed == [] and given.shape[0] == 2
    assert torch.equal(given, demo.model.encode_images(prompt.pixels))


def test_a_prompt_too_long_fails_alone_and_generate_gives_the_others_completions(demo):
    image = sorted(DEMO_IMAGES.iterdir())[0]
    long = "a red door, a pumpkin, a ghost. " * 200
    with pytest.raises(ItemErrors) as info:
        demo.generate([[image, "This is"], [image, long], [image, "A"]], max_new_tokens=2)
    e = info.value
    assert list(e.errors) == [1] and "prompt 1 has" in e.errors[1] and "context" in e.errors[1]
    assert e.results[0] == demo.generate([[image, "This is"]], max_new_tokens=2)[0]
    assert e.results[2] == demo.generate([[image, "A"]], max_new_tokens=2)[0]


def dies_on_crash(source, *args, **kwargs):
    """pipeline.prepare, but a worker given b"crash" ends at once, as a decoder's segmentation fault or the
    out-of-memory killer would end it. (At module level: the workers are handed it by name.)"""
    if source == b"crash":
        os._exit(1)
    return prepare(source, *args, **kwargs)


def test_a_worker_process_that_dies_fails_its_image_in_one_line_and_the_next_image_gets_a_fresh_pool(monkeypatch):
    from idefics import pipeline

    monkeypatch.setattr(pipeline, "prepare", dies_on_crash)  # (before the workers are forked: theirs too)
    t = ImageTransform()
    p = ImagePipeline(t, workers=1)
    data = jpeg(photo(300, 200, 0))
    with pytest.raises(IdeficsError, match=r"^the image worker decoding it stopped \(it crashed or ran out of memory\)$"):
        p.submit(b"crash").result(60)
    got = p.submit(data).result(60)
    assert torch.equal(got.pixels, p.pixels(data)) and got.key == ImageEncoder.key(got.pixels)
    p.close()


class HeldImport:
    """A finder whose module `name`, imported by a thread other than the main one, waits for `release` before its
    code runs, holding that module's import lock as a long import does."""

    def __init__(self, name: str):
        self.name, self.entered, self.release = name, threading.Event(), threading.Event()

    def find_spec(self, name, path=None, target=None):
        if name != self.name or threading.current_thread() is threading.main_thread():
            return None  # the usual finders import it
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def held(module):
            self.entered.set()
            self.release.wait(30)
            exec_module(module)

        spec.loader.exec_module = held
        return spec


def test_workers_forked_while_another_thread_imports_a_pillow_plugin_do_not_hang(monkeypatch):
    """Image.open's first call imports Pillow's plugins. A worker forked while another thread (another request's
    PIL image, resized in a thread) is inside such an import would inherit that module's lock held, and hang on
    it in its own first Image.open; the pool is forked only once every plugin is imported."""
    import PIL

    data = jpeg(photo(300, 200, 0))  # (written first: saving it imports plugins too)
    monkeypatch.setattr(Image, "_initialized", 0)  # as in a process where no image was opened yet
    monkeypatch.delitem(sys.modules, "PIL.BmpImagePlugin", raising=False)
    monkeypatch.delattr(PIL, "BmpImagePlugin", raising=False)
    held = HeldImport("PIL.BmpImagePlugin")
    monkeypatch.setattr(sys, "meta_path", [held, *sys.meta_path])
    importer = threading.Thread(target=Image.preinit)
    importer.start()
    assert held.entered.wait(30)  # the importing thread holds the plugin's lock
    threading.Timer(0.5, held.release.set).start()
    p = ImagePipeline(ImageTransform(), workers=1)
    try:
        assert torch.equal(p.submit(data).result(30).pixels, p.pixels(data))
    finally:
        for worker in list(p._processes._processes.values()):
            worker.kill()  # a hung one too
        p.close()
        importer.join(30)


def test_the_workers_hold_none_of_the_sockets_open_when_they_were_forked():
    """A server that closes a connection must close it for good: the workers forked from it drop its sockets."""
    import socket

    if not Path("/proc/self/fd").exists():
        pytest.skip("lists descriptors in /proc")

    def sockets(pid) -> set:
        links = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                links.add(os.readlink(fd))
            except OSError:  # closed since listed
                pass
        return {link for link in links if link.startswith("socket:")}

    with socket.create_server(("127.0.0.1", 0)) as server:
        p = ImagePipeline(ImageTransform(), workers=2)
        p.submit(jpeg(photo(300, 200, 0))).result(60)
        workers = list(p._processes._processes)
        assert len(workers) == 2 and sockets(os.getpid()) >= {os.readlink(f"/proc/self/fd/{server.fileno()}")}
        assert all(not sockets(pid) for pid in workers)
    p.close()


def test_the_workers_end_when_their_process_is_killed_outright(tmp_path):
    """A job killed with SIGKILL (or by the out-of-memory killer) runs no cleanup: its workers end on their own."""
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from idefics.images import ImageTransform
        from idefics.pipeline import ImagePipeline
        p = ImagePipeline(ImageTransform(), workers=2)
        p.submit({jpeg(photo(64, 48, 0))!r}).result(60)
        print(*p._processes._processes, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(idefics.__file__).parents[1])})
    assert run.returncode == -9, run.stderr
    workers = [int(pid) for pid in run.stdout.split()]
    assert len(workers) == 2

    def alive(pid: int) -> bool:  # (an ended process nobody has reaped yet shows as a zombie, "Z")
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))


def test_bad_pipeline_settings_are_one_line_errors():
    for workers in (0, -2, 1.5, "4", True):
        with pytest.raises(IdeficsError, match="workers must be a positive integer"):
            idefics.load(None, device="cpu", workers=workers)
    with pytest.raises(IdeficsError, match=r"unknown image_decode 'turbo' \(valid: exact, fast\)"):
        idefics.load(None, device="cpu", image_decode="turbo")


def test_the_fast_path_decodes_jpegs_scaled_down_and_stays_close_to_the_exact_pixels(tmp_path):
    """1600x1067 photos: the DCT scaling (1/4 here) changes few pixel values, by little. Not exact, by design."""
    t = ImageTransform()
    exact, fast = ImagePipeline(t, workers=2), ImagePipeline(t, workers=2, decode="fast")
    sizes = []
    for seed in range(3):
        data = jpeg(photo(1600, 1067, seed))
        opened = Image.open(io.BytesIO(data))
        opened.draft(None, (224, 224))
        sizes.append(opened.size)
        a, b = exact.pixels(data), fast.pixels(data)
        diff = (a - b).abs() * torch.tensor(t.image_std).view(3, 1, 1) * 255  # in uint8 levels
        assert 0 < diff.mean() < 2.0 and diff.max() < 40, (diff.mean(), diff.max())
    assert sizes == [(400, 267)] * 3  # decoded at a quarter of the size, still >= 224 on both sides
    png = io.BytesIO()
    Image.fromarray(photo(300, 200)).save(png, "PNG")
    assert torch.equal(exact.pixels(png.getvalue()), fast.pixels(png.getvalue()))  # other formats: exact


MEMORY_SCRIPT = textwrap.dedent(r"""
    import os, re, sys, threading, time
    from pathlib import Path
    from idefics import pipeline
    from idefics.processor import Processor

    def pss(pid):  # kB; a process's share of the pages it maps: shared pages count once across the processes
        try:
            return int(re.search(r"Pss:\s*(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text()).group(1))
        except (OSError, AttributeError):
            return 0

    def job():  # this process and its image workers
        me = os.getpid()
        children = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and
                    Path(f"/proc/{d.name}/stat").exists() and _ppid(d.name) == me]
        return pss(me) + sum(pss(c) for c in children)

    def _ppid(pid):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], job())
            time.sleep(0.005)

    if sys.argv[3] == "unbounded":
        pipeline.MEMORY = 1 << 40
    p = Processor.from_dir(sys.argv[1], workers=12)
    sampler = threading.Thread(target=sample)
    sampler.start()
    out = p(["Twelve photos:"] + [Path(sys.argv[2])] * 12 + ["Describe them."])
    done.set()
    sampler.join()
    assert out["pixel_values"].shape == (1, 12, 3, 224, 224)
    print(peak[0] * 1024)
""")


def test_a_prompt_of_twelve_large_photos_stays_under_1_gb(processor_dir, tmp_path):
    """12 photos of 24 megapixels (96 MiB each once decoded, as Pillow keeps RGB in 4 bytes a pixel) on 12
    workers: the workers hold no more than the pipeline's memory budget of decoded pixels at once, and memory
    freed goes back to the system. The same run without the budget goes over 1 GB, which shows the measure can
    fail. The memory of the whole job, torch included: the process and its worker processes, each page shared
    between them counted once (the peak of their summed proportional set sizes, sampled every 5 ms)."""
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("reads the processes' memory from /proc")
    big = tmp_path / "big.jpg"
    gradient = Image.linear_gradient("L").resize((6000, 4000))
    Image.merge("RGB", [gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient]).save(big, quality=80)
    env = {"PYTHONPATH": str(Path(idefics.__file__).parent.parent)}

    def peak(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(processor_dir), str(big), mode],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    assert peak("bounded") < 1e9
    assert peak("unbounded") > 1e9
