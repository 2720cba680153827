"""Fused q/k/v and gate/up projections (dense, AWQ, Qwen2 with q/k/v biases) give the logits and
tokens of the unfused model; a fused model refuses to be saved or edited by the old names."""

import pytest

from vlm_core.engine.engine import EngineConfig
from vlm_core.engine.sampling import SamplingParams
from vlm_core.scoring import prompt_logits
from vlm_core.vlm import VLM
from vlm_core.engine.request import EngineRequest


def both(folder):
    return VLM.from_pretrained(folder, dtype="float32"), VLM.from_pretrained(folder, dtype="float32",
                                                                            fuse_projections=True)


def check_equal(plain, fused, images):
    reqs = [plain.request("Describe the image.", {"image": images[:1]}, SamplingParams(max_new_tokens=8, ignore_eos=True)),
            plain.request("Hi", None, SamplingParams(max_new_tokens=8, ignore_eos=True))]
    for a, b in zip(prompt_logits(plain.model, reqs), prompt_logits(fused.model, reqs)):
        assert (a - b).abs().max().item() <= 1e-5
    tokens = [[o.token_ids for o in v.generate(reqs)] for v in (plain, fused)]
    assert tokens[0] == tokens[1]
    layer = fused.model.decoder.layers[0]
    assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    assert layer.mlp.gate_up_proj is not None and not hasattr(layer.mlp, "up_proj")


def test_dense_llava(tiny_dir, images):
    check_equal(*both(tiny_dir), images)


def test_awq_llava(tmp_path, images):
    from vlm_core.default_model import default_model_dir

    plain, fused = both(default_model_dir("awq"))
    check_equal(plain, fused, images)
    from vlm_core.quant.awq_linear import AWQLinear

    qkv = fused.model.decoder.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, AWQLinear) and qkv.out_features == sum(fused.model.decoder.layers[0].self_attn.split)


def test_qwen2_biases_and_saving_refused(tmp_path, images):
    from vlm_core.tiny_vila import build_tiny_vila

    folder = build_tiny_vila(tmp_path / "nvila", "nvila", seed=3)
    plain, fused = both(folder)
    assert plain.model.decoder.layers[0].self_attn.q_proj.bias is not None
    check_equal(plain, fused, images)
    with pytest.raises(ValueError, match="fuse_projections=False"):
        fused.save_pretrained(tmp_path / "out")


def test_engine_on_a_fused_model_matches_unfused(tiny_dir, images):
    plain, fused = both(tiny_dir)
    reqs = [plain.request(q, {"image": images[:n]}, SamplingParams(max_new_tokens=6, ignore_eos=True))
            for n, q in enumerate(["Hi", "What colour?", "Compare."])]
    got = []
    for v in (plain, fused):
        engine = v.engine(EngineConfig(num_blocks=64, max_num_batched_tokens=16))
        for i, r in enumerate(reqs):
            engine.add_request(f"r{i}", EngineRequest(r.prompt, r.media_embeds, r.params))
        out = engine.run_to_completion()
        got.append([[t for o in out[f"r{i}"] for t in o.token_ids] for i in range(3)])
    assert got[0] == got[1]
