"""Processor parity with transformers' IdeficsProcessor: ids, masks, pixels, padding, end-of-utterance, sources."""
import base64
import io

import numpy as np
import pytest
import torch
from helpers import make_processor_dir, reference_processor, serve
from PIL import Image
from transformers.image_utils import load_image as reference_load_image

from idefics.errors import IdeficsError
from idefics.images import ImageLimits
from idefics.processor import Processor


def noise(size=(40, 30), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


A, B, C = noise(seed=1), noise((64, 20), seed=2), noise((17, 33), seed=3)
CHAT = ["User: What is in this image?", A, "<end_of_utterance>",
        "\nAssistant: This picture depicts Idefix, the dog of Obelix.<end_of_utterance>",
        "\nUser:", B, "And who is that?<end_of_utterance>", "\nAssistant:"]


@pytest.fixture(scope="module", params=["left", "right"])
def pair(request, tmp_path_factory):
    path = make_processor_dir(tmp_path_factory.mktemp("proc"), instruct=True, padding_side=request.param)
    return Processor.from_dir(path), reference_processor(path)


def assert_same(ours: dict, ref) -> None:
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "image_attention_mask"}
    for key, value in ours.items():
        assert value.dtype == ref[key].dtype, key
        assert value.shape == ref[key].shape, key
        assert torch.equal(value, ref[key]), key


PROMPTS = {
    "text only": ["Hello world, a prompt without images."],
    "image only": [A],
    "image then text": [A, "This is an image of "],
    "text before the first image": ["User:", A, "Describe this image.\nAssistant:"],
    "three images, two consecutive": ["Look:", A, B, " and then ", C, "Story: \n"],
    "consecutive texts": ["User:", "Describe this image.\nAssistant: An image.\n", "User:", A, "Describe it."],
    "chat": CHAT,
    "EOS inside text": [A, "first</s>second", B, "third</s>after"],
}


@pytest.mark.parametrize("name", PROMPTS)
def test_single_prompt_matches_reference(pair, name):
    ours, ref = pair
    assert_same(ours(PROMPTS[name]), ref(text=PROMPTS[name]))


@pytest.mark.parametrize("eou", [True, False])
@pytest.mark.parametrize("name", ["consecutive texts", "chat"])
def test_end_of_utterance_option_matches_reference(pair, name, eou):
    ours, ref = pair
    assert_same(ours(PROMPTS[name], add_end_of_utterance_token=eou),
                ref(text=PROMPTS[name], add_end_of_utterance_token=eou))


def test_end_of_utterance_goes_between_consecutive_texts(pair):
    ours, _ = pair
    tok = ours.tokenizer
    ids = ours(["User:", "Hi", A, "there"], add_end_of_utterance_token=True)["input_ids"][0].tolist()
    assert ids.count(tok.end_of_utterance_id) == 1
    assert tok.decode(ids[ids.index(tok.bos_id):]).startswith("<s>User:<end_of_utterance>Hi<fake_token_around_image>")


def test_batch_with_padding_and_a_prompt_without_images(pair):
    ours, ref = pair
    batch = [[A, "This is an image of "],
             ["Only text in this prompt, which is longer than the others by quite a few words."],
             ["Three:", A, B, C, "Story: \n"]]
    out = ours(batch)
    assert_same(out, ref(text=batch))
    assert out["pixel_values"].shape[:2] == (3, 3)
    assert not out["image_attention_mask"][1].any()  # the text-only prompt sees no image
    assert not out["pixel_values"][1].any() and not out["pixel_values"][0, 1:].any()  # zero padding


def test_batch_without_any_image(pair):
    ours, ref = pair
    batch = [["short"], ["a longer prompt with no image at all"]]
    out = ours(batch)
    assert_same(out, ref(text=batch))
    assert out["image_attention_mask"].dtype == torch.bool and out["pixel_values"].shape[1] == 1


def test_padding_side_follows_tokenizer(pair):
    ours, _ = pair
    mask = ours([["a"], ["a much longer prompt than the first one"]])["attention_mask"]
    assert mask[0, 0 if ours.tokenizer.padding_side == "right" else -1] == 1
    assert mask[0, -1 if ours.tokenizer.padding_side == "right" else 0] == 0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK"])
def test_image_modes_match_reference(pair, mode):
    ours, ref = pair
    prompt = ["Mode:", noise(seed=4, mode=mode), "Describe."]
    assert_same(ours(prompt), ref(text=prompt))


def test_sources_match_reference_given_the_loaded_image(pair, tmp_path):
    ours, ref = pair
    buf = io.BytesIO()
    noise((50, 23), seed=5, mode="RGBA").save(buf, "PNG")
    data = buf.getvalue()
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    loaded = reference_load_image(str(path))
    expected = ref(text=[["Path:", loaded, "Bytes:", loaded, "URI:", loaded]])
    assert_same(ours([["Path:", path, "Bytes:", data, "URI:", uri]]), expected)


def test_urls_match_reference_fetching_them(pair):
    ours, ref = pair
    buf = io.BytesIO()
    noise((30, 45), seed=6).save(buf, "JPEG")
    with serve({"/dog.jpg": ("image/jpeg", buf.getvalue())}) as base:
        prompt = ["User:", base + "/dog.jpg", "Describe this image.\nAssistant:", f"  {base}/dog.jpg "]
        assert_same(ours(prompt), ref(text=prompt))


def test_literal_image_token_in_text_matches_reference(pair):
    ours, ref = pair
    prompt = ["Before <image> inside text", A, "after"]
    assert_same(ours(prompt), ref(text=prompt))


def test_lone_item_and_single_prompt_are_batches_of_one(pair):
    ours, _ = pair
    for short, full in [("only text", [["only text"]]), (A, [[A]]), (("a", A), [["a", A]])]:
        for key, value in ours(short).items():
            assert torch.equal(value, ours(full)[key])


def error_of(processor, prompts, **options) -> str:
    with pytest.raises(IdeficsError) as info:
        processor(prompts, **options)
    return str(info.value)


def test_errors_name_the_item(pair, tmp_path):
    ours, _ = pair
    assert error_of(ours, []) == "empty prompt: give at least one text or image item"
    assert error_of(ours, [["fine"], []]) == "prompt 1, empty prompt: give at least one text or image item"
    assert error_of(ours, ["text", 42]).startswith("item 1: unsupported item of type int")
    assert error_of(ours, [["ok"], "not a list"]) == "prompt 1: expected a list of items in a batch, got str"
    missing = tmp_path / "missing.png"
    assert error_of(ours, [["ok"], ["a", A, missing]]) == f"prompt 1, item 2: {missing}: no such image file"
    assert error_of(ours, [b"not an image", "x"]) == "item 0: image bytes (12 bytes): not an image (unrecognized format)"
    small = Processor(ours.tokenizer, ours.image_transform, ImageLimits(max_pixels=100))
    path = tmp_path / "big.png"
    noise((50, 23)).save(path)
    assert error_of(small, ["x", path]) == f"item 1: {path}: image is 50x23 pixels, over the limit of 100"
