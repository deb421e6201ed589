"""Tokenizer parity with transformers on tiny tokenizers, as transformers 5's save_pretrained writes them and in the
hub's layout (with "legacy" true, false or absent), and incremental detokenization."""
import json
import random
from pathlib import Path

import pytest
from helpers import make_processor_dir, reference_tokenizer
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from idefics.errors import IdeficsError
from idefics.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "User:<fake_token_around_image><image><fake_token_around_image>Describe this image.\nAssistant:",
    "<s>Instruction: Provide an answer.\n<image> after a special token",
    "Café au lait, Tōkyō 東京 🙂 ünïcödé",
    "a  b\n\n c",
    "",
]


LAYOUTS = {  # name -> (layout, legacy)
    "saved": ("saved", None),
    "hub-legacy": ("hub", True),  # the released checkpoints' tokenizer_config.json
    "hub-legacy-unset": ("hub", None),
    "hub-not-legacy": ("hub", False),
}


def tokenizer_dir(path, name: str, **options):
    layout, legacy = LAYOUTS[name]
    return make_processor_dir(path, layout=layout, legacy=legacy, **options)


@pytest.fixture(scope="module", params=LAYOUTS)
def pair(request, tmp_path_factory):
    path = tokenizer_dir(tmp_path_factory.mktemp("tok"), request.param, instruct=True)
    return Tokenizer.from_dir(path), reference_tokenizer(path)


def test_saved_layout_is_transformers_5s(tmp_path):
    path = tokenizer_dir(tmp_path, "saved", instruct=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert not (path / "special_tokens_map.json").exists() and "legacy" not in config
    assert config["extra_special_tokens"] == ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_reference(pair, text):
    ours, ref = pair
    assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_reference(pair, text, skip):
    ours, ref = pair
    ids = [ref.bos_token_id] + ours.encode(text) + [ref.eos_token_id]
    assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_padding_side_match_reference(pair):
    ours, ref = pair
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.unk_token_id, ref.pad_token_id)
    assert ours.padding_side == ref.padding_side == "left"
    assert ours.vocab_size == len(ref)
    for token_id, token in [(ours.fake_image_id, "<fake_token_around_image>"), (ours.image_id, "<image>"),
                            (ours.end_of_utterance_id, "<end_of_utterance>")]:
        assert token_id == ref.convert_tokens_to_ids(token)
    assert list(ours.additional_special_tokens) == ref.extra_special_tokens == [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>"]


@pytest.mark.parametrize("layout, legacy, marker", [("hub", None, False), ("hub", False, False), ("hub", True, True),
                                                   ("saved", True, False)])
def test_space_marker_after_a_special_token_only_when_legacy(tmp_path, layout, legacy, marker):
    # transformers 5 rebuilds the Llama pipeline: unless `legacy` is true, text right after a special token (BOS,
    # image tokens) gets no leading "▁", unlike the raw tokenizer.json. Its save_pretrained does not write `legacy`,
    # so a legacy tokenizer saved again loses the marker.
    path = make_processor_dir(tmp_path, layout=layout, legacy=legacy)
    tok = Tokenizer.from_dir(path)
    ids = tok.encode("<s>User:")
    assert tok.backend.id_to_token(ids[1]).startswith("▁") == marker
    assert ids == reference_tokenizer(path)("<s>User:", add_special_tokens=False).input_ids


@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_base_tokenizer_has_no_end_of_utterance(tmp_path, layout):
    tok = Tokenizer.from_dir(make_processor_dir(tmp_path, layout=layout))
    assert tok.end_of_utterance_id is None and tok.image_id is not None
    assert tok.additional_special_tokens == ("<fake_token_around_image>", "<image>")


@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_padding_side_from_config(tmp_path, layout):
    path = make_processor_dir(tmp_path, layout=layout, padding_side="right")
    assert Tokenizer.from_dir(path).padding_side == reference_tokenizer(path).padding_side == "right"


def test_detokenizer_pieces_concatenate_to_full_decode(pair):
    ours, _ = pair
    text = "User: Café 東京 🙂🙂 done.<end_of_utterance>\nAssistant: ünïcödé"
    ids = [ours.bos_id] + ours.encode(text)
    for skip in (False, True):
        stream = ours.detokenizer(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)  # a byte-fallback emoji is never split
        assert sum(1 for p in pieces if p) > 5  # it does stream


def test_detokenizer_takes_chunks(pair):
    ours, _ = pair
    ids = ours.encode("A puppy in a flower bed 🙂")
    stream = ours.detokenizer()
    assert stream.push(ids[:3]) + stream.push(ids[3:]) + stream.flush() == ours.decode(ids)


def test_detokenizer_joins_to_decode_through_invalid_byte_runs():
    """Random mixes of byte-fallback pieces (valid and invalid UTF-8: an invalid run decodes as U+FFFD per byte, its
    ASCII bytes included, so earlier bytes change with later ones), special tokens and words."""
    import random
    import re

    from idefics.hub import DEMO_DIR

    tok = Tokenizer.from_dir(DEMO_DIR)
    vocab = tok.backend.get_vocab_size()
    byte_ids = [i for i in range(vocab) if re.fullmatch(r"<0x[0-9A-F]{2}>", tok.backend.id_to_token(i) or "")]
    assert len(byte_ids) == 256
    rng = random.Random(0)
    for _ in range(400):
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
        for skip in (False, True):
            stream = tok.detokenizer(skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


def test_missing_tokenizer_json_is_one_clear_error(tmp_path):
    with pytest.raises(IdeficsError, match="no tokenizer.json in"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_json_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(IdeficsError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)


def _llama_tokenizer():
    """The IDEFICS checkpoints' own tokenizer files (Llama's vocabulary and the image tokens), kept with bench/."""
    return Tokenizer.from_dir(Path(__file__).parent.parent / "bench" / "llama_tokenizer")


@pytest.mark.parametrize("which", ["tiny", "demo", "llama"])
def test_no_token_stands_for_more_characters_than_piece_chars(pair, which):
    """fits() refuses a text by its length alone, so the bound must hold for every text: random runs of the
    longest pieces, spaces, special-token strings, byte-fallback characters and words never make fewer tokens
    than their length over piece_chars; the longest piece alone is one token of exactly piece_chars."""
    from idefics.hub import DEMO_DIR

    tok = {"tiny": lambda: pair[0], "demo": lambda: Tokenizer.from_dir(DEMO_DIR), "llama": _llama_tokenizer}[which]()
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert tok.piece_chars == max(map(len, vocab))
    longest = sorted(vocab, key=len)[-40:]
    words = [p.replace("\u2581", " ") for p in longest]
    words += [" " * 17, "<image>", "<s>", "ÿ", "東京", "🙂", "a", "\n"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        ids = tok.encode(text)
        assert len(text) <= len(ids) * tok.piece_chars, (text, ids)
    piece = max(vocab, key=len)
    assert len(tok.encode(piece)) == 1 and tok.fits(len(piece), 1) and not tok.fits(len(piece) + 1, 1)


def _bare(backend: Backend) -> Tokenizer:
    return Tokenizer(backend, bos_token=None, eos_token=None, unk_token="<unk>", pad_token=None, padding_side="left")


def _metaspace_bpe(**options) -> Backend:
    backend = Backend(models.BPE(vocab={"<unk>": 0, "a": 1, "\u2581": 2}, merges=[], unk_token="<unk>", **options))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    return backend


def test_piece_chars_is_unknown_where_one_token_can_stand_for_any_length():
    """Where a token can cover unbounded text, no length is refused: unknown characters fused into one <unk>,
    an added token that swallows the spaces around it, a normalizer (which may shorten text)."""
    fused = _bare(_metaspace_bpe(fuse_unk=True))
    assert len(fused.encode("z" * 1000)) == 1 and fused.piece_chars is None and fused.fits(10**9, 1)
    assert _bare(_metaspace_bpe(fuse_unk=False)).piece_chars == 5  # "<unk>": each unknown character a token
    swallowing = _metaspace_bpe(fuse_unk=False)
    swallowing.add_special_tokens([AddedToken("<x>", lstrip=True)])
    assert len(swallowing.encode(" " * 1000 + "<x>").ids) == 1 and _bare(swallowing).piece_chars is None
    normalized = _metaspace_bpe(fuse_unk=False)
    normalized.normalizer = normalizers.Replace(Regex("a+"), "a")
    assert len(normalized.encode("a" * 1000).ids) == 1 and _bare(normalized).piece_chars is None
