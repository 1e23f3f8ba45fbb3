"""keygate/stages/cors.py: browser access for the origins in cors_origins, and no other
(docs/endpoints.md#authentication)."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from helpers.unit import make_config, make_flow, run_request
from keygate.request import state_of
from keygate.stages.auth import Auth
from keygate.stages.cors import Cors
from keygate.stages.policy import Policy
from keygate.stages.routing import Router

APP = "https://app.example.com"
TOML = f'[gateway]\ncors_origins = ["{APP}", "http://localhost:5173"]\n'


def preflight(origin: str, method: str = "POST",
              headers: str | None = "authorization, content-type",
              path: str = "/v1/chat/completions") -> http.HTTPFlow:
    h = {"origin": origin, "access-control-request-method": method}
    if headers is not None:
        h["access-control-request-headers"] = headers
    return make_flow("OPTIONS", path, headers=h)


def pipeline(config):
    return Cors(config), Auth(config), Policy(config), Router(config)


def cors_headers(resp: http.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items()
            if k.lower().startswith("access-control-")}


@pytest.mark.parametrize("origin", [APP, "http://localhost:5173", "https://APP.example.com"])
def test_preflight_from_an_allowed_origin_is_answered_without_a_key(origin):
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = preflight(origin)
    with taddons.context():
        run_request(f, cors, *rest)
        cors.response(f)
    assert f.response.status_code == 204
    assert f.response.content == b""
    h = cors_headers(f.response)
    assert h["access-control-allow-origin"] == origin
    assert "POST" in h["access-control-allow-methods"]
    assert h["access-control-allow-headers"] == "authorization, content-type"
    assert int(h["access-control-max-age"]) > 0
    assert "x-keygate-request-id" in h["access-control-expose-headers"]
    assert "retry-after" in h["access-control-expose-headers"]
    assert "origin" in ",".join(f.response.headers.get_all("vary")).lower()
    assert not state_of(f).admitted  # nothing forwarded


def test_preflight_without_requested_headers_gets_the_defaults():
    config = make_config(TOML)
    cors = Cors(config)
    f = preflight(APP, headers=None)
    with taddons.context():
        cors.requestheaders(f)
    allowed = f.response.headers["access-control-allow-headers"].lower()
    for name in ("authorization", "content-type", "x-api-key"):
        assert name in allowed


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.example.com.evil.example",
                                    "http://app.example.com", "https://app.example.com:8443",
                                    "null", ""])
def test_preflight_from_another_origin_is_not_answered(origin):
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = preflight(origin)
    with taddons.context():
        run_request(f, cors, *rest)
        cors.response(f)
    assert f.response.status_code == 401  # an OPTIONS without a key, like any other request
    assert cors_headers(f.response) == {}
    assert not state_of(f).admitted


def test_options_without_a_requested_method_is_no_preflight():
    config = make_config(TOML)
    f = make_flow("OPTIONS", "/v1/models", headers={"origin": APP})
    with taddons.context():
        Cors(config).requestheaders(f)
    assert f.response is None


def test_no_cors_configured():
    config = make_config()
    cors, *rest = pipeline(config)
    f = preflight(APP)
    with taddons.context():
        run_request(f, cors, *rest)
        cors.response(f)
    assert f.response.status_code == 401
    assert cors_headers(f.response) == {}


def upstream_answers(f: http.HTTPFlow, cors: Cors, headers: dict[str, str] | None = None):
    f.response = http.Response.make(200, b'{"ok":true}', {"content-type": "application/json",
                                                          **(headers or {})})
    cors.responseheaders(f)
    cors.response(f)


def test_allowed_origin_gets_its_own_name_back():
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = make_flow("POST", "/v1/chat/completions", key="alice", headers={"origin": APP},
                  body={"model": "llama3.2:1b"})
    with taddons.context():
        run_request(f, cors, *rest)
        assert f.response is None
        assert "origin" not in f.request.headers  # Origin is not forwarded
        upstream_answers(f, cors)
    h = cors_headers(f.response)
    assert h["access-control-allow-origin"] == APP
    assert "x-keygate-error" in h["access-control-expose-headers"]
    assert "*" not in f.response.headers.get_all("access-control-allow-origin")


def test_upstream_cors_headers_are_replaced():
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = make_flow("POST", "/api/chat", key="alice", headers={"origin": APP},
                  body={"model": "llama3.2:1b"})
    with taddons.context():
        run_request(f, cors, *rest)
        upstream_answers(f, cors, {"Access-Control-Allow-Origin": "*",
                                   "Access-Control-Allow-Credentials": "true"})
    assert f.response.headers.get_all("access-control-allow-origin") == [APP]
    assert "access-control-allow-credentials" not in f.response.headers


@pytest.mark.parametrize("origin", ["https://evil.example", None])
def test_other_origins_get_no_cors_headers_even_from_the_upstream(origin):
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = make_flow("POST", "/api/chat", key="alice", body={"model": "llama3.2:1b"},
                  headers={"origin": origin} if origin else None)
    with taddons.context():
        run_request(f, cors, *rest)
        assert f.response is None
        upstream_answers(f, cors, {"Access-Control-Allow-Origin": "*",
                                   "Access-Control-Allow-Methods": "*"})
    assert cors_headers(f.response) == {}


def test_refusals_carry_cors_headers_so_the_page_can_read_them():
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = make_flow("POST", "/v1/chat/completions", body={"model": "llama3.2:1b"},
                  headers={"origin": APP, "authorization": "Bearer nope-nope-nope"})
    with taddons.context():
        run_request(f, cors, *rest)
        cors.response(f)
    assert f.response.status_code == 401
    assert f.response.headers["access-control-allow-origin"] == APP


def test_vary_keeps_the_upstreams_values():
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = make_flow("GET", "/v1/models", key="alice", headers={"origin": APP})
    with taddons.context():
        run_request(f, cors, *rest)
        upstream_answers(f, cors, {"Vary": "Accept-Encoding"})
    vary = ",".join(f.response.headers.get_all("vary")).lower()
    assert "accept-encoding" in vary
    assert "origin" in vary


def test_streamed_responses_get_the_headers_before_the_body():
    # A stream leaves with its headers: responseheaders must already set them.
    config = make_config(TOML)
    cors, *rest = pipeline(config)
    f = make_flow("POST", "/api/chat", key="alice", headers={"origin": APP},
                  body={"model": "llama3.2:1b"})
    with taddons.context():
        run_request(f, cors, *rest)
        f.response = http.Response.make(200, b"", {"content-type": "application/x-ndjson"})
        cors.responseheaders(f)
    assert f.response.headers["access-control-allow-origin"] == APP


def test_already_answered_flows_are_left_alone():
    config = make_config(TOML)
    f = preflight(APP)
    f.response = http.Response.make(418)
    with taddons.context():
        Cors(config).requestheaders(f)
    assert f.response.status_code == 418
    assert not state_of(f).origin
