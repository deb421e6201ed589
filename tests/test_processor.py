"""Processor parity with transformers' IdeficsProcessor: ids, masks, pixels, padding, end-of-utterance, sources;
processor files as transformers 5 saves them and as on the hub; the image processor settings' checks."""
import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import make_processor_dir, reference_processor, serve
from PIL import Image
from transformers.image_utils import load_image as reference_load_image

from idefics.errors import IdeficsError
from idefics.images import ImageLimits, ImageTransform
from idefics.processor import Processor


def noise(size=(40, 30), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


A, B, C = noise(seed=1), noise((64, 20), seed=2), noise((17, 33), seed=3)
CHAT = ["User: What is in this image?", A, "<end_of_utterance>",
        "\nAssistant: This picture depicts Idefix, the dog of Obelix.<end_of_utterance>",
        "\nUser:", B, "And who is that?<end_of_utterance>", "\nAssistant:"]


@pytest.fixture(scope="module", params=[("saved", "left"), ("saved", "right"), ("hub", "left")],
                ids=["saved-left", "saved-right", "hub-left"])
def pair(request, tmp_path_factory):
    layout, side = request.param
    path = make_processor_dir(tmp_path_factory.mktemp("proc"), instruct=True, layout=layout, padding_side=side,
                              **({"legacy": True} if layout == "hub" else {}))
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


@pytest.mark.parametrize("layout", ["saved", "hub"])
@pytest.mark.parametrize("instruct", [True, False], ids=["instruct", "base"])
def test_end_of_utterance_default_is_transformers_4_37s(tmp_path, instruct, layout):
    """Given nothing, <end_of_utterance> goes between consecutive texts when the tokenizer lists it among its
    additional special tokens (transformers 4.37.2's default; transformers 5 lost it, so the reference is told)."""
    path = make_processor_dir(tmp_path, instruct=instruct, layout=layout)
    ours, ref = Processor.from_dir(path), reference_processor(path)
    for name in ("consecutive texts", "chat", "image then text"):
        prompt = PROMPTS[name]
        assert_same(ours(prompt), ref(text=prompt, add_end_of_utterance_token=instruct))
        assert_same(ours(prompt, add_end_of_utterance_token=None), ours(prompt))
    ids = ours(PROMPTS["consecutive texts"])["input_ids"][0].tolist()
    assert ours.tokenizer.end_of_utterance_id is None or ids.count(ours.tokenizer.end_of_utterance_id) == 2


def test_end_of_utterance_option_must_be_a_bool(pair):
    ours, _ = pair
    assert error_of(ours, ["a", "b"], add_end_of_utterance_token="yes") == (
        "add_end_of_utterance_token must be true, false or None, got 'yes'")


def test_end_of_utterance_goes_between_consecutive_texts(pair):
    ours, _ = pair
    tok = ours.tokenizer
    ids = ours(["User:", "Hi", A, "there"], add_end_of_utterance_token=True)["input_ids"][0].tolist()
    assert ids.count(tok.end_of_utterance_id) == 1
    text = tok.decode(ids[ids.index(tok.bos_id):]).replace(" ", "")  # a legacy tokenizer marks spaces after specials
    assert text.startswith("<s>User:<end_of_utterance>Hi<fake_token_around_image>")


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


# The image processor's settings: from processor_config.json (transformers 5) or preprocessor_config.json (hub).

SETTINGS_FILES = {"saved": ("processor_config.json", "image_processor."), "hub": ("preprocessor_config.json", "")}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """layout -> a processor directory of 42 px images in that layout."""
    return {layout: make_processor_dir(tmp_path_factory.mktemp(layout), image_size=42, layout=layout)
            for layout in SETTINGS_FILES}


def with_settings(layouts, layout, tmp_path, **changes):
    """A copy of the layout's processor directory with its image processor settings changed -> (dir, file, prefix)."""
    path = shutil.copytree(layouts[layout], tmp_path / layout)
    name, prefix = SETTINGS_FILES[layout]
    config = json.loads((path / name).read_text())
    (config["image_processor"] if prefix else config).update(changes)
    (path / name).write_text(json.dumps(config))
    return path, path / name, prefix


@pytest.mark.parametrize("layout", SETTINGS_FILES)
def test_image_settings_match_reference_in_both_layouts(layouts, layout):
    path = layouts[layout]
    assert not (path / ("preprocessor_config.json" if layout == "saved" else "processor_config.json")).exists()
    ours, ref = Processor.from_dir(path), reference_processor(path)
    assert ours.image_transform == ImageTransform(image_size=42) and ref.image_processor.image_size == 42
    prompt = ["Look:", A, B, "Describe."]
    assert_same(ours(prompt), ref(text=prompt))


@pytest.mark.parametrize("layout", SETTINGS_FILES)
def test_image_settings_of_other_values_match_reference(layouts, layout, tmp_path):
    path, _, _ = with_settings(layouts, layout, tmp_path, image_size=None, size={"height": 20, "width": 20},
                               image_mean=0.5, image_std=[0.2, 0.3, 0.4], rescale_factor=0.5 / 255)
    ours, ref = Processor.from_dir(path), reference_processor(path)
    assert ours.image_transform.image_size == 20
    prompt = [A, "Describe.", C]
    assert_same(ours(prompt), ref(text=prompt))


def test_processor_config_without_image_processor_falls_back_to_preprocessor_config(layouts, tmp_path):
    """As transformers: processor_config.json of transformers 4 held no image processor settings."""
    path = shutil.copytree(layouts["hub"], tmp_path / "hub")
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "IdeficsProcessor"}))
    assert Processor.from_dir(path).image_transform.image_size == reference_processor(path).image_processor.image_size == 42


def test_processor_config_wins_over_preprocessor_config(layouts, tmp_path):
    path = shutil.copytree(layouts["saved"], tmp_path / "saved")
    other = json.loads((layouts["hub"] / "preprocessor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps(other | {"image_size": 30, "size": {"height": 30, "width": 30}}))
    assert Processor.from_dir(path).image_transform.image_size == reference_processor(path).image_processor.image_size == 42


BAD_SETTINGS = {  # name -> (changed settings, error after "<file>: <prefix>")
    "image_size 0": ({"image_size": 0}, "image_size must be a positive integer, got 0"),
    "negative image_size": ({"image_size": -224}, "image_size must be a positive integer, got -224"),
    "image_size text": ({"image_size": "224"}, "image_size must be a positive integer, got '224'"),
    "image_size fraction": ({"image_size": 22.5}, "image_size must be a positive integer, got 22.5"),
    "size 0": ({"image_size": None, "size": {"height": 0, "width": 0}}, "image_size must be a positive integer, got 0"),
    "size not square": ({"image_size": None, "size": {"height": 30, "width": 20}},
                        "size must be a square {height, width}, got {'height': 30, 'width': 20}"),
    "size of another kind": ({"image_size": None, "size": {"shortest_edge": 30}},
                             "size must be a square {height, width}, got {'shortest_edge': 30}"),
    "image_std with 0": ({"image_std": [0.27, 0, 0.28]},
                         "image_std must be a number or a list of 3 positive numbers, got [0.27, 0, 0.28]"),
    "image_std 0": ({"image_std": 0}, "image_std must be a number or a list of 3 positive numbers, got 0"),
    "image_std negative": ({"image_std": [-0.27, 0.26, 0.28]},
                           "image_std must be a number or a list of 3 positive numbers, got [-0.27, 0.26, 0.28]"),
    "image_std of 2": ({"image_std": [0.27, 0.26]},
                       "image_std must be a number or a list of 3 positive numbers, got [0.27, 0.26]"),
    "image_std text": ({"image_std": "0.27"}, "image_std must be a number or a list of 3 positive numbers, got '0.27'"),
    "image_mean of 4": ({"image_mean": [0.5, 0.5, 0.5, 0.5]},
                        "image_mean must be a number or a list of 3 numbers, got [0.5, 0.5, 0.5, 0.5]"),
    "image_mean of texts": ({"image_mean": ["a", "b", "c"]},
                            "image_mean must be a number or a list of 3 numbers, got ['a', 'b', 'c']"),
    "image_mean object": ({"image_mean": {"r": 0.5}}, "image_mean must be a number or a list of 3 numbers, got {'r': 0.5}"),
    "image_mean true": ({"image_mean": True}, "image_mean must be a number or a list of 3 numbers, got True"),
    "rescale_factor 0": ({"rescale_factor": 0}, "rescale_factor must be a positive number, got 0"),
    "4 channels": ({"image_num_channels": 4}, "image_num_channels must be 3 (images are RGB), got 4"),
}


@pytest.mark.parametrize("layout", SETTINGS_FILES)
@pytest.mark.parametrize("name", BAD_SETTINGS)
def test_bad_image_settings_are_one_error_naming_the_file(layouts, layout, tmp_path, name):
    changes, message = BAD_SETTINGS[name]
    path, file, prefix = with_settings(layouts, layout, tmp_path, **changes)
    with pytest.raises(IdeficsError) as info:
        Processor.from_dir(path)
    assert str(info.value) == f"{file}: {prefix}{message}"


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read {file}: "),
    ("[224]", "{file}: expected a JSON object"),
    ('{"image_processor": 224}', "{file}: image_processor must be a JSON object"),
])
def test_unreadable_processor_config_is_one_error_naming_the_file(layouts, tmp_path, text, message):
    path = shutil.copytree(layouts["saved"], tmp_path / "saved")
    (path / "processor_config.json").write_text(text)
    with pytest.raises(IdeficsError) as info:
        Processor.from_dir(path)
    assert str(info.value).startswith(message.format(file=path / "processor_config.json"))
