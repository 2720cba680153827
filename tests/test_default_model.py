"""The embedded default model: its data, tokenizer, and the shipped checkpoints' accuracy."""

import random

import pytest
import torch

from vlm_core.default_model import default_model_dir
from vlm_core.default_model.data import (COLOURS, HELDOUT_START, MAX_ASPECT, MIN_GAP, SHAPES, SIDES, Item, Scene,
                                         heldout_set, make_scene, patch_labels, questions, sample_qa, split_ids,
                                         vocabulary)
from vlm_core.default_model.evaluate import accuracy, answer_all, by_kind, hf_answers
from vlm_core.default_model.shapes_eval import Picture, Shape, eval_set
from vlm_core.default_model.train import build_tokenizer
from vlm_core.vlm import VLM


def test_scenes_are_deterministic_and_splits_never_share_a_picture():
    assert make_scene(42) == make_scene(42)
    assert list(make_scene(42).image().getdata()) == list(make_scene(42).image().getdata())
    train, held = split_ids("train", 1000), split_ids("heldout", 1000)
    assert not set(train) & set(held) and held[0] == HELDOUT_START
    shapes_seen, sizes = set(), set()
    for sid in range(300):
        s = make_scene(sid)
        assert 1 <= len(s.items) <= 3 and SIDES[0] <= min(s.width, s.height) <= max(s.width, s.height) <= SIDES[1]
        assert max(s.width, s.height) / min(s.width, s.height) <= MAX_ASPECT + 0.05
        assert len({i.shape for i in s.items}) == len(s.items) and len({i.colour for i in s.items}) == len(s.items)
        assert [i.cx for i in s.items] == sorted(i.cx for i in s.items)
        for a, b in zip(s.items, s.items[1:]):
            assert b.cx - a.cx >= MIN_GAP * s.width                       # "left of" is well defined
        for a in s.items:
            assert 0 <= a.x <= s.width - a.size and 0 <= a.y <= s.height - a.size
            for b in s.items:
                if a is not b:   # no two shapes overlap
                    assert a.x + a.size <= b.x or b.x + b.size <= a.x or a.y + a.size <= b.y or b.y + b.size <= a.y
        shapes_seen.add((s.width == s.height, s.jpeg_quality is None, s.background == (255, 255, 255)))
        sizes.add(s.width)
    assert len(shapes_seen) == 8 and len(sizes) > 100     # square or not, PNG or JPEG, white or not; many sizes


def test_questions_and_answers_for_a_hand_built_scene():
    scene = Scene(0, (Item("square", "blue", 2, 10, 10), Item("circle", "red", 35, 20, 10)), 48, 48)
    assert questions(scene) == [
        ("What colour is the square?", "blue"), ("What colour is the circle?", "red"),
        ("How many shapes are there?", "two"),
        ("Is the square left of the circle?", "yes"), ("Is the circle left of the square?", "no"),
        ("Describe the image.", "blue square and red circle")]
    img = scene.image()
    assert img.size == (48, 48)
    assert img.getpixel((7, 15)) == (40, 70, 220) and img.getpixel((40, 25)) == (220, 40, 40)
    assert img.getpixel((25, 5)) == (255, 255, 255)
    box = [img.getpixel((x, y)) for x in range(35, 45) for y in range(20, 30)]
    blended = [p for p in box if p not in ((220, 40, 40), (255, 255, 255))]   # anti-aliased rim
    assert blended and all(p[0] >= 220 and 40 <= p[1] <= 255 for p in blended)


def test_patch_labels_name_the_shape_covering_each_patch():
    """The training-only probes' targets on a hand-built scene: 8 x 8 patches of 6 px on a 48 px canvas."""
    scene = Scene(0, (Item("square", "blue", 2, 10, 10), Item("circle", "red", 35, 20, 10)), 48, 48)
    kind, colour, place = (x.reshape(8, 8) for x in patch_labels(scene, 8))
    # the patch x 6-12, y 12-18 lies inside the square; x 36-42, y 24-30 mostly inside the circle
    assert (kind[2, 1], colour[2, 1], place[2, 1]) == (1 + SHAPES.index("square"), 1 + sorted(COLOURS).index("blue"), 1)
    assert (kind[4, 6], colour[4, 6], place[4, 6]) == (1 + SHAPES.index("circle"), 1 + sorted(COLOURS).index("red"), 2)
    assert kind[0, 0] == colour[0, 0] == place[0, 0] == 0 and kind[7, 3] == 0            # background
    assert set(kind.ravel()) == {0, 1 + SHAPES.index("circle"), 1 + SHAPES.index("square")}
    assert (place > 0).sum() == (kind > 0).sum()
    # a wide canvas is squashed: the same square drawn on twice the width covers half the columns
    wide = Scene(0, (Item("square", "blue", 0, 0, 24),), 96, 48)
    assert (patch_labels(wide, 8)[0].reshape(8, 8)[:4] > 0).sum(axis=1).tolist() == [2, 2, 2, 2]


def test_the_independent_generator_draws_the_same_world_with_other_rules():
    import numpy as np

    items = eval_set(60, seed=3)
    assert [(q, a) for _, q, a in items] == [(q, a) for _, q, a in eval_set(60, seed=3)]
    kinds = set()
    for pic, q, a in items:
        kinds.add(q.split()[0])
        assert 48 <= pic.side <= 400 and 1 <= len(pic.shapes) <= 3
        assert len({sh.kind for sh in pic.shapes}) == len({sh.colour for sh in pic.shapes}) == len(pic.shapes)
        for sh in pic.shapes:
            assert 0.18 * pic.side <= sh.size <= 0.30 * pic.side
            assert sh.size / 2 <= sh.cx <= pic.side - sh.size / 2 and sh.size / 2 <= sh.cy <= pic.side - sh.size / 2
        xs = sorted(sh.cx for sh in pic.shapes)
        assert all(b - a >= 0.08 * pic.side for a, b in zip(xs, xs[1:]))
        if q.startswith("Describe"):
            assert a == " and ".join(f"{s.colour} {s.kind}" for s in sorted(pic.shapes, key=lambda s: s.cx))
    assert kinds == {"What", "How", "Is", "Describe"}
    # a hand-placed circle: its centre is the colour, far corners the background, its rim blended
    pic = Picture(60, (255, 255, 255), (Shape("circle", "red", 30.0, 30.0, 20.0, (220, 40, 40)),), None)
    arr = np.asarray(pic.image()).astype(int)
    assert tuple(arr[30, 30]) == (220, 40, 40) and tuple(arr[2, 2]) == (255, 255, 255)
    rim = arr[22, 23]             # row 22, column 23: a pixel the rim crosses
    assert 40 < rim[1] < 255 and 220 <= rim[0] <= 255


def test_accuracy_by_question_kind():
    items = [(None, "What colour is the circle?", "red"), (None, "How many shapes are there?", "two"),
             (None, "What colour is the square?", "blue"), (None, "Describe the image.", "red circle")]
    answers = ["red", "three", "green", "red circle"]
    assert accuracy(answers, items) == 0.5
    assert by_kind(answers, items) == {"colour": 0.5, "count": 0.0, "describe": 1.0}


def test_sampled_questions_cover_all_kinds():
    rng = random.Random(0)
    kinds = {sample_qa(make_scene(i), rng)[0].split()[0] for i in range(200)}
    assert kinds == {"What", "How", "Is", "Describe"}


def test_tokenizer_covers_every_prompt_and_answer():
    tok = build_tokenizer()
    for sid in range(100):
        for q, a in questions(make_scene(sid)):
            ids = tok(q + " " + a, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(tok(a, add_special_tokens=False)["input_ids"]) == a
    assert set(vocabulary()) <= set(tok.get_vocab())


@pytest.fixture(scope="module")
def awq_model():
    return VLM.from_pretrained(default_model_dir("awq"))


@pytest.mark.parametrize("generator", ["heldout", "independent"])
def test_shipped_awq_model_answers_questions_on_both_generators(awq_model, generator):
    items = heldout_set(60, seed=1) if generator == "heldout" else eval_set(60, seed=1)
    answers = answer_all(awq_model, items)
    acc = accuracy(answers, items)
    assert acc >= 0.95, f"accuracy {acc:.2f}: {[(q, a, g) for (s, q, g), a in zip(items, answers) if a != g]}"


def test_shipped_checkpoints_are_small_and_quantized():
    total = sum(f.stat().st_size for kind in ("fp16", "awq") for f in default_model_dir(kind).iterdir())
    assert total <= 20 * 1024 * 1024
    from vlm_core.quant.awq_linear import AWQLinear

    m = VLM.from_pretrained(default_model_dir("awq"))
    assert isinstance(m.model.decoder.layers[0].mlp.down_proj, AWQLinear)


def test_fp16_answers_equal_transformers():
    fp16 = VLM.from_pretrained(default_model_dir("fp16"))
    items = heldout_set(20, seed=2) + eval_set(20, seed=2)
    assert answer_all(fp16, items) == hf_answers(default_model_dir("fp16"), fp16, items)


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from vlm_core.default_model.train import train

    a = load_file(str(train(tmp_path / "a", steps=2, batch_size=4, lr=1e-3, seed=3, log_every=10) / "model.safetensors"))
    b = load_file(str(train(tmp_path / "b", steps=2, batch_size=4, lr=1e-3, seed=3, log_every=10) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
