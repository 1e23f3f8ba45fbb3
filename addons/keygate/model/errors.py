"""keygate's own error responses, in the shape the client's API speaks (docs/errors.md)."""

from __future__ import annotations

import json

from mitmproxy import http

from keygate.request import state_of

# code -> (status, OpenAI error type, Anthropic error type)
CODES: dict[str, tuple[int, str, str]] = {
    "invalid_request": (400, "invalid_request_error", "invalid_request_error"),
    "invalid_api_key": (401, "authentication_error", "authentication_error"),
    "permission_denied": (403, "permission_error", "permission_error"),
    "unknown_endpoint": (404, "not_found_error", "not_found_error"),
    "model_not_found": (404, "not_found_error", "not_found_error"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "headers_too_large": (431, "invalid_request_error", "invalid_request_error"),
    "rate_limit_exceeded": (429, "rate_limit_error", "rate_limit_error"),
    "insufficient_quota": (429, "insufficient_quota", "rate_limit_error"),
    "upstream_error": (502, "api_error", "api_error"),
    "gateway_unavailable": (503, "api_error", "overloaded_error"),
    "upstream_timeout": (504, "api_error", "api_error"),
}


def error_body(path: str, code: str, message: str) -> bytes:
    """The body for `code` on `path` (the request path, query included or not)."""
    _, openai_type, anthropic_type = CODES[code]
    path = path.split("?", 1)[0]
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        doc: dict = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    elif path.startswith("/v1/"):
        doc = {"error": {"message": message, "type": openai_type, "param": None, "code": code}}
    else:
        doc = {"error": message}
    return json.dumps(doc).encode()


def make_error(
    flow: http.HTTPFlow, code: str, message: str, headers: dict[str, str] | None = None
) -> http.Response:
    """Build the response and leave the code in the request state for the usage log.

    The request's query goes: an answered request is not forwarded, and the query (which
    a client may have put a key in; Auth takes it out only for a valid key) must not reach
    mitmdump's flow dump either, which prints the URL."""
    status = CODES[code][0]
    path = flow.request.path
    if "?" in path:
        path = flow.request.path = path.split("?", 1)[0]
    resp = http.Response.make(
        status,
        # The shape of the path the client asked for: once routed, flow.request.path is
        # the upstream's (an openai channel's has no /v1/ of its own).
        error_body(state_of(flow).path or path, code, message),
        {"content-type": "application/json", "x-keygate-error": code, **(headers or {})},
    )
    if flow.request.method == "HEAD":
        # A HEAD answer has no body, but keeps the length it would have had.
        resp.headers["content-length"] = str(len(resp.raw_content or b""))
        resp.raw_content = b""
    state_of(flow).error = code
    return resp


def refuse(flow: http.HTTPFlow, code: str, message: str, **headers: str) -> None:
    names = {k.replace("_", "-"): v for k, v in headers.items()}
    # An upload Policy set to stream (blobs) is refused by whatever addon refuses it:
    # mitmproxy cannot answer a request it is still streaming upstream.
    flow.request.stream = False
    flow.response = make_error(flow, code, message, names)
