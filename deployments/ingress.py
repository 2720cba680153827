"""Ingress deployment: the OpenAI-compatible HTTP API.

POST /v1/chat/completions   (stream or not; `usage` always in the final response / chunk)
GET  /v1/models, GET /health

The ingress validates the request, decodes images, applies the chat template and tokenizes
(no model weights here), sends the media items to the VisionEncoder and passes that call's response
straight into the LLMServer call, so the embeddings travel vision replica -> object store ->
LLM replica without passing through the ingress.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from vlm_core.errors import ImageTooLargeError, VLMError
from vlm_core.inputs.image import MAX_IMAGE_PIXELS, load_image
from vlm_core.inputs.prompt import prompt_builder

from .media import ImagePolicy, read_image_url
from .protocol import (APIError, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                       Choice, ChunkChoice, Delta, ServerOverloadedError, usage_of)

app = FastAPI(title="vlm-serve")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    e = APIError(400, f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", str(exc)),
                 param=where or None)
    return JSONResponse(e.body(), status_code=400)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@dataclass(frozen=True)
class IngressOptions:
    model_name: str = "vlm-serve-default"
    max_images: int = 8
    max_video_frames: int = 64
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    default_max_tokens: int = 64
    allowed_file_dirs: tuple[str, ...] = field(default_factory=tuple)
    allow_http_images: bool = False
    http_timeout_s: float = 10.0
    api_key: str | None = None
    retry_after_s: int = 1


def api_error_of(e: BaseException, retry_after_s: int = 1) -> APIError:
    """The client-facing error for an exception raised by a downstream deployment call."""
    seen = e
    while seen is not None:
        if isinstance(seen, APIError):
            return seen
        if isinstance(seen, (BackPressureError, ServerOverloadedError)):
            return APIError(503, "the server is at capacity; retry later", "server_overloaded",
                            headers={"Retry-After": str(retry_after_s)})
        if isinstance(seen, RayActorError):   # a replica died with this request in flight
            return APIError(503, f"a serving replica failed during the request; retry ({type(seen).__name__})",
                            "server_error", headers={"Retry-After": str(retry_after_s)})
        if isinstance(seen, ImageTooLargeError):
            return APIError(413, str(seen), param="image_url")
        if isinstance(seen, VLMError):
            return APIError(400, str(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


class Ingress:
    def __init__(self, vision, llm, model_dir: str, options: IngressOptions = IngressOptions()):
        self.vision, self.llm = vision, llm
        self.inputs = prompt_builder(model_dir)      # LLaVA or VILA-family prompts; no weights
        self.options = o = options
        self.model_name = o.model_name
        self.max_model_len = self.inputs.config.text.max_position_embeddings
        self.policy = ImagePolicy.create(o.max_image_bytes, o.allowed_file_dirs, o.allow_http_images, o.http_timeout_s)
        self.created = int(time.time())
        self._http = None

    # ---- request parsing --------------------------------------------------------------------

    async def _prepare(self, body: ChatCompletionRequest):
        o = self.options
        if body.model not in (None, self.model_name):
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model")
        messages, urls, videos = [], [], []
        for m in body.messages:
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for p in m.content:
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text})
                elif p.type == "video":
                    if len(p.video.frames) > o.max_video_frames:
                        raise APIError(400, f"a video of {len(p.video.frames)} frames; at most {o.max_video_frames} "
                                            f"are allowed", param="messages")
                    videos.append(p.video.frames)
                    parts.append({"type": "video"})
                else:
                    urls.append(p.image_url.url)
                    parts.append({"type": "image"})
            messages.append({"role": m.role, "content": parts})
        for what, n in (("images", len(urls)), ("videos", len(videos))):
            if n > o.max_images:
                raise APIError(400, f"{n} {what} in the request; at most {o.max_images} are allowed", param="messages")
        if self.policy.allow_http and self._http is None:
            import httpx

            self._http = httpx.AsyncClient(follow_redirects=True, max_redirects=3)
        frame_urls = [u for frames in videos for u in frames]
        datas = await asyncio.gather(*(read_image_url(u, self.policy, self._http) for u in urls + frame_urls))

        def work():   # image decoding and tokenization, off the event loop
            try:
                sampling = body.sampling(o.default_max_tokens)
                pictures = iter([load_image(b, o.max_image_pixels) for b in datas])
                media = {"image": [next(pictures) for _ in urls], "video": [[next(pictures) for _ in v] for v in videos]}
                prompt, items = self.inputs.prepare_media(messages, {k: v for k, v in media.items() if v})
                return prompt, items, sampling
            except VLMError as e:
                raise api_error_of(e) from None

        prompt, items, sampling = await asyncio.to_thread(work)
        if len(prompt) >= self.max_model_len:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                                f"{self.max_model_len} tokens", param="messages")
        return prompt, items, sampling

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "vlm-serve"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._authorize(request)
        if not body.stream:
            return await self.chat(body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = self.chat_stream(body, include_usage)
        first = await anext(chunks)   # the engine has accepted the request: errors so far get a status code

        async def sse():
            try:
                yield f"data: {first.model_dump_json(exclude_none=True)}\n\n"
                async for c in chunks:
                    yield f"data: {c.model_dump_json(exclude_none=True)}\n\n"
            except Exception as e:  # a replica failed mid-stream: end with an error event, never hang
                yield f"data: {json.dumps(api_error_of(e).body())}\n\n"
            finally:
                await chunks.aclose()    # a disconnected client aborts its request in the engine
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    # ---- Python handle API (also what the HTTP routes use) -------------------------------------

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion:
        """One chat completion. From another Ray job:
        `serve.get_app_handle("vlm").chat.remote(ChatCompletionRequest(...)).result()`.
        Errors are raised as `APIError` (status, message, type, param)."""
        rid, stream, out = await self._start(body)
        text = ""
        try:
            while out is not None:
                text += out["text"]
                last = out
                out = await anext(stream, None)
        except BaseException as e:   # failed or cancelled mid-generation: stop the engine's work too
            stream.cancel()
            if isinstance(e, Exception):
                raise api_error_of(e, self.options.retry_after_s) from None
            raise
        return ChatCompletion(id=rid, created=int(time.time()), model=self.model_name,
                              choices=[Choice(message=AssistantMessage(content=text),
                                              finish_reason=last["finish_reason"])],
                              usage=usage_of(last))

    async def chat_stream(self, body: ChatCompletionRequest, include_usage: bool = True
                          ) -> AsyncIterator[ChatCompletionChunk]:
        """Streamed chat completion chunks (use `handle.options(stream=True).chat_stream.remote(...)`).
        Closing the stream early aborts the request in the engine."""
        rid, stream, out = await self._start(body)
        created = int(time.time())

        def chunk(delta: Delta, finish=None, usage=None, choices=True) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name, usage=usage,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])

        last = None
        try:
            yield chunk(Delta(role="assistant", content=""))
            while out is not None:
                last = out
                if out["text"] or out["finish_reason"]:
                    yield chunk(Delta(content=out["text"] or None), out["finish_reason"])
                out = await anext(stream, None)
        except Exception as e:
            stream.cancel()
            raise api_error_of(e, self.options.retry_after_s) from None
        finally:
            if out is not None:      # the consumer left early (closed, disconnected, cancelled)
                stream.cancel()
        if include_usage and last is not None:
            yield chunk(Delta(), usage=usage_of(last), choices=False)

    async def _start(self, body: ChatCompletionRequest):
        """Validate, send images to the vision deployment and the prompt to the LLM deployment;
        returns once the engine has accepted the request (its first output in hand)."""
        prompt, items, sampling = await self._prepare(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        hashes = [it.hash for it in items]
        # the vision call's response goes straight into the LLM call: the embeddings move
        # vision replica -> object store -> LLM replica and never through this process
        embeds = None
        if hashes:
            embeds = self.vision.encode.remote(items, hashes)
            await self._wait_done(embeds)
        stream = self.llm.options(stream=True).generate.remote(
            rid, list(prompt.token_ids), [(s.offset, s.length) for s in prompt.spans], embeds, hashes, sampling)
        try:
            first = await anext(stream)
        except Exception as e:   # not admitted (queue full, invalid for the engine, replica gone)
            raise api_error_of(e, self.options.retry_after_s) from None
        return rid, stream, first

    async def _wait_done(self, response) -> None:
        """Wait until a deployment response is computed, without fetching its value here.

        The LLM call is routed only then, so its queue limit (`max_queued_requests`) sees it as
        queued the moment it is: Serve checks that limit when a call is made, and a call whose
        argument is still being computed would not count yet.
        """
        import ray

        try:
            ref = await response._to_object_ref()
            await asyncio.to_thread(ray.wait, [ref], fetch_local=False)
        except Exception as e:
            raise api_error_of(e, self.options.retry_after_s) from None

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error")


# Applied at import so every process that imports this module (driver and replicas) turns the
# routes above into methods of the same class-based view.
ServeIngress = serve.ingress(app)(Ingress)
