"""Tokenizer parity with transformers on tiny hub-layout tokenizers, and incremental detokenization."""
import json

import pytest
from helpers import make_tokenizer_dir, reference_tokenizer

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


@pytest.fixture(scope="module", params=[None, True, False], ids=["legacy-unset", "legacy", "not-legacy"])
def pair(request, tmp_path_factory):
    path = make_tokenizer_dir(tmp_path_factory.mktemp("tok"), instruct=True, legacy=request.param)
    return Tokenizer.from_dir(path), reference_tokenizer(path)


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


@pytest.mark.parametrize("legacy", [None, False, True])
def test_space_marker_after_a_special_token_only_when_legacy(tmp_path, legacy):
    # transformers 5 rebuilds the Llama pipeline: unless `legacy` is true, text right after a special token (BOS,
    # image tokens) gets no leading "▁", unlike the raw tokenizer.json.
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, legacy=legacy))
    after_bos = tok.backend.id_to_token(tok.encode("<s>User:")[1])
    assert after_bos.startswith("▁") == bool(legacy)


def test_base_tokenizer_has_no_end_of_utterance(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path))
    assert tok.end_of_utterance_id is None and tok.image_id is not None


def test_padding_side_from_config(tmp_path):
    path = make_tokenizer_dir(tmp_path, padding_side="right")
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
