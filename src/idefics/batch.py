"""JSONL jobs: one task per input line, one result record per line, resumable.

Input line: {"task": "caption" | "ask" | "classify" | "story" | "few_shot" | "generate", "id": optional, ...}
  caption: image, prompt?          ask: image, question          classify: image, labels, mode?
  story: image, instruction?       few_shot: examples [[image, text], ...], image
  generate: prompt, a list of items: text strings, {"image": ...} objects (URL strings are images too)
  options: generation options for this line, over the job's.
Output record: {"line": n, "id"?, "task", "result"} or {"line": n, "id"?, "error"}; n counts from 1.
An id is a string or an integer, unique in the file; a record carries it only when the line's id is valid and
not used by an earlier line. The output is only ever appended to, so a killed run loses at most the record
it was writing.

Lines run continuously: a window of lines is in flight at once, each line a call on the model from its own thread
(concurrent calls join the model's running batch, and its image workers decode every line's images in parallel);
a record is written as soon as its line is done, so records come in the order lines finish, each naming its
line. The next line starts as soon as one ends."""
from __future__ import annotations

import itertools
import json
import os
import queue
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from idefics import tasks
from idefics.errors import IdeficsError
from idefics.scoring import LabelScore

TASKS = (*tasks.TASKS, "generate")
WINDOW = 256  # lines in flight at once
# the fields each task reads besides task, id, image and options
_FIELDS = {name: set(t.fields) for name, t in tasks.TASKS.items()} | {"generate": {"prompt"}}


@dataclass
class Job:
    line: int
    id: object = None
    task: str = ""
    image: object = None
    fields: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def record(self, **out) -> dict:
        head = {"line": self.line} | ({"id": self.id} if self.id is not None else {})
        return head | ({"task": self.task} if self.task else {}) | out

    def group(self) -> str:
        """Jobs with equal groups run as one batch: same task, fields and options, different images."""
        return json.dumps([self.task, self.fields, self.options], sort_keys=True, default=str)


@dataclass
class Line:
    """One non-blank input line. A line is done when the output holds a record of its key."""
    number: int
    text: str
    id: str | int | None = None  # the line's id when valid and not used by an earlier line
    error: str = ""  # what makes the line fail before its task is read: bad UTF-8, a bad or repeated id

    @property
    def key(self) -> tuple:
        return ("line", self.number) if self.id is None else ("id", self.id)


def parse(line: Line, image_root: Path, defaults: dict) -> Job:
    """One input line -> a Job; IdeficsError says what is wrong with it."""
    if line.error:
        raise IdeficsError(line.error)
    spec = _json(line.text)
    if not isinstance(spec, dict):
        raise IdeficsError(f"expected a JSON object, got {type(spec).__name__}")
    task = spec.get("task")
    if task not in TASKS:
        raise IdeficsError(f"unknown task {task!r} (valid: {', '.join(TASKS)})")
    unknown = sorted(set(spec) - _FIELDS[task] - {"task", "id", "image", "options"})
    if unknown:
        raise IdeficsError(f"unknown field {unknown[0]!r} for task {task}")
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise IdeficsError("options must be a JSON object")
    job = Job(line.number, line.id, task, options=defaults | options,
              fields={k: v for k, v in spec.items() if k in _FIELDS[task]})
    if task == "generate":
        job.fields["prompt"] = _prompt(job.fields.get("prompt"), image_root)
    else:
        job.image = _image(spec.get("image"), image_root, "image")
    if task == "few_shot":
        examples = job.fields.get("examples")
        if not isinstance(examples, list) or not all(isinstance(e, list) and len(e) == 2 for e in examples):
            raise IdeficsError("examples must be a list of [image, text] pairs")
        job.fields["examples"] = [[_image(im, image_root, f"example {i}"), t] for i, (im, t) in enumerate(examples)]
    return job


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IdeficsError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError:  # an integer of more digits than Python converts
        raise IdeficsError("invalid JSON (a number too long)") from None
    except RecursionError:
        raise IdeficsError("invalid JSON (nested too deeply)") from None


def _image(value, root: Path, where: str):
    if not isinstance(value, str) or not value:
        raise IdeficsError(f"{where}: expected an image path or URL")
    item = tasks.as_image(value, where)
    return root / item if isinstance(item, Path) else item


def _prompt(items, root: Path) -> list:
    if not isinstance(items, list) or not items:
        raise IdeficsError("prompt must be a non-empty list of items")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and set(item) == {"image"}:
            out.append(_image(item["image"], root, f"prompt item {i}"))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise IdeficsError(f"prompt item {i}: expected text or {{\"image\": ...}}")
    return out


def run_group(m, jobs: list[Job]) -> list:
    """One batched call for jobs of one group -> one result per job."""
    if jobs[0].task == "generate":
        return [c.text for c in m.generate([j.fields["prompt"] for j in jobs], **jobs[0].options)]
    if len(jobs) == 1:  # a lone image, so that errors name it as such
        return [_call(m, jobs[0], jobs[0].image)]
    return _call(m, jobs[0], [j.image for j in jobs])


def _call(m, job: Job, images):
    return tasks.TASKS[job.task].run(m, images, job.fields, job.options)


def as_json(result):
    if isinstance(result, list) and result and isinstance(result[0], LabelScore):
        return [r._asdict() for r in result]
    return result


def run(m, jobs: list[Job]) -> Iterator[tuple[Job, dict]]:
    """Run jobs in groups of equal tasks; a failing group is retried job by job, so one bad input fails alone."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group(), []).append(job)
    for group in groups.values():
        try:
            results = run_group(m, group)
        except Exception as e:  # a bad value can reach the library unchecked; it fails its own line
            if len(group) == 1:
                yield group[0], group[0].record(error=describe(e))
                continue
            for job in group:
                yield from run(m, [job])
            continue
        for job, result in zip(group, results):
            yield job, job.record(result=as_json(result))


def describe(e: Exception) -> str:
    """A line's error in one sentence: a user error's own message. Any other exception is a fault of ours,
    named by its type alone, as its text may quote the line's data as Python shows it."""
    message = str(e).strip() if isinstance(e, IdeficsError) else ""
    return message.splitlines()[0] if message else f"internal error ({type(e).__name__})"


def read_lines(data: bytes) -> list[Line]:
    """The input's non-blank lines, numbered from 1, each with its id or what is wrong with it. Only \\n, \\r\\n
    and \\r end a line: other Unicode line breaks may stand in a JSON string."""
    lines, first = [], {}  # first: id -> the number of the line that has it
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = Line(n, raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            lines.append(Line(n, "", error=f"not UTF-8 text (byte {e.start + 1} of the line)"))
            continue
        try:
            line.id = _id_of(line.text)
        except IdeficsError as e:
            line.error = str(e)
        if line.id in first:
            shown = json.dumps(line.id, ensure_ascii=False)
            line.error = f"id {shown} is already the id of line {first[line.id]}; ids must be unique"
            line.id = None
        elif line.id is not None:
            first[line.id] = n
        lines.append(line)
    return lines


def _id_of(text: str) -> str | int | None:
    """A line's id; None where it has none or is no JSON object (parse says why)."""
    try:
        spec = _json(text)
    except IdeficsError:
        return None
    return check_id(spec.get("id")) if isinstance(spec, dict) else None


def check_id(value) -> str | int | None:
    """An id as given; IdeficsError unless it is a string (in valid Unicode) or an integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise IdeficsError(f"id must be a string or an integer, got {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise IdeficsError("id is not valid Unicode (it holds a lone surrogate)") from None
    return value


RECORD_START = b'{"line": '  # how every output record begins (json.dumps of Job.record)


def recorded(path: Path) -> set[tuple]:
    """The keys of the lines that an output file holds records of. A last record cut short by a kill is cut
    off: the one edit ever made to an output, and a safe one, as it never touches a whole record. A file that
    is not our output is refused, untouched."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise IdeficsError(f"{path}: not a regular file (results are appended to the output and resumed from it)")
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        raise IdeficsError(f"{path}: cannot read ({reason_of(e)})") from None
    end = data.rfind(b"\n") + 1
    keys = [_record_key(raw) for raw in data[:end].split(b"\n")[:-1]]
    tail = data[end:]
    if None in keys or tail[: len(RECORD_START)] != RECORD_START[: len(tail)]:
        n = keys.index(None) + 1 if None in keys else len(keys) + 1
        raise IdeficsError(f"{path}: line {n} is not a result of idefics batch; give another --output")
    if end < len(data):
        try:
            os.truncate(path, end)
        except OSError as e:
            raise IdeficsError(f"{path}: cannot cut its last, unfinished record ({reason_of(e)})") from None
    return set(keys)


def _record_key(raw: bytes) -> tuple | None:
    """The key of the line an output record is for; None where it is not a record."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not ("result" in record or "error" in record):
        return None
    line = record.get("line")
    if isinstance(line, bool) or not isinstance(line, int):
        return None
    try:
        key = check_id(record.get("id"))
    except IdeficsError:
        return None
    return ("line", line) if key is None else ("id", key)


def prepare(line: Line, image_root: Path, defaults: dict) -> Job | dict:
    """A line -> its Job, or the record of why it cannot run."""
    try:
        return parse(line, image_root, defaults)
    except Exception as e:  # the line's fault or ours: either way it fails alone
        return Job(line.number, line.id).record(error=describe(e))


def finish(record: dict) -> dict:
    """A line's record as it is written: an error names its line."""
    if "error" in record:
        record["error"] = f"line {record['line']}: {record['error']}"
    return record


def run_line(m, line: Line, image_root: Path, defaults: dict) -> dict:
    """One input line -> its record as it is written: the result, or the line's error in one sentence."""
    job = prepare(line, image_root, defaults)
    if isinstance(job, Job):
        [(_, job)] = run(m, [job])
    return finish(job)


def images_of(line: Line) -> int:
    """How many images a line names (for the progress bar): 0 for a line that does not parse."""
    try:
        spec = json.loads(line.text)
    except (ValueError, RecursionError):
        return 0
    if not isinstance(spec, dict):
        return 0
    n = int("image" in spec)
    if isinstance(examples := spec.get("examples"), list):
        n += len(examples)
    if isinstance(prompt := spec.get("prompt"), list):
        n += sum(isinstance(item, dict) and "image" in item for item in prompt)
    return n


def process(m, todo: list[Line], image_root: Path, defaults: dict, window: int,
            write: Callable[[dict], None], report: Callable[[str], None]) -> int:
    """Run the pending lines, `window` of them in flight at once, each on one of `window` threads started before the
    first line; write each record as its line ends and report each failure. -> failures.

    The threads start first because a thread started while lines run waits for the interpreter's lock that the
    running lines, the engine and the image pipeline take turns holding: starting them one per line as lines ran
    held that lock about 0.2 s of a 256-photo job's 1.8 s on an H100 machine, delaying the engine's launches."""
    failures = 0
    lines = iter(todo)
    starts: queue.SimpleQueue = queue.SimpleQueue()  # lines to run, then None to stop a thread
    ends: queue.SimpleQueue = queue.SimpleQueue()  # each line's record, or the exception it raised (a bug of ours)

    def serve():
        while (line := starts.get()) is not None:
            try:
                ends.put(run_line(m, line, image_root, defaults))
            except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
                ends.put(e)

    threads = [threading.Thread(target=serve, name=f"idefics-batch-{i}", daemon=True)
               for i in range(min(window, len(todo)))]
    for thread in threads:
        thread.start()
    gather, m.gather = m.gather, True  # the lines' prompts wait for each other to enter the batch together (gate.py)
    try:
        running = 0
        for line in itertools.islice(lines, window):
            starts.put(line)
            running += 1
        while running:
            record = ends.get()
            running -= 1
            if isinstance(record, BaseException):
                raise record
            if "error" in record:
                failures += 1
                report(record["error"])
            write(record)
            for line in lines:  # the next one, if any
                starts.put(line)
                running += 1
                break
    finally:  # interrupted: what has not started never will; lines still running finish in the background
        for _ in threads:
            starts.put(None)
        m.gather = gather
    return failures


class Progress:
    """The progress bar's rates: images and generated tokens per second since the run began."""

    def __init__(self, m, bar):
        self.bar = bar
        self.loop = getattr(m, "loop", None)  # the model's engine loop counts the tokens it generates
        self.tokens = self.loop.generated_tokens if self.loop is not None else 0
        self.images = 0
        self.start = time.perf_counter()

    def done(self, images: int):
        self.images += images
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rates = f"{self.images / seconds:.1f} images/s"
        if self.loop is not None:
            rates += f", {(self.loop.generated_tokens - self.tokens) / seconds:.0f} tokens/s"
        self.bar.set_postfix_str(rates, refresh=False)
        self.bar.update(1)


def encode(record: dict) -> bytes:
    """One output line in UTF-8. A lone surrogate (an error may quote one from the line) has no UTF-8 form:
    such a record is written with JSON's \\u escapes instead."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


def read_input(source: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except (OSError, ValueError) as e:
        raise IdeficsError(f"{source}: cannot read ({reason_of(e)})") from None


def refuse_same_file(source: str, output: Path) -> None:
    """Results appended to the tasks would corrupt them: refuse an output that is the input under any name
    (a symbolic or hard link, or standard input redirected from it)."""
    try:
        given = os.fstat(sys.stdin.fileno()) if source == "-" else os.stat(source)
        out = os.stat(output)
    except (OSError, ValueError):  # no output yet, or an input that reading it will report
        return
    if (given.st_dev, given.st_ino) == (out.st_dev, out.st_ino):
        name = "standard input" if source == "-" else source
        raise IdeficsError(f"--output {output} is the input file ({name}); write the results to another file")


def open_job(source: str, output: Path):
    """A job's lines, those not yet in the output, and the output opened for appending -> (lines, todo, file); None
    (said on stderr) when every line is done."""
    refuse_same_file(source, output)
    lines = read_lines(read_input(source))
    done = recorded(output)
    todo = [line for line in lines if line.key not in done]
    if not todo:
        print(f"idefics: batch: all {len(lines)} lines already done in {output}", file=sys.stderr)
        return None
    try:
        return lines, todo, output.open("ab")
    except (OSError, ValueError) as e:
        raise IdeficsError(f"{output}: cannot write ({reason_of(e)})") from None


def said(error: str) -> str:
    """A line's error as stderr shows it: a lone surrogate quoted from the line appears as its escape."""
    return f"idefics: {error}".encode("utf-8", "backslashreplace").decode()


def reason_of(e: Exception) -> str:
    return getattr(e, "strerror", None) or ("not a valid file name" if isinstance(e, ValueError) else str(e))


def run_file(source: str, output: Path, image_root: Path, defaults: dict, window: int, load,
             max_batch: int | None = None) -> int:
    """The `idefics batch` command: input file (or - for stdin) -> output file, resumed when it exists, with a
    progress bar on stderr (lines, images/s, tokens/s). The output is only appended to. window: lines in flight at
    once; max_batch: rows of the running batch at most, while the job runs (None: as many of the window's lines
    as fit on a GPU; scheduler.capacity). load() gives the model, called only when lines are left to run. -> exit
    status."""
    from tqdm import tqdm

    job = open_job(source, output)
    if job is None:
        return 0
    lines, todo, out = job
    with out:
        m = load()
        kept = m.scheduler.max_batch, m.scheduler.rows
        if max_batch is not None:
            m.scheduler.max_batch = max_batch
        m.scheduler.rows = window  # (a row a line; more rows than the model's 64 run short tasks faster)
        bar = tqdm(total=len(lines), initial=len(lines) - len(todo), unit="line", file=sys.stderr,
                   dynamic_ncols=True, desc="batch")
        progress = Progress(m, bar)
        images = {line.number: images_of(line) for line in todo}
        try:
            def write(record: dict) -> None:
                out.write(encode(record))
                out.flush()  # a killed run loses no finished line
                progress.done(images[record["line"]])

            def report(message: str) -> None:
                bar.write(said(message), file=sys.stderr)

            failures = process(m, todo, image_root, defaults, window, write, report)
        except OSError as e:
            raise IdeficsError(f"{output}: cannot write ({reason_of(e)})") from None
        finally:
            bar.close()
            m.scheduler.max_batch, m.scheduler.rows = kept
    print(f"idefics: batch: {len(todo) - failures} done, {failures} failed, results in {output}", file=sys.stderr)
    return 0
