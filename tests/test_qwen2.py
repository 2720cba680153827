"""Our Qwen2 decoder against transformers' Qwen2ForCausalLM."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vlm_core.config import TextConfig
from vlm_core.errors import ConfigError
from vlm_core.models.attention import SeqChunk
from vlm_core.models.composed import build_decoder
from vlm_core.models.qwen2 import Qwen2Decoder

from test_llama_decoder import run_ours   # noqa: E402  (tests/ is on sys.path)


def make_pair(tie, seed=0):
    cfg = Qwen2Config(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      tie_word_embeddings=tie, initializer_range=0.2, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():   # random, non-zero biases so their handling is exercised
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    text = TextConfig.from_hf(cfg.to_dict())
    ours = build_decoder(text).eval()
    assert isinstance(ours, Qwen2Decoder) and ours.layers[0].self_attn.o_proj.bias is None
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if tie:
        state.pop("lm_head.weight", None)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    if tie:
        ours.lm_head.weight = ours.embed_tokens.weight
    return hf, ours


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_logits_equal_hf(tie, chunk):
    hf, ours = make_pair(tie)
    ids = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = run_ours(ours, ids, chunk)
    assert (got - ref).abs().max().item() <= 1e-4


def test_16_greedy_tokens_equal_hf_generate():
    hf, ours = make_pair(tie=True, seed=3)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(ids[None], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 12:]
    logits, cache = run_ours(ours, ids, spare=16, return_cache=True)
    seq = list(ids)
    nxt = int(logits[-1].argmax())
    out = []
    with torch.no_grad():
        for _ in range(16):
            out.append(nxt)
            pos = len(seq)
            seq.append(nxt)
            h = ours(torch.tensor([nxt]), torch.tensor([pos]), cache.view([SeqChunk(0, pos, 1)]))
            nxt = int(ours.compute_logits(h)[-1].argmax())
    assert out == ref.tolist()


def test_sliding_window_and_unknown_types_are_refused():
    base = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=10).to_dict()
    with pytest.raises(ConfigError, match="sliding_window"):
        TextConfig.from_hf({**base, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="not supported"):
        TextConfig.from_hf({**base, "model_type": "mistral"})
