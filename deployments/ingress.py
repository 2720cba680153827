"""Ingress deployment: the OpenAI-compatible HTTP API and Python handle API, on Ray Serve.

POST /v1/chat/completions, /v1/completions (stream or not; `usage` in the final response / chunk)
POST /tokenize, /detokenize;  GET /v1/models, /v1/models/{model}, /version, /health

This module is the Serve adapter only: the FastAPI app, its error handlers and routes, and the
clients that give the serving layer (`serving.py`: preparation, answers, streams, errors; no Ray)
the VisionEncoder and LLMServer deployments. The vision call's response goes straight into the
LLM call, so the embeddings travel vision replica -> object store -> LLM replica without passing
through the ingress.
"""

from __future__ import annotations

import json
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm_core.families import LoadOptions, load_processor

from . import serve_compat
from .errors import APIError, api_error_of, register_transport_errors
from .frontdoor import FrontDoor
from .metrics import routing_decisions, routing_probes
from .protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest,
                       DetokenizeResponse, ErrorResponse, Health, ModelCard, ModelList, ResponseObject,
                       ResponsesRequest, TokenizeRequest, TokenizeResponse, Version)
from .serving import OpenAIServing, new_request_id
from .settings import IngressSettings

log = logging.getLogger("ray.serve")
register_transport_errors(overloaded=(BackPressureError,), replica_died=(RayActorError,))

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


class RayVision:
    """The VisionEncoder deployment as the serving layer's vision client."""

    def __init__(self, handle):
        self.handle = handle

    async def encode(self, items, hashes):
        response = self.handle.encode.remote(items, hashes)
        await serve_compat.wait_computed(response)
        return response


class RayOutputStream:
    def __init__(self, response):
        self.response = response

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await anext(self.response)

    def cancel(self) -> None:
        self.response.cancel()


class RayLLM:
    """The LLMServer deployment as the serving layer's LLM client (a streaming handle call)."""

    def __init__(self, handle):
        self.handle = handle

    def generate(self, request_id, request, embeds) -> RayOutputStream:
        return RayOutputStream(self.handle.options(stream=True).generate.remote(request_id, request, embeds))


class Ingress:
    def __init__(self, vision, llm, model_dir: str, settings: IngressSettings = IngressSettings(),
                 options: LoadOptions | None = None):
        processor = load_processor(model_dir, options=options)      # the family's processor; no weights
        self.serving = OpenAIServing(processor, settings, RayVision(vision), RayLLM(llm))
        self.front_door = settings.front_door()      # what the middleware checks before any route runs

    # ---- routes -----------------------------------------------------------------------------

    @app.get("/health", response_model=Health)
    async def health(self):
        return Health()

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401))
    async def models(self):
        return self.serving.models()

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=error_responses(401, 404))
    async def model_card(self, model: str):
        return self.serving.model_card(model)

    @app.get("/version", response_model=Version, responses=error_responses(401))
    async def version(self):
        return Version(version=package_version())

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404))
    async def tokenize(self, body: TokenizeRequest):
        """vLLM's /tokenize: a text prompt, or text-only chat messages rendered with the chat template."""
        return self.serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404))
    async def detokenize(self, body: DetokenizeRequest):
        return self.serving.detokenize(body)

    @app.post("/v1/completions", response_model=Completion,
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
                         **error_responses(400, 401, 404, 408, 413, 500, 503)})
    async def completions(self, body: CompletionRequest, request: Request):
        body = with_header_id(body, request)
        if not body.stream:
            return await self.complete(body)
        rid = body.request_id or new_request_id("cmpl")
        return await self._sse(self.serving.complete_stream(body, request_id=rid), rid)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
                         **error_responses(400, 401, 404, 408, 413, 500, 503)})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        body = with_header_id(body, request)
        if not body.stream:
            return await self.chat(body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        rid = body.request_id or new_request_id()
        return await self._sse(self.serving.chat_stream(body, include_usage, request_id=rid), rid)

    @app.post("/v1/responses", response_model=ResponseObject,
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
                         **error_responses(400, 401, 404, 408, 413, 500, 503)})
    async def responses_route(self, body: ResponsesRequest):
        """OpenAI's Responses API, stateless (`store` false; no previous_response_id)."""
        if not body.stream:
            return await self.responses(body)
        events = self.serving.responses_stream(body)
        first = await anext(events)       # errors before the engine accepted the request get a status code

        async def sse():
            try:
                yield f"event: {first['type']}\ndata: {json.dumps(first)}\n\n"
                async for e in events:
                    yield f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
            except Exception as exc:    # failed mid-stream: an error event, never a hang
                err = api_error_of(exc).body()["error"]
                yield f"event: error\ndata: {json.dumps({'type': 'error', **err})}\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(sse(), media_type="text/event-stream")

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

    async def chat(self, body: ChatCompletionRequest) -> ChatCompletion:
        """One chat completion (n choices). From another Ray job:
        `serve.get_app_handle("vlm").chat.remote(ChatCompletionRequest(...)).result()`.
        Errors are raised as `APIError` (status, message, type, param)."""
        return await self.serving.chat(body)

    async def chat_stream(self, body: ChatCompletionRequest, include_usage: bool = True, request_id: str | None = None):
        """Streamed chat completion chunks (use `handle.options(stream=True).chat_stream.remote(...)`),
        each for one choice (`index`). Closing the stream early aborts the request in the engine."""
        async for chunk in self.serving.chat_stream(body, include_usage, request_id):
            yield chunk

    async def complete(self, body: CompletionRequest) -> Completion:
        """One text completion (n choices; no chat template). From another Ray job:
        `serve.get_app_handle("vlm").complete.remote(CompletionRequest(...)).result()`."""
        return await self.serving.complete(body)

    async def complete_stream(self, body: CompletionRequest, request_id: str | None = None):
        """Streamed text-completion chunks (`handle.options(stream=True).complete_stream.remote(...)`)."""
        async for chunk in self.serving.complete_stream(body, request_id):
            yield chunk

    async def responses(self, body: ResponsesRequest) -> ResponseObject:
        """A Responses-API answer (`serve.get_app_handle("vlm").responses.remote(ResponsesRequest(...))`)."""
        return await self.serving.responses(body)

    def stats(self) -> dict:
        """This replica's figures: its process id, the routing decisions its handles made
        (`deployments/routing.py`) and how many times they asked the replicas their queues, per
        deployment."""
        return {"pid": os.getpid(), "routing": routing_decisions(), "routing_probes": routing_probes()}


def with_header_id(body, request: Request):
    """The body with the X-Request-Id header as its request_id, when it names none itself (vLLM's
    behaviour; Serve's proxy echoes the header back); a header id that is not one the field accepts
    is a 400 naming the header."""
    header = request.headers.get("x-request-id")
    if header is None or body.request_id is not None:
        return body
    try:
        return type(body).model_validate({**body.model_dump(exclude_unset=True, by_alias=True), "request_id": header})
    except ValueError:
        raise APIError(400, "the X-Request-Id header must be 1-128 characters of letters, digits and ._:-",
                       param="X-Request-Id") from None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlm-serve")
    except PackageNotFoundError:    # running from a source tree that is not installed
        return "unknown"


# Applied at import so every process that imports this module (driver and replicas) turns the
# routes above into methods of the same class-based view.
ServeIngress = serve.ingress(app)(Ingress)
