"""The demo model's tokenizer: a Llama-style BPE (byte fallback, "▁" for spaces, <unk>/<s>/</s> first) trained on
the demo's own texts, then the three IDEFICS tokens after the base vocabulary, as in idefics-9b-instruct."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from idefics.demo import data
from idefics.demo.scenes import COLORS, SHAPES
from idefics.tokenizer import END_OF_UTTERANCE_TOKEN, FAKE_IMAGE_TOKEN, IMAGE_TOKEN

MAX_VOCAB = 1024  # the trainer stops earlier once every piece of the corpus is one token
EXTRA_TOKENS = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN]
SPECIALS = ["<unk>", "<s>", "</s>"]
# Training pieces: a counted colored object ("▁an▁orange▁star", "▁two▁red▁circles"), a word with its "▁", or one
# other character. Merges are learned inside pieces only, so tokens end at word boundaries and a colored object
# can become one token: a three-shape caption then fits the guide's 10 new tokens.
_PIECE = (rf"(?:▁(?:[Aa]n?|one|two|three))?▁(?:{'|'.join(COLORS)})▁(?:{'|'.join(SHAPES)})s?"
          r"|▁?[A-Za-z0-9']+|▁|[^▁A-Za-z0-9']")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in EXTRA_TOKENS + SPECIALS) + ")")


def segments(example: data.Example) -> list[str]:
    """The pieces of text the tokenizer will see for this example, spelled as its BPE sees them. The loaded
    tokenizer (idefics.tokenizer) treats all text between two special tokens as one word, with no "▁" added
    after a special token; the answer is encoded on its own, after a space."""
    # Text items lose their outer spaces in the processor, as in the reference.
    text = "".join(item.strip(" ") if isinstance(item, str) else IMAGE_TOKEN for item in example.prompt)
    pieces = _SPECIAL_SPLIT.split(text) + _SPECIAL_SPLIT.split(" " + example.answer)
    return [p.replace(" ", "▁") for p in pieces if p and not _SPECIAL_SPLIT.fullmatch(p)]


def corpus(seed: int, size: int = 30000) -> list[str]:
    rng = random.Random(f"vocab-{seed}")
    out = []
    for _ in range(size):
        for example in data.sample_examples(rng):
            out += segments(example)
    return out


def build_tokenizer(path: str | Path, seed: int = 0) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (the hub's Llama layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB, special_tokens=SPECIALS + byte_tokens, show_progress=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    draft.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    draft.train_from_iterator(corpus(seed), trainer)

    tok = Tokenizer(draft.model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS + EXTRA_TOKENS])
    tok.save(str(path / "tokenizer.json"))

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
              "clean_up_tokenization_spaces": False, "eos_token": added("</s>"), "legacy": False,
              "model_max_length": 512, "pad_token": None, "padding_side": "left", "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", "unk_token": added("<unk>")}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"additional_special_tokens": EXTRA_TOKENS, "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<unk>", "unk_token": "<unk>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return path
