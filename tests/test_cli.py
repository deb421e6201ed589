"""The `idefics` command on a tiny checkpoint: every subcommand runs, --json parses, batches resume and report bad
lines, and user errors end with one line on stderr and a non-zero status."""
import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from checkpoints import make_checkpoint
from PIL import Image

from idefics.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path, _ = make_checkpoint(root / "model", instruct=True)
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (40, 30)), ("b.jpg", (64, 20))]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    return root, str(path)


@pytest.fixture
def run(files, capsys, monkeypatch):
    """run(*args, stdin="") -> (status, stdout, stderr), in this process, from the files' directory."""
    root, model = files
    monkeypatch.chdir(root)

    def call(*args, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        status = main([*args, "--model", model])
        out, err = capsys.readouterr()
        return status, out, err

    return call


def json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("args", [
    ["caption", "a.png"],
    ["caption", "a.png", "b.jpg", "--prompt", "This is an image of ", "--max-new-tokens", "4"],
    ["ask", "a.png", "-q", "Where are these people and what's the weather like?", "--max-new-tokens", "4"],
    ["classify", "a.png", "--labels", "animals", "vegetables", "--mode", "generate"],
    ["story", "a.png", "--max-new-tokens", "8"],
    ["story", "a.png", "--num-beams", "1", "--max-new-tokens", "8", "--do-sample", "--seed", "1", "--top-k", "5"],
    ["few-shot", "b.jpg", "--example", "a.png", "An image of noise.", "--max-new-tokens", "4"],
])
def test_task_commands_print_one_result_per_image(run, args):
    status, out, err = run(*args)
    assert status == 0, err
    images = [a for a in args[1:3] if a.endswith((".png", ".jpg"))]
    assert len(out.splitlines()) >= len(images)
    status, out, _ = run(*args, "--json")
    records = json_lines(out)
    assert status == 0 and [r["image"] for r in records] == images
    assert all(isinstance(r["result"], str) for r in records)


def test_ranked_classification_lists_every_label_with_its_probability(run):
    status, out, _ = run("classify", "a.png", "b.jpg", "--labels", "animals", "city landscape", "cars", "--json")
    assert status == 0
    for record in json_lines(out):
        assert sorted(r["label"] for r in record["result"]) == ["animals", "cars", "city landscape"]
        assert sum(r["probability"] for r in record["result"]) == pytest.approx(1.0)
    status, out, _ = run("classify", "a.png", "--labels", "animals", "cars")
    assert status == 0 and "animals" in out and "cars" in out


def test_generate_keeps_the_order_of_text_and_image_items(run):
    status, out, _ = run("generate", "-t", "User:", "-i", "a.png", "-t", "Describe this image.\nAssistant:",
                         "--max-new-tokens", "3", "--json")
    [record] = json_lines(out)
    assert status == 0 and record["finish_reason"] in ("stop", "length") and record["tokens"] <= 3
    status, streamed, _ = run("generate", "-i", "a.png", "-t", "This is an image of", "--max-new-tokens", "3")
    status2, out, _ = run("generate", "-i", "a.png", "-t", "This is an image of", "--max-new-tokens", "3", "--json")
    assert status == status2 == 0 and streamed.rstrip("\n") == json_lines(out)[0]["text"]


def test_chat_takes_images_by_command_and_by_path_and_resets(run):
    stdin = "What is in a.png ?\n/image b.jpg\nAnd who is that?\n/reset\nHello\n/quit\nnot read\n"
    status, out, err = run("chat", "--max-new-tokens", "3", "--json", stdin=stdin)
    assert status == 0, err
    assert len(json_lines(out)) == 3 and all(isinstance(r["reply"], str) for r in json_lines(out))
    status, out, _ = run("chat", "--max-new-tokens", "3", stdin="Hi\n")
    assert status == 0 and out.startswith("Assistant: ")


def test_chat_reports_a_bad_command_and_goes_on(run):
    status, out, err = run("chat", "--max-new-tokens", "2", "--json", stdin="/image missing.png\n/dance\nHi\n")
    assert status == 0 and len(json_lines(out)) == 1
    assert len(err.splitlines()) == 2 and "missing.png" in err and "/dance" in err


def test_info_summarizes_the_model(run):
    status, out, _ = run("info", "--json")
    info = json.loads(out)
    assert status == 0 and info["parameters"] > 0 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["instruct"] is True and info["cross_attention_blocks"] == 2
    status, out, _ = run("info")
    assert status == 0 and "parameters" in out


def test_demo_calls_the_demo_package(monkeypatch, capsys):
    called = []
    monkeypatch.setitem(sys.modules, "idefics.demo", types.SimpleNamespace(run=lambda: called.append(1) or 0))
    assert main(["demo"]) == 0 and called == [1]
    monkeypatch.setitem(sys.modules, "idefics.demo", None)  # not installed
    assert main(["demo"]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 1


JOBS = [
    {"task": "caption", "image": "a.png"},
    {"task": "caption", "image": "b.jpg", "id": "second", "prompt": "This is an image of "},
    "this line is not JSON",
    {"task": "ask", "image": "a.png", "question": "What is it?"},
    "",
    {"task": "classify", "image": "a.png", "labels": ["animals", "cars"]},
    {"task": "classify", "image": "a.png", "labels": ["animals", "cars"], "mode": "generate"},
    {"task": "caption", "image": "missing.png"},
    {"task": "generate", "prompt": [{"image": "a.png"}, "This is"], "options": {"max_new_tokens": 2}},
    {"task": "few_shot", "examples": [["a.png", "Noise."]], "image": "b.jpg"},
    {"task": "story", "image": "a.png", "options": {"num_beams": 1}},
    {"task": "paint", "image": "a.png"},
]


def write_jobs(path):
    path.write_text("\n".join(j if isinstance(j, str) else json.dumps(j) for j in JOBS) + "\n")


def test_batch_runs_every_line_and_reports_bad_ones(run, files):
    root, _ = files
    write_jobs(root / "jobs.jsonl")
    (root / "out.jsonl").unlink(missing_ok=True)
    status, _, err = run("batch", "jobs.jsonl", "-o", "out.jsonl", "--max-new-tokens", "3", "--window", "4",
                         "--max-batch", "2")
    assert status == 0
    records = json_lines((root / "out.jsonl").read_text())
    assert sorted(r["line"] for r in records) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]  # line 5 is blank
    by_line = {r["line"]: r for r in records}
    assert by_line[2]["id"] == "second" and isinstance(by_line[2]["result"], str)
    assert {r["label"] for r in by_line[6]["result"]} == {"animals", "cars"}
    failed = {n for n, r in by_line.items() if "error" in r}
    assert failed == {3, 8, 12}
    for n in failed:
        assert by_line[n]["error"].startswith(f"line {n}: ") and f"line {n}:" in err
    assert "missing.png" in by_line[8]["error"] and "paint" in by_line[12]["error"]


def test_batch_resumes_a_partial_output(run, files):
    root, _ = files
    write_jobs(root / "jobs.jsonl")
    out = root / "resumed.jsonl"
    out.unlink(missing_ok=True)
    assert run("batch", "jobs.jsonl", "-o", str(out), "--max-new-tokens", "3")[0] == 0
    full = out.read_text().splitlines()
    # Killed while writing the third record; the second record's id marks it done even under another line.
    out.write_text("\n".join(full[:2]) + "\n" + full[2][:10])
    status, _, _ = run("batch", "jobs.jsonl", "-o", str(out), "--max-new-tokens", "3")
    lines = out.read_text().splitlines()
    assert status == 0 and lines[:2] == full[:2]
    assert sorted(json.loads(x)["line"] for x in lines) == sorted(json.loads(x)["line"] for x in full)
    status, _, err = run("batch", "jobs.jsonl", "-o", str(out))
    assert status == 0 and "already done" in err and out.read_text().splitlines() == lines


@pytest.mark.parametrize("args, message", [
    (["caption", "missing.png"], "missing.png: no such image file"),
    (["classify", "a.png", "--labels"], "no labels"),
    (["caption", "a.png", "--max-new-tokens", "0"], "max_new_tokens"),
    (["caption"], "required"),
    (["ask", "a.png"], "--question"),
    (["classify", "a.png", "--labels", "a", "b", "--max-new-tokens", "3"], "--mode rank"),
    (["generate"], "empty prompt"),
    (["frobnicate"], "invalid choice"),
    (["batch", "nothing.jsonl", "-o", "out.jsonl"], "nothing.jsonl"),
    (["info", "--device", "tpu9"], "device"),
    (["caption", "/dev/zero"], "/dev/zero: cannot read image file (not a regular file; give - to read an image from stdin)"),
    (["caption", "pic\ud800.png"], "pic\\ud800.png: the path cannot be encoded for the file system"),
    (["caption", "http://user:secret@127.0.0.1:abc/x.png"], "http://***@127.0.0.1:abc/x.png: invalid URL (Port"),
])
def test_user_errors_exit_non_zero_with_one_line(run, args, message):
    status, out, err = run(*args)
    assert status != 0 and out == ""
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_python_dash_m_idefics_runs_with_an_image_on_stdin(files):
    root, model = files
    result = subprocess.run([sys.executable, "-m", "idefics", "caption", "-", "--json", "--max-new-tokens", "3",
                             "--model", model], input=(root / "a.png").read_bytes(), capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["image"] == "-"
    result = subprocess.run([sys.executable, "-m", "idefics", "caption", str(root / "missing.png"), "--model", model],
                            capture_output=True, timeout=300)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1


def test_endless_stdin_stops_at_the_byte_limit(files):
    root, model = files
    with open("/dev/zero", "rb") as endless:
        result = subprocess.run([sys.executable, "-m", "idefics", "caption", "-", "--model", model], stdin=endless,
                                capture_output=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.decode() == "idefics: error: stdin: over the limit of 67108864 bytes\n"
