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


def kuberay_resources(value: str) -> dict:
    """`rayStartParams.resources` as KubeRay's operator reads it (ray-operator/controllers/ray/common/
    pod.go, getResourcesMap, v1.7.0): surrounding quotes, backticks and spaces trimmed, then JSON."""
    return json.loads(value.strip("'\"` "))


def shell_resources(value: str) -> dict:
    """The same value as `ray start` gets it: KubeRay writes `--resources=<value>` into the container's
    shell command (convertParamMap), and the shell removes the quoting."""
    import shlex

    flag = shlex.split(f"ray start --resources={value}")[2]
    return json.loads(flag.removeprefix("--resources="))


def test_start_resources_parse_for_the_operator_and_the_shell():
    gen = generator()
    value = gen.start_resources({"vision": 100})
    assert kuberay_resources(value) == shell_resources(value) == {"vision": 100}
    # the form the manifests once had: the shell reads it, the operator cannot
    old = json.dumps(json.dumps({"vision": 100}))
    assert shell_resources(old) == {"vision": 100}
    import pytest

    with pytest.raises(json.JSONDecodeError):
        kuberay_resources(old)


def test_image_registry_and_tag_are_options():
    gen = generator()
    files = gen.render("ghcr.io/acme", "1.2.3")
    rs = yaml.safe_load(files["rayservice.yaml"])
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        "ghcr.io/acme/vlm-serve:1.2.3"
    assert yaml.safe_load(files["ray-cluster.yaml"])["docker"]["image"] == "ghcr.io/acme/vlm-serve:1.2.3"


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
        offered = kuberay_resources(g["rayStartParams"]["resources"])
        assert offered == shell_resources(g["rayStartParams"]["resources"])
        assert set(offered) == set(wanted) and all(offered[k] >= wanted[k] for k in wanted)
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert g["rayStartParams"]["num-gpus"] == str(c["resources"]["limits"]["nvidia.com/gpu"])
        # the model volume, read-only, where model_dir points
        mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] and args["model_dir"].startswith(mount["mountPath"] + "/")
        vol = next(v for v in g["template"]["spec"]["volumes"] if v["name"] == "models")
        claim = yaml.safe_load((ROOT / "cluster" / "model-volume.yaml").read_text())
        assert vol["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    for c in [head["template"]["spec"]["containers"][0]] + [g["template"]["spec"]["containers"][0]
                                                            for g in groups.values()]:
        registry, _, tag = c["image"].rpartition(":")
        assert "/" in registry and tag and tag != "latest" and c["imagePullPolicy"] == "IfNotPresent"
    assert args["accelerator"] == "gpu"
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
    # where `serve deploy ~/serve_config.cluster.yaml` looks inside the rayproject/ray container
    assert cfg["file_mounts"]["/home/ray/serve_config.cluster.yaml"] == "cluster/serve_config.cluster.yaml"
    assert any(o.endswith(":/models:ro") for o in cfg["docker"]["run_options"])


def test_builder_pins_replicas_with_custom_resources():
    from deployments.app import app_from_config

    _, _, app = app_from_config(str(ROOT / "cluster" / "serve_config.cluster.yaml"))
    vision, llm = app._bound_deployment.init_args[:2]
    assert vision._bound_deployment.ray_actor_options["resources"] == {"vision": 1}
    assert llm._bound_deployment.ray_actor_options["resources"] == {"llm": 1}


def test_accelerator_gpu_requests_gpus_on_a_cluster_without_gpus_yet(monkeypatch):
    """accelerator: gpu (the cluster config) asks for the GPU fractions even when no GPU worker has
    joined; auto decides by what the cluster has; cpu never asks."""
    import deployments.app as app_module
    from deployments.app import app_from_config

    calls = []
    monkeypatch.setattr(app_module, "_cluster_has_gpus", lambda: calls.append(1) or False)
    _, _, app = app_from_config(str(ROOT / "cluster" / "serve_config.cluster.yaml"))   # model_dir: not read yet
    vision, llm = app._bound_deployment.init_args[:2]
    assert vision._bound_deployment.ray_actor_options["num_gpus"] == 0.25
    assert llm._bound_deployment.ray_actor_options["num_gpus"] == 1.0 and not calls
    for accelerator, asked in (("auto", [1]), ("cpu", [])):
        calls.clear()
        _, _, app = app_from_config(str(ROOT / "cluster" / "serve_config.cluster.yaml"), {"accelerator": accelerator})
        llm = app._bound_deployment.init_args[1]
        assert "num_gpus" not in llm._bound_deployment.ray_actor_options and calls == asked
        assert llm._bound_deployment.ray_actor_options["num_cpus"] == 0.5


# ---- the upstream schemas ------------------------------------------------------------------------

# The openAPIV3Schema of the RayService CRD (ray.io/v1) of KubeRay v1.7.0, taken unchanged from
# ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayservices.yaml at tag v1.7.0, and
# stored as compact JSON, gzipped.
KUBERAY_SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.7.0-rayservice-v1.schema.json.gz"


def strict(schema: dict) -> dict:
    """The CRD's structural schema as the API server applies it, in JSON Schema terms: objects that
    list their properties take no others (unknown fields are an error here, where the server would
    prune them silently) unless marked x-kubernetes-preserve-unknown-fields, and
    x-kubernetes-int-or-string fields take an integer or a string."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in out[key]]
    return out


def test_rayservice_validates_strictly_against_kuberays_crd():
    import gzip

    import jsonschema

    schema = strict(json.loads(gzip.decompress(KUBERAY_SCHEMA.read_bytes())))
    rs = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    jsonschema.validate(rs, schema)
    # the validator is strict: an unknown field, or a string where a number belongs, is refused
    bad = json.loads(json.dumps(rs))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicaz"] = 1
    with __import__("pytest").raises(jsonschema.ValidationError, match="replicaz"):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(rs))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "1"
    with __import__("pytest").raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_launcher_config_passes_rays_own_checks():
    import copy

    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))
