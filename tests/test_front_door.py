"""Front-door pieces without a server: the API-key check, the route path under a prefix, and the
one error shape for errors no client caused (a request id, never a traceback or an object repr)."""

import logging

from deployments.frontdoor import authorized, route_path
from deployments.errors import api_error_of
from deployments.errors import APIError
from vlm_core.engine.engine import RequestFailedError
from vlm_core.errors import ImageTooLargeError, SamplingParamsError


def test_bearer_scheme_is_case_insensitive_and_the_key_exact():
    assert authorized(b"Bearer k3y", "k3y") and authorized(b"bearer k3y", "k3y") and authorized(b"BEARER  k3y ", "k3y")
    for header in (None, b"", b"k3y", b"Basic k3y", b"Bearer k3", b"Bearer k3yy", b"Bearer", b"Bearerk3y"):
        assert not authorized(header, "k3y"), header


def test_route_path_is_relative_to_the_application_prefix():
    assert route_path({"path": "/overload/health", "root_path": "/overload"}) == "/health"
    assert route_path({"path": "/overload", "root_path": "/overload"}) == "/"
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"


def test_internal_errors_say_internal_error_and_a_request_id_and_log_the_traceback(caplog):
    try:
        raise RuntimeError("tensor at 0x7f00 on cuda:0 in /srv/secret/path.py")
    except RuntimeError as e:
        err = e
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        out = api_error_of(err, request_id="chatcmpl-abc")
    assert (out.status, out.message, out.type) == (500, "internal error (request id chatcmpl-abc)", "server_error")
    assert out.body() == {"error": {"message": "internal error (request id chatcmpl-abc)", "type": "server_error",
                                    "param": None, "code": 500}}
    record = next(r for r in caplog.records if "chatcmpl-abc" in r.getMessage())
    assert record.exc_info[1] is err                                  # the log line has the traceback
    failed = api_error_of(RequestFailedError("ValueError: boom"))
    assert failed.status == 500 and failed.message.startswith("internal error (request id req-")


def test_client_errors_keep_their_status_and_message():
    assert api_error_of(SamplingParamsError("top_k must be >= 0")).body()["error"]["code"] == 400
    assert api_error_of(ImageTooLargeError("too big")).status == 413
    wrapped = RuntimeError("replica wrapper")
    wrapped.__cause__ = APIError(404, "model 'x' does not exist", param="model")
    assert api_error_of(wrapped).message == "model 'x' does not exist"
