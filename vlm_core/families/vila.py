"""VILA-1.5 and NVILA (the VILA folder layout): everything about the family.

Folder: a top-level config.json (image mode, S2 scales, media encoders), `llm/` (a transformers
LlamaForCausalLM / Qwen2ForCausalLM folder with the tokenizer; 16-bit or AWQ), `vision_tower/`
(SiglipVisionModel / CLIPVisionModel + preprocessor_config.json) and `mm_projector/`
(config.json with mm_projector_type, weights `layers.N.*`).

This module owns the family's detection, config (`VilaConfig`), weight-name mapping, model
(`VilaModel`), processor (`VilaProcessor`) and media token count (`media_tokens`, the only place
it is computed; `max_item_tiles` bounds an item's tiles for the vision deployment).

Processor: Media come as a dict of lists, `{"image": [...], "video": [...]}`; a video is a list of frames
(PIL images, paths or bytes). In the text each image is `<image>` and each video
`<vila/video>` (placed where the message's parts put them, or first when the prompt is a plain
string without them). Each media token expands into a placeholder run as long as the item's
embedding, followed by the encoder's end tokens ("\\n" by default) as ordinary text, tokenized
without special tokens; a video expands frame by frame (`sample_frames` picks them). Images are
cut as the config says: `resize` / `pad` (one tile), `dynamic` (aspect-ratio tiles plus a
thumbnail, each its own `<image>` followed by "\\n"), or `dynamic_s2` (all scales' tiles in one
item with its block size). Tiling applies to a lone image; several images and video frames go to
the image processor as VILA hands them over: squashed to a tile in `resize` mode, padded to a
square in `pad` mode, and otherwise as they are (CLIP's processor then centre-crops).

End tokens and BOS: NVILA's released code embeds a media item's end tokens by calling the
tokenizer with its defaults, so a BOS-adding (LLaMA) tokenizer would put BOS before each "\\n".
NVILA's own checkpoints use Qwen2 tokenizers, which add no BOS, so for them that and "\\n" alone
are the same tokens. The LLaMA-tokenizer checkpoints are VILA-1.5's, trained with VILA-1.5's
code, which writes "<image>\\n" in the text and tokenizes the text after an image with its BOS
stripped: no BOS follows an image there. That is what is matched: end tokens never carry BOS.

With static S2 (VILA-1.5-S2) every image and video frame is preprocessed at the largest scale,
resized (bicubic, on the normalised tensor) to each scale and split into tower-sized tiles: one
item per picture.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import (MODEL_PARTS, Rename, check_parts, convert_v2_state, default_dtype,
                          iter_weights, load_weights, parse_dtype, read_quant_config, weight_files)
from ..config import VISION_MODEL_TYPES, ProjectorConfig, TextConfig, VisionConfig, read_json
from ..errors import CheckpointError, ConfigError, InputError, PlaceholderMismatchError
from ..inputs.image import ImageInput, ImageProcessor, ImageProcessorConfig, expand_to_square, load_image, resize
from ..inputs.media import MediaItem
from ..inputs.placeholders import ImageSpan, MultimodalPrompt
from ..inputs.processor import BaseProcessor
from ..inputs.template import CHATML_TEMPLATE, LLAMA3_TEMPLATE, VICUNA_TEMPLATE, load_tokenizer, normalize_messages
from ..inputs.tiling import dynamic_s2_tiles, dynamic_tiles, split_chessboard
from ..models.composed import ComposedVLM
from ..models.layers import dense_linear
from ..models.s2 import merge_scales, project_blocks, tiles_per_scale
from ..quant.awq_linear import awq_linear_factory

Media = dict[str, Sequence[Any]]
log = logging.getLogger(__name__)


def detect(model_dir: str | Path) -> bool:
    """A VILA-family folder: its three subfolders."""
    d = Path(model_dir)
    return all((d / sub).is_dir() for sub in VILA_SUBFOLDERS)


# ---- config ----------------------------------------------------------------------------------

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
    min_tiles: int = 1                        # "dynamic" mode's fewest tiles (dynamic S2: the last scale's square)
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
            if self.num_video_frames % pool[0]:
                raise ConfigError(f"num_video_frames {self.num_video_frames} does not split into the video pool's "
                                  f"groups of {pool[0]} frames")

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
        for key, neutral in (("video_max_tiles", (None, -1, 0, 1)), ("fps", (None, 0))):
            if top.get(key) not in neutral:   # what NVILA's released inference does with them too
                log.warning("config %s=%r is not applied: video frames are sampled evenly (num_video_frames) and "
                            "encoded untiled, as NVILA's released inference code does", key, top[key])
        try:
            for key in ("hidden_size", "num_hidden_layers"):
                if key not in tower:
                    raise KeyError(key)
            vision = VisionConfig.from_hf(tower, (int(top.get("mm_vision_select_layer", -2)),),
                                          _SELECT_FEATURE[feature], default_type="siglip_vision_model")
            ptype = projector.get("mm_projector_type", top.get("mm_projector_type", "mlp2x_gelu"))
            proj = ProjectorConfig(type=ptype, in_features=vision.hidden_size * max(1, len(scales)),
                                   out_features=text.hidden_size)
            return cls(text=text, vision=vision, projector=proj, image_mode=mode, s2_scales=scales, s2_dynamic=dynamic,
                       s2_output_scale_idx=int(top.get("s2_resize_output_to_scale_idx", 0)),
                       max_tiles=int(top.get("max_tiles", 12)), min_tiles=int(top.get("min_tiles") or 1),
                       image_end_tokens=image_enc.get("end_tokens", "\n"),
                       video_end_tokens=video_enc.get("end_tokens", "\n"),
                       video_sep_tokens=video_enc.get("sep_tokens"),
                       video_pool_sizes=tuple(tuple(int(v) for v in p) for p in video_enc.get("pool_sizes") or ()),
                       num_video_frames=int(top.get("num_video_frames", 8)), raw=dict(top))
        except KeyError as e:
            raise ConfigError(f"vision tower config is missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"VILA config has a malformed value: {e}") from None


VILA_SUBFOLDERS = ("llm", "vision_tower", "mm_projector")


def read_vila_config(model_dir: str | Path):
    """(VilaConfig, top-level config dict, {subfolder: config dict})."""
    model_dir = Path(model_dir)
    raw = {name: read_json(model_dir / name / "config.json") for name in VILA_SUBFOLDERS}
    top = read_json(model_dir / "config.json")
    config = VilaConfig.from_folder_configs(top, raw["llm"], raw["vision_tower"], raw["mm_projector"])
    return config, top, raw


def read_config(model_dir: str | Path) -> VilaConfig:
    return read_vila_config(model_dir)[0]


# ---- weights ---------------------------------------------------------------------------------
# <folder>/config.json (top level: image mode, S2 scales, media encoders), llm/ (a transformers
# LlamaForCausalLM / Qwen2ForCausalLM folder with the tokenizer; 16-bit or AWQ), vision_tower/
# (SiglipVisionModel / CLIPVisionModel + preprocessor_config.json), mm_projector/ (config.json
# with mm_projector_type, weights `layers.N.*`). Tensors are read with their subfolder as a
# prefix so one table maps them all.
VILA_MAPPING: tuple[tuple[str, Rename], ...] = (
    (r"^llm/(?:model\.)?lm_head\.", "decoder.lm_head."),
    (r"^llm/model\.", "decoder."),
    (r"^vision_tower/(?:vision_model\.)?", "vision.tower."),
    (r"^mm_projector/layers\.(weight|bias)$", r"projector.0.\1"),     # `linear`: layers is the Linear itself
    (r"^mm_projector/layers\.", "projector."),
)
_VILA_PARTS = {"vision": ("vision_tower", "mm_projector"), "llm": ("llm",)}


def load(model_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         parts: Collection[str] = MODEL_PARTS) -> "VilaModel":
    """Load a VILA-1.5 / NVILA folder into our `VilaModel` (`parts` as for the llava family)."""
    model, top, raw = load_with_configs(model_dir, dtype, device, parts)
    model.folder_configs = (top, raw)      # what `save_pretrained` writes back
    return model


def load_with_configs(model_dir: str | Path, dtype: str | torch.dtype | None = None,
                      device: str | torch.device = "cpu", parts: Collection[str] = MODEL_PARTS):
    """(VilaModel, top-level config dict, subfolder config dicts): what `save_vila` writes back."""
    parts = check_parts(parts)
    model_dir = Path(model_dir)
    if not detect(model_dir):
        raise CheckpointError(f"{model_dir} is not a VILA folder (needs {', '.join(VILA_SUBFOLDERS)} subfolders)")
    config, top, raw = read_vila_config(model_dir)
    quant = read_quant_config(model_dir / "llm", raw["llm"])
    linear = awq_linear_factory(quant) if quant is not None else dense_linear
    dtype = parse_dtype(dtype, default_dtype(raw["llm"], device))

    model = VilaModel.build_parts(config, parts, dtype, linear)
    kept = config.vision.layers_needed
    dropped = re.compile(r"^vision\.tower\.(?:vision_model\.)?(?:encoder\.layers\.(\d+)\.|head\.)")

    def skip(name: str) -> bool:
        m = dropped.match(name)
        return m is not None and (m.group(1) is None or int(m.group(1)) >= kept)

    def tensors():
        for part in sorted(parts):
            for sub in _VILA_PARTS[part]:
                it = iter_weights(weight_files(model_dir / sub))
                if sub == "llm" and quant is not None and quant.version == "v2":
                    it = iter(convert_v2_state(dict(it), quant.group_size).items())
                for key, t in it:
                    yield f"{sub}/{key}", t

    load_weights(model, tensors(), VILA_MAPPING, dtype, skip, prepare=torch.device(device).type == "cpu")
    model.tie_head()
    return model.to(device).eval(), top, raw


def save_pretrained(model: "VilaModel", processor: "VilaProcessor", out_dir: str | Path) -> Path:
    """Write a model `load` returned back in its folder layout, with its processor's tokenizer and
    image settings."""
    top, raw = model.folder_configs
    return save_vila(model, processor.tokenizer, processor.image_processor.cfg, out_dir, top, raw)


def save_vila(model, tokenizer, image_processor_config, out_dir: str | Path, top: dict, raw: dict) -> Path:
    """Write a `VilaModel` back in the folder layout it loads from (16-bit or AWQ tensors as held).

    The vision tower holds only the layers the selected feature needs; its config keeps the
    original depth, so the folder loads back here with identical outputs.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    for sub in VILA_SUBFOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tied = model.config.text.tie_word_embeddings
    groups: dict[str, dict[str, torch.Tensor]] = {sub: {} for sub in VILA_SUBFOLDERS}
    for name, t in state.items():
        if name.startswith("decoder."):
            rest = name[len("decoder."):]
            if rest.startswith("lm_head."):
                if tied:
                    continue
                groups["llm"][rest] = t
            else:
                groups["llm"]["model." + rest] = t
        elif name.startswith("vision.tower."):
            groups["vision_tower"][name[len("vision.tower."):]] = t
        elif name.startswith("projector."):
            rest = name[len("projector."):]
            if model.config.projector.type == "linear":
                rest = rest.removeprefix("0.")
            groups["mm_projector"]["layers." + rest] = t
    for sub, tensors in groups.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / sub / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / sub / "config.json").write_text(json.dumps(raw[sub], indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(top, indent=2) + "\n")
    tokenizer.save_pretrained(str(out / "llm"))
    c = image_processor_config
    (out / "vision_tower" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": c.crop_size, "width": c.crop_size} if c.square_resize else {"shortest_edge": c.shortest_edge},
        **({} if c.square_resize else {"crop_size": {"height": c.crop_size, "width": c.crop_size},
                                        "do_center_crop": True}),
        "image_mean": list(c.mean), "image_std": list(c.std)}, indent=2) + "\n")
    return out


# ---- model -----------------------------------------------------------------------------------

class VilaModel(ComposedVLM):
    config: VilaConfig

    @torch.inference_mode()
    def embed_media(self, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        """One tower forward over every tile of every item; per-item projection."""
        if not items:
            return []
        self._check_vision()
        tiles = torch.cat([it.pixels for it in items]).to(self.device)
        feats = self.vision(tiles).to(self.dtype)                      # [T, g*g, C]
        out, start = [], 0
        for it in items:
            f = feats[start:start + it.pixels.shape[0]]
            start += it.pixels.shape[0]
            if it.pool:   # a pooled video group: frames one by one, then the pool over them
                frames = torch.stack([self._project(f[i:i + 1], None) for i in range(f.shape[0])])
                out.append(pool_frames(frames, it.pool))
            else:
                out.append(self._project(f, it.block_size))
        return out

    def _project(self, f: torch.Tensor, block_size) -> torch.Tensor:
        """Tile features [n, g*g, C] of one image -> [tokens, H]."""
        cfg = self.config
        if cfg.s2_scales:
            merged, grid = merge_scales(f, cfg.s2_scales, block_size, cfg.s2_output_scale_idx)
            return project_blocks(merged, grid if cfg.s2_dynamic else (1, 1), self.projector)
        return self.projector(f).flatten(0, 1)


def pool_frames(frames: torch.Tensor, pool: tuple[int, int, int]) -> torch.Tensor:
    """[t, n, H] frame tokens (n a square grid) -> mean over (frames, rows, cols) blocks, [t'*n', H]
    (NVILA's TSP video pooling; t and the grid side must divide by the pool)."""
    t, n, h = frames.shape
    side = int(round(n ** 0.5))
    pt, pr, pc = pool
    if t % pt or side % pr or side % pc:
        raise ValueError(f"{t} frames of {side}x{side} tokens do not pool by {pool}")
    x = frames.view(t // pt, pt, side // pr, pr, side // pc, pc, h).mean(dim=(1, 3, 5))
    return x.reshape(-1, h)


# ---- media token count and tiles -----------------------------------------------------------------

def media_tokens(config: VilaConfig, item: MediaItem) -> int:
    """Length of an item's embedding (what `VilaModel.embed_media` returns for it); the only place
    it is computed."""
    cfg = config
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

def max_item_tiles(config: VilaConfig) -> int:
    """The most tiles one media item can have: S2 tiles of every scale (the last scale's grid of a
    dynamic S2 image at least its square, at most `max_tiles`), or a pooled video group's frames."""
    scales = config.s2_scales
    most = 1
    if scales and config.image_mode != "dynamic":
        square = (scales[-1] // scales[0],) * 2
        grids = tiles_per_scale(scales, square)
        most = sum(r * c for r, c in grids)
        if config.s2_dynamic:   # the last scale: up to max_tiles, or one tile when max_tiles < its square
            last = square[0] * square[1]
            most += (config.max_tiles if config.max_tiles >= last else 1) - last
    for pool in config.video_pool_sizes:
        most = max(most, pool[0])
    return most


# ---- processor ---------------------------------------------------------------------------------

def default_template(config: VilaConfig) -> str:
    """The chat template a VILA family uses when its tokenizer carries none."""
    if config.text.model_type == "qwen2":
        return CHATML_TEMPLATE
    if config.text.vocab_size >= 128000:
        return LLAMA3_TEMPLATE
    return VICUNA_TEMPLATE


def sample_frames(frames: Sequence[Any], limit: int) -> list[Any]:
    """Exactly `limit` frames, as VILA samples a video: indices numpy.round(numpy.linspace(0, n - 1,
    limit)) — first and last kept, evenly spaced, and a video shorter than `limit` repeats frames
    (5 frames, limit 8 -> 0 1 1 2 2 3 3 4). The indices are numpy's float results rounded half to
    even, so a position that lands on .5 goes where numpy's arithmetic puts it."""
    if not frames:
        return []
    return [frames[i] for i in np.round(np.linspace(0, len(frames) - 1, limit)).astype(int).tolist()]


class VilaProcessor(BaseProcessor):
    def __init__(self, config: VilaConfig, tokenizer, image_processor: ImageProcessor):
        super().__init__(tokenizer, config.text.eos_token_ids)
        self.config, self.image_processor = config, image_processor
        if config.s2_scales and not config.s2_dynamic:   # static S2 preprocesses at the largest scale
            top = config.s2_scales[-1]
            self.s2_processor = ImageProcessor(dataclasses.replace(image_processor.cfg, shortest_edge=top,
                                                                   crop_size=top))
        self.image_token_id = self.token_id(config.image_token, required=True)
        self.video_token_id = self.token_id(config.video_token)
        self.media_token_ids = frozenset(t for t in (self.image_token_id, self.video_token_id) if t is not None)
        self.end_ids = {"image": self.text_ids(config.image_end_tokens), "video": self.text_ids(config.video_end_tokens)}
        self.sep_ids = self.text_ids(config.video_sep_tokens)
        self.template = getattr(tokenizer, "chat_template", None) or default_template(config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: VilaConfig | None = None) -> "VilaProcessor":
        folder = Path(folder)
        config = config or read_config(folder)
        size, pad = config.vision.image_size, config.image_mode == "pad"
        images = cls.image_processor_from(folder / "vision_tower" / "preprocessor_config.json", pad,
                                          ImageProcessorConfig(size, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad,
                                                               square_resize=True))
        return cls(config, load_tokenizer(folder / "llm"), images)

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
        cfg, size = self.config, self.config.vision.image_size
        pics = [load_image(im) for im in images]
        if cfg.s2_scales and not cfg.s2_dynamic:
            return [self._static_s2_item(p) for p in pics]
        if len(pics) == 1 and cfg.image_mode == "dynamic_s2" and cfg.s2_scales:
            tiles, block = dynamic_s2_tiles(pics[0], cfg.s2_scales, size, cfg.max_tiles)
            return [MediaItem(self._tile_pixels(tiles), block)]
        if len(pics) == 1 and cfg.image_mode == "dynamic":
            return [MediaItem(self._tile_pixels([t]))
                    for t in dynamic_tiles(pics[0], size, cfg.max_tiles, cfg.min_tiles)]
        return [MediaItem(self._tile_pixels([self._single(p)])) for p in pics]

    def _single(self, img, size: int | None = None):
        """A picture that is not tiled (one of several, a video frame, or any picture in resize / pad
        mode) as VILA hands it to the image processor: padded to a square in "pad" mode, squashed to
        the tile (or `size`) in "resize" mode, and untouched otherwise, where the processor's own
        preprocessing decides (CLIP: shortest edge, then centre crop; SigLIP: resize)."""
        mode = self.config.image_mode
        if mode == "pad":
            return expand_to_square(img, tuple(int(x * 255) for x in self.image_processor.cfg.mean))
        if mode == "resize":
            size = size or self.config.vision.image_size
            return resize(img, (size, size))
        return img

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
        for pool in self.config.video_pool_sizes:   # num_video_frames divides into every pool (config check)
            groups.append([MediaItem(pixels[i:i + pool[0]], None, "video", tuple(pool))
                           for i in range(0, len(picked), pool[0])])
        return groups

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
        ids = self.tokenize(text)
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
                    n = media_tokens(self.config, item)
                    spans.append(ImageSpan(len(out_ids), n))
                    out_ids += [tid] * n + self.end_ids[kind]
                    items.append(item)
                out_ids += sep
        return MultimodalPrompt(tuple(out_ids), tuple(spans)), items
