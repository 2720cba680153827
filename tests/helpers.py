"""Small helpers shared by the tests."""

import base64
import contextlib
import io
import os
import socket

SERVE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "serve_config.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(img) -> str:
    """A PIL image as a PNG `data:` URL."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_v2_state(state, group_size: int):
    """Rewrite AutoAWQ linears as llm-awq v2 tensors (what TinyChat's `-awq-v2.pt` exports hold)."""
    from vlm_core.quant.pack import awq_to_v2

    out = {}
    for key, t in state.items():
        if key.endswith(".qweight"):
            prefix = key[: -len("qweight")]
            out[key], out[prefix + "scales"], out[prefix + "scaled_zeros"] = awq_to_v2(
                t, state[prefix + "qzeros"], state[prefix + "scales"], group_size)
        elif not (key.endswith((".qzeros", ".scales")) and key.rsplit(".", 1)[0] + ".qweight" in state):
            out[key] = t
    return out


def generate_on(engine, requests):
    """Run `EngineRequest`s to completion on an `LLMEngine`; one merged `RequestOutput` each."""
    from vlm_core.engine.request import merge_outputs

    for i, r in enumerate(requests):
        engine.add_request(f"req{i}", r)
    got = engine.run_to_completion()
    outs = []
    for i in range(len(requests)):
        parts = got[f"req{i}"]
        out = parts[0]
        for p in parts[1:]:
            out = merge_outputs(out, p)
        outs.append(out)
    return outs


@contextlib.contextmanager
def local_serve(overrides: dict):
    """A local Ray instance on loopback serving serve_config.yaml's application with its args
    merged with `overrides`; yields the HTTP base URL, and shuts Serve and Ray down after."""
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    import ray
    from ray import serve

    from deployments.app import app_from_config

    # logical CPUs: room for replicas that mostly wait on each other (and a second app beside);
    # replicas run the product's CPU path (torch), not the Triton interpreter the kernel tests use
    ray.init(num_cpus=8, include_dashboard=False, address="local", log_to_driver=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "0"}})
    try:
        port = free_port()      # after Ray's own processes have bound theirs
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        name, prefix, app = app_from_config(SERVE_CONFIG, overrides)
        assert (name, prefix) == ("vlm", "/")
        serve.run(app, name=name, route_prefix=prefix, blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
