"""The user's whole job: caption a folder of photos, end to end, files to text.

    PYTHONPATH=src python bench/job.py --out job.json [--images 256] [--batch 64] [--workers 16 [15 ...]]
    PYTHONPATH=src python bench/job.py --small --out small.json    # the same on the CPU, a tiny model, < 1 minute

Writes photo-sized JPEGs (1600x1067, about 450 kB: smooth colour fields under sensor-like noise), builds
idefics-9b-shaped random bfloat16 weights on the GPU and the real LLaMA-1 tokenizer (bench/llama_tokenizer), then
captions every file with "This is an image of " and max_new_tokens=10, timed from the files to the texts:
  api           m.caption(files[i:i+64], prompt) batch after batch (the Python API)
  batch         idefics batch over a tasks.jsonl, one line per file (its run_file, in this process: the weights
                are random, so there is no checkpoint to load)
  transformers  IdeficsProcessor + IdeficsForVisionText2Text.generate in batches of 64, the guide's way, on the
                same weights (copied into transformers' model) and files: with transformers' default image
                processor (torchvision's backend, where installed), and again with the PIL one (what the guide's
                transformers 4.37.2 has)
  api_fast      the api run with image_decode="fast" (JPEGs decoded at a reduced scale first)
  batch_fast    the batch run so (idefics batch --image-decode fast)
Reports images/s of each and their ratio to transformers, how often our captions equal transformers', and the
fast path's fidelity: pixel differences and the cosine of its last-position logits against the exact path's."""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import random_model, reference_from  # noqa: E402

from idefics import api as api_module  # noqa: E402
from idefics import engine as engine_module  # noqa: E402
from idefics.api import Idefics  # noqa: E402
from idefics.batch import WINDOW, run_file  # noqa: E402
from idefics.config import IdeficsConfig, PerceiverConfig, VisionConfig, idefics_9b  # noqa: E402
from idefics.images import ImageTransform  # noqa: E402
from idefics.pipeline import ImagePipeline, default_workers  # noqa: E402
from idefics.processor import Processor  # noqa: E402
from idefics.stage import Resizer, Stage  # noqa: E402
from idefics.tokenizer import Tokenizer  # noqa: E402

TOKENIZER = HERE / "llama_tokenizer"
PROMPT = "This is an image of "
NEW_TOKENS = 10
PHOTO = (1600, 1067)


def photo(seed: int, size: tuple[int, int] = PHOTO) -> bytes:
    """A JPEG that compresses like a photo: a smooth random colour field (a 24x16 grid, bicubic-upscaled) under
    Gaussian noise, quality 85."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    x = np.asarray(field, dtype=np.int16) + rng.normal(0, 12, (size[1], size[0], 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_photos(root: Path, n: int, first_seed: int = 0) -> list[Path]:
    paths = [root / f"photo_{first_seed + i:04d}.jpg" for i in range(n)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for path, data in zip(paths, pool.map(photo, range(first_seed, first_seed + n))):
            path.write_bytes(data)
    return paths


def tiny_config() -> IdeficsConfig:
    """For --small: the real vocabulary and image size, everything else tiny."""
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, rms_norm_eps=1e-6, cross_layer_interval=1, qk_layer_norms=True, use_resampler=True,
        vision=VisionConfig(embed_dim=32, image_size=224, patch_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, hidden_act="gelu"),
        perceiver=PerceiverConfig(n_latents=4, depth=1, n_heads=2, head_dim=16, qk_layer_norms=True),
    )


def ours(config: IdeficsConfig, device: str, dtype: torch.dtype, workers: int) -> Idefics:
    model = random_model(config, device, dtype)
    tokenizer = Tokenizer.from_dir(TOKENIZER)
    # As idefics.load: on a GPU the workers decode and the GPU resizes (stage.py)
    processor = Processor(tokenizer, ImageTransform(image_size=config.vision.image_size), workers=workers,
                          resize_on=device if device == "cuda" else None)
    return Idefics(model, tokenizer, processor, Path("random-idefics"))


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def run_api(m: Idefics, files: list[Path], batch: int, calls: list[float] | None = None) -> list[str]:
    """calls: receives each call's seconds."""
    m.engine.encoder.cache.clear()  # every image is encoded, as the first time
    out = []
    for i in range(0, len(files), batch):
        seconds, captions = timed(lambda: m.caption(files[i : i + batch], PROMPT, max_new_tokens=NEW_TOKENS))
        out += captions
        if calls is not None:
            calls.append(round(seconds, 4))
    return out


def alternate(variants: dict, rounds: int, images: int) -> dict[str, list[float]]:
    """Each variant (name -> a setup function returning the job to time) timed `rounds` times, every other round in
    reverse order, so that no variant always runs first -> name -> images/s of each round."""
    out: dict = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(images / timed(variants[name]())[0])
        print({k: round(v[-1], 1) for k, v in out.items()}, file=sys.stderr, flush=True)
    return out


def warm_up(m: Idefics, files: list[Path], batch: int, root: Path):
    """The job once through each path, untimed: the shapes it meets captured (the encoder's batch sizes depend on
    how the photos arrive) and the workers started, as a long job amortizes them. On an H100, with one call of 64
    photos as the warm-up instead, the first setting timed ran 15-20% slower than the next, whichever came first
    (bench/results/h100-2026-12-07-job-settings.json, -job-ahead.json)."""
    run_api(m, files, batch)
    run_batch(m, files, root)


def set_window(lines: int):
    global WINDOW
    WINDOW = lines


def run_batch(m: Idefics, files: list[Path], root: Path) -> list[str]:
    m.engine.encoder.cache.clear()
    tasks, out = root / "tasks.jsonl", root / "results.jsonl"
    lines = [{"task": "caption", "id": f.name, "image": f.name, "prompt": PROMPT} for f in files]
    tasks.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out.unlink(missing_ok=True)
    assert run_file(str(tasks), out, root, {"max_new_tokens": NEW_TOKENS}, WINDOW, lambda: m) == 0
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all("result" in r for r in results.values()), [r for r in results.values() if "error" in r][:3]
    return [results[f.name]["result"] for f in files]


def reference_processor(pil: bool = False):
    """The guide's processor on our tokenizer files: the default image processor (torchvision's backend where it
    is installed, else the PIL one), or with pil the PIL one, which is what transformers 4.37.2 (the guide's) has:
    PIL's resize and numpy's arithmetic, image by image."""
    from transformers import IdeficsProcessor, LlamaTokenizerFast

    images = None
    if not pil:
        try:
            from transformers import IdeficsImageProcessor
            images = IdeficsImageProcessor()
        except (ImportError, ValueError):
            pass
    if images is None:
        from transformers import IdeficsImageProcessorPil
        images = IdeficsImageProcessorPil()
    return IdeficsProcessor(images, LlamaTokenizerFast.from_pretrained(str(TOKENIZER)))


def run_reference(ref, processor, files: list[Path], batch: int) -> list[str]:
    """The guide's batched inference: images loaded, processed, generated, decoded."""
    from transformers.image_utils import load_image

    bad_words = processor.tokenizer(["<image>", "<fake_token_around_image>"], add_special_tokens=False).input_ids
    texts = []
    for i in range(0, len(files), batch):
        prompts = [[load_image(str(f)), PROMPT] for f in files[i : i + batch]]
        inputs = processor(text=prompts, return_tensors="pt").to(ref.device)
        with torch.inference_mode():
            ids = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, bad_words_ids=bad_words)
        texts += processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]


def fast_path_fidelity(m: Idefics, files: list[Path]) -> dict:
    """Pixels (in uint8 levels) and last-position logits of the fast path against the exact one."""
    t = m.processor.image_transform
    exact, fast = ImagePipeline(t), ImagePipeline(t, decode="fast")
    std = torch.tensor(t.image_std).view(3, 1, 1)
    diffs = torch.stack([((exact.pixels(f) - fast.pixels(f)).abs() * std * 255) for f in files])
    cosines = []
    for f in files:
        logits = []
        for decode in ("exact", "fast"):
            m.processor.images.decode = decode
            m.engine.encoder.cache.clear()
            logits.append(m.logits([[f, PROMPT]])[0, -1].float())
        cosines.append(torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=0).item())
    m.processor.images.decode = "exact"
    return {"images": len(files), "pixel_max_abs_diff": diffs.max().item(), "pixel_mean_abs_diff": diffs.mean().item(),
            "logits_cosine_mean": float(np.mean(cosines)), "logits_cosine_min": float(np.min(cosines))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results as JSON")
    parser.add_argument("--small", action="store_true", help="CPU, tiny model, 16 photos in batches of 8")
    parser.add_argument("--images", type=int, help="photos to caption (default 256; 16 with --small)")
    parser.add_argument("--batch", type=int, help="images per call (default 64; 8 with --small)")
    parser.add_argument("--workers", type=int, nargs="+", default=[default_workers()],
                        help="image decoding processes (the pool started afresh for each value after the first)")
    parser.add_argument("--skip-reference", action="store_true", help="no transformers run")
    # Settings tried side by side: the API and idefics batch run once more with each value after the first, which
    # the rest of the job uses.
    parser.add_argument("--ahead", type=int, nargs="+", default=[api_module.AHEAD_IMAGES],
                        help="images encoded ahead at once, at least (api.AHEAD_IMAGES)")
    parser.add_argument("--hold", type=int, nargs="+", default=[api_module.HOLD],
                        help="ready prompts that enter the batch together while others still load (api.HOLD)")
    parser.add_argument("--window", type=int, nargs="+", default=[WINDOW],
                        help="idefics batch's lines in flight at once (its --window)")
    parser.add_argument("--switch-interval", type=float, nargs="+", default=[sys.getswitchinterval()],
                        help="the interpreter's thread switch interval in seconds (sys.setswitchinterval)")
    parser.add_argument("--batch-graph-len", type=int, nargs="+", default=[engine_module.BATCH_GRAPH_LEN],
                        help="prompts of up to this many tokens prefilled together by a captured graph, 0: none "
                             "(engine.BATCH_GRAPH_LEN)")
    parser.add_argument("--resize-on-device", type=int, nargs="+", choices=[0, 1],
                        help="1: the workers decode and the GPU resizes (stage.py; the default on a GPU), 0: the "
                             "workers resize too")
    parser.add_argument("--slots", type=int, nargs="+",
                        help="rows the running batch holds at most (the scheduler's max_batch, idefics batch "
                             "--max-batch; default none: the model's 64 rows for the API, the window's 256 lines "
                             "for idefics batch, where they fit)")
    parser.add_argument("--batch-len-bucket", type=int, nargs="+", default=[engine_module.BATCH_LEN_BUCKET],
                        help="captured prefills of several prompts pad their length to a multiple of this "
                             "(engine.BATCH_LEN_BUCKET)")
    args = parser.parse_args(argv)
    settings = {  # name -> (values, apply)
        "ahead": (args.ahead, lambda v: setattr(api_module, "AHEAD_IMAGES", v)),
        "hold": (args.hold, lambda v: setattr(api_module, "HOLD", v)),
        "switch_interval": (args.switch_interval, sys.setswitchinterval),
        "window": (args.window, set_window),
        "batch_graph_len": (args.batch_graph_len, lambda v: setattr(engine_module, "BATCH_GRAPH_LEN", v)),
        "batch_len_bucket": (args.batch_len_bucket, lambda v: setattr(engine_module, "BATCH_LEN_BUCKET", v)),
    }
    for values, apply in settings.values():
        apply(values[0])
    n = args.images or (16 if args.small else 256)
    batch = args.batch or (8 if args.small else 64)
    device = "cpu" if args.small else "cuda"
    dtype = torch.float32 if args.small else torch.bfloat16
    config = tiny_config() if args.small else idefics_9b()
    result: dict = {"date": datetime.date.today().isoformat(),
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "cpus": os.cpu_count(), "model": "tiny" if args.small else "idefics-9b shape, random weights",
                    "dtype": str(dtype).removeprefix("torch."), "images": n, "batch": batch,
                    "max_new_tokens": NEW_TOKENS, "workers": args.workers[0], "photo": f"{PHOTO[0]}x{PHOTO[1]} JPEG"}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_photos(root, n)
        warmup = write_photos(root, batch, first_seed=10_000)  # the reference's warm-up: one call's photos
        result["photo_kb_mean"] = sum(f.stat().st_size for f in files) / n / 1e3
        print(f"{n} photos, {result['photo_kb_mean']:.0f} kB each on average", file=sys.stderr)

        m = ours(config, device, dtype, args.workers[0])
        settings["workers"] = (args.workers, lambda v: (m.processor.images.close(),
                                                        setattr(m.processor.images, "workers", v)))
        images = m.processor.images  # (the pool starts afresh, its workers forked with the new slab or none)
        settings["resize_on_device"] = (args.resize_on_device or [int(device == "cuda")], lambda v: (
            images.close(), setattr(images, "resizer", Resizer(Stage(), images.transform, device) if v else None)))
        settings["resize_on_device"][1](settings["resize_on_device"][0][0])
        settings["slots"] = (args.slots or [None], lambda v: setattr(m.scheduler, "max_batch", v))
        settings["slots"][1](settings["slots"][0][0])
        result["resize_on_device"] = settings["resize_on_device"][0][0]
        result["slots"] = settings["slots"][0][0]
        warm_up(m, files, batch, root)
        result["api_call_s"] = []
        seconds, api = timed(lambda: run_api(m, files, batch, result["api_call_s"]))
        result["api_images_s"] = n / seconds
        seconds, batched = timed(lambda: run_batch(m, files, root))
        result["batch_images_s"] = n / seconds
        # The same captions in float32; in bfloat16 another batch composition rounds differently, and random
        # weights leave greedy choices close enough for that to flip some.
        result["batch_captions_equal_api"] = sum(a == b for a, b in zip(batched, api)) / n
        assert dtype != torch.float32 or batched == api, "idefics batch and the API gave different captions"
        for name, (values, apply) in settings.items():
            if len(values) == 1:
                continue
            by = result[f"by_{name}"] = {values[0]: {"api": result["api_images_s"], "batch": result["batch_images_s"]}}
            for value in values[1:] + values[:1]:  # (back to the first: whatever runs next warms itself up)
                apply(value)
                if value != values[0]:
                    warm_up(m, files, batch, root)
                    by[value] = {"api": n / timed(lambda: run_api(m, files, batch))[0],
                                 "batch": n / timed(lambda: run_batch(m, files, root))[0]}
                    print(f"{name} {value}: {by[value]}", file=sys.stderr, flush=True)

        m.processor.images.decode = "fast"
        run_api(m, files, batch)  # untimed, as warm_up
        result["api_fast_call_s"] = []
        seconds, _ = timed(lambda: run_api(m, files, batch, result["api_fast_call_s"]))
        result["api_fast_images_s"] = n / seconds
        run_batch(m, files, root)
        seconds, _ = timed(lambda: run_batch(m, files, root))
        result["batch_fast_images_s"] = n / seconds
        m.processor.images.decode = "exact"
        result["fast_path"] = fast_path_fidelity(m, files[:16])

        if not args.skip_reference:
            ref, processor = reference_from(m.model), reference_processor()
            result["transformers_image_processor"] = type(processor.image_processor).__name__
            run_reference(ref, processor, warmup, batch)
            seconds, theirs = timed(lambda: run_reference(ref, processor, files, batch))
            result["transformers_images_s"] = n / seconds
            result["captions_equal_transformers"] = sum(a == b for a, b in zip(api, theirs)) / n
            pil = reference_processor(pil=True)  # the guide's version's image processor
            run_reference(ref, pil, warmup, batch)
            seconds, _ = timed(lambda: run_reference(ref, pil, files, batch))
            result["transformers_pil_images_s"] = n / seconds
            for name in ("api", "batch", "api_fast", "batch_fast"):
                result[f"{name}_vs_transformers"] = result[f"{name}_images_s"] / result["transformers_images_s"]
                result[f"{name}_vs_transformers_pil"] = result[f"{name}_images_s"] / result["transformers_pil_images_s"]

    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
