"""Checkpoint loading: released shapes on the meta device, strictness, and one clear error per bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import idefics
from checkpoints import make_checkpoint
from idefics.config import IdeficsConfig, idefics_9b, idefics_80b, to_dict
from idefics.weights import build_meta


@pytest.mark.parametrize("preset, billions", [(idefics_9b, 8.9), (idefics_80b, 80.0)])
def test_released_shapes_build_on_meta_with_reference_parameter_counts(preset, billions):
    from transformers import IdeficsConfig as ReferenceConfig, IdeficsForVisionText2Text

    config = preset()
    ours = build_meta(config)
    assert all(p.is_meta for p in ours.parameters())  # nothing allocated
    with torch.device("meta"):
        ref = IdeficsForVisionText2Text(ReferenceConfig(**to_dict(config)))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert abs(count / 1e9 - billions) / billions < 0.02


def test_config_roundtrip_through_the_reference():
    from transformers import IdeficsConfig as ReferenceConfig

    d = ReferenceConfig(**to_dict(idefics_9b())).to_dict()
    assert IdeficsConfig.from_dict(d) == idefics_9b()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt"), max_shard_size=None)
    return path


def copy_of(checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def assert_one_line_error(path, *fragments, **load_options):
    with pytest.raises(idefics.IdeficsError) as e:
        idefics.load(path, **load_options)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_directory(tmp_path):
    assert_one_line_error(tmp_path / "nowhere", "no such checkpoint directory")


def test_missing_config(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    (path / "config.json").unlink()
    assert_one_line_error(path, "config.json", "not found")


def test_missing_weights(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    (path / "model.safetensors").unlink()
    assert_one_line_error(path, "no model weights")


def test_missing_tokenizer(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    (path / "tokenizer.json").unlink()
    assert_one_line_error(path, "tokenizer.json")


def test_missing_shard_listed_in_index(tmp_path):
    path, _ = make_checkpoint(tmp_path, max_shard_size="20KB")
    sorted(path.glob("model-*.safetensors"))[1].unlink()
    assert_one_line_error(path, "missing")


def test_truncated_safetensors(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(path, "model.safetensors", "unreadable safetensors")


def test_wrong_model_type(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(path, "config.json", "model_type", "llama")


def test_missing_config_field_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["vision_config"]["embed_dim"]
    (path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(path, "config.json", "vision_config.embed_dim")


def rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_wrong_tensor_shape_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(path, lambda t: t.__setitem__(name, t[name][:-1]))
    assert_one_line_error(path, name, "shape")


def test_missing_tensor_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    rewrite_tensors(path, lambda t: t.pop("model.gated_cross_attn_layers.1.alpha_dense"))
    assert_one_line_error(path, "missing", "layers.2.cross.mlp_gate")


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    path = copy_of(checkpoint, tmp_path)
    rewrite_tensors(path, lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2)))
    assert_one_line_error(path, "unexpected", "model.layers.9.mlp.up_proj.weight")


def test_bad_dtype_and_device_and_quantize(checkpoint):
    assert_one_line_error(checkpoint, "float64", dtype="float64")
    assert_one_line_error(checkpoint, "unknown device", device="tpu:0")
    assert_one_line_error(checkpoint, "quantize", quantize="int3")


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert_one_line_error("HuggingFaceM4/idefics-9b", "HuggingFaceM4/idefics-9b", "offline")


def test_hub_id_resolves_from_the_local_cache(checkpoint, tmp_path, monkeypatch):
    """A cached hub snapshot loads offline, through huggingface_hub's own cache layout."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    m = idefics.load("org/tiny")
    assert m.config.hidden_size == 32
