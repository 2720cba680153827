"""The original LLaVA layout (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`): LLaVA-1.5 as liuhaotian
publishes it, VILA-1.0, their AutoAWQ copies and TinyChat's 4-bit form of them.

Folder: one `config.json` — a LLaMA config plus LLaVA's `mm_*` fields (`model_type` `llava` in
the October-2023 releases, `llava_llama` later; `architectures: ["LlavaLlamaForCausalLM"]`) —
the tokenizer, and weights as safetensors or `pytorch_model*.bin` shards:

    model.embed_tokens.*, model.layers.N.*, model.norm.*, lm_head.*     the decoder
    model.mm_projector.{0,2}.*  (mlp2x_gelu)  /  model.mm_projector.*  (linear)
    model.vision_tower.vision_tower.vision_model.*   only in folders trained with the tower unfrozen

The vision tower is not inside: `mm_vision_tower` names it (`openai/clip-vit-large-patch14-336`).
It is found, in this order, never downloaded (`find_tower`):
  1. `vision_tower_dir` (a `LoadOptions` field: the Serve setting, `VLM.from_pretrained`'s keyword,
     the CLI's `--vision-tower-dir`): the tower's folder itself, or a folder holding it under the
     id's last path component;
  2. `mm_vision_tower` as a local folder, absolute or relative to the checkpoint;
  3. a folder named like the id's last path component inside the checkpoint.
A tower folder is a transformers `CLIPVisionModel` folder or a whole `CLIPModel` as openai
publishes it (`pytorch_model.bin` with the text tower too; only `vision_model.*` is read), with
its `preprocessor_config.json` (old integer sizes read too). Tower weights inside the checkpoint
win over the folder's; the folder then gives the config and preprocessing, or, without any folder,
the published config of openai's CLIP ViT-L/14 towers (`KNOWN_TOWERS`).

Features as LLaVA computes them: hidden state `mm_vision_select_layer` of the tower, CLS dropped
(`mm_vision_select_feature: patch`) or kept (`cls_patch`), then the projector (`linear`,
`mlpNx_gelu`, `identity`). Images: `image_aspect_ratio: pad` pads to a square filled with the
processor's mean colour (LLaVA's `expand2square`) before CLIP's resize and centre crop; `square`
(or none) goes straight to CLIP's preprocessing; `anyres` (LLaVA-1.6) is refused.

Prompts as LLaVA's `tokenizer_image_token` builds them (`LlavaOrigProcessor.tokenize_prompt`):
the text is split at each `<image>`, each piece tokenized on its own with the tokenizer's defaults
(so a SentencePiece tokenizer starts the piece after an image with its own `▁`), BOS kept only on
the first piece, and each `<image>` becomes a run of `tokens_per_image` placeholder ids. With
`mm_use_im_start_end` the text holds `<im_start><image><im_end>`; with `mm_use_im_patch_token`
the tokenizer gains `<im_patch>` (as LLaVA's loader adds it), and a prompt may instead carry
VILA-1.0 / TinyChat's already-expanded runs of `<im_patch>` tokens. Chat prompts use the
tokenizer's chat template if it has one, else LLaVA's `llava_v1` conversation; `conv_mode` picks
another of LLaVA's templates (`conversations.py`).

4-bit forms: AutoAWQ (`quantization_config` in config.json or `quant_config.json`, the same key
names with `.qweight/.qzeros/.scales`), and TinyChat's llm-awq v2 export (`<name>-w4-g128-awq-v2.pt`
or `<name>-w4-g128-v2.pt`) inside the fp16 folder or beside it named after it: the export's
tensors are read and the fp16 files only for what the export lacks, so the fp16 decoder's linears
are never read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

from ..checkpoint import (EXPORT_NAME_RULE, MODEL_PARTS, Rename, check_parts, convert_v2_state, default_dtype,
                          iter_weights, load_weights, parse_dtype, read_quant_config, rename, save_awq_copy,
                          torch_state, unbuilt, weight_files, weight_keys)
from ..config import AWQConfig, ProjectorConfig, TextConfig, VisionConfig, read_json
from ..errors import CheckpointError, ConfigError, PlaceholderMismatchError
from ..inputs.image import CLIP_MEAN, CLIP_STD, ImageInput, ImageProcessor, ImageProcessorConfig
from ..inputs.media import MediaItem
from ..inputs.placeholders import ImageSpan, MultimodalPrompt, PlaceholderSpec, expand_placeholders
from ..inputs.processor import BaseProcessor, Prompt
from ..inputs.template import IMAGE_PLACEHOLDER, load_tokenizer, normalize_messages, user_turn
from ..models.layers import dense_linear
from ..quant.awq_linear import awq_linear_factory
from .conversations import DEFAULT_CONV_MODE, Conversation, conversation, stop_text
from .llava import LlavaModel, LlavaProcessor
from .options import NO_OPTIONS, LoadOptions

IMAGE_TOKEN = "<image>"
PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
ARCHITECTURES = ("LlavaLlamaForCausalLM",)
MODEL_TYPES = ("llava", "llava_llama")
TOWER_PREFIX = "model.vision_tower.vision_tower."

# The published configs of openai's CLIP ViT-L/14 vision towers, for checkpoints that carry their
# tower's weights inside but no tower folder beside them.
_VIT_L14 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, num_channels=3)
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "clip-vit-large-patch14-336": {**_VIT_L14, "image_size": 336},
    "clip-vit-large-patch14": {**_VIT_L14, "image_size": 224},
}


def _raw(model_dir: Path) -> dict | None:
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except CheckpointError:
        return None


def detect(model_dir: str | Path) -> bool:
    """An original-layout folder: a flat config.json naming its vision tower (`mm_vision_tower`)."""
    raw = _raw(Path(model_dir))
    return raw is not None and "text_config" not in raw and ("mm_vision_tower" in raw or "mm_hidden_size" in raw)


# ---- the vision tower ------------------------------------------------------------------------

@dataclass(frozen=True)
class TowerSource:
    name: str                         # mm_vision_tower as the config gives it
    folder: Path | None               # the tower's folder, when one was found
    inside: bool                      # the checkpoint carries the tower's weights itself


def _is_tower_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def find_tower(model_dir: Path, raw: dict, options: LoadOptions, keys: Collection[str]) -> TowerSource:
    """Where the tower `mm_vision_tower` names is (the module docstring gives the order)."""
    name = raw.get("mm_vision_tower", raw.get("vision_tower"))
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("config.json has no 'mm_vision_tower' naming the vision tower")
    last = name.rstrip("/").split("/")[-1]
    inside = any(k.startswith(TOWER_PREFIX) for k in keys)
    folder = None
    if options.vision_tower_dir is not None:
        d = Path(options.vision_tower_dir).expanduser()
        folder = next((p for p in (d / last, d) if _is_tower_folder(p)), None)
        if folder is None:
            raise CheckpointError(f"vision_tower_dir {str(d)!r} holds no vision tower: neither it nor {str(d / last)!r} "
                                  f"is a folder with a config.json")
    if folder is None:
        as_path = Path(name).expanduser()
        for p in (as_path if as_path.is_absolute() else model_dir / as_path, model_dir / last):
            if _is_tower_folder(p):
                folder = p
                break
    if folder is None and not (inside and last in KNOWN_TOWERS):
        what = ("its weights are inside the checkpoint, but not its config" if inside else "it is not in this folder")
        raise CheckpointError(
            f"the vision tower {name!r} (config.json's mm_vision_tower) is not available here: {what}. Towers are "
            f"never downloaded: put a copy of it (a CLIPVisionModel or CLIPModel folder, e.g. what "
            f"`huggingface-cli download {name}` fetches) at {model_dir / last}, or name the folder that holds it with "
            f"vision_tower_dir (the serve settings' `vision_tower_dir`, VLM.from_pretrained(..., vision_tower_dir=...), "
            f"--vision-tower-dir)")
    return TowerSource(name, folder, inside)


def tower_config(tower: TowerSource) -> dict[str, Any]:
    """The tower's CLIPVisionConfig as a dict (a CLIPModel folder's `vision_config`)."""
    if tower.folder is None:
        return dict(KNOWN_TOWERS[tower.name.rstrip("/").split("/")[-1]])
    from transformers import CLIPVisionConfig

    raw = read_json(tower.folder / "config.json")
    if raw.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise ConfigError(f"the vision tower in {tower.folder} is a {raw.get('model_type')!r} model; this layout "
                          f"loads CLIP towers")
    try:
        d = CLIPVisionConfig.from_pretrained(str(tower.folder)).to_dict()
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the vision tower's config in {tower.folder}: {e}") from None
    return {**d, "model_type": "clip_vision_model"}


# ---- config ----------------------------------------------------------------------------------

_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
IMAGE_ASPECT_RATIOS = (None, "square", "pad")


@dataclass(frozen=True)
class LlavaOrigConfig:
    text: TextConfig
    vision: VisionConfig
    projector: ProjectorConfig
    tower: TowerSource
    use_im_start_end: bool = False
    use_im_patch_token: bool = True       # LLaVA's loader default
    pad_to_square: bool = False
    quant: AWQConfig | None = None
    v2_export: Path | None = None         # TinyChat's v2 .pt, when that is the 4-bit form
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_image


def select_layers(value: Any) -> tuple[int, ...]:
    """`mm_vision_select_layer` as hidden-state indices (TinyChat's two-layer form refused)."""
    try:
        layer = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mm_vision_select_layer {value!r} is not an integer") from None
    if abs(layer) > 100:
        raise ConfigError(f"mm_vision_select_layer {layer} is TinyChat's two-layer form (layers {abs(layer) % 100} and "
                          f"{-(abs(layer) // 100)} concatenated), which no published checkpoint uses; it is not "
                          f"supported")
    return (layer,)


def _text_config(raw: dict) -> TextConfig:
    arch = raw.get("architectures") or []
    model_type = raw.get("model_type", "llava_llama")
    if model_type not in MODEL_TYPES or (arch and not set(arch) & set(ARCHITECTURES)):
        raise ConfigError(f"a {model_type!r} / {arch} checkpoint in the original LLaVA layout is not supported; "
                          f"this loader takes LLaMA-based LLaVA ({', '.join(ARCHITECTURES)}, model_type "
                          f"{' or '.join(MODEL_TYPES)})")
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("quantization_config",)}
    return TextConfig.from_hf({**text, "model_type": "llama"})


def find_v2_export(model_dir: Path) -> Path | None:
    """TinyChat's v2 export of this folder: a `*-w<bits>-g<group>[-awq]-v2.pt` inside it, or one beside
    it named after it."""
    inside = sorted(p for p in model_dir.glob("*.pt") if re.search(r"-w\d+-g\d+(?:-awq)?-v2\.pt$", p.name))
    beside = sorted(p for p in model_dir.parent.glob(f"{model_dir.name}-w*-g*-v2.pt")
                    if re.fullmatch(re.escape(model_dir.name) + r"-w\d+-g\d+(?:-awq)?-v2\.pt", p.name))
    found = inside + beside
    if len(found) > 1:
        raise CheckpointError(f"{len(found)} llm-awq v2 exports of {model_dir}: {[p.name for p in found]}; keep one")
    return found[0] if found else None


def _v2_quant(pt: Path) -> AWQConfig:
    m = re.search(r"-w(\d+)-g(\d+)(?:-awq)?-v2\.pt$", pt.name)
    if m is None:
        raise CheckpointError(f"{pt.name} does not say its bits and group size; name it {EXPORT_NAME_RULE}")
    return AWQConfig(bits=int(m.group(1)), group_size=int(m.group(2)), version="v2")


def _fp16_files(model_dir: Path) -> list[Path]:
    """The folder's own weight files (not a v2 export lying in it)."""
    try:
        files = weight_files(model_dir)
    except CheckpointError:
        files = []
    return [f for f in files if f.suffix != ".pt"]


def read_config(model_dir: str | Path, options: LoadOptions = NO_OPTIONS) -> LlavaOrigConfig:
    model_dir = Path(model_dir)
    raw = read_json(model_dir / "config.json")
    if raw.get("image_aspect_ratio") == "anyres" or "unpad" in str(raw.get("mm_patch_merge_type", "")):
        raise ConfigError("image_aspect_ratio 'anyres' (LLaVA-1.6's tiled images) is not supported")
    if raw.get("image_aspect_ratio") not in IMAGE_ASPECT_RATIOS:
        raise ConfigError(f"image_aspect_ratio {raw['image_aspect_ratio']!r} is not one of 'pad', 'square'")
    if raw.get("s2"):
        raise ConfigError("S2 vision towers in the original LLaVA layout are not supported")
    text = _text_config(raw)
    v2 = find_v2_export(model_dir) if raw.get("quantization_config") is None else None
    quant = _v2_quant(v2) if v2 is not None else read_quant_config(model_dir, raw)
    files = _fp16_files(model_dir) + ([v2] if v2 is not None else [])
    if not files:
        raise CheckpointError(f"no model.safetensors, pytorch_model.bin (or their .index.json) in {model_dir}")
    tower = find_tower(model_dir, raw, options, _index_keys(files))
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise ConfigError(f"mm_vision_select_feature {feature!r} is not one of {tuple(_SELECT_FEATURE)}")
    layers = select_layers(raw.get("mm_vision_select_layer", -1))
    vision = VisionConfig.from_hf(tower_config(tower), layers, _SELECT_FEATURE[feature])
    width = vision.hidden_size * len(layers)
    if int(raw.get("mm_hidden_size", width)) != width:
        raise ConfigError(f"mm_hidden_size {raw['mm_hidden_size']} differs from the vision tower's feature width "
                          f"{width} ({tower.name})")
    projector = ProjectorConfig(type=raw.get("mm_projector_type", "linear"), in_features=width,
                                out_features=text.hidden_size)
    return LlavaOrigConfig(text=text, vision=vision, projector=projector, tower=tower,
                           use_im_start_end=bool(raw.get("mm_use_im_start_end", False)),
                           use_im_patch_token=bool(raw.get("mm_use_im_patch_token", True)),
                           pad_to_square=raw.get("image_aspect_ratio") == "pad", quant=quant, v2_export=v2, raw=raw)


def _index_keys(files: list[Path]) -> list[str]:
    """Tensor names of the weight files; from a shard index when there is one (no shard opened)."""
    parent = files[0].parent
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (parent / index).is_file() and all(f.parent == parent and f.suffix != ".pt" for f in files):
            return list(read_json(parent / index).get("weight_map") or {})
    return weight_keys(files)


# ---- weights ---------------------------------------------------------------------------------

# Checkpoint names -> ours; tensors of a tower folder are read as "tower/<name>".
MAPPING: tuple[tuple[str, Rename], ...] = (
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?", "vision.tower."),
    (r"^tower/(?:vision_model\.)?", "vision.tower."),
    (r"^model\.mm_projector\.(weight|bias)$", r"projector.0.\1"),      # `linear`: the Linear itself
    (r"^model\.mm_projector\.", "projector."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^model\.", "decoder."),
)
_TOWER_ONLY = re.compile(r"^(?:text_model\.|visual_projection\.|text_projection\.|logit_scale$)")


class LlavaOrigModel(LlavaModel):
    """Tower + projector + decoder, as LLaVA composes them (one tile per image)."""


def load(model_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         parts: Collection[str] = MODEL_PARTS, options: LoadOptions = NO_OPTIONS) -> LlavaOrigModel:
    """Load an original-layout folder (`parts` as for the other families: a vision replica reads no
    decoder tensor, an LLM replica no tower)."""
    parts = check_parts(parts)
    model_dir = Path(model_dir)
    config = read_config(model_dir, options)
    quant = config.quant
    linear = awq_linear_factory(quant) if quant is not None else dense_linear
    dtype = parse_dtype(dtype, default_dtype(config.raw, device))
    model = LlavaOrigModel.build_parts(config, parts, dtype, linear)
    skip = unbuilt(parts, config.vision.layers_needed)
    tower_inside = config.tower.inside

    def wanted(key: str) -> bool:
        if key.startswith(TOWER_PREFIX) and not tower_inside:
            return False
        name = rename(key, MAPPING)
        return name is None or not skip(name)

    def tensors():
        covered: set[str] = set()
        if config.v2_export is not None:
            state = convert_v2_state(torch_state(config.v2_export), quant.group_size)
            covered = set(state)
            yield from ((k, v) for k, v in state.items() if wanted(k))
            del state
        for f in _fp16_files(model_dir):    # what the export lacks (all of it without one)
            yield from iter_weights([f], lambda k: k not in covered and not _quantized_in(k, covered) and wanted(k))
        if config.tower.folder is not None and not tower_inside and "vision" in parts:
            for key, t in iter_weights(weight_files(config.tower.folder),
                                       lambda k: not _TOWER_ONLY.match(k) and wanted("tower/" + k)):
                yield "tower/" + key, t

    load_weights(model, tensors(), MAPPING, dtype, skip, prepare=torch.device(device).type == "cpu")
    model.tie_head()
    return model.to(device).eval()


def _quantized_in(key: str, covered: set[str]) -> bool:
    """An fp16 linear weight the 4-bit export holds in packed form."""
    return key.endswith(".weight") and key[:-len("weight")] + "qweight" in covered


def save_awq_checkpoint(src_dir: str | Path, out_dir: str | Path, model, packed: dict[str, dict[str, torch.Tensor]],
                        group_size: int) -> Path:
    """An AutoAWQ copy of an original-layout folder, in its own key names (the tower, when it lies
    in a subfolder, is copied with the folder; named elsewhere, it is named again at load)."""
    return save_awq_copy(src_dir, out_dir, model, packed, group_size, MAPPING,
                         ("vision_tower", "mm_projector", "lm_head"))


# ---- processor and media token count -----------------------------------------------------------

def media_tokens(config: LlavaOrigConfig, item: MediaItem | None = None) -> int:
    """Length of an image's embedding: one tile of `tokens_per_image`."""
    return config.vision.tokens_per_image


def max_item_tiles(config: LlavaOrigConfig) -> int:
    return 1


def image_processor_for(model_dir: Path, config: LlavaOrigConfig) -> ImageProcessor:
    """The tower's preprocessing (its folder's preprocessor_config.json, else the checkpoint's, else
    CLIP's at the tower's size), with LLaVA's pad-to-square when the config asks for it."""
    size = config.vision.image_size
    fallback = ImageProcessorConfig(size, size, CLIP_MEAN, CLIP_STD, config.pad_to_square)
    folders = ([config.tower.folder] if config.tower.folder is not None else []) + [model_dir]
    for d in folders:
        if (d / "preprocessor_config.json").is_file():
            return BaseProcessor.image_processor_from(d / "preprocessor_config.json", config.pad_to_square, fallback)
    return ImageProcessor(fallback)


class LlavaOrigProcessor(BaseProcessor):
    """Prompt + images -> token ids with one placeholder run per image, as LLaVA's own inference
    code builds them, and pixel values."""

    media_kinds = ("image",)

    def __init__(self, config: LlavaOrigConfig, tokenizer, image_processor: ImageProcessor,
                 conv_mode: str | None = None):
        # the tokens LLaVA's loader adds to the tokenizer (their embeddings are in the checkpoint)
        added = ([PATCH_TOKEN] if config.use_im_patch_token else []) + (
            [IM_START_TOKEN, IM_END_TOKEN] if config.use_im_start_end else [])
        missing = [t for t in added if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if len(tokenizer) > config.text.vocab_size:
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens with LLaVA's image tokens "
                                  f"{added}, more than the decoder's {config.text.vocab_size}")
        super().__init__(tokenizer, config.text.eos_token_ids)
        self.config = config
        self.image_processor = image_processor
        vocab = tokenizer.get_vocab()
        # the id image runs are written with: never looked up (its embeddings are the image's), but
        # inside the vocabulary so that anything scoring prompt tokens can index it
        image_id = vocab.get(IMAGE_TOKEN)
        fallback = next((t for t in (tokenizer.unk_token_id, tokenizer.pad_token_id) if t is not None), 0)
        self.placeholder_id = image_id if image_id is not None and image_id < config.text.vocab_size else fallback
        self.patch_token_id = self.token_id(PATCH_TOKEN) if config.use_im_patch_token else None
        self.spec = PlaceholderSpec(image_token_id=self.placeholder_id, tokens_per_image=media_tokens(config),
                                    patch_token_id=self.patch_token_id)
        self.media_token_ids = frozenset(t for t in (self.placeholder_id, self.patch_token_id) if t is not None)
        self.image_text = (IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN) if config.use_im_start_end else IMAGE_TOKEN
        template = getattr(tokenizer, "chat_template", None)
        self.conversation: Conversation | None = (conversation(conv_mode) if conv_mode is not None else
                                                  None if template else conversation(DEFAULT_CONV_MODE))
        if self.conversation is not None:
            stop = self.token_id(stop_text(self.conversation)) if stop_text(self.conversation) else None
            if stop is not None:
                self.eos_token_ids = self.eos_token_ids | {stop}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: LlavaOrigConfig | None = None,
                        options: LoadOptions = NO_OPTIONS) -> "LlavaOrigProcessor":
        model_dir = Path(model_dir)
        config = config or read_config(model_dir, options)
        if options.conv_mode is not None:
            conversation(options.conv_mode)       # an unknown name fails before the tokenizer loads
        return cls(config, load_tokenizer(model_dir), image_processor_for(model_dir, config), options.conv_mode)

    # ---- prompt text ------------------------------------------------------------------------

    def prompt_text(self, prompt: Prompt, num_images: int) -> str:
        """The chat prompt: each image part becomes `<image>` (or `<im_start><image><im_end>`) and a
        newline where the message puts it (a plain question: images first, as LLaVA's tools do)."""
        messages = user_turn(prompt, num_images) if isinstance(prompt, str) else prompt
        msgs = normalize_messages(messages)
        if self.conversation is None:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return text.replace(IMAGE_PLACEHOLDER, self.image_text) if self.image_text != IMAGE_PLACEHOLDER else text
        turns = []
        for m in msgs:
            text = "".join(p["text"] if p["type"] == "text" else self.image_text + "\n" for p in m["content"])
            turns.append((m["role"], text.strip() if m["role"] == "assistant" else text))
        return self.conversation.render(turns)

    # ---- tokens -----------------------------------------------------------------------------

    def tokenize_prompt(self, text: str) -> tuple[list[int], list[int]]:
        """LLaVA's `tokenizer_image_token`: (ids, image positions), each image one placeholder id at
        its position (expanded by `prepare`)."""
        bos = self.tokenizer.bos_token_id
        pieces = text.split(IMAGE_TOKEN)
        chunks = [list(self.tokenizer(p)["input_ids"]) for p in pieces]
        bos_text = self.tokenizer.bos_token
        if bos_text and pieces[0].startswith(bos_text):    # a template that writes BOS itself: not twice
            chunks[0] = list(self.tokenizer(pieces[0], add_special_tokens=False)["input_ids"])
        offset = 1 if chunks[0] and bos is not None and chunks[0][0] == bos else 0
        ids = chunks[0][:1] if offset else []
        positions = []
        for i, chunk in enumerate(chunks):
            if i:
                positions.append(len(ids))
                ids.append(self.placeholder_id)
            ids += chunk[offset:]
        return ids, positions

    def prepare(self, prompt: Prompt, images: Sequence[ImageInput] = (), apply_template: bool = True
                ) -> tuple[MultimodalPrompt, torch.Tensor]:
        text, pixels = self.text_and_pixels(prompt, images, apply_template)
        n = media_tokens(self.config)
        if IMAGE_TOKEN not in text and self.patch_token_id is not None:
            ids = self.tokenize(text)
            if self.patch_token_id in ids:      # VILA-1.0 / TinyChat: runs of <im_patch> already in place
                return expand_placeholders(ids, len(images), self.spec), pixels
        ids, positions = self.tokenize_prompt(text)
        if len(positions) != len(images):
            raise PlaceholderMismatchError(f"the prompt has {len(positions)} {IMAGE_TOKEN} for {len(images)} "
                                           f"image{'' if len(images) == 1 else 's'}")
        out: list[int] = []
        spans = []
        last = 0
        for p in positions:
            out += ids[last:p]
            spans.append(ImageSpan(len(out), n))
            out += [self.placeholder_id] * n
            last = p + 1
        out += ids[last:]
        return MultimodalPrompt(tuple(out), tuple(spans)), pixels

    # images only, one tile each: what a llava-hf model takes
    prepare_media = LlavaProcessor.prepare_media
    text_and_pixels = LlavaProcessor.text_and_pixels
