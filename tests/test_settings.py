"""The application's settings: the YAML's nested `args` validated in one place, each deployment's
Serve options derived once from its section."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.settings import AppSettings, LLMSettings, merge
from vlm_core.engine.engine import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_serve_config_args_are_app_settings():
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    s = AppSettings(**args)
    assert s.llm.engine == EngineConfig(max_num_batched_tokens=2048, max_num_seqs=64)
    llm = s.serve_options("LLMServer", gpus_present=False)
    router = llm.pop("request_router_config")
    assert llm == {"max_ongoing_requests": 64 + 256, "ray_actor_options": {"num_cpus": 0.5}}
    # the cache-aware router, keyed on the engine's own block size
    assert router.request_router_class == "deployments.routing.CacheAffinityRouter"
    assert router.request_router_kwargs == {"keys": "prompt_blocks", "block_size": 16, "imbalance": 8,
                                            "index_size": 100_000}
    assert s.serve_options("LLMServer", gpus_present=True)["ray_actor_options"] == {"num_gpus": 1.0}
    vision = s.serve_options("VisionEncoder", gpus_present=True)
    assert vision.pop("request_router_config").request_router_kwargs["keys"] == "media"
    assert vision == {"max_ongoing_requests": 64, "ray_actor_options": {"num_gpus": 0.25}}
    assert s.serve_options("Ingress", gpus_present=True) == {"max_ongoing_requests": 1024}
    # Serve's default router instead, and the block size followed
    other = AppSettings(llm={"routing": {"policy": "power_of_two"}}, vision={"routing": {"imbalance": 2}})
    assert "request_router_config" not in other.serve_options("LLMServer", gpus_present=False)
    assert other.serve_options("VisionEncoder", False)["request_router_config"].request_router_kwargs["imbalance"] == 2
    assert AppSettings(llm={"engine": {"block_size": 32}}).serve_options("LLMServer", False)[
        "request_router_config"].request_router_kwargs["block_size"] == 32


def test_derived_options_follow_their_section_and_yield_to_explicit_ones():
    s = AppSettings(llm={"engine": {"max_num_seqs": 8}, "max_waiting_requests": 4, "resources": {"llm": 1},
                         "routing": {"policy": "power_of_two"}},
                    deployments={"LLMServer": {"max_queued_requests": 3}})
    assert s.serve_options("LLMServer", gpus_present=True) == {
        "max_ongoing_requests": 12, "ray_actor_options": {"num_gpus": 1.0, "resources": {"llm": 1}},
        "max_queued_requests": 3}
    assert LLMSettings(max_waiting_requests=None).max_in_flight is None


@pytest.mark.parametrize("args,message", [
    ({"ingress": {"max_image": 3}}, "max_image"),                                  # a typo is named
    ({"max_images": 3}, "max_images"),                                             # a key outside its section
    ({"llm": {"engine": {"max_num_seq": 4}}}, "max_num_seq"),
    ({"llm": {"engine": {"attention": "flash"}}}, "attention must be"),
    ({"vision": {"max_batch_images": 4}, "ingress": {"max_images": 8}}, "must be at least ingress.max_images"),
    ({"deployments": {"Decoder": {}}}, "unknown deployments"),
    ({"llm": {"engine": {"max_num_seqs": 64}, "max_waiting_requests": 256},
      "deployments": {"LLMServer": {"max_ongoing_requests": 100}}}, "below engine.max_num_seqs"),
    ({"ingress": {"max_concurrent_requests": 0}}, "greater than or equal to 1"),
    ({"llm": {"routing": {"policy": "random"}}}, "cache_affinity"),
    ({"vision": {"routing": {"imbalanse": 3}}}, "imbalanse"),
])
def test_bad_settings_are_refused_with_their_name(args, message):
    with pytest.raises(ValidationError, match=message):
        AppSettings(**args)


def test_overrides_merge_section_by_section():
    base = {"ingress": {"api_key": "a", "max_images": 8}, "llm": {"engine": {"max_num_seqs": 64}}}
    assert merge(base, {"ingress": {"api_key": "b"}, "llm": {"engine": {"block_size": 8}}}) == {
        "ingress": {"api_key": "b", "max_images": 8}, "llm": {"engine": {"max_num_seqs": 64, "block_size": 8}}}


def test_settings_pickle_as_they_are():
    import pickle

    s = AppSettings(llm={"engine": {"max_num_seqs": 3}})
    assert pickle.loads(pickle.dumps(s.llm)) == s.llm
