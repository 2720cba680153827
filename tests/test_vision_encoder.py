"""VisionEncoder's batch step without Ray (test_serve covers @serve.batch and its image budget)."""

import asyncio

import pytest
import torch

from deployments.vision import VisionEncoder
from vlm_core.default_model import default_model_dir
from vlm_core.default_model.data import heldout_set
from vlm_core.inputs.media import MediaItem
from vlm_core.inputs.prompt import PromptBuilder, pixel_hash
from vlm_core.vlm import VLM

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pixels():
    builder = PromptBuilder.from_pretrained(default_model_dir("awq"))
    return [builder.image_processor([s.image()]) for s, _, _ in heldout_set(5, seed=51)]


def items_of(requests):
    """(media items, hashes) per request; a request is a [N, 3, S, S] stack of one-tile images."""
    out = []
    for p in requests:
        items = [MediaItem(x[None]) for x in p]
        out.append((items, [it.hash for it in items]))
    return out


def test_batch_step_matches_the_model_and_caches_by_content(pixels):
    ref = VLM.from_pretrained(default_model_dir("awq")).model
    enc = VisionEncoder(str(default_model_dir("awq")), device="cpu", cache_size=2, max_batch_images=8)
    assert enc.model.decoder is None            # a vision replica holds no LLM weights
    requests = [torch.cat(pixels[:2]), pixels[2], torch.cat([pixels[0], pixels[3]])]   # pixels[0] twice
    outs = enc.encode_items(items_of(requests))
    for p, got in zip(requests, outs):
        want = ref.embed_images(p)
        assert len(got) == len(p)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    st = enc.stats()
    assert st["images_encoded"] == 4 and st["batches"] == 1 and st["largest_request_batch"] == 3
    assert list(enc.cache) == [pixel_hash(pixels[2][0]), pixel_hash(pixels[3][0])]   # LRU keeps the last two
    again = enc.encode_items(items_of([pixels[3], pixels[4]]))
    torch.testing.assert_close(again[0][0], outs[2][1], rtol=0, atol=0)
    assert enc.stats()["hits"] == 1 and enc.stats()["images_encoded"] == 5

    no_cache = VisionEncoder(str(default_model_dir("awq")), device="cpu", cache_size=0)
    got = no_cache.encode_items(items_of([torch.cat(pixels[:3])]))[0]
    assert len(got) == 3 and len(no_cache.cache) == 0


def test_requests_beyond_the_image_budget_are_refused(pixels):
    enc = VisionEncoder(str(default_model_dir("awq")), device="cpu", max_batch_images=3)
    p = torch.cat(pixels[:4])
    (items, hashes), = items_of([p])
    assert hashes == [pixel_hash(x) for x in p]       # a one-tile item hashes as its pixels
    with pytest.raises(ValueError, match="at most 3"):
        asyncio.run(enc.encode(items, hashes))
