"""cluster/*.yaml: generated from serve_config.yaml, and carrying what KubeRay and the launcher need."""

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def generator():
    spec = importlib.util.spec_from_file_location("cluster_generate", ROOT / "cluster" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_manifests_equal_the_generated_ones():
    gen = generator()
    for name, text in gen.render().items():
        assert (ROOT / "cluster" / name).read_text() == text, f"cluster/{name} is stale: run python cluster/generate.py"
    assert gen.main(["--check"]) == 0


def test_rayservice_has_the_fields_kuberay_requires():
    gen = generator()
    rs = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService" and rs["metadata"]["name"]
    spec = rs["spec"]
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    assert serve_cfg == gen.cluster_serve_config()                       # the embedded config is the generated one
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_cfg)                          # a valid Serve config for serve deploy
    cluster = spec["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"vision", "llm"}
    args = serve_cfg["applications"][0]["args"]
    for name, wanted in (("vision", args["vision"]["resources"]), ("llm", args["llm"]["resources"])):
        g = groups[name]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        offered = json.loads(json.loads(g["rayStartParams"]["resources"]))   # KubeRay's quoted-JSON string
        assert set(offered) == set(wanted) and all(offered[k] >= wanted[k] for k in wanted)
        c = g["template"]["spec"]["containers"][0]
        assert c["image"] and c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # every deployment the config tunes exists in the application
    from deployments.app import DEPLOYMENTS

    assert {d["name"] for d in serve_cfg["applications"][0]["deployments"]} == set(DEPLOYMENTS)


def test_cluster_launcher_config_is_complete():
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type"):
        assert key in cfg
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types["head"]["resources"]["CPU"] == 0
    assert types["vision"]["resources"]["vision"] > 0 and types["llm"]["resources"]["llm"] > 0
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    assert cfg["file_mounts"]["/home/ubuntu/serve_config.cluster.yaml"] == "cluster/serve_config.cluster.yaml"


def test_builder_pins_replicas_with_custom_resources():
    from deployments.app import app_from_config

    _, _, app = app_from_config(str(ROOT / "cluster" / "serve_config.cluster.yaml"))
    vision, llm = app._bound_deployment.init_args[:2]
    assert vision._bound_deployment.ray_actor_options["resources"] == {"vision": 1}
    assert llm._bound_deployment.ray_actor_options["resources"] == {"llm": 1}
