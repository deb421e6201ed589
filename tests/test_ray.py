"""`idefics batch --ray` is the local mode's job on a Ray cluster: the same records line for line (every task, bad
lines, images from files, URLs and data URIs), a killed driver resumed writes each line once, and a replica that
dies is replaced and the job completes. On a local Ray of two CPUs and the embedded demo model."""
import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

import idefics
from idefics import batch, ray_batch
from idefics.cli import main
from helpers import serve

IMAGES = Path(idefics.__file__).parent / "demo" / "images"
OPTIONS = {"max_new_tokens": 3}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, logging_level="warning")
    # The replica loaders below are defined here: the workers get them by value, as they cannot import this file.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return idefics.load(None, device="cpu")


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def records(path: Path) -> dict[int, dict]:
    """Line number -> record; each line's record once."""
    done = [json.loads(line) for line in path.read_text().splitlines()]
    by_line = {r["line"]: r for r in done}
    assert len(by_line) == len(done), "a line written twice"
    return by_line


def local(model, tasks: Path, out: Path, batch_size: int = 4) -> dict[int, dict]:
    assert batch.run_file(str(tasks), out, IMAGES, OPTIONS, batch_size, lambda: model) == 0
    return records(out)


def on_ray(tasks: Path, out: Path, **kwargs) -> dict[int, dict]:
    assert ray_batch.run_file(str(tasks), out, image_root=IMAGES, options=OPTIONS, **kwargs) == 0
    return records(out)


def every_task(url: str) -> list:
    stars = "data:image/png;base64," + base64.b64encode((IMAGES / "stars.png").read_bytes()).decode()
    return [
        {"task": "caption", "image": "circle_and_square.png", "id": "first"},
        {"task": "caption", "image": "stars.png", "prompt": "This is an image of ", "id": 2},
        {"task": "ask", "image": f"{url}/triangle.png", "question": "What is it?"},
        {"task": "classify", "image": stars, "labels": ["stars", "a circle"]},
        {"task": "classify", "image": "three_shapes.png", "labels": ["stars", "a circle"], "mode": "generate"},
        {"task": "story", "image": "triangle.png", "options": {"max_new_tokens": 4}},
        {"task": "few_shot", "examples": [["stars.png", "Stars."]], "image": "triangle.png"},
        {"task": "generate", "prompt": ["User:", {"image": "three_shapes.png"}, "Describe.\nAssistant:"]},
        {"task": "caption", "image": "missing.png"},
        {"task": "caption", "image": f"{url}/gone.png"},
        {"task": "caption", "image": "stars.png", "id": "first"},
        {"task": "ask", "image": "stars.png", "question": ""},
        {"task": "classify", "image": "stars.png", "labels": []},
        {"task": "paint", "image": "stars.png"},
        "not JSON",
        {"task": "caption", "image": "stars.png", "id": 1.5},
        {"task": "caption", "image": "stars.png", "options": {"max_new_tokens": 0}},
        {"task": "caption", "image": "triangle.png", "id": "last"},
    ]


def test_results_equal_the_local_modes_line_for_line(cluster, model, tmp_path, capfd):
    with serve({"/triangle.png": ("image/png", (IMAGES / "triangle.png").read_bytes())}) as url:
        tasks = write_lines(tmp_path / "tasks.jsonl", every_task(url))
        expected = local(model, tasks, tmp_path / "local.jsonl")
        capfd.readouterr()
        got = on_ray(tasks, tmp_path / "ray.jsonl")
    assert got == expected and sorted(got) == list(range(1, 19))
    assert sum("result" in r for r in got.values()) == 9 and {r["task"] for r in got.values() if "result" in r} \
        == {"caption", "ask", "classify", "story", "few_shot", "generate"}
    err = capfd.readouterr().err
    assert all(f"idefics: {r['error']}" in err for r in got.values() if "error" in r)
    assert "idefics: batch: 9 done, 9 failed" in err
    assert on_ray(tasks, tmp_path / "ray.jsonl") == expected  # resumed: nothing left to run
    assert "all 18 lines already done" in capfd.readouterr().err


def captions(n: int) -> list[dict]:
    names = sorted(p.name for p in IMAGES.iterdir())
    return [{"task": "caption", "image": names[i % len(names)], "options": {"max_new_tokens": 12}}
            | ({"id": f"t{i}"} if i % 2 else {}) for i in range(n)]


def test_a_killed_driver_resumed_writes_each_line_exactly_once(cluster, model, tmp_path):
    n = 60
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(n)), tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "idefics", "batch", str(tasks), "-o", str(out), "--ray", cluster,
               "--batch-size", "1", "--image-root", str(IMAGES), "--max-new-tokens", "3"]
    env = {k: v for k, v in os.environ.items() if k != "IDEFICS_MODEL"}  # the demo model
    driver = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not out.exists() or out.read_bytes().count(b"\n") < 3:
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed = out.read_bytes()
    whole = killed[: killed.rfind(b"\n") + 1]
    assert 3 <= whole.count(b"\n") < n  # killed mid-run

    done = on_ray(tasks, out, batch_size=4)  # records() checks each line is there once
    assert out.read_bytes().startswith(whole)  # appended to, never rewritten
    assert sorted(done) == list(range(1, n + 1)) and all("result" in r for r in done.values())
    assert done == local(model, tasks, tmp_path / "local.jsonl")


class DiesOnce:
    """Builds a replica's model: the demo model, whose process exits the first time it is asked "crash?", as a
    replica whose machine fails. The marker file says it happened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self):
        return Crashing(idefics.load(None, device="cpu"), self.marker)


class Crashing:
    def __init__(self, m, marker: Path):
        self.m, self.marker = m, marker

    def __getattr__(self, name):
        return getattr(self.m, name)

    def ask(self, images, question, **options):
        if question == "crash?" and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return self.m.ask(images, question, **options)


def test_a_replica_that_dies_is_replaced_and_its_lines_run_elsewhere(cluster, model, tmp_path):
    lines = captions(12)
    lines[5] = {"task": "ask", "image": "stars.png", "question": "crash?", "id": "crash"}
    tasks, marker = write_lines(tmp_path / "tasks.jsonl", lines), tmp_path / "died"
    done = on_ray(tasks, tmp_path / "out.jsonl", batch_size=2, load=DiesOnce(marker))
    assert marker.exists()  # the replica died
    assert sorted(done) == list(range(1, 13)) and all("result" in r for r in done.values())
    assert done == local(model, tasks, tmp_path / "local.jsonl", batch_size=2)


def test_decoding_tasks_give_the_replicas_the_pixels_the_local_mode_sees(model, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (199, 301, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    line = batch.Line(1, json.dumps({"task": "caption", "image": "noise.png"}))
    size = ray_batch.Loader().image_size()  # the demo model's
    row = ray_batch.decode({"line": 1, "item": pickle.dumps(line)}, tmp_path, {}, size)
    job = pickle.loads(row["item"])
    assert size == 96 and isinstance(job.image, Image.Image) and job.image.size == (96, 96)
    decoded, given = (model.process([[image]])["pixel_values"] for image in (job.image, tmp_path / "noise.png"))
    assert torch.equal(decoded, given)


@pytest.mark.parametrize("flags, message", [
    (["--ray", "--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must be a number >= 0, got -1.0"),
    (["--ray", "--cpus-per-replica", "0"], "--cpus-per-replica must be a number > 0, got 0.0"),
    (["--ray", "--cpus-per-replica", "nan"], "--cpus-per-replica must be a number > 0, got nan"),
    (["--ray", "--replicas", "two"], "invalid int value: 'two'"),
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--gpus-per-replica", "1"], "--gpus-per-replica needs --ray"),
])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(2)), tmp_path / "out.jsonl"
    assert main(["batch", str(tasks), "-o", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err and not out.exists()


def test_a_replica_that_cannot_load_its_model_fails_the_job_in_one_line(cluster, tmp_path, capsys):
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(2)), tmp_path / "out.jsonl"
    assert main(["batch", str(tasks), "-o", str(out), "--ray", "--model", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("idefics: error: a replica failed: ") and "nothing" in err


def test_a_local_ray_too_small_for_the_pool_is_refused(cluster):
    with pytest.raises(idefics.IdeficsError, match="2 replicas of 1 CPUs need 2 CPUs, and images one more; this "
                                                   "machine has 2"):
        ray_batch.size_pool(ray, True, 2, None, None)
    with pytest.raises(idefics.IdeficsError, match="1 replicas of 1 GPUs need 1 GPUs; this machine has 0"):
        ray_batch.size_pool(ray, True, None, 1, None)
    assert ray_batch.size_pool(ray, True, None, None, None) == ray_batch.Pool(1, 0, 1)
