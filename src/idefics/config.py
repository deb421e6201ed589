"""Model configuration: dataclasses parsed from a checkpoint's config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from idefics.checks import FieldError, check, limited, show
from idefics.errors import IdeficsError
from idefics.layers import ACTIVATIONS


class ConfigError(IdeficsError):
    pass


# Sane upper bounds: the released models are far below them, and a config past them is a mistake that would take
# minutes (or all memory) to build before its weights were found not to match.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 1 << 17  # hidden and MLP widths, head dims, latents
MAX_VOCAB = 1 << 21
MAX_CONTEXT = 1 << 20
MAX_IMAGE_SIZE = 4096
MAX_FILE_BYTES = 1 << 20  # the hub's config.json files are a few KB

_LAYERS = dict(low=1, high=MAX_LAYERS)
_HEADS = dict(low=1, high=MAX_HEADS)
_WIDTH = dict(low=1, high=MAX_WIDTH)
_EPS = dict(above=0, high=1)


def _take(cls, d: dict, source: str, section: str, required: tuple[str, ...], rename: dict | None = None):
    """Build dataclass `cls` from the keys of `d` it knows; unknown keys are ignored (the hub configs carry
    training-only fields). Fields in `required` must be present; the others take the reference's defaults. A value
    that breaks its field's definition is named by its key in the file."""
    rename = rename or {}

    def where(name: str) -> str:
        key = rename.get(name, name)
        return f"{section}.{key}" if section else key

    for name in required:
        if rename.get(name, name) not in d:
            raise ConfigError(f"{source}: missing field '{where(name)}'")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name in names:
        key = rename.get(name, name)
        if key in d and d[key] is not None:
            kwargs[name] = d[key]
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{source}: field '{where(e.name)}' {e.problem}") from None


@dataclass
class VisionConfig:
    """CLIP-style ViT tower (idefics: ViT-H/14)."""

    embed_dim: int = limited(768, **_WIDTH)
    image_size: int = limited(224, low=1, high=MAX_IMAGE_SIZE)
    patch_size: int = limited(14, low=1, high=MAX_IMAGE_SIZE)
    num_hidden_layers: int = limited(32, **_LAYERS)
    num_attention_heads: int = limited(16, **_HEADS)
    intermediate_size: int = limited(5120, **_WIDTH)
    num_channels: int = limited(3, low=1, high=4)
    hidden_act: str = limited("gelu", choices=tuple(ACTIVATIONS))
    layer_norm_eps: float = limited(1e-5, **_EPS)

    head_dim: int = field(init=False)
    num_patches: int = field(init=False)

    def __post_init__(self):
        self.image_size = _square(self.image_size, "image_size")
        self.patch_size = _square(self.patch_size, "patch_size")
        check(self)
        _multiple("embed_dim", self.embed_dim, "num_attention_heads", self.num_attention_heads)
        if self.patch_size > self.image_size:
            raise FieldError("patch_size", f"must be at most image_size ({self.image_size}), got {self.patch_size}")
        self.head_dim = self.embed_dim // self.num_attention_heads
        self.num_patches = (self.image_size // self.patch_size) ** 2  # plus one class token in the sequence


@dataclass
class PerceiverConfig:
    """Perceiver resampler: compresses the vision tokens of one image into n_latents vectors."""

    n_latents: int = limited(64, **_WIDTH)
    depth: int = limited(6, **_LAYERS)
    n_heads: int = limited(16, **_HEADS)
    head_dim: int = limited(96, **_WIDTH)
    qk_layer_norms: bool = False

    def __post_init__(self):
        check(self)


@dataclass
class IdeficsConfig:
    """LLaMA decoder with gated cross-attention to image latents, plus the vision tower and perceiver."""

    vocab_size: int = limited(32000, low=1, high=MAX_VOCAB)
    additional_vocab_size: int = limited(0, low=0, high=MAX_VOCAB)
    hidden_size: int = limited(4096, **_WIDTH)
    intermediate_size: int = limited(11008, **_WIDTH)
    num_hidden_layers: int = limited(32, **_LAYERS)
    num_attention_heads: int = limited(32, **_HEADS)
    hidden_act: str = limited("silu", choices=tuple(ACTIVATIONS))
    rms_norm_eps: float = limited(1e-6, **_EPS)
    rope_theta: float = limited(10000.0, above=0)
    max_position_embeddings: int = limited(2048, low=1, high=MAX_CONTEXT)
    cross_layer_interval: int = limited(1, **_LAYERS)
    qk_layer_norms: bool = False
    use_resampler: bool = False
    alpha_type: Literal["float", "vector"] = "float"  # "float": one gate per block; "vector": one per hidden unit
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)

    head_dim: int = field(init=False)
    num_cross_layers: int = field(init=False)
    total_vocab_size: int = field(init=False)  # base vocabulary + additional tokens (<image>, ...)

    def __post_init__(self):
        check(self)
        # RoPE rotates pairs of each head's dims.
        _multiple("hidden_size", self.hidden_size, "2 x num_attention_heads", 2 * self.num_attention_heads)
        # The reference indexes past its cross blocks otherwise.
        _multiple("num_hidden_layers", self.num_hidden_layers, "cross_layer_interval", self.cross_layer_interval)
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.num_cross_layers = self.num_hidden_layers // self.cross_layer_interval
        self.total_vocab_size = self.vocab_size + self.additional_vocab_size

    @property
    def image_dim(self) -> int:
        """Width of the image features the decoder cross-attends to (the perceiver keeps the vision width)."""
        return self.vision.embed_dim

    @property
    def image_seq_len(self) -> int:
        """Tokens per image seen by cross-attention: latents with the resampler, else every ViT token."""
        return self.perceiver.n_latents if self.use_resampler else self.vision.num_patches + 1

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "IdeficsConfig":
        if d.get("model_type") != "idefics":
            raise ConfigError(f"{source}: model_type is {show(d.get('model_type'))}, expected 'idefics' (IDEFICS v1)")
        for key in ("vision_config", "perceiver_config", "rope_parameters", "rope_scaling"):
            if key in d and not isinstance(d[key], (dict, type(None))):
                raise ConfigError(f"{source}: field '{key}' must be an object, got {show(d[key])}")
        if d.get("vision_config") is None:
            raise ConfigError(f"{source}: missing field 'vision_config'")
        vision = _take(
            VisionConfig, d["vision_config"], source, "vision_config",
            required=("embed_dim", "image_size", "patch_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
        )
        perceiver = _take(
            PerceiverConfig, d.get("perceiver_config") or {}, source, "perceiver_config", required=(),
            rename={"n_latents": "resampler_n_latents", "depth": "resampler_depth", "n_heads": "resampler_n_heads",
                    "head_dim": "resampler_head_dim", "qk_layer_norms": "qk_layer_norms_perceiver"},
        )
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{source}: rope type {show(rope.get('rope_type', rope.get('type')))} is not supported")
        top = dict(d)
        if "rope_theta" in rope:
            top.setdefault("rope_theta", rope["rope_theta"])
        config = _take(
            cls, top, source, "",
            required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
        )
        config.vision, config.perceiver = vision, perceiver
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "IdeficsConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: not found")
        if not path.is_file():  # a FIFO or device would block or never end
            raise ConfigError(f"{path}: not a regular file")
        try:
            with path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes, not a model config")
            d = json.loads(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))


def _square(value, name: str):
    """An image_size or patch_size given as [n, n] -> n."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise FieldError(name, f"must be square, got {show(value)}")
        return value[0]
    return value


def _multiple(name: str, value: int, of: str, step: int):
    if value % step:
        raise FieldError(name, f"must be a multiple of {of} ({step}), got {value}")


# Shapes of the released checkpoints (hub config.json), for building on the meta device and for benchmarks.
def idefics_9b() -> IdeficsConfig:
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, rms_norm_eps=1e-6, cross_layer_interval=4, qk_layer_norms=True, use_resampler=True,
        vision=VisionConfig(embed_dim=1280, image_size=224, patch_size=14, num_hidden_layers=32, num_attention_heads=16,
                            intermediate_size=5120, hidden_act="gelu"),
        perceiver=PerceiverConfig(n_latents=64, depth=6, n_heads=16, head_dim=96, qk_layer_norms=True),
    )


def idefics_80b() -> IdeficsConfig:
    c = idefics_9b()
    return dataclasses.replace(
        c, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, rms_norm_eps=1e-5,
        vision=c.vision, perceiver=c.perceiver,
    )


PRESETS = {"idefics-9b": idefics_9b, "idefics-80b": idefics_80b}


def to_dict(c: IdeficsConfig) -> dict:
    """config.json in the hub checkpoints' format (what the reference reads)."""
    v, p = c.vision, c.perceiver
    return {
        "model_type": "idefics",
        "architectures": ["IdeficsForVisionText2Text"],
        "vocab_size": c.vocab_size, "additional_vocab_size": c.additional_vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "cross_layer_interval": c.cross_layer_interval, "qk_layer_norms": c.qk_layer_norms,
        "use_resampler": c.use_resampler, "alpha_type": c.alpha_type, "alpha_initializer": "zeros",
        "pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": False,
        "vision_config": {
            "embed_dim": v.embed_dim, "image_size": v.image_size, "patch_size": v.patch_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "num_channels": v.num_channels, "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps,
        },
        "perceiver_config": {
            "use_resampler": c.use_resampler, "resampler_n_latents": p.n_latents, "resampler_depth": p.depth,
            "resampler_n_heads": p.n_heads, "resampler_head_dim": p.head_dim, "qk_layer_norms_perceiver": p.qk_layer_norms,
        },
    }
