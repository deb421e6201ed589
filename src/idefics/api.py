"""The public object: a loaded checkpoint with its tokenizer and processor."""
from __future__ import annotations

import os
import queue
import weakref
from collections import deque
from contextlib import closing
from typing import Iterator
from pathlib import Path

import torch

from idefics import parallel, tasks
from idefics.chat import Conversation
from idefics.checks import show
from idefics.config import IdeficsConfig
from idefics.beam import beam_search
from idefics.engine import Engine, check_room
from idefics.generate import Completion, completion
from idefics.errors import IdeficsError, ItemErrors
from idefics.gate import Gate
from idefics.hub import resolve
from idefics.images import ImageTransform
from idefics.inputs import full_logits
from idefics.model import IdeficsModel
from idefics.pipeline import check_decode, check_workers
from idefics.processor import Processor, as_batch
from idefics.quantize import METHODS, while_loading
from idefics.loop import Busy, EngineLoop
from idefics.sampling import GenerationOptions
from idefics.scheduler import Output, Request, Scheduler
from idefics.scoring import check_labels, rank
from idefics.tokenizer import Tokenizer
from idefics.weights import build_meta, load_weights, read_tensors, weight_files

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZE = tuple(METHODS)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise IdeficsError(f"unknown device {device!r} (examples: 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IdeficsError("device 'cuda' requested but no CUDA GPU is available")
    return device


def _dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise IdeficsError(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")


PROCESS_OPTIONS = ("add_end_of_utterance_token",)
WINDOW = 256  # prompts of one generate() call between the image workers and the end of their generation at once
HOLD = 64  # ready prompts waiting for others still loading, at most, before they enter the batch (gate.py)
# Images waiting at a gate are encoded ahead of their prefill once this many have gathered (the prefill encodes any
# left): an encoder call of 1 image keeps the GPU about as long as one of 16, and while a batch decodes, every such
# call delays its next step.
AHEAD_IMAGES = 16


class _Ends:
    """A call's sink of outputs (put() on the engine's thread) that passes on only those ending a request: the call
    waits for those alone, and each step's others would wake its thread for nothing, once per request per step
    (with `idefics batch`, a thread per line)."""

    def __init__(self, events: queue.SimpleQueue):
        self.events = events

    def put(self, output: Output):
        if output.finish_reason is not None:
            self.events.put(output)


def _switches(call: str, options: dict, known: tuple[str, ...]):
    """Keyword options that are switches: each one known, and True, False or None (the default)."""
    for name, value in options.items():
        if name not in known:
            raise IdeficsError(f"{call}(): unknown option {show(name)} (known: {', '.join(known)})")
        if value is not None and not isinstance(value, bool):
            raise IdeficsError(f"{call}(): {name} must be True or False, got {show(value)}")


class Idefics:
    """An IDEFICS checkpoint ready for inference. Build it with `idefics.load()`."""

    def __init__(self, model: IdeficsModel, tokenizer: Tokenizer, processor: Processor, path: Path,
                 quantize: str | None = None, team=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.path = path
        self.quantize = quantize
        self.team = team  # the worker ranks of a tensor-parallel model (ranks.Team), None in one process
        options = engine_options(quantize)
        self.engine = Engine(model, **options) if team is None else team.leader(model, **options)
        self.scheduler = Scheduler(self.engine, tokenizer)
        # One thread runs the model; every call, from any thread, goes through it.
        self.loop = EngineLoop(self.scheduler)
        # Whether calls wait for each other's prompts at one gate (gate.py), for throughput: `idefics batch` turns
        # it on while its lines run, each line a call of its own. Off, a call's prompts wait only for each other.
        self.gather = False
        self._gate = Gate(self.loop.submit, HOLD)
        # Requests waiting at a gate, of every call: their images are encoded meanwhile, AHEAD_IMAGES or more at a
        # time (one encoder call posted at a time), not one call per prompt.
        self._ahead: deque[Request] = deque()
        self._ahead_posted = False
        if team is not None:  # collected without close(): the engine thread stops the workers between steps
            team.post = self.loop.post
            weakref.finalize(self, team.retire)

    def close(self):
        """Stop the worker processes of a tensor-parallel model; the model cannot run afterwards. Nothing to do for
        a model in one process. Also done when the model is garbage-collected or the program ends."""
        if self.team is not None:
            self.loop.call(self.team.close)

    @property
    def config(self) -> IdeficsConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def process(self, prompts, **options) -> dict[str, torch.Tensor]:
        """Prompts (a list of text and image items, or a list of such lists) -> input_ids, attention_mask,
        pixel_values (B, N, 3, H, W) and image_attention_mask (B, S, N), as the reference processor. Options:
        add_end_of_utterance_token."""
        _switches("process", options, known=PROCESS_OPTIONS)
        return self._process(prompts, options)

    def _process(self, prompts, options: dict, within: int | None = None) -> dict[str, torch.Tensor]:
        batch = as_batch(prompts)
        for b, prompt in enumerate(batch):
            _valid_texts(prompt, self.processor.where(b, len(batch)))
        return self.processor(batch, within=within, **options)

    def logits(self, prompts, **options) -> torch.Tensor:
        """(B, S, V) float32 logits at every position of the processed prompts (padding positions included).
        Options: as process()."""
        _switches("logits", options, known=PROCESS_OPTIONS)
        context = self.config.max_position_embeddings
        batch = self._process(prompts, options, context)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for b, n in enumerate(lengths):
            if n > context:
                raise IdeficsError(f"prompt {b} has {n} tokens; the model's context is {context}")
        return self.loop.call(lambda: self.engine.call(full_logits, batch).float())

    def _options(self, options: dict, add_end_of_utterance_token) -> GenerationOptions:
        """Generation options checked against this model; the processor's switch checked beside them."""
        o = GenerationOptions.make(**options)
        o.within_vocabulary(self.config.total_vocab_size)
        _switches("process", dict(add_end_of_utterance_token=add_end_of_utterance_token), known=PROCESS_OPTIONS)
        return o

    def requests(self, prompts, *, add_end_of_utterance_token: bool | None = None, logprobs: int | None = None,
                 **options) -> list[Request]:
        """Prompts -> checked requests for the scheduler (an error names the failing prompt; nothing is queued).
        Their images are decoded in parallel by the processor's pipeline."""
        o = self._options(options, add_end_of_utterance_token)
        batch = as_batch(prompts)
        for b, prompt in enumerate(batch):
            _valid_texts(prompt, self.processor.where(b, len(batch)))
        context = self.config.max_position_embeddings
        return [Request.make(p, o, self.tokenizer, context, logprobs=logprobs, where=f"prompt {i}")
                for i, p in enumerate(self.processor.prompts(batch, add_end_of_utterance_token, context))]

    def generate(self, prompts, *, include_prompt: bool = False, add_end_of_utterance_token: bool | None = None,
                 **options) -> list[Completion]:
        """Continue each prompt. Options: max_new_tokens, min_new_tokens, max_length, do_sample, temperature,
        top_k, top_p, repetition_penalty, num_beams, length_penalty, early_stopping, eos_token_id, stop, seed,
        banned_token_ids. <image> and <fake_token_around_image> are never generated unless you say otherwise.
        add_end_of_utterance_token: as the processor's (None: true for instruct tokenizers, as transformers 4.37.2).
        Each prompt's images are decoded by the processor's worker processes and the prompt joins the running batch
        as soon as they are ready. A prompt that fails (a bad image, too long for the context) fails alone: with
        several prompts the others still run, and the call raises ItemErrors, whose `results` hold every prompt's
        Completion (None where it failed) and `errors` each failure's message. Safe to call from several threads
        at once: concurrent calls share the running batch."""
        _switches("generate", dict(include_prompt=include_prompt), known=("include_prompt",))
        o = self._options(options, add_end_of_utterance_token)
        eou = self.processor.end_of_utterance(add_end_of_utterance_token)
        batch = as_batch(prompts)
        results = self._run_prompts(batch, o, eou)
        good = [r for r in results if isinstance(r, Request)]
        if o.num_beams > 1 and good:
            self._beams(good)
        results = [r if isinstance(r, IdeficsError) else completion(self.tokenizer, r, include_prompt) for r in results]
        errors = {b: str(e) for b, e in enumerate(results) if isinstance(e, IdeficsError)}
        if errors and len(batch) == 1:
            raise results[0]
        if errors:
            raise ItemErrors([None if b in errors else c for b, c in enumerate(results)], errors)
        return results

    def _run_prompts(self, batch: list[list], o: GenerationOptions, eou: bool) -> list[Request | IdeficsError]:
        """Each prompt through the image pipeline and, once its images are ready, into the running batch (through a
        gate, with the others ready by then: gate.py; beam search: only made ready, run by the caller), at most
        WINDOW prompts at a time -> each prompt's finished Request or its error."""
        events: queue.SimpleQueue = queue.SimpleQueue()  # ("ready", b, Pending) from the workers; Outputs
        ends = _Ends(events)  # where the requests' outputs go: only those that end a request reach this thread
        results: list = [None] * len(batch)
        running: dict = {}  # request id -> prompt index, from the gate on
        group = min(HOLD, self.scheduler.max_batch or HOLD)
        if self.gather:
            gate = self._gate
            gate.group = group
        else:
            gate = Gate(self.loop.submit, group)
        started, finished, loading = 0, 0, 0  # loading: this call's prompts whose images are not all ready
        window = WINDOW if o.num_beams == 1 else len(batch)
        context = self.config.max_position_embeddings
        try:
            while finished < len(batch):
                while started < len(batch) and started - finished < window:
                    b, started = started, started + 1
                    try:
                        where = self.processor.where(b, len(batch))
                        _valid_texts(batch[b], where)
                        pending = self.processor.start(batch[b], eou, where, context)
                    except IdeficsError as e:
                        results[b], finished = e, finished + 1
                        continue
                    gate.started()
                    loading += 1
                    pending.when_ready(lambda b=b, pending=pending: events.put(("ready", b, pending)))
                if finished == len(batch):
                    break
                event = events.get()
                if isinstance(event, Output):  # (one that ends its request)
                    b = running.pop(event.id)
                    if event.error is not None:
                        results[b] = IdeficsError(event.error)
                    finished += 1
                    continue
                _, b, pending = event
                loading -= 1
                try:
                    results[b] = r = Request.make(pending.prompt(), o, self.tokenizer, context, where=f"prompt {b}")
                except IdeficsError as e:
                    results[b], finished = e, finished + 1
                    gate.loaded()
                    continue
                if o.num_beams > 1:
                    finished += 1
                    gate.loaded()
                    continue
                running[r.id] = b
                if gate.loaded(r, ends) and r.prompt.pixels.shape[0]:
                    self._ahead.append(r)
                    if not self._ahead_posted:  # (else the one posted, not run yet, takes this prompt too)
                        self._ahead_posted = True
                        self.loop.post(self._encode_ahead)
        finally:  # an interrupted call leaves nothing behind
            for id in gate.leave(set(running), loading):
                self.loop.abort(id)
        return results

    def _encode_ahead(self):
        """On the engine thread: encode the images of the requests queued ahead and still waiting, into the encoder's
        cache where their prefill finds them, once AHEAD_IMAGES have gathered; fewer stay queued."""
        self._ahead_posted = False  # (before taking: a request queued from now on posts a call of its own)
        waiting = []
        while self._ahead:
            r = self._ahead.popleft()
            if r.slot is None and r.finish is None:  # not admitted (its prefill encoded its images), not ended
                waiting.append(r)
        if sum(r.prompt.pixels.shape[0] for r in waiting) < AHEAD_IMAGES:
            self._ahead.extendleft(reversed(waiting))
        elif waiting:
            self.engine.encoder.of_prompts([r.prompt for r in waiting])

    def stream(self, prompt, *, add_end_of_utterance_token: bool | None = None, **options) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as tokens are decoded (never a broken character).
        The pieces join to generate()'s text: text that may begin a stop string waits until it is known not to.
        With beam search the text comes at the end, once the best beam is known. Closing the iterator early ends
        the request; streams of several threads run side by side."""
        [r] = self.requests([as_batch(prompt)[0]], add_end_of_utterance_token=add_end_of_utterance_token, **options)
        if r.options.num_beams > 1:
            self._beams([r])
            if text := completion(self.tokenizer, r).text:
                yield text
            return
        [sink] = self.loop.submit([r])
        # Closed explicitly, so that a stream closed early aborts its request at once rather than whenever the
        # interpreter finalizes the inner iterator (a GPU run saw the request still running after the next call).
        with closing(self.loop.outputs(sink, r.id)) as outputs:
            for o in outputs:
                if o.text:
                    yield o.text

    def _beams(self, requests: list[Request]):
        """Beam search on the engine thread, in slots beside the running batch, or once it has drained."""
        e, o = self.engine, requests[0].options
        slots = len(requests) * o.num_beams
        max_len = max(r.prompt.ids.shape[0] + r.budget for r in requests)
        images = max(r.prompt.pixels.shape[0] for r in requests)

        def run():
            if e.max_len < max_len or e.max_images < images or e.free_slots(slots, consecutive=True) is None:
                if e.active:
                    raise Busy
                want = (max(slots, e.slots), max(max_len, e.max_len), max(images, e.max_images))
                check_room(e, *want, what=f"{len(requests)} prompts x {o.num_beams} beams of up to {max_len} tokens")
                e.reserve(*want)
            for _ in beam_search(e, requests, o):
                pass

        self.loop.call(run)

    # The guide's tasks. Each takes one image (-> one result) or a list of images (-> a list of results, run as
    # one batch); options override the task's defaults (tasks.DEFAULTS) and go to generate().

    def caption(self, image, prompt: str | None = None, **options) -> str | list[str]:
        """No prompt: the caption the model writes from BOS. With a prompt ("This is an image of "): its
        continuation (pass include_prompt=True for the whole sentence)."""
        if prompt is None:
            return self._run("caption", image, lambda im: tasks.caption(im), options)
        prompt = tasks.as_text(prompt, "prompt")
        return self._run("prompted_caption", image, lambda im: tasks.caption(im, prompt), options)

    def ask(self, image, question: str, **options) -> str | list[str]:
        """Visual question answering with the guide's instruction."""
        question = tasks.as_text(question, "question")
        return self._run("ask", image, lambda im: tasks.ask(im, question), options)

    def few_shot(self, examples, image, **options) -> str | list[str]:
        """examples: (image, description) pairs shown as finished exchanges before the image to describe."""
        examples = tasks.as_examples(examples)
        return self._run("few_shot", image, lambda im: tasks.few_shot(examples, im), options)

    def story(self, image, instruction: str | None = None, **options) -> str | list[str]:
        """A story written from the image (the guide's defaults: num_beams=2, max_new_tokens=200)."""
        if instruction is not None:
            instruction = tasks.as_text(instruction, "instruction")
        return self._run("story", image, lambda im: tasks.story(im, instruction), options)

    def classify(self, image, labels, mode: str = "rank", **options):
        """Zero-shot classification with the guide's prompt. mode "rank": every label with its probability
        (softmax of the labels' summed log-likelihoods after "Category:"), best first, as LabelScore tuples;
        mode "generate": the category the model writes. At most MAX_LABELS labels (256) of at most MAX_LABEL_CHARS
        characters (200) each (see idefics.scoring); the prompt, which lists them all, and the prompt with each label
        must fit the model's context."""
        labels = check_labels(tasks.as_labels(labels))
        if mode == "generate":
            return self._run("classify", image, lambda im: tasks.classify(im, labels), options)
        if mode != "rank":
            raise IdeficsError(f"unknown classification mode {mode!r} (valid: rank, generate)")
        if options:
            raise IdeficsError(f"ranked classification takes no generation options, got {', '.join(options)}")
        images, single = tasks.as_images(image)
        # Each image appears once per label: decode and resize each once, side by side in the pipeline's workers.
        futures = [self.processor.images.submit(x, resized=True) for x in images]
        images = []
        for i, future in enumerate(futures):
            try:
                images.append(future.result())
            except IdeficsError as e:
                raise IdeficsError(f"{'image' if single else f'image {i}'}: {e}") from None
        prompts = [tasks.classify(im, labels) for im in images]
        ranked = rank(self, prompts, labels)  # tokenizes here; only the model's work goes to the engine thread
        return ranked[0] if single else ranked

    def chat(self, **options) -> Conversation:
        """A conversation with an instruct model; options apply to every reply."""
        return Conversation(self, **options)

    def summary(self) -> dict:
        """What is loaded: the checkpoint, its shapes, parameter count, device and dtype."""
        c = self.config
        return {
            "model": str(self.path), "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "quantize": self.quantize,
            "tensor_parallel": 1 if self.team is None else self.team.ranks,
            "cuda_graphs": self.engine.graphs is not None, "fused_decode": self.engine.fused is not None,
            "decoder": f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, MLP {c.intermediate_size}",
            "cross_attention_blocks": len(self.model.cross_layers),
            "vision": f"{c.vision.num_hidden_layers} layers, width {c.vision.embed_dim}, {c.vision.image_size}px images, patch {c.vision.patch_size}",
            "perceiver": f"{c.perceiver.depth} layers, {c.perceiver.n_latents} latents" if c.use_resampler else "none",
            "vocabulary": c.total_vocab_size, "context": c.max_position_embeddings,
            "instruct": self.tokenizer.end_of_utterance_id is not None,
        }

    def _run(self, task: str, image, build, options: dict):
        """A list of images fails item by item (ItemErrors, as generate's)."""
        images, single = tasks.as_images(image)
        try:
            completions = self.generate([build(im) for im in images], **tasks.options(task, options))
        except ItemErrors as e:
            raise e.map(lambda c: c.text.strip()) from None
        texts = [c.text.strip() for c in completions]
        return texts[0] if single else texts

    def __repr__(self) -> str:
        c = self.config
        return (f"Idefics({self.path.name}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{len(self.model.cross_layers)} cross-attention blocks, {self.dtype}, {self.device})")


def _valid_texts(prompt: list, where: str):
    for i, item in enumerate(prompt):
        if isinstance(item, str):  # text, or a URL: neither can hold a lone surrogate
            tasks.valid_text(item, f"{where}item {i}")


def engine_options(quantize: str | None) -> dict:
    # Layers that CUDA graphs cannot capture (int8's outlier search syncs with the host) decode eagerly.
    return {"graphs": False if quantize and not METHODS[quantize].graphs else None}


def _shard(config: IdeficsConfig, files: list[Path], device: torch.device, dtype: torch.dtype, quantize: str | None,
           rank: int = 0, ranks: int = 1) -> IdeficsModel:
    """The model, or with ranks > 1 rank's shard of it, read from the checkpoint's files."""
    net = parallel.shard(build_meta(config), rank, ranks)
    hook = while_loading(net, quantize, device, dtype) if quantize else None  # fails here if its package is missing
    net = load_weights(net, read_tensors(files, rank, ranks), device, dtype, on_module_ready=hook)
    return parallel.add_reduces(net) if ranks > 1 else net


def build_shard(rank: int, ranks: int, device: torch.device, path: str, dtype: torch.dtype,
                quantize: str | None) -> Engine:
    """A worker rank's engine over its shard (ranks.py)."""
    path = Path(path)
    config = IdeficsConfig.from_file(path / "config.json")
    return Engine(_shard(config, weight_files(path), device, dtype, quantize, rank, ranks),
                  **engine_options(quantize))


def load(model: str | os.PathLike | None = None, *, device=None, dtype=None, quantize: str | None = None,
         workers: int | None = None, image_decode: str = "exact", tensor_parallel: int = 1) -> Idefics:
    """Load an IDEFICS checkpoint: a hub id ("HuggingFaceM4/idefics-9b"), a local directory, or None for the
    embedded demo model. dtype defaults to bfloat16 on CUDA and float32 on the CPU. quantize: one of QUANTIZE
    (see idefics.quantize), applied layer by layer while loading. workers: processes that decode images (default:
    one per core, at most 16). image_decode: "exact" (the reference's pixels) or "fast" (JPEGs decoded at a
    reduced scale first; see idefics.pipeline). tensor_parallel: split the decoder over this many GPUs from
    `device` on (or ranks on the CPU), each in its own process, spawned here (see idefics.ranks); close() the
    model to stop them."""
    if quantize is not None and quantize not in QUANTIZE:
        raise IdeficsError(f"unknown quantize {quantize!r} (valid: {', '.join(QUANTIZE)})")
    check_workers(workers)
    check_decode(image_decode)
    device = _device(device)
    dtype = _dtype(dtype, device)
    path = resolve(model)
    config = IdeficsConfig.from_file(path / "config.json")
    files = weight_files(path)
    tokenizer = Tokenizer.from_dir(path)
    # On a GPU, the image workers decode and the GPU resizes (stage.py).
    processor = Processor(tokenizer, ImageTransform.from_dir(path), workers=workers, image_decode=image_decode,
                          resize_on=device if device.type == "cuda" else None)
    if processor.image_transform.image_size != config.vision.image_size:
        # The vision tower's position embeddings fit one image size only.
        raise IdeficsError(f"{path}: images are resized to {processor.image_transform.image_size} px "
                           "(processor_config.json or preprocessor_config.json; 224 when neither says) "
                           f"but config.json's vision_config.image_size is {config.vision.image_size}")
    parallel.check(config, tensor_parallel)
    if tensor_parallel == 1:
        return Idefics(_shard(config, files, device, dtype, quantize), tokenizer, processor, path, quantize)
    from idefics.ranks import Team, rank_device

    team = Team(tensor_parallel, device, build_shard, (str(path), dtype, quantize))
    try:
        net = _shard(config, files, rank_device(device, 0), dtype, quantize, 0, tensor_parallel)
        team.join()
    except BaseException:
        team.close()
        raise
    return Idefics(net, tokenizer, processor, path, quantize, team)
