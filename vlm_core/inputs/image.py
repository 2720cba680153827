"""Image loading and CLIP preprocessing (pillow + torch).

CLIP: resize the shortest edge (bicubic), center crop, scale to [0, 1], normalise with the
CLIP mean/std. LLaVA-1.5 (`image_aspect_ratio: pad`) first pads the image to a square
filled with the mean colour, so nothing is cropped away.
"""

from __future__ import annotations

import io
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


def load_image(src: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A PIL RGB image from a PIL image, a file path or encoded bytes; `ImageError` otherwise.

    Encoded images larger than `max_pixels` are refused from their header, before decoding
    (`ImageTooLargeError`)."""
    if isinstance(src, Image.Image):
        img = src
        name = "image"
    else:
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
            if img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"{name} is {img.width}x{img.height}, above the {max_pixels} pixel limit")
            img.load()
        except ImageError:
            raise
        except Image.DecompressionBombError as e:   # pillow's own guard fires at open beyond 2x its limit
            raise ImageTooLargeError(f"{name} is too large: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot read {name}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name} is empty ({img.width}x{img.height})")
    return img.convert("RGB") if img.mode != "RGB" else img


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


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side symmetrically (LLaVA's `expand2square`)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
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
            if img.size != (c, c):
                img = img.resize((c, c), resample=Image.Resampling.BICUBIC)
            return self._normalize(img, c)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        c = cfg.crop_size
        if new_w < c or new_h < c:
            raise ImageError(f"image resized to {new_w}x{new_h} is smaller than the {c}x{c} crop")
        top, left = (new_h - c) // 2, (new_w - c) // 2
        img = img.crop((left, top, left + c, top + c))
        return self._normalize(img, c)

    def _normalize(self, img: Image.Image, c: int) -> torch.Tensor:
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(c, c, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        return (x - self._mean) / self._std
