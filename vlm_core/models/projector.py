"""Multimodal projectors: vision features [.., C_v] -> LLM embeddings [.., H]."""

from __future__ import annotations

from torch import nn

from ..config import ProjectorConfig


def build_projector(cfg: ProjectorConfig) -> nn.Sequential:
    """`linear`: one Linear. `mlpNx_gelu`: N Linears with GELU between (LLaVA's layout).

    Submodule indices follow LLaVA's `mm_projector` Sequential (0, 2, 4, ... are Linears), so
    llava-hf's `linear_1`/`linear_2` map to `0`/`2` and VILA's `layers.N` to `N`.
    """
    mods: list[nn.Module] = [nn.Linear(cfg.in_features, cfg.out_features, bias=cfg.bias)]
    for _ in range(cfg.mlp_depth - 1):
        mods += [nn.GELU(), nn.Linear(cfg.out_features, cfg.out_features, bias=cfg.bias)]
    return nn.Sequential(*mods)
