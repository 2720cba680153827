"""The application's settings, in one place: what `serve_config.yaml`'s `args` map onto.

    args:
      model_dir: ...            # checkpoint folder (default: the embedded 4-bit model)
      dtype: ...
      ingress: {...}            # IngressSettings: the API, request limits, image URLs, API key
      vision:  {...}            # VisionSettings: GPUs, tower batching, encoder cache, routing
      llm:     {...}            # LLMSettings: GPUs, engine (EngineConfig fields), queueing, streaming, routing
      deployments: {...}        # Serve options per deployment, over the derived ones (Python callers)

Every section is validated (unknown keys are refused, values bounded). Each deployment receives
its section as it is, and each section computes its deployment's Serve options
(`serve_options`): the derived rules (an LLMServer replica takes `engine.max_num_seqs +
max_waiting_requests` ongoing requests; an Ingress replica twice the generations it holds; a
VisionEncoder replica twice a tower batch) live here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlm_core.engine.engine import EngineConfig
from vlm_core.inputs.image import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS

from .frontdoor import FrontDoorLimits
from .url_policy import MAX_IMAGE_BYTES, ImagePolicy

DEPLOYMENTS = ("Ingress", "VisionEncoder", "LLMServer")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def _actor_options(gpus_present: bool, gpu_fraction: float, resources: dict[str, float]) -> dict[str, Any]:
    """A replica's Ray resources: its GPU fraction on GPU clusters, half a CPU otherwise."""
    opts: dict[str, Any] = {"num_gpus": gpu_fraction} if gpus_present else {"num_cpus": 0.5}
    if resources:
        opts["resources"] = dict(resources)
    return opts


class RoutingSettings(_Section):
    policy: Literal["cache_affinity", "power_of_two"] = Field(
        "cache_affinity", description="cache_affinity: to the replica that holds the request's cached prefix or "
                                      "pictures (deployments/routing.py); power_of_two: Serve's default router")
    imbalance: int = Field(8, ge=0, description="ongoing requests by which a request may put its preferred replica "
                                                "above the least loaded one before the least loaded takes it (half "
                                                "that for a request with no cached prefix)")
    index_size: int = Field(100_000, ge=1, description="keys each router remembers (least recently used evicted)")

    def serve_options(self, keys: str, block_size: int = 16) -> dict[str, Any]:
        if self.policy == "power_of_two":
            return {}
        from ray.serve.config import RequestRouterConfig

        from .routing import ROUTER_PATH

        return {"request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_PATH,
            request_router_kwargs={"keys": keys, "block_size": block_size, "imbalance": self.imbalance,
                                   "index_size": self.index_size})}


class IngressSettings(_Section):
    model_name: str = Field("vlm-serve-default", description="the model id the API reports and accepts")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that names none")
    max_images: int = Field(8, ge=0, description="images per request (and videos per request)")
    max_stop_strings: int = Field(32, ge=0, description="stop strings per request (400 above)")
    max_prompts: int = Field(32, ge=1, description="prompts of one /v1/completions request (400 above)")
    tool_parser: Literal["none", "hermes"] = Field(
        "none", description="how tool calls are read from an answer when the model decides (tool_choice auto): "
                            "hermes (<tool_call>{\"name\", \"arguments\"}</tool_call>, Qwen2 / NVILA style); none "
                            "refuses tool_choice auto")
    max_stop_chars: int = Field(4096, ge=1, description="characters of all a request's stop strings (400 above)")
    max_video_frames: int = Field(64, ge=1, description="frames per video part (VILA-family models sample them "
                                                        "down to num_video_frames)")
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, ge=1, description="encoded bytes per image (413 above)")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="pixels per image, checked before decoding "
                                                                     "(413)")
    max_request_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1, description="pixels of all images and video frames of "
                                                                       "one request, checked before decoding (413)")
    max_aspect_ratio: float = Field(MAX_ASPECT_RATIO, ge=1, description="longest over shortest side of a picture "
                                                                       "(400 above)")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1, description="request body size, checked before parsing "
                                                                      "(413)")
    max_prompt_chars: int | None = Field(None, ge=1, description="characters of message text, checked before "
                                                                 "tokenizing (400); default: the context length "
                                                                 "times the longest token's characters (at least 16)")
    body_timeout_s: float = Field(30.0, gt=0, description="deadline for receiving a request body (408)")
    max_concurrent_requests: int = Field(512, ge=1, description="generation requests one Ingress replica holds at "
                                                                "once; beyond: 503 + Retry-After")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 503 answers when queues are full")
    api_key: str | None = Field(None, description="when set, requests need 'Authorization: Bearer <key>'")
    allowed_file_dirs: tuple[str, ...] = Field((), description="folders file:// image URLs may read")
    allow_http_images: bool = Field(False, description="fetch http(s) image URLs (public addresses only)")
    allowed_image_hosts: tuple[str, ...] = Field((), description="hosts ('host' or 'host:port') fetched even at "
                                                                 "non-public addresses")
    http_timeout_s: float = Field(10.0, gt=0, description="deadline for one image fetch")
    media_uuid_cache: int = Field(64, ge=0, description="decoded pictures remembered by their `uuid` per Ingress "
                                                        "replica (a later request may send the uuid alone)")

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy.create(self.max_image_bytes, self.allowed_file_dirs, self.allow_http_images,
                                  self.http_timeout_s, self.allowed_image_hosts)

    def front_door(self) -> FrontDoorLimits:
        return FrontDoorLimits(self.api_key, self.max_request_bytes, self.body_timeout_s,
                               self.max_concurrent_requests, self.retry_after_s)

    def serve_options(self) -> dict[str, Any]:
        # the replica answers 503 itself past max_concurrent_requests; room beyond it for the
        # other routes (health, models) and for those answers
        return {"max_ongoing_requests": 2 * self.max_concurrent_requests}


class VisionSettings(_Section):
    gpus: float = Field(0.25, ge=0, description="GPU fraction per VisionEncoder replica on GPU clusters")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica (pins "
                                                                          "it to nodes that offer them)")
    max_batch_images: int = Field(32, ge=1, description="images (tiles) per tower forward, across requests")
    batch_wait_s: float = Field(0.002, ge=0, description="how long a vision batch waits to fill")
    cache_size: int = Field(512, ge=0, description="embeddings kept in each replica's LRU cache")
    routing: RoutingSettings = Field(default_factory=RoutingSettings, description="which replica encodes a "
                                                                                  "request's pictures")

    def serve_options(self, gpus_present: bool) -> dict[str, Any]:
        return {"max_ongoing_requests": 2 * self.max_batch_images,
                "ray_actor_options": _actor_options(gpus_present, self.gpus, self.resources),
                **self.routing.serve_options("media")}


class LLMSettings(_Section):
    gpus: float = Field(1.0, ge=0, description="GPU fraction per LLMServer replica on GPU clusters")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="EngineConfig fields")
    max_waiting_requests: int | None = Field(256, ge=0, description="requests a replica holds beyond "
                                                                    "engine.max_num_seqs before it answers 503; "
                                                                    "None: no limit")
    stream_interval_s: float = Field(0.02, ge=0, description="tokens made within this long of the last streamed "
                                                             "message are sent together (0: every step)")
    routing: RoutingSettings = Field(default_factory=RoutingSettings, description="which replica serves a request "
                                                                                  "(its cached prefix)")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v):
        if isinstance(v, dict):
            try:
                return EngineConfig(**v)
            except TypeError as e:      # an unknown field
                raise ValueError(f"engine: {e}") from None
        return v

    @property
    def max_in_flight(self) -> int | None:
        """Requests a replica takes before refusing the next one itself (None: no limit)."""
        if self.max_waiting_requests is None:
            return None
        return self.engine.max_num_seqs + self.max_waiting_requests

    def serve_options(self, gpus_present: bool) -> dict[str, Any]:
        # Serve must let every request the replica takes reach it, so that the replica, not
        # Serve's queue, answers the one beyond (503 + Retry-After)
        ongoing = self.max_in_flight or 5 * self.engine.max_num_seqs
        return {"max_ongoing_requests": ongoing,
                "ray_actor_options": _actor_options(gpus_present, self.gpus, self.resources),
                **self.routing.serve_options("prompt_blocks", self.engine.block_size)}


class AppSettings(_Section):
    model_dir: str | None = Field(None, description="checkpoint folder (llava-hf, original LLaVA or VILA layout); "
                                                    "default: the embedded AWQ model")
    dtype: str | None = None
    vision_tower_dir: str | None = Field(None, description="original LLaVA layout: where the vision tower that "
                                                           "mm_vision_tower names lies (its folder, or one holding it "
                                                           "under the id's last path component)")
    conv_mode: str | None = Field(None, description="original LLaVA layout: which of LLaVA's conversation templates "
                                                    "renders chat prompts (llava_v1, vicuna_v1, llava_v0, "
                                                    "llava_llama_2, mistral_instruct, chatml_direct, mpt, plain); "
                                                    "default: the tokenizer's chat template, else llava_v1")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="where VisionEncoder and LLMServer replicas run: gpu (their `gpus` fractions, "
                            "whether or not GPU nodes have joined yet), cpu, or auto (gpu when the cluster has "
                            "GPUs when the application is built: a laptop's `serve run`)")
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Serve options per deployment over the derived ones (e.g. "
                                          "{'LLMServer': {'max_queued_requests': 8}}); serve_config.yaml's "
                                          "`deployments` list does this for `serve run`")

    @model_validator(mode="after")
    def _check(self):
        if self.vision.max_batch_images < self.ingress.max_images:
            raise ValueError(f"vision.max_batch_images ({self.vision.max_batch_images}) must be at least "
                             f"ingress.max_images ({self.ingress.max_images})")
        unknown = set(self.deployments) - set(DEPLOYMENTS)
        if unknown:
            raise ValueError(f"deployments names unknown deployments {sorted(unknown)}; known: {DEPLOYMENTS}")
        given = self.deployments.get("LLMServer", {}).get("max_ongoing_requests")
        need = self.llm.max_in_flight
        if given is not None and need is not None and given < need:
            raise ValueError(f"LLMServer max_ongoing_requests ({given}) is below engine.max_num_seqs + "
                             f"max_waiting_requests ({need}): Serve would queue requests the replica should take")
        return self

    def load_options(self):
        from vlm_core.families import LoadOptions

        return LoadOptions(self.vision_tower_dir, self.conv_mode)

    def resolved_model_dir(self) -> str:
        if self.model_dir:
            return self.model_dir
        from vlm_core.default_model import default_model_dir

        return str(default_model_dir("awq"))

    def use_gpus(self, cluster_has_gpus) -> bool:
        """Whether replicas request GPUs; `cluster_has_gpus()` is asked only in auto mode."""
        return self.accelerator == "gpu" or (self.accelerator == "auto" and cluster_has_gpus())

    def serve_options(self, name: str, gpus_present: bool) -> dict[str, Any]:
        """A deployment's Serve options: derived from its section, then the `deployments` overrides."""
        derived = {"Ingress": lambda: self.ingress.serve_options(),
                   "VisionEncoder": lambda: self.vision.serve_options(gpus_present),
                   "LLMServer": lambda: self.llm.serve_options(gpus_present)}[name]()
        return {**derived, **self.deployments.get(name, {})}


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, sections merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
