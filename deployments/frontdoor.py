"""The ingress's front door: an ASGI middleware that checks what it can before any route runs.

In order, for every HTTP request:
  1. API key (when set): every route but `/health` needs `Authorization: Bearer <key>`, the
     scheme matched case-insensitively and the key compared in constant time; else 401.
  2. Request body: a declared `Content-Length` above `max_request_bytes` is refused (413) before
     a byte is read; otherwise the body is read here, up to that many bytes (413 past it) and
     within `body_timeout_s` (408: a client that trickles its body cannot hold a request open),
     and only then handed to the route, which parses JSON from memory of bounded size.
  3. Concurrency: at most `max_concurrent_requests` generation requests at once in this replica;
     the next gets 503 JSON with `Retry-After` from us, before Serve's proxy queue would refuse it
     with its plain-text 503.
Every refusal is an `ErrorResponse` JSON body, as the routes' errors are.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass

from .errors import APIError

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
OPEN_PATHS = ("/health",)


@dataclass(frozen=True)
class FrontDoorLimits:
    """What the middleware checks (`IngressSettings.front_door()` makes it)."""
    api_key: str | None
    max_request_bytes: int
    body_timeout_s: float
    max_concurrent_requests: int
    retry_after_s: int


async def send_error(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def authorized(header: bytes | None, key: str) -> bool:
    """`Authorization: <scheme> <key>` with scheme 'bearer' in any case; constant-time compare."""
    scheme, _, given = (header or b"").decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                              key.encode("utf-8"))


class FrontDoor:
    """ASGI middleware; its limits are the `front_door` of the replica's ingress object."""

    def __init__(self, app):
        self.app = app
        self.in_flight = 0
        self.limits: FrontDoorLimits | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.limits is None:
            from .serve_compat import replica_object

            self.limits = replica_object().front_door
        limits = self.limits
        headers = dict(scope.get("headers") or [])
        path = route_path(scope)
        if limits.api_key is not None and path not in OPEN_PATHS:
            if not authorized(headers.get(b"authorization"), limits.api_key):
                return await send_error(send, APIError(
                    401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error",
                    headers={"WWW-Authenticate": "Bearer"}))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                body = await self._read_body(headers, receive, limits)
            except APIError as e:
                return await send_error(send, e)
            receive = replay(body, receive)
        if path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= limits.max_concurrent_requests:
            return await send_error(send, APIError(
                503, f"the server is at capacity ({self.in_flight} requests in flight); retry later",
                "server_overloaded", headers={"Retry-After": str(limits.retry_after_s)}))
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _read_body(headers: dict, receive, limits: FrontDoorLimits) -> bytes:
        cap = limits.max_request_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, "the Content-Length header is not a number")
            if int(declared) > cap:
                raise APIError(413, f"the request body is {int(declared)} bytes; at most {cap} are accepted")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > cap:
                        raise APIError(413, f"the request body is larger than {cap} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None
        return b"".join(chunks)


def route_path(scope) -> str:
    """The request path below the application's route prefix (ASGI `root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def replay(body: bytes, receive):
    """A `receive` that yields the buffered body once, then defers to the real one (disconnects)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
