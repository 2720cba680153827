"""Decode steps over static, padded buffers (what CUDA graphs replay) give the eager step's logits
and tokens; on a GPU the captured graphs do too."""

import pytest
import torch

import vlm_core.engine.runner as runner_module
from vlm_core.engine.engine import EngineConfig
from vlm_core.engine.graphs import DecodeGraphs, bucket_sizes
from vlm_core.engine.sampling import SamplingParams
from vlm_core.engine.request import EngineRequest

QUESTIONS = ["Hi", "What colour is the circle?", "Compare them.", "How many?", "Describe it.", "Where?", "Why?"]


def record_logits(monkeypatch):
    seen = []
    real = runner_module.sample_async

    def sample(logits, params, generators, history=None):
        seen.append(logits.detach().float().cpu().clone())
        return real(logits, params, generators, history)

    monkeypatch.setattr(runner_module, "sample_async", sample)
    return seen


def run(vlm, reqs, config, static: bool, capture: bool = False):
    engine = vlm.engine(config)
    if static:
        engine.runner.graphs = DecodeGraphs(vlm.model, engine.cache, engine.runner.use_triton, config.max_num_seqs,
                                            engine.max_model_len, scratch_block=engine.blocks.num_blocks,
                                            capture=capture)
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", EngineRequest(r.prompt, r.media_embeds, r.params))
    out = engine.run_to_completion()
    return [[t for o in out[f"r{i}"] for t in o.token_ids] for i in range(len(reqs))], engine


def test_bucket_sizes():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert bucket_sizes(5) == [1, 2, 4, 5] and bucket_sizes(1) == [1]


def test_static_padded_decode_equals_the_eager_step(vlm, images, monkeypatch):
    reqs = [vlm.request(q, {"image": images[:i % 3]}, SamplingParams(max_new_tokens=10, ignore_eos=True))
            for i, q in enumerate(QUESTIONS)]                      # 7 sequences: bucket 8, one padded row
    config = EngineConfig(num_blocks=96, max_num_seqs=12, max_num_batched_tokens=512)
    seen = record_logits(monkeypatch)
    eager, _ = run(vlm, reqs, config, static=False)
    eager_logits = list(seen)
    seen.clear()
    calls = []
    real_run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, out: calls.append(len(out.chunks)) or real_run(self, out))
    static, engine = run(vlm, reqs, config, static=True)
    assert static == eager
    assert len(calls) >= 8 and max(calls) == 7                    # decode steps went through the padded path
    assert len(seen) == len(eager_logits)
    for a, b in zip(eager_logits, seen):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5
    assert engine.blocks.num_free_blocks == 96


def test_only_decode_only_steps_use_the_static_path(vlm, images):
    engine = vlm.engine(EngineConfig(num_blocks=32, max_num_seqs=4))
    graphs = DecodeGraphs(vlm.model, engine.cache, False, 4, engine.max_model_len, engine.blocks.num_blocks, False)
    r = vlm.request("Hi", None, SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.add_request("a", EngineRequest(r.prompt, [], r.params))
    engine.apply_pending()
    prefill = engine.scheduler.schedule()
    assert not graphs.fits(prefill)


def test_cuda_graphs_need_a_cuda_model(vlm):
    with pytest.raises(ValueError, match="CUDA device"):
        vlm.engine(EngineConfig(num_blocks=16, cuda_graphs=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_on_gpu(tiny_dir, monkeypatch):
    from PIL import Image

    from vlm_core.vlm import VLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vlm = VLM.from_pretrained(tiny_dir, dtype="float16", device="cuda", fuse_projections=True)
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    reqs = [vlm.request(q, {"image": [image] if i % 2 else []}, SamplingParams(max_new_tokens=12, ignore_eos=True))
            for i, q in enumerate(QUESTIONS)]
    config = EngineConfig(num_blocks=128, max_num_seqs=16)
    seen = record_logits(monkeypatch)
    eager, _ = run(vlm, reqs, config, static=False)
    eager_logits = list(seen)
    seen.clear()
    graphed, engine = run(vlm, reqs, EngineConfig(num_blocks=128, max_num_seqs=16, cuda_graphs=True), static=False)
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs      # captured and replayed
    assert graphed == eager
    for a, b in zip(eager_logits, seen):
        assert (a - b).abs().max().item() <= 2e-2
