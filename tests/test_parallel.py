"""Tensor parallelism on the CPU (gloo): a model split over 2 or 4 ranks gives the single-process model's logits and
tokens; each rank reads only its blocks of the checkpoint; a model that does not divide is one clear error; the
worker processes end with the model, or with the process that started them."""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from checkpoints import make_checkpoint
from idefics.config import IdeficsConfig
from idefics.errors import IdeficsError
from idefics.parallel import add_reduces, parallelize, shard
from idefics.weights import build_meta, load_weights, read_tensors, weight_files

# An odd cross_layer_interval (cross blocks before layers 0 and 3); 4 heads and 48 MLP columns divide by 2 and 4.
SHAPE = dict(cross_layer_interval=3, num_hidden_layers=6)


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (36, 44, 3), dtype=np.uint8))


PROMPTS = [[image(1), "This is an image of "], ["No image, just a longer piece of text here."],
           ["User:", image(2), "Describe it.", image(3), "And this one?"]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp") / "tiny", **SHAPE)[0]


@pytest.fixture(scope="module")
def single(checkpoint):
    """What the one-process model gives: logits, greedy, beam and sampled continuations, label ranking."""
    m = idefics.load(checkpoint)
    return {
        "logits": m.logits(PROMPTS),
        "greedy": [c.token_ids for c in m.generate(PROMPTS, max_new_tokens=10)],
        "beams": [c.token_ids for c in m.generate(PROMPTS[:2], max_new_tokens=6, num_beams=2)],
        "sampled": [c.token_ids for c in m.generate(PROMPTS, max_new_tokens=8, do_sample=True, seed=7)],
        "labels": m.classify(image(1), ["cat", "dog", "a red car"]),
    }


@pytest.fixture(scope="class", params=[2, 4])
def split(request, checkpoint):
    m = idefics.load(checkpoint, tensor_parallel=request.param)
    yield m
    m.close()  # before the tests below, which start their own (one tensor-parallel model per process at a time)


class TestSplitModel:
    def test_logits_equal_the_single_process_model(self, split, single):
        assert split.summary()["tensor_parallel"] == split.team.ranks
        torch.testing.assert_close(split.logits(PROMPTS), single["logits"], atol=1e-5, rtol=0)

    def test_generated_tokens_equal_the_single_process_model(self, split, single):
        assert [c.token_ids for c in split.generate(PROMPTS, max_new_tokens=10)] == single["greedy"]
        beams = split.generate(PROMPTS[:2], max_new_tokens=6, num_beams=2)
        assert [c.token_ids for c in beams] == single["beams"]
        sampled = split.generate(PROMPTS, max_new_tokens=8, do_sample=True, seed=7)
        assert [c.token_ids for c in sampled] == single["sampled"]

    def test_label_ranking_equals_the_single_process_model(self, split, single):
        got = split.classify(image(1), ["cat", "dog", "a red car"])
        assert [s.label for s in got] == [s.label for s in single["labels"]]
        np.testing.assert_allclose([s.probability for s in got], [s.probability for s in single["labels"]],
                                   atol=1e-5)

    def test_a_second_model_in_the_same_process_is_one_clear_error(self, split, checkpoint):
        with pytest.raises(IdeficsError, match=r"^a tensor-parallel model is already loaded in this process"):
            idefics.load(checkpoint, tensor_parallel=2)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_each_rank_reads_its_blocks_of_the_checkpoint(tmp_path, weights):
    """Reading rank r's blocks from the files (weights.py's split column) = cutting them from the whole model."""
    path = make_checkpoint(tmp_path / weights, weights=weights, **SHAPE)[0]
    config = IdeficsConfig.from_file(path / "config.json")
    files = weight_files(path)
    cpu = torch.device("cpu")
    for rank in range(2):
        whole = load_weights(build_meta(config), read_tensors(files), cpu, torch.float32)
        expected = dict(parallelize(whole, rank, 2).named_parameters())
        meta = shard(build_meta(config), rank, 2)  # as load() does: shapes, blocks read, then the reduces
        got = dict(add_reduces(load_weights(meta, read_tensors(files, rank, 2), cpu, torch.float32)).named_parameters())
        assert got.keys() == expected.keys()
        for name, p in expected.items():
            assert torch.equal(got[name], p), name
        assert got["layers.0.attn.wqkv.weight"].shape == (3 * 32 // 2, 32)
        assert got["layers.3.cross.mlp.w2.inner.weight"].shape == (32, 48 // 2)


@pytest.mark.parametrize("ranks, what", [(3, "4 attention heads"), (5, "4 attention heads")])
def test_a_model_that_does_not_divide_is_one_clear_error(checkpoint, ranks, what):
    with pytest.raises(IdeficsError) as e:
        idefics.load(checkpoint, tensor_parallel=ranks)
    message = str(e.value)
    assert "\n" not in message and f"tensor_parallel={ranks}" in message and what in message
    assert not multiprocessing.active_children()  # refused before any worker started


def test_mlp_columns_that_do_not_divide_are_one_clear_error(tmp_path):
    path = make_checkpoint(tmp_path / "odd", intermediate_size=50, **SHAPE)[0]
    with pytest.raises(IdeficsError, match=r"^tensor_parallel=4: the model's 50 MLP columns do not divide"):
        idefics.load(path, tensor_parallel=4)


def test_cli_refuses_a_split_that_does_not_divide(checkpoint, capsys):
    from idefics.cli import main

    assert main(["info", "--model", str(checkpoint), "--tensor-parallel", "3"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("idefics: error: tensor_parallel=3: the model's 4 attention heads") and "\n" not in err


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_gone(pids: list[int], seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_workers_end_when_the_model_is_closed_or_collected(checkpoint):
    m = idefics.load(checkpoint, tensor_parallel=2)
    processes = list(m.team.processes)
    m.close()
    assert all(p.exitcode == 0 for p in processes)
    with pytest.raises(IdeficsError, match="^the model is closed$"):
        m.logits(PROMPTS[:1])

    m = idefics.load(checkpoint, tensor_parallel=2)
    m.logits(PROMPTS[:1])
    processes = list(m.team.processes)
    del m
    gc.collect()
    assert _wait_gone([p.pid for p in processes])
    for p in processes:
        p.join(30)
        end = time.monotonic() + 30
        while p.exitcode is None and time.monotonic() < end:  # the team's finalizer may be reaping it right now
            time.sleep(0.1)
        assert p.exitcode == 0


@pytest.mark.parametrize("end", ["returns", "is killed"])
def test_workers_end_with_the_program(checkpoint, tmp_path, end):
    """A script with no __main__ guard (spawn must not run it again in the workers) that never closes its model:
    it returns (and exits cleanly: the process group is taken down before the interpreter ends), or is killed."""
    script = tmp_path / "run.py"
    script.write_text("import sys, time, idefics\n"
                      "m = idefics.load(sys.argv[1], tensor_parallel=2)\n"
                      "m.logits([['hello']])\n"
                      "print(*(p.pid for p in m.team.processes), flush=True)\n"
                      "if sys.argv[2] == 'is killed':\n"
                      "    time.sleep(300)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    program = subprocess.Popen([sys.executable, str(script), str(checkpoint), end], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    try:
        pids = [int(p) for p in program.stdout.readline().split()]
        assert len(pids) == 1
        if end == "is killed":
            assert not _gone(pids[0])
            program.kill()
        _, err = program.communicate(timeout=60)
    finally:
        program.kill()
        program.wait()
    if end == "returns":
        assert program.returncode == 0, err.decode()[-2000:]
    assert _wait_gone(pids)


def test_a_call_sends_only_the_elements_of_views_through_its_pipe():
    """Tensors not on the model's device travel in the pickle (on a GPU: the prompts' CPU tensors); a view sends
    its own elements, not its whole storage."""
    from multiprocessing import Pipe

    from idefics.ranks import _receive, _send

    batch = torch.arange(4 * 1000, dtype=torch.float32).view(4, 1000)
    message = ("prefill_batch", ([batch[1], batch[2, ::2]],), {"copies": 1})
    ours, theirs = Pipe()
    gpu = torch.device("cuda", 0)  # where no tensor of this call is: nothing goes by broadcast
    _send([ours], gpu, message)
    assert theirs.poll() and len(pickle.dumps(batch)) > 4 * 4000
    data = theirs.recv_bytes()
    assert len(data) < 4 * 1000 + 4 * 500 + 2000  # the two rows' elements, not the batch's 16000 bytes
    ours.send_bytes(data)
    name, (tensors,), kwargs = _receive(theirs, gpu)
    assert name == "prefill_batch" and kwargs == {"copies": 1}
    assert torch.equal(tensors[0], batch[1]) and torch.equal(tensors[1], batch[2, ::2])


def test_a_checkpoint_that_fails_to_load_is_one_clear_error_and_leaves_no_workers(tmp_path):
    path = make_checkpoint(tmp_path / "broken", **SHAPE)[0]
    shard = sorted(path.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(IdeficsError) as e:
        idefics.load(path, tensor_parallel=2)
    assert "\n" not in str(e.value) and shard.name in str(e.value)
    assert not multiprocessing.active_children()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("ranks", [2, 4])
def test_nccl_split_equals_one_gpu(checkpoint, ranks):
    """On GPUs: NCCL, CUDA graphs with the all-reduces captured, the fused decode step (float32: its rounding is
    the plain step's) -> the one-GPU model's logits and tokens."""
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} CUDA GPUs")
    one = idefics.load(checkpoint, device="cuda", dtype="float32")
    logits = one.logits(PROMPTS)
    greedy = [c.token_ids for c in one.generate(PROMPTS, max_new_tokens=10)]
    beams = [c.token_ids for c in one.generate(PROMPTS[:2], max_new_tokens=6, num_beams=2)]
    del one
    m = idefics.load(checkpoint, device="cuda", dtype="float32", tensor_parallel=ranks)
    try:
        assert m.summary()["cuda_graphs"] and m.summary()["fused_decode"]
        torch.testing.assert_close(m.logits(PROMPTS), logits, atol=1e-4, rtol=0)
        assert [c.token_ids for c in m.generate(PROMPTS, max_new_tokens=10)] == greedy
        assert [c.token_ids for c in m.generate(PROMPTS[:2], max_new_tokens=6, num_beams=2)] == beams
    finally:
        processes = list(m.team.processes)
        m.close()
    assert all(p.exitcode == 0 for p in processes)
