"""The llava-hf loader: key layouts, shards, dtypes, projector types and feature selection."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from vlm_core.families.llava import load as load_llava_hf
from vlm_core.scoring import prompt_logits
from vlm_core.tiny import build_tiny_llava
from vlm_core.vlm import VLM


def keys_of(folder):
    keys = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


def logits_of(vlm, images, text="What colour is the circle?", n_images=1):
    req = vlm.request(text, {"image": images[:n_images]})
    return prompt_logits(vlm.model, [req])[0]


@pytest.mark.parametrize("layout,shards", [("old", 1), ("new", 1), ("old", 3), ("new", 2)])
def test_key_layouts_and_shards_load_identically(tmp_path, vlm, images, layout, shards):
    folder = build_tiny_llava(tmp_path / layout, seed=0, layout=layout, shards=shards)
    keys = keys_of(folder)
    if layout == "old":
        assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
        assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)
    else:
        assert "model.language_model.embed_tokens.weight" in keys and "lm_head.weight" in keys
        assert any(k.startswith("model.vision_tower.vision_model.encoder.") for k in keys)
    if shards > 1:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == shards
    other = VLM.from_pretrained(folder)
    assert torch.equal(logits_of(other, images), logits_of(vlm, images))


def test_old_layout_reproduces_hf_logits(tmp_path, hf_model, images):
    """A checkpoint re-saved in the 'old' layout still reproduces HF's logits."""
    folder = build_tiny_llava(tmp_path / "old", seed=0, layout="old")
    ours = VLM.from_pretrained(folder)
    req = ours.request("What colour is the circle?", {"image": images[:1]})
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([req.prompt.token_ids]),
                       pixel_values=ours.image_processor(images[:1])).logits[0]
    assert (prompt_logits(ours.model, [req])[0] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_and_stays_close(tiny_dir, vlm, images, dtype):
    half = VLM.from_pretrained(tiny_dir, dtype=dtype)
    assert {p.dtype for p in half.model.parameters()} == {dtype}
    ref = logits_of(vlm, images)
    got = logits_of(half, images)
    # rounding of 16-bit weights/activations only: far below the logit scale
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("layer,strategy", [(-1, "full"), ([-3, -1], "default"), (1, "default")])
def test_feature_layer_and_strategy_equal_hf(tmp_path, images, layer, strategy):
    folder = build_tiny_llava(tmp_path / "f", seed=1, feature_layer=layer, strategy=strategy)
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = VLM.from_pretrained(folder)
    expected_tokens = (32 // 8) ** 2 + (1 if strategy == "full" else 0)
    assert ours.model.config.tokens_per_image == expected_tokens
    req = ours.request("Describe the image.", {"image": images[:2]})
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([req.prompt.token_ids]), pixel_values=ours.image_processor(images[:2])).logits[0]
    assert (prompt_logits(ours.model, [req])[0] - ref).abs().max().item() <= 1e-4


def test_vision_tower_runs_only_needed_layers(vlm):
    # tiny tower has 3 layers; feature layer -2 needs the first 2
    tower = vlm.model.vision.tower
    root = getattr(tower, "vision_model", tower)
    assert len(root.encoder.layers) == 2


def test_linear_projector_equals_torch_reference(tmp_path, images):
    folder = build_tiny_llava(tmp_path / "lin", seed=2, projector="linear")
    assert not any("linear_2" in k for k in keys_of(folder))
    ours = VLM.from_pretrained(folder)
    assert len(ours.model.projector) == 1
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    px = ours.image_processor(images[:1])
    with torch.no_grad():
        feats = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        lin = hf.model.multi_modal_projector.linear_1  # loaded from the checkpoint's linear_1
        expected = feats @ lin.weight.T + lin.bias
    assert (ours.model.embed_images(px) - expected).abs().max().item() <= 1e-5


def test_tied_word_embeddings_load(tmp_path, images):
    folder = build_tiny_llava(tmp_path / "tied", seed=3, tie=True)
    assert "lm_head.weight" not in keys_of(folder) and "language_model.lm_head.weight" not in keys_of(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = VLM.from_pretrained(folder)
    dec = ours.model.decoder
    assert dec.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()
    req = ours.request("What colour is the circle?", {"image": images[:1]})
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([req.prompt.token_ids]), pixel_values=ours.image_processor(images[:1])).logits[0]
    assert (prompt_logits(ours.model, [req])[0] - ref).abs().max().item() <= 1e-4


def test_llama3_rope_checkpoint_equals_hf(tmp_path, images):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    folder = build_tiny_llava(tmp_path / "l3", seed=4, rope_parameters=rope)
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = VLM.from_pretrained(folder)
    assert ours.model.config.text.rope.type == "llama3"
    req = ours.request("Describe the two images in detail.", {"image": images[:2]})
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([req.prompt.token_ids]), pixel_values=ours.image_processor(images[:2])).logits[0]
    assert (prompt_logits(ours.model, [req])[0] - ref).abs().max().item() <= 1e-4


def test_legacy_rope_theta_and_rope_scaling_keys_parse():
    from vlm_core.config import TextConfig

    d = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = TextConfig.from_hf(d)
    assert (cfg.rope.type, cfg.rope.theta, cfg.rope.factor, cfg.num_kv_heads, cfg.head_dim) == ("linear", 1234.0, 2.0, 2, 4)


def test_loader_returns_model_on_requested_dtype(tiny_dir):
    m = load_llava_hf(tiny_dir, dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.vision.dtype == torch.bfloat16


def test_loading_one_side_reads_only_its_tensors(tiny_dir, vlm, images, monkeypatch):
    import safetensors

    from vlm_core.families.llava import load

    read = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.inner = real(*a, **kw)

        def __enter__(self):
            self.st = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.st.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.st.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    vision = load(tiny_dir, parts=("vision",))
    assert vision.decoder is None and read and not any("language_model" in k or "lm_head" in k for k in read)
    read.clear()
    llm = load(tiny_dir, parts=("llm",))
    assert llm.vision is None and llm.projector is None
    assert read and not any("vision_tower" in k or "multi_modal_projector" in k for k in read)
    monkeypatch.undo()

    pixels = vlm.processor.prepare("Describe.", images[:1])[1]
    torch.testing.assert_close(vision.embed_images(pixels), vlm.model.embed_images(pixels), rtol=0, atol=0)
    req = vlm.request("What colour is the circle?", {"image": images[:1]})

    torch.testing.assert_close(prompt_logits(llm, [req])[0], prompt_logits(vlm.model, [req])[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="without its vision tower"):
        llm.embed_images(pixels)
    with pytest.raises(ValueError, match="subset"):
        load(tiny_dir, parts=("decoder",))
