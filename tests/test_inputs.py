"""Image preprocessing, chat templates and placeholder expansion."""

import pytest
import torch
from PIL import Image

from vlm_core.errors import PlaceholderMismatchError
from vlm_core.inputs.image import CLIP_MEAN, ImageProcessor, ImageProcessorConfig, expand_to_square
from vlm_core.inputs.placeholders import ImageSpan, PlaceholderSpec, chunk_embeddings, expand_placeholders
from vlm_core.inputs.template import render_chat
from vlm_core.tiny import LLAVA_HF_CHAT_TEMPLATE, build_tokenizer, draw_example_image
from vlm_core.scoring import prompt_logits


def hf_clip_processor(**kw):
    try:
        from transformers import CLIPImageProcessorPil as P
    except ImportError:
        from transformers import CLIPImageProcessor as P
    return P(**kw)


@pytest.mark.parametrize("size", [(96, 64), (40, 80), (50, 50), (300, 17)])
def test_clip_preprocessing_equals_hf(tmp_path, size):
    path = draw_example_image(tmp_path / "x.png", seed=7, size=size)
    ours = ImageProcessor(ImageProcessorConfig(shortest_edge=32, crop_size=24))([path])
    hf = hf_clip_processor(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24})
    ref = torch.as_tensor(hf(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"])
    assert ours.shape == ref.shape == (1, 3, 24, 24)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_pad_to_square_uses_mean_colour_and_centres_the_image():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    sq = expand_to_square(img, fill)
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == fill and sq.getpixel((39, 39)) == fill  # padding rows
    assert sq.getpixel((0, 10)) == (255, 0, 0) and sq.getpixel((39, 29)) == (255, 0, 0)  # image rows 10..29
    assert sq.getpixel((0, 9)) == fill and sq.getpixel((0, 30)) == fill
    # with padding the whole red band survives the crop; without it the crop keeps only red
    proc_pad = ImageProcessor(ImageProcessorConfig(16, 16, pad_to_square=True))
    proc_crop = ImageProcessor(ImageProcessorConfig(16, 16))
    red_norm = (1.0 - CLIP_MEAN[0]) / 0.26862954
    assert torch.allclose(proc_crop([img])[0, 0], torch.full((16, 16), red_norm), atol=1e-5)
    padded = proc_pad([img])[0]
    assert torch.allclose(padded[:, 0, 0], torch.zeros(3), atol=2e-2)  # mean colour normalises to ~0
    assert abs(padded[0, 8, 8].item() - red_norm) < 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_llava15_fallback_template_renders_exact_text(tok):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And the square?"}]
    assert tok.chat_template is None
    assert render_chat(tok, msgs) == "USER: <image>\nWhat colour? ASSISTANT: Red.</s>USER: And the square? ASSISTANT:"


def test_tokenizer_chat_template_is_preferred():
    tok = build_tokenizer(chat_template=LLAVA_HF_CHAT_TEMPLATE)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    assert render_chat(tok, msgs) == "USER: <image>\n<image>\nSame? ASSISTANT:"
    custom = build_tokenizer(chat_template="{% for m in messages %}[{{ m.role }}]{% for p in m.content %}"
                             "{% if p.type == 'image' %}<image>{% else %}{{ p.text }}{% endif %}{% endfor %}"
                             "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    assert render_chat(custom, msgs) == "[user]<image><image>Same?[assistant]"


SPEC = PlaceholderSpec(image_token_id=4, tokens_per_image=3, patch_token_id=5)


def test_special_token_expansion_places_runs():
    mm = expand_placeholders([1, 10, 4, 11, 4, 12], 2, SPEC)
    assert mm.token_ids == (1, 10, 4, 4, 4, 11, 4, 4, 4, 12)
    assert mm.spans == (ImageSpan(2, 3), ImageSpan(6, 3))


def test_special_token_expansion_with_start_end_markers():
    spec = PlaceholderSpec(image_token_id=4, tokens_per_image=2, im_start_id=6, im_end_id=7)
    assert expand_placeholders([1, 4, 9], 1, spec).token_ids == (1, 6, 4, 4, 7, 9)
    # markers already written around the placeholder are not doubled
    mm = expand_placeholders([1, 6, 4, 7, 9], 1, spec)
    assert mm.token_ids == (1, 6, 4, 4, 7, 9) and mm.spans == (ImageSpan(2, 2),)


def test_patch_token_runs_are_found():
    mm = expand_placeholders([1, 6, 5, 5, 5, 7, 10, 5, 5, 5, 5, 5, 5], 3, SPEC)
    assert mm.spans == (ImageSpan(2, 3), ImageSpan(7, 3), ImageSpan(10, 3))


def test_already_expanded_image_runs_are_accepted():
    mm = expand_placeholders([1, 4, 4, 4, 9, 4, 4, 4], 2, SPEC)
    assert mm.token_ids == (1, 4, 4, 4, 9, 4, 4, 4) and mm.spans == (ImageSpan(1, 3), ImageSpan(5, 3))


@pytest.mark.parametrize("ids,n,msg", [
    ([1, 4, 9], 2, "prompt has 1 image placeholder but 2 images were given"),
    ([1, 4, 9, 4], 1, "prompt has 2 image placeholders but 1 image was given"),
    ([1, 9], 1, "prompt has 0 image placeholders but 1 image was given"),
    ([1, 5, 5, 9], 1, "a run of 2 patch tokens is not a multiple of the 3 tokens per image"),
    ([1, 4, 5, 5, 5], 1, "prompt mixes image tokens and patch tokens"),
])
def test_placeholder_mismatch_errors(ids, n, msg):
    with pytest.raises(PlaceholderMismatchError, match=msg):
        expand_placeholders(ids, n, SPEC)


def test_chunk_embeddings_splice_any_range():
    emb = torch.nn.Embedding(20, 4)
    mm = expand_placeholders([1, 10, 4, 11], 1, SPEC)  # ids 1 10 [img img img] 11
    img = torch.arange(12, dtype=torch.float32).view(3, 4)
    full = chunk_embeddings(emb, mm, [img], 0, len(mm))
    assert torch.equal(full[2:5], img)
    assert torch.equal(full[[0, 1, 5]], emb(torch.tensor([1, 10, 11])))
    pieces = torch.cat([chunk_embeddings(emb, mm, [img], s, min(s + 2, len(mm))) for s in range(0, len(mm), 2)])
    assert torch.equal(pieces, full)


def test_patch_and_special_token_prompts_give_identical_embeddings(vlm, images):
    n = vlm.spec.tokens_per_image
    special, _ = vlm.processor.prepare("USER: <image>\nWhat colour is the circle? ASSISTANT:", images[:1], apply_template=False)
    patch, _ = vlm.processor.prepare("USER: " + "<im_patch>" * n + "\nWhat colour is the circle? ASSISTANT:", images[:1],
                           apply_template=False)
    assert special.spans == patch.spans and len(special) == len(patch)
    img = list(vlm.model.embed_images(vlm.image_processor(images[:1])))
    with torch.no_grad():
        a = chunk_embeddings(vlm.model.embed_tokens, special, img, 0, len(special))
        b = chunk_embeddings(vlm.model.embed_tokens, patch, img, 0, len(patch))
    assert torch.equal(a, b)
    la = prompt_logits(vlm.model, [vlm.request("USER: <image>\nWhat colour is the circle? ASSISTANT:", {"image": images[:1]},
                                                  apply_template=False)])[0]
    lb = prompt_logits(vlm.model, [vlm.request("USER: " + "<im_patch>" * n + "\nWhat colour is the circle? "
                                                  "ASSISTANT:", {"image": images[:1]}, apply_template=False)])[0]
    assert torch.equal(la, lb)


def test_im_start_end_wrapping_from_config(tmp_path, images):
    from vlm_core.tiny import build_tiny_llava
    from vlm_core.vlm import VLM

    folder = build_tiny_llava(tmp_path / "se", seed=0, extra_config={"mm_use_im_start_end": True})
    m = VLM.from_pretrained(folder)
    start, end = (m.tokenizer.convert_tokens_to_ids(t) for t in ("<im_start>", "<im_end>"))
    mm, _ = m.processor.prepare("What colour is the circle?", images[:1])
    s = mm.spans[0]
    assert mm.token_ids[s.offset - 1] == start and mm.token_ids[s.end] == end
    n = m.spec.tokens_per_image
    patch, _ = m.processor.prepare("USER: <im_start>" + "<im_patch>" * n + "<im_end>\nWhat colour is the circle? ASSISTANT:",
                                images[:1], apply_template=False)
    assert patch.spans == mm.spans and len(patch) == len(mm)


def test_negative_placeholder_id_is_never_looked_up():
    """LLaVA's original IMAGE_TOKEN_INDEX (-200) lies outside the vocabulary."""
    emb = torch.nn.Embedding(20, 4)
    spec = PlaceholderSpec(image_token_id=-200, tokens_per_image=2)
    mm = expand_placeholders([1, -200, 9], 1, spec)
    assert mm.token_ids == (1, -200, -200, 9)
    img = torch.ones(2, 4)
    out = chunk_embeddings(emb, mm, [img], 0, len(mm))
    assert torch.equal(out[1:3], img) and torch.equal(out[[0, 3]], emb(torch.tensor([1, 9])))
