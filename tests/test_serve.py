"""The Serve application end to end on loopback: the official openai client against the default model."""

import base64
import io
import os
import socket

import pytest
import yaml

from vlm_core.default_model.data import heldout_set

pytestmark = pytest.mark.timeout(300)


API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server():
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    import ray
    from ray import serve

    from deployments.app import build_app

    with open(os.path.join(os.path.dirname(__file__), "..", "serve_config.yaml")) as f:
        app_cfg = yaml.safe_load(f)["applications"][0]
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({**app_cfg["args"], "api_key": API_KEY, "vision_batch_wait_s": 0.05}), name=app_cfg["name"], route_prefix="/",
                  blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


def ask(client, image, question, **kw):
    return client.chat.completions.create(
        model="vlm-serve-default", temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": question}]}], **kw)


def test_openai_client_answers_image_questions(client):
    items = heldout_set(12, seed=5)
    right = 0
    for scene, q, gold in items:
        r = ask(client, scene.image(), q)
        right += r.choices[0].message.content.strip() == gold
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 36 and r.usage.completion_tokens >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert right >= 11


def test_streaming_matches_and_reports_usage(client):
    scene, q, gold = heldout_set(1, seed=6)[0]
    chunks = list(ask(client, scene.image(), q, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == gold
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_same_image_again_hits_the_prefix_cache(client):
    scene, _, _ = heldout_set(1, seed=7)[0]
    ask(client, scene.image(), "How many shapes are there?")
    r = ask(client, scene.image(), "Describe the image.")
    assert r.usage.prompt_tokens_details.cached_tokens >= 32   # the image's 36 tokens span two full blocks


def test_models_and_health(server):
    import httpx

    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert httpx.get(server + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "vlm-serve-default"
    assert httpx.get(server + "/v1/models").status_code == 401


@pytest.mark.parametrize("body,status,message", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
     400, "disabled"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     400, "only allowed under"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}]}]},
     400, "cannot read image"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (15 * 1024 * 1024)}}]}]},
     413, "larger than"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, message):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == status and err["type"] == "invalid_request_error"


def test_api_key_is_required(server):
    import httpx

    body = {"messages": [{"role": "user", "content": "How many shapes are there?"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_python_handle_api(server):
    from ray import serve

    from deployments.protocol import ChatCompletionRequest

    scene, q, gold = heldout_set(1, seed=8)[0]
    import base64 as b64
    buf = io.BytesIO()
    scene.image().save(buf, "PNG")
    req = ChatCompletionRequest(temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64.b64encode(buf.getvalue()).decode()}},
        {"type": "text", "text": q}]}])
    handle = serve.get_app_handle("vlm")
    out = handle.chat.remote(req).result(timeout_s=60)
    assert out.choices[0].message.content.strip() == gold and out.usage.completion_tokens >= 1
    chunks = list(handle.options(stream=True).chat_stream.remote(req))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == gold
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_concurrent_image_requests_are_batched_and_metrics_count(server, client):
    import concurrent.futures

    from ray import serve

    import random

    from vlm_core.default_model.data import make_scene, sample_qa, split_ids

    rng = random.Random(9)
    scenes = [make_scene(i) for i in split_ids("heldout", 8, offset=5000)]   # pictures no other test sent
    items = [(sc, *sample_qa(sc, rng)) for sc in scenes]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda it: ask(client, it[0].image(), it[1]).choices[0].message.content.strip(),
                                items))
    assert sum(a == gold for a, (_, _, gold) in zip(answers, items)) >= 7
    ask(client, items[0][0].image(), "How many shapes are there?")   # same picture again: an encoder-cache hit
    vision = serve.get_deployment_handle("VisionEncoder", "vlm").stats.remote().result(timeout_s=30)
    llm = serve.get_deployment_handle("LLMServer", "vlm").stats.remote().result(timeout_s=30)
    assert vision["largest_batch"] > 1      # images of concurrent requests shared a tower forward
    assert vision["hits"] >= 1
    assert llm["ttft_observations"] == llm["requests"] - llm["aborted"] >= 8
    assert llm["running"] == 0 and llm["free_blocks"] == llm["num_blocks"]
