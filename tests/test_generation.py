"""Streaming, stop conditions and sampling."""

import pytest
import torch

from vlm_core.engine.sampling import SamplingParams, filter_logits, sample
from vlm_core.errors import SamplingParamsError
from vlm_core.engine.detokenizer import IncrementalDetokenizer
from helpers import generate_on

GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def test_stream_concatenates_to_generate_text(vlm, images):
    out = vlm.generate("What colour is the circle?", {"image": images[:1]}, GREEDY)
    deltas = list(vlm.stream("What colour is the circle?", {"image": images[:1]}, GREEDY))
    assert "".join(deltas) == out.text
    assert out.text == vlm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.completion_tokens == 24 and out.finish_reason == "length"
    assert out.prompt_tokens == len(vlm.request("What colour is the circle?", {"image": images[:1]}).prompt)


def test_stop_string_truncates_and_is_never_streamed(vlm, images):
    full = vlm.generate("Describe the image.", {"image": images[:1]}, GREEDY).text
    stop = full[5:8]
    assert len(stop) == 3 and stop in full
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,))
    out = vlm.generate("Describe the image.", {"image": images[:1]}, sp)
    assert out.finish_reason == "stop"
    assert out.text == full[:full.index(stop)]
    assert "".join(vlm.stream("Describe the image.", {"image": images[:1]}, sp)) == out.text


def test_stop_token_id_and_eos_end_generation(vlm, images):
    ids = vlm.generate("Describe the image.", {"image": images[:1]}, GREEDY).token_ids
    target = ids[3]
    out = vlm.generate("Describe the image.", {"image": images[:1]},
                       SamplingParams(max_new_tokens=24, ignore_eos=True, stop_token_ids=(target,)))
    first = ids.index(target)
    assert out.token_ids == ids[:first] and out.finish_reason == "stop"
    # the same token declared as EOS stops too, unless ignore_eos
    engine = vlm.engine()
    engine.eos.add(target)
    stopped = generate_on(engine, [vlm.request("Describe the image.", {"image": images[:1]}, SamplingParams(max_new_tokens=24))])[0]
    ignored = generate_on(engine, [vlm.request("Describe the image.", {"image": images[:1]}, GREEDY)])[0]
    assert stopped.token_ids == ids[:first] and stopped.finish_reason == "stop"
    assert ignored.token_ids == ids


def test_max_new_tokens_is_exact(vlm, images):
    out = vlm.generate("Hi", None, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


class _CharTokenizer:
    """Each id is one byte; decode is utf-8 with replacement, like byte-level BPE on partial characters."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_partial_utf8_and_stop_prefixes():
    det = IncrementalDetokenizer(_CharTokenizer(), stop=("STOP",))
    text = "héllo ST"
    deltas = [det.push(b)[0] for b in text.encode()]
    # 'é' is two bytes: nothing is emitted on its first byte; "ST" is held as a possible stop prefix
    assert deltas[1] == "" and deltas[2] == "é"
    assert "".join(deltas) == "héllo "
    d, hit = det.push(ord("O"))
    assert (d, hit) == ("", False)
    d, hit = det.push(ord("X"))
    assert (d, hit) == ("STOX", False)
    for b in b" STOP more":
        d, hit = det.push(b)
        if hit:
            break
    assert hit and det.text == "héllo STOX "


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    k2 = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(k2).tolist() == [True, True, False, False, False]
    p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    # 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed; the fourth is not
    assert torch.isfinite(p).tolist() == [True, True, True, False, False]
    t = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(t.softmax(-1), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2 /
                          (torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2).sum())


def test_sampling_never_leaves_the_top_k_set():
    logits = torch.randn(1, 50)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    sp = SamplingParams(temperature=2.0, top_k=3, seed=0)
    g = sp.make_generator()
    draws = {sample(logits, [sp], [g])[0] for _ in range(200)}
    assert draws <= allowed and len(draws) == 3


def test_seeded_sampling_is_reproducible_and_top_k1_is_greedy(vlm, images):
    sp = SamplingParams(max_new_tokens=12, temperature=1.5, seed=123, ignore_eos=True)
    a = vlm.generate("What colour is the circle?", {"image": images[:1]}, sp)
    b = vlm.generate("What colour is the circle?", {"image": images[:1]}, sp)
    c = vlm.generate("What colour is the circle?", {"image": images[:1]},
                     SamplingParams(max_new_tokens=12, temperature=1.5, seed=124, ignore_eos=True))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = vlm.generate("What colour is the circle?", {"image": images[:1]}, SamplingParams(max_new_tokens=12, ignore_eos=True))
    top1 = vlm.generate("What colour is the circle?", {"image": images[:1]},
                        SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=5, ignore_eos=True))
    tiny_p = vlm.generate("What colour is the circle?", {"image": images[:1]},
                          SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True))
    assert top1.token_ids == greedy.token_ids == tiny_p.token_ids


def test_seeded_request_is_independent_of_its_batch(vlm, images):
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    alone = vlm.generate("What colour is the circle?", {"image": images[:1]}, sp)
    batch = vlm.generate(["How many shapes?", "What colour is the circle?"], [None, {"image": images[:1]}],
                         [SamplingParams(max_new_tokens=4, temperature=1.0, seed=1, ignore_eos=True), sp])
    assert batch[1].token_ids == alone.token_ids


@pytest.mark.parametrize("kw,msg", [
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"temperature": -1.0}, "temperature must be in"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_bad_sampling_params(kw, msg):
    with pytest.raises(SamplingParamsError, match=msg):
        SamplingParams(**kw)
