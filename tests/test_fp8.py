"""FP8 weights (quantize="fp8"): which layers are stored in float8_e4m3fn and how, the errors a user can cause, the
fp8 kernels (Triton's interpreter) against the upcast product, the fused decode step, and the demo model's answers
and logits in fp8."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import idefics
from checkpoints import make_checkpoint
from helpers import bench_error
from idefics import fp8, fp8_gemm, kernels, quantize
from idefics.cli import main
from idefics.demo import evaluate
from idefics.errors import IdeficsError
from idefics.gemv import gemv
from idefics.hub import DEMO_DIR
from idefics.inputs import full_logits
from idefics.layers import RMSNorm

SAMPLE = 100  # held-out scenes per task, as tests/test_demo.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny")[0]


@pytest.fixture(scope="module")
def models(checkpoint):
    return idefics.load(checkpoint, device="cpu"), idefics.load(checkpoint, device="cpu", quantize="fp8")


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (36, 44, 3), dtype=np.uint8))


def prompts():
    return [["User: What is in", image(1), "this picture?"], ["A story about a puppy in a flower bed"]]


def fp8_weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return fp8.quantize_weight(torch.randn(n, k) / k ** 0.5)


def test_decoder_linears_are_fp8_with_a_scale_per_output_channel(models):
    model = models[1].model
    decoder = [(name, m) for name, m in model.named_modules() if name.startswith("layers.") and
               isinstance(m, (nn.Linear, fp8.Fp8Linear))]
    assert len(decoder) == 4 * 4 + 2 * 5  # self-attention and MLP per layer; cross attention and its MLP per block
    for name, m in decoder:
        assert type(m) is fp8.Fp8Linear, name
        assert m.weight.dtype == torch.float8_e4m3fn and m.weight.shape == (m.out_features, m.in_features)
        assert m.scale.dtype == torch.float32 and m.scale.shape == (m.out_features,)
    kept = [model.lm_head, model.vision.layers[0].fc1, model.perceiver.attn[0].wq]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in kept)
    assert model.embed.weight.dtype == model.layers[0].attn_norm.weight.dtype == torch.float32


def test_weights_round_to_the_nearest_fp8_value_of_their_row_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 300)
    w[1] = 0.0  # an all-zero row
    w[2, 7] = 1e4  # one outlier sets its row's scale
    w[3] *= 1e-6  # a row of tiny weights keeps its precision: scales are per row
    q, scale = fp8.quantize_weight(w.to(torch.bfloat16))
    w = w.to(torch.bfloat16).float()
    assert torch.equal(scale, torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 448, 1.0))
    assert scale[1] == 1 and not q[1].float().any()
    deq = fp8.dequantize_weight(q, scale, torch.float32)
    assert torch.equal(deq.abs().amax(1), w.abs().amax(1))  # each row's largest weight is exact
    # e4m3 keeps 3 mantissa bits: a relative error of 2^-4 at most, or half a subnormal step (2^-10 * scale)
    bound = torch.maximum(w.abs() * 2 ** -4, scale[:, None] * 2 ** -10)
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()


def test_fp8_logits_close_to_unquantized(models):
    plain, q = (m.logits(prompts()) for m in models)
    assert F.cosine_similarity(plain, q, dim=-1).min() >= 0.99


def test_fp8_generates_and_says_so(models):
    out = models[1].generate(prompts(), max_new_tokens=4, eos_token_id=[])
    assert [len(c.token_ids) for c in out] == [4, 4]
    assert models[1].summary()["quantize"] == "fp8"


def test_pass_on_built_model_equals_quantizing_while_loading(checkpoint, models):
    built = quantize.quantize(idefics.load(checkpoint, device="cpu").model, "fp8")
    assert torch.equal(full_logits(built, models[1].process(prompts())), models[1].logits(prompts()))


def test_unknown_method_and_float16_are_one_line_errors(checkpoint):
    with pytest.raises(IdeficsError) as e:
        idefics.load(checkpoint, device="cpu", quantize="fp9")
    assert "fp8" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(IdeficsError, match=r"quantize='fp8' needs dtype bfloat16, float32, not float16$"):
        idefics.load(checkpoint, device="cpu", dtype="float16", quantize="fp8")


def test_an_unknown_fp8_product_is_a_one_line_error(checkpoint, monkeypatch):
    monkeypatch.setattr(fp8, "PRODUCT", "fp16")  # as IDEFICS_FP8_PRODUCT=fp16 would set it
    with pytest.raises(IdeficsError, match=r"IDEFICS_FP8_PRODUCT='fp16' is not a product \(valid: auto, weight-only"):
        idefics.load(checkpoint, device="cpu", quantize="fp8")


def test_command_line_takes_fp8_and_refuses_fp9(checkpoint, capsys):
    assert main(["info", "--model", str(checkpoint), "--device", "cpu", "--quantize", "fp8", "--json"]) == 0
    assert '"quantize": "fp8"' in capsys.readouterr().out
    assert main(["info", "--model", str(checkpoint), "--device", "cpu", "--quantize", "fp9"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("idefics: ") and "fp8" in err and len(err.splitlines()) == 1


def test_cpu_layers_upcast_whatever_product_is_asked(monkeypatch):
    q, s = fp8_weights(48, 64)
    layer = fp8.Fp8Linear(q, s)
    x = torch.randn(2, 3, 64)
    expected = x @ fp8.dequantize_weight(q, s, torch.float32).t()
    for product in fp8.PRODUCTS:
        monkeypatch.setattr(fp8, "PRODUCT", product)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# The kernels, through Triton's interpreter; the reference is the upcast product (float32 sums of the stored
# weights, scaled per channel).

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_fp8_gemv_equals_the_upcast_product(dtype, swiglu):
    k, n = 1100, 37  # more than one block of columns, rows not a multiple of the block
    q, s = fp8_weights(2 * n if swiglu else n, k)
    x = torch.randn(1, k).to(dtype)
    y = fp8.upcast_mm(x.float(), q, s)
    if swiglu:
        g, u = y.to(dtype).chunk(2, dim=-1)
        expected = F.silu(g) * u
    else:
        expected = y.to(dtype)
    got = gemv(x, q, swiglu, scale=s)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the sums' order may move a rounding by one step
    torch.testing.assert_close(got.float(), expected.float(), atol=tol * expected.abs().max().item(), rtol=tol)


def test_fp8_gemv_folds_the_residual_add_and_the_norm():
    """As for bfloat16 weights: residual + gate * (h @ w.T), then the next product of its normalized sum."""
    k, n = 1100, 48
    q1, s1 = fp8_weights(n, k, seed=1)
    q2, s2 = fp8_weights(37, n, seed=2)
    h, x = torch.randn(1, k), torch.randn(1, n)
    norm = RMSNorm(n, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    gate = torch.tanh(torch.randn(n))
    out = gemv(h, q1, residual=x, gate=gate, keep=torch.tensor([True]), scale=s1)
    expected_x, expected_n = kernels.add_rms_norm(x, fp8.upcast_mm(h, q1, s1), norm.weight, norm.eps, gate=gate)
    torch.testing.assert_close(out.x, expected_x, atol=1e-5, rtol=1e-5)
    got = gemv(out, q2, norm=(norm.weight, norm.eps), scale=s2)
    torch.testing.assert_close(got, fp8.upcast_mm(expected_n, q2, s2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k", [(5, 1100), (40, 256)])  # ragged K and rows; whole blocks, two row blocks of 32
def test_weight_only_gemm_equals_the_upcast_product(dtype, m, k):
    q, s = fp8_weights(80, k)
    x = torch.randn(m, k).to(dtype)
    expected = fp8.upcast_mm(x.float(), q, s)
    got = fp8_gemm.weight_only_mm(x, q, s, block_n=32 if m > 16 else None)
    assert got.dtype == dtype and got.shape == (m, 80)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the scaled float32 sums
    torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, split_k", [(5, 48, 512, 1), (5, 48, 512, 2), (5, 48, 512, 4), (33, 40, 320, 2),
                                              (16, 32, 1100, 4), (33, 40, 192, 4)])
def test_split_k_weight_only_gemm_equals_the_upcast_product(dtype, m, n, k, split_k):
    """K in equal splits (512), a shorter last split (320: 3 + 2 tiles of 64; 192: 3 splits of one tile where 4 are
    asked) and a ragged last tile (1100); 5 and 33 tokens fill part of a block of rows."""
    q, s = fp8_weights(n, k)
    x = torch.randn(m, k).to(dtype)
    expected = fp8.upcast_mm(x.float(), q, s)
    got = fp8_gemm.weight_only_mm(x, q, s, block_n=16, block_k=64, split_k=split_k)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    again = fp8_gemm.weight_only_mm(x, q, s, block_n=16, block_k=64, split_k=split_k)
    assert torch.equal(got, again)  # the splits are added in a fixed order: no atomics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k, split_k", [(5, 512, 1), (33, 320, 2), (16, 1100, 4)])
def test_the_gemm_of_plain_weights_equals_the_matmul(dtype, m, k, split_k):
    """fp8_gemm.plain_mm: the same GEMM on bfloat16 or float32 weights, nothing converted or scaled."""
    w, x = torch.randn(40, k).to(dtype), torch.randn(m, k).to(dtype)
    expected = x.float() @ w.float().T
    got = fp8_gemm.plain_mm(x, w, block_n=16, block_k=64, split_k=split_k)
    assert got.dtype == dtype and got.shape == (m, 40)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("m, k, split_k", [(5, 512, 1), (33, 320, 2), (16, 1100, 4)])
def test_the_gemm_applies_swiglu_as_silu_mul_does(m, k, split_k):
    """swiglu: the weight holds the gate rows then the up rows; the GEMM (plain or fp8 weights, K split or not) gives
    kernels.silu_mul of the plain product (float32: exact but for the sums' order)."""
    torch.manual_seed(0)
    w, x = torch.randn(80, k), torch.randn(m, k)
    q, s = fp8_weights(80, k)
    for got, product in ((fp8_gemm.plain_mm(x, w, swiglu=True, block_n=16, block_k=64, split_k=split_k), x @ w.T),
                         (fp8_gemm.weight_only_mm(x, q, s, swiglu=True, block_n=16, block_k=64, split_k=split_k),
                          fp8.upcast_mm(x, q, s))):
        expected = kernels.silu_mul(product)
        assert got.shape == (m, 40)
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("n, k", [(12288, 4096), (22016, 4096), (4096, 4096), (4096, 11008), (48, 100)])
@pytest.mark.parametrize("m", [2, 8, 33, 64, 500])
def test_weight_only_launch_rule_splits_k_into_whole_tiles_none_empty(m, n, k):
    for split_k in (None, 1, 3, 8, 64):
        c = fp8_gemm.weight_only_config(m, n, k, split_k=split_k)
        assert c["k_split"] % c["block_k"] == 0 and 1 <= c["split_k"] <= (split_k or 8)
        assert (c["split_k"] - 1) * c["k_split"] < k <= c["split_k"] * c["k_split"]


def test_weight_only_launch_rule_splits_k_only_for_few_tiles():
    """wo (4096 x 4096) at 8 tokens: 64 tiles of 64 rows for 132 SMs; w13 (22016 x 4096): 344 of them."""
    assert fp8_gemm.weight_only_config(8, 4096, 4096)["split_k"] > 1
    assert fp8_gemm.weight_only_config(8, 22016, 4096)["split_k"] == 1
    assert fp8_gemm.weight_only_config(2048, 4096, 4096)["split_k"] == 1  # prefill: tiles enough


def test_token_quantization_kernel_equals_eager_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(7, 1000) * torch.logspace(-3, 3, 7)[:, None]
    x[3] = 0.0
    got, expected = fp8_gemm.quantize_rows(x), fp8.quantize_rows(x)
    assert torch.equal(got[1], expected[1]) and got[1].shape == (7, 1) and got[1][3] == 1
    assert torch.equal(got[0].view(torch.uint8), expected[0].view(torch.uint8))


def test_scaled_product_of_fp8_tokens_is_close_to_the_upcast_one():
    """torch._scaled_mm (here its CPU implementation) with per-token and per-channel scales."""
    q, s = fp8_weights(64, 128)
    x = torch.randn(24, 128).to(torch.bfloat16)
    got = fp8.scaled_mm(x, q, s)
    assert got.dtype == torch.bfloat16 and got.shape == (24, 64)
    assert F.cosine_similarity(got.float(), fp8.upcast_mm(x.float(), q, s), dim=-1).min() >= 0.998


@pytest.mark.parametrize("m, n, k, split_k", [(5, 48, 1100, None), (33, 40, 512, 2), (16, 32, 320, 4)])
def test_triton_scaled_product_equals_the_product_of_the_fp8_tokens(m, n, k, split_k):
    """fp8_gemm.tokens_fp8_mm: the tokens quantized as scaled_mm quantizes them, then the float32 sums of the
    stored values, scaled per token and per channel; ragged K, split K, a partial block of rows."""
    q, s = fp8_weights(n, k)
    x = (torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]).to(torch.bfloat16)
    xq, xs = fp8.quantize_rows(x)
    expected = fp8.upcast_mm(xq.float() * xs, q, s)
    got = fp8_gemm.tokens_fp8_mm(x, q, s, block_n=16, block_k=64, split_k=split_k)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    error = (got.float() - expected).abs() / expected.abs().amax(1, keepdim=True)  # per token: scales differ a lot
    assert error.max() <= 1e-2  # bfloat16's rounding of the result is 2^-9 of it


# The trained demo model

@pytest.fixture(scope="module")
def demo_models():
    return {name: idefics.load(DEMO_DIR, device="cpu", **kw) for name, kw in
            [("float32", {}), ("fp8", {"quantize": "fp8"}), ("bfloat16", {"dtype": "bfloat16"}),
             ("fp8 bfloat16", {"quantize": "fp8", "dtype": "bfloat16"})]}


def test_demo_accuracy_in_fp8_within_half_a_point_of_float32(demo_models):
    tasks = ("caption",) + evaluate.VQA_MAIN + ("classify",)
    accuracy = {}
    for name in ("float32", "fp8"):
        results = evaluate.evaluate(demo_models[name], SAMPLE, "mixed", tasks)
        accuracy[name] = 100 * sum(results[t][0] for t in tasks) / sum(results[t][1] for t in tasks)
    assert abs(accuracy["fp8"] - accuracy["float32"]) <= 0.5, accuracy


def test_demo_teacher_forced_logits_in_fp8_against_bfloat16(demo_models):
    """Held-out prompts of every task followed by their answers: mean cosine 0.9998 against bfloat16. The worst
    position is judged against float32, where both sit: bfloat16's own rounding moves it (0.994 on one CPU, 0.997
    on another), and fp8's can move it the other way, so against each other it can read 0.977 (AVX2 bfloat16
    products) where each is 0.994 from float32."""
    items = [evaluate.heldout(task, i, "mixed") for task in evaluate.TASKS for i in range(4)]
    batch = demo_models["bfloat16"].process([prompt + [" " + example.answer] for example, prompt in items])
    real = batch["attention_mask"].bool()
    exact, ref, got = (full_logits(demo_models[name].model, batch).float()[real]
                       for name in ("float32", "bfloat16", "fp8 bfloat16"))
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.mean() >= 0.999, cos.mean()
    worst_bf16, worst_fp8 = (F.cosine_similarity(v, exact, dim=-1).min() for v in (ref, got))
    assert worst_fp8 >= worst_bf16 - 0.005, (worst_fp8, worst_bf16)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99


@pytest.mark.parametrize("flags, message", [
    (["--fp8-fusions", "2x"],
     "argument --fp8-fusions: '2x': two digits of 0 or 1 (SwiGLU epilogue, norm's fp8 tokens)"),
    (["--attention-few", "256"], "argument --attention-few: expected 2 arguments"),
    (["--attention-few", "256", "x"], "argument --attention-few: 'x': a power of 2"),
    (["--attention-few", "96", "4"], "argument --attention-few: '96': a power of 2"),
])
def test_the_fp8_benchmark_refuses_a_bad_flag_in_one_line(flags, message):
    """bench/fp8.py's knobs: a wrong value ends in argparse's one line, before any model is built."""
    assert bench_error("fp8.py", flags) == f"fp8.py: error: {message}"
