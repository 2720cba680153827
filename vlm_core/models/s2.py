"""Scaling-on-scales (S2) feature assembly for NVILA's dynamic S2.

An image is encoded at several scales (e.g. 448, 896, 1344 with tiles of 448): every scale but
the last is a fixed square grid of tiles, the last a grid of `block_size` (rows, cols) tiles
chosen from the image's aspect ratio. Tile features are put back together as a chessboard,
each scale's map is resized (area interpolation) to the map of scale
`resize_output_to_scale_idx`, the maps are concatenated along channels, and the projector then
runs per tile-sized block of that map, its outputs merged back into one map, flattened.

Tensors are [B, C, H, W] feature maps; a tile batch lists tiles row-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..inputs.tiling import split_chessboard



def merge_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `split_chessboard`. Also takes token sequences [n * B, h * w, C] of square tiles."""
    if x.dim() == 3:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens per tile do not form a square")
        x = rearrange(x, "b (h w) c -> b c h w", h=side)
    if x.shape[0] % (rows * cols):
        raise ValueError(f"{x.shape[0]} tiles are not a multiple of {rows}x{cols}")
    return rearrange(x, "(r q b) c h w -> b c (r h) (q w)", r=rows, q=cols)


def tiles_per_scale(scales: tuple[int, ...], block_size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """(rows, cols) of the tile grid of each scale; None: a single tile standing for all scales."""
    if block_size is None:
        return [(1, 1)]
    return [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [tuple(block_size)]


def merge_scales(features: torch.Tensor, scales: tuple[int, ...], block_size: tuple[int, int] | None,
                 output_scale_idx: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tile features [n_tiles, h*w, C] of one image -> ([1, C * len(scales), H, W], block grid).

    The block grid is how the merged map splits into tile-sized blocks for the projector.
    """
    if block_size is None:   # one tile encoded once, its map standing in for every scale
        if features.shape[0] != 1:
            raise ValueError(f"an image without block sizes has one tile, got {features.shape[0]}")
        side = int(round(features.shape[1] ** 0.5))
        one = rearrange(features, "1 (h w) c -> 1 c h w", h=side)
        return one.repeat(1, len(scales), 1, 1), (1, 1)
    grids = tiles_per_scale(scales, block_size)
    if features.shape[0] != sum(r * c for r, c in grids):
        raise ValueError(f"{features.shape[0]} tiles do not match the scales' grids {grids}")
    maps, start = [], 0
    for r, c in grids:
        maps.append(merge_chessboard(features[start:start + r * c], r, c))
        start += r * c
    size = maps[output_scale_idx].shape[-2:]
    merged = torch.cat([F.interpolate(m.float(), size=size, mode="area").to(m.dtype) for m in maps], dim=1)
    last = len(scales) - 1
    grid = tuple(block_size) if output_scale_idx in (last, -1) else grids[output_scale_idx]
    return merged, grid


def project_blocks(merged: torch.Tensor, grid: tuple[int, int], projector) -> torch.Tensor:
    """Run `projector` over each tile-sized block of a merged map; [N, H] tokens, row-major."""
    rows, cols = grid
    blocks = rearrange(split_chessboard(merged, rows, cols), "b c h w -> b (h w) c")
    out = projector(blocks)                       # [rows * cols, n, H]
    return rearrange(merge_chessboard(out, rows, cols), "1 c h w -> (h w) c")
