"""Internal model configuration: frozen dataclasses parsed from checkpoint configs.

Checkpoint `config.json` files come in several dialects (transformers 4.x `rope_theta` +
`rope_scaling`, transformers 5.x `rope_parameters`, llava-hf nesting of `text_config` and
`vision_config`). The parsers here turn each into one internal form and validate it, so
model code never looks at raw dictionaries.
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
        model_type = d.get("model_type", "llama")
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"text model_type {model_type!r} is not supported (expected one of {TEXT_MODEL_TYPES})")
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ConfigError("Qwen2 with use_sliding_window is not supported")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope=_parse_rope(d),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                hidden_act=d.get("hidden_act", "silu"),
                model_type=model_type,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise ConfigError(f"text config is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"text config has a malformed value: {e}") from None


def _parse_rope(d: dict[str, Any]) -> RopeConfig:
    """Read both the transformers-5 `rope_parameters` and the older `rope_theta`/`rope_scaling`."""
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kw: dict[str, Any] = {"theta": float(params.get("rope_theta", d.get("rope_theta", 10000.0))), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ConfigError(f"rope scaling of type {rope_type!r} needs a 'factor'")
        kw["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"llama3 rope scaling needs {key!r}")
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kw)


DOWNSAMPLE_PROJECTORS = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}


@dataclass(frozen=True)
class ProjectorConfig:
    type: str              # "linear" | "mlp{N}x_gelu" | "mlp_downsample" | "mlp_downsample_{2x2,3x3}_fix"
    in_features: int
    out_features: int
    bias: bool = True

    def __post_init__(self):
        if self.type not in ("linear", *DOWNSAMPLE_PROJECTORS) and not _MLP_PROJECTOR.match(self.type):
            raise UnknownProjectorError(
                f"unknown projector type {self.type!r}; supported: 'linear', 'mlp2x_gelu' (or mlpNx_gelu), "
                f"{', '.join(repr(t) for t in DOWNSAMPLE_PROJECTORS)}")

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


@dataclass(frozen=True)
class VLMConfig:
    text: TextConfig
    vision: VisionConfig
    projector: ProjectorConfig
    image_token_id: int
    # `<im_start>`/`<im_end>` markers around each image's placeholder run (LLaVA
    # `mm_use_im_start_end`); their ids come from the tokenizer.
    use_im_start_end: bool = False
    # LLaVA-1.5 pads images to a square with the mean colour before CLIP preprocessing.
    pad_to_square: bool = False

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image

    @classmethod
    def from_llava_hf(cls, d: dict[str, Any]) -> "VLMConfig":
        if "text_config" not in d or "vision_config" not in d:
            raise ConfigError("a llava config needs both 'text_config' and 'vision_config'")
        text = TextConfig.from_hf(d["text_config"])
        vd = d["vision_config"]
        vtype = vd.get("model_type", "clip_vision_model")
        if vtype not in ("clip_vision_model",):
            raise ConfigError(f"vision model_type {vtype!r} is not supported by this loader")
        layer = d.get("vision_feature_layer", -2)
        layers = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
        try:
            vision = VisionConfig(
                hf_config=dict(vd),
                image_size=int(vd.get("image_size", 224)),
                patch_size=int(vd.get("patch_size", 32)),
                hidden_size=int(vd.get("hidden_size", 768)),
                num_layers=int(vd.get("num_hidden_layers", 12)),
                feature_layers=tuple(int(x) for x in layers),
                select_strategy=d.get("vision_feature_select_strategy", "default"),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"vision config has a malformed value: {e}") from None
        act = d.get("projector_hidden_act", "gelu")
        ptype = d.get("mm_projector_type", "mlp2x_gelu")
        if act != "gelu" and ptype != "linear":
            raise ConfigError(f"projector_hidden_act {act!r} is not supported (only 'gelu')")
        projector = ProjectorConfig(
            type=ptype,
            in_features=vision.hidden_size * len(layers),
            out_features=text.hidden_size,
            bias=bool(d.get("multimodal_projector_bias", True)),
        )
        image_token = d.get("image_token_index", d.get("image_token_id"))
        if image_token is None:
            raise ConfigError("llava config is missing 'image_token_index'")
        return cls(
            text=text,
            vision=vision,
            projector=projector,
            image_token_id=int(image_token),
            use_im_start_end=bool(d.get("mm_use_im_start_end", False)),
            pad_to_square=d.get("image_aspect_ratio") == "pad",
        )


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


IMAGE_MODES = ("resize", "pad", "dynamic", "dynamic_s2")
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def _scales(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(int(x) for x in v.split(",") if x.strip())
    return tuple(int(x) for x in v)


def _encoder_entry(encoder: Any) -> dict:
    """A VILA `image_encoder` / `video_encoder` entry (a dict or its JSON)."""
    if isinstance(encoder, str):
        import json

        try:
            encoder = json.loads(encoder)
        except ValueError:
            raise ConfigError(f"media encoder config is not JSON: {encoder!r}") from None
    return encoder if isinstance(encoder, dict) else {}


@dataclass(frozen=True)
class VilaConfig:
    """VILA-1.5 / NVILA: a folder with `llm/`, `vision_tower/`, `mm_projector/` and a top-level
    config.json naming how images are cut (`image_aspect_ratio`) and the S2 scales, if any: NVILA's
    dynamic S2 (`dynamic_s2`, the last scale's grid follows the aspect ratio) or VILA-1.5-S2's
    static S2 (`s2`, every scale a square grid of the largest-scale picture)."""
    text: TextConfig
    vision: VisionConfig
    projector: ProjectorConfig
    image_mode: str = "resize"
    s2_scales: tuple[int, ...] = ()           # non-empty: S2
    s2_dynamic: bool = True                   # NVILA's dynamic S2; False: VILA-1.5's static S2
    s2_output_scale_idx: int = 0
    max_tiles: int = 12
    image_token: str = "<image>"
    video_token: str = "<vila/video>"
    image_end_tokens: str | None = "\n"
    video_end_tokens: str | None = "\n"
    video_sep_tokens: str | None = None
    video_pool_sizes: tuple[tuple[int, int, int], ...] = ()   # TSP video encoder; () = frame by frame
    num_video_frames: int = 8
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.image_mode not in IMAGE_MODES:
            raise ConfigError(f"image_aspect_ratio {self.image_mode!r} is not one of {IMAGE_MODES}")
        if self.s2_scales:
            if sorted(self.s2_scales) != list(self.s2_scales) or any(s % self.s2_scales[0] for s in self.s2_scales):
                raise ConfigError(f"s2_scales {self.s2_scales} must ascend in multiples of the first")
            if self.s2_scales[0] != self.vision.image_size:
                raise ConfigError(f"the first S2 scale ({self.s2_scales[0]}) must equal the tower's image size "
                                  f"({self.vision.image_size})")
            if not self.s2_dynamic and self.image_mode in ("dynamic", "dynamic_s2"):
                raise ConfigError(f"static S2 does not combine with image_aspect_ratio {self.image_mode!r}")
            if not self.s2_dynamic and self.video_pool_sizes:
                raise ConfigError("static S2 with a pooling (TSP) video encoder is not supported")
            if not -len(self.s2_scales) <= self.s2_output_scale_idx < len(self.s2_scales):
                raise ConfigError(f"s2_resize_output_to_scale_idx {self.s2_output_scale_idx} is out of range for "
                                  f"{len(self.s2_scales)} scales")
        if self.num_video_frames < 1:
            raise ConfigError("num_video_frames must be at least 1")
        for pool in self.video_pool_sizes:
            if len(pool) != 3 or min(pool) < 1:
                raise ConfigError(f"video pool sizes are (frames, rows, cols) of positive ints, got {pool}")

    @property
    def grid(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per tile-sized block after the projector."""
        return self.projector.tokens_out(self.grid)

    @classmethod
    def from_folder_configs(cls, top: dict[str, Any], llm: dict[str, Any], tower: dict[str, Any],
                            projector: dict[str, Any]) -> "VilaConfig":
        text = TextConfig.from_hf(llm)
        vtype = tower.get("model_type", "siglip_vision_model")
        if vtype not in VISION_MODEL_TYPES:
            raise ConfigError(f"vision tower model_type {vtype!r} is not supported; supported: {VISION_MODEL_TYPES}")
        feature = top.get("mm_vision_select_feature", "patch")
        if feature not in _SELECT_FEATURE:
            raise ConfigError(f"mm_vision_select_feature {feature!r} is not one of {tuple(_SELECT_FEATURE)}")
        mode = top.get("image_aspect_ratio") or "resize"
        dynamic = bool(top.get("dynamic_s2") or mode == "dynamic_s2")
        scales = _scales(top.get("s2_scales")) if (dynamic or top.get("s2")) else ()
        split = top.get("s2_max_split_size")
        if scales and split is not None and int(split) != scales[0]:
            raise ConfigError(f"s2_max_split_size {split} differs from the first S2 scale {scales[0]}; tiles are "
                              f"encoded at the tower's size, so they must be equal")
        image_enc, video_enc = _encoder_entry(top.get("image_encoder")), _encoder_entry(top.get("video_encoder"))
        try:
            vision = VisionConfig(
                hf_config=dict(tower), image_size=int(tower.get("image_size", 384)),
                patch_size=int(tower.get("patch_size", 14)), hidden_size=int(tower["hidden_size"]),
                num_layers=int(tower["num_hidden_layers"]),
                feature_layers=(int(top.get("mm_vision_select_layer", -2)),),
                select_strategy=_SELECT_FEATURE[feature])
            ptype = projector.get("mm_projector_type", top.get("mm_projector_type", "mlp2x_gelu"))
            proj = ProjectorConfig(type=ptype, in_features=vision.hidden_size * max(1, len(scales)),
                                   out_features=text.hidden_size)
            return cls(text=text, vision=vision, projector=proj, image_mode=mode, s2_scales=scales, s2_dynamic=dynamic,
                       s2_output_scale_idx=int(top.get("s2_resize_output_to_scale_idx", 0)),
                       max_tiles=int(top.get("max_tiles", 12)),
                       image_end_tokens=image_enc.get("end_tokens", "\n"),
                       video_end_tokens=video_enc.get("end_tokens", "\n"),
                       video_sep_tokens=video_enc.get("sep_tokens"),
                       video_pool_sizes=tuple(tuple(int(v) for v in p) for p in video_enc.get("pool_sizes") or ()),
                       num_video_frames=int(top.get("num_video_frames", 8)), raw=dict(top))
        except KeyError as e:
            raise ConfigError(f"vision tower config is missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"VILA config has a malformed value: {e}") from None


# ---- reading config files ------------------------------------------------------------------

VILA_SUBFOLDERS = ("llm", "vision_tower", "mm_projector")


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


def is_vila_folder(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return all((d / sub).is_dir() for sub in VILA_SUBFOLDERS)


def read_vila_config(model_dir: Path):
    raw = {name: read_json(model_dir / name / "config.json") for name in VILA_SUBFOLDERS}
    top = read_json(model_dir / "config.json")
    config = VilaConfig.from_folder_configs(top, raw["llm"], raw["vision_tower"], raw["mm_projector"])
    return config, top, raw
