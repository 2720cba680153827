"""Preprocessing work is bounded by what it keeps: thin pictures, huge pads and long axes cost
little, within limits checked from the header, and ordinary pictures stay exactly as before."""

import io
import random
import time

import numpy as np
import pytest
from PIL import Image

from vlm_core.errors import ImageError, ImageTooLargeError
from vlm_core.inputs.image import (RESIZE_MAX_PIXELS, ImageProcessor, ImageProcessorConfig, expand_to_square,
                                   load_image, open_image, resize_box)


def png(size, colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def noise(w, h, seed=0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))


def resize_then_crop(img, edge, crop):
    """transformers' CLIP order at full size: shortest edge to `edge`, then the centre crop."""
    w, h = img.size
    nw, nh = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    big = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return np.asarray(big.crop((left, top, left + crop, top + crop))).astype(int)


@pytest.mark.parametrize("size,edge,crop", [((5, 3000), 48, 48), ((3000, 7), 48, 40), ((40, 9000), 336, 300),
                                            ((700, 90), 224, 224)])
def test_resizing_only_the_kept_box_equals_resize_then_crop_within_one_level(size, edge, crop):
    img = noise(*size)
    p = ImageProcessor(ImageProcessorConfig(edge, crop))
    _, box = p.crop_plan(*size)
    got = np.asarray(resize_box(img, (crop, crop), box)).astype(int)
    assert np.abs(got - resize_then_crop(img, edge, crop)).max() <= 1


def test_thin_pictures_are_processed_from_their_kept_part():
    img = load_image(png((1, 1_000_000)), max_aspect_ratio=float("inf"))
    p = ImageProcessor(ImageProcessorConfig(48, 48))
    (new_w, new_h), box = p.crop_plan(1, 1_000_000)
    assert new_w * new_h == 48 * 48_000_000 > RESIZE_MAX_PIXELS      # the full resize is never built
    assert box[3] - box[1] == pytest.approx(1.0)                      # one source row is kept
    for cfg in (ImageProcessorConfig(48, 48), ImageProcessorConfig(48, 48, pad_to_square=True),
                ImageProcessorConfig(48, 48, square_resize=True)):
        start = time.perf_counter()
        x = ImageProcessor(cfg).one(img)
        assert time.perf_counter() - start < 2 and tuple(x.shape) == (3, 48, 48)
    red = ImageProcessor(ImageProcessorConfig(48, 48)).one(img)
    assert red[0].std() < 1e-6 and red[0, 0, 0] > 1.0                   # all of it the picture's red


def test_pad_to_square_shrinks_a_picture_whose_square_is_too_large():
    img = Image.new("RGB", (100_000, 10), (0, 255, 0))
    out = expand_to_square(img, (1, 2, 3))
    side = int(RESIZE_MAX_PIXELS ** 0.5)
    assert out.size == (side, side)
    px = np.asarray(out)
    assert tuple(px[0, 0]) == (1, 2, 3) and tuple(px[(side - 1) // 2, side // 2]) == (0, 255, 0)
    small = Image.new("RGB", (30, 10), (0, 255, 0))                      # within the bound: exactly LLaVA's
    assert expand_to_square(small, (1, 2, 3)).size == (30, 30)


def test_limits_are_checked_from_the_header_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageError, match="200:1"):
        open_image(png((1, 5000)))
    with pytest.raises(ImageTooLargeError, match="above the 1000 pixel limit"):
        open_image(png((40, 30)), max_pixels=1000)
    lazy = open_image(png((30, 20)))
    assert lazy.size == (30, 20) and lazy.tile       # decoder tiles still pending: nothing decoded yet
    assert time.perf_counter() - start < 1


def test_a_non_image_names_the_accepted_formats_not_a_python_object():
    with pytest.raises(ImageError) as e:
        load_image(b"GIF89a but not really")
    assert "not a picture in a format this server reads (PNG, JPEG" in str(e.value) and "<" not in str(e.value)
