"""Multimodal projectors: vision features [.., C_v] -> LLM embeddings [.., H].

Every projector is an `nn.Sequential` whose indices follow LLaVA's / VILA's `mm_projector`
(`layers.N` in VILA checkpoints), so weights load by index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import ProjectorConfig


class SquareDownsample(nn.Module):
    """Tokens of a square grid [B, g*g, C] -> [B, (g/k)^2, k*k*C]: each k x k block of neighbours
    becomes one token (VILA's DownSample blocks). The grid is zero-padded at its bottom and right
    to a multiple of k. Output tokens are row-major over blocks; a block's channels are its
    k*k tokens, row-major, each C wide."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = int(round(x.shape[1] ** 0.5))
        if g * g != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
        grid = rearrange(x, "b (r c) d -> b r c d", r=g)
        pad = -g % self.k
        if pad:
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        return rearrange(grid, "b (i p) (j q) d -> b (i j) (p q d)", p=self.k, q=self.k)


def build_projector(cfg: ProjectorConfig) -> nn.Sequential:
    """`identity`: nothing (no weights). `linear`: one Linear. `mlpNx_gelu`: N Linears with GELU between (LLaVA's layout).
    `mlp_downsample` (VILA-1.5) / `mlp_downsample_2x2_fix`: 2x2 merge, LayerNorm, Linear, GELU,
    Linear. `mlp_downsample_3x3_fix` (NVILA): 3x3 merge, LayerNorm, Linear to 3C, GELU,
    LayerNorm, Linear, GELU, Linear.

    llava-hf's `linear_1`/`linear_2` map to `0`/`2`, VILA's `layers.N` to `N`.
    """
    c, h, b = cfg.in_features, cfg.out_features, cfg.bias
    if cfg.type == "identity":      # LLaVA's IdentityMap: features go to the decoder as they are
        return nn.Sequential()
    k = cfg.downsample
    if k == 2:
        return nn.Sequential(SquareDownsample(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(), nn.Linear(h, h))
    if k == 3:
        return nn.Sequential(SquareDownsample(3), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                             nn.LayerNorm(3 * c), nn.Linear(3 * c, h), nn.GELU(), nn.Linear(h, h))
    mods: list[nn.Module] = [nn.Linear(c, h, bias=b)]
    for _ in range(cfg.mlp_depth - 1):
        mods += [nn.GELU(), nn.Linear(h, h, bias=b)]
    return nn.Sequential(*mods)
