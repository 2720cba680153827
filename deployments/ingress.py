"""Ingress deployment: the OpenAI-compatible HTTP API.

POST /v1/chat/completions   (stream or not; `usage` always in the final response / chunk)
GET  /v1/models, GET /health

The ingress validates the request, decodes images, applies the chat template and tokenizes
(no model weights here), sends the pixels to the VisionEncoder and passes that call's response
straight into the LLMServer call, so the embeddings travel vision replica -> object store ->
LLM replica without passing through the ingress.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from vlm_core.errors import InputError, VLMError
from vlm_core.inputs.image import load_image
from vlm_core.inputs.prompt import PromptBuilder, pixel_hash

from .protocol import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                       ChunkChoice, Delta, usage_of)

app = FastAPI(title="vlm-serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    return error_response(400, f"{where}: {first.get('msg', 'invalid request')}" if where else str(exc), param=where)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return error_response(exc.status, exc.message, exc.type, exc.param)


class Ingress:
    def __init__(self, vision, llm, model_dir: str, model_name: str = "vlm-serve-default",
                 max_image_bytes: int = 10 * 1024 * 1024, max_images: int = 8, default_max_tokens: int = 64,
                 allowed_file_dirs: list[str] | None = None, api_key: str | None = None):
        self.vision, self.llm = vision, llm
        self.inputs = PromptBuilder.from_pretrained(model_dir)
        self.model_name = model_name
        self.max_image_bytes, self.max_images = max_image_bytes, max_images
        self.default_max_tokens = default_max_tokens
        self.allowed_file_dirs = [Path(d).resolve() for d in (allowed_file_dirs or [])]
        self.created = int(time.time())
        self.api_key = api_key

    # ---- request parsing --------------------------------------------------------------------

    def _image_bytes(self, url: str) -> bytes:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise APIError(400, "image data URLs must be base64-encoded", param="image_url")
            if len(payload) * 3 // 4 > self.max_image_bytes:
                raise APIError(413, f"image is larger than {self.max_image_bytes} bytes", param="image_url")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(400, "image data URL is not valid base64", param="image_url") from None
        if url.startswith("file://"):
            path = Path(url[len("file://"):]).resolve()
            if not any(path.is_relative_to(d) for d in self.allowed_file_dirs):
                raise APIError(400, "file:// image paths are only allowed under the configured folders",
                               param="image_url")
            if not path.is_file():
                raise APIError(400, f"image file {path} does not exist", param="image_url")
            if path.stat().st_size > self.max_image_bytes:
                raise APIError(413, f"image is larger than {self.max_image_bytes} bytes", param="image_url")
            return path.read_bytes()
        if url.startswith(("http://", "https://")):
            raise APIError(400, "fetching images over http(s) is disabled on this server", param="image_url")
        raise APIError(400, "image_url must be a data: URL (or file:// where allowed)", param="image_url")

    def _prepare(self, body: ChatCompletionRequest):
        messages, images = [], []
        for m in body.messages:
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for p in m.content:
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text})
                else:
                    images.append(self._image_bytes(p.image_url.url))
                    parts.append({"type": "image"})
            messages.append({"role": m.role, "content": parts})
        if len(images) > self.max_images:
            raise APIError(400, f"at most {self.max_images} images per request", param="messages")
        try:
            sampling = body.sampling(self.default_max_tokens)
            prompt, pixels = self.inputs.prepare(messages, [load_image(b) for b in images])
        except InputError as e:
            raise APIError(400, str(e)) from None
        except VLMError as e:
            raise APIError(400, str(e)) from None
        return prompt, pixels, sampling

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
        first = await anext(chunks)   # errors before the first byte still get a status code

        async def sse():
            yield f"data: {first.model_dump_json(exclude_none=True)}\n\n"
            try:
                async for c in chunks:
                    yield f"data: {c.model_dump_json(exclude_none=True)}\n\n"
            except Exception as e:  # the replica failed mid-stream: end with an error event, never hang
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'code': 500}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    # ---- Python handle API (also what the HTTP routes use) -------------------------------------

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion:
        """One chat completion. From another Ray job:
        `serve.get_app_handle("vlm").chat.remote(ChatCompletionRequest(...)).result()`."""
        rid, stream = self._start(body)
        text, last = "", None
        async for out in stream:
            text += out["text"]
            last = out
        return ChatCompletion(id=rid, created=int(time.time()), model=self.model_name,
                              choices=[Choice(message=AssistantMessage(content=text),
                                              finish_reason=last["finish_reason"])],
                              usage=usage_of(last))

    async def chat_stream(self, body: ChatCompletionRequest, include_usage: bool = True
                          ) -> AsyncIterator[ChatCompletionChunk]:
        """Streamed chat completion chunks (use `handle.options(stream=True).chat_stream.remote(...)`)."""
        rid, stream = self._start(body)
        created = int(time.time())

        def chunk(delta: Delta, finish=None, usage=None, choices=True) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name, usage=usage,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])

        yield chunk(Delta(role="assistant", content=""))
        last = None
        async for out in stream:
            last = out
            if out["text"] or out["finish_reason"]:
                yield chunk(Delta(content=out["text"] or None), out["finish_reason"])
        if include_usage and last is not None:
            yield chunk(Delta(), usage=usage_of(last), choices=False)

    def _start(self, body: ChatCompletionRequest):
        prompt, pixels, sampling = self._prepare(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        hashes = [pixel_hash(p) for p in pixels]
        embeds = self.vision.encode.remote(pixels, hashes) if hashes else []
        stream = self.llm.options(stream=True).generate.remote(
            rid, list(prompt.token_ids), [(s.offset, s.length) for s in prompt.spans], embeds, hashes, sampling)
        return rid, stream

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error")


# Applied at import so every process that imports this module (driver and replicas) turns the
# routes above into methods of the same class-based view.
ServeIngress = serve.ingress(app)(Ingress)
