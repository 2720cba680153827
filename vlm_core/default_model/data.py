"""Synthetic visual QA: pictures of one to three coloured shapes, with templated questions.

Every picture is a pure function of its integer id (`make_scene(i)`), so the data set is
deterministic; the train split uses ids [0, TRAIN_IDS) and the held-out split ids from
HELDOUT_START on, so the two never share a picture.

The world: one to three shapes (circle, square, upward triangle), each kind and each colour at
most once per picture, so "the circle" is always well defined. A picture is any size and aspect
ratio a person might draw: canvases 40-420 px a side, up to 2.5:1 either way, white or a light
background, shapes 14-36 % of the shorter side placed anywhere without overlapping, colours
jittered around the palette, edges anti-aliased (drawn at 4x, box-reduced), some pictures saved
as JPEG. Shape centres lie at least `MIN_GAP` of the width apart horizontally, so "left of"
(compared by centre x) and the left-to-right description are well defined. Questions and exact
answers:
    What colour is the circle?          -> red
    How many shapes are there?          -> two
    Is the square left of the triangle? -> yes | no
    Describe the image.                 -> red circle and blue square   (left to right)

`vlm_core/default_model/shapes_eval.py` draws a second, independently written family of
pictures in the same world for evaluation.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 205, 30), "purple": (140, 50, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
TRAIN_IDS = 10 ** 8
HELDOUT_START = 10 ** 9
SIDES = (40, 420)          # canvas side range, px
MAX_ASPECT = 2.5           # longer side / shorter side
SIZES = (0.14, 0.36)       # shape size as a fraction of the shorter side
MIN_OF_LONG = 0.15         # ... and at least this fraction of the longer side (legible once squashed)
MIN_GAP = 0.08             # least horizontal distance between two shapes' centres, as a fraction of the width
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    x: int           # left edge, px
    y: int           # top edge, px
    size: int        # side of the shape's bounding square, px
    fill: tuple[int, int, int] | None = None   # the drawn colour (None: the palette's)

    @property
    def cx(self) -> float:
        return self.x + self.size / 2


@dataclass(frozen=True)
class Scene:
    id: int
    items: tuple[Item, ...]               # left to right (by centre x)
    width: int = 48
    height: int = 48
    background: tuple[int, int, int] = (255, 255, 255)
    jpeg_quality: int | None = None       # saved as JPEG at this quality, else PNG (lossless)

    def image(self) -> Image.Image:
        k = SUPERSAMPLE
        img = Image.new("RGB", (self.width * k, self.height * k), self.background)
        draw = ImageDraw.Draw(img)
        for it in self.items:
            fill = it.fill or COLOURS[it.colour]
            x0, y0, s = it.x * k, it.y * k, it.size * k
            box = (x0, y0, x0 + s - 1, y0 + s - 1)
            if it.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif it.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + (s - 1) / 2, y0)], fill=fill)
        img = img.reduce(k)
        if self.jpeg_quality is not None:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=self.jpeg_quality)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return img


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _canvas(rng: random.Random) -> tuple[int, int]:
    """Width and height: half the pictures square, the rest up to MAX_ASPECT either way."""
    side = round(math.exp(rng.uniform(math.log(SIDES[0]), math.log(SIDES[1]))))
    if rng.random() < 0.5:
        return side, side
    aspect = math.exp(rng.uniform(math.log(1.15), math.log(MAX_ASPECT)))
    long_side = min(SIDES[1], max(SIDES[0], round(side * aspect ** 0.5)))
    short_side = max(SIDES[0], round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _place(rng: random.Random, width: int, height: int, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of `sizes` inside the canvas, no two overlapping and their
    centres MIN_GAP * width apart in x; None when random tries find no such layout."""
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(50):
            x, y = rng.randint(0, width - s), rng.randint(0, height - s)
            if all((x + s <= px or px + ps <= x or y + s <= py or py + ps <= y)
                   and abs((x + s / 2) - (px + ps / 2)) >= MIN_GAP * width for px, py, ps in placed):
                placed.append((x, y, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def make_scene(scene_id: int) -> Scene:
    rng = random.Random(scene_id * 7919 + 17)
    while True:
        width, height = _canvas(rng)
        n = rng.randint(1, 3)
        short = min(width, height)
        lo = max(SIZES[0] * short, MIN_OF_LONG * max(width, height))
        hi = max(lo, SIZES[1] * short)
        sizes = [max(6, round(rng.uniform(lo, hi))) for _ in range(n)]
        corners = _place(rng, width, height, sizes)
        if corners is not None:
            break
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    items = [Item(shape, colour, x, y, s, _jitter(rng, COLOURS[colour], 20))
             for shape, colour, (x, y), s in zip(shapes, colours, corners, sizes)]
    background = (255, 255, 255) if rng.random() < 0.5 else tuple(rng.randint(215, 255) for _ in range(3))
    quality = rng.randint(55, 95) if rng.random() < 0.4 else None
    return Scene(scene_id, tuple(sorted(items, key=lambda it: it.cx)), width, height, background, quality)


def _inside(item: Item, x, y):
    """Boolean mask: which canvas points (x, y arrays, px) lie inside the item's shape."""
    s = item.size
    if item.shape == "circle":
        cx, cy = item.x + s / 2, item.y + s / 2
        return (x - cx) ** 2 + (y - cy) ** 2 <= (s / 2) ** 2
    inside_box = (x >= item.x) & (x <= item.x + s) & (y >= item.y) & (y <= item.y + s)
    if item.shape == "square":
        return inside_box
    # upward triangle: apex (x + s/2, y), base from (x, y + s) to (x + s, y + s)
    half_width = (y - item.y) / 2
    return inside_box & (abs(x - (item.x + s / 2)) <= half_width)


def patch_labels(scene: Scene, grid: int, samples: int = 4):
    """Per patch of a `grid` x `grid` split of the picture squashed to a square, the shape that
    covers most of it (at least a quarter, on `samples` x `samples` points per patch) as three
    row-major int arrays: kind (0 background, 1 + SHAPES index), colour (0, 1 + sorted palette
    index) and place from the left (0, 1 + index in `scene.items`)."""
    import numpy as np

    n = grid * samples
    u = (np.arange(n) + 0.5) / n
    x = (u * scene.width)[None, :].repeat(n, 0)
    y = (u * scene.height)[:, None].repeat(n, 1)
    cover = np.zeros((len(scene.items), grid * grid))
    for i, item in enumerate(scene.items):
        mask = _inside(item, x, y).reshape(grid, samples, grid, samples)
        cover[i] = mask.mean(axis=(1, 3)).reshape(-1)
    best = cover.argmax(axis=0)
    hit = cover.max(axis=0) >= 0.25
    palette = sorted(COLOURS)
    kind = np.array([1 + SHAPES.index(it.shape) for it in scene.items])[best] * hit
    colour = np.array([1 + palette.index(it.colour) for it in scene.items])[best] * hit
    place = (best + 1) * hit
    return kind, colour, place


def describe(scene: Scene) -> str:
    return " and ".join(f"{it.colour} {it.shape}" for it in scene.items)


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every templated (question, answer) pair the scene supports."""
    qa = [(f"What colour is the {it.shape}?", it.colour) for it in scene.items]
    qa.append(("How many shapes are there?", NUMBERS[len(scene.items)]))
    for a in scene.items:
        for b in scene.items:
            if a is not b:
                qa.append((f"Is the {a.shape} left of the {b.shape}?", "yes" if a.cx < b.cx else "no"))
    qa.append(("Describe the image.", describe(scene)))
    return qa


def sample_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One question for a scene, balanced over the four kinds where the scene allows."""
    qa = questions(scene)
    kinds = {}
    for q, a in qa:
        kinds.setdefault(q.split()[0] + q.split()[1], []).append((q, a))
    kind = rng.choice(sorted(kinds))
    return rng.choice(kinds[kind])


def question_kind(question: str) -> str:
    """colour | count | left-of | describe."""
    return {"What": "colour", "How": "count", "Is": "left-of", "Describe": "describe"}[question.split()[0]]


def split_ids(split: str, count: int, offset: int = 0) -> range:
    if split == "train":
        if offset + count > TRAIN_IDS:
            raise ValueError("train split exhausted")
        return range(offset, offset + count)
    if split == "heldout":
        return range(HELDOUT_START + offset, HELDOUT_START + offset + count)
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def heldout_set(count: int, seed: int = 0) -> list[tuple[Scene, str, str]]:
    """(scene, question, answer) for `count` held-out pictures, one question each."""
    rng = random.Random(seed)
    out = []
    for sid in split_ids("heldout", count):
        scene = make_scene(sid)
        q, a = sample_qa(scene, rng)
        out.append((scene, q, a))
    return out


def vocabulary() -> list[str]:
    """Every whitespace-separated word of the prompts, answers and chat template."""
    words = {"USER:", "ASSISTANT:", "and", "yes", "no"} | set(NUMBERS) | set(COLOURS) | set(SHAPES)
    for text in ["What colour is the circle? square? triangle?", "How many shapes are there?",
                 "Is the left of the", "Describe the image."]:
        words |= set(text.split())
    return sorted(words)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write one held-out picture and print its questions and answers.")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--index", type=int, default=0, help="which held-out picture")
    args = ap.parse_args(argv)
    scene = make_scene(HELDOUT_START + args.index)
    scene.image().save(args.out)
    print(f"wrote {args.out}")
    for q, a in questions(scene):
        print(f"  {q}  ->  {a}")


if __name__ == "__main__":
    main()
