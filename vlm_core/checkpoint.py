"""Checkpoint loading. Weight names are translated by tables, not code paths.

llava-hf (`LlavaForConditionalGeneration`) checkpoints exist in two key layouts:
  old (transformers < 4.52, and what the Hub mostly holds):
      language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
      multi_modal_projector.*
  current: model.language_model.*, lm_head.*, model.vision_tower.*, model.multi_modal_projector.*
and the vision tower may or may not carry the `vision_model.` infix. Both load through
`LLAVA_HF_MAPPING`. Weights may be one `model.safetensors` or shards listed in
`model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Collection, Iterator

import torch
from torch import nn

from .config import VILA_SUBFOLDERS, AWQConfig, VLMConfig, is_vila_folder, read_json, read_vila_config
from .errors import CheckpointError
from .models.layers import dense_linear, LinearFactory
from .models.qwen2 import build_decoder
from .models.llava import LlavaModel
from .models.projector import build_projector
from .models.vision import VisionTower
from .quant.awq_linear import awq_linear_factory
from .quant.pack import v2_to_awq

Rename = str | Callable[[re.Match], str]

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
# Buffers some exporters write that we recompute.
IGNORED_KEYS = (r"rotary_emb\.inv_freq$", r"\.position_ids$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of float32, float16, bfloat16")
    return DTYPES[dtype]


def default_dtype(raw_config: dict, device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls are slow there); else the checkpoint's dtype, or fp16."""
    if torch.device(device).type == "cpu":
        return torch.float32
    saved = raw_config.get("dtype") or raw_config.get("torch_dtype")
    return DTYPES.get(saved, torch.float16) if isinstance(saved, str) else torch.float16


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors (single or sharded), else one `.pt`
    state dict (the llm-awq / TinyChat export)."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name} listed in {index.name} is missing from {model_dir}")
        return files
    if single.is_file():
        return [single]
    pts = sorted(model_dir.glob("*.pt"))
    if len(pts) == 1:
        return pts
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_weights(files: list[Path], wanted: Callable[[str], bool] = lambda key: True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from the weight files; tensors whose name `wanted` rejects are not read."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        if f.suffix == ".pt":
            try:
                state = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several unrelated types for a bad file
                raise CheckpointError(f"cannot read weights file {f}: {e}") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"weights file {f} does not hold a state dict")
            yield from ((k, v) for k, v in state.items() if wanted(k))
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if wanted(key):
                        yield key, st.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read weights file {f}: {e}") from None


def rename(key: str, mapping: tuple[tuple[str, Rename], ...]) -> str | None:
    for pattern, repl in mapping:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return None


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]],
                 mapping: tuple[tuple[str, Rename], ...], dtype: torch.dtype,
                 skip: Callable[[str], bool] = lambda name: False) -> None:
    """Assign checkpoint tensors to `model` by the mapping table; strict about what is left over.

    Floating tensors are cast to `dtype`; integer tensors (packed quantized weights) are kept.
    `skip(name)` marks our-side names that are deliberately not built (e.g. vision layers
    past the selected feature layer).
    """
    from tqdm import tqdm

    expected = model.state_dict(keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    # a progress bar for loads that take a while (hundreds of tensors), on a terminal only
    progress = tqdm(tensors, desc="loading weights", unit=" tensors", total=len(expected), leave=False,
                    disable=None if len(expected) > 200 else True)
    for key, tensor in progress:
        if any(re.search(p, key) for p in IGNORED_KEYS):
            continue
        name = rename(key, mapping)
        if name is not None and name not in expected:
            name = _adapt_tower_prefix(name, expected)
        if name is None or name not in expected:
            if name is None or not skip(name):
                unexpected.append(key)
            continue
        target = expected[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"weight {key!r} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(target.shape)} for {name!r}")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        loaded[name] = tensor
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} weights this model does not use, e.g. "
                              f"{unexpected[:5]}")
    missing = [n for n in expected if n not in loaded and not _is_tied(model, n)]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
    model.load_state_dict(loaded, strict=False, assign=True)
    for module in model.modules():
        if hasattr(module, "post_load"):
            module.post_load()


def _adapt_tower_prefix(name: str, expected: dict) -> str:
    """transformers < 5 nests CLIP under `vision_model.`; ours is canonical without it."""
    if name.startswith("vision.tower."):
        alt = "vision.tower.vision_model." + name[len("vision.tower."):]
        if alt in expected:
            return alt
    return name


def _is_tied(model: nn.Module, name: str) -> bool:
    decoder = getattr(model, "decoder", None)
    return name == "decoder.lm_head.weight" and decoder is not None and decoder.config.tie_word_embeddings


# llm-awq / TinyChat name their exports `<model>-w4-g128-awq-v2.pt`; that name is the only record
# of the bit width and group size when the folder's config.json has no `quantization_config`.
_V2_EXPORT_NAME = re.compile(r"-w(\d+)-g(\d+)-awq(-v2)?\.pt$")


def read_quant_config(model_dir: Path, raw_config: dict) -> AWQConfig | None:
    """`quantization_config` in config.json, else AutoAWQ's `quant_config.json`, else what the name
    of a lone llm-awq export (`*-w4-g128-awq-v2.pt`, no safetensors beside it) says, else None."""
    d = raw_config.get("quantization_config")
    if d is None and (model_dir / "quant_config.json").is_file():
        d = read_json(model_dir / "quant_config.json")
    if d is None and not any(model_dir.glob("*.safetensors")):
        pts = sorted(model_dir.glob("*.pt"))
        m = _V2_EXPORT_NAME.search(pts[0].name) if len(pts) == 1 else None
        if m is not None:
            if m.group(3) is None:
                raise CheckpointError(f"{pts[0].name} is named as an llm-awq export but not a v2 one (those end "
                                      f"in -v2.pt, the only llm-awq layout read here); re-export it with "
                                      f"llm-awq's v2 packing or as AutoAWQ safetensors")
            d = {"quant_method": "awq", "bits": int(m.group(1)), "group_size": int(m.group(2)), "version": "v2"}
    return AWQConfig.from_dict(d) if d is not None else None


def convert_v2_state(state: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Rewrite llm-awq v2 linears (int16 qweight, scales, scaled_zeros) as AutoAWQ gemm tensors."""
    out = {}
    for key, t in state.items():
        if key.endswith(".scaled_zeros"):
            continue
        if key.endswith(".qweight") and t.dtype == torch.int16:
            prefix = key[: -len("qweight")]
            try:
                scales, szeros = state[prefix + "scales"], state[prefix + "scaled_zeros"]
            except KeyError as e:
                raise CheckpointError(f"v2 linear {prefix[:-1]!r} lacks {e.args[0]!r}") from None
            out[key], out[prefix + "qzeros"], out[prefix + "scales"] = v2_to_awq(t, scales, szeros, group_size)
        elif key.endswith(".scales") and (key[: -len("scales")] + "scaled_zeros") in state:
            continue  # written with its qweight above
        else:
            out[key] = t
    return out


MODEL_PARTS = ("vision", "llm")
_PART_PREFIXES = {"vision": ("vision.", "projector."), "llm": ("decoder.",)}


def _check_parts(parts: Collection[str]) -> set[str]:
    parts = set(parts)
    if not parts or parts - set(MODEL_PARTS):
        raise ValueError(f"parts must be a non-empty subset of {MODEL_PARTS}, got {sorted(parts)}")
    return parts


def _build_parts(cls, config, parts: set[str], dtype: torch.dtype, linear: LinearFactory):
    """The composed model with only `parts` built: the tower in `dtype` (transformers module,
    loaded in place), projector and decoder on the meta device (their tensors are assigned)."""
    vision = projector = decoder = None
    if "vision" in parts:
        vision = VisionTower(config.vision).to(dtype)
        with torch.device("meta"):
            projector = build_projector(config.projector)
    if "llm" in parts:
        with torch.device("meta"):
            decoder = build_decoder(config.text, linear)
    return cls(config, vision, projector, decoder)


def _tie_head(model) -> None:
    decoder = model.decoder
    if decoder is not None and decoder.config.tie_word_embeddings:
        decoder.lm_head.weight = decoder.embed_tokens.weight


def load_llava_hf(model_dir: str | Path, dtype: str | torch.dtype | None = None,
                  device: str | torch.device = "cpu", linear: LinearFactory = dense_linear,
                  parts: Collection[str] = MODEL_PARTS) -> LlavaModel:
    """Load a llava-hf `LlavaForConditionalGeneration` checkpoint into our `LlavaModel`.

    `parts` chooses what is built and loaded: "vision" (tower + projector) and/or "llm" (the
    decoder). A vision replica loads only the first, an LLM replica only the second; the
    other part's tensors are never read.
    """
    parts = _check_parts(parts)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    raw = read_json(model_dir / "config.json")
    config = VLMConfig.from_llava_hf(raw)
    quant = read_quant_config(model_dir, raw)
    if quant is not None:
        linear = awq_linear_factory(quant)
    files = weight_files(model_dir)
    dtype = parse_dtype(dtype, default_dtype(raw, device))

    model = _build_parts(LlavaModel, config, parts, dtype, linear)
    kept = config.vision.layers_needed
    dropped = re.compile(r"^vision\.tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.")
    not_built = tuple(p for part in MODEL_PARTS if part not in parts for p in _PART_PREFIXES[part])

    def skip(name: str) -> bool:
        if name.startswith(not_built):
            return True
        m = dropped.match(name)
        return m is not None and int(m.group(1)) >= kept

    def wanted(key: str) -> bool:
        name = rename(key, LLAVA_HF_MAPPING)
        return name is None or not skip(name)

    tensors = iter_weights(files, wanted)
    if quant is not None and quant.version == "v2":
        tensors = iter(convert_v2_state(dict(tensors), quant.group_size).items())
    load_weights(model, tensors, LLAVA_HF_MAPPING, dtype, skip)
    _tie_head(model)
    return model.to(device).eval()


# ---- VILA-1.5 / NVILA folder layout ------------------------------------------------------------
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


def load_vila(model_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
              parts: Collection[str] = MODEL_PARTS):
    """Load a VILA-1.5 / NVILA folder into our `VilaModel` (`parts` as for `load_llava_hf`)."""
    from .models.vila import VilaModel

    parts = _check_parts(parts)
    model_dir = Path(model_dir)
    if not is_vila_folder(model_dir):
        raise CheckpointError(f"{model_dir} is not a VILA folder (needs {', '.join(VILA_SUBFOLDERS)} subfolders)")
    config, top, raw = read_vila_config(model_dir)
    quant = read_quant_config(model_dir / "llm", raw["llm"])
    linear = awq_linear_factory(quant) if quant is not None else dense_linear
    dtype = parse_dtype(dtype, default_dtype(raw["llm"], device))

    model = _build_parts(VilaModel, config, parts, dtype, linear)
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

    load_weights(model, tensors(), VILA_MAPPING, dtype, skip)
    _tie_head(model)
    return model.to(device).eval(), top, raw


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


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               parts: Collection[str] = MODEL_PARTS):
    """A llava-hf checkpoint or a VILA-family folder, whichever `model_dir` holds."""
    if is_vila_folder(model_dir):
        return load_vila(model_dir, dtype=dtype, device=device, parts=parts)[0]
    return load_llava_hf(model_dir, dtype=dtype, device=device, parts=parts)


# ---- writing AWQ checkpoints ---------------------------------------------------------------------

def save_awq_checkpoint(src_dir: str | Path, out_dir: str | Path, model, packed: dict[str, dict[str, torch.Tensor]],
                        group_size: int, scale_dtype: torch.dtype = torch.float16) -> Path:
    """Write an AutoAWQ gemm checkpoint in the key layout of `src_dir`.

    Every tensor of the source checkpoint is written under its own name, with our (AWQ-scaled)
    values; each quantized linear's `weight` becomes `qweight`/`qzeros`/`scales`. Non-weight files
    (tokenizer, preprocessor config) are copied; config.json gains `quantization_config`.
    """
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, src_tensor in iter_weights(weight_files(src)):
        if any(re.search(p, key) for p in IGNORED_KEYS):
            continue
        name = rename(key, LLAVA_HF_MAPPING)
        if name is None:
            raise CheckpointError(f"cannot map checkpoint weight {key!r}")
        module = name[len("decoder."):-len(".weight")] if name.startswith("decoder.") else None
        if module in packed and name.endswith(".weight"):
            base = key[:-len("weight")]
            for suffix, t in packed[module].items():
                tensors[base + suffix] = t.to(scale_dtype) if t.is_floating_point() else t
            continue
        if name not in ours:
            name = name.replace("vision.tower.", "vision.tower.vision_model.", 1)
        # vision layers past the selected feature layer are not built: keep the source tensor
        tensors[key] = (ours[name].to(src_tensor.dtype) if name in ours else src_tensor).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".pt") and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    cfg = read_json(src / "config.json")
    cfg["quantization_config"] = AWQConfig(
        group_size=group_size, modules_to_not_convert=("vision_tower", "multi_modal_projector", "lm_head")).to_hf()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
