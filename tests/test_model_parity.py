"""Logits equal to transformers' IdeficsForVisionText2Text on tiny random checkpoints, across every branch, in the
layout transformers' save_pretrained writes today and in the hub's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from checkpoints import make_checkpoint
from helpers import reference_processor
from idefics.errors import IdeficsError


def image(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


PROMPTS = [
    ["A prompt with no image at all."],
    [image(1), "This is an image of "],
    ["User:", image(2), "Describe this image.\nAssistant: a photo.\n", "User:", image(3), image(4),
     "Describe these.\nAssistant:"],  # 3 images, two of them consecutive
    ["Text before", image(5), "and after the image."],
]

CONFIGS = {
    "resampler-qknorm-interval2": {},
    "no-resampler-interval1": dict(use_resampler=False, cross_layer_interval=1,
                                   perceiver=dict(use_resampler=False)),
    "no-qknorms-interval4-vector-gates": dict(qk_layer_norms=False, cross_layer_interval=4, alpha_type="vector",
                                              perceiver=dict(qk_layer_norms_perceiver=False)),
    "interval3-6heads-image42": dict(cross_layer_interval=3, num_hidden_layers=6, hidden_size=48,
                                     num_attention_heads=6, vision=dict(image_size=42, patch_size=14,
                                                                        num_attention_heads=3)),
    "instruct-vocab3-1head-quickgelu": dict(additional_vocab_size=3, num_attention_heads=1,
                                            vision=dict(hidden_act="quick_gelu", num_attention_heads=1)),
}


def assert_logits_match(m, ref, prompts):
    batch = m.process(prompts)
    with torch.no_grad():
        expected = ref(**batch).logits
    got = m.logits(prompts)
    assert got.shape == expected.shape
    real = batch["attention_mask"].bool()  # padding positions are garbage in both
    diff = (got - expected)[real].abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_reference(tmp_path, name):
    overrides = dict(CONFIGS[name])
    instruct = overrides.get("additional_vocab_size") == 3
    path, ref = make_checkpoint(tmp_path, instruct=instruct, **overrides)
    m = idefics.load(path, device="cpu")
    assert m.dtype == torch.float32
    assert_logits_match(m, ref, PROMPTS)  # one padded batch: 0, 1, 3 images
    for prompt in PROMPTS:  # and each prompt alone
        assert_logits_match(m, ref, [prompt])


def test_gates_really_open_in_test_checkpoints(tmp_path):
    """Cross-attention must change the logits, or the parity tests would not see it."""
    path, _ = make_checkpoint(tmp_path)
    m = idefics.load(path)
    a = m.logits([[image(1), "This is an image of "]])
    b = m.logits([[image(2), "This is an image of "]])
    assert (a - b).abs().max() > 1e-2


def test_bin_weights_load_like_safetensors(tmp_path):
    path, ref = make_checkpoint(tmp_path, weights="bin")
    assert (path / "pytorch_model.bin").exists() and not list(path.glob("*.safetensors"))
    assert_logits_match(idefics.load(path), ref, PROMPTS[1:3])


def test_sharded_safetensors_have_an_index(tmp_path):
    path, ref = make_checkpoint(tmp_path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 3
    assert_logits_match(idefics.load(path), ref, PROMPTS[:2])


def test_bfloat16_logits_close_to_reference(tmp_path):
    path, ref = make_checkpoint(tmp_path)
    m = idefics.load(path, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    batch = m.process(PROMPTS[1:3])
    with torch.no_grad():
        expected = ref(**batch).logits
    got = m.logits(PROMPTS[1:3])
    real = batch["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(got[real], expected[real], dim=-1)
    assert cos.min() > 0.99


def assert_reference_inputs_and_logits(m, ref, path, prompts):
    """The reference processor's inputs for each prompt equal ours, and so do the logits on them."""
    processor = reference_processor(path)
    for prompt in prompts:
        expected = processor(text=[prompt])
        got = m.process([prompt])
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        with torch.no_grad():
            want = ref(**expected).logits
        assert (m.logits([prompt]) - want).abs().max().item() <= 1e-4


def test_processor_config_only_checkpoint_of_another_image_size(tmp_path):
    """transformers 5's layout (processor_config.json, tokenizer files without special_tokens_map.json) with 42 px
    images: logits and greedy generation as transformers'."""
    path, ref = make_checkpoint(tmp_path, **CONFIGS["interval3-6heads-image42"])
    assert (path / "processor_config.json").is_file()
    assert not (path / "preprocessor_config.json").exists() and not (path / "special_tokens_map.json").exists()
    m = idefics.load(path)
    assert m.processor.image_transform.image_size == 42
    assert_reference_inputs_and_logits(m, ref, path, PROMPTS)
    processor = reference_processor(path)
    for prompt in PROMPTS[1:3]:
        inputs = processor(text=[prompt])
        with torch.no_grad():  # <fake_token_around_image> and <image> are banned in ours by default
            out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=2, bad_words_ids=[[600], [601]])
        [completion] = m.generate([prompt], max_new_tokens=8)
        assert completion.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("instruct", [False, True], ids=["base", "instruct"])
def test_hub_layout_checkpoint_matches_reference(tmp_path, instruct):
    """The released checkpoints' layout: preprocessor_config.json, special_tokens_map.json, "legacy": true."""
    path, ref = make_checkpoint(tmp_path, instruct=instruct, layout="hub")
    assert (path / "preprocessor_config.json").is_file() and (path / "special_tokens_map.json").is_file()
    assert not (path / "processor_config.json").exists()
    assert json.loads((path / "tokenizer_config.json").read_text())["legacy"] is True
    assert_reference_inputs_and_logits(idefics.load(path), ref, path, PROMPTS)


def test_image_size_unlike_the_models_is_one_error_at_load(tmp_path):
    path, _ = make_checkpoint(tmp_path, **CONFIGS["interval3-6heads-image42"])
    file = path / "processor_config.json"
    config = json.loads(file.read_text())
    config["image_processor"].update(image_size=30, size={"height": 30, "width": 30})
    file.write_text(json.dumps(config))
    with pytest.raises(IdeficsError, match="images are resized to 30 px .* vision_config.image_size is 42$"):
        idefics.load(path)
    file.unlink()  # no image processor settings at all: the reference's default, 224
    with pytest.raises(IdeficsError, match="images are resized to 224 px .* vision_config.image_size is 42$"):
        idefics.load(path)


def test_end_of_utterance_default_reaches_the_api(tmp_path):
    """logits, generate and stream leave add_end_of_utterance_token to the processor: on for an instruct tokenizer."""
    path, _ = make_checkpoint(tmp_path, instruct=True)
    m = idefics.load(path)
    prompt = ["User:", "Hi", image(1), "Describe it.\nAssistant:"]
    on, off = (m.logits(prompt, add_end_of_utterance_token=flag) for flag in (True, False))
    assert torch.equal(m.logits(prompt), on) and on.shape[1] == off.shape[1] + 1
    [default] = m.generate([prompt], max_new_tokens=6)
    assert default.token_ids == m.generate([prompt], max_new_tokens=6, add_end_of_utterance_token=True)[0].token_ids
    assert "".join(m.stream(prompt, max_new_tokens=6)) == default.text
