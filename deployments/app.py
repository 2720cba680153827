"""Application builder: `serve run serve_config.yaml` imports `deployments.app:build_app`.

Deployments are plain classes; here they get `serve.deployment` and are bound into one
application: Ingress -> (VisionEncoder, LLMServer). `args` are `AppSettings`
(`deployments/settings.py`); each deployment receives its section and gets the Serve options that
section derives. Resources: VisionEncoder and LLMServer take their GPU fractions (`vision.gpus`,
`llm.gpus`) with `accelerator: gpu` (what the cluster manifests say, so a deploy made before the
GPU workers join still asks for GPUs), CPUs only with `cpu`, and with `auto` (the default) GPUs
when the cluster has them at build time, so `serve run` works on a CPU box and a GPU box alike.
"""

from __future__ import annotations

from ray import serve

from .settings import DEPLOYMENTS, AppSettings, merge

__all__ = ["AppSettings", "DEPLOYMENTS", "app_from_config", "build_app"]


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict | None = None) -> serve.Application:
    """The application for `args` (`AppSettings`: the YAML's `args`, validated)."""
    from .ingress import ServeIngress
    from .llm import LLMServer
    from .vision import VisionEncoder

    s = AppSettings(**(args or {}))
    model_dir = s.resolved_model_dir()
    gpus = s.use_gpus(_cluster_has_gpus)

    def deployment(cls, name: str):
        return serve.deployment(cls, name=name).options(**s.serve_options(name, gpus))

    options = s.load_options()
    vision = deployment(VisionEncoder, "VisionEncoder").bind(model_dir, s.dtype, s.vision, options=options)
    llm = deployment(LLMServer, "LLMServer").bind(model_dir, s.dtype, s.llm, options=options)
    return deployment(ServeIngress, "Ingress").bind(vision, llm, model_dir, s.ingress, options=options)


def app_from_config(path: str, overrides: dict | None = None) -> tuple[str, str, serve.Application]:
    """(name, route_prefix, application) of the first application in a Serve config file, with
    its `args` (merged section by section with `overrides`) and its `deployments` settings, as
    `serve run` deploys it."""
    import yaml

    with open(path) as f:
        app = yaml.safe_load(f)["applications"][0]
    args = merge(app.get("args") or {}, overrides or {})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    args["deployments"] = merge(options, args.get("deployments") or {})
    return app.get("name", "default"), app.get("route_prefix", "/"), build_app(args)
