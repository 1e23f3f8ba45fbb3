"""keygate/stages/policy.py: endpoint table, scopes, body checks and model permissions
(docs/endpoints.md)."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from helpers.unit import make_config, make_flow, request_json, response_json, run_request
from keygate.request import state_of
from keygate.stages.auth import Auth
from keygate.stages.policy import (
    ROOT_TEXT,
    Policy,
    body_model,
    go_duration_ns,
    keep_alive_allowed,
)
from keygate.stages.routing import Router

DIGEST = "sha256:" + "ab" * 32


# --------------------------------------------------------------------------- keep_alive


@pytest.mark.parametrize("text, ns", [
    ("0", 0), ("+0", 0), ("-0", 0), ("0s", 0), ("00", None), ("1ns", 1), ("0.1ns", 0),
    ("1.5s", 1_500_000_000), ("1h2m3s", 3_723_000_000_000), ("5m", 300_000_000_000),
    ("1\u00b5s", 1000), ("1\u03bcs", 1000), ("-1m", -60_000_000_000), (".5s", 500_000_000),
    ("1.s", 1_000_000_000), ("999999h", 999_999 * 3_600_000_000_000),
    ("9223372036854775807ns", (1 << 63) - 1), ("9223372036854775808ns", None),
    ("-9223372036854775808ns", -(1 << 63)),
    ("", None), ("s", None), (".s", None), ("5", None), ("5x", None), (" 5m", None),
    ("5m ", None), ("1d", None), ("--1s", None), ("1e3s", None),
])
def test_go_duration_reads_as_go_does(text, ns):
    assert go_duration_ns(text) == ns


@pytest.mark.parametrize("value, allowed", [
    # unloads the model: zero, or under a second (Ollama truncates numbers to seconds)
    (0, False), (0.0, False), (-0.0, False), (0.5, False), (0.999, False), ("0", False),
    ("0s", False), ("0.1ns", False), ("1ns", False), ("999ms", False), ("0h0m0s", False),
    # pins the model in memory: negative, or longer than max_keep_alive_s (3600 here)
    (-1, False), (-0.5, False), ("-1m", False), (1e300, False), ("999999h", False),
    (3601, False), ("1h0m1s", False), (float("inf"), False),
    # not a keep_alive Ollama reads: removed all the same
    (None, False), (True, False), ("", False), ({}, False), ([0], False), (" 5m", False),
    (float("nan"), False),
    # ordinary
    (1, True), (1.9, True), (300, True), ("5m", True), ("10s", True), ("1h", True),
    (3600, True), ("1s", True), ("1000ms", True), ("59m59.5s", True),
])
def test_keep_alive_allowed(value, allowed):
    assert keep_alive_allowed(value, 3600) is allowed


@pytest.mark.parametrize("doc, kind, model", [
    ({"model": "a"}, "inference", "a"),
    ({"name": "a"}, "inference", None),
    ({"name": "a"}, "show", "a"),
    ({"model": "a", "name": "b"}, "show", "a"),
    ({"model": "", "name": "b"}, "show", "b"),
    ({}, "show", None),
])
def test_body_model(doc, kind, model):
    assert body_model(doc, kind) == model


# --------------------------------------------------------------------------- the addon

CLOUD_CHANNEL = ('[[channels]]\nname = "local"\nbase_url = "http://127.0.0.1:11434"\n'
                 '[[channels]]\nname = "cloud"\nbase_url = "http://127.0.0.1:11435"\n'
                 'models = ["*-cloud"]\n')


def run(method, path, key=None, body=None, toml="", headers=None, keys=None):
    config = make_config(toml, keys=keys)
    f = make_flow(method, path, key=key, body=body, headers=headers)
    with taddons.context():
        run_request(f, Auth(config), Policy(config))
    return f


def assert_refused(f, status, code):
    assert f.response is not None, "not refused"
    assert f.response.status_code == status, f.response.content
    assert f.response.headers["x-keygate-error"] == code
    assert state_of(f).error == code


def assert_passed(f):
    assert f.response is None, f.response.content if f.response else None
    assert not state_of(f).error


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_root_is_answered_by_keygate(method):
    f = run(method, "/")
    assert f.response.status_code == 200
    assert f.response.content == (b"" if method == "HEAD" else ROOT_TEXT)
    assert b"Ollama is running" not in f.response.content
    assert "x-keygate-error" not in f.response.headers


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/me"), ("POST", "/api/signout"), ("POST", "/api/experimental/web_search"),
    ("GET", "/api/chat"), ("POST", "//api/pull"), ("POST", "/API/pull"), ("POST", "/api/pull/"),
    ("GET", "/v1/models/a/b"), ("POST", "/metrics"), ("OPTIONS", "/api/chat"),
])
@pytest.mark.parametrize("key", ["alice", "admin"])
def test_unknown_endpoint_is_404_for_a_valid_key(method, path, key):
    f = run(method, path, key=key)
    assert_refused(f, 404, "unknown_endpoint")
    assert state_of(f).key == key


@pytest.mark.parametrize("key, method, path, allowed", [
    ("alice", "POST", "/api/chat", True),
    ("alice", "GET", "/api/tags", True),
    ("alice", "POST", "/api/pull", False),
    ("alice", "DELETE", "/api/delete", False),
    ("alice", "POST", f"/api/blobs/{DIGEST}", False),
    ("alice", "HEAD", f"/api/blobs/{DIGEST}", False),
    ("reader", "GET", "/api/tags", True),
    ("reader", "GET", "/v1/models", True),
    ("reader", "GET", "/api/version", True),
    ("reader", "GET", "/api/ps", True),
    ("reader", "POST", "/api/chat", False),
    ("reader", "POST", "/v1/chat/completions", False),
    ("reader", "POST", "/v1/messages", False),
    ("admin", "POST", "/api/pull", True),
    ("admin", "POST", "/api/copy", True),
    ("admin", "DELETE", "/api/delete", True),
    ("admin", "POST", "/api/chat", True),
    # "admin" opens model management and nothing else
    ("adminonly", "POST", "/api/pull", True),
    ("adminonly", "POST", "/api/create", True),
    ("adminonly", "POST", "/api/chat", False),
    ("adminonly", "GET", "/api/tags", False),
    ("adminonly", "POST", "/api/show", False),
])
def test_scopes(key, method, path, allowed):
    body = {"model": "llama3.2:1b", "name": "llama3.2:1b"} if method == "POST" else None
    f = run(method, path, key=key, body=body)
    if allowed:
        assert_passed(f)
    else:
        assert_refused(f, 403, "permission_denied")
        if method != "HEAD":
            assert "scope" in json.dumps(response_json(f))


def test_scope_refusal_in_openai_shape():
    f = run("POST", "/v1/chat/completions", key="reader", body={"model": "m"})
    err = response_json(f)["error"]
    assert err["code"] == "permission_denied" and err["type"] == "permission_error"


# --------------------------------------------------------------------------- body size

SMALL = "[gateway]\nmax_body_mb = 0.001\n"  # 1048 bytes


def test_declared_length_over_the_limit_is_refused_at_headers_time():
    config = make_config(SMALL)
    f = make_flow("POST", "/api/chat", key="alice", headers={"content-length": "5000"})
    with taddons.context():
        Auth(config).requestheaders(f)
        Policy(config).requestheaders(f)
    assert_refused(f, 413, "request_too_large")


@pytest.mark.parametrize("size, refused", [(1048, False), (1049, True), (100_000, True)])
def test_body_over_the_limit_is_refused(size, refused):
    head = b'{"model": "llama3.2:1b", "prompt": "'
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    f = run("POST", "/api/generate", key="alice", body=body, toml=SMALL)
    if refused:
        assert_refused(f, 413, "request_too_large")
    else:
        assert_passed(f)


def test_chunked_body_over_the_limit_is_refused():
    # No content-length to judge at headers time: the body itself is measured.
    config = make_config(SMALL)
    f = make_flow("POST", "/v1/chat/completions", key="alice",
                  body=json.dumps({"model": "m", "x": "y" * 5000}).encode())
    del f.request.headers["content-length"]
    f.request.headers["transfer-encoding"] = "chunked"
    with taddons.context():
        run_request(f, Auth(config), Policy(config))
    assert_refused(f, 413, "request_too_large")


def test_blob_uploads_stream_instead_of_buffering():
    f = run("POST", f"/api/blobs/{DIGEST}", key="admin", body=b"GGUF" + b"\0" * 64)
    assert_passed(f)
    assert f.request.stream is True


# --------------------------------------------------------------------------- /v1/models/{model}


@pytest.mark.parametrize("key, model, visible", [
    ("alice", "llama3.2:1b", True),
    ("alice", "qwen2.5:7b", True),
    ("llama", "llama3.2:1b", True),
    ("llama", "llama3.2%3A1b", True),
    ("llama", "qwen2.5:7b", False),
    ("llama", "llama3.1:8b", False),
    ("alice", "gpt-oss:120b-cloud", False),  # no channel serves cloud names
])
def test_model_endpoint_answers_only_for_usable_models(key, model, visible):
    f = run("GET", f"/v1/models/{model}", key=key)
    if visible:
        assert_passed(f)
    else:
        # As if it did not exist.
        assert_refused(f, 404, "model_not_found")
        assert response_json(f)["error"]["code"] == "model_not_found"


def test_model_endpoint_for_a_cloud_model_a_channel_serves():
    f = run("GET", "/v1/models/gpt-oss:120b-cloud", key="alice", toml=CLOUD_CHANNEL)
    assert_passed(f)
    assert state_of(f).model == "gpt-oss:120b-cloud"


# --------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed",
                                  "/v1/chat/completions",
                                  "/v1/embeddings", "/v1/responses", "/v1/messages", "/api/show"])
@pytest.mark.parametrize("body", [
    b"", b"not json", b"{", b'{"model": "a",}', b"\xff\xfe", b"[]", b'["model"]', b'"llama"', b"42",
    b"null", b"{}", b'{"prompt": "hi"}', b'{"model": null}', b'{"model": 5}', b'{"model": ""}',
    b'{"model": ["a"]}', b'{"model": {"name": "a"}}',
])
def test_bad_bodies_are_400(path, body):
    f = run("POST", path, key="alice", body=body)
    assert_refused(f, 400, "invalid_request")


def test_400_in_the_clients_shape():
    f = run("POST", "/v1/messages", key="alice", body=b"[]")
    assert response_json(f)["type"] == "error"
    assert response_json(f)["error"]["type"] == "invalid_request_error"
    f = run("POST", "/api/chat", key="alice", body=b"[]")
    assert isinstance(response_json(f)["error"], str)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
                                  "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/v1/responses", "/v1/messages", "/api/show"])
@pytest.mark.parametrize("model, allowed", [
    ("llama3.2:1b", True), ("llama3.2:latest", True), ("qwen2.5:7b", False), ("llama3.1", False),
])
def test_model_permission(path, model, allowed):
    f = run("POST", path, key="llama", body={"model": model, "messages": []})
    assert state_of(f).model == model
    if allowed:
        assert_passed(f)
        assert state_of(f).body["model"] == model
    else:
        assert_refused(f, 403, "permission_denied")
        assert model in json.dumps(response_json(f))


@pytest.mark.parametrize("model", ["gpt-oss:120b-cloud", "kimi-k2:1t-cloud", "deepseek:cloud"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show"])
def test_cloud_models_are_refused_without_a_cloud_channel(path, model):
    f = run("POST", path, key="alice", body={"model": model})
    assert_refused(f, 403, "permission_denied")
    f = run("POST", path, key="alice", body={"model": model},
            toml='[[channels]]\nname = "a"\nbase_url = "http://127.0.0.1:11434"\n')
    assert_refused(f, 403, "permission_denied")


def test_cloud_model_with_a_cloud_channel():
    f = run("POST", "/api/chat", key="alice", body={"model": "gpt-oss:120b-cloud"},
            toml=CLOUD_CHANNEL)
    assert_passed(f)


def test_show_checks_the_deprecated_name_field():
    f = run("POST", "/api/show", key="llama", body={"name": "qwen2.5:7b"})
    assert_refused(f, 403, "permission_denied")
    f = run("POST", "/api/show", key="llama", body={"name": "llama3.2:1b"})
    assert_passed(f)
    assert state_of(f).model == "llama3.2:1b"
    f = run("POST", "/api/show", key="alice", body={"name": "gpt-oss:120b-cloud"})
    assert_refused(f, 403, "permission_denied")
    # Ollama prefers `model` when both are set; so does the check.
    f = run("POST", "/api/show", key="llama", body={"model": "qwen2.5:7b", "name": "llama3.2:1b"})
    assert_refused(f, 403, "permission_denied")


@pytest.mark.parametrize("path, body, stream", [
    ("/api/chat", {}, True),
    ("/api/chat", {"stream": True}, True),
    ("/api/chat", {"stream": False}, False),
    ("/api/generate", {}, True),
    ("/api/generate", {"stream": None}, True),
    ("/v1/chat/completions", {}, False),
    ("/v1/chat/completions", {"stream": True}, True),
    ("/v1/chat/completions", {"stream": False}, False),
    ("/v1/responses", {"stream": True}, True),
    ("/v1/messages", {}, False),
    ("/v1/messages", {"stream": True}, True),
    ("/api/embed", {}, False),
])
def test_wants_stream(path, body, stream):
    f = run("POST", path, key="alice", body={"model": "llama3.2:1b", **body})
    assert state_of(f).wants_stream is stream


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions",
                                  "/v1/messages", "/api/embed"])
@pytest.mark.parametrize("key", ["alice", "admin"])
@pytest.mark.parametrize("value", [True, False, 1, "yes"])
def test_debug_render_only_is_always_removed(path, key, value):
    f = run("POST", path, key=key, body={"model": "llama3.2:1b", "_debug_render_only": value,
                                         "messages": [{"role": "user", "content": "hi"}]})
    assert_passed(f)
    assert state_of(f).body == {"model": "llama3.2:1b",
                                          "messages": [{"role": "user", "content": "hi"}]}
    assert state_of(f).body_changed is True


@pytest.mark.parametrize("value", [0, "0", "0s", "0m", -1, "-1", "-1m", -3600, 0.0])
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed",
                                  "/v1/chat/completions"])
def test_disruptive_keep_alive_is_removed_unless_admin(path, value):
    body = {"model": "llama3.2:1b", "keep_alive": value, "prompt": "hi"}
    f = run("POST", path, key="alice", body=body)
    assert_passed(f)
    assert state_of(f).body == {"model": "llama3.2:1b", "prompt": "hi"}
    assert state_of(f).body_changed is True
    f = run("POST", path, key="admin", body=body)
    assert_passed(f)
    assert state_of(f).body == body
    assert not state_of(f).body_changed


@pytest.mark.parametrize("value", ["5m", 300, "1h", 60.5])
def test_ordinary_keep_alive_is_kept(value):
    body = {"model": "llama3.2:1b", "keep_alive": value}
    f = run("POST", "/api/generate", key="alice", body=body)
    assert state_of(f).body == body
    assert not state_of(f).body_changed


def test_cleaned_body_is_what_goes_upstream():
    # Policy cleans, the router serialises: the upstream never sees the removed fields.
    config = make_config()
    f = make_flow("POST", "/api/chat", key="alice", body={
        "model": "llama3.2:1b", "keep_alive": 0, "_debug_render_only": True, "stream": False})
    with taddons.context():
        run_request(f, Auth(config), Policy(config), Router(config))
    assert f.response is None
    assert request_json(f) == {"model": "llama3.2:1b", "stream": False}


def test_untouched_body_goes_upstream_byte_for_byte():
    config = make_config()
    raw = b'{"model":"llama3.2:1b",  "keep_alive": "5m", "prompt": "\\u00e9"}'
    f = make_flow("POST", "/api/generate", key="alice", body=raw)
    with taddons.context():
        run_request(f, Auth(config), Policy(config), Router(config))
    assert f.response is None
    assert f.request.content == raw


def test_key_removed_from_keys_yaml_meanwhile():
    config = make_config()
    f = make_flow("POST", "/api/chat", key="alice", body={"model": "llama3.2:1b"})
    with taddons.context():
        Auth(config).requestheaders(f)
        config.state = make_config(keys={"bob": {}}).state
        Policy(config).requestheaders(f)
    assert_refused(f, 401, "invalid_api_key")


def test_already_answered_flows_are_left_alone():
    config = make_config()
    f = make_flow("POST", "/api/me", key="alice", body=b"junk")
    state_of(f).key = "alice"
    f.response = http.Response.make(418)
    with taddons.context():
        Policy(config).requestheaders(f)
        Policy(config).request(f)
    assert f.response.status_code == 418
    assert not state_of(f).error


# Ollama decodes bodies with Go's encoding/json, which matches object keys to its fields
# case-insensitively, the last one winning: {"model": "a", "MODEL": "b"} is model "b" to
# Ollama. The check must hold for the body as the upstream will read it.
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
@pytest.mark.parametrize("raw", [
    b'{"model": "llama3.2:1b", "MODEL": "qwen2.5:7b"}',
    b'{"model": "llama3.2:1b", "Model": "qwen2.5:7b", "stream": false}',
])
def test_model_check_holds_for_case_variant_keys(path, raw):
    config = make_config()
    f = make_flow("POST", path, key="llama", body=raw)
    with taddons.context():
        run_request(f, Auth(config), Policy(config), Router(config))
    if f.response is None:
        sent = request_json(f)
        models = [v for k, v in sent.items() if k.lower() == "model"]
        assert models and models[-1].startswith("llama3.2:"), sent


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("field, value", [
    ("_DEBUG_RENDER_ONLY", True), ("_Debug_Render_Only", True),
    ("KEEP_ALIVE", 0), ("Keep_Alive", "0s"), ("keep_ALIVE", -1),
])
def test_body_cleaning_holds_for_case_variant_keys(path, field, value):
    config = make_config()
    f = make_flow("POST", path, key="alice", body={"model": "llama3.2:1b", field: value})
    with taddons.context():
        run_request(f, Auth(config), Policy(config), Router(config))
    if f.response is None:
        sent = request_json(f)
        for k, v in sent.items():
            assert k.lower() != "_debug_render_only", sent
            assert not (k.lower() == "keep_alive" and not keep_alive_allowed(v, 3600)), sent


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "identity, gzip", "x-unknown"])
def test_an_encoded_request_body_is_refused_before_it_is_read(encoding):
    # keygate checks exactly the bytes it forwards: it does not inflate request bodies.
    f = make_flow("POST", "/api/chat", key="llama", body={"model": "llama3.2:1b"})
    f.request.headers["content-encoding"] = encoding  # (the body stays as it is)
    config = make_config()
    with taddons.context():
        run_request(f, Auth(config), Policy(config))
    assert_refused(f, 400, "invalid_request")


def test_identity_content_encoding_is_no_encoding():
    f = make_flow("POST", "/api/chat", key="llama", headers={"content-encoding": "identity"},
                  body={"model": "llama3.2:1b", "messages": []})
    config = make_config()
    with taddons.context():
        run_request(f, Auth(config), Policy(config))
    assert f.response is None and state_of(f).model == "llama3.2:1b"


@pytest.mark.parametrize("value", [10 ** 400, -(10 ** 400), "1" * 5000 + "s",
                                   "1." + "1" * 5000 + "s", "1s" * 200_000])
def test_keep_alive_a_client_made_huge_is_removed_at_once(value):
    """A key holder chooses keep_alive: a 400-digit number, 5,000 digits in a duration
    (int() refuses more than 4,300) or a duration of 200,000 parts must neither raise in
    the stage nor cost the event loop time; none of them is a keep_alive to let through."""
    assert keep_alive_allowed(value, 3600) is False
    if isinstance(value, str):  # read no further than its length
        assert go_duration_ns(value) is None


def test_a_model_name_longer_than_any_model_is_refused_before_any_other_check():
    from keygate.model.settings import MAX_MODEL_NAME, model_name_problem
    assert model_name_problem("a" * MAX_MODEL_NAME) is None
    assert "longer" in model_name_problem("a" * 30_000_000)
    assert "longer" in model_name_problem(" " + "a" * MAX_MODEL_NAME)  # the first answer
