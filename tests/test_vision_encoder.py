"""VisionEncoder's batch step without Ray (test_serve covers @serve.batch and its image budget)."""

import asyncio

import pytest
import torch

from deployments.settings import VisionSettings
from deployments.vision import VisionEncoder, split_by_tiles
from deployments.wire import unpack_tensors
from vlm_core.default_model import default_model_dir
from vlm_core.default_model.data import heldout_set
from vlm_core.inputs.media import MediaItem
from vlm_core.inputs.media import content_hash
from vlm_core.families.llava import LlavaProcessor
from vlm_core.vlm import VLM

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pixels():
    builder = LlavaProcessor.from_pretrained(default_model_dir("awq"))
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
    enc = VisionEncoder(str(default_model_dir("awq")), None, VisionSettings(cache_size=2, max_batch_images=8), "cpu")
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
    assert list(enc.cache) == [content_hash(pixels[2][0]), content_hash(pixels[3][0])]   # LRU keeps the last two
    again = enc.encode_items(items_of([pixels[3], pixels[4]]))
    torch.testing.assert_close(again[0][0], outs[2][1], rtol=0, atol=0)
    assert enc.stats()["hits"] == 1 and enc.stats()["images_encoded"] == 5

    no_cache = VisionEncoder(str(default_model_dir("awq")), None, VisionSettings(cache_size=0), "cpu")
    got = no_cache.encode_items(items_of([torch.cat(pixels[:3])]))[0]
    assert len(got) == 3 and len(no_cache.cache) == 0


def test_requests_beyond_the_tile_budget_are_encoded_in_several_batches(pixels):
    ref = VLM.from_pretrained(default_model_dir("awq")).model
    enc = VisionEncoder(str(default_model_dir("awq")), None, VisionSettings(max_batch_images=3), "cpu")
    p = torch.cat(pixels[:5])
    (items, hashes), = items_of([p])
    assert hashes == [content_hash(x) for x in p]       # a one-tile item hashes as its pixels
    calls = []

    async def one_batch(request):                    # @serve.batch needs a replica; a batch of one here
        calls.append(len(request[0]))
        return enc.encode_items([request])[0]

    enc._encode_batch = one_batch
    got = unpack_tensors(asyncio.run(enc.encode(items, hashes)))
    for g, w in zip(got, ref.embed_images(p), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert calls == [3, 2] and enc.stats()["images_encoded"] == 5


def test_split_by_tiles_keeps_order_and_budget():
    sizes = [1, 14, 14, 1, 3, 16]
    items = [MediaItem(torch.zeros(n, 3, 2, 2)) for n in sizes]
    groups = split_by_tiles(items, [str(i) for i in range(len(items))], 16)
    assert [[it.pixels.shape[0] for it in g] for g, _ in groups] == [[1, 14], [14, 1], [3], [16]]
    assert [h for _, hs in groups for h in hs] == [str(i) for i in range(len(items))]


def test_tile_budget_must_hold_the_largest_media_item(tmp_path):
    from vlm_core.families import family_of
    from vlm_core.families.vila import read_vila_config
    from vlm_core.tiny_vila import build_tiny_vila

    nvila = build_tiny_vila(tmp_path / "nvila", "nvila")
    s2 = build_tiny_vila(tmp_path / "s2", "vila15", s2=True)
    assert family_of(nvila).max_item_tiles(read_vila_config(nvila)[0]) == 1 + 4 + 12   # 1x, 2x, then up to max_tiles
    assert family_of(s2).max_item_tiles(read_vila_config(s2)[0]) == 1 + 4 + 9
    llava = default_model_dir("awq")
    assert family_of(llava).max_item_tiles(VLM.from_pretrained(llava).model.config) == 1
    with pytest.raises(ValueError, match="below the 17 tiles"):
        VisionEncoder(str(nvila), None, VisionSettings(max_batch_images=16), "cpu")
