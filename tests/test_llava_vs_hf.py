"""Our LlavaModel + generation against transformers' LlavaForConditionalGeneration (fp32)."""

import pytest
import torch

from vlm_core.engine.engine import EngineConfig
from vlm_core.engine.sampling import SamplingParams
from helpers import generate_on
from vlm_core.scoring import prompt_logits

LOGIT_TOL = 1e-4
CHUNK_TOL = 1e-5

CASES = {
    "text_only": [("Describe a red circle and a blue square.", 0)],
    "one_image": [("What colour is the circle?", 1)],
    "two_images": [("Is the square left of the triangle in both pictures?", 2)],
    "batch_of_three": [("What colour is the circle?", 1), ("How many shapes?", 0),
                       ("Describe the two images.", 2)],
}


def build_requests(vlm, images, case, sampling=None):
    reqs, pixels, k = [], [], 0
    for text, n in CASES[case]:
        ims = images[k:k + n] if n else []
        k = (k + n) % len(images)
        req = vlm.request(text, {"image": ims}, sampling)
        reqs.append(req)
        if n:
            pixels.append(vlm.image_processor(ims))
    return reqs, (torch.cat(pixels) if pixels else None)


def hf_batch_inputs(reqs, pad_id):
    """Left-padded ids, attention mask and mask-derived position ids, as HF batching expects."""
    width = max(len(r.prompt) for r in reqs)
    ids = torch.full((len(reqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):
        n = len(r.prompt)
        ids[i, width - n:] = torch.tensor(r.prompt.token_ids)
        mask[i, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_logits_equal_hf(vlm, hf_model, images, case):
    reqs, pixels = build_requests(vlm, images, case)
    ours = prompt_logits(vlm.model, reqs)
    ids, mask, pos = hf_batch_inputs(reqs, vlm.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).logits
    for i, r in enumerate(reqs):
        n = len(r.prompt)
        assert ours[i].shape == (n, hf_model.config.text_config.vocab_size)
        diff = (ours[i] - ref[i, -n:]).abs().max().item()
        assert diff <= LOGIT_TOL, f"request {i}: max |ours - hf| = {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_16_tokens_equal_hf_generate(vlm, hf_model, images, case):
    reqs, pixels = build_requests(vlm, images, case, SamplingParams(max_new_tokens=16, ignore_eos=True))
    ours = vlm.generate(reqs)
    for i, r in enumerate(reqs):
        # HF generate one prompt at a time (its own padding-free path) ...
        n_img = len(r.media_embeds)
        start = sum(len(x.media_embeds) for x in reqs[:i])
        px = pixels[start:start + n_img] if n_img else None
        ids = torch.tensor([r.prompt.token_ids])
        extra = {"pixel_values": px} if n_img else {}
        g = hf_model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=vlm.tokenizer.pad_token_id, **extra)
        expected = g[0, ids.shape[1]:].tolist()
        assert ours[i].token_ids == expected
        assert ours[i].finish_reason == "length"
        assert len(expected) == 16
    if len(reqs) > 1:
        # ... and batched with left padding: same tokens again.
        ids, mask, _ = hf_batch_inputs(reqs, vlm.tokenizer.pad_token_id)
        g = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=16,
                              min_new_tokens=16, do_sample=False, pad_token_id=vlm.tokenizer.pad_token_id)
        assert [row[ids.shape[1]:].tolist() for row in g] == [o.token_ids for o in ours]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_matches_one_shot(vlm, images, chunk):
    reqs, _ = build_requests(vlm, images, "batch_of_three")
    reqs.append(vlm.request("Compare these four pictures.", {"image": [images[0], images[1], images[2], images[0]]}))
    one_shot = prompt_logits(vlm.model, reqs)
    chunked = prompt_logits(vlm.model, reqs, chunk_size=chunk)
    # the chunk grid cuts through an image's placeholder run in these prompts
    spans = [s for r in reqs for s in r.prompt.spans]
    assert any(s.offset // chunk != (s.end - 1) // chunk for s in spans)
    for a, b in zip(one_shot, chunked):
        assert (a - b).abs().max().item() <= CHUNK_TOL


def test_chunked_prefill_generation_equals_one_shot(vlm, images):
    reqs, _ = build_requests(vlm, images, "batch_of_three", SamplingParams(max_new_tokens=8, ignore_eos=True))
    a = vlm.generate(reqs)
    b = generate_on(vlm.engine(EngineConfig(max_num_batched_tokens=5)), reqs)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_incremental_decoding_matches_full_forward(vlm, images):
    """Logits of decode steps from start_pos equal the logits of the whole sequence in one pass."""
    req = vlm.request("What colour is the circle?", {"image": images[:1]}, SamplingParams(max_new_tokens=6, ignore_eos=True))
    out = vlm.generate([req])[0]
    from vlm_core.engine.request import EngineRequest
    from vlm_core.inputs.placeholders import MultimodalPrompt

    full = EngineRequest(MultimodalPrompt(req.prompt.token_ids + tuple(out.token_ids), req.prompt.spans),
                             req.media_embeds)
    logits = prompt_logits(vlm.model, [full])[0]
    n = len(req.prompt)
    # greedy token at each step = argmax of the full-pass logits at the previous position
    assert logits[n - 1:n - 1 + len(out.token_ids)].argmax(-1).tolist() == out.token_ids


def test_batch_api_equals_single_requests(vlm, images):
    sp = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompts = ["What colour is the circle?", "How many shapes?", "Describe both."]
    ims = [images[:1], [], images[1:3]]
    batch = vlm.generate(prompts, [{"image": im} for im in ims], sp)
    single = [vlm.generate(p, {"image": im}, sp) for p, im in zip(prompts, ims)]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.text for b in batch] == [s.text for s in single]


def test_raw_text_prompt_equals_transformers_text_only_generate(vlm, hf_model):
    """What /v1/completions serves: a text prompt tokenized as it is (no chat template), greedy."""
    text = "A red circle and a blue square are"
    out = vlm.generate(text, None, SamplingParams(max_new_tokens=12, ignore_eos=True), apply_template=False)
    ids = vlm.tokenizer(text)["input_ids"]
    assert list(vlm.request(text, apply_template=False).prompt.token_ids) == ids
    with torch.no_grad():
        g = hf_model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=vlm.tokenizer.pad_token_id)
    assert out.token_ids == g[0, len(ids):].tolist()
    assert out.text == vlm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
