"""Image loading and CLIP preprocessing (pillow + torch).

CLIP: resize the shortest edge (bicubic), center crop, scale to [0, 1], normalise with the
CLIP mean/std. LLaVA-1.5 (`image_aspect_ratio: pad`) first pads the image to a square
filled with the mean colour, so nothing is cropped away.

Work is bounded by the output, not the input. Intermediate pictures stay under
`RESIZE_MAX_PIXELS`: a shortest-edge resize larger than that scales only the part of the picture
the centre crop keeps (`resize_box`; equal to resize-then-crop within one 8-bit level, while
resizes within the bound are exactly transformers' resize-then-crop), and a pad-to-square whose
square would exceed it first shrinks the picture so that its square fits (a 1 x 1,000,000 strip
is padded to 4096 x 4096, not to 10^12 pixels).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import CheckpointError, ImageError, ImageTooLargeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[Image.Image, str, Path, bytes]

# Decompression-bomb guard: refuse images above this many pixels before decoding them fully.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Largest intermediate picture preprocessing builds (a resize, a padded square): 48 MB of RGB.
RESIZE_MAX_PIXELS = 16 * 1024 * 1024
# Source axes longer than this are box-reduced before a bicubic resize (no real photo is).
REDUCE_ABOVE = 32768


# Thinner pictures (longest side over shortest) are refused from their header.
MAX_ASPECT_RATIO = 200.0
FORMATS = "PNG, JPEG, GIF, BMP, TIFF, WebP"


def open_image(src: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
               ) -> Image.Image:
    """A PIL image with only its header read (encoded bytes or a file path), checked against the
    pixel and aspect-ratio limits before any pixel is decoded; a PIL image is returned as is.
    `ImageTooLargeError` (413) above `max_pixels`, `ImageError` (400) for anything unreadable,
    empty or thinner than `max_aspect_ratio`."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        fp, name = io.BytesIO(src), "image bytes"
    elif isinstance(src, (str, Path)):
        name = f"image file {str(src)!r}"
        if not Path(src).is_file():
            raise ImageError(f"cannot read {name}: no such file")
        fp = src
    else:
        raise ImageError(f"unsupported image input of type {type(src).__name__}")
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError:   # pillow's own guard fires at open beyond 2x its limit
        raise ImageTooLargeError(f"{name} hold a picture above the {max_pixels} pixel limit") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {name}: not a picture in a format this server reads ({FORMATS})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read {name}: {e}") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"cannot read {name}: the picture is empty ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name} hold a {w}x{h} picture, above the {max_pixels} pixel limit")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise ImageError(f"{name} hold a {w}x{h} picture; pictures up to {max_aspect_ratio:g}:1 are accepted")
    return img


def decode_image(img: Image.Image) -> Image.Image:
    """Decode an opened image's pixels, as RGB."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"the picture cannot be decoded: {e}") from None
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(src: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS,
               max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """A PIL RGB image from a PIL image, a file path or encoded bytes (`open_image`'s checks,
    then decoding)."""
    return decode_image(open_image(src, max_pixels, max_aspect_ratio))


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic resize. A source axis longer than `REDUCE_ABOVE` is first box-reduced by an integer
    factor (pillow's `reducing_gap`): a full-precision bicubic resize keeps about four
    coefficients per source pixel of each axis, 2 GB for a 1 x 67,108,864 strip."""
    if img.size == size:
        return img
    gap = 2.0 if max(img.size) > REDUCE_ABOVE else None
    return img.resize(size, resample=Image.Resampling.BICUBIC, reducing_gap=gap)


def resize_box(img: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """The `box` region of `img` resized (bicubic) to `size`, equal within one 8-bit level to the
    same output pixels of a full resize at that scale: pillow's full resize is a horizontal pass, rounded to 8 bits, then a
    vertical pass; here both passes run over just the source rows the vertical pass reads (a
    margin of the filter's support around the box), so a 1 x 1,000,000 strip costs its crop only.
    (One `resize(box=...)` with both passes and a vertical offset differs from the full resize.)"""
    x0, y0, x1, y1 = box
    out_w, out_h = size
    margin = math.ceil(2 * max((y1 - y0) / out_h, 1.0)) + 2     # bicubic support, in source rows
    top, bottom = max(0, math.floor(y0) - margin), min(img.height, math.ceil(y1) + margin)
    strip = img.crop((0, top, img.width, bottom))
    wide = strip.resize((out_w, strip.height), resample=Image.Resampling.BICUBIC, box=(x0, 0, x1, strip.height))
    return wide.resize((out_w, out_h), resample=Image.Resampling.BICUBIC, box=(0, y0 - top, out_w, y1 - top))


@dataclass(frozen=True)
class ImageProcessorConfig:
    shortest_edge: int
    crop_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = False
    square_resize: bool = False      # resize straight to crop x crop (SigLIP), no shortest-edge + crop

    @classmethod
    def from_preprocessor_json(cls, d: dict, pad_to_square: bool = False) -> "ImageProcessorConfig":
        """Read a transformers `preprocessor_config.json` (CLIPImageProcessor)."""
        try:
            size = d.get("size", 224)
            edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
            square = isinstance(size, dict) and "height" in size and not d.get("do_center_crop", False)
            crop = d.get("crop_size", edge) if not square else edge
            crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
            return cls(shortest_edge=int(edge), crop_size=int(crop),
                       mean=tuple(float(x) for x in d.get("image_mean", CLIP_MEAN)),
                       std=tuple(float(x) for x in d.get("image_std", CLIP_STD)),
                       pad_to_square=pad_to_square, square_resize=square)
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"preprocessor_config.json has a malformed value: {e}") from None


def expand_to_square(img: Image.Image, fill: tuple[int, int, int], max_pixels: int = RESIZE_MAX_PIXELS) -> Image.Image:
    """Pad the short side symmetrically (LLaVA's `expand2square`); a picture whose square would
    exceed `max_pixels` is first shrunk (bicubic) to the largest side whose square fits."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    if side * side > max_pixels:
        side = math.isqrt(max_pixels)
        w, h = (side, max(1, round(h * side / w))) if w >= h else (max(1, round(w * side / h)), side)
        img = resize(img, (w, h))
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class ImageProcessor:
    def __init__(self, cfg: ImageProcessorConfig):
        self.cfg = cfg
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, images: list[ImageInput]) -> torch.Tensor:
        """[N, 3, crop, crop] float32."""
        if not images:
            return torch.empty(0, 3, self.cfg.crop_size, self.cfg.crop_size)
        return torch.stack([self.one(load_image(im)) for im in images])

    def one(self, img: Image.Image) -> torch.Tensor:
        cfg = self.cfg
        if cfg.pad_to_square:
            img = expand_to_square(img, tuple(int(x * 255) for x in cfg.mean))
        if cfg.square_resize:
            c = cfg.crop_size
            img = resize(img, (c, c))
            return self._normalize(img, c)
        c = cfg.crop_size
        (new_w, new_h), box = self.crop_plan(*img.size)
        if new_w * new_h > RESIZE_MAX_PIXELS:   # resize just the kept part
            img = resize_box(img, (c, c), box)
        else:
            img = resize(img, (new_w, new_h))
            top, left = (new_h - c) // 2, (new_w - c) // 2
            img = img.crop((left, top, left + c, top + c))
        return self._normalize(img, c)

    def crop_plan(self, w: int, h: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
        """The shortest-edge resize size (new_w, new_h) of a w x h picture, and the source box
        (left, top, right, bottom) that the centre crop of that resize covers."""
        cfg = self.cfg
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        c = cfg.crop_size
        if new_w < c or new_h < c:
            raise ImageError(f"image resized to {new_w}x{new_h} is smaller than the {c}x{c} crop")
        top, left = (new_h - c) // 2, (new_w - c) // 2
        sx, sy = w / new_w, h / new_h
        return (new_w, new_h), (left * sx, top * sy, (left + c) * sx, (top + c) * sy)

    def _normalize(self, img: Image.Image, c: int) -> torch.Tensor:
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(c, c, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - self._mean) / self._std
