"""Vision towers: transformers modules plus LLaVA's feature selection.

The tower runs only the encoder layers the selected features need (LLaVA-1.5 takes the
penultimate layer, so the last layer is never built), which saves its compute and memory.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from ..errors import ConfigError


def build_hf_tower(cfg: VisionConfig) -> nn.Module:
    """transformers' CLIP or SigLIP vision model (SigLIP without its pooling head, which LLaVA-style
    feature selection never uses)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    fields = {k: v for k, v in cfg.hf_config.items() if k not in ("model_type", "architectures", "_name_or_path")}
    if cfg.model_type == "clip_vision_model":
        hf_cfg, cls = CLIPVisionConfig(**fields), CLIPVisionModel
    elif cfg.model_type == "siglip_vision_model":
        hf_cfg, cls = SiglipVisionConfig(**{**fields, "vision_use_head": False}), SiglipVisionModel
    else:
        raise ConfigError(f"vision tower type {cfg.model_type!r} is not supported")
    hf_cfg._attn_implementation = "sdpa"
    return cls(hf_cfg)


class VisionTower(nn.Module):
    """pixel_values [N, 3, S, S] -> selected features [N, tokens_per_image, C * len(feature_layers)]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.tower = build_hf_tower(cfg)
        needed = cfg.layers_needed
        layers = _encoder_layers(self.tower)
        del layers[needed:]
        self.tower.config.num_hidden_layers = needed
        # hidden_states index of each selected layer (0 = embeddings output)
        self._select = tuple(i if i >= 0 else cfg.num_layers + 1 + i for i in cfg.feature_layers)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values.to(self.dtype), output_hidden_states=True)
        feats = [out.hidden_states[i] for i in self._select]
        if self.config.has_cls_token and self.config.select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0]


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    root = getattr(tower, "vision_model", tower)  # transformers < 5 wraps the tower in `vision_model`
    return root.encoder.layers
