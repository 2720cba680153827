"""An original-layout LLaVA folder and its AutoAWQ copy served side by side (two applications, one
Serve instance on loopback): the openai client gets the answers the in-process `VLM` gives."""

import os

import pytest
from PIL import Image

from helpers import SERVE_CONFIG, data_url, free_port
from orig_layout import TOWER_ID, write_checkpoint, write_tower
from vlm_core.engine.sampling import SamplingParams
from vlm_core.vlm import VLM

pytestmark = pytest.mark.timeout(300)

QUESTIONS = ("What colour is the circle?", "How many shapes are there?")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from vlm_core.quantize import main

    root = tmp_path_factory.mktemp("orig-serve")
    towers = root / "towers"
    write_tower(towers / TOWER_ID.split("/")[-1])       # found through the vision_tower_dir setting
    fp16 = write_checkpoint(root / "llava-tiny")
    awq = root / "llava-tiny-awq"
    assert main([str(fp16), str(awq), "--method", "rtn", "--group-size", "32", "--vision-tower-dir", str(towers)]) == 0
    return towers, {"fp16": fp16, "awq": awq}


@pytest.fixture(scope="module")
def served(folders):
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    import ray
    from ray import serve

    from deployments.app import app_from_config

    towers, dirs = folders
    ray.init(num_cpus=8, include_dashboard=False, address="local", log_to_driver=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "0"}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, d in dirs.items():
            _, _, app = app_from_config(SERVE_CONFIG, {"model_dir": str(d), "vision_tower_dir": str(towers),
                                                       "ingress": {"model_name": name}})
            serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        _wait_ready(f"http://127.0.0.1:{port}", dirs)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(url, dirs, timeout=180):
    import time

    import httpx

    end = time.time() + timeout
    for name in dirs:
        while True:
            try:
                if httpx.get(f"{url}/{name}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > end:
                raise TimeoutError(f"application {name} did not become healthy")
            time.sleep(0.5)


@pytest.mark.parametrize("name", ["fp16", "awq"])
def test_openai_client_answers_as_the_in_process_model(folders, served, images, name):
    from openai import OpenAI

    towers, dirs = folders
    vlm = VLM.from_pretrained(dirs[name], vision_tower_dir=towers)
    client = OpenAI(base_url=f"{served}/{name}/v1", api_key="none", timeout=60, max_retries=0)
    for q, path in zip(QUESTIONS, images):
        want = vlm.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                            {"image": [path]}, SamplingParams(max_new_tokens=8))
        r = client.chat.completions.create(model=name, temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(Image.open(path))}},
                                         {"type": "text", "text": q}]}])
        assert r.choices[0].message.content == want.text
        assert r.usage.completion_tokens == len(want.token_ids)
        assert r.usage.prompt_tokens == len(vlm.request(q, {"image": [path]}).prompt)
    again = client.chat.completions.create(model=name, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(Image.open(images[0]))}},
                                     {"type": "text", "text": QUESTIONS[0]}]}])
    assert again.usage.prompt_tokens_details.cached_tokens >= 32     # BOS, system text and the image: 2+ blocks
