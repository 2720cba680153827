"""Synthetic visual QA: pictures of one to three coloured shapes, with templated questions.

Every picture is a pure function of its integer id (`make_scene(i)`), so the data set is
deterministic; the train split uses ids [0, TRAIN_IDS) and the held-out split ids from
HELDOUT_START on, so the two never share a picture.

Shapes stand in three columns (left, middle, right), each in a 16 px cell placed on one of five
rows of an 8 px grid, with some jitter in position and size;
within a picture each shape kind and each colour appears at most once, so "the circle" and
"left of" are always well defined. Questions and exact answers:
    What colour is the circle?          -> red
    How many shapes are there?          -> two
    Is the square left of the triangle? -> yes | no
    Describe the image.                 -> red circle and blue square   (left to right)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 205, 30), "purple": (140, 50, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
TRAIN_IDS = 10 ** 8
HELDOUT_START = 10 ** 9


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    column: int      # 0 left, 1 middle, 2 right
    x: int           # left edge
    y: int           # top edge
    size: int


@dataclass(frozen=True)
class Scene:
    id: int
    items: tuple[Item, ...]   # left to right

    def image(self) -> Image.Image:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for it in self.items:
            fill = COLOURS[it.colour]
            box = (it.x, it.y, it.x + it.size, it.y + it.size)
            if it.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif it.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(it.x, it.y + it.size), (it.x + it.size, it.y + it.size), (it.x + it.size // 2, it.y)],
                             fill=fill)
        return img


def make_scene(scene_id: int) -> Scene:
    rng = random.Random(scene_id * 7919 + 17)
    n = rng.randint(1, 3)
    columns = sorted(rng.sample(range(3), n))
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    items = []
    for col, shape, colour in zip(columns, shapes, colours):
        size = rng.randint(12, 15)
        # a 16 px cell per column and one of five rows of the 8 px grid, with a pixel of jitter
        x = col * 16 + (16 - size) // 2 + rng.randint(0, 1)
        y = 8 * rng.randint(0, 4) + (16 - size) // 2 + rng.randint(0, 1)
        items.append(Item(shape, colour, col, x, y, size))
    return Scene(scene_id, tuple(items))


def describe(scene: Scene) -> str:
    return " and ".join(f"{it.colour} {it.shape}" for it in scene.items)


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every templated (question, answer) pair the scene supports."""
    qa = [(f"What colour is the {it.shape}?", it.colour) for it in scene.items]
    qa.append(("How many shapes are there?", NUMBERS[len(scene.items)]))
    for a in scene.items:
        for b in scene.items:
            if a is not b:
                qa.append((f"Is the {a.shape} left of the {b.shape}?", "yes" if a.column < b.column else "no"))
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
