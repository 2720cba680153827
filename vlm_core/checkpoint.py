"""Checkpoint loading shared by the model families: weight files (one `model.safetensors` or
shards listed in `model.safetensors.index.json`), streaming tensors, renaming them by a family's
table (not code paths), AWQ quantization configs and the llm-awq v2 conversion, and building a
composed model with only the parts a replica needs. What a family's folder looks like and how
its names map lives in `vlm_core.families`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Collection, Iterator

import torch
from torch import nn

from .config import AWQConfig, read_json
from .errors import CheckpointError
from .memory import drop_file_pages, return_freed_memory
from .quant.pack import v2_to_awq

Rename = str | Callable[[re.Match], str]

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
    """The weight files of a checkpoint folder: safetensors (single or sharded), else PyTorch
    `pytorch_model.bin` (single or sharded, what the original LLaVA releases and openai's CLIP
    ship), else one `.pt` state dict (the llm-awq / TinyChat export)."""
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                     ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index, single = model_dir / index_name, model_dir / single_name
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
    raise CheckpointError(f"no model.safetensors, pytorch_model.bin (or their .index.json) in {model_dir}")


def torch_state(f: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state-dict file (`.bin` / `.pt`), memory-mapped: tensors nobody reads are never
    read from disk."""
    try:
        state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"cannot read weights file {f}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {f} does not hold a state dict of tensors")
    return state


def weight_keys(files: list[Path]) -> list[str]:
    """The tensor names of weight files, without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    keys: list[str] = []
    for f in files:
        if f.suffix in (".pt", ".bin"):
            keys += list(torch_state(f))
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                keys += list(st.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read weights file {f}: {e}") from None
    return keys


def iter_weights(files: list[Path], wanted: Callable[[str], bool] = lambda key: True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs from the weight files; tensors whose name `wanted` rejects are not read."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        if f.suffix in (".pt", ".bin"):
            state = torch_state(f)
            yield from ((k, v) for k, v in state.items() if wanted(k))
            del state
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
                 skip: Callable[[str], bool] = lambda name: False, prepare: bool = False) -> None:
    """Assign checkpoint tensors to `model` by the mapping table; strict about what is left over.

    Floating tensors are cast to `dtype`; integer tensors (packed quantized weights) are kept.
    `skip(name)` marks our-side names that are deliberately not built (e.g. vision layers
    past the selected feature layer). A module with `post_load` (the AWQ linear) gets its tensors and
    `post_load()` as soon as the last of them is read, and with `prepare=True` (a model that stays on
    the CPU) also `prepare()`: its weight goes into the kernel's layout then, so a checkpoint's
    quantized weights are never all held twice.
    """
    from tqdm import tqdm

    expected = model.state_dict(keep_vars=True)
    loaded: dict[str, torch.Tensor] = {}
    early = _EarlyModules(model, expected, prepare)
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
        # a copy, never a view of the (memory-mapped) file: a file stays mapped, its pages counted in the
        # process's memory, while any tensor of it lives, even after what was read from it was converted
        loaded[name] = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
        if tensor.is_contiguous():
            drop_file_pages(tensor)
        early.arrived(name, loaded)
    if unexpected:
        packed = [k for k in unexpected if k.endswith(_QUANTIZED_SUFFIXES)]
        if packed:
            raise CheckpointError(f"checkpoint holds quantized weights (e.g. {packed[0]!r}) but says nothing of how they "
                                  f"are packed: give config.json a quantization_config, add AutoAWQ's "
                                  f"quant_config.json, or for an llm-awq export keep its file name, "
                                  f"{EXPORT_NAME_RULE}, which carries the bits and group size")
        raise CheckpointError(f"checkpoint has {len(unexpected)} weights this model does not use, e.g. "
                              f"{unexpected[:5]}")
    missing = [n for n in expected if n not in loaded and n not in early.done and not _is_tied(model, n)]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
    model.load_state_dict(loaded, strict=False, assign=True)
    for module in model.modules():
        if hasattr(module, "post_load") and module not in early.modules:
            module.post_load()
    return_freed_memory()


class _EarlyModules:
    """The modules with `post_load` whose state is all buffers: each takes its tensors the moment the
    last one arrives (then `post_load()`, and `prepare()` if asked)."""

    def __init__(self, model: nn.Module, expected: dict, prepare: bool):
        self.prepare, self.done, self.modules = prepare, set(), set()
        self.owner: dict[str, tuple[nn.Module, str]] = {}
        self.waiting: dict[int, set[str]] = {}
        for prefix, module in model.named_modules():
            if not hasattr(module, "post_load") or list(module.parameters(recurse=False)):
                continue
            names = {f"{prefix}.{b}" for b, t in module._buffers.items()
                     if t is not None and f"{prefix}.{b}" in expected}
            for n in names:
                self.owner[n] = (module, prefix)
            self.waiting[id(module)] = names

    def arrived(self, name: str, loaded: dict) -> None:
        if name not in self.owner:
            return
        module, prefix = self.owner[name]
        wait = self.waiting[id(module)]
        wait.discard(name)
        if wait:
            return
        for n in [n for n, (m, _) in self.owner.items() if m is module]:
            module._buffers[n[len(prefix) + 1:]] = loaded.pop(n)
            self.done.add(n)
        module.post_load()
        if self.prepare and hasattr(module, "prepare"):
            module.prepare()
            return_freed_memory()
        self.modules.add(module)




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


# llm-awq / TinyChat name their exports `<model>-w4-g128-awq-v2.pt` (TinyChat's README also
# `<model>-w4-g128-v2.pt`); that name is the only record of the bit width and group size when the
# folder's config.json has no `quantization_config`.
_V2_EXPORT_NAME = re.compile(r"-w(\d+)-g(\d+)(?:-awq)?(-v2)?\.pt$")
EXPORT_NAME_RULE = "<model>-w<bits>-g<group size>[-awq]-v2.pt"
_QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scaled_zeros")


def read_quant_config(model_dir: Path, raw_config: dict) -> AWQConfig | None:
    """`quantization_config` in config.json, else AutoAWQ's `quant_config.json`, else what the name
    of a lone llm-awq export (`*-w4-g128-awq-v2.pt` or `*-w4-g128-v2.pt`, no safetensors beside it)
    says, else None."""
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
PART_PREFIXES = {"vision": ("vision.", "projector."), "llm": ("decoder.",)}


def unbuilt(parts: Collection[str], layers_needed: int) -> Callable[[str], bool]:
    """`skip` for `load_weights`: our-side names deliberately not built — the other part's, and the
    vision layers past the last one the selected features need."""
    dropped = re.compile(r"^vision\.tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.")
    not_built = tuple(p for part in MODEL_PARTS if part not in parts for p in PART_PREFIXES[part])

    def skip(name: str) -> bool:
        if name.startswith(not_built):
            return True
        m = dropped.match(name)
        return m is not None and int(m.group(1)) >= layers_needed

    return skip


def check_parts(parts: Collection[str]) -> set[str]:
    parts = set(parts)
    if not parts or parts - set(MODEL_PARTS):
        raise ValueError(f"parts must be a non-empty subset of {MODEL_PARTS}, got {sorted(parts)}")
    return parts


def save_awq_copy(src_dir: str | Path, out_dir: str | Path, model: nn.Module, packed: dict[str, dict[str, torch.Tensor]],
                  group_size: int, mapping: tuple[tuple[str, Rename], ...], modules_to_not_convert: tuple[str, ...],
                  keys_from: Callable[[str], bool] = lambda key: True,
                  scale_dtype: torch.dtype = torch.float16) -> Path:
    """Write an AutoAWQ gemm checkpoint (one `model.safetensors`) in the key layout of `src_dir`.

    Every tensor of the source checkpoint that `keys_from` accepts is written under its own name,
    with our (AWQ-scaled) values; each quantized decoder linear's `weight` becomes
    `qweight`/`qzeros`/`scales`. The folder's other files and subfolders (tokenizer, preprocessor
    config, a vision tower kept inside) are copied; config.json gains `quantization_config`.
    """
    import json
    import shutil

    from safetensors.torch import save_file

    from .config import AWQConfig

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = model.state_dict()
    files = weight_files(src)
    tensors: dict[str, torch.Tensor] = {}
    for key, src_tensor in iter_weights(files, keys_from):
        if any(re.search(p, key) for p in IGNORED_KEYS):
            continue
        name = rename(key, mapping)
        if name is None:
            raise CheckpointError(f"cannot map checkpoint weight {key!r}")
        module = name[len("decoder."):-len(".weight")] if name.startswith("decoder.") else None
        if module in packed and name.endswith(".weight"):
            base = key[:-len("weight")]
            for suffix, t in packed[module].items():
                tensors[base + suffix] = t.to(scale_dtype) if t.is_floating_point() else t
            continue
        name = _adapt_tower_prefix(name, ours)
        # vision layers past the selected feature layer are not built: keep the source tensor
        tensors[key] = (ours[name].to(src_tensor.dtype) if name in ours else src_tensor).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    weights = {f.name for f in files} | {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json"}
    for f in src.iterdir():
        if f.is_dir():
            shutil.copytree(f, out / f.name, dirs_exist_ok=True)
        elif f.is_file() and f.name not in weights and f.suffix not in (".safetensors", ".pt", ".bin"):
            shutil.copy2(f, out / f.name)
    cfg = read_json(src / "config.json")
    cfg["quantization_config"] = AWQConfig(group_size=group_size, modules_to_not_convert=modules_to_not_convert).to_hf()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
