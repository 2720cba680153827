"""Application builder: `serve run serve_config.yaml` imports `deployments.app:build_app`.

Deployments are plain classes; here they get `serve.deployment` and are bound into one
application: Ingress -> (VisionEncoder, LLMServer). Resources: each deployment takes the GPU
fraction given in `args` (`vision_gpus`, `llm_gpus`) when the cluster has GPUs, otherwise CPUs
only, so one config runs on a CPU box and on CUDA nodes unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from vlm_core.inputs.image import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(None, description="llava-hf checkpoint folder; default: the embedded AWQ model")
    model_name: str = "vlm-serve-default"
    dtype: str | None = None
    vision_gpus: float = Field(0.25, ge=0, description="GPU fraction per VisionEncoder replica on GPU clusters")
    llm_gpus: float = Field(1.0, ge=0, description="GPU fraction per LLMServer replica on GPU clusters")
    vision_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per VisionEncoder replica (pins it to nodes that "
                                          "offer them, e.g. {'vision': 1})")
    llm_resources: dict[str, float] = Field(default_factory=dict, description="the same for LLMServer replicas")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields")
    max_waiting_requests: int | None = Field(
        256, ge=0, description="requests an LLMServer replica holds beyond engine.max_num_seqs before it answers 503;"
                               " None: no limit")
    stream_interval_s: float = Field(0.02, ge=0, description="tokens made within this long of the last streamed"
                                                           " message are sent together (0: every step)")
    vision_max_batch_images: int = Field(32, ge=1, description="images (tiles) per tower forward, across requests")
    vision_batch_wait_s: float = Field(0.002, ge=0, description="how long a vision batch waits to fill")
    vision_cache_size: int = Field(512, ge=0, description="embeddings kept in each VisionEncoder's LRU cache")
    max_images: int = Field(8, ge=0, description="images per request (and videos per request)")
    max_video_frames: int = Field(64, ge=1, description="frames per video part (VILA-family models sample them down"
                                                        " to num_video_frames)")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="encoded bytes per image (413 above)")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="pixels per image, checked before decoding (413)")
    max_request_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="pixels of all images and video frames of "
                                                                     "one request, checked before decoding (413)")
    max_aspect_ratio: float = Field(MAX_ASPECT_RATIO, ge=1, description="longest over shortest side of a picture "
                                                                       "(400 above)")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1, description="request body size, checked before parsing"
                                                                      " (413)")
    max_prompt_chars: int | None = Field(None, ge=1, description="characters of message text, checked before "
                                                                 "tokenizing (400); default: the context length "
                                                                 "times the longest token's characters (at least 16)")
    body_timeout_s: float = Field(30.0, gt=0, description="deadline for receiving a request body (408)")
    max_concurrent_requests: int = Field(512, ge=1, description="generation requests one Ingress replica holds at"
                                                                " once; beyond: 503 + Retry-After")
    default_max_tokens: int = Field(64, ge=1)
    allowed_file_dirs: list[str] = Field(default_factory=list, description="folders file:// image URLs may read")
    allow_http_images: bool = Field(False, description="fetch http(s) image URLs (public addresses only)")
    allowed_image_hosts: list[str] = Field(default_factory=list, description="hosts ('host' or 'host:port') fetched"
                                                                             " even at non-public addresses")
    http_timeout_s: float = Field(10.0, gt=0, description="deadline for one image fetch")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 503 answers when queues are full")
    api_key: str | None = Field(None, description="when set, requests need 'Authorization: Bearer <key>'")
    deployment_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-deployment serve options (e.g. {'LLMServer': {'max_queued_requests': 8}})"
                                          " for Python callers of build_app; the yaml's `deployments` does this for serve run")

    @model_validator(mode="after")
    def _check(self):
        if self.vision_max_batch_images < self.max_images:
            raise ValueError(f"vision_max_batch_images ({self.vision_max_batch_images}) must be at least "
                             f"max_images ({self.max_images})")
        unknown = set(self.deployment_options) - set(DEPLOYMENTS)
        if unknown:
            raise ValueError(f"deployment_options names unknown deployments {sorted(unknown)}; known: {DEPLOYMENTS}")
        return self


DEPLOYMENTS = ("Ingress", "VisionEncoder", "LLMServer")
# Code defaults for Python callers of build_app (Serve's own default of 5 ongoing requests per
# replica would starve a continuous-batching engine); serve_config.yaml states its own.
# An LLMServer replica takes engine.max_num_seqs + max_waiting_requests and refuses the next one
# itself (503), so its max_ongoing_requests must not be lower than that.
DEFAULT_OPTIONS = {"Ingress": {"max_ongoing_requests": 1024}, "VisionEncoder": {"max_ongoing_requests": 64},
                   "LLMServer": {"max_ongoing_requests": 320}}


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict | None = None) -> serve.Application:
    from vlm_core.default_model import default_model_dir

    from .ingress import IngressOptions, ServeIngress
    from .llm import LLMServer
    from .vision import VisionEncoder

    a = AppArgs(**(args or {}))
    model_dir = a.model_dir or str(default_model_dir("awq"))
    gpus = _cluster_has_gpus()

    def deployment(cls, name: str, resources: dict | None):
        opts = {**DEFAULT_OPTIONS[name], **({"ray_actor_options": resources} if resources else {})}
        return serve.deployment(cls, name=name).options(**{**opts, **a.deployment_options.get(name, {})})

    def actor_options(gpu_fraction: float, custom: dict[str, float]) -> dict:
        opts: dict[str, Any] = {"num_gpus": gpu_fraction} if gpus else {"num_cpus": 0.5}
        if custom:
            opts["resources"] = dict(custom)
        return opts

    vision = deployment(VisionEncoder, "VisionEncoder", actor_options(a.vision_gpus, a.vision_resources))
    llm = deployment(LLMServer, "LLMServer", actor_options(a.llm_gpus, a.llm_resources))
    ingress = deployment(ServeIngress, "Ingress", None)
    options = IngressOptions(
        model_name=a.model_name, max_images=a.max_images, max_video_frames=a.max_video_frames,
        max_image_bytes=a.max_image_bytes,
        max_image_pixels=a.max_image_pixels, max_request_pixels=a.max_request_pixels,
        max_aspect_ratio=a.max_aspect_ratio, max_request_bytes=a.max_request_bytes,
        max_prompt_chars=a.max_prompt_chars, body_timeout_s=a.body_timeout_s,
        max_concurrent_requests=a.max_concurrent_requests, default_max_tokens=a.default_max_tokens,
        allowed_file_dirs=tuple(a.allowed_file_dirs), allow_http_images=a.allow_http_images,
        allowed_image_hosts=tuple(a.allowed_image_hosts), http_timeout_s=a.http_timeout_s, api_key=a.api_key,
        retry_after_s=a.retry_after_s)
    return ingress.bind(
        vision.bind(model_dir, a.dtype, None, a.vision_cache_size, a.vision_max_batch_images, a.vision_batch_wait_s),
        llm.bind(model_dir, a.dtype, None, a.engine, a.max_waiting_requests, a.stream_interval_s), model_dir,
        options)


def app_from_config(path: str, overrides: dict | None = None) -> tuple[str, str, serve.Application]:
    """(name, route_prefix, application) of the first application in a Serve config file, with
    its `args` (updated by `overrides`) and its `deployments` settings, as `serve run` deploys it."""
    import yaml

    with open(path) as f:
        app = yaml.safe_load(f)["applications"][0]
    args = {**(app.get("args") or {}), **(overrides or {})}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    for name, extra in (args.pop("deployment_options", None) or {}).items():
        options[name] = {**options.get(name, {}), **extra}
    args["deployment_options"] = options
    return app.get("name", "default"), app.get("route_prefix", "/"), build_app(args)
