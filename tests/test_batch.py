"""`idefics batch` keeps every line: a killed run resumes with each line done exactly once, the output is only
appended to and stays valid UTF-8 JSONL, ids are unique, the input is never the output, and a bad line fails
alone with one sentence. On the embedded demo model."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import idefics
from idefics.batch import run_file
from idefics.cli import main

IMAGES = Path(idefics.__file__).parent / "demo" / "images"
NAMES = sorted(p.name for p in IMAGES.iterdir())


@pytest.fixture(scope="module")
def model():
    return idefics.load(None, device="cpu")


def write_lines(path: Path, lines: list) -> Path:
    """Lines given as objects are written as JSON (in ASCII), strings as UTF-8 text, bytes as they are."""
    def raw(line):
        return line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
    path.write_bytes(b"".join(raw(line) + b"\n" for line in lines))
    return path


def captions(n: int) -> list[dict]:
    """n caption lines over the demo images; odd lines have ids, even ones are known by their number."""
    return [{"task": "caption", "image": NAMES[i % len(NAMES)]} | ({"id": f"t{i}"} if i % 2 == 0 else {})
            for i in range(n)]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


def batch(m, tasks: Path, out: Path, window: int = 4) -> int:
    return run_file(str(tasks), out, IMAGES, {"max_new_tokens": 2}, window, lambda: m)


@pytest.mark.parametrize("window", [1, 4])
def test_a_killed_run_resumes_with_every_line_done_exactly_once(model, tmp_path, window):
    """SIGKILL while lines are in flight (window 4: several lines share the running batch, records come in the
    order lines end), then resume."""
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(12)), tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "idefics", "batch", str(tasks), "-o", str(out), "--device", "cpu",
               "--window", str(window), "--workers", "2", "--max-new-tokens", "2", "--image-root", str(IMAGES)]
    env = {k: v for k, v in os.environ.items() if k != "IDEFICS_MODEL"}  # the demo model
    run = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not out.exists() or out.read_bytes().count(b"\n") < 3:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    run.kill()
    run.wait()
    killed = out.read_bytes()
    whole = killed[: killed.rfind(b"\n") + 1]
    assert 3 <= whole.count(b"\n") < 12  # killed mid-run

    assert batch(model, tasks, out, window=window) == 0  # the same job, resumed in this process
    assert out.read_bytes().startswith(whole)  # appended to, never rewritten
    done = records(out)
    assert sorted(r["line"] for r in done) == list(range(1, 13)) and all("result" in r for r in done)
    assert [r.get("id") for r in sorted(done, key=lambda r: r["line"])] == [t.get("id") for t in captions(12)]


def test_a_record_cut_short_is_cut_off_and_the_whole_ones_kept(model, tmp_path, capsys):
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(6)), tmp_path / "out.jsonl"
    assert batch(model, tasks, out) == 0
    full = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(full[:3]) + full[3][:20])  # killed while writing the fourth record
    assert batch(model, tasks, out) == 0
    assert out.read_bytes().startswith(b"".join(full[:3]))
    assert sorted(r["line"] for r in records(out)) == [1, 2, 3, 4, 5, 6]
    out.write_bytes(b"".join(full) + b'{"li')  # nothing left to run: the torn record still goes
    assert batch(model, tasks, out) == 0
    assert out.read_bytes() == b"".join(full) and "all 6 lines already done" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    b'{"task": "caption", "image": "stars.png"}\n',  # a task file
    b'{"line": 1, "result": "x"}\nnot JSON\n{"line": 3, "result": "y"}\n',
    b'{"line": 1, "result": "x"}\nnotes with no newline',  # a last line that is no record cut short
])
def test_an_output_that_is_not_ours_is_refused_untouched(tmp_path, capsys, content):
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(2)), tmp_path / "out.jsonl"
    out.write_bytes(content)
    assert main(["batch", str(tasks), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not a result of idefics batch" in err
    assert out.read_bytes() == content


def test_an_output_that_is_no_regular_file_is_refused(tmp_path, capsys):
    tasks = write_lines(tmp_path / "tasks.jsonl", captions(1))
    assert main(["batch", str(tasks), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not a regular file" in err


def test_a_repeated_id_fails_the_later_line_even_after_a_resume(model, tmp_path):
    ids = ["a", 7, "a", None, "7", 7]  # the string "7" is not the integer 7
    lines = [{"task": "caption", "image": "stars.png"} | ({"id": i} if i is not None else {}) for i in ids]
    tasks, out = write_lines(tmp_path / "tasks.jsonl", lines), tmp_path / "out.jsonl"
    assert batch(model, tasks, out) == 0
    first = records(out)
    errors = {r["line"]: r["error"] for r in first if "error" in r}
    assert errors == {3: 'line 3: id "a" is already the id of line 1; ids must be unique',
                      6: "line 6: id 7 is already the id of line 2; ids must be unique"}
    by_line = sorted(first, key=lambda r: r["line"])  # records come in the order lines end
    assert [r.get("id") for r in by_line] == ["a", 7, None, None, "7", None]  # each id in one record only
    out.write_bytes(out.read_bytes().splitlines(keepends=True)[0])  # killed after the first record
    assert batch(model, tasks, out) == 0
    assert sorted(r["line"] for r in records(out)) == [1, 2, 3, 4, 5, 6]
    assert {r["line"]: r["error"] for r in records(out) if "error" in r} == errors


@pytest.mark.parametrize("how", ["same name", "symbolic link", "hard link", "standard input"])
def test_an_output_that_is_the_input_is_refused(tmp_path, capsys, monkeypatch, how):
    tasks = write_lines(tmp_path / "tasks.jsonl", captions(2))
    before = tasks.read_bytes()
    source, out = str(tasks), tmp_path / "out.jsonl"
    if how == "same name":
        out = tasks
    elif how == "symbolic link":
        out.symlink_to(tasks)
    elif how == "hard link":
        out.hardlink_to(tasks)
    else:
        source, out = "-", tasks
        monkeypatch.setattr(sys, "stdin", tasks.open())
    assert main(["batch", source, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is the input file" in err
    assert tasks.read_bytes() == before


class Faulty:
    """The demo model with a bug when it captions triangle.png: an exception no line can be blamed for."""

    def __init__(self, m):
        self.m = m

    def __getattr__(self, name):
        return getattr(self.m, name)

    def caption(self, images, *args, **options):
        if "triangle" in str(images):
            raise KeyError({"secret": "data"})
        return self.m.caption(images, *args, **options)


def test_each_line_error_is_one_sentence_and_an_internal_one_fails_only_its_line(model, tmp_path, capsys):
    lines = [{"task": "caption", "image": "stars.png"},
             {"task": "caption", "image": "triangle.png"},
             {"task": "ask", "image": "stars.png", "question": 7},
             "not JSON",
             '{"task": "caption", "image": "stars.png", "id": 1' + "0" * 5000 + "}",
             "[" * 100_000 + "]" * 100_000,
             {"task": "caption", "image": "stars.png", "id": 1.5},
             {"task": "paint", "image": "stars.png"},
             {"task": "caption", "image": "missing.png"},
             {"task": "caption", "image": "circle_and_square.png"}]
    tasks, out = write_lines(tmp_path / "tasks.jsonl", lines), tmp_path / "out.jsonl"
    assert batch(Faulty(model), tasks, out) == 0
    errors = {r["line"]: r["error"] for r in records(out) if "error" in r}
    assert errors == {
        2: "line 2: internal error (KeyError)",
        3: "line 3: question: expected a non-empty string, got 7",
        4: "line 4: invalid JSON (Expecting value at column 1)",
        5: "line 5: invalid JSON (a number too long)",
        6: "line 6: invalid JSON (nested too deeply)",
        7: "line 7: id must be a string or an integer, got float",
        8: "line 8: unknown task 'paint' (valid: caption, ask, classify, story, few_shot, generate)",
        9: errors[9],
    }
    assert errors[9].startswith("line 9: ") and "missing.png" in errors[9] and "Error" not in errors[9]
    assert sorted(r["line"] for r in records(out) if "result" in r) == [1, 10]  # in the order lines end
    err = capsys.readouterr().err
    assert "secret" not in out.read_text() + err and all(message in err for message in errors.values())


def test_a_lone_surrogate_fails_its_line_only_and_the_output_stays_utf8(model, tmp_path, capsys):
    lines = [{"task": "caption", "image": "stars.png", "id": "\ud800"},
             r'{"task": "caption", "image": "\udc80.png", "id": "b"}',  # an error that quotes the surrogate
             b'{"task": "caption", "image": "stars.png", "id": "\xff"}',
             '{"task": "caption", "image": "stars.png", "id": "\U0001F600 d\u00e9j\u00e0"}',
             '{"task": "caption", "image": "triangle.png", "prompt": "An\u2028image of "}']  # not a line break
    tasks, out = write_lines(tmp_path / "tasks.jsonl", lines), tmp_path / "out.jsonl"
    assert batch(model, tasks, out) == 0
    done = {r["line"]: r for r in records(out)}  # decodes as strict UTF-8
    assert sorted(done) == [1, 2, 3, 4, 5]
    assert done[1] == {"line": 1, "error": "line 1: id is not valid Unicode (it holds a lone surrogate)"}
    assert done[2]["id"] == "b" and "\\udc80.png: no such image file" in done[2]["error"]  # escaped, as text
    assert done[3] == {"line": 3, "error": "line 3: not UTF-8 text (byte 50 of the line)"}
    assert done[4]["id"] == "\U0001F600 d\u00e9j\u00e0" and "result" in done[4] and "result" in done[5]
    assert batch(model, tasks, out) == 0 and "all 5 lines already done" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "batch: --workers must be >= 1, got 0"),
    (["--workers", "-3"], "batch: --workers must be >= 1, got -3"),
    (["--workers", "many"], "batch: argument --workers: invalid int value: 'many'"),
    (["--window", "0"], "batch: --window must be >= 1, got 0"),
    (["--max-batch", "0"], "batch: --max-batch must be >= 1, got 0"),
    (["--max-batch", "4", "--ray"], "--max-batch does not combine with --ray"),
    (["--image-decode", "turbo"], "batch: argument --image-decode: invalid choice: 'turbo'"),
])
def test_bad_pipeline_flags_are_one_line_errors_before_any_work(tmp_path, capsys, flags, message):
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(2)), tmp_path / "out.jsonl"
    assert main(["batch", str(tasks), "-o", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"idefics: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_progress_shows_images_and_tokens_per_second(model, tmp_path, capsys):
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(6)), tmp_path / "out.jsonl"
    assert batch(model, tasks, out) == 0
    err = capsys.readouterr().err
    assert re.search(r"6/6 .*\d+(\.\d+)? images/s, \d+ tokens/s", err), err


def test_the_lines_enter_the_batch_together_and_give_what_they_give_alone(model, tmp_path, monkeypatch):
    """Each line is a call of its own; while the lines run they share one gate (Idefics.gather), so their prompts
    wait for each other's images and enter the running batch in a few prefills, not one each as their photos
    decode (each prefill reads every weight). Their captions are those of the lines run one at a time."""
    from test_pipeline import jpeg, photo

    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(photo(1600, 1067, i)))
    lines = [{"task": "caption", "id": i, "image": f"{i}.jpg", "prompt": f"Picture {i}:"} for i in range(12)]
    tasks = write_lines(tmp_path / "tasks.jsonl", lines)
    alone, together = tmp_path / "alone.jsonl", tmp_path / "together.jsonl"
    assert run_file(str(tasks), alone, tmp_path, {"max_new_tokens": 2}, 1, lambda: model) == 0
    prefills = []
    real = model.engine.prefill_batch
    monkeypatch.setattr(model.engine, "prefill_batch", lambda prompts, *a, **k: prefills.append(len(prompts))
                        or real(prompts, *a, **k))
    assert run_file(str(tasks), together, tmp_path, {"max_new_tokens": 2}, 12, lambda: model) == 0
    assert sorted(records(together), key=lambda r: r["id"]) == records(alone)
    assert sum(prefills) == 12 and len(prefills) <= 2, prefills
    assert model.gather is False  # (on only while the lines run)


def test_max_batch_bounds_the_running_batch_while_the_job_runs(model, tmp_path, monkeypatch):
    """--max-batch: no step runs more rows than asked, the captions are those of the model's own batch size, and
    the model's setting is back once the job ends."""
    tasks = write_lines(tmp_path / "tasks.jsonl", captions(8))
    own, bounded = tmp_path / "own.jsonl", tmp_path / "bounded.jsonl"
    assert batch(model, tasks, own, window=8) == 0
    rows = []
    real = model.engine.decode
    monkeypatch.setattr(model.engine, "decode", lambda tokens, *a, **k: rows.append(len(tokens)) or real(tokens, *a, **k))
    kept = model.scheduler.max_batch, model.scheduler.rows
    assert run_file(str(tasks), bounded, IMAGES, {"max_new_tokens": 2}, 8, lambda: model, max_batch=3) == 0
    assert max(rows) == 3, rows
    assert sorted(records(bounded), key=lambda r: r["line"]) == sorted(records(own), key=lambda r: r["line"])
    assert (model.scheduler.max_batch, model.scheduler.rows) == kept


def test_a_max_batch_past_the_memory_fails_its_lines_in_one_sentence_and_the_model_runs_on(model, tmp_path):
    """Rows whose cache cannot fit are refused before anything is allocated: each line's record says so in one
    sentence, and the next job runs."""
    tasks = write_lines(tmp_path / "tasks.jsonl", captions(3))
    out = tmp_path / "out.jsonl"
    assert run_file(str(tasks), out, IMAGES, {"max_new_tokens": 2}, 4, lambda: model, max_batch=10**9) == 0
    errors = [r["error"] for r in records(out)]
    assert len(errors) == 3 and all(re.fullmatch(r"line \d: 1000000000 rows of up to \d+ tokens need about [\d.]+ "
                                                 r"GiB of cache, and cpu has [\d.]+ GiB free: lower the rows "
                                                 r"decoded at once \(max_batch: idefics batch --max-batch, idefics "
                                                 r"serve --max-concurrent\) or the prompts' length", e)
                                    for e in errors), errors
    again = tmp_path / "again.jsonl"
    assert batch(model, tasks, again) == 0 and all("result" in r for r in records(again))


def test_a_fault_escaping_a_line_stops_the_run_and_its_threads(model, tmp_path, monkeypatch):
    """run_line turns every error of a line into its record; should anything escape it all the same (a bug of
    ours), the run raises it on the caller's thread instead of waiting for the line forever, and the line threads,
    started before the first line, end."""
    import threading

    import idefics.batch as batch_module

    real = batch_module.run_line

    def faulty(m, line, *args):
        if line.number == 3:
            raise RuntimeError("a bug")
        return real(m, line, *args)

    monkeypatch.setattr(batch_module, "run_line", faulty)
    tasks, out = write_lines(tmp_path / "tasks.jsonl", captions(6)), tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="a bug"):
        batch(model, tasks, out, window=4)
    deadline = time.monotonic() + 60
    while any(t.name.startswith("idefics-batch") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("idefics-batch") for t in threading.enumerate())
    assert model.gather is False
