"""Our LLaMA decoder against transformers' LlamaForCausalLM: rope variants, GQA, tied heads, KV use."""

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vlm_core.config import TextConfig
from vlm_core.models.attention import ContiguousKVCache, SeqChunk
from vlm_core.models.llama import LlamaDecoder

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # small original context so all three frequency bands of llama3 occur at head_dim 16
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def make_pair(rope, heads=4, kv_heads=2, tie=False, seed=0):
    hf_cfg = HFLlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, vocab_size=101, max_position_embeddings=256,
                           rope_parameters=ROPES[rope], tie_word_embeddings=tie, initializer_range=0.1,
                           rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_cfg).eval()
    ours = LlamaDecoder(TextConfig.from_hf(hf_cfg.to_dict())).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected
    assert not missing
    if tie:
        ours.lm_head.weight = ours.embed_tokens.weight
    return hf, ours


def run_ours(model, ids, chunk=None, spare=0, return_cache=False):
    """Logits [T, V] for one sequence, prefilled in chunks (and the cache, `spare` slots left)."""
    cfg = model.config
    cache = ContiguousKVCache(cfg.num_layers, 1, len(ids) + spare, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    out, start = [], 0
    chunk = chunk or len(ids)
    with torch.no_grad():
        while start < len(ids):
            n = min(chunk, len(ids) - start)
            h = model(ids[start:start + n], torch.arange(start, start + n), cache.view([SeqChunk(0, start, n)]))
            out.append(model.compute_logits(h))
            start += n
    return (torch.cat(out), cache) if return_cache else torch.cat(out)


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_decoder_logits_equal_hf(rope, heads, kv_heads):
    hf, ours = make_pair(rope, heads, kv_heads)
    ids = torch.randint(0, 101, (150,))  # long enough that llama3's scaled bands matter
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (run_ours(ours, ids) - ref).abs().max().item() <= 1e-4


def test_tied_embeddings_equal_hf():
    hf, ours = make_pair("default", tie=True)
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 101, (20,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (run_ours(ours, ids) - ref).abs().max().item() <= 1e-4


def test_kv_decode_from_start_pos_equals_full_pass():
    _, ours = make_pair("llama3")
    ids = torch.randint(0, 101, (40,))
    full = run_ours(ours, ids)
    one_by_one = run_ours(ours, ids, chunk=1)
    assert (full - one_by_one).abs().max().item() <= 1e-5


def test_rope_inv_freq_llama3_bands():
    """Hand-checked: high-frequency dims unchanged, low-frequency dims divided by the factor."""
    from vlm_core.config import RopeConfig
    from vlm_core.models.layers import rope_inv_freq

    base = rope_inv_freq(16, RopeConfig(theta=500000.0))
    scaled = rope_inv_freq(16, RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64))
    wavelen = 2 * torch.pi / base
    high = wavelen < 64 / 4
    low = wavelen > 64 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    assert torch.equal(scaled[high], base[high])
    assert torch.allclose(scaled[low], base[low] / 8.0)
    mid = ~high & ~low
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all()
