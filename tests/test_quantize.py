"""Quantized loading on the CPU: int8 (bitsandbytes) on a tiny checkpoint, and the errors a user can cause."""
from __future__ import annotations

import sys
import weakref

import pytest
import torch
from PIL import Image
from torch import nn

import idefics
from idefics import quantize
from idefics.config import IdeficsConfig
from idefics.errors import IdeficsError
from idefics.inputs import full_logits
from idefics.weights import build_meta, load_weights, read_tensors, weight_files

import bitsandbytes  # noqa: F401  (in the test extra: a missing backend must fail here, not skip)
from checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quantize") / "tiny")[0]


@pytest.fixture(scope="module")
def models(checkpoint):
    return idefics.load(checkpoint, device="cpu"), idefics.load(checkpoint, device="cpu", quantize="int8")


def prompts():
    image = Image.new("RGB", (40, 30), (200, 40, 30))
    return [["User: What is in", image, "this picture?"], ["A story about a puppy in a flower bed"]]


def test_int8_quantizes_decoder_linears_only(models):
    model = models[1].model
    assert isinstance(model.layers[0].attn.wqkv, quantize.Float16Input)
    assert isinstance(model.layers[0].cross.mlp.w2, quantize.Float16Input)
    assert type(model.lm_head) is nn.Linear and type(model.vision.layers[0].fc1) is nn.Linear


def test_int8_logits_close_to_unquantized(models):
    plain, int8 = (m.logits(prompts()) for m in models)
    assert torch.nn.functional.cosine_similarity(plain, int8, dim=-1).min() >= 0.99


def test_int8_generates(models):
    out = models[1].generate(prompts(), max_new_tokens=4, eos_token_id=[])
    assert [len(c.token_ids) for c in out] == [4, 4] and all(c.finish_reason == "length" for c in out)
    assert models[1].summary()["quantize"] == "int8"


def test_pass_on_built_model_equals_quantizing_while_loading(checkpoint, models):
    built = quantize.quantize(idefics.load(checkpoint, device="cpu").model, "int8")
    assert torch.equal(full_logits(built, models[1].process(prompts())),
                       models[1].logits(prompts()))


@pytest.mark.parametrize("method, dtype", [("int8", torch.float32), ("fp8", torch.bfloat16)])
def test_each_layer_is_freed_before_the_next_loads(checkpoint, method, dtype):
    """The unquantized weights of a layer are gone once it is quantized: loading never holds the whole model."""
    model = build_meta(IdeficsConfig.from_file(checkpoint / "config.json"))
    hook = quantize.while_loading(model, method, torch.device("cpu"), dtype)
    quantized, leftovers = [], []

    def ready(name, module):
        leftovers.extend(name for name, ref in quantized if ref() is not None)
        if quantize.is_target(name, module, quantize.METHODS[method]):
            quantized.append((name, weakref.ref(module.weight)))
        hook(name, module)

    load_weights(model, read_tensors(weight_files(checkpoint)), torch.device("cpu"), dtype, ready)
    assert len(quantized) > 4 and not leftovers
    if method == "fp8":  # every linear layer of the decoder's blocks
        assert len(quantized) == 26


def test_unknown_method_lists_the_valid_ones(checkpoint):
    with pytest.raises(IdeficsError) as e:
        idefics.load(checkpoint, device="cpu", quantize="int3")
    assert all(name in str(e.value) for name in ("int8", "nf4", "fp4", "int4")) and "\n" not in str(e.value)


def test_missing_backend_names_the_package(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(IdeficsError, match="pip install bitsandbytes"):
        idefics.load(checkpoint, device="cpu", quantize="int8")
    with pytest.raises(IdeficsError, match="pip install torchao"):
        quantize.method("int4", torch.device("cuda"), torch.bfloat16)  # checks only, no GPU needed


def test_device_and_dtype_a_method_cannot_use(checkpoint):
    with pytest.raises(IdeficsError, match="on the CPU, use int8"):
        idefics.load(checkpoint, device="cpu", quantize="int4")
    with pytest.raises(IdeficsError, match="bfloat16"):
        quantize.method("int4", torch.device("cuda"), torch.float16)
