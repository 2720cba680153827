"""Log-probabilities, penalties, min_tokens and logit_bias through the engine, against transformers'
logits (fp32, the tiny llava-hf checkpoint with one image)."""

from dataclasses import replace

import pytest
import torch

from vlm_core.engine.engine import EngineConfig

from vlm_core.engine.params import MAX_LOGPROBS, SamplingParams
from vlm_core.engine.sampling import SamplingHistory, process_logits
from vlm_core.errors import SamplingParamsError

QUESTION = "Describe the image."
STEPS = 10


@pytest.fixture(scope="module")
def inputs(vlm, images):
    req = vlm.request(QUESTION, {"image": images[:1]})
    return req, vlm.image_processor(images[:1])


def hf_logits(hf_model, ids: list[int], pixels) -> torch.Tensor:
    """Next-token logits [V] of transformers' model after `ids`."""
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].float()


def reference_greedy(hf_model, req, pixels, steps: int, adjust) -> list[int]:
    """Greedy decoding over transformers' logits, each step's logits changed by adjust(logits, generated)."""
    ids, out = list(req.prompt.token_ids), []
    for _ in range(steps):
        t = int(adjust(hf_logits(hf_model, ids, pixels), out).argmax())
        out.append(t)
        ids.append(t)
    return out


def run(vlm, req, **kw):
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", STEPS), ignore_eos=kw.pop("ignore_eos", True),
                            **kw)
    return vlm.generate(req, sampling=params)


def test_greedy_logprobs_equal_transformers_log_softmax(vlm, hf_model, inputs):
    req, pixels = inputs
    out = run(vlm, req, logprobs=5)
    assert len(out.logprobs) == len(out.token_ids) == STEPS
    ids = list(req.prompt.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        ref = torch.log_softmax(hf_logits(hf_model, ids, pixels), -1)
        assert lp.token_id == tok
        assert abs(lp.logprob - ref[tok].item()) <= 1e-4
        assert [t for t, _ in lp.top] == ref.topk(5).indices.tolist()
        assert max(abs(v - ref[t].item()) for t, v in lp.top) <= 1e-4
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0][0] == tok                      # greedy: the chosen token is the most likely
        ids.append(tok)
    assert run(vlm, req, logprobs=0).logprobs[0].top == ()
    assert run(vlm, req).logprobs is None


def _prompt_scores(vlm, engine, req, k, n=1):
    engine.add_request("p", replace(req, params=SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=k,
                                                               n=n, temperature=1.0 if n > 1 else 0.0, seed=1)))
    outs = engine.run_to_completion()["p"]
    return outs, [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]


def test_prompt_logprobs_equal_transformers_log_softmax(vlm, hf_model, inputs):
    """Every prompt token after the first, scored by the logits before it, equals transformers'
    log_softmax — also when the prompt is prefilled in small chunks, when its blocks are already
    in the prefix cache (they are computed again), and for choice 0 alone of n."""
    req, pixels = inputs
    ids = list(req.prompt.token_ids)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float(), -1)
    engine = vlm.engine(EngineConfig(num_blocks=128, block_size=4, max_num_batched_tokens=7))
    _, got = _prompt_scores(vlm, engine, req, 3)
    assert len(got) == 1 and len(got[0]) == len(ids) - 1
    for j, e in enumerate(got[0], start=1):
        row, tok = ref[j - 1], ids[j]
        assert e.token_id == tok and abs(e.logprob - row[tok].item()) <= 1e-4
        assert (row > row[tok] + 1e-4).sum() + 1 <= e.rank <= (row > row[tok] - 1e-4).sum() + 1
        assert [t for t, _ in e.top] == row.topk(3).indices.tolist()
        assert max(abs(v - row[t].item()) for t, v in e.top) <= 1e-4
    hits = engine.blocks.stats.prefix_hits
    outs, again = _prompt_scores(vlm, engine, req, 3)
    assert again == got and outs[-1].cached_tokens == 0 and engine.blocks.stats.prefix_hits == hits
    outs, shared = _prompt_scores(vlm, engine, req, 0, n=3)
    assert len(shared) == 1 and [e.top for e in shared[0]] == [()] * (len(ids) - 1)
    assert [(e.token_id, e.rank) for e in shared[0]] == [(e.token_id, e.rank) for e in got[0]]
    assert {o.index for o in outs if o.prompt_logprobs is not None} == {0}
    assert run(vlm, req).prompt_logprobs is None


def test_prompt_logprobs_survive_preemption(vlm, images):
    """Sequences preempted while prefilling compute their prompt again; their scores come out once
    and equal a run with room to spare."""
    reqs = [vlm.request(f"Describe the image, {w}.", {"image": images[i:i + 1]},
                        SamplingParams(max_new_tokens=12, ignore_eos=True, prompt_logprobs=1))
            for i, w in enumerate(["briefly", "in detail", "please"])]

    def scores(config):
        engine = vlm.engine(config)
        for i, r in enumerate(reqs):
            engine.add_request(str(i), r)
        got = engine.run_to_completion()
        return engine, [[o.prompt_logprobs for o in got[str(i)] if o.prompt_logprobs is not None] for i in range(3)]

    _, roomy = scores(EngineConfig(num_blocks=256, block_size=4))
    tight, squeezed = scores(EngineConfig(num_blocks=-(-(len(reqs[0].prompt) + 14) // 4) + 1, block_size=4,
                                          max_num_batched_tokens=8))
    assert tight.scheduler.num_preemptions > 0
    assert all(len(s) == 1 and len(s[0]) == len(r.prompt) - 1 for s, r in zip(squeezed, reqs))
    assert [[(e.token_id, e.rank, [t for t, _ in e.top]) for e in s[0]] for s in squeezed] == \
        [[(e.token_id, e.rank, [t for t, _ in e.top]) for e in s[0]] for s in roomy]
    for a, b in zip(squeezed, roomy):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a[0], b[0])) <= 1e-5


def test_repetition_penalty_equals_transformers_generate(vlm, hf_model, inputs):
    req, pixels = inputs
    ours = run(vlm, req, repetition_penalty=1.8).token_ids
    with torch.no_grad():
        g = hf_model.generate(input_ids=torch.tensor([req.prompt.token_ids]), pixel_values=pixels, do_sample=False,
                              max_new_tokens=STEPS, min_new_tokens=STEPS, repetition_penalty=1.8,
                              pad_token_id=vlm.tokenizer.pad_token_id)
    assert ours == g[0, len(req.prompt):].tolist()
    assert ours != run(vlm, req).token_ids           # the penalty changed the answer


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.2), (0.7, 0.9), (-1.0, 0.0)])
def test_presence_and_frequency_penalties_equal_a_reference_loop(vlm, hf_model, inputs, presence, frequency):
    req, pixels = inputs

    def adjust(logits, generated):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - frequency * counts - presence * (counts > 0)

    ours = run(vlm, req, presence_penalty=presence, frequency_penalty=frequency).token_ids
    assert ours == reference_greedy(hf_model, req, pixels, STEPS, adjust)


def test_min_tokens_holds_back_eos_and_stop_tokens(vlm, hf_model, inputs):
    req, pixels = inputs
    stop = run(vlm, req, max_new_tokens=1).token_ids[0]       # the greedy first token, made a stop token
    assert run(vlm, req, ignore_eos=False, stop_token_ids=(stop,)).completion_tokens == 0
    banned = sorted(set(vlm.eos_token_ids) | {stop})
    k = 6

    def adjust(logits, generated):
        if len(generated) < k:
            logits = logits.clone()
            logits[banned] = float("-inf")
        return logits

    held = run(vlm, req, ignore_eos=False, stop_token_ids=(stop,), min_tokens=k, max_new_tokens=k)
    assert held.token_ids == reference_greedy(hf_model, req, pixels, k, adjust)
    assert stop not in held.token_ids and held.finish_reason == "length"


def test_logit_bias_forces_and_forbids_tokens(vlm, hf_model, inputs):
    req, pixels = inputs
    forced = vlm.tokenizer.convert_tokens_to_ids("blue")
    assert run(vlm, req, logit_bias={forced: 100.0}).token_ids == [forced] * STEPS
    first = run(vlm, req, max_new_tokens=1).token_ids[0]
    second = int(hf_logits(hf_model, list(req.prompt.token_ids), pixels).topk(2).indices[1])
    assert run(vlm, req, max_new_tokens=1, logit_bias={first: -100.0}).token_ids == [second]


def test_processors_leave_other_rows_alone():
    """In a batch, a row without processing keeps its logits bit for bit."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(presence_penalty=2.0, repetition_penalty=1.5,
                                                logit_bias={3: 5.0}), SamplingParams()]
    hist = SamplingHistory([[1, 2], [4, 4, 7], [9]], [[5], [6, 8], [0]], eos_token_ids=(2,))
    out = process_logits(logits, params, hist)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    row = logits[1].clone()
    row[3] += 5.0
    for t in (4, 6, 7, 8):
        row[t] = row[t] * 1.5 if row[t] < 0 else row[t] / 1.5
    row[[4, 7]] -= 2.0
    torch.testing.assert_close(out[1], row)


@pytest.mark.parametrize("kw,msg", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in"),
    ({"min_tokens": 300}, "min_tokens must be in"),
    ({"logit_bias": {5: 101.0}}, "logit_bias values"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs must be in"),
    ({"prompt_logprobs": -1}, "prompt_logprobs must be in"),
])
def test_bad_values_are_refused(kw, msg):
    with pytest.raises(SamplingParamsError, match=msg):
        SamplingParams(**kw)
