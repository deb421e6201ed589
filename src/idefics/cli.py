"""The `idefics` command: the guide's tasks, free generation, chat, JSONL batches, model info and the demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from idefics import tasks
from idefics.errors import IdeficsError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def generation_flags() -> dict[str, tuple[str, object]]:
    """The generation flags, read from GenerationOptions: option name -> ("value", int | float) for a number,
    ("switch", None) for a bool, ("repeat", str) for a list of strings. Options of other kinds (token id lists) have
    no flag. A flag not given keeps the task's default."""
    import typing
    from dataclasses import fields

    from idefics.sampling import GenerationOptions

    hints = typing.get_type_hints(GenerationOptions)
    flags = {}
    for f in fields(GenerationOptions):
        kinds = set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}
        if kinds in ({int}, {float}):
            flags[f.name] = ("value", kinds.pop())
        elif bool in kinds:
            flags[f.name] = ("switch", None)
        elif str in kinds:
            flags[f.name] = ("repeat", str)
    return flags


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other user error.
        command = self.prog.removeprefix("idefics").strip()
        raise IdeficsError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    _stdin.clear()
    try:
        args = parser().parse_args(argv)
        return args.command(args) or 0
    except IdeficsError as e:
        if debug:
            raise
        print(f"idefics: error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (e.g. `| head`)
        return 0
    except Exception as e:
        if debug:
            raise
        print(f"idefics: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)".replace("\n", " "),
              file=sys.stderr)
        return 1


def parser() -> Parser:
    model = Parser(add_help=False)
    m = model.add_argument_group("model")
    m.add_argument("--model", help="checkpoint directory or hub id (default: $IDEFICS_MODEL, else the demo model)")
    m.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    m.add_argument("--quantize", help="quantize the weights while loading")
    m.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N GPUs from --device on, one process each (default 1)")
    m.add_argument("--json", action="store_true", help="machine-readable output: one JSON object per line")
    m.add_argument("--debug", action="store_true", help="show tracebacks")

    gen = Parser(add_help=False)
    g = gen.add_argument_group("generation (defaults: the guide's, per task)")
    helps = {"do_sample": "sample instead of greedy decoding", "early_stopping": "beam search: stop at num_beams finished",
             "stop": "stop string (repeatable); the text is cut before it"}
    for name, (how, kind) in generation_flags().items():
        flag = "--" + name.replace("_", "-")
        if how == "value":
            g.add_argument(flag, type=kind, metavar=kind.__name__.upper())
        elif how == "switch":
            g.add_argument(flag, action="store_true", default=None, help=helps.get(name))
        else:
            g.add_argument(flag, action="append", metavar="TEXT", help=helps.get(name))

    top = Parser(prog="idefics", description="Fast, faithful inference for the IDEFICS vision-language models.")
    sub = top.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name, run, help, parents=(model, gen)):
        p = sub.add_parser(name, help=help, description=help, parents=list(parents))
        p.set_defaults(command=run)
        return p

    images = dict(nargs="+", metavar="IMAGE", help="image path, URL, or - for stdin; several run as one batch")
    p = command("caption", cmd_caption, "describe images (the guide's captioning)")
    p.add_argument("images", **images)
    p.add_argument("--prompt", help='prompted captioning, e.g. "This is an image of "')
    p = command("ask", cmd_ask, "answer a question about images (visual question answering)")
    p.add_argument("images", **images)
    p.add_argument("-q", "--question", required=True)
    p = command("classify", cmd_classify, "zero-shot classification into given labels")
    p.add_argument("images", **images)
    p.add_argument("--labels", nargs="*", required=True, metavar="LABEL", help="the categories, one argument each")
    p.add_argument("--mode", choices=["rank", "generate"], default="rank",
                   help="rank: every label with its probability (default); generate: the model's free answer")
    p = command("story", cmd_story, "write a story from images")
    p.add_argument("images", **images)
    p.add_argument("--instruction", help="replaces the guide's story instruction")
    p = command("few-shot", cmd_few_shot, "describe images after examples of (image, description)")
    p.add_argument("images", **images)
    p.add_argument("--example", nargs=2, action="append", required=True, metavar=("IMAGE", "TEXT"),
                   help="one example (repeatable)")
    p = command("generate", cmd_generate, "continue an interleaved prompt of text and images, in order")
    p.add_argument("-t", "--text", dest="items", action=_Item, metavar="TEXT", help="a text item")
    p.add_argument("-i", "--image", dest="items", action=_Item, metavar="IMAGE", help="an image item")
    p.add_argument("--include-prompt", action="store_true", help="print the prompt's text before the continuation")
    p = command("chat", cmd_chat, "talk with an instruct model; /image PATH attaches an image, /reset, /quit")
    p.add_argument("--image", action="append", default=[], metavar="IMAGE", help="attach to the first message")
    p = command("batch", cmd_batch, "run a JSONL file of tasks (one per line) into a JSONL file of results")
    p.add_argument("input", help="JSONL tasks, or - for stdin")
    p.add_argument("-o", "--output", required=True,
                   help="JSONL results, never the input; an existing file is resumed (only appended to)")
    p.add_argument("--window", type=int, default=256,
                   help="lines in flight at once; the next starts as soon as one ends (default 256)")
    p.add_argument("--max-batch", type=int,
                   help="lines decoded together at most (default: on a GPU, the window's lines where their cache "
                        "fits half the free memory, fewer for longer tasks; 16 on the CPU)")
    p.add_argument("--workers", type=int, help="processes that decode images (default: one per core, at most 16)")
    p.add_argument("--image-decode", choices=["exact", "fast"], default="exact",
                   help="exact: the reference's pixels (default); fast: JPEGs decoded at a reduced scale first")
    p.add_argument("--image-root", default=".", help="directory that relative image paths start from")
    r = p.add_argument_group("on a Ray cluster")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray: alone, a local Ray started for the job; auto or an address, a running cluster")
    r.add_argument("--replicas", type=int, metavar="N",
                   help="model replicas (default: one per GPU of the cluster, else 1)")
    r.add_argument("--gpus-per-replica", type=float, metavar="GPUS", help="default: 1 on a cluster with GPUs, else 0")
    r.add_argument("--cpus-per-replica", type=float, metavar="CPUS", help="default: 1")
    r.add_argument("--batch-size", type=int, metavar="N", help="lines a replica runs in one call (default 8)")
    p = command("serve", cmd_serve, "an OpenAI-compatible HTTP server with a playground page at /", parents=[model])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    for name, (kind, default, text) in settings_flags().items():
        if kind is bool:
            flag = ("--no-" if default else "--") + name.replace("_", "-")  # a switch turns its default over
            p.add_argument(flag, dest=name, action="store_false" if default else "store_true", help=text)
        else:
            p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text,
                           metavar=kind.__name__.upper())
    command("info", cmd_info, "summarize a model: configuration, parameters, device, dtype", parents=[model])
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show tracebacks")
    command("demo", cmd_demo, "run the embedded demo model", parents=[debug])
    return top


class _Item(argparse.Action):
    """-t and -i append to one list, so the prompt keeps the order given."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = getattr(namespace, self.dest) or []
        items.append(("image" if option_string in ("-i", "--image") else "text", value))
        setattr(namespace, self.dest, items)


# Arguments -> library values

def generation_options(args) -> dict:
    """The generation flags given (others keep the task's defaults), checked before any model loads."""
    from idefics.sampling import GenerationOptions

    options = {n: getattr(args, n) for n in generation_flags() if getattr(args, n, None) is not None}
    GenerationOptions.make(**options)
    return options


def load_model(args):
    import idefics

    pipeline = {k: getattr(args, k) for k in ("workers", "image_decode") if getattr(args, k, None) is not None}
    return idefics.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                        tensor_parallel=args.tensor_parallel, **pipeline)


_stdin: dict[str, bytes] = {}  # stdin's bytes, read once per command: every "-" is the same image


def read_image(arg: str):
    """A command-line image -> a decoded PIL image, so a bad image fails before the model loads."""
    from idefics.images import load_image, read_stream

    if arg == "-":
        if "data" not in _stdin:
            _stdin["data"] = read_stream(sys.stdin.buffer, "stdin")  # an endless stdin stops at the byte limit
        return load_image(_stdin["data"])
    return load_image(tasks.as_image(arg))


def read_images(args) -> list:
    return [read_image(a) for a in args.images]


def emit(args, results: list, render) -> None:
    """One result per image: one line each (with --json: a JSON object), prefixed by the image when several."""
    from idefics.batch import as_json

    for name, result in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": name, "result": as_json(result)}, ensure_ascii=False))
        elif len(args.images) > 1:
            print(f"{name}: {render(result)}")
        else:
            print(render(result))


# Commands

def run_task(args, task: str, **fields):
    """A task of tasks.TASKS on the command line's images, with its generation flags."""
    options, images = generation_options(args), read_images(args)
    return tasks.TASKS[task].run(load_model(args), images, fields, options)


def cmd_caption(args):
    emit(args, run_task(args, "caption", prompt=args.prompt), str)


def cmd_ask(args):
    emit(args, run_task(args, "ask", question=tasks.as_text(args.question, "question")), str)


def cmd_classify(args):
    if args.mode == "rank" and generation_options(args):
        raise IdeficsError("--mode rank takes no generation options (use --mode generate)")

    def render(ranked):
        return "  ".join(f"{s.label} {s.probability:.4f}" for s in ranked)

    labels = tasks.as_labels(args.labels)
    emit(args, run_task(args, "classify", labels=labels, mode=args.mode), str if args.mode == "generate" else render)


def cmd_story(args):
    emit(args, run_task(args, "story", instruction=args.instruction), str)


def cmd_few_shot(args):
    examples = [(read_image(image), text) for image, text in args.example]
    emit(args, run_task(args, "few_shot", examples=examples), str)


def cmd_generate(args):
    options = generation_options(args)
    if not args.items:
        raise IdeficsError("empty prompt: give items with -t TEXT and -i IMAGE, in order")
    prompt = [read_image(v) if kind == "image" else v for kind, v in args.items]
    m = load_model(args)
    if args.json or args.include_prompt:
        [c] = m.generate([prompt], include_prompt=args.include_prompt, **options)
        if args.json:
            print(json.dumps({"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)},
                             ensure_ascii=False))
        else:
            print(c.text)
        return
    for piece in m.stream(prompt, **options):
        print(piece, end="", flush=True)
    print()


CHAT_HELP = "/image PATH attaches an image to your next message (so does a path in it), /reset starts over, /quit leaves."


def cmd_chat(args):
    options = generation_options(args)
    pending = [read_image(a) for a in args.image]
    conversation = load_model(args).chat(**options)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("You: " if interactive else "")
        except EOFError:
            return
        line = line.strip()
        try:
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                conversation.reset()
                pending = []
            elif line.startswith("/image"):
                path = line.removeprefix("/image").strip()
                if not path:
                    raise IdeficsError("/image needs a path or URL")
                pending.append(read_image(path))
            elif line.startswith("/"):
                raise IdeficsError(f"unknown command {line.split()[0]} ({CHAT_HELP})")
            elif line:
                text, attached = split_message(line)
                reply(conversation, text, pending + attached, args.json)
                pending = []
        except IdeficsError as e:  # the conversation goes on
            print(f"idefics: error: {e}", file=sys.stderr)


def split_message(line: str) -> tuple[str, list]:
    """Words of a message that are image files (by suffix) or image URLs become attached images."""
    words, images = [], []
    for word in line.split():
        suffix = Path(word.split("?")[0]).suffix.lower()
        if suffix in IMAGE_SUFFIXES and (Path(word).is_file() or word.startswith(("http://", "https://"))):
            images.append(read_image(word))
        else:
            words.append(word)
    return " ".join(words), images


def reply(conversation, text: str, images: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"reply": conversation.send(text or None, images or None)}, ensure_ascii=False), flush=True)
        return
    print("Assistant: ", end="", flush=True)
    try:
        for piece in conversation.stream(text or None, images or None):
            print(piece, end="", flush=True)
    except KeyboardInterrupt:  # stops this reply, not the conversation
        pass
    print(flush=True)


def cmd_batch(args):
    from idefics.batch import run_file

    for flag in ("window", "workers", "max_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise IdeficsError(f"batch: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    options = generation_options(args)
    if args.ray is not None:
        from idefics import ray_batch

        if args.tensor_parallel != 1:
            raise IdeficsError("--tensor-parallel does not combine with --ray (each replica is one process)")
        if args.max_batch is not None:
            raise IdeficsError("--max-batch does not combine with --ray (each replica runs --batch-size lines at once)")

        return ray_batch.run_file(args.input, Path(args.output), model=args.model, device=args.device,
                                  dtype=args.dtype, quantize=args.quantize, options=options, image_root=args.image_root,
                                  batch_size=8 if args.batch_size is None else args.batch_size,
                                  address=args.ray or None, replicas=args.replicas,
                                  gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica)
    for flag in ("replicas", "gpus_per_replica", "cpus_per_replica"):
        if getattr(args, flag) is not None:
            raise IdeficsError(f"--{flag.replace('_', '-')} needs --ray")
    if args.batch_size is not None:
        raise IdeficsError("--batch-size needs --ray (without it, --window lines run continuously)")
    return run_file(args.input, Path(args.output), Path(args.image_root), options, args.window,
                    lambda: load_model(args), max_batch=args.max_batch)


def settings_flags() -> dict[str, tuple[type, object, str]]:
    """The server's flags, read from its Settings: name -> (type, default, help)."""
    import typing
    from dataclasses import fields

    from idefics.server.settings import Settings

    hints = typing.get_type_hints(Settings)
    flags = {}
    for f in fields(Settings):
        kind = (set(typing.get_args(hints[f.name]) or (hints[f.name],)) - {type(None)}).pop()
        flags[f.name] = (kind, f.default, f.metadata["help"].replace("%", "%%"))
    return flags


def cmd_serve(args):
    import os

    try:
        from idefics.server.app import limit_malloc_arenas, server
    except ImportError as e:
        raise IdeficsError(f"idefics serve needs the server extra: pip install 'idefics[server]' ({e})") from None
    from idefics.server.settings import Settings

    values = {name: getattr(args, name) for name in settings_flags()}
    values["api_key"] = values["api_key"] or os.environ.get("IDEFICS_API_KEY") or None
    values["model_name"] = values["model_name"] or args.model or os.environ.get("IDEFICS_MODEL") or None
    settings = Settings(**values)  # checked before the model loads
    if not 0 <= args.port <= 65535:
        raise IdeficsError(f"--port must be 0 to 65535, got {args.port}")
    limit_malloc_arenas()  # before the model's and the server's threads
    server(load_model(args), settings, host=args.host, port=args.port).run()


def cmd_info(args):
    summary = load_model(args).summary()
    if args.json:
        print(json.dumps(summary))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def cmd_demo(args):
    try:
        from idefics.demo import run
    except ImportError as e:
        raise IdeficsError(f"the demo is not available in this installation ({e})") from None
    return run()
