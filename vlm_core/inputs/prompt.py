"""`PromptBuilder`: chat template -> token ids with image placeholder spans, and pixel values.

Needs the tokenizer, the model config and the image preprocessing settings, but no weights, so a
serving front end can build prompts on its own and send only ids and pixels onwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..config import VLMConfig, read_json
from ..errors import CheckpointError, InputError
from .media import MediaItem
from .image import CLIP_MEAN, CLIP_STD, ImageInput, ImageProcessor, ImageProcessorConfig
from .placeholders import MultimodalPrompt, PlaceholderSpec, expand_placeholders
from .template import IMAGE_PLACEHOLDER, Message, load_tokenizer, render_chat, user_turn

PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

Prompt = str | Sequence[Message]


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


class PromptBuilder:
    media_kinds = ("image",)     # what prepare_media takes

    def __init__(self, config: VLMConfig, tokenizer, image_processor: ImageProcessor):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        im_start = _token_id(tokenizer, IM_START_TOKEN) if config.use_im_start_end else None
        im_end = _token_id(tokenizer, IM_END_TOKEN) if config.use_im_start_end else None
        if config.use_im_start_end and (im_start is None or im_end is None):
            raise CheckpointError("config sets mm_use_im_start_end but the tokenizer lacks <im_start>/<im_end>")
        self.spec = PlaceholderSpec(image_token_id=config.image_token_id, tokens_per_image=config.tokens_per_image,
                                    patch_token_id=_token_id(tokenizer, PATCH_TOKEN),
                                    im_start_id=im_start, im_end_id=im_end)
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        eos = set(config.text.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: VLMConfig | None = None) -> "PromptBuilder":
        model_dir = Path(model_dir)
        config = config or VLMConfig.from_llava_hf(read_json(model_dir / "config.json"))
        pre = model_dir / "preprocessor_config.json"
        if pre.is_file():
            proc_cfg = ImageProcessorConfig.from_preprocessor_json(read_json(pre), config.pad_to_square)
        else:
            size = config.vision.image_size
            proc_cfg = ImageProcessorConfig(size, size, CLIP_MEAN, CLIP_STD, config.pad_to_square)
        return cls(config, load_tokenizer(model_dir), ImageProcessor(proc_cfg))

    def prompt_text(self, prompt: Prompt, num_images: int) -> str:
        messages = user_turn(prompt, num_images) if isinstance(prompt, str) else prompt
        text = render_chat(self.tokenizer, messages)
        return text.replace(IMAGE_PLACEHOLDER, self.image_token) if self.image_token != IMAGE_PLACEHOLDER else text

    def tokenize(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def prepare(self, prompt: Prompt, images: Sequence[ImageInput] = (), apply_template: bool = True
                ) -> tuple[MultimodalPrompt, torch.Tensor]:
        """Token ids with one placeholder span per image, and pixel values [N, 3, S, S]."""
        pixels = self.image_processor(list(images))
        text = self.prompt_text(prompt, len(images)) if apply_template else prompt
        if not isinstance(text, str):
            raise TypeError("apply_template=False needs the prompt as a string")
        return expand_placeholders(self.tokenize(text), len(images), self.spec), pixels

    def prepare_media(self, prompt: Prompt, media: dict | None = None, apply_template: bool = True
                      ) -> tuple[MultimodalPrompt, list[MediaItem]]:
        """`prepare` over a media dict; LLaVA takes images only, one tile each."""
        media = dict(media or {})
        if set(media) - {"image"}:
            raise InputError(f"this LLaVA model takes images only, got {sorted(set(media) - {'image'})}")
        mm, pixels = self.prepare(prompt, list(media.get("image") or []), apply_template)
        return mm, [MediaItem(p[None]) for p in pixels]
