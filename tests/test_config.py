"""config.json: every field we read is held to its type and bounds, with one line naming the file and the field."""
from __future__ import annotations

import copy
import json
import os
import time

import pytest
from checkpoints import make_checkpoint, tiny_config

import idefics
from idefics.config import IdeficsConfig, idefics_9b, idefics_80b, to_dict
from idefics.errors import IdeficsError


def config_with(*edits) -> dict:
    """The tiny reference config as written to config.json, with (key path, value) edits."""
    d = copy.deepcopy(tiny_config()) | {"model_type": "idefics"}
    for path, value in edits:
        *parents, key = path.split(".")
        target = d
        for p in parents:
            target = target[p]
        target[key] = value
    return d


def assert_refused(d: dict, *fragments):
    with pytest.raises(IdeficsError) as info:
        IdeficsConfig.from_dict(d)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config.json: ")
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("path, value, message", [
    ("num_attention_heads", 0, "field 'num_attention_heads' must be from 1 to 1024, got 0"),
    ("vision_config.patch_size", 0, "field 'vision_config.patch_size' must be from 1 to 4096, got 0"),
    ("vision_config.num_attention_heads", 0, "field 'vision_config.num_attention_heads' must be from 1 to 1024"),
    ("perceiver_config.resampler_n_heads", 0, "field 'perceiver_config.resampler_n_heads' must be from 1 to 1024"),
    ("perceiver_config.resampler_head_dim", -8, "field 'perceiver_config.resampler_head_dim' must be from 1 to"),
    ("hidden_size", "32", "field 'hidden_size' must be an integer, got '32'"),
    ("hidden_size", 32.0, "field 'hidden_size' must be an integer, got 32.0"),
    ("hidden_size", True, "field 'hidden_size' must be an integer, got True"),
    ("hidden_size", 30, "field 'hidden_size' must be a multiple of 2 x num_attention_heads (8), got 30"),
    ("hidden_size", 36, "field 'hidden_size' must be a multiple of 2 x num_attention_heads (8), got 36"),
    ("vision_config.embed_dim", 25, "field 'vision_config.embed_dim' must be a multiple of num_attention_heads (2)"),
    ("num_hidden_layers", 10**9, "field 'num_hidden_layers' must be from 1 to 1024, got 1000000000"),
    ("vision_config.num_hidden_layers", 10**6, "field 'vision_config.num_hidden_layers' must be from 1 to 1024"),
    ("perceiver_config.resampler_depth", 5000, "field 'perceiver_config.resampler_depth' must be from 1 to 1024"),
    ("intermediate_size", 10**12, "field 'intermediate_size' must be from 1 to 131072"),
    ("vocab_size", 0, "field 'vocab_size' must be from 1 to"),
    ("max_position_embeddings", 10**10, "field 'max_position_embeddings' must be from 1 to 1048576"),
    ("cross_layer_interval", 3, "field 'num_hidden_layers' must be a multiple of cross_layer_interval (3), got 4"),
    ("cross_layer_interval", 0, "field 'cross_layer_interval' must be from 1 to 1024, got 0"),
    ("rms_norm_eps", 0, "field 'rms_norm_eps' must be above 0 and at most 1, got 0.0"),
    ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' must be a finite number, got '1e-6'"),
    ("rope_theta", -1, "field 'rope_theta' must be above 0, got -1.0"),
    ("hidden_act", "swish", "field 'hidden_act' must be one of gelu, gelu_new"),
    ("vision_config.hidden_act", 3, "field 'vision_config.hidden_act' must be a string, got 3"),
    ("alpha_type", "matrix", "field 'alpha_type' must be 'float' or 'vector', got 'matrix'"),
    ("qk_layer_norms", "yes", "field 'qk_layer_norms' must be True or False, got 'yes'"),
    ("perceiver_config.qk_layer_norms_perceiver", 1, "field 'perceiver_config.qk_layer_norms_perceiver' must be True"),
    ("use_resampler", "false", "field 'use_resampler' must be True or False"),
    ("eos_token_id", "x", "field 'eos_token_id' must be an integer, a list of integers or None, got 'x'"),
    ("vision_config.image_size", [30, 31], "field 'vision_config.image_size' must be square, got [30, 31]"),
    ("vision_config.image_size", "30", "field 'vision_config.image_size' must be an integer, got '30'"),
    ("vision_config.patch_size", 40, "field 'vision_config.patch_size' must be at most image_size (30), got 40"),
    ("vision_config.num_channels", 0, "field 'vision_config.num_channels' must be from 1 to 4"),
    ("vision_config.layer_norm_eps", float("inf"), "field 'vision_config.layer_norm_eps' must be a finite number"),
    ("vision_config", [1], "field 'vision_config' must be an object, got [1]"),
    ("perceiver_config", "none", "field 'perceiver_config' must be an object, got 'none'"),
    ("rope_scaling", "linear", "field 'rope_scaling' must be an object, got 'linear'"),
    ("model_type", ["idefics"], "model_type is ['idefics'], expected 'idefics'"),
])
def test_bad_field_is_named_in_one_line(path, value, message):
    assert_refused(config_with((path, value)), message)


def test_a_long_value_is_cut_in_the_message():
    assert_refused(config_with(("hidden_act", "x" * 100_000)), "field 'hidden_act' must be one of")
    with pytest.raises(IdeficsError) as info:
        IdeficsConfig.from_dict(config_with(("hidden_act", "x" * 100_000)))
    assert len(str(info.value)) < 300


def test_valid_configs_take_json_spellings():
    """An [n, n] image size, an integral rope_theta, a list of eos ids: accepted as the values they are."""
    c = IdeficsConfig.from_dict(config_with(("vision_config.image_size", [30, 30]), ("rope_theta", 500000),
                                            ("eos_token_id", [2, 3])))
    assert (c.vision.image_size, c.rope_theta, c.eos_token_id, c.head_dim) == (30, 500000.0, [2, 3], 8)
    assert type(c.rope_theta) is float
    for preset in (idefics_9b, idefics_80b):
        assert IdeficsConfig.from_dict(to_dict(preset())) == preset()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("config"))
    return path


def with_config(checkpoint, tmp_path, write) -> os.PathLike:
    """A copy of the checkpoint's directory (its files linked) with config.json replaced by write(path)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (target / f.name).symlink_to(f)
    write(target / "config.json")
    return target


def assert_load_refused(path, *fragments):
    with pytest.raises(IdeficsError) as info:
        idefics.load(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message and "config.json" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_an_absurd_layer_count_is_refused_at_once(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    path = with_config(checkpoint, tmp_path, lambda p: p.write_text(json.dumps(config)))
    start = time.monotonic()
    assert_load_refused(path, "field 'num_hidden_layers' must be from 1 to 1024, got 1000000000")
    assert time.monotonic() - start < 5


def test_zero_heads_refused_when_loading(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 0
    path = with_config(checkpoint, tmp_path, lambda p: p.write_text(json.dumps(config)))
    assert_load_refused(path, "field 'vision_config.num_attention_heads' must be from 1 to 1024, got 0")


def test_an_oversized_config_file_is_not_read(checkpoint, tmp_path):
    path = with_config(checkpoint, tmp_path, lambda p: p.write_text('{"a": "' + "x" * (1 << 20) + '"}'))
    assert_load_refused(path, "larger than 1048576 bytes")


def test_deeply_nested_json_is_one_line(checkpoint, tmp_path):
    path = with_config(checkpoint, tmp_path, lambda p: p.write_text("[" * 200_000 + "]" * 200_000))
    assert_load_refused(path, "not a readable JSON file")


def test_a_fifo_config_does_not_hang(checkpoint, tmp_path):
    path = with_config(checkpoint, tmp_path, lambda p: os.mkfifo(p))
    assert_load_refused(path, "not a regular file")
