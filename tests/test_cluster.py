"""The application on a 3-node Ray cluster on this machine (head, a `vision` node, an `llm` node):
placement by custom resources, per-stage autoscaling, replica failures, and a short soak.

VLM_SOAK_S sets the soak length (default 180 s in CI)."""

import concurrent.futures
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import data_url, free_port
from vlm_core.default_model.data import heldout_set

pytestmark = pytest.mark.timeout(600)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

FAST = {"upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
OVERRIDES = {
    # vision calls wait 0.3 s for their batch to fill, so image-heavy load keeps the encoder busy
    "vision": {"batch_wait_s": 0.3},
    "deployments": {
        "Ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        "VisionEncoder": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                                 **FAST}},
        "LLMServer": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 3,
                                             "target_ongoing_requests": 1000, **FAST}},
    },
}


SCENES = heldout_set(40, seed=77)
URLS = [data_url(s.image()) for s, _, _ in SCENES]


def body(i, **kw):
    return {"temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": URLS[i % len(URLS)]}},
        {"type": "text", "text": SCENES[i % len(SCENES)][1]}]}], **kw}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import shutil

    from local import LocalCluster

    from vlm_core.default_model import default_model_dir

    # the model volume as docs/clusters.md fills it: the checkpoint folder under the volume's root, and
    # model_dir pointing there (here a local folder; on Kubernetes the PVC at /models)
    volume = tmp_path_factory.mktemp("models")
    shutil.copytree(default_model_dir("awq"), volume / "model")
    c = LocalCluster(vision_nodes=1, llm_nodes=1, dashboard_port=free_port())
    try:
        c.connect()
        c.overrides = {**OVERRIDES, "model_dir": str(volume / "model"), "accelerator": "cpu"}
        c.url = c.deploy(free_port(), c.overrides)
        wait_for(lambda: counts(c) == {"Ingress": 1, "VisionEncoder": 1, "LLMServer": 2}, 120)
        yield c
    finally:
        c.shutdown()


def counts(c) -> dict[str, int]:
    """RUNNING replicas per deployment (Serve's own view; replicas being stopped do not count)."""
    from ray import serve

    deps = serve.status().applications["vlm"].deployments
    return {name: d.replica_states.get("RUNNING", 0) for name, d in deps.items()}


def serving_pid(deployment: str) -> int:
    """The pid of a replica that is taking requests (asked through the deployment's handle)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, "vlm").stats.remote().result(timeout_s=30)["pid"]


def wait_for(cond, timeout_s, every=0.5):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every)


def post(c, b, timeout=120):
    import httpx

    return httpx.post(c.url + "/v1/chat/completions", json=b, timeout=timeout)


def stream(c, b, started: threading.Event | None = None, timeout=120):
    """('ok', tokens, id) or ('error', message, id) for one streamed request; never hangs past `timeout`."""
    import httpx

    text_chunks, usage = 0, None
    ids = []
    with httpx.stream("POST", c.url + "/v1/chat/completions", json={**b, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=timeout) as r:
        if r.status_code != 200:
            return "error", f"HTTP {r.status_code}", None
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "error", chunk["error"]["message"], ids[0] if ids else None
            ids.append(chunk.get("id"))
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                text_chunks += 1
                if started is not None:
                    started.set()
    rid = ids[0] if ids else None
    return ("ok", usage["completion_tokens"], rid) if usage else ("error", "stream ended without usage", rid)


def test_replicas_run_on_their_node_kinds_and_requests_cross_nodes(cluster):
    reps = cluster.replicas()
    assert {cluster.node_kind(a.node_id) for a in reps["VisionEncoder"]} == {"vision"}
    assert {cluster.node_kind(a.node_id) for a in reps["LLMServer"]} == {"llm"}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post(cluster, body(i)).json()["choices"][0]["message"]["content"], range(8)))
    assert sum(a.strip() == SCENES[i][2] for i, a in enumerate(answers)) >= 7


def test_vision_scales_out_under_image_load_and_back_in(cluster):
    stop = threading.Event()
    samples: list[dict[str, int]] = []

    def client(k):
        i = k
        while not stop.is_set():
            post(cluster, body(i, max_tokens=1))
            i += 16

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, k) for k in range(16)]
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                samples.append(counts(cluster))
                if samples[-1]["VisionEncoder"] == 2:
                    break
                time.sleep(1)
        finally:
            stop.set()
        for f in futures:
            f.result()
    assert max(s["VisionEncoder"] for s in samples) == 2, samples       # the image stage scaled out
    assert all(s["LLMServer"] == 2 for s in samples), samples             # the LLM stage did not
    wait_for(lambda: counts(cluster)["VisionEncoder"] == 1, 90)           # and back in when load stops
    assert counts(cluster)["LLMServer"] == 2


def kill_one(deployment) -> int:
    pid = serving_pid(deployment)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killing_an_llm_replica_continues_its_requests_where_that_is_exact(cluster):
    """SIGKILL one of two LLMServer replicas mid-stream. Its requests that can go on exactly from
    their tokens (greedy, no stop strings) finish on the other replica with all their tokens;
    those with a stop string (which could straddle the cut) fail with a 'replica failed' event;
    every request on the other replica finishes untouched."""
    wait_for(lambda: counts(cluster)["LLMServer"] == 2, 60)
    started = [threading.Event() for _ in range(8)]
    with_stop = {i for i in range(8) if i % 2}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, cluster, body(i, max_tokens=150, ignore_eos=True,
                                                     **({"stop": ["never-said"]} if i in with_stop else {})),
                               started[i]) for i in range(8)]
        for e in started:
            assert e.wait(60)
        # one replica tells which requests it is generating; Ray's state API gives the other's pid
        from ray import serve

        st = serve.get_deployment_handle("LLMServer", "vlm").stats.remote().result(timeout_s=30)
        pids = {a.pid for a in cluster.replicas()["LLMServer"]}
        assert len(pids) == 2 and st["pid"] in pids and st["in_flight"] == len(st["active"])
        asked = set(st["active"])
        victim = st["pid"] if asked else (pids - {st["pid"]}).pop()
        os.kill(victim, signal.SIGKILL)
        outcomes = [f.result(timeout=120) for f in futures]
    everyone = {rid for _, _, rid in outcomes}
    failed = {rid for kind, _, rid in outcomes if kind == "error"}
    on_victim = asked if victim == st["pid"] else everyone - asked
    stopped = {rid for i, (_, _, rid) in enumerate(outcomes) if i in with_stop}
    assert len(everyone) == 8 and on_victim
    assert failed == on_victim & stopped                              # only what cannot go on exactly
    assert all(n == 150 for kind, n, _ in outcomes if kind == "ok")   # the rest has every token
    assert all("replica failed" in m for kind, m, _ in outcomes if kind == "error")

    def replaced():   # two live LLMServer processes again, neither of them the killed one
        pids = {a.pid for a in cluster.replicas().get("LLMServer", [])}
        return len(pids) == 2 and victim not in pids and counts(cluster)["LLMServer"] == 2

    wait_for(replaced, 120)
    for i in range(4):                                 # Serve replaced it; new requests succeed
        r = post(cluster, body(i))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == SCENES[i][2]


def test_killing_the_vision_replica_fails_cleanly_and_recovers(cluster):
    wait_for(lambda: counts(cluster)["VisionEncoder"] == 1, 60)
    before = {a.pid for a in cluster.replicas()["VisionEncoder"]}
    stop = threading.Event()

    def client(k):   # image requests back to back: the encoder always holds some in its batch window
        got, i = [], k
        while not stop.is_set():
            got.append(post(cluster, body(i, max_tokens=4)))
            i += 8
        return got

    from ray import serve

    handle = serve.get_deployment_handle("VisionEncoder", "vlm")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, k) for k in range(8)]
        deadline = time.monotonic() + 30
        while True:   # kill it while requests sit in its 0.3 s batch window
            st = handle.stats.remote().result(timeout_s=30)
            if st["in_flight"] >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert st["in_flight"] >= 2
        os.kill(st["pid"], signal.SIGKILL)
        time.sleep(1)
        stop.set()
        answers = [r for f in futures for r in f.result(timeout=180)]
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "server_error" and "Retry-After" in r.headers
    wait_for(lambda: counts(cluster)["VisionEncoder"] == 1 and
             not {a.pid for a in cluster.replicas().get("VisionEncoder", [])} & before, 120)   # a new process
    for i in range(4):
        r = post(cluster, body(i + 10))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == SCENES[i + 10][2]


def test_config_update_under_load_drops_nothing(cluster):
    """`serve deploy` of a changed config (here: a new default_max_tokens) rolls every replica
    while clients keep sending; none of their requests fails."""
    from ray import serve

    from deployments.app import app_from_config
    from local import CONFIG

    stop = threading.Event()

    def client(k):
        got, i = [], k
        while not stop.is_set():
            got.append(post(cluster, body(i, max_tokens=4)).status_code)
            i += 6
        return got

    before = {a.pid for actors in cluster.replicas().values() for a in actors}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, k) for k in range(6)]
        time.sleep(2)
        name, prefix, app = app_from_config(str(CONFIG), {**cluster.overrides, "ingress": {"default_max_tokens": 48}})
        serve.run(app, name=name, route_prefix=prefix)          # returns once the new version runs
        time.sleep(2)
        stop.set()
        codes = [c for f in futures for c in f.result(timeout=180)]
    assert codes and set(codes) == {200}, codes
    after = {a.pid for actors in cluster.replicas().values() for a in actors}
    assert not before & after                                   # every replica is a new process
    r = post(cluster, {"messages": [{"role": "user", "content": "Describe the image."}], "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 48         # the new default is in force


def test_soak_mixed_load(cluster):
    import psutil

    soak_s = float(os.environ.get("VLM_SOAK_S", "180"))
    stop = threading.Event()
    results: dict[str, int] = {}
    lock = threading.Lock()

    def record(key):
        with lock:
            results[key] = results.get(key, 0) + 1

    def client(k):
        i = k
        while not stop.is_set():
            kind = i % 4
            if kind == 0:      # image, streamed
                outcome, _, _ = stream(cluster, body(i, max_tokens=16))
                record("ok" if outcome == "ok" else "stream_error")
            elif kind == 1:    # text only
                r = post(cluster, {"messages": [{"role": "user", "content": "How many shapes are there?"}],
                                   "max_tokens": 8})
                record("ok" if r.status_code == 200 else f"http_{r.status_code}")
            else:              # image, whole answer
                r = post(cluster, body(i, max_tokens=8 + i % 24, ignore_eos=bool(i % 2)))
                record("ok" if r.status_code == 200 else f"http_{r.status_code}")
            i += 12

    def rss() -> dict[str, dict[int, int]]:
        """Each deployment's replicas' resident memory, by pid (a replica being stopped may be gone)."""
        out: dict[str, dict[int, int]] = {}
        for dep, actors in cluster.replicas().items():
            for a in actors:
                try:
                    out.setdefault(dep, {})[a.pid] = psutil.Process(a.pid).memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        return out

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(client, k) for k in range(12)]
        time.sleep(min(15, soak_s / 4))                # warm up: caches and allocators settle
        start_rss = rss()
        time.sleep(soak_s)
        end_rss = rss()
        stop.set()
        for f in futures:
            f.result()
    # the replicas that lived through the soak: every one of Ingress and LLMServer (their replica
    # counts are fixed here), and of VisionEncoder at least one (it autoscales between 1 and 2 under
    # this load, so a replica may be stopped and another started meanwhile)
    lived = {dep: {pid: end_rss[dep][pid] / rss_ - 1 for pid, rss_ in start.items() if pid in end_rss.get(dep, {})}
             for dep, start in start_rss.items()}
    growth = {pid: g for by_pid in lived.values() for pid, g in by_pid.items()}
    print(f"\nsoak {soak_s:.0f} s: {results}; replica RSS growth "
          + ", ".join(f"{dep} {g * 100:+.1f}%" for dep, by_pid in lived.items() for g in by_pid.values()))
    assert set(results) == {"ok"} and results["ok"] > 50, results       # zero errors
    assert {dep: len(by_pid) for dep, by_pid in lived.items() if dep != "VisionEncoder"} == \
        {"Ingress": 1, "LLMServer": 2}, start_rss                         # no replica was replaced meanwhile
    assert lived["VisionEncoder"], (start_rss, end_rss)
    assert max(growth.values()) <= 0.10, growth
