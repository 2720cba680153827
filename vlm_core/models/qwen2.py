"""Qwen2 decoder (NVILA's LLM).

Qwen2 is the LLaMA block with biased q/k/v projections (o_proj has none), a large RoPE base
and usually tied embeddings for the small sizes; `TextConfig` carries those differences, so
the decoder is `LlamaDecoder` built from a Qwen2 config. Parameter names match transformers'
`Qwen2ForCausalLM` after the `model.` prefix.
"""

from __future__ import annotations

from ..config import TextConfig
from ..errors import ConfigError
from .layers import LinearFactory, dense_linear
from .llama import LlamaDecoder


class Qwen2Decoder(LlamaDecoder):
    def __init__(self, cfg: TextConfig, linear: LinearFactory = dense_linear):
        if cfg.model_type != "qwen2":
            raise ConfigError(f"Qwen2Decoder needs a qwen2 text config, got {cfg.model_type!r}")
        super().__init__(cfg, linear)
