"""Tiny checkpoint pieces, in the layout transformers' save_pretrained writes today or in that of the hub's IDEFICS
repos, and the reference processor."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "User: Describe this image.\nAssistant: An image of the Eiffel Tower at night.",
    "Instruction: Provide an answer to the question. Use the image to answer.\n",
    "Question: Where are these people and what's the weather like? Answer: in a park.",
    "This is an image of a puppy in a flower bed. Story: a red door, a pumpkin, a ghost.",
    "Category: animals, vegetables, city landscape, cars, office.",
    "Un café au lait, s'il vous plaît. Tōkyō 東京 is a city.",
]
BASE_VOCAB_SIZE = 600  # the BPE vocabulary; the added image tokens (and <end_of_utterance>) take the next ids
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>"]
END_OF_UTTERANCE = "<end_of_utterance>"


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def make_tokenizer_dir(path, *, instruct: bool = False, legacy: bool | None = None,
                       padding_side: str | None = None) -> Path:
    """A Llama-style BPE (byte fallback, "▁" for spaces; <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>) trained on a few
    sentences and filled up to BASE_VOCAB_SIZE with unused pieces, plus <fake_token_around_image>, <image> and, when instruct, <end_of_utterance> as added special
    tokens. tokenizer.json has the 2023 Llama layout (Prepend/Replace normalizer, no pre-tokenizer);
    tokenizer_config.json and special_tokens_map.json are laid out as on the hub. `legacy` and `padding_side` are
    written to tokenizer_config.json only when given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB_SIZE, special_tokens=specials + byte_tokens, show_progress=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    draft.train_from_iterator(CORPUS, trainer)

    # Rebuilt around the trained vocab so that only <unk>, <s>, </s> are added tokens, as in Llama's file.
    trained = json.loads(draft.to_str())["model"]
    vocab = trained["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), BASE_VOCAB_SIZE)})
    merges = [tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    extra = IMAGE_TOKENS + ([END_OF_UTTERANCE] if instruct else [])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials + extra])
    tok.save(str(path / "tokenizer.json"))

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": _added("</s>"), "model_max_length": 2048,
              "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
              "unk_token": _added("<unk>")}
    if legacy is not None:
        config["legacy"] = legacy
    if padding_side is not None:
        config["padding_side"] = padding_side
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"additional_special_tokens": extra, "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<unk>", "unk_token": "<unk>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return path


def make_image_processor_config(path, image_size: int = 30) -> Path:
    """preprocessor_config.json as transformers' IdeficsImageProcessor saves it alone (the hub's layout)."""
    from transformers import IdeficsImageProcessorPil

    IdeficsImageProcessorPil(image_size=image_size).save_pretrained(str(path))
    return Path(path)


def make_processor_dir(path, *, instruct: bool = False, image_size: int = 30, layout: str = "saved",
                       **tokenizer_options) -> Path:
    """A processor's files in one directory, over make_tokenizer_dir's tokenizer. layout "saved": what transformers'
    save_pretrained of an IdeficsProcessor (an IdeficsImageProcessor and a LlamaTokenizerFast) writes:
    processor_config.json with the image processor nested, tokenizer.json and tokenizer_config.json holding every
    special token. "hub": the released checkpoints' layout, tokenizer files as make_tokenizer_dir writes them and
    preprocessor_config.json."""
    if layout == "hub":
        make_tokenizer_dir(path, instruct=instruct, **tokenizer_options)
        return make_image_processor_config(path, image_size)
    assert layout == "saved", layout
    # IdeficsImageProcessorPil: the IdeficsImageProcessor that needs no torchvision; both save the same file.
    from transformers import IdeficsImageProcessorPil, IdeficsProcessor, LlamaTokenizerFast

    with tempfile.TemporaryDirectory() as source:
        tokenizer = LlamaTokenizerFast.from_pretrained(make_tokenizer_dir(source, instruct=instruct, **tokenizer_options))
    IdeficsProcessor(IdeficsImageProcessorPil(image_size=image_size), tokenizer).save_pretrained(str(path))
    return Path(path)


def reference_tokenizer(path):
    """transformers' tokenizer for the files, loaded as AutoProcessor loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def reference_processor(path):
    """transformers' IdeficsProcessor over the same files, with the default of add_end_of_utterance_token that
    transformers 4.37.2 has (true when the tokenizer lists <end_of_utterance> among its extra special tokens):
    transformers 5 decides it as 4.37.2 but looks for the list under a name its tokenizers no longer use. The image
    processor is pinned to the PIL backend: the default one needs torchvision and falls back to PIL without it."""
    from transformers import IdeficsImageProcessorPil, IdeficsProcessor

    processor = IdeficsProcessor(IdeficsImageProcessorPil.from_pretrained(str(path)), reference_tokenizer(path))
    listed = processor.tokenizer.extra_special_tokens
    processor.tokenizer_was_trained_with_end_of_utterance_token = END_OF_UTTERANCE in listed
    return processor


def redirect(location: str, status: int = 302):
    """A serve() route answering with a redirect to `location`."""
    def answer(handler):
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


@contextmanager
def serve(routes: dict, delay: float = 0.0, hits: list | None = None):
    """An HTTP server on 127.0.0.1 in a thread: path -> (content type, body), or a function that answers from
    the request handler itself (e.g. redirect()); 404 elsewhere. Each answer waits `delay` seconds first; `hits`,
    if given, gets the path of every request. Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if hits is not None:
                hits.append(self.path)
            time.sleep(delay)
            if self.path not in routes:
                self.send_error(404)
                return
            try:
                if callable(routes[self.path]):
                    routes[self.path](self)
                    return
                content_type, body = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout or size limit), as some tests intend

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True  # a handler still sleeping does not hold up shutdown
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


BENCH = Path(__file__).parent.parent / "bench"


def bench_error(script: str, flags: list[str]) -> str:
    """bench/<script> run with flags it must refuse -> its last line, once it has ended in argparse's error (status
    2, no traceback)."""
    r = subprocess.run([sys.executable, str(BENCH / script), *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stderr.strip().splitlines()[-1]
