"""Internal configuration of the model parts every family shares (decoder, vision tower,
projector, AWQ): frozen dataclasses parsed from checkpoint configs, and reading config files.

Checkpoint `config.json` files come in several dialects (transformers 4.x `rope_theta` +
`rope_scaling`, transformers 5.x `rope_parameters`). The parsers here turn each into one
internal form and validate it, so model code never looks at raw dictionaries. A family's own
config (how its parts are put together) lives in its module, `vlm_core.families.*`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, UnknownProjectorError

ROPE_TYPES = ("default", "linear", "llama3")
TEXT_MODEL_TYPES = ("llama", "qwen2")
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
SELECT_STRATEGIES = ("default", "full")
_MLP_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope theta and factor must be positive, got theta={self.theta} factor={self.factor}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class TextConfig:
    """A LLaMA-style decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 biases its q/k/v projections (not o); LLaMA's `attention_bias` covers all four."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"text config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"text config: num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.hidden_act != "silu":
            raise ConfigError(f"text config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "TextConfig":
        """From a decoder's config.json, read through transformers' config class for its model
        type (which also brings the rope dialects — transformers 4.x `rope_theta` + `rope_scaling`,
        5.x `rope_parameters` — into one form); the sizes must be given, not defaulted."""
        from transformers import AutoConfig

        model_type = d.get("model_type", "llama")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"text model_type {model_type!r} is not supported (expected one of {TEXT_MODEL_TYPES})")
        for key in _TEXT_REQUIRED:
            if key not in d:
                raise ConfigError(f"text config is missing required field {key!r}")
        try:
            hf = AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})
        except Exception as e:      # transformers' own validation (rope fields, value types)
            raise ConfigError(f"text config is invalid: {e}") from None
        if getattr(hf, "use_sliding_window", False):
            raise ConfigError("Qwen2 with use_sliding_window is not supported")
        try:
            eos = hf.eos_token_id
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            heads = int(hf.num_attention_heads)
            return cls(
                vocab_size=int(hf.vocab_size), hidden_size=int(hf.hidden_size),
                intermediate_size=int(hf.intermediate_size), num_layers=int(hf.num_hidden_layers),
                num_heads=heads, num_kv_heads=int(hf.num_key_value_heads or heads),
                head_dim=int(getattr(hf, "head_dim", None) or int(hf.hidden_size) // heads),
                rms_norm_eps=float(hf.rms_norm_eps), rope=_rope_of(hf.rope_parameters),
                max_position_embeddings=int(hf.max_position_embeddings),
                tie_word_embeddings=bool(hf.tie_word_embeddings),
                attention_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
                hidden_act=hf.hidden_act, model_type=model_type, bos_token_id=hf.bos_token_id,
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"text config has a malformed value: {e}") from None


_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _rope_of(params: dict[str, Any]) -> RopeConfig:
    """Our RopeConfig from transformers' standardised `rope_parameters`."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    kw: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        kw["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kw)


DOWNSAMPLE_PROJECTORS = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}


@dataclass(frozen=True)
class ProjectorConfig:
    type: str              # "linear" | "mlp{N}x_gelu" | "identity" | "mlp_downsample" | "mlp_downsample_{2x2,3x3}_fix"
    in_features: int
    out_features: int
    bias: bool = True

    def __post_init__(self):
        if self.type not in ("linear", "identity", *DOWNSAMPLE_PROJECTORS) and not _MLP_PROJECTOR.match(self.type):
            raise UnknownProjectorError(
                f"unknown projector type {self.type!r}; supported: 'linear', 'mlp2x_gelu' (or mlpNx_gelu), 'identity', "
                f"{', '.join(repr(t) for t in DOWNSAMPLE_PROJECTORS)}")
        if self.type == "identity" and self.in_features != self.out_features:
            raise ConfigError(f"an identity projector needs the vision features ({self.in_features}) as wide as the "
                              f"decoder ({self.out_features})")

    @property
    def downsample(self) -> int:
        """Side of the token blocks merged into one (1: none)."""
        return DOWNSAMPLE_PROJECTORS.get(self.type, 1)

    def tokens_out(self, grid: int) -> int:
        """Tokens out for a square grid x grid of tokens in (the grid is zero-padded to the block size)."""
        return (-(-grid // self.downsample)) ** 2

    @property
    def mlp_depth(self) -> int:
        """Number of linear layers of a linear / mlpNx_gelu projector."""
        if self.type == "identity":
            return 0
        if self.type == "linear":
            return 1
        if self.type in DOWNSAMPLE_PROJECTORS:
            raise ValueError(f"{self.type} is not a plain MLP")
        return int(_MLP_PROJECTOR.match(self.type).group(1))


@dataclass(frozen=True)
class VisionConfig:
    """A transformers vision tower plus how LLaVA selects its features."""

    hf_config: dict[str, Any]                 # the tower's own config (e.g. CLIPVisionConfig dict)
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    feature_layers: tuple[int, ...] = (-2,)  # indices into hidden_states (0 = embeddings)
    select_strategy: str = "default"          # "default" drops CLS, "full" keeps it

    def __post_init__(self):
        if self.select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(f"vision_feature_select_strategy {self.select_strategy!r} is not one of "
                              f"{SELECT_STRATEGIES}")
        for layer in self.feature_layers:
            if not -(self.num_layers + 1) <= layer <= self.num_layers:
                raise ConfigError(f"vision_feature_layer {layer} is out of range for a tower with "
                                  f"{self.num_layers} layers")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def from_hf(cls, d: dict[str, Any], feature_layers: tuple[int, ...], select_strategy: str,
                default_type: str = "clip_vision_model") -> "VisionConfig":
        """From a tower's config dict, read through transformers' config class for its model type."""
        from transformers import CLIPVisionConfig, SiglipVisionConfig

        model_type = d.get("model_type", default_type)
        if model_type not in VISION_MODEL_TYPES:
            raise ConfigError(f"vision tower model_type {model_type!r} is not supported; supported: "
                              f"{VISION_MODEL_TYPES}")
        hf_cls = CLIPVisionConfig if model_type == "clip_vision_model" else SiglipVisionConfig
        try:
            hf = hf_cls(**{k: v for k, v in d.items() if k != "model_type"})
            return cls(hf_config={**d, "model_type": model_type}, image_size=int(hf.image_size),
                       patch_size=int(hf.patch_size), hidden_size=int(hf.hidden_size),
                       num_layers=int(hf.num_hidden_layers), feature_layers=tuple(int(x) for x in feature_layers),
                       select_strategy=select_strategy)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"vision config has a malformed value: {e}") from None

    @property
    def model_type(self) -> str:
        return self.hf_config.get("model_type", "clip_vision_model")

    @property
    def has_cls_token(self) -> bool:
        return self.model_type == "clip_vision_model"

    @property
    def tokens_per_image(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        if self.has_cls_token and self.select_strategy == "full":
            n += 1
        return n

    @property
    def layers_needed(self) -> int:
        """Encoder layers that must run to produce every selected hidden state."""
        return max(i if i >= 0 else self.num_layers + 1 + i for i in self.feature_layers)


AWQ_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class AWQConfig:
    """4-bit AWQ weights of the decoder's linear layers (AutoAWQ `quantization_config` or
    `quant_config.json`; llm-awq v2 checkpoints are converted to the same layout at load)."""

    group_size: int = 128
    bits: int = 4
    zero_point: bool = True
    version: str = "gemm"                       # "gemm" (AutoAWQ) or "v2" (llm-awq / TinyChat)
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits != 4:
            raise ConfigError(f"AWQ with {self.bits} bits is not supported (only 4)")
        if self.group_size not in AWQ_GROUP_SIZES:
            raise ConfigError(f"AWQ group size {self.group_size} is not one of {AWQ_GROUP_SIZES}")
        if self.version not in ("gemm", "v2"):
            raise ConfigError(f"AWQ version {self.version!r} is not supported (gemm or v2)")
        if not self.zero_point:
            raise ConfigError("AWQ without zero points is not supported")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AWQConfig":
        method = d.get("quant_method", "awq")
        if str(method).lower() != "awq":
            raise ConfigError(f"quantization method {method!r} is not supported (only awq)")
        try:
            return cls(
                group_size=int(d.get("group_size", d.get("q_group_size", 128))),
                bits=int(d.get("bits", d.get("w_bit", 4))),
                zero_point=bool(d.get("zero_point", True)),
                version=str(d.get("version", "gemm")).lower(),
                modules_to_not_convert=tuple(d.get("modules_to_not_convert") or ()),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"quantization config has a malformed value: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point, "version": self.version,
                "modules_to_not_convert": list(self.modules_to_not_convert)}


# ---- reading config files ------------------------------------------------------------------

def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.name} not found in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
