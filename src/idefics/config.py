"""Model configuration: dataclasses parsed from a checkpoint's config.json."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from idefics.errors import IdeficsError


class ConfigError(IdeficsError):
    pass


def _take(cls, d: dict, source: str, section: str, required: tuple[str, ...], rename: dict | None = None):
    """Build dataclass `cls` from the keys of `d` it knows; unknown keys are ignored (the hub configs carry
    training-only fields). Fields in `required` must be present; the others take the reference's defaults."""
    rename = rename or {}
    for name in required:
        if rename.get(name, name) not in d:
            where = f"{section}.{name}" if section else name
            raise ConfigError(f"{source}: missing field '{where}'")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name in names:
        key = rename.get(name, name)
        if key in d and d[key] is not None:
            kwargs[name] = d[key]
    return cls(**kwargs)


@dataclass
class VisionConfig:
    """CLIP-style ViT tower (idefics: ViT-H/14)."""

    embed_dim: int = 768
    image_size: int = 224
    patch_size: int = 14
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    intermediate_size: int = 5120
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    head_dim: int = field(init=False)
    num_patches: int = field(init=False)

    def __post_init__(self):
        self.image_size = _square(self.image_size, "image_size")
        self.patch_size = _square(self.patch_size, "patch_size")
        self.head_dim = self.embed_dim // self.num_attention_heads
        self.num_patches = (self.image_size // self.patch_size) ** 2  # plus one class token in the sequence


@dataclass
class PerceiverConfig:
    """Perceiver resampler: compresses the vision tokens of one image into n_latents vectors."""

    n_latents: int = 64
    depth: int = 6
    n_heads: int = 16
    head_dim: int = 96
    qk_layer_norms: bool = False


@dataclass
class IdeficsConfig:
    """LLaMA decoder with gated cross-attention to image latents, plus the vision tower and perceiver."""

    vocab_size: int = 32000
    additional_vocab_size: int = 0
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    cross_layer_interval: int = 1
    qk_layer_norms: bool = False
    use_resampler: bool = False
    alpha_type: str = "float"  # "float": one gate per block; "vector": one per hidden unit
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)

    head_dim: int = field(init=False)
    num_cross_layers: int = field(init=False)
    total_vocab_size: int = field(init=False)  # base vocabulary + additional tokens (<image>, ...)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.alpha_type not in ("float", "vector"):
            raise ConfigError(f"unknown alpha_type '{self.alpha_type}' (expected 'float' or 'vector')")
        if self.cross_layer_interval < 1 or self.num_hidden_layers % self.cross_layer_interval:
            # The reference indexes past its cross blocks otherwise.
            raise ConfigError(f"num_hidden_layers {self.num_hidden_layers} is not a multiple of "
                              f"cross_layer_interval {self.cross_layer_interval}")
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
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'idefics' (IDEFICS v1)")
        if not isinstance(d.get("vision_config"), dict):
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
            raise ConfigError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
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
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{name} {value} must be square")
        value = value[0]
    return int(value)


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
