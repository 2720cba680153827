"""A second picture generator for evaluating the default model, independent of the training one.

Same world as `data.py` — up to three of circle / square / upward triangle, each kind and palette
colour at most once, the four question templates, "left of" by centre x — but drawn by other
code under other rules: shapes are rasterised with numpy from their analytic outlines (each
pixel's colour is its covered fraction, measured on a 3x3 grid of sub-samples), canvases are
square, 48-400 px, shapes 18-30 % of the side, centres drawn uniformly and kept apart by their
circumscribed circles, backgrounds white or a light grey or tint, colours jittered a little,
and half the pictures are JPEG round trips. Shape centres lie at least 8 % of the side apart
horizontally (what makes "left of" answerable, as in the training world).

    eval_set(count, seed) -> [(picture, question, answer), ...]
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 205, 30), "purple": (140, 50, 170), "orange": (245, 140, 20)}
KINDS = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SUB = 3          # sub-samples per pixel side


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    size: float
    rgb: tuple[int, int, int]


def _coverage(kind: str, cx: float, cy: float, size: float, side: int) -> np.ndarray:
    """[side, side] fraction of each pixel inside the shape."""
    axis = (np.arange(side * SUB) + 0.5) / SUB
    x, y = axis[None, :], axis[:, None]
    half = size / 2
    if kind == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    elif kind == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:   # apex at the top centre, base along the bottom edge
        top, bottom = cy - half, cy + half
        inside = (y <= bottom) & (y >= top) & (np.abs(x - cx) <= (y - top) / 2)
    return inside.reshape(side, SUB, side, SUB).mean(axis=(1, 3))


@dataclass(frozen=True)
class Picture:
    side: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    jpeg: int | None

    def image(self) -> Image.Image:
        canvas = np.empty((self.side, self.side, 3), np.float64)
        canvas[:] = self.background
        for sh in self.shapes:
            cov = _coverage(sh.kind, sh.cx, sh.cy, sh.size, self.side)[..., None]
            canvas = canvas * (1 - cov) + np.array(sh.rgb, np.float64) * cov
        img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        if self.jpeg is None:
            img.save(buf, "PNG")
        else:
            img.save(buf, "JPEG", quality=self.jpeg)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def draw_picture(rng: random.Random) -> Picture:
    side = rng.randint(48, 400)
    while True:
        count = rng.choice((1, 2, 3))
        shapes: list[Shape] = []
        for kind, colour in zip(rng.sample(KINDS, count), rng.sample(sorted(PALETTE), count)):
            size = side * rng.uniform(0.18, 0.30)
            for _ in range(100):
                cx, cy = rng.uniform(size / 2, side - size / 2), rng.uniform(size / 2, side - size / 2)
                apart = all(np.hypot(cx - o.cx, cy - o.cy) > (size + o.size) / 2 * 2 ** 0.5
                            and abs(cx - o.cx) >= 0.08 * side for o in shapes)
                if apart:
                    rgb = tuple(int(np.clip(c + rng.randint(-12, 12), 0, 255)) for c in PALETTE[colour])
                    shapes.append(Shape(kind, colour, cx, cy, size, rgb))
                    break
        if len(shapes) == count:
            break
    roll = rng.random()
    if roll < 0.4:
        background = (255, 255, 255)
    elif roll < 0.7:
        grey = rng.randint(225, 250)
        background = (grey, grey, grey)
    else:
        background = tuple(rng.randint(225, 255) for _ in range(3))
    return Picture(side, background, tuple(shapes), rng.randint(70, 95) if rng.random() < 0.5 else None)


def ask(picture: Picture, rng: random.Random) -> tuple[str, str]:
    """One question of a kind chosen uniformly (left-of only with two or more shapes)."""
    shapes = picture.shapes
    kinds = ["colour", "count", "describe"] + (["left-of"] if len(shapes) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "colour":
        sh = rng.choice(shapes)
        return f"What colour is the {sh.kind}?", sh.colour
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(shapes)]
    if kind == "left-of":
        a, b = rng.sample(shapes, 2)
        return f"Is the {a.kind} left of the {b.kind}?", "yes" if a.cx < b.cx else "no"
    ordered = sorted(shapes, key=lambda s: s.cx)
    return "Describe the image.", " and ".join(f"{s.colour} {s.kind}" for s in ordered)


def eval_set(count: int, seed: int = 0) -> list[tuple[Picture, str, str]]:
    rng = random.Random(1_000_003 * seed + 11)
    out = []
    for _ in range(count):
        pic = draw_picture(rng)
        out.append((pic, *ask(pic, rng)))
    return out
