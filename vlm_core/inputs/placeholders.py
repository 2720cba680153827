"""Image placeholders: where each image's embeddings go in the token sequence.

Two strategies, both ending in the same `MultimodalPrompt` (token ids plus one span per image):
  (a) one image token id per image (LLaVA's `<image>`), expanded here to the image's
      feature count, optionally wrapped in `<im_start>`/`<im_end>`;
      a run already expanded to the feature count (as the llava-hf processor emits) is
      accepted as is;
  (b) a run of patch tokens already in the prompt (TinyChat's `<im_patch>` * N path).

`embed_chunks` builds the input embeddings of a flat batch of token ranges, splicing in just
the slice of each image's embeddings that falls inside each range, so a prefill chunk may cut
through an image's run (`chunk_embeddings`: one range of one prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import PlaceholderMismatchError


@dataclass(frozen=True)
class PlaceholderSpec:
    image_token_id: int
    tokens_per_image: int
    patch_token_id: int | None = None
    im_start_id: int | None = None   # set to wrap expanded runs in start/end markers
    im_end_id: int | None = None


@dataclass(frozen=True)
class ImageSpan:
    offset: int   # position of the image's first embedding in the token sequence
    length: int   # number of positions (= tokens per image)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class MultimodalPrompt:
    token_ids: tuple[int, ...]
    spans: tuple[ImageSpan, ...]   # span i receives image i's embeddings

    def __len__(self) -> int:
        return len(self.token_ids)


def _runs(ids: Sequence[int], token: int) -> list[tuple[int, int]]:
    """Maximal runs [(start, length)] of `token` in `ids`."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def expand_placeholders(ids: Sequence[int], num_images: int, spec: PlaceholderSpec) -> MultimodalPrompt:
    n_tok = spec.tokens_per_image
    image_runs = _runs(ids, spec.image_token_id)
    patch_runs = _runs(ids, spec.patch_token_id) if spec.patch_token_id is not None else []
    if image_runs and patch_runs:
        raise PlaceholderMismatchError("prompt mixes image tokens and patch tokens; use one placeholder style")

    if patch_runs:  # strategy (b): already expanded patch runs
        spans = []
        for start, length in patch_runs:
            if length % n_tok:
                raise PlaceholderMismatchError(
                    f"a run of {length} patch tokens is not a multiple of the {n_tok} tokens per image")
            spans += [ImageSpan(start + k * n_tok, n_tok) for k in range(length // n_tok)]
        _check_count(len(spans), num_images)
        return MultimodalPrompt(tuple(ids), tuple(spans))

    if image_runs and all(length == n_tok for _, length in image_runs) and len(image_runs) == num_images \
            and n_tok > 1:
        return MultimodalPrompt(tuple(ids), tuple(ImageSpan(s, n_tok) for s, _ in image_runs))

    # strategy (a): every image token stands for one image
    positions = [i for i, t in enumerate(ids) if t == spec.image_token_id]
    _check_count(len(positions), num_images)
    out: list[int] = []
    spans = []
    wrap = spec.im_start_id is not None
    for i, t in enumerate(ids):
        if t != spec.image_token_id:
            out.append(t)
            continue
        already = wrap and i > 0 and ids[i - 1] == spec.im_start_id
        if wrap and not already:
            out.append(spec.im_start_id)
        spans.append(ImageSpan(len(out), n_tok))
        out += [spec.image_token_id] * n_tok
        if wrap and not (i + 1 < len(ids) and ids[i + 1] == spec.im_end_id):
            out.append(spec.im_end_id)
    return MultimodalPrompt(tuple(out), tuple(spans))


def _check_count(placeholders: int, images: int) -> None:
    if placeholders != images:
        raise PlaceholderMismatchError(
            f"prompt has {_plural(placeholders, 'image placeholder')} but {_plural(images, 'image')} "
            f"{'was' if images == 1 else 'were'} given")


def chunk_embeddings(embed_tokens: Callable[[torch.Tensor], torch.Tensor], prompt: MultimodalPrompt,
                     media_embeds: Sequence[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Input embeddings [end - start, H] of prompt positions [start, end) (`embed_chunks` of one)."""
    if len(media_embeds) != len(prompt.spans):
        raise PlaceholderMismatchError(
            f"prompt has {_plural(len(prompt.spans), 'image span')} but {len(media_embeds)} embeddings were given")
    ids = torch.tensor(prompt.token_ids[start:end], dtype=torch.long)
    return embed_chunks(embed_tokens, ids, [(prompt.spans, media_embeds, start, end - start)],
                        _device_of(embed_tokens))


def embed_chunks(embed_tokens: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor,
                 chunks: Sequence[tuple[Sequence[ImageSpan], Sequence[torch.Tensor], int, int]],
                 device: torch.device) -> torch.Tensor:
    """Input embeddings [T, H] of a flat batch: ids [T] (host) hold the chunks' tokens one after
    another, chunk j being (spans, image embeddings, first position, number of tokens).

    Each image's slice that falls inside a chunk replaces the token embeddings there (a chunk may
    cut through an image's run); placeholder ids themselves are never looked up (they may lie
    outside the vocabulary, as LLaVA's -200 does). The one place image embeddings are spliced.
    """
    mask, splices, off = None, [], 0
    for spans, images, start, n in chunks:
        for s, img in zip(spans, images):
            lo, hi = max(s.offset, start), min(s.end, start + n)
            if lo >= hi:
                continue
            if img.shape[0] != s.length:
                raise PlaceholderMismatchError(f"image embedding has {img.shape[0]} tokens, its span {s.length}")
            if mask is None:
                mask = torch.zeros(ids.shape[0], dtype=torch.bool)
            mask[off + lo - start:off + hi - start] = True
            splices.append((off + lo - start, off + hi - start, img, lo - s.offset, hi - s.offset))
        off += n
    emb = embed_tokens((ids if mask is None else ids.masked_fill(mask, 0)).to(device))
    for a, b, img, i, j in splices:
        emb[a:b] = img[i:j].to(emb.dtype)
    return emb


def _device_of(module) -> torch.device:
    weight = getattr(module, "weight", None)
    return weight.device if weight is not None else torch.device("cpu")
