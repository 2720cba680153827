"""Image tiling for NVILA: dynamic S2 multi-scale tiles, and dynamic tiles plus a thumbnail.

Both pick a tile grid (cols, rows) whose aspect ratio is closest to the image's, among grids
with a tile count in [min_tiles, max_tiles]; on a tie the later candidate wins when the image
has more than half the grid's pixels. Tiles are cut row-major from the image resized to the grid.

As NVILA does it: when no grid qualifies (max_tiles below min_tiles — for dynamic S2, below the
last scale's square tile count) the grid is (1, 1); and candidates with equal tile counts keep
the order a Python set of (cols, rows) filled n = min..max, cols and rows ascending, iterates in
(a stable sort by tile count follows), which is what decides ties between such grids.
"""

from __future__ import annotations

import torch
from einops import rearrange
from PIL import Image

from .image import resize


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols * rows <= max_tiles, fewest tiles first (equal
    counts in the set's iteration order; see the module docstring); empty when max < min."""
    grids = set()
    for n in range(min_tiles, max_tiles + 1):
        grids.update((c, r) for c in range(1, n + 1) for r in range(1, n + 1) if min_tiles <= c * r <= max_tiles)
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """The grid of `grids` closest in aspect ratio to width / height; (1, 1) when there is none."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def cut_tiles(img: Image.Image, cols: int, rows: int, tile: int) -> list[Image.Image]:
    """Resize to (cols * tile, rows * tile) and cut row-major tiles."""
    resized = resize(img, (cols * tile, rows * tile))
    return [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]


def dynamic_s2_tiles(img: Image.Image, scales: tuple[int, ...], tile: int, max_tiles: int = 12
                     ) -> tuple[list[Image.Image], tuple[int, int]]:
    """Tiles of every scale (square grids of scale // scales[0] per side, then an aspect-ratio grid
    for the last scale) and the last scale's block size (rows, cols)."""
    tiles: list[Image.Image] = []
    for s in scales[:-1]:
        n = s // scales[0]
        tiles += cut_tiles(img, n, n, tile)
    min_tiles = (scales[-1] // scales[0]) ** 2
    cols, rows = closest_grid(img.width, img.height, candidate_grids(min_tiles, max_tiles), tile)
    tiles += cut_tiles(img, cols, rows, tile)
    return tiles, (rows, cols)


def dynamic_tiles(img: Image.Image, tile: int, max_tiles: int = 12, min_tiles: int = 1,
                  thumbnail: bool = True) -> list[Image.Image]:
    """Aspect-ratio grid tiles, then a whole-image thumbnail when there is more than one tile."""
    cols, rows = closest_grid(img.width, img.height, candidate_grids(min_tiles, max_tiles), tile)
    tiles = cut_tiles(img, cols, rows, tile)
    if thumbnail and len(tiles) > 1:
        tiles.append(resize(img, (tile, tile)))
    return tiles


def split_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, C, H, W] -> [rows * cols * B, C, H / rows, W / cols]: tiles row-major, each tile a batch."""
    b, c, h, w = x.shape
    if h % rows or w % cols:
        raise ValueError(f"a {h}x{w} map does not split into {rows}x{cols} equal tiles")
    return rearrange(x, "b c (r h) (q w) -> (r q b) c h w", r=rows, q=cols)
