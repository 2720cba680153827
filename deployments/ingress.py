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
import dataclasses
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm_core.engine.request import EngineRequest, RequestOutput, merge_outputs
from vlm_core.errors import ImageTooLargeError, VLMError
from vlm_core.families import LoadOptions, load_processor
from vlm_core.inputs.image import decode_image, open_image
from vlm_core.inputs.placeholders import MultimodalPrompt

from .frontdoor import FrontDoor
from .media import new_http_client, read_image_url
from .metrics import routing_decisions, routing_probes
from .protocol import (APIError, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                       Choice, ChoiceLogprobs, ChunkChoice, Completion, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, Delta, DetokenizeRequest, DetokenizeResponse, ErrorResponse, FunctionCall,
                       Health, ModelCard, ModelList, PromptLogprob, ServerOverloadedError, TokenizeRequest,
                       TokenizeResponse, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Version, usage_of)
from .settings import IngressSettings

log = logging.getLogger("ray.serve")

app = FastAPI(title="vlm-serve", description="OpenAI-compatible chat completions for LLaVA-family VLMs")
app.add_middleware(FrontDoor)

_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
           408: "request body too slow", 413: "request body or image too large",
           500: "internal error (the message carries a request id)", 503: "at capacity; retry after Retry-After"}


# one server-sent event of a streamed answer (stream: true)
SSE_EVENT = {"type": "object", "required": ["data"], "description": "one server-sent event (stream: true)",
             "properties": {"event": {"type": "string"},
                            "data": {"type": "string", "contentMediaType": "application/json",
                                     "description": "a ChatCompletionChunk as JSON (an ErrorResponse if the stream "
                                                    "fails); the last event's data is [DONE]"}}}


def error_responses(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}


def _openapi() -> dict:
    """The schema without FastAPI's 422 (this server answers validation errors with 400)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "tuple"}


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    # our own checks (value errors) say more than "not a string" from another branch of a union
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    # drop pydantic's union-branch tags ("str", "list[...]", "function-after[...]") from the location
    loc = [p for p in first.get("loc", ()) if isinstance(p, int) or (str(p).isidentifier() and p not in _TYPE_TAGS)]
    if first.get("type") == "json_invalid":
        e = APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
        return JSONResponse(e.body(), status_code=400)
    where = ".".join(str(p) for p in loc[1:])
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    e = APIError(400, f"{where}: {msg}" if where else msg, param=where or None)
    return JSONResponse(e.body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 400:   # the body could not be decoded at all (not UTF-8, nested too deeply)
        message = "the request body is not valid JSON in UTF-8 (or nests too deeply)"
    elif exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    e = APIError(exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error")
    return JSONResponse(e.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    e = api_error_of(exc)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def api_error_of(e: BaseException, retry_after_s: int = 1, request_id: str | None = None) -> APIError:
    """The client-facing error for an exception. Anything not a client error becomes a 500 that
    says "internal error" and a request id; the log line for it carries the id and the traceback."""
    seen = e
    while seen is not None:
        if isinstance(seen, APIError):
            return seen
        if isinstance(seen, (BackPressureError, ServerOverloadedError)):
            return APIError(503, "the server is at capacity; retry later", "server_overloaded",
                            headers={"Retry-After": str(retry_after_s)})
        if isinstance(seen, RayActorError):   # a replica died with this request in flight
            return APIError(503, "a serving replica failed during the request; retry", "server_error",
                            headers={"Retry-After": str(retry_after_s)})
        if isinstance(seen, ImageTooLargeError):
            return APIError(413, str(seen), param="image_url")
        if isinstance(seen, VLMError):
            return APIError(400, str(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    log.error("internal error in request %s", request_id, exc_info=e)
    return APIError(500, f"internal error (request id {request_id})", "server_error")


def text_chars(body: ChatCompletionRequest) -> int:
    """Characters of text in the request's messages."""
    n = 0
    for m in body.messages:
        parts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content if p.type == "text"]
        n += sum(len(t) for t in parts)
    return n


class Ingress:
    def __init__(self, vision, llm, model_dir: str, settings: IngressSettings = IngressSettings(),
                 options: LoadOptions | None = None):
        self.vision, self.llm = vision, llm
        self.inputs = load_processor(model_dir, options=options)      # the family's processor; no weights
        self.options = o = settings
        self.model_name = o.model_name
        self.max_model_len = self.inputs.config.text.max_position_embeddings
        self.max_prompt_chars = o.max_prompt_chars or self.max_model_len * max(
            16, max(len(t) for t in self.inputs.tokenizer.get_vocab()))
        self.policy = o.image_policy()
        self.front_door = o.front_door()      # what the middleware checks before any route runs
        self.created = int(time.time())
        self._media_token_ids = self.inputs.media_token_ids
        self._uuid_images: OrderedDict = OrderedDict()       # uuid -> decoded picture, least recent first
        self._http = None

    # ---- request parsing --------------------------------------------------------------------

    def _check_fields(self, body) -> None:
        """Fields not served (400 naming them), unknown fields (a warning), the model name (404)."""
        refused = body.refusal()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0])
        unknown = body.unknown_fields()
        if unknown:
            log.warning("ignoring fields that are neither OpenAI's nor documented extensions: %s", ", ".join(unknown))
        self._check_model(body.model)

    def _check_model(self, model: str | None) -> None:
        if model not in (None, self.model_name):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model")

    def _check_shape(self, body: ChatCompletionRequest) -> None:
        """Limits that need no fetching, decoding or tokenizing."""
        o = self.options
        self._check_fields(body)
        chars = text_chars(body)
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the messages hold {chars} characters of text; at most {self.max_prompt_chars} "
                                f"are accepted (this model's context is {self.max_model_len} tokens)",
                           param="messages")
        parts = [p for m in body.messages if not isinstance(m.content, str) for p in m.content]
        videos = [p for p in parts if p.type == "video"]
        if videos and "video" not in self.inputs.media_kinds:
            raise APIError(400, "this model takes images only: video parts are not supported", param="messages")
        for what, n in (("images", sum(p.type == "image_url" for p in parts)), ("videos", len(videos))):
            if n > o.max_images:
                raise APIError(400, f"{n} {what} in the request; at most {o.max_images} are allowed", param="messages")
        for v in videos:
            if len(v.video.frames) > o.max_video_frames:
                raise APIError(400, f"a video of {len(v.video.frames)} frames; at most {o.max_video_frames} "
                                    f"are allowed", param="messages")

    async def _prepare(self, body: ChatCompletionRequest):
        o = self.options
        self._check_shape(body)
        sampling = body.sampling(o.default_max_tokens)
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
                    videos.append(self.inputs.select_frames(p.video.frames))   # only the frames the model sees
                    parts.append({"type": "video"})
                else:
                    urls.append(p)
                    parts.append({"type": "image"})
            messages.append({"role": m.role, "content": parts})
        if self.policy.allow_http and self._http is None:
            self._http = new_http_client()
        # a part naming a uuid this replica remembers is not fetched or decoded again
        known = {p.uuid: im for p in urls if p.image_url is None and (im := self._uuid_images.get(p.uuid)) is not None}
        missing = [p.uuid for p in urls if p.image_url is None and p.uuid not in known]
        if missing:
            raise APIError(400, f"media uuid {missing[0]!r} is not known to this server; send the picture with its "
                                f"image_url (and uuid) first", param="messages")
        fetch = [p.image_url.url for p in urls if p.image_url is not None] + [u for frames in videos for u in frames]
        unique = list(dict.fromkeys(fetch))     # a short video's sampled frames repeat: each is read once
        datas = dict(zip(unique, await asyncio.gather(*(read_image_url(u, self.policy, self._http) for u in unique))))

        def work():   # image decoding and tokenization, off the event loop
            try:
                headers = {u: open_image(b, o.max_image_pixels, o.max_aspect_ratio) for u, b in datas.items()}
                opened = iter([headers[u] for u in fetch])
                sized = [known[p.uuid] if p.image_url is None else next(opened) for p in urls]
                frames = [[next(opened) for _ in v] for v in videos]
                pixels = sum(im.width * im.height for im in sized + [f for v in frames for f in v])
                if pixels > o.max_request_pixels:
                    raise APIError(413, f"the request's pictures hold {pixels} pixels; at most {o.max_request_pixels}"
                                        f" per request are accepted", param="messages")
                images = [im if p.image_url is None else decode_image(im) for p, im in zip(urls, sized)]
                for p, im in zip(urls, images):
                    if p.uuid is not None and p.image_url is not None:
                        self._remember(p.uuid, im)
                media = {"image": images, "video": [[decode_image(f) for f in v] for v in frames]}
                return self.inputs.prepare_media(messages, {k: v for k, v in media.items() if v})
            except VLMError as e:
                raise api_error_of(e) from None

        prompt, items = await asyncio.to_thread(work)
        return prompt, items, self._fit(body, prompt, sampling, "messages")

    def _remember(self, uuid: str, image) -> None:
        if self.options.media_uuid_cache == 0:
            return
        self._uuid_images[uuid] = image
        self._uuid_images.move_to_end(uuid)
        while len(self._uuid_images) > self.options.media_uuid_cache:
            self._uuid_images.popitem(last=False)

    def _fit(self, body, prompt, sampling, prompt_field: str):
        """The prompt within the context, and max_tokens within what is left (400 naming the field
        when asked beyond it; the server default is cut to fit)."""
        if len(prompt) >= self.max_model_len:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                                f"{self.max_model_len} tokens", param=prompt_field)
        room = self.max_model_len - len(prompt)
        asked = body.requested_max_tokens()
        if asked is not None and asked > room:
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"this model's context is {self.max_model_len} tokens; the prompt takes "
                                f"{len(prompt)}, so at most {room} can be generated, but {field} is {asked}",
                           param=field)
        if asked is None and sampling.max_new_tokens > room:     # the default never exceeds the context
            sampling = dataclasses.replace(sampling, max_new_tokens=room, min_tokens=min(sampling.min_tokens, room))
        return sampling

    async def _prepare_text(self, body: CompletionRequest):
        """A text completion's prompt: its text tokenized as it is (no chat template), or its ids."""
        self._check_fields(body)
        sampling = body.sampling(self.options.default_max_tokens)
        given = body.text_or_ids()
        if isinstance(given, str):
            if len(given) > self.max_prompt_chars:
                raise APIError(400, f"the prompt holds {len(given)} characters; at most {self.max_prompt_chars} "
                                    f"are accepted", param="prompt")
            try:
                prompt, _ = await asyncio.to_thread(self.inputs.prepare_media, given, {}, False)
            except VLMError as e:
                raise api_error_of(e) from None
        else:
            vocab = len(self.inputs.tokenizer)
            bad = next((t for t in given if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            prompt = MultimodalPrompt(tuple(given), ())
            if any(t in self._media_token_ids for t in given):
                raise APIError(400, "the prompt's token ids hold a media placeholder; text completions take no "
                                    "media", param="prompt")
        return prompt, self._fit(body, prompt, sampling, "prompt")

    def _logprobs(self, entries) -> ChoiceLogprobs:
        """OpenAI's logprobs shape for engine `TokenLogprobs` (each token as decoded text and its bytes)."""
        def tok(i: int) -> tuple[str, list[int]]:
            text = self.inputs.tokenizer.decode([i])
            return text, list(text.encode("utf-8"))

        content = []
        for e in entries:
            text, raw = tok(e.token_id)
            top = [TopLogprob(token=t, logprob=lp, bytes=b) for t, b, lp in
                   ((*tok(i), lp) for i, lp in e.top)]
            content.append(TokenLogprob(token=text, logprob=e.logprob, bytes=raw, top_logprobs=top))
        return ChoiceLogprobs(content=content)

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health", response_model=Health)
    async def health(self):
        return Health()

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    async def models(self):
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=error_responses(401, 404))
    async def model_card(self, model: str):
        self._check_model(model)
        return ModelCard(id=self.model_name, created=self.created)

    @app.get("/version", response_model=Version, responses=error_responses(401))
    async def version(self):
        return Version(version=package_version())

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404))
    async def tokenize(self, body: TokenizeRequest):
        """vLLM's /tokenize: a text prompt, or text-only chat messages rendered with the chat template."""
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        tok = self.inputs.tokenizer
        if body.prompt is not None:
            if len(body.prompt) > self.max_prompt_chars:
                raise APIError(400, f"the prompt holds {len(body.prompt)} characters; at most "
                                    f"{self.max_prompt_chars} are accepted", param="prompt")
            ids = list(tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        else:
            if any(not isinstance(m.content, str) and any(p.type != "text" for p in m.content) for m in body.messages):
                raise APIError(400, "/tokenize takes text messages only (media expand when a request is served)",
                               param="messages")
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                         "".join(p.text for p in m.content)} for m in body.messages]
            if sum(len(m["content"]) for m in messages) > self.max_prompt_chars:
                raise APIError(400, f"the messages hold more than {self.max_prompt_chars} characters",
                               param="messages")
            ids = list(self.inputs.prepare_media(messages, {}, True)[0].token_ids)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids,
                                token_strs=tok.convert_ids_to_tokens(ids) if body.return_token_strs else None)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404))
    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        vocab = len(self.inputs.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return DetokenizeResponse(prompt=self.inputs.tokenizer.decode(body.tokens))

    @app.post("/v1/completions", response_model=Completion,
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
                         **error_responses(400, 401, 404, 408, 413, 500, 503)})
    async def completions(self, body: CompletionRequest):
        if not body.stream:
            return await self.complete(body)
        rid = new_request_id()
        return await self._sse(self.complete_stream(body, request_id=rid), rid)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
                         **error_responses(400, 401, 404, 408, 413, 500, 503)})
    async def chat_completions(self, body: ChatCompletionRequest):
        if not body.stream:
            return await self.chat(body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rid = new_request_id()
        return await self._sse(self.chat_stream(body, include_usage, request_id=rid), rid)

    @staticmethod
    async def _sse(chunks, rid: str) -> StreamingResponse:
        """Server-sent events of a chunk stream; errors before the first chunk get a status code."""
        first = await anext(chunks)   # the engine has accepted the request

        async def sse():
            try:
                yield f"data: {first.model_dump_json(exclude_none=True)}\n\n"
                async for c in chunks:
                    yield f"data: {c.model_dump_json(exclude_none=True)}\n\n"
            except Exception as e:  # a replica failed mid-stream: end with an error event, never hang
                yield f"data: {json.dumps(api_error_of(e, request_id=rid).body())}\n\n"
            finally:
                await chunks.aclose()    # a disconnected client aborts its request in the engine
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    # ---- Python handle API (also what the HTTP routes use) -------------------------------------

    async def _gather(self, stream, out, rid: str) -> dict[int, RequestOutput]:
        """Every choice's whole output (deltas merged), by index."""
        merged: dict[int, RequestOutput] = {}
        try:
            while out is not None:
                merged[out.index] = merge_outputs(merged[out.index], out) if out.index in merged else out
                out = await anext(stream, None)
        except BaseException as e:   # failed or cancelled mid-generation: stop the engine's work too
            stream.cancel()
            if isinstance(e, Exception):
                raise api_error_of(e, self.options.retry_after_s, rid) from None
            raise
        return dict(sorted(merged.items()))

    def stats(self) -> dict:
        """This replica's figures: its process id, the routing decisions its handles made
        (`deployments/routing.py`) and how many times they asked the replicas their queues, per
        deployment."""
        return {"pid": os.getpid(), "routing": routing_decisions(), "routing_probes": routing_probes()}

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion:
        """One chat completion (n choices). From another Ray job:
        `serve.get_app_handle("vlm").chat.remote(ChatCompletionRequest(...)).result()`.
        Errors are raised as `APIError` (status, message, type, param)."""
        rid = new_request_id()
        try:
            stream, out = await self._start(body, rid)
        except Exception as e:
            raise api_error_of(e, self.options.retry_after_s, rid) from None
        outs = await self._gather(stream, out, rid)
        choices = []
        for i, o in outs.items():
            message, finish = self._message(body, o.text, o.finish_reason)
            choices.append(Choice(index=i, message=message, finish_reason=finish,
                                  logprobs=self._logprobs(o.logprobs or []) if body.logprobs else None))
        return ChatCompletion(id=rid, created=int(time.time()), model=self.model_name, usage=usage_of(outs.values()),
                              choices=choices, prompt_logprobs=self._prompt_logprobs(outs[0]))

    @staticmethod
    def _message(body: ChatCompletionRequest, text: str, finish: str | None) -> tuple[AssistantMessage, str | None]:
        """The assistant message of a finished choice: its text, or for a forced tool call the call."""
        call = body.tool_call_of(text) if body.calls_tool() else None
        if call is None:
            return AssistantMessage(content=text), finish
        return (AssistantMessage(content=None, tool_calls=[ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                                                                   function=FunctionCall(name=call[0],
                                                                                         arguments=call[1]))]),
                "tool_calls" if finish == "stop" else finish)

    async def chat_stream(self, body: ChatCompletionRequest, include_usage: bool = True,
                          request_id: str | None = None) -> AsyncIterator[ChatCompletionChunk]:
        """Streamed chat completion chunks (use `handle.options(stream=True).chat_stream.remote(...)`),
        each for one choice (`index`). Closing the stream early aborts the request in the engine."""
        rid = request_id or new_request_id()
        try:
            stream, out = await self._start(body, rid)
        except Exception as e:
            raise api_error_of(e, self.options.retry_after_s, rid) from None
        created = int(time.time())

        every = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(delta: Delta, index=0, finish=None, usage=None, choices=True, logprobs=None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=self.model_name, usage=usage,
                                       choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish,
                                                            logprobs=logprobs)] if choices else [])

        latest: dict[int, RequestOutput] = {}
        tool = body.calls_tool()        # a forced tool call goes out whole, as the choice's last delta
        texts: dict[int, str] = {}
        try:
            for i in range(body.n):
                yield chunk(Delta(role="assistant", content=None if tool else ""), i)
            while out is not None:
                latest[out.index] = out
                usage = usage_of(latest.values()) if every else None
                lp = self._logprobs(out.logprobs or []) if body.logprobs else None
                if tool:
                    texts[out.index] = texts.get(out.index, "") + out.text
                    if out.finish_reason is not None:
                        message, finish = self._message(body, texts[out.index], out.finish_reason)
                        calls = [ToolCallDelta(index=0, **c.model_dump()) for c in message.tool_calls or ()]
                        yield chunk(Delta(content=message.content, tool_calls=calls or None), out.index, finish,
                                    usage=usage, logprobs=lp)
                    elif out.logprobs:
                        yield chunk(Delta(), out.index, usage=usage, logprobs=lp)
                elif out.text or out.finish_reason or out.logprobs:
                    yield chunk(Delta(content=out.text or None), out.index, out.finish_reason, usage=usage, logprobs=lp)
                out = await anext(stream, None)
        except Exception as e:
            stream.cancel()
            raise api_error_of(e, self.options.retry_after_s, rid) from None
        finally:
            if out is not None:      # the consumer left early (closed, disconnected, cancelled)
                stream.cancel()
        if include_usage and latest:
            yield chunk(Delta(), usage=usage_of(latest.values()), choices=False)

    async def complete(self, body: CompletionRequest) -> Completion:
        """One text completion (n choices; no chat template). From another Ray job:
        `serve.get_app_handle("vlm").complete.remote(CompletionRequest(...)).result()`."""
        rid = new_request_id().replace("chatcmpl-", "cmpl-")
        try:
            prompt, sampling = await self._prepare_text(body)
            stream, out = await self._submit(prompt, [], sampling, rid, body.priority)
        except Exception as e:
            raise api_error_of(e, self.options.retry_after_s, rid) from None
        outs = await self._gather(stream, out, rid)
        echo = self._echo(body, prompt) if body.echo else ""
        echoed = self._echo_logprobs(body, prompt, outs[0].prompt_logprobs)
        scored = self._prompt_logprobs(outs[0]) if body.prompt_logprobs is not None else None   # one for all choices
        return Completion(
            id=rid, created=int(time.time()), model=self.model_name, usage=usage_of(outs.values()),
            choices=[CompletionChoice(index=i, text=echo + o.text, finish_reason=o.finish_reason,
                                      logprobs=self._completion_logprobs(o.logprobs or [], body.logprobs, echoed)
                                      if body.logprobs is not None else None, prompt_logprobs=scored)
                     for i, o in outs.items()])

    async def complete_stream(self, body: CompletionRequest, request_id: str | None = None
                              ) -> AsyncIterator[Completion]:
        """Streamed text-completion chunks (`handle.options(stream=True).complete_stream.remote(...)`)."""
        rid = request_id or new_request_id().replace("chatcmpl-", "cmpl-")
        try:
            prompt, sampling = await self._prepare_text(body)
            stream, out = await self._submit(prompt, [], sampling, rid, body.priority)
        except Exception as e:
            raise api_error_of(e, self.options.retry_after_s, rid) from None
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        every = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(text: str, index=0, out=None, usage=None, choices=True, lp=None) -> Completion:
            if out is not None and body.logprobs is not None:
                lp = self._completion_logprobs(out.logprobs or [], body.logprobs)
            return Completion(id=rid, created=created, model=self.model_name, usage=usage,
                              choices=[CompletionChoice(index=index, text=text, logprobs=lp,
                                                        finish_reason=out.finish_reason if out else None)]
                              if choices else [])

        latest: dict[int, RequestOutput] = {}
        try:
            if body.echo:
                echoed = self._echo_logprobs(body, prompt, out.prompt_logprobs)
                lp = self._completion_logprobs([], body.logprobs, echoed) if echoed is not None else None
                for i in range(body.n):
                    yield chunk(self._echo(body, prompt), i, lp=lp)
            while out is not None:
                latest[out.index] = out
                if out.text or out.finish_reason or out.logprobs:
                    yield chunk(out.text, out.index, out, usage=usage_of(latest.values()) if every else None)
                out = await anext(stream, None)
        except Exception as e:
            stream.cancel()
            raise api_error_of(e, self.options.retry_after_s, rid) from None
        finally:
            if out is not None:
                stream.cancel()
        if include_usage and latest:
            yield chunk("", usage=usage_of(latest.values()), choices=False)

    def _echo(self, body: CompletionRequest, prompt) -> str:
        given = body.text_or_ids()
        return given if isinstance(given, str) else self.inputs.tokenizer.decode(list(prompt.token_ids))

    def _completion_logprobs(self, entries, k: int, echoed: list | None = None) -> CompletionLogprobs:
        """The legacy completions shape: parallel lists of tokens, their logprobs, top dicts (k
        entries), offsets. `echoed`: the prompt's tokens first — (token id, `TokenLogprobs` or None
        for the first) — as echo with logprobs gives them."""
        tokens, offsets, pos, lps, tops = [], [], 0, [], []
        decode = self.inputs.tokenizer.decode
        for token, e in [*(echoed or []), *((e.token_id, e) for e in entries)]:
            text = decode([token])
            tokens.append(text)
            offsets.append(pos)
            pos += len(text)
            lps.append(e.logprob if e is not None else None)
            tops.append({decode([i]): lp for i, lp in e.top[:k]} if e is not None else None)
        return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    @staticmethod
    def _echo_logprobs(body: CompletionRequest, prompt, scored) -> list | None:
        """(token id, its `TokenLogprobs`) for each prompt token, when echo with logprobs asks for them."""
        if not (body.echo and body.logprobs is not None and scored is not None):
            return None
        return list(zip(prompt.token_ids, [None, *scored]))

    def _prompt_logprobs(self, out: RequestOutput) -> list | None:
        """vLLM's `prompt_logprobs`: None for the first prompt token, then for each one a dict of its
        own entry and the k most likely tokens there (token id -> logprob, rank, decoded token)."""
        if out.prompt_logprobs is None:
            return None
        decode = self.inputs.tokenizer.decode
        result: list = [None]
        for e in out.prompt_logprobs:
            entry = {str(t): PromptLogprob(logprob=lp, rank=r, decoded_token=decode([t]))
                     for r, (t, lp) in enumerate(e.top, start=1)}
            entry.setdefault(str(e.token_id), PromptLogprob(logprob=e.logprob, rank=e.rank,
                                                            decoded_token=decode([e.token_id])))
            result.append(entry)
        return result

    async def _start(self, body: ChatCompletionRequest, rid: str):
        """Validate, send images to the vision deployment and the prompt to the LLM deployment;
        returns once the engine has accepted the request (its first output in hand)."""
        prompt, items, sampling = await self._prepare(body)
        return await self._submit(prompt, items, sampling, rid, body.priority)

    async def _submit(self, prompt, items, sampling, rid: str, priority: int = 0):
        hashes = [it.hash for it in items]
        # the vision call's response goes straight into the LLM call: the embeddings move
        # vision replica -> object store -> LLM replica and never through this process
        embeds = None
        if hashes:
            embeds = self.vision.encode.remote(items, hashes)
            await self._wait_done(embeds)
        request = EngineRequest(prompt, (), sampling, tuple(hashes), priority)
        stream = LLMStream(self.llm, rid, request, embeds)
        first = await anext(stream)   # raises when not admitted (queue full, invalid)
        return stream, first

    async def _wait_done(self, response) -> None:
        """Wait until a deployment response is computed, without fetching its value here.

        The LLM call is routed only then, so its queue limit (`max_queued_requests`) sees it as
        queued the moment it is: Serve checks that limit when a call is made, and a call whose
        argument is still being computed would not count yet.
        """
        import ray

        ref = await response._to_object_ref()
        await asyncio.to_thread(ray.wait, [ref], fetch_local=False)


def continues_exactly(params) -> bool:
    """Whether a request cut off after some tokens can go on elsewhere from those tokens as a longer
    prompt and produce what it would have: one choice, and nothing that depends on which tokens
    were generated rather than given (a grammar's state, penalties on generated tokens, a stop
    string that may straddle the cut, a seeded sample stream)."""
    return (params.n == 1 and params.structured is None and not params.stop and params.presence_penalty == 0
            and params.frequency_penalty == 0 and (params.seed is None or params.temperature == 0))


class LLMStream:
    """One request's output stream from the LLM deployment that survives the death of the replica
    serving it: before its first output the request is sent again as it was; after, if
    `continues_exactly`, its prompt and the tokens produced so far go to another replica as the
    prompt of the rest (max_tokens and min_tokens reduced), and the outputs go on with the
    request's own counts. Otherwise, or after `attempts` deaths, the error is raised (a 503)."""

    attempts = 3

    def __init__(self, llm, rid: str, request: EngineRequest, embeds):
        self.llm, self.rid, self.request, self.embeds = llm, rid, request, embeds
        self.produced: list[int] = []      # tokens already streamed out
        self.offset = 0                    # of those, made by earlier replicas
        self.cached: int | None = None     # the request's prefix-cache hit, as first reported
        self.failures = 0
        self.open_choices = request.params.n
        self.stream = self._open()

    def _open(self):
        request = self.request
        if self.produced:
            p, done = request.params, len(self.produced)
            request = dataclasses.replace(
                request, prompt=MultimodalPrompt(request.prompt.token_ids + tuple(self.produced), request.prompt.spans),
                params=dataclasses.replace(p, max_new_tokens=p.max_new_tokens - done,
                                           min_tokens=max(0, p.min_tokens - done), prompt_logprobs=None))
        self.offset = len(self.produced)
        return self.llm.options(stream=True).generate.remote(self.rid, request, self.embeds)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            try:
                out = await anext(self.stream)
                break
            except RayActorError:
                if self.open_choices == 0:         # died after its last output: nothing is missing
                    raise StopAsyncIteration from None
                self.failures += 1
                if self.failures >= self.attempts or (self.produced and not continues_exactly(self.request.params)):
                    raise
                log.warning("request %s: its LLM replica died after %d tokens; continuing on another",
                            self.rid, len(self.produced))
                await asyncio.sleep(0.1 * self.failures)      # the routers learn of the death meanwhile
                self.stream = self._open()
        self.produced += out.token_ids
        self.open_choices -= out.finish_reason is not None
        if self.cached is None:
            self.cached = out.cached_tokens
        if self.offset:
            out = dataclasses.replace(out, prompt_tokens=len(self.request.prompt.token_ids), cached_tokens=self.cached,
                                      completion_tokens=out.completion_tokens + self.offset)
        return out

    def cancel(self) -> None:
        self.stream.cancel()


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlm-serve")
    except PackageNotFoundError:    # running from a source tree that is not installed
        return "unknown"


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# Applied at import so every process that imports this module (driver and replicas) turns the
# routes above into methods of the same class-based view.
ServeIngress = serve.ingress(app)(Ingress)
