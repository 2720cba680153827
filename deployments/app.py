"""Application builder: `serve run serve_config.yaml` imports `deployments.app:build_app`.

Deployments are plain classes; here they get `serve.deployment` and are bound into one
application: Ingress -> (VisionEncoder, LLMServer). Resources: each deployment takes the GPU
fraction given in `args` (`vision_gpus`, `llm_gpus`) when the cluster has GPUs, otherwise CPUs
only, so one config runs on a CPU box and on CUDA nodes unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from ray import serve


class AppArgs(BaseModel):
    model_dir: str | None = Field(None, description="llava-hf checkpoint folder; default: the embedded AWQ model")
    model_name: str = "vlm-serve-default"
    dtype: str | None = None
    vision_gpus: float = Field(0.25, ge=0, description="GPU fraction per VisionEncoder replica on GPU clusters")
    llm_gpus: float = Field(1.0, ge=0, description="GPU fraction per LLMServer replica on GPU clusters")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields")
    vision_max_batch_size: int = Field(8, ge=1, description="requests whose images share one tower forward")
    vision_batch_wait_s: float = Field(0.01, ge=0, description="how long a vision batch waits to fill")
    max_image_bytes: int = 10 * 1024 * 1024
    max_images: int = 8
    default_max_tokens: int = 64
    allowed_file_dirs: list[str] = Field(default_factory=list)
    api_key: str | None = Field(None, description="when set, requests need 'Authorization: Bearer <key>'")


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict | None = None) -> serve.Application:
    from vlm_core.default_model import default_model_dir

    from .ingress import ServeIngress
    from .llm import LLMServer
    from .vision import VisionEncoder

    a = AppArgs(**(args or {}))
    model_dir = a.model_dir or str(default_model_dir("awq"))
    gpus = _cluster_has_gpus()
    vision = serve.deployment(VisionEncoder, name="VisionEncoder").options(
        ray_actor_options={"num_gpus": a.vision_gpus} if gpus else {"num_cpus": 0.5})
    llm = serve.deployment(LLMServer, name="LLMServer").options(
        ray_actor_options={"num_gpus": a.llm_gpus} if gpus else {"num_cpus": 0.5})
    ingress = serve.deployment(ServeIngress, name="Ingress")
    return ingress.bind(vision.bind(model_dir, a.dtype, None, 512, a.vision_max_batch_size, a.vision_batch_wait_s), llm.bind(model_dir, a.dtype, None, a.engine), model_dir,
                        a.model_name, a.max_image_bytes, a.max_images, a.default_max_tokens, a.allowed_file_dirs,
                        a.api_key)
