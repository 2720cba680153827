"""Errors of the serving layer and the one mapping from any exception to what a client is told.

    APIError                an answer in OpenAI's error shape (status, message, type, param, headers)
    ServerOverloadedError   a replica refused a request: its queue is full (503 + Retry-After)
    ReplicaDiedError        a serving replica died with the request in flight (503 + Retry-After)
    api_error_of(e)         the APIError a client gets for any exception
    api_errors(...)         a context manager: whatever escapes it leaves as `api_error_of`'s answer

The serving layer knows no Ray: the Serve adapter registers the exception types its transport
raises for an overloaded deployment or a dead replica (`register_transport_errors`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid

from vlm_core.errors import ImageTooLargeError, VLMError

log = logging.getLogger("ray.serve")


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}

    def __reduce__(self):   # crosses process boundaries (handle callers get it back as raised)
        return type(self), (self.status, self.message, self.type, self.param, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class ServerOverloadedError(Exception):
    """A replica refused a request because its queue is full (answered 503 + Retry-After)."""


class ReplicaDiedError(Exception):
    """A serving replica died with the request in flight."""


_OVERLOADED: list[type[BaseException]] = [ServerOverloadedError]
_REPLICA_DIED: list[type[BaseException]] = [ReplicaDiedError]


def register_transport_errors(overloaded: tuple[type[BaseException], ...] = (),
                              replica_died: tuple[type[BaseException], ...] = ()) -> None:
    """Teach the mapping a transport's own exception types (Ray Serve's back-pressure and actor death)."""
    _OVERLOADED.extend(t for t in overloaded if t not in _OVERLOADED)
    _REPLICA_DIED.extend(t for t in replica_died if t not in _REPLICA_DIED)


def is_replica_death(e: BaseException) -> bool:
    return isinstance(e, tuple(_REPLICA_DIED))


def unwrapped(e: BaseException) -> BaseException:
    """The exception a transport wrapper carries as its `cause` (Ray's `RayTaskError` for an error
    raised in another replica: it subclasses the original's class, but its text is the remote
    traceback), or `e` itself."""
    while isinstance(getattr(e, "cause", None), BaseException) and e.cause is not e:
        e = e.cause
    return e


def api_error_of(e: BaseException, retry_after_s: int = 1, request_id: str | None = None) -> APIError:
    """The client-facing error for an exception (or the first of its causes that is one we know),
    in the original exception's own words, never a transport's traceback. Anything not a client
    error becomes a 500 that says "internal error" and a request id; the log line for it carries
    the id and the traceback."""
    seen = e
    while seen is not None:
        if isinstance(seen, tuple(_OVERLOADED)):
            return APIError(503, "the server is at capacity; retry later", "server_overloaded",
                            headers={"Retry-After": str(retry_after_s)})
        if isinstance(seen, tuple(_REPLICA_DIED)):
            return APIError(503, "a serving replica failed during the request; retry", "server_error",
                            headers={"Retry-After": str(retry_after_s)})
        inner = unwrapped(seen)
        if inner is not seen:          # judge the original, not its wrapper
            seen = inner
            continue
        if isinstance(seen, APIError):
            return seen
        if isinstance(seen, ImageTooLargeError):
            return APIError(413, str(seen), param="image_url")
        if isinstance(seen, VLMError):
            return APIError(400, str(seen))
        seen = seen.__cause__
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    log.error("internal error in request %s", request_id, exc_info=e)
    return APIError(500, f"internal error (request id {request_id})", "server_error")


@contextlib.contextmanager
def api_errors(retry_after_s: int = 1, request_id: str | None = None):
    """Whatever exception leaves the block leaves as the APIError a client gets for it."""
    try:
        yield
    except APIError:
        raise
    except Exception as e:
        raise api_error_of(e, retry_after_s, request_id) from None
