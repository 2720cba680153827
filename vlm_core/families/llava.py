"""LLaVA-1.5 in the llava-hf layout (`LlavaForConditionalGeneration`): everything about the family.

Folder: `config.json` with `text_config` and `vision_config` (transformers' LlavaConfig), weights
as one `model.safetensors` or shards, the tokenizer and `preprocessor_config.json` beside them.
Weight names exist in two key layouts:
  old (transformers < 4.52, and what the Hub mostly holds):
      language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
      multi_modal_projector.*
  current: model.language_model.*, lm_head.*, model.vision_tower.*, model.multi_modal_projector.*
and the vision tower may or may not carry the `vision_model.` infix; both load through
`LLAVA_HF_MAPPING`.

This module owns the family's detection, config, weight-name mapping, model (`LlavaModel`),
processor (`LlavaProcessor`: prompt + images -> token ids with placeholder runs, media items) and
its media token count (`media_tokens`, one tile of `tokens_per_image` per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

from ..checkpoint import (MODEL_PARTS, Rename, check_parts, convert_v2_state, default_dtype, unbuilt,
                          iter_weights, load_weights, parse_dtype, read_quant_config, rename, save_awq_copy,
                          weight_files)
from ..config import ProjectorConfig, TextConfig, VisionConfig, read_json
from ..errors import CheckpointError, ConfigError, InputError
from ..inputs.image import CLIP_MEAN, CLIP_STD, ImageInput, ImageProcessor, ImageProcessorConfig
from ..inputs.media import MediaItem
from ..inputs.placeholders import MultimodalPrompt, PlaceholderSpec, expand_placeholders
from ..inputs.processor import BaseProcessor, Prompt
from ..inputs.template import IMAGE_PLACEHOLDER, load_tokenizer, render_chat, user_turn
from ..models.composed import ComposedVLM
from ..models.layers import LinearFactory, dense_linear
from ..quant.awq_linear import awq_linear_factory

PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"


def detect(model_dir: str | Path) -> bool:
    """A llava-hf folder: a config.json with both sub-configs. (`family_of` falls back to this
    family, so that a broken folder gets this loader's precise error.)"""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    try:
        raw = read_json(path)
    except CheckpointError:
        return False
    return "text_config" in raw and "vision_config" in raw


# ---- config ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlavaConfig:
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
    def from_llava_hf(cls, d: dict[str, Any]) -> "LlavaConfig":
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
            vision = VisionConfig.from_hf(vd, tuple(int(x) for x in layers),
                                          d.get("vision_feature_select_strategy", "default"))
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


# ---- weights ---------------------------------------------------------------------------------

# (checkpoint-name pattern, our-name replacement); the first matching row wins.
LLAVA_HF_MAPPING: tuple[tuple[str, Rename], ...] = (
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^language_model\.model\.", "decoder."),
    (r"^model\.language_model\.", "decoder."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision.tower."),
    # llava-hf linear_1/linear_2 -> Sequential indices 0/2
    (r"^(?:model\.)?multi_modal_projector\.linear_(\d+)\.", lambda m: f"projector.{2 * (int(m.group(1)) - 1)}."),
)


def read_config(model_dir: str | Path) -> LlavaConfig:
    return LlavaConfig.from_llava_hf(read_json(Path(model_dir) / "config.json"))


def load(model_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         parts: Collection[str] = MODEL_PARTS, linear: LinearFactory = dense_linear) -> LlavaModel:
    """Load a llava-hf `LlavaForConditionalGeneration` checkpoint into our `LlavaModel`.

    `parts` chooses what is built and loaded: "vision" (tower + projector) and/or "llm" (the
    decoder). A vision replica loads only the first, an LLM replica only the second; the
    other part's tensors are never read.
    """
    parts = check_parts(parts)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    raw = read_json(model_dir / "config.json")
    config = LlavaConfig.from_llava_hf(raw)
    quant = read_quant_config(model_dir, raw)
    if quant is not None:
        linear = awq_linear_factory(quant)
    files = weight_files(model_dir)
    dtype = parse_dtype(dtype, default_dtype(raw, device))

    model = LlavaModel.build_parts(config, parts, dtype, linear)
    skip = unbuilt(parts, config.vision.layers_needed)

    def wanted(key: str) -> bool:
        name = rename(key, LLAVA_HF_MAPPING)
        return name is None or not skip(name)

    tensors = iter_weights(files, wanted)
    if quant is not None and quant.version == "v2":
        tensors = iter(convert_v2_state(dict(tensors), quant.group_size).items())
    load_weights(model, tensors, LLAVA_HF_MAPPING, dtype, skip, prepare=torch.device(device).type == "cpu")
    model.tie_head()
    return model.to(device).eval()



def save_awq_checkpoint(src_dir: str | Path, out_dir: str | Path, model, packed: dict[str, dict[str, torch.Tensor]],
                        group_size: int) -> Path:
    """Write an AutoAWQ gemm checkpoint in the llava-hf key layout of `src_dir`
    (`checkpoint.save_awq_copy`)."""
    return save_awq_copy(src_dir, out_dir, model, packed, group_size, LLAVA_HF_MAPPING,
                         ("vision_tower", "multi_modal_projector", "lm_head"))


# ---- model -----------------------------------------------------------------------------------

class LlavaModel(ComposedVLM):
    config: LlavaConfig

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_vision()
        feats = self.vision(pixel_values.to(self.device))         # [N, n_tok, C_v]
        return self.projector(feats.to(self.dtype))               # [N, n_tok, H]

    def embed_media(self, items) -> list[torch.Tensor]:
        """One embedding [tokens_per_image, H] per one-tile `MediaItem`, in one tower forward."""
        if not items:
            return []
        return list(self.embed_images(torch.cat([it.pixels for it in items])))


# ---- processor and media token count -----------------------------------------------------------

def media_tokens(config: LlavaConfig, item: MediaItem | None = None) -> int:
    """Length of an image's embedding: one tile of `tokens_per_image` (the only place it is counted)."""
    return config.vision.tokens_per_image


def max_item_tiles(config: LlavaConfig) -> int:
    """The most tiles one media item can have: a LLaVA image is one tile."""
    return 1


class LlavaProcessor(BaseProcessor):
    """Chat template -> token ids with image placeholder spans, and pixel values. Needs the
    tokenizer, the config and the image preprocessing settings but no weights, so a serving front
    end builds prompts on its own and sends only ids and pixels onwards."""

    media_kinds = ("image",)     # what prepare_media takes

    def __init__(self, config: LlavaConfig, tokenizer, image_processor: ImageProcessor):
        super().__init__(tokenizer, config.text.eos_token_ids)
        self.config = config
        self.image_processor = image_processor
        im_start = self.token_id(IM_START_TOKEN) if config.use_im_start_end else None
        im_end = self.token_id(IM_END_TOKEN) if config.use_im_start_end else None
        if config.use_im_start_end and (im_start is None or im_end is None):
            raise CheckpointError("config sets mm_use_im_start_end but the tokenizer lacks <im_start>/<im_end>")
        self.spec = PlaceholderSpec(image_token_id=config.image_token_id, tokens_per_image=media_tokens(config),
                                    patch_token_id=self.token_id(PATCH_TOKEN),
                                    im_start_id=im_start, im_end_id=im_end)
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.media_token_ids = frozenset(t for t in (config.image_token_id, self.spec.patch_token_id) if t is not None)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: LlavaConfig | None = None) -> "LlavaProcessor":
        model_dir = Path(model_dir)
        config = config or read_config(model_dir)
        size = config.vision.image_size
        images = cls.image_processor_from(model_dir / "preprocessor_config.json", config.pad_to_square,
                                          ImageProcessorConfig(size, size, CLIP_MEAN, CLIP_STD, config.pad_to_square))
        return cls(config, load_tokenizer(model_dir), images)

    def prompt_text(self, prompt: Prompt, num_images: int) -> str:
        messages = user_turn(prompt, num_images) if isinstance(prompt, str) else prompt
        text = render_chat(self.tokenizer, messages)
        return text.replace(IMAGE_PLACEHOLDER, self.image_token) if self.image_token != IMAGE_PLACEHOLDER else text

    def prepare(self, prompt: Prompt, images: Sequence[ImageInput] = (), apply_template: bool = True
                ) -> tuple[MultimodalPrompt, torch.Tensor]:
        """Token ids with one placeholder span per image, and pixel values [N, 3, S, S]."""
        text, pixels = self.text_and_pixels(prompt, images, apply_template)
        return expand_placeholders(self.tokenize(text), len(images), self.spec), pixels

    def text_and_pixels(self, prompt: Prompt, images: Sequence[ImageInput], apply_template: bool
                        ) -> tuple[str, torch.Tensor]:
        """The prompt's text (templated, or given as it is) and the images' pixel values."""
        pixels = self.image_processor(list(images))
        text = self.prompt_text(prompt, len(images)) if apply_template else prompt
        if not isinstance(text, str):
            raise TypeError("apply_template=False needs the prompt as a string")
        return text, pixels

    def prepare_media(self, prompt: Prompt, media: dict | None = None, apply_template: bool = True
                      ) -> tuple[MultimodalPrompt, list[MediaItem]]:
        """`prepare` over a media dict; LLaVA takes images only, one tile each."""
        media = dict(media or {})
        if set(media) - {"image"}:
            raise InputError(f"this LLaVA model takes images only, got {sorted(set(media) - {'image'})}")
        mm, pixels = self.prepare(prompt, list(media.get("image") or []), apply_template)
        return mm, [MediaItem(p[None]) for p in pixels]
