"""LLaMA-1's tokenizer, rebuilt in the hub's layout from the npm package llama-tokenizer-js (which embeds its
32000-piece vocabulary and merges), plus IDEFICS's two image tokens: what the benchmarks use for a tokenizer of
the real size without a download from the hub.

    python bench/llama_tokenizer.py [--js llama-tokenizer.js] [--out bench/llama_tokenizer] [--check]

Without --js, `npm pack llama-tokenizer-js` fetches the package. --check compares our tokens with the package's
own encoder (run by node) on a few strings. The package stores the vocabulary as base64 of the pieces joined by
newlines, and the merges as base64 of little-endian uint16 pairs of piece ids, in merge order."""
from __future__ import annotations

import argparse
import base64
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

HERE = Path(__file__).parent
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>"]  # ids 32000 and 32001, as in idefics-9b
CHECK_TEXTS = [
    "This is an image of ",
    "Instruction: Provide an answer to the question. Use the image to answer.\n",
    "Question: Where are these people and what's the weather like? Answer:",
    "  leading spaces, trailing spaces  ",
    "Un café au lait, s'il vous plaît. Tōkyō 東京 🦙 is a city.",
    "User: What is in this image?<end_of_utterance>\nAssistant: Idefix, the dog of Obelix.\n\n\tTabs\tand 1234567 numbers",
]


def fetch_js() -> str:
    """llama-tokenizer.js from the npm package."""
    with tempfile.TemporaryDirectory() as tmp:
        packed = subprocess.run(["npm", "pack", "llama-tokenizer-js", "--silent"], cwd=tmp, check=True,
                                capture_output=True, text=True).stdout.split()[-1]
        with tarfile.open(Path(tmp) / packed) as tar:
            return tar.extractfile("package/llama-tokenizer.js").read().decode("utf-8")


def vocab_and_merges(js: str) -> tuple[list[str], list[tuple[str, str]]]:
    def constant(name: str) -> bytes:
        match = re.search(name + r'\s*=\s*"([A-Za-z0-9+/=]+)"', js)
        if match is None:
            sys.exit(f"llama_tokenizer: {name} not found in the package's script")
        return base64.b64decode(match.group(1))

    vocab = constant("llama_vocab_base64").decode("utf-8").split("\n")
    data = constant("llama_merges_binary")
    ids = struct.unpack(f"<{len(data) // 2}H", data)
    merges = [(vocab[a], vocab[b]) for a, b in zip(ids[0::2], ids[1::2])]
    assert len(vocab) == 32000, len(vocab)
    return vocab, merges


def build(vocab: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """The hub's LLaMA tokenizer.json of 2023: BPE with byte fallback, spaces as "▁" and one prepended, no
    pre-tokenizer, BOS added; <unk>, <s>, </s> and the image tokens as added special tokens."""
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(vocab)}, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ["<unk>", "<s>", "</s>", *IMAGE_TOKENS]])
    return tok


def write(tok: Tokenizer, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": added("</s>"), "legacy": True,
              "model_max_length": 2048, "pad_token": added("<unk>"), "padding_side": "left",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": added("<unk>")}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"additional_special_tokens": IMAGE_TOKENS, "bos_token": "<s>", "eos_token": "</s>",
               "pad_token": "<unk>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def check(tok: Tokenizer, js_path: Path) -> bool:
    """Our ids (with BOS) against the package's encode() under node, text by text."""
    script = (f"import('{js_path.resolve().as_uri()}').then(m => {{ const t = m.default;"
              f" for (const s of JSON.parse(process.argv[1])) console.log(JSON.stringify(t.encode(s))); }});")
    out = subprocess.run(["node", "-e", script, json.dumps(CHECK_TEXTS)], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    same = True
    for text, line in zip(CHECK_TEXTS, out, strict=True):
        theirs, ours = json.loads(line), tok.encode(text).ids
        same &= theirs == ours
        print(f"{'same' if theirs == ours else 'DIFFERENT'}: {text!r} -> {len(ours)} tokens"
              + ("" if theirs == ours else f"\n  ours   {ours}\n  theirs {theirs}"))
    return same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--js", type=Path, help="llama-tokenizer.js (default: fetched with npm pack)")
    parser.add_argument("--out", type=Path, default=HERE / "llama_tokenizer")
    parser.add_argument("--check", action="store_true", help="compare with the package's encoder under node")
    args = parser.parse_args(argv)
    js = args.js.read_text(encoding="utf-8") if args.js else fetch_js()
    tok = build(*vocab_and_merges(js))
    write(tok, args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.get_vocab_size()} tokens)")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            js_path = Path(tmp) / "llama-tokenizer.mjs"
            js_path.write_text(js, encoding="utf-8")
            return 0 if check(tok, js_path) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
