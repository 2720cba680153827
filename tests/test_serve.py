"""The Serve application end to end on loopback: the official openai client against the default model."""

import base64
import io
import json
import os
import time

import pytest

from helpers import data_url, local_serve
from vlm_core.default_model.data import heldout_set

pytestmark = pytest.mark.timeout(300)


API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    from deployments.app import DEPLOYMENTS

    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}   # stats() then sees every request
    with local_serve({"ingress": {"api_key": API_KEY, "body_timeout_s": 2}, "vision": {"batch_wait_s": 0.05},
                      "deployments": {d: one for d in DEPLOYMENTS}}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


def image_message(image, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": question}]}]


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
        assert r.usage.prompt_tokens > 64 and r.usage.completion_tokens >= 1
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
    assert r.usage.prompt_tokens_details.cached_tokens >= 64   # the image's 64 tokens and the text before them: four full blocks


def test_models_and_health(server):
    import httpx

    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert httpx.get(server + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "vlm-serve-default"
    assert httpx.get(server + "/v1/models").status_code == 401


def bomb_png(width=20000, height=20000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb: tiny file, huge image)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * width
    idat = zlib.compress(row * 64, 9)        # the first rows only; the header is what counts
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def png_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def small_png() -> bytes:
    buf = io.BytesIO()
    heldout_set(1, seed=3)[0][0].image().save(buf, "PNG")
    return buf.getvalue()


HOSTILE = [
    ("empty messages", {"messages": []}, 400, "messages"),
    ("temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ("max_tokens 0", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -3", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ("invalid base64", {"messages": [{"role": "user", "content": [image_part("data:image/png;base64,@@")]}]},
     400, "not valid base64"),
    ("http off", {"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]},
     400, "disabled"),
    ("file outside allowlist", {"messages": [{"role": "user", "content": [image_part("file:///etc/passwd")]}]},
     400, "only allowed under"),
    ("not an image", {"messages": [{"role": "user", "content": [image_part(png_url(b"nope"))]}]},
     400, "not a picture in a format this server reads"),
    ("oversized bytes", {"messages": [{"role": "user", "content": [
        image_part("data:image/png;base64," + "A" * (15 * 1024 * 1024))]}]}, 413, "larger than"),
    ("decompression bomb", {"messages": [{"role": "user", "content": [image_part(png_url(bomb_png()))]}]},
     413, "pixel"),
    ("too many images", {"messages": [{"role": "user", "content": [image_part(png_url(small_png()))] * 9
                                       + [{"type": "text", "text": "Describe the image."}]}]}, 400, "at most 8"),
    ("video to a LLaVA model", {"messages": [{"role": "user", "content": [
        {"type": "video", "video": {"frames": [png_url(small_png())] * 2}}]}]}, 400, "images only"),
    ("65 video frames to a LLaVA model", {"messages": [{"role": "user", "content": [
        {"type": "video", "video": {"frames": [png_url(small_png())] * 65}}]}]}, 400, "images only"),
    ("16 huge video frames to a LLaVA model", {"messages": [{"role": "user", "content": [
        {"type": "video", "video": {"frames": [png_url(bomb_png(8192, 8192))] * 16}}]}]}, 400, "images only"),
    ("thin picture", {"messages": [{"role": "user", "content": [image_part(png_url(bomb_png(1, 1_000_000)))]}]},
     400, "200:1"),
    ("request pixel budget", {"messages": [{"role": "user", "content": [
        image_part(png_url(bomb_png(6000, 6000))), image_part(png_url(bomb_png(6000, 6000)))]}]}, 413, "per request"),
    ("characters before tokens", {"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "characters of text"),
    ("seed beyond 64 bits", {"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}, 400, "seed"),
    ("longer than context", {"messages": [{"role": "user", "content": "circle " * 300}]}, 400, "context"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
]

HI = [{"role": "user", "content": "hi"}]
# OpenAI fields not served are refused by name, never ignored: (field, value, words of the message)
REFUSED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "no tool-calling format"),
    ("tool_choice", "required", "needs tools"), ("functions", [{"name": "f"}], "functions"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"), ("modalities", ["text", "audio"], "text output"),
    ("prediction", {"type": "content", "content": "x"}, "predicted"), ("store", True, "nothing is stored"),
    ("reasoning_effort", "high", "reason"), ("stream_options", {"include_usage": True}, "only allowed with stream"),
    ("top_logprobs", 2, "needs logprobs"),
    ("response_format", {"type": "json_schema"}, "needs json_schema.schema"),
    ("structured_outputs", {"choice": ["a"], "regex": "a+"}, "exactly one of"),
]
INVALID = [("n", 100000000, "n"), ("top_logprobs", 30, "top_logprobs"), ("presence_penalty", 3, "presence_penalty"),
           ("logit_bias", {"x": 1}, "logit_bias"), ("max_tokens", 10 ** 6, "max_tokens"),
           ("prompt_logprobs", 21, "prompt_logprobs"), ("priority", 2 ** 40, "priority")]


@pytest.mark.parametrize("name,body,status,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_inputs_get_their_4xx_and_the_next_request_succeeds(server, client, name, body, status, message):
    import httpx

    start = time.perf_counter()
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert time.perf_counter() - start < 5          # refused before the work, not after it
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == status and err["type"] == "invalid_request_error"
    assert "<" not in err["message"] and "Traceback" not in r.text     # no object reprs, no tracebacks
    scene, q, gold = heldout_set(1, seed=11)[0]
    assert ask(client, scene.image(), q, max_tokens=8).choices[0].message.content.strip() == gold


RAW = [
    ("truncated JSON", b'{"messages": [', 400, "not valid JSON"),
    ("deep JSON", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "JSON"),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "JSON"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "unpaired surrogate"),
    ("lone surrogate in a part", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     400, "unpaired surrogate"),
]


@pytest.mark.parametrize("name,raw,status,message", RAW, ids=[r[0] for r in RAW])
def test_undecodable_bodies_get_a_400_in_openai_shape(server, name, raw, status, message):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", content=raw, timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["code"] == status and set(r.json()) == {"error"}


def test_request_body_limit_is_enforced_before_parsing(server):
    import httpx

    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (40 * 1024 * 1024) + b'"}]}'
    start = time.perf_counter()
    r = httpx.post(server + "/v1/chat/completions", content=big, timeout=60,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "at most 33554432" in r.json()["error"]["message"]

    def chunks():   # no Content-Length: the cap holds while reading
        for _ in range(40):
            yield b"a" * (1024 * 1024)

    r = httpx.post(server + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "larger than 33554432" in r.json()["error"]["message"]
    assert time.perf_counter() - start < 20


def test_a_trickled_body_is_cut_off_with_408(server):
    import socket

    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": ")
        start = time.perf_counter()
        answer = b""
        while b"did not arrive" not in answer:      # the head and the body may come in separate reads
            part = s.recv(65536)
            if not part:
                break
            answer += part
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "did not arrive within 2 s" in answer and time.perf_counter() - start < 10


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    import httpx

    r = httpx.get(server + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nothing"
    r = httpx.get(server + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]


def test_api_key_guards_every_route_but_health(server):
    import httpx

    body = {"messages": [{"role": "user", "content": "How many shapes are there?"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": f"Bearer {API_KEY}x"}, {"Authorization": API_KEY}):
        r = httpx.post(server + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/v1/nothing"):
        assert httpx.get(server + path).status_code == 401, path
        assert httpx.get(server + path, headers=AUTH).status_code in (200, 404), path
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"{scheme} {API_KEY}"},
                       timeout=60)
        assert r.status_code == 200, scheme
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_openapi_document_lists_the_real_answers(server):
    import httpx

    doc = httpx.get(server + "/openapi.json", headers=AUTH).json()
    assert "422" not in json.dumps(doc["paths"]) and "HTTPValidationError" not in json.dumps(doc)
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(op["responses"]) == {"200", "400", "401", "404", "408", "413", "500", "503"}
    for status in ("400", "401", "413", "503"):
        assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion") and "text/event-stream" in ok
    models = doc["paths"]["/v1/models"]["get"]["responses"]
    assert models["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ModelList")


FUZZ_EXAMPLES = int(os.environ.get("VLM_FUZZ_EXAMPLES", "100"))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_answers_match_the_schema(server, mode):
    """Requests generated from /openapi.json, valid and invalid, for every route: never a 5xx,
    and every answer as the document describes it (status listed, body matching its schema)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(server + "/openapi.json", headers=AUTH)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {o.path for o in operations} == {"/health", "/version", "/v1/models", "/v1/models/{model}",
                                            "/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize",
                                            "/detokenize"}
    for op in operations:
        if mode == "negative" and op.method.upper() == "GET":   # nothing to send wrong on a bare GET
            continue

        @given(case=op.as_strategy(GenerationMode(mode)))
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call_and_validate(headers={**(case.headers or {}), **AUTH}, timeout=60,
                                              checks=[not_a_server_error, response_schema_conformance])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        statuses: dict[int, int] = {}
        fuzz()
        # a bare GET has one possible request; the chat route gets many
        assert sum(statuses.values()) >= (1 if op.method.upper() == "GET" else min(FUZZ_EXAMPLES, 5)), statuses
        assert max(statuses) < 500, (op.path, statuses)
        print(mode, op.method, op.path, dict(sorted(statuses.items())))


def test_values_below_fp32_beside_three_streams_leave_them_running(server, client):
    """A request whose sampling values underflow fp32 (once able to fail every request in flight)
    gets its greedy answer, and three concurrent image streams finish normally."""
    import concurrent.futures

    import httpx

    scenes = heldout_set(3, seed=21)
    started = [__import__("threading").Event() for _ in scenes]

    def stream(i):
        scene, q, _ = scenes[i]
        body = {"messages": image_message(scene.image(), q), "stream": True, "max_tokens": 60, "ignore_eos": True,
                "temperature": 0}
        events = []
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started[i].set()
        return events

    scene, q, gold = heldout_set(1, seed=22)[0]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream, i) for i in range(3)]
        assert all(e.wait(60) for e in started)
        for poison in ({"temperature": 1e-300}, {"temperature": 1e-40}, {"top_p": 1e-46}, {"top_p": 5e-324}):
            r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                           json={"messages": image_message(scene.image(), q), "max_tokens": 8, **poison})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == gold, poison
        results = [f.result(timeout=120) for f in futures]
    for events in results:
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "length"


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
    import random

    from ray import serve

    from vlm_core.default_model.data import make_scene, sample_qa, split_ids

    rng = random.Random(9)
    scenes = [make_scene(i) for i in split_ids("heldout", 16, offset=5000)]   # pictures no other test sent
    items = [(sc, *sample_qa(sc, rng)) for sc in scenes]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda it: ask(client, it[0].image(), it[1]).choices[0].message.content.strip(),
                                items))
    assert sum(a == gold for a, (_, _, gold) in zip(answers, items)) >= 15
    vision = serve.get_deployment_handle("VisionEncoder", "vlm")
    hits_before = vision.stats.remote().result(timeout_s=30)["hits"]
    ask(client, items[0][0].image(), "How many shapes are there?")   # same picture again: an encoder-cache hit
    stats = vision.stats.remote().result(timeout_s=30)
    llm = serve.get_deployment_handle("LLMServer", "vlm").stats.remote().result(timeout_s=30)
    assert stats["largest_batch"] > 1      # images of concurrent requests shared a tower forward
    assert stats["largest_batch"] <= stats["max_batch_images"]
    assert stats["hits"] == hits_before + 1
    assert llm["ttft_observations"] >= 17 and llm["queue_observations"] >= 17
    assert llm["running"] == 0 and llm["free_blocks"] == llm["num_blocks"]


def test_http_greedy_output_equals_the_in_process_engine(client, monkeypatch):
    from vlm_core.default_model import default_model_dir
    from vlm_core.engine.sampling import SamplingParams
    from vlm_core.vlm import VLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")    # the same CPU path as the replicas
    vlm = VLM.from_pretrained(default_model_dir("awq"))
    for seed in (21, 22):
        scene, q, _ = heldout_set(1, seed=seed)[0]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        ref = vlm.generate(messages, {"image": [scene.image()]}, SamplingParams(max_new_tokens=24, ignore_eos=True))
        r = ask(client, scene.image(), q, max_tokens=24, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == ref.text
        assert r.usage.completion_tokens == len(ref.token_ids) == 24
        assert r.choices[0].finish_reason == ref.finish_reason == "length"


DRIVER = """
import base64, io, json, os, sys
import ray
from ray import serve
from deployments.protocol import ChatCompletionRequest
from vlm_core.default_model.data import heldout_set

scene, q, gold = heldout_set(1, seed=8)[0]
buf = io.BytesIO()
scene.image().save(buf, "PNG")
url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
ray.init(address=os.environ["VLM_RAY_ADDRESS"], log_to_driver=False)
handle = serve.get_app_handle("vlm")
req = ChatCompletionRequest(temperature=0, messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]}])
out = handle.chat.remote(req).result(timeout_s=60)
print(json.dumps({"answer": out.choices[0].message.content, "gold": gold, "usage": out.usage.model_dump()}))
ray.shutdown()
"""


def test_handle_call_from_a_separate_driver_process(server, client):
    import json
    import subprocess
    import sys

    import ray

    env = {**os.environ, "VLM_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    p = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    scene, q, gold = heldout_set(1, seed=8)[0]
    assert got["gold"] == gold and got["answer"].strip() == gold
    http = ask(client, scene.image(), q)
    assert http.choices[0].message.content == got["answer"]
    assert http.usage.completion_tokens == got["usage"]["completion_tokens"]


def llm_stats():
    from ray import serve

    return serve.get_deployment_handle("LLMServer", "vlm").stats.remote().result(timeout_s=30)


def wait_idle(timeout_s=30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        st = llm_stats()
        if (st["running"] == 0 and st["waiting"] == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_clients_disconnecting_mid_stream_abort_their_requests(server):
    import asyncio
    import json

    import httpx

    before = wait_idle()
    scenes = heldout_set(50, seed=31)

    async def one(http, i):
        scene, q, _ = scenes[i]
        body = {"messages": image_message(scene.image(), q), "stream": True, "max_tokens": 180, "ignore_eos": True}
        async with http.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    return True     # leaving the block closes the connection mid-stream
        return False

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(50)))

    assert all(asyncio.run(main()))
    after = wait_idle()
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["free_blocks"] == after["num_blocks"]          # no KV block leaked
    assert after["aborted"] - before["aborted"] == 50            # every one was aborted, none ran to its length
    assert after["requests"] - before["requests"] == 50


@pytest.fixture(scope="module")
def overload_app(server):
    """A second app whose LLMServer runs one sequence and holds one more."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app({"ingress": {"api_key": API_KEY, "retry_after_s": 2, "max_concurrent_requests": 3},
                         "llm": {"engine": {"max_num_seqs": 1}, "max_waiting_requests": 1}}),
              name="overload", route_prefix="/overload", blocking=False)
    yield server + "/overload"
    serve.delete("overload")


def test_full_queues_answer_503_with_retry_after(overload_app):
    import concurrent.futures

    import httpx

    scene, q, gold = heldout_set(1, seed=41)[0]
    long = {"messages": image_message(scene.image(), q), "max_tokens": 150, "ignore_eos": True}

    def post(body):
        return httpx.post(overload_app + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, [long] * 8))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    from ray import serve

    stats = serve.get_deployment_handle("LLMServer", "overload").stats.remote().result(timeout_s=30)
    # the Ingress holds 3 at once and refuses the rest itself; of its 3 the engine holds 2
    at_door = [r for r in answers if r.status_code == 503 and "in flight" in r.json()["error"]["message"]]
    assert len(at_door) >= 1 and stats["refused"] == codes.count(503) - len(at_door) and stats["in_flight"] == 0
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2" and r.headers["content-type"] == "application/json"
            assert r.json()["error"]["type"] == "server_overloaded" and "capacity" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 150
    ok = post({"messages": image_message(scene.image(), q), "temperature": 0})   # room again
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].strip() == gold


@pytest.fixture(scope="module")
def nvila_app(server, tmp_path_factory):
    """A tiny NVILA folder (Qwen2 + SigLIP + dynamic S2) served beside the default model."""
    from ray import serve

    from deployments.app import build_app
    from vlm_core.tiny_vila import build_tiny_vila

    folder = build_tiny_vila(tmp_path_factory.mktemp("nvila") / "tiny-nvila", "nvila", seed=2)
    serve.run(build_app({"model_dir": str(folder), "ingress": {"model_name": "tiny-nvila", "api_key": API_KEY}}),
              name="nvila", route_prefix="/nvila", blocking=False)
    yield server + "/nvila", folder
    serve.delete("nvila")


def test_nvila_served_over_http_equals_in_process(nvila_app, monkeypatch):
    from openai import OpenAI
    from PIL import Image

    from vlm_core.engine.sampling import SamplingParams
    from vlm_core.vlm import VLM

    url, folder = nvila_app
    client = OpenAI(base_url=url + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vlm = VLM.from_pretrained(folder)
    g = __import__("torch").Generator().manual_seed(0)
    for w, h in ((150, 90), (64, 64)):     # a dynamic-S2 grid of 3x4 tiles, and a square picture
        arr = (__import__("torch").rand(h, w, 3, generator=g) * 255).to(__import__("torch").uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        png = buf.getvalue()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        ref = vlm.generate(messages, {"image": [png]}, SamplingParams(max_new_tokens=12, ignore_eos=True))
        r = client.chat.completions.create(
            model="tiny-nvila", temperature=0, max_tokens=12, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                {"type": "text", "text": "Describe the image."}]}])
        assert r.choices[0].message.content == ref.text
        assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == ref.prompt_tokens
    frames = []                            # a video part (extension): 10 frames, sampled to 8 like in-process
    for _ in range(10):
        buf = io.BytesIO()
        Image.fromarray((__import__("torch").rand(48, 64, 3, generator=g) * 255).to(__import__("torch").uint8)
                        .numpy()).save(buf, "PNG")
        frames.append(buf.getvalue())
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    for video in (frames, frames[:5]):     # and a short one, whose sampled frames repeat
        ref = vlm.generate(messages, {"video": [video]}, SamplingParams(max_new_tokens=10, ignore_eos=True))
        r = client.chat.completions.create(
            model="tiny-nvila", temperature=0, max_tokens=10, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [
                {"type": "video", "video": {"frames": ["data:image/png;base64," + base64.b64encode(f).decode()
                                                       for f in video]}},
                {"type": "text", "text": "What happens?"}]}])
        assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == ref.prompt_tokens
    import httpx

    for frames, status, message in (([png_url(small_png())] * 65, 400, "at most 64"),
                                    ([png_url(bomb_png(8192, 8192))] * 16, 413, "per request")):
        start = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=60, json={"messages": [
            {"role": "user", "content": [{"type": "video", "video": {"frames": frames}}]}]})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
        assert time.perf_counter() - start < 5


@pytest.mark.parametrize("field,value,words", REFUSED, ids=[r[0] for r in REFUSED])
def test_unserved_openai_fields_are_refused_by_name(server, field, value, words):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", json={"messages": HI, field: value}, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and words in err["message"]


@pytest.mark.parametrize("field,value,param", INVALID, ids=[r[0] for r in INVALID])
def test_out_of_range_fields_name_themselves(server, field, value, param):
    import httpx

    r = httpx.post(server + "/v1/chat/completions", json={"messages": HI, field: value}, headers=AUTH, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_neutral_values_developer_role_and_unknown_fields_are_accepted(server):
    import httpx

    body = {"messages": [{"role": "developer", "content": "Answer briefly."}, *HI], "max_tokens": 3,
            "response_format": {"type": "text"}, "modalities": ["text"], "user": "u-1", "metadata": {"k": "v"},
            "store": False, "parallel_tool_calls": True, "service_tier": "auto", "not_a_field": 1, "priority": -3}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_logprobs_and_penalties_over_http_equal_the_in_process_engine(client, monkeypatch):
    from vlm_core.default_model import default_model_dir
    from vlm_core.engine.sampling import SamplingParams
    from vlm_core.vlm import VLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vlm = VLM.from_pretrained(default_model_dir("awq"))
    scene, q, _ = heldout_set(1, seed=31)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    extra = {"ignore_eos": True, "repetition_penalty": 1.3, "min_tokens": 2}
    ref = vlm.generate(messages, {"image": [scene.image()]},
                       SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=3, presence_penalty=0.5,
                                      frequency_penalty=0.25, repetition_penalty=1.3, min_tokens=2, prompt_logprobs=2))
    kw = dict(max_tokens=8, logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=0.25,
              extra_body=extra)
    r = ask(client, scene.image(), q, **{**kw, "extra_body": {**extra, "prompt_logprobs": 2}})
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == ref.text and len(content) == len(ref.logprobs) == 8
    scored = r.model_extra["prompt_logprobs"]        # vLLM's shape: None, then token id -> entry per position
    assert scored[0] is None and len(scored) == r.usage.prompt_tokens == len(ref.prompt_logprobs) + 1
    for got, want in zip(scored[1:], ref.prompt_logprobs):
        mine = got[str(want.token_id)]
        assert abs(mine["logprob"] - want.logprob) <= 1e-5 and mine["rank"] == want.rank
        assert mine["decoded_token"] == vlm.tokenizer.decode([want.token_id])
        assert {int(t) for t in got} == {want.token_id} | {t for t, _ in want.top}
    for got, want in zip(content, ref.logprobs):
        assert got.token == vlm.tokenizer.decode([want.token_id]) and bytes(got.bytes) == got.token.encode()
        assert abs(got.logprob - want.logprob) <= 1e-5
        assert [t.token for t in got.top_logprobs] == [vlm.tokenizer.decode([i]) for i, _ in want.top]
    streamed = list(ask(client, scene.image(), q, stream=True, stream_options={"include_usage": True,
                                                                                 "continuous_usage_stats": True}, **kw))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in tokens] == [t.logprob for t in content]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.text
    assert all(c.usage is not None for c in streamed if c.choices and c.choices[0].delta.content)


def test_text_completions_tokenize_and_model_routes(server, client, monkeypatch):
    import httpx

    from vlm_core.default_model import default_model_dir
    from vlm_core.engine.sampling import SamplingParams
    from vlm_core.vlm import VLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vlm = VLM.from_pretrained(default_model_dir("awq"))
    text = "USER: How many shapes? ASSISTANT:"
    ref = vlm.generate(text, None, SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=2),
                       apply_template=False)
    r = client.completions.create(model="vlm-serve-default", prompt=text, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == ref.text and r.usage.completion_tokens == 6 and r.object == "text_completion"
    assert c.logprobs.token_logprobs == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    assert c.logprobs.tokens == [vlm.tokenizer.decode([t]) for t in ref.token_ids]
    assert c.logprobs.text_offset == [sum(len(t) for t in c.logprobs.tokens[:i]) for i in range(6)]
    streamed = client.completions.create(model="vlm-serve-default", prompt=text, max_tokens=6, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == ref.text
    echoed = client.completions.create(model="vlm-serve-default", prompt=text, max_tokens=6, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == text + ref.text
    ids = list(vlm.request(text, None, apply_template=False).prompt.token_ids)
    # echo with logprobs scores the prompt too: its first token has none, the rest equal the engine's
    scored = vlm.generate(text, None, SamplingParams(max_new_tokens=1, prompt_logprobs=2),
                          apply_template=False).prompt_logprobs
    for stream in (False, True):
        got = client.completions.create(model="vlm-serve-default", prompt=text, max_tokens=6, temperature=0,
                                        echo=True, logprobs=2, stream=stream, extra_body={"ignore_eos": True})
        lp = got.choices[0].logprobs if not stream else next(iter(got)).choices[0].logprobs
        assert lp.tokens[:len(ids)] == [vlm.tokenizer.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([e.logprob for e in scored], abs=1e-4)
        assert [list(d) for d in lp.top_logprobs[1:len(ids)]] == [[vlm.tokenizer.decode([t]) for t, _ in e.top]
                                                                   for e in scored]
        if not stream:
            assert lp.token_logprobs[len(ids):] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
    two = client.completions.create(model="vlm-serve-default", prompt=text, max_tokens=2, n=2,
                                    extra_body={"prompt_logprobs": 2}).choices
    per_choice = [c.model_extra["prompt_logprobs"] for c in two]
    assert per_choice[0] == per_choice[1] and per_choice[0][0] is None and len(per_choice[0]) == len(ids)
    assert [e[str(t)]["logprob"] for e, t in zip(per_choice[0][1:], ids[1:])] == \
        pytest.approx([e.logprob for e in scored], abs=1e-5)
    refused = httpx.post(server + "/v1/completions", json={"prompt": text, "prompt_logprobs": 1, "stream": True},
                         headers=AUTH, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"
    by_ids = client.completions.create(model="vlm-serve-default", prompt=ids, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == ref.text
    for body, param in (({"prompt": text, "suffix": "x"}, "suffix"), ({"prompt": [10 ** 9]}, "prompt"),
                        ({"prompt": text, "best_of": 2}, "best_of"), ({"prompt": ""}, "prompt")):
        bad = httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text

    tok = httpx.post(server + "/tokenize", json={"prompt": text}, headers=AUTH, timeout=30).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids) and tok["max_model_len"] > len(ids)
    back = httpx.post(server + "/detokenize", json={"tokens": tok["tokens"]}, headers=AUTH, timeout=30).json()
    assert back["prompt"] == vlm.tokenizer.decode(ids)
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "How many shapes?"}]},
                      headers=AUTH, timeout=30).json()
    assert chat["tokens"] == list(vlm.request("How many shapes?").prompt.token_ids)
    assert httpx.post(server + "/detokenize", json={"tokens": [-1]}, headers=AUTH).status_code == 400
    assert httpx.post(server + "/tokenize", json={}, headers=AUTH).status_code == 400

    assert httpx.get(server + "/v1/models/vlm-serve-default", headers=AUTH).json()["id"] == "vlm-serve-default"
    missing = httpx.get(server + "/v1/models/gpt-9", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert httpx.get(server + "/version", headers=AUTH).json()["version"]
    assert httpx.get(server + "/version").status_code == 401


def test_n_choices_over_http_each_reproduce_alone(client):
    scene, q, _ = heldout_set(1, seed=41)[0]
    kw = dict(model="vlm-serve-default", messages=image_message(scene.image(), q), max_tokens=6, temperature=1.0,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(seed=11 + i, **kw).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in r.choices] == alone
    assert r.usage.completion_tokens == 18 and r.usage.prompt_tokens > 36
    streamed: dict[int, str] = {}
    for ch in client.chat.completions.create(n=3, seed=11, stream=True, **kw):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == alone
    text = client.completions.create(model="vlm-serve-default", prompt="USER: Hi ASSISTANT:", n=2, seed=5,
                                     max_tokens=4, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in text.choices] == [0, 1] and text.usage.completion_tokens == 8


def test_structured_output_over_http(server, client):
    import httpx

    scene, q, _ = heldout_set(1, seed=51)[0]
    r = ask(client, scene.image(), q, max_tokens=8, extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert r.choices[0].message.content in ("red", "green", "blue") and r.choices[0].finish_reason == "stop"
    # the default model's word-level vocabulary cannot spell JSON: said so, not ignored
    bad = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "messages": HI, "response_format": {"type": "json_object"}})
    assert bad.status_code == 400 and "cannot spell JSON" in bad.json()["error"]["message"]
    # refused inside the LLM replica: the message is the engine's own, never Ray's traceback text
    message = bad.json()["error"]["message"]
    assert message.startswith("this model's tokenizer cannot spell JSON")
    assert not any(w in message for w in ("ray::", "pid=", "actor_id", "Traceback", "File \""))


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                    "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
SHAPE = {"type": "function", "function": {"name": "count_shapes", "parameters": {
    "type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
    "additionalProperties": False}}}


def test_forced_tool_calls_follow_the_function_schema(nvila_app):
    import httpx
    import jsonschema
    from openai import OpenAI

    base, _ = nvila_app
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    kw = dict(model="tiny-nvila", messages=[{"role": "user", "content": "What is the weather?"}], max_tokens=120,
              temperature=0.7, seed=4, tools=[WEATHER, SHAPE])
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SHAPE)}
    for choice in ("required", {"type": "function", "function": {"name": "count_shapes"}}):
        r = client.chat.completions.create(tool_choice=choice, **kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "count_shapes"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        streamed = list(client.chat.completions.create(tool_choice=choice, stream=True, **kw))
        calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        assert [(tc.function.name, tc.function.arguments) for tc in calls] == [(call.function.name,
                                                                                call.function.arguments)]
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
    for body, words in (({"tool_choice": "auto"}, "no tool-calling format"),
                        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools")):
        bad = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=30,
                         json={"messages": kw["messages"], "tools": [WEATHER], **body})
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text


def test_the_tool_round_trip_with_the_openai_client(nvila_app):
    """A forced call, the tool's result sent back after the assistant's tool_calls, the next answer."""
    from openai import OpenAI

    base, _ = nvila_app
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    ask = {"role": "user", "content": "What is the weather?"}
    first = client.chat.completions.create(model="tiny-nvila", messages=[ask], tools=[WEATHER], max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [ask, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear", "celsius": 21})}]
    second = client.chat.completions.create(model="tiny-nvila", messages=history, max_tokens=6, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_responses_api_with_the_openai_client_equals_the_chat_completion(client):
    scene, q, gold = heldout_set(1, seed=71)[0]
    url = data_url(scene.image())
    inp = [{"role": "user", "content": [{"type": "input_text", "text": q}, {"type": "input_image", "image_url": url}]}]
    r = client.responses.create(model="vlm-serve-default", input=inp, temperature=0, max_output_tokens=16)
    chat = ask(client, scene.image(), q, max_tokens=16)
    assert r.output_text == chat.choices[0].message.content and r.output_text.strip() == gold
    assert r.usage.output_tokens == chat.usage.completion_tokens and r.status == "completed"
    with client.responses.stream(model="vlm-serve-default", input=inp, temperature=0, max_output_tokens=16) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == r.output_text == final.output_text


def test_x_request_id_names_the_answer_and_comes_back(server):
    import httpx

    body = {"messages": HI, "max_tokens": 2}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={**AUTH, "X-Request-Id": "abc-123"}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "abc-123" and r.headers["x-request-id"] == "abc-123"
    r = httpx.post(server + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                   headers={**AUTH, "X-Request-Id": "abc-124"})
    assert r.headers["x-request-id"] == "abc-124" and '"id":"abc-124"' in r.text
    bad = httpx.post(server + "/v1/chat/completions", json=body, headers={**AUTH, "X-Request-Id": "a b"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_a_picture_sent_once_is_reused_by_its_uuid(server, client):
    import httpx

    scene, q, _ = heldout_set(1, seed=61)[0]
    first = client.chat.completions.create(model="vlm-serve-default", temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene.image())},
                                      "uuid": "scene-61"}, {"type": "text", "text": q}]}])
    again = client.chat.completions.create(model="vlm-serve-default", temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image_url", "uuid": "scene-61"}, {"type": "text", "text": q}]}])
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens > 0       # the same picture: its KV is reused
    for part, words in (({"type": "image_url", "uuid": "never-sent"}, "not known"),
                        ({"type": "image_url"}, "needs image_url")):
        bad = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=30,
                         json={"messages": [{"role": "user", "content": [part, {"type": "text", "text": q}]}]})
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text
