"""JSONL jobs: one task per input line, one result record per line, resumable.

Input line: {"task": "caption" | "ask" | "classify" | "story" | "few_shot" | "generate", "id": optional, ...}
  caption: image, prompt?          ask: image, question          classify: image, labels, mode?
  story: image, instruction?       few_shot: examples [[image, text], ...], image
  generate: prompt, a list of items: text strings, {"image": ...} objects (URL strings are images too)
  options: generation options for this line, over the job's.
Output record: {"line": n, "id"?, "task", "result"} or {"line": n, "id"?, "error"}; n counts from 1."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from idefics import tasks
from idefics.errors import IdeficsError
from idefics.scoring import LabelScore

TASKS = ("caption", "ask", "classify", "story", "few_shot", "generate")
_FIELDS = {  # the fields each task reads besides task, id, image and options
    "caption": {"prompt"}, "ask": {"question"}, "classify": {"labels", "mode"}, "story": {"instruction"},
    "few_shot": {"examples"}, "generate": {"prompt"},
}


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


def parse(line: int, text: str, image_root: Path, defaults: dict) -> Job:
    """One input line -> a Job; IdeficsError says what is wrong with it."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise IdeficsError(f"invalid JSON ({e.msg} at column {e.colno})") from None
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
    job = Job(line, spec.get("id"), task, options=defaults | options,
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
    f, o = job.fields, job.options
    if job.task == "caption":
        return m.caption(images, f.get("prompt"), **o)
    if job.task == "ask":
        return m.ask(images, f.get("question"), **o)
    if job.task == "story":
        return m.story(images, f.get("instruction"), **o)
    if job.task == "few_shot":
        return m.few_shot(f["examples"], images, **o)
    mode = f.get("mode", "rank")
    return m.classify(images, f.get("labels"), mode, **(o if mode != "rank" else {}))


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
        except Exception as e:  # values of the wrong type reach the library as TypeErrors; they fail their line
            if len(group) == 1:
                message = str(e) if isinstance(e, IdeficsError) else f"{type(e).__name__}: {e}"
                yield group[0], group[0].record(error=message.splitlines()[0] if message else type(e).__name__)
                continue
            for job in group:
                yield from run(m, [job])
            continue
        for job, result in zip(group, results):
            yield job, job.record(result=as_json(result))


def done_lines(output: Path) -> tuple[set[int], set[str]]:
    """The line numbers and ids already recorded in a partial output file. A last line cut short by an
    interruption is removed, so that appending starts on a fresh line."""
    if not output.exists():
        return set(), set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    lines, ids = set(), set()
    for raw in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("line"), int):
            lines.add(record["line"])
            if record.get("id") is not None:
                ids.add(json.dumps(record["id"]))
    return lines, ids


def pending(texts: list[str], done: tuple[set[int], set[str]]) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank input lines not yet done: by id where the line has one, else by
    line number."""
    lines, ids = done
    out = []
    for n, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        key = _id_of(text)
        if (key in ids) if key is not None else (n in lines):
            continue
        out.append((n, text))
    return out


def _id_of(text: str) -> str | None:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return json.dumps(spec["id"]) if isinstance(spec, dict) and spec.get("id") is not None else None


def process(m, todo: list[tuple[int, str]], image_root: Path, defaults: dict, batch_size: int,
            write: Callable[[dict], None], report: Callable[[str], None]) -> int:
    """Run the pending lines batch_size at a time; write each record; report each failure. -> failures."""
    failures = 0
    for start in range(0, len(todo), batch_size):
        chunk, jobs, records = todo[start : start + batch_size], [], {}
        for n, text in chunk:
            try:
                jobs.append(parse(n, text, image_root, defaults))
            except IdeficsError as e:
                records[n] = Job(n, _id_or_none(text)).record(error=f"line {n}: {e}")
        for job, record in run(m, jobs):
            if "error" in record:
                record["error"] = f"line {job.line}: {record['error']}"
            records[job.line] = record
        for n, _ in chunk:
            record = records[n]
            if "error" in record:
                failures += 1
                report(record["error"])
            write(record)
    return failures


def _id_or_none(text: str):
    key = _id_of(text)
    return None if key is None else json.loads(key)


def run_file(source: str, output: Path, image_root: Path, defaults: dict, batch_size: int, load) -> int:
    """The `idefics batch` command: input file (or - for stdin) -> output file, resumed when it exists, with a
    progress bar on stderr. load() gives the model, called only when lines are left to run. -> exit status."""
    from tqdm import tqdm

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IdeficsError(f"{source}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    texts = text.splitlines()
    total = sum(1 for t in texts if t.strip())
    try:
        todo = pending(texts, done_lines(output))
    except OSError as e:
        raise IdeficsError(f"{output}: cannot read ({e.strerror or e})") from None
    if not todo:
        print(f"idefics: batch: all {total} lines already done in {output}", file=sys.stderr)
        return 0
    m = load()
    bar = tqdm(total=total, initial=total - len(todo), unit="task", file=sys.stderr, dynamic_ncols=True,
               desc="batch")
    try:
        with output.open("a", encoding="utf-8") as out:
            def write(record: dict) -> None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # a killed run loses no finished line
                bar.update(1)

            def report(message: str) -> None:
                bar.write(f"idefics: {message}", file=sys.stderr)

            failures = process(m, todo, image_root, defaults, batch_size, write, report)
    except OSError as e:
        raise IdeficsError(f"{output}: cannot write ({e.strerror or e})") from None
    finally:
        bar.close()
    print(f"idefics: batch: {len(todo) - failures} done, {failures} failed, results in {output}", file=sys.stderr)
    return 0
