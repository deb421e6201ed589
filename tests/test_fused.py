"""The fused decode step (Triton kernels, run here by Triton's interpreter) computes what the plain model does:
each kernel against its eager composition, bit for bit in bfloat16 too, and whole decode steps against the plain
engine's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import idefics
from checkpoints import make_checkpoint
from idefics import fp8, fp8_gemm, kernels
from idefics import fused as fused_module
from idefics.gemv import gemv
from idefics.engine import Engine, split_batch
from idefics.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

DTYPES = [torch.float32, torch.bfloat16]


def assert_same(got: torch.Tensor, expected: torch.Tensor, atol: float = 0.0):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if expected.dtype == torch.float32 and atol:
        torch.testing.assert_close(got, expected, atol=atol, rtol=atol)
    else:
        assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("part", ["norm", "add", "scalar-gate-masked", "vector-gate"])
def test_add_rms_norm_equals_eager(dtype, part):
    torch.manual_seed(0)
    rows, d = 5, 40  # not a power of two
    x, h = (torch.randn(rows, d).to(dtype) for _ in range(2))
    norm = RMSNorm(d, 1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    gate = torch.tanh(torch.randn(d if part == "vector-gate" else 1).to(dtype))
    keep = torch.tensor([True, False, True, True, False])
    if part == "norm":
        x2, y = kernels.add_rms_norm(x, None, norm.weight, norm.eps)
        expected_x = x
    elif part == "add":
        x2, y = kernels.add_rms_norm(x, h, norm.weight, norm.eps)
        expected_x = x + h
    elif part == "scalar-gate-masked":
        x2, y = kernels.add_rms_norm(x, h, norm.weight, norm.eps, gate=gate, keep=keep)
        expected_x = x + gate * h.masked_fill(~keep[:, None], 0.0)
        assert torch.equal(x2[~keep], x[~keep])  # rows that see no image keep their residual
    else:
        x2, y = kernels.add_rms_norm(x, h, norm.weight, norm.eps, gate=gate)
        expected_x = x + gate * h
    assert_same(x2, expected_x)
    assert_same(y, norm(expected_x), atol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_add_rms_norm_hands_over_the_fp8_tokens_of_its_output(gated):
    """fp8=True: the norm's output quantized as fp8.quantize_rows quantizes it (the tokens of an fp8 product),
    bit for bit, and the same residual; and the Triton GEMM of fp8 tokens given them computes what it computes
    from the bfloat16 output."""
    torch.manual_seed(0)
    rows, d = 5, 1100
    x, h = ((torch.randn(rows, d) * torch.logspace(-2, 2, rows)[:, None]).to(torch.bfloat16) for _ in range(2))
    w = torch.rand(d).to(torch.bfloat16) + 0.5
    gate = dict(gate=torch.tanh(torch.randn(d)).to(torch.bfloat16)) if gated else {}
    x2, y = kernels.add_rms_norm(x, h, w, 1e-6, **gate)
    x3, (q, s) = kernels.add_rms_norm(x, h, w, 1e-6, fp8=True, **gate)
    eq, es = fp8.quantize_rows(y)
    assert torch.equal(x3, x2) and torch.equal(s, es) and s.shape == (rows, 1)
    assert q.dtype == fp8.FP8 and torch.equal(q.view(torch.uint8), eq.view(torch.uint8))
    wq, ws = fp8.quantize_weight(torch.randn(48, d) * 0.02)
    assert torch.equal(fp8_gemm.tokens_fp8_mm((q, s), wq, ws, block_n=16, block_k=64, split_k=2),
                       fp8_gemm.tokens_fp8_mm(y, wq, ws, block_n=16, block_k=64, split_k=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_eager(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 2 * 1100) * 3).to(dtype)  # more than one block per row
    g, u = x.chunk(2, dim=-1)
    assert_same(kernels.silu_mul(x), F.silu(g) * u, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 12])
def test_rope_attention_rotates_writes_and_attends_as_eager(dtype, head_dim):
    torch.manual_seed(0)
    rows, heads, max_len = 3, 2, 40
    qkv = torch.randn(rows, 3 * heads * head_dim).to(dtype)
    pos = torch.tensor([0, 5, 37])  # one key; a partial block; several blocks of keys
    inv_freq = rope_inv_freq(head_dim, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(max_len)[None], inv_freq, dtype)
    k_cache = torch.randn(4, heads, max_len, head_dim).to(dtype)
    v_cache = torch.randn(4, heads, max_len, head_dim).to(dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = kernels.rope_attention(qkv, cos[0, :, 0], sin[0, :, 0], pos, k_cache, v_cache, heads)
    x = qkv.view(rows, 1, 3 * heads, head_dim)
    qk = apply_rope(x[:, :, : 2 * heads], *rope_cos_sin(pos[:, None], inv_freq, dtype))
    written = torch.zeros(4, max_len, dtype=torch.bool)
    written[torch.arange(rows), pos] = True
    for i in range(rows):  # the new key and value at pos, nothing else touched
        assert_same(k_cache[i, :, pos[i]], qk[i, 0, heads:])
        assert_same(v_cache[i, :, pos[i]], x[i, 0, 2 * heads:])
    assert torch.equal(k_cache.transpose(1, 2)[~written], k_before.transpose(1, 2)[~written])
    assert torch.equal(v_cache.transpose(1, 2)[~written], v_before.transpose(1, 2)[~written])
    hidden = torch.arange(max_len)[None] > pos[:, None]  # keys after each row's position
    q = qk[:, :, :heads].transpose(1, 2)  # (B, H, 1, Dh)
    ref = F.scaled_dot_product_attention(q.float(), k_cache[:rows].float(), v_cache[:rows].float(),
                                         attn_mask=~hidden[:, None, None])
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the weights are rounded before they meet the values
    torch.testing.assert_close(out.float(), ref.transpose(1, 2).reshape(rows, -1), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_equals_pytorchs_with_the_additive_mask(dtype):
    torch.manual_seed(1)
    rows, heads, images, head_dim = 4, 2, 37, 12  # image tokens: two blocks and part of a third
    q = torch.randn(rows, heads * head_dim).to(dtype)
    k, v = (torch.randn(rows + 1, heads, images, head_dim).to(dtype)[:rows] for _ in range(2))  # rows of a cache
    visible = torch.zeros(rows, images, dtype=torch.bool)
    visible[0] = True  # every image token
    visible[1, 5:21] = True  # one image of several
    visible[2, 30:] = True  # the last one, in the partial block
    visible[2, 33] = False  # (not one image: a gap is masked as in PyTorch)
    mask = torch.zeros(rows, images, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None, None]
    ref = F.scaled_dot_product_attention(q.view(rows, heads, 1, head_dim).float(), k.float(), v.float(),
                                         attn_mask=mask.float()).reshape(rows, -1)
    ref[3] = 0  # row 3 sees none: zeros, where PyTorch averages every token (the gate's mask drops either)
    out = kernels.cross_attention(q, k, v, visible)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the weights are rounded before they meet the values
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert torch.equal(kernels.cross_attention(q, k[:, :, :0], v[:, :, :0], visible[:, :0]), torch.zeros_like(q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("swiglu", [False, True])
def test_gemv_equals_eager(dtype, swiglu):
    torch.manual_seed(0)
    k, n = 1100, 37  # more than one block of columns, rows not a multiple of the block
    x = torch.randn(1, k).to(dtype)
    w = (torch.randn(2 * n if swiglu else n, k) / k ** 0.5).to(dtype)
    y = x.float() @ w.float().t()
    if swiglu:  # from float32 sums, rounded where eager rounds
        g, u = y.to(dtype).chunk(2, dim=-1)
        expected = F.silu(g) * u
    else:
        expected = y.to(dtype)
    got = gemv(x, w, swiglu)
    if dtype == torch.float32:
        assert_same(got, expected, atol=1e-5)
    else:  # the float32 sums' order may move a rounding by one step
        assert got.dtype == dtype and (got.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
def test_gemv_folds_the_residual_add_and_the_norm(dtype, gated):
    """residual + gate * keep * (h @ w.T), as add_rms_norm adds it, then the next product of the normalized sum."""
    torch.manual_seed(0)
    k, n = 1100, 48
    h, x = torch.randn(1, k).to(dtype), torch.randn(1, n).to(dtype)
    w1, w2 = (torch.randn(n, k) / k ** 0.5).to(dtype), (torch.randn(37, n) / n ** 0.5).to(dtype)
    norm = RMSNorm(n, 1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    gate = dict(gate=torch.tanh(torch.randn(n).to(dtype)), keep=torch.tensor([True])) if gated else {}
    out = gemv(h, w1, residual=x, **gate)
    expected_x, expected_n = kernels.add_rms_norm(x, gemv(h, w1), norm.weight, norm.eps, **gate)
    assert_same(out.x, expected_x)
    assert torch.allclose(out.partials.sum(), expected_x.float().pow(2).sum(), rtol=1e-5)
    got = gemv(out, w2, norm=(norm.weight, norm.eps))
    expected = gemv(expected_n, w2)
    tol = 1e-5 if dtype == torch.float32 else 0.01  # a sum of squares in another order may move a rounding
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    if gated:  # a row that sees no image keeps its residual
        assert_same(gemv(h, w1, residual=x, gate=gate["gate"], keep=torch.tensor([False])).x, x)


CONFIGS = {
    "qknorms-float-gates": {},
    "vector-gates-6heads-interval3": dict(qk_layer_norms=False, alpha_type="vector", cross_layer_interval=3,
                                          num_hidden_layers=6, hidden_size=48, num_attention_heads=6),
}


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (36, 44, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", [*CONFIGS, "int8", "fp8", "gemm"])
@pytest.mark.parametrize("batch", [1, 3])  # one sequence: the matrix products go through gemv.py too
def test_fused_decode_steps_equal_the_plain_engine(tmp_path, name, batch, monkeypatch):
    """int8: quantized layers run their own modules inside the fused step. fp8: every fp8 layer is streamed by the
    fused step's GEMV with its scales. gemm: the products of several rows go through the Triton GEMM."""
    quantize = name if name in ("int8", "fp8") else None
    monkeypatch.setattr(fused_module, "GEMM_ROWS", 64 if name == "gemm" else 0)
    monkeypatch.setattr(fused_module, "GEMM_DTYPES", (torch.bfloat16, torch.float32))  # (these models' dtype)
    gemm_calls, plain_mm = [], fp8_gemm.plain_mm
    monkeypatch.setattr(fp8_gemm, "plain_mm", lambda *a: gemm_calls.append(a) or plain_mm(*a))
    model = idefics.load(make_checkpoint(tmp_path, **CONFIGS.get(name, {}))[0], quantize=quantize)
    items = [[image(1), "This is an image of "], ["No image, just text."], ["User:", image(2), "And", image(3), "?"]]
    prompts = [split_batch(model.process([p]))[0] for p in items][-batch:]
    runs = []
    for fused in (False, True):
        engine = Engine(model.model, fused=fused)
        assert (engine.fused is not None) == fused
        if fused and quantize == "fp8":
            layers = sum(isinstance(m, fp8.Fp8Linear) for m in model.model.modules())
            assert sum(scale is not None for _, scale in engine.fused.streamed.values()) == layers
        engine.reserve(3, 64, 2)
        tokens, steps = engine.prefill_batch(prompts).argmax(-1), []
        for _ in range(6):  # the same inputs for both: each step feeds the plain engine's choice
            logits = engine.decode(tokens)
            steps.append(logits)
            tokens = runs[0][len(steps) - 1].argmax(-1) if runs else logits.argmax(-1)
        runs.append(steps)
    for plain, fused in zip(*runs):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert bool(gemm_calls) == (name == "gemm" and batch > 1)
