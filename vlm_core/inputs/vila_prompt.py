"""`VilaPromptBuilder`: VILA-1.5 / NVILA prompts -> token ids with media spans, and media items.

Media come as a dict of lists, `{"image": [...], "video": [...]}`; a video is a list of frames
(PIL images, paths or bytes). In the text each image is `<image>` and each video
`<vila/video>` (placed where the message's parts put them, or first when the prompt is a plain
string without them). Each media token expands into a placeholder run as long as the item's
embedding, followed by the encoder's end tokens ("\\n" by default) as ordinary text; a video
expands frame by frame. Images are cut as the config says: `resize` / `pad` (one tile),
`dynamic` (aspect-ratio tiles plus a thumbnail, each its own `<image>` followed by "\\n"), or
`dynamic_s2` (all scales' tiles in one item with its block size). Tiling applies to a lone
image; several images are each resized to one tile, as VILA does. With static S2 (VILA-1.5-S2)
every image and video frame is preprocessed at the largest scale, resized (bicubic, on the
normalised tensor) to each scale and split into tower-sized tiles: one item per picture.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..config import VilaConfig, read_json
from ..errors import CheckpointError, InputError, PlaceholderMismatchError
from .image import ImageInput, ImageProcessor, ImageProcessorConfig, expand_to_square, load_image, resize
from .media import MediaItem
from .tiling import split_chessboard
from .placeholders import ImageSpan, MultimodalPrompt
from .template import CHATML_TEMPLATE, LLAMA3_TEMPLATE, VICUNA_TEMPLATE, load_tokenizer, normalize_messages

Media = dict[str, Sequence[Any]]


def default_template(config: VilaConfig) -> str:
    """The chat template a VILA family uses when its tokenizer carries none."""
    if config.text.model_type == "qwen2":
        return CHATML_TEMPLATE
    if config.text.vocab_size >= 128000:
        return LLAMA3_TEMPLATE
    return VICUNA_TEMPLATE


def sample_frames(frames: Sequence[Any], limit: int) -> list[Any]:
    """At most `limit` frames, evenly spaced, first and last kept."""
    n = len(frames)
    if n <= limit:
        return list(frames)
    if limit == 1:
        return [frames[0]]
    return [frames[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


class VilaPromptBuilder:
    def __init__(self, config: VilaConfig, tokenizer, image_processor: ImageProcessor):
        self.config, self.tokenizer, self.image_processor = config, tokenizer, image_processor
        if config.s2_scales and not config.s2_dynamic:   # static S2 preprocesses at the largest scale
            top = config.s2_scales[-1]
            self.s2_processor = ImageProcessor(dataclasses.replace(image_processor.cfg, shortest_edge=top,
                                                                   crop_size=top))
        self.image_token_id = self._special_id(config.image_token)
        self.video_token_id = self._special_id(config.video_token, required=False)
        self.end_ids = {"image": self._ids(config.image_end_tokens), "video": self._ids(config.video_end_tokens)}
        self.sep_ids = self._ids(config.video_sep_tokens)
        self.template = getattr(tokenizer, "chat_template", None) or default_template(config)
        eos = set(config.text.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    def _special_id(self, token: str, required: bool = True) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            if required:
                raise CheckpointError(f"the tokenizer has no {token!r} token")
            return None
        return int(tid)

    def _ids(self, text: str | None) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: VilaConfig) -> "VilaPromptBuilder":

        folder = Path(folder)
        pre = folder / "vision_tower" / "preprocessor_config.json"
        if pre.is_file():
            proc = ImageProcessorConfig.from_preprocessor_json(read_json(pre), config.image_mode == "pad")
        else:
            size = config.vision.image_size
            proc = ImageProcessorConfig(size, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), config.image_mode == "pad",
                                        square_resize=True)
        return cls(config, load_tokenizer(folder / "llm"), ImageProcessor(proc))

    @property
    def media_kinds(self) -> tuple[str, ...]:
        """What prepare_media takes: video only when the tokenizer has the video token."""
        return ("image", "video") if self.video_token_id is not None else ("image",)

    def select_frames(self, frames: Sequence[Any]) -> list[Any]:
        """The frames of a video that the model will see (so callers decode no others)."""
        return sample_frames(frames, self.config.num_video_frames)

    # ---- media ----------------------------------------------------------------------------

    def _tile_pixels(self, tiles) -> torch.Tensor:
        return torch.stack([self.image_processor.one(t) for t in tiles])

    def image_items(self, images: Sequence[ImageInput]) -> list[MediaItem]:
        from .tiling import dynamic_s2_tiles, dynamic_tiles

        cfg, size = self.config, self.config.vision.image_size
        pics = [load_image(im) for im in images]
        if cfg.s2_scales and not cfg.s2_dynamic:
            return [self._static_s2_item(p) for p in pics]
        if len(pics) == 1 and cfg.image_mode == "dynamic_s2" and cfg.s2_scales:
            tiles, block = dynamic_s2_tiles(pics[0], cfg.s2_scales, size, cfg.max_tiles)
            return [MediaItem(self._tile_pixels(tiles), block)]
        if len(pics) == 1 and cfg.image_mode == "dynamic":
            return [MediaItem(self._tile_pixels([t])) for t in dynamic_tiles(pics[0], size, cfg.max_tiles)]
        return [MediaItem(self._tile_pixels([self._single(p)])) for p in pics]

    def _single(self, img, size: int | None = None):
        if self.config.image_mode == "pad":
            return expand_to_square(img, tuple(int(x * 255) for x in self.image_processor.cfg.mean))
        size = size or self.config.vision.image_size
        return resize(img, (size, size))

    def _static_s2_item(self, img, kind: str = "image") -> MediaItem:
        """Static S2: the picture at the largest scale, bicubically resized to every scale, each cut
        into a square grid of tower-sized tiles (smallest scale first, tiles row-major)."""
        scales = self.config.s2_scales
        x = self.s2_processor.one(self._single(img, scales[-1]))[None]
        tiles = []
        for s in scales:
            xs = x if s == scales[-1] else F.interpolate(x, size=(s, s), mode="bicubic")
            tiles.append(split_chessboard(xs, s // scales[0], s // scales[0]))
        n = scales[-1] // scales[0]
        return MediaItem(torch.cat(tiles), (n, n), kind)

    def video_items(self, frames: Sequence[ImageInput]) -> list[list[MediaItem]]:
        """A video's spans, grouped per pool size (one group, frame by frame, without pooling)."""
        if not frames:
            raise InputError("a video needs at least one frame")
        picked = sample_frames(frames, self.config.num_video_frames)
        if self.config.s2_scales and not self.config.s2_dynamic:
            return [[self._static_s2_item(load_image(f), "video") for f in picked]]
        pixels = self._tile_pixels([self._single(load_image(f)) for f in picked])
        if not self.config.video_pool_sizes:
            return [[MediaItem(px[None], None, "video") for px in pixels]]
        groups = []
        for pool in self.config.video_pool_sizes:
            if len(picked) % pool[0]:
                raise InputError(f"this model pools video frames in groups of {pool[0]}; the video has "
                                 f"{len(picked)} frames")
            groups.append([MediaItem(pixels[i:i + pool[0]], None, "video", tuple(pool))
                           for i in range(0, len(picked), pool[0])])
        return groups

    def media_tokens(self, item: MediaItem) -> int:
        """Length of the item's embedding (what `VilaModel.embed_media` returns for it)."""
        cfg = self.config
        if item.pool is not None:   # a pooled video group
            side = int(round(cfg.tokens_per_tile ** 0.5))
            return (side // item.pool[1]) * (side // item.pool[2])
        if not cfg.s2_scales:
            return item.pixels.shape[0] * cfg.tokens_per_tile
        if item.block_size is None:
            return cfg.tokens_per_tile
        last = len(cfg.s2_scales) - 1
        if cfg.s2_output_scale_idx in (last, -1):
            rows, cols = item.block_size
        else:
            rows = cols = cfg.s2_scales[cfg.s2_output_scale_idx] // cfg.s2_scales[0]
        if not cfg.s2_dynamic:   # one projector pass over the whole map
            return cfg.projector.tokens_out(rows * cfg.grid)
        return rows * cols * cfg.tokens_per_tile

    # ---- prompt -----------------------------------------------------------------------------

    def render(self, prompt, n_images: int, n_videos: int) -> str:
        cfg = self.config
        if isinstance(prompt, str):
            if cfg.image_token in prompt or cfg.video_token in prompt:
                text = prompt
            else:
                text = cfg.image_token * n_images + cfg.video_token * n_videos + prompt
            messages = [{"role": "user", "content": text}]
        else:
            messages = []
            for m in normalize_messages(prompt, allow_video=True):
                text = "".join(p["text"] if p["type"] == "text" else
                               cfg.image_token if p["type"] == "image" else cfg.video_token for p in m["content"])
                messages.append({"role": m["role"], "content": text})
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)

    def prepare_media(self, prompt, media: Media | None = None, apply_template: bool = True
                      ) -> tuple[MultimodalPrompt, list[MediaItem]]:
        media = dict(media or {})
        unknown = set(media) - {"image", "video"}
        if unknown:
            raise InputError(f"unknown media kinds {sorted(unknown)}; use 'image' and 'video'")
        images, videos = list(media.get("image") or []), list(media.get("video") or [])
        if videos and self.video_token_id is None:
            raise InputError(f"this model's tokenizer has no {self.config.video_token!r} token: no video input")
        if apply_template:
            text = self.render(prompt, len(images), len(videos))
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise TypeError("apply_template=False needs the prompt as a string")
        n_img, n_vid = text.count(self.config.image_token), text.count(self.config.video_token)
        if (n_img, n_vid) != (len(images), len(videos)):
            raise PlaceholderMismatchError(f"the prompt has {n_img} image and {n_vid} video tokens for "
                                           f"{len(images)} images and {len(videos)} videos")
        image_items = self.image_items(images) if images else []
        if self.config.image_mode == "dynamic" and len(images) == 1:   # one <image> per tile, each on its line
            text = text.replace(self.config.image_token, (self.config.image_token + "\n") * len(image_items), 1)
        video_items = [self.video_items(v) for v in videos]
        bos = self.tokenizer.bos_token
        ids = list(self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])
        out_ids: list[int] = []
        spans: list[ImageSpan] = []
        items: list[MediaItem] = []
        img_iter, vid_iter = iter(image_items), iter(video_items)
        for tid in ids:
            if tid == self.image_token_id:
                groups, kind, sep = [[next(img_iter)]], "image", []
            elif tid == self.video_token_id:
                groups, kind, sep = next(vid_iter), "video", self.sep_ids
            else:
                out_ids.append(tid)
                continue
            for group in groups:
                for item in group:
                    n = self.media_tokens(item)
                    spans.append(ImageSpan(len(out_ids), n))
                    out_ids += [tid] * n + self.end_ids[kind]
                    items.append(item)
                out_ids += sep
        return MultimodalPrompt(tuple(out_ids), tuple(spans)), items
