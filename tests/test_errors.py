"""keygate/model/errors.py: keygate's own error responses in the client API's shape
(docs/errors.md)."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow

from keygate.model.errors import CODES, error_body, make_error, refuse
from keygate.request import state_of

# The table of docs/errors.md: code -> status
STATUS = {
    "invalid_request": 400,
    "invalid_api_key": 401,
    "permission_denied": 403,
    "unknown_endpoint": 404,
    "model_not_found": 404,
    "request_too_large": 413,
    "headers_too_large": 431,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "upstream_error": 502,
    "gateway_unavailable": 503,
    "upstream_timeout": 504,
}


def test_every_code_of_spec_5_and_no_other():
    assert {code: v[0] for code, v in CODES.items()} == STATUS


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages?beta=true"])
@pytest.mark.parametrize("code", sorted(STATUS))
def test_anthropic_shape(path, code):
    doc = json.loads(error_body(path, code, "Nope."))
    assert doc["type"] == "error"
    assert set(doc) == {"type", "error"}
    assert doc["error"]["message"] == "Nope."
    assert isinstance(doc["error"]["type"], str) and doc["error"]["type"]


@pytest.mark.parametrize("code, anthropic_type", [
    ("invalid_request", "invalid_request_error"),
    ("invalid_api_key", "authentication_error"),
    ("permission_denied", "permission_error"),
    ("unknown_endpoint", "not_found_error"),
    ("model_not_found", "not_found_error"),
    ("request_too_large", "request_too_large"),
    ("rate_limit_exceeded", "rate_limit_error"),
    ("upstream_error", "api_error"),
    ("gateway_unavailable", "overloaded_error"),
])
def test_anthropic_error_types(code, anthropic_type):
    assert json.loads(error_body("/v1/messages", code, "m"))["error"]["type"] == anthropic_type


@pytest.mark.parametrize("path", [
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
    "/v1/models/llama3.2:1b", "/v1/chat/completions?x=1", "/v1/unknown",
])
@pytest.mark.parametrize("code", sorted(STATUS))
def test_openai_shape(path, code):
    doc = json.loads(error_body(path, code, "Nope."))
    assert set(doc) == {"error"}
    err = doc["error"]
    assert err["message"] == "Nope."
    assert err["code"] == code
    assert isinstance(err["type"], str) and err["type"]


@pytest.mark.parametrize("code, openai_type", [
    ("invalid_request", "invalid_request_error"),
    ("invalid_api_key", "authentication_error"),
    ("permission_denied", "permission_error"),
    ("rate_limit_exceeded", "rate_limit_error"),
    ("insufficient_quota", "insufficient_quota"),
])
def test_openai_error_types(code, openai_type):
    assert json.loads(error_body("/v1/chat/completions", code, "m"))["error"]["type"] == openai_type


@pytest.mark.parametrize("path", [
    "/", "/api/chat", "/api/tags", "/api/pull", "/api/me", "/v1", "/api/chat?x=/v1/messages",
    "/anything",
])
@pytest.mark.parametrize("code", sorted(STATUS))
def test_native_shape(path, code):
    assert json.loads(error_body(path, code, "Nope.")) == {"error": "Nope."}


def test_message_is_json_escaped():
    doc = json.loads(error_body("/api/chat", "invalid_request", 'a "quoted" \n line'))
    assert doc == {"error": 'a "quoted" \n line'}


def flow(method: str, path: str):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    return f


@pytest.mark.parametrize("code", sorted(STATUS))
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/v1/messages"])
def test_make_error(code, path):
    f = flow("POST", path)
    resp = make_error(f, code, "Nope.")
    assert resp.status_code == STATUS[code]
    assert resp.headers["x-keygate-error"] == code
    assert resp.headers["content-type"] == "application/json"
    assert resp.content == error_body(path, code, "Nope.")
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert state_of(f).error == code


def test_make_error_extra_headers():
    resp = make_error(flow("POST", "/api/chat"), "rate_limit_exceeded", "slow",
                      {"retry-after": "7"})
    assert resp.headers["retry-after"] == "7"
    assert resp.headers["x-keygate-error"] == "rate_limit_exceeded"


@pytest.mark.parametrize("path", ["/", "/api/tags", "/api/version",
                                  f"/api/blobs/sha256:{'0' * 64}"])
def test_head_has_empty_body(path):
    f = flow("HEAD", path)
    resp = make_error(f, "invalid_api_key", "No key.")
    assert resp.status_code == 401
    assert resp.raw_content == b""
    assert resp.headers["x-keygate-error"] == "invalid_api_key"
    # The length the GET answer would have had, as HEAD requires.
    full = error_body(path, "invalid_api_key", "No key.")
    assert resp.headers["content-length"] == str(len(full))


def test_refuse_sets_the_response_and_header_names():
    f = flow("GET", "/v1/models")
    refuse(f, "rate_limit_exceeded", "Slow down.", retry_after="3")
    assert f.response.status_code == 429
    assert f.response.headers["retry-after"] == "3"
    assert json.loads(f.response.content)["error"]["code"] == "rate_limit_exceeded"
    assert state_of(f).error == "rate_limit_exceeded"


def test_an_answered_request_keeps_no_query():
    """mitmdump's flow dump prints the URL: a key in the query of a refused request (Auth
    takes it out only for a valid key) must not be printed."""
    f = tflow.tflow()
    f.request.path = "/api/tags?key=sk-secret-in-the-query&x=1"
    refuse(f, "invalid_api_key", "Invalid API key.")
    assert f.request.path == "/api/tags"
    assert b"sk-secret" not in f.response.content
