"""keygate/model/endpoints.py: the endpoint table of docs/endpoints.md, matched exactly as sent."""

from __future__ import annotations

import pytest

from keygate.model.endpoints import classify, path_model

DIGEST = "sha256:" + "0123456789abcdef" * 4

# docs/endpoints.md, row by row: (method, path, scope). scope None: answered by keygate, no key.
TABLE = [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("POST", "/api/chat", "inference"),
    ("POST", "/api/generate", "inference"),
    ("POST", "/api/embed", "inference"),
    ("POST", "/api/embeddings", "inference"),
    ("POST", "/v1/chat/completions", "inference"),
    ("POST", "/v1/completions", "inference"),
    ("POST", "/v1/embeddings", "inference"),
    ("POST", "/v1/responses", "inference"),
    ("POST", "/v1/messages", "inference"),
    ("GET", "/api/tags", "models"),
    ("HEAD", "/api/tags", "models"),
    ("GET", "/api/ps", "models"),
    ("GET", "/api/version", "models"),
    ("HEAD", "/api/version", "models"),
    ("POST", "/api/show", "models"),
    ("GET", "/v1/models", "models"),
    ("GET", "/v1/models/llama3.2:1b", "models"),
    ("GET", "/v1/models/gpt-4o-mini", "models"),
    ("POST", "/api/pull", "admin"),
    ("POST", "/api/push", "admin"),
    ("POST", "/api/create", "admin"),
    ("POST", "/api/copy", "admin"),
    ("DELETE", "/api/delete", "admin"),
    ("HEAD", f"/api/blobs/{DIGEST}", "admin"),
    ("POST", f"/api/blobs/{DIGEST}", "admin"),
    ("POST", f"/api/blobs/sha256-{'ab' * 32}", "admin"),
]


@pytest.mark.parametrize("method, path, scope", TABLE)
def test_table(method, path, scope):
    ep = classify(method, path)
    assert ep is not None, (method, path)
    assert ep.scope == scope


HOSTILE = [
    # spellings of a listed path that are not the path as listed
    ("POST", "//api/pull"),
    ("POST", "/api//pull"),
    ("POST", "/api/../api/pull"),
    ("POST", "/api/./pull"),
    ("POST", "/./api/pull"),
    ("POST", "/API/pull"),
    ("POST", "/api/Pull"),
    ("POST", "%2Fapi%2Fpull"),
    ("POST", "/api%2Fpull"),
    ("POST", "/api/pul%6C"),
    ("POST", "/api/pull/"),
    ("POST", "/api/chat/"),
    ("POST", "/api/chat/x"),
    ("POST", "/api/chat;x"),
    ("POST", "/api/chat%00"),
    ("POST", "/api/chat "),
    ("POST", " /api/chat"),
    ("POST", "api/chat"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/V1/chat/completions"),
    ("POST", "http://127.0.0.1:11434/api/chat"),
    ("GET", ""),
    ("GET", "//"),
    ("GET", "/index.html"),
    # wrong methods for listed paths
    ("GET", "/api/chat"),
    ("PUT", "/api/chat"),
    ("post", "/api/chat"),
    ("OPTIONS", "/api/chat"),
    ("POST", "/"),
    ("OPTIONS", "/"),
    ("POST", "/api/tags"),
    ("DELETE", "/api/tags"),
    ("HEAD", "/api/ps"),
    ("POST", "/api/version"),
    ("GET", "/api/show"),
    ("POST", "/v1/models"),
    ("HEAD", "/v1/models"),
    ("POST", "/v1/models/llama3.2:1b"),
    ("DELETE", "/v1/models/llama3.2:1b"),
    ("GET", "/api/pull"),
    ("DELETE", "/api/pull"),
    ("POST", "/api/delete"),
    ("GET", "/api/delete"),
    ("GET", f"/api/blobs/{DIGEST}"),
    ("DELETE", f"/api/blobs/{DIGEST}"),
    # parameterised paths with parameters that are not one plain segment
    ("POST", "/api/blobs/../x"),
    ("HEAD", "/api/blobs/../x"),
    ("POST", "/api/blobs/"),
    ("POST", "/api/blobs/sha256:1234"),
    ("POST", f"/api/blobs/{DIGEST.upper()}"),
    ("POST", f"/api/blobs/{DIGEST}/x"),
    ("POST", f"/api/blobs/{DIGEST}0"),
    ("POST", f"/api/blobs//{DIGEST}"),
    ("GET", "/v1/models/"),
    ("GET", "/v1/models/a/b"),
    ("GET", "/v1/models//a"),
    ("GET", "/v1/models/a/"),
    ("GET", "/v1/models/.."),
    ("GET", "/v1/models/."),
    ("GET", "/v1/models/../../api/pull"),
    # Ollama's account and cloud endpoints, and other unlisted ones
    ("GET", "/api/me"),
    ("POST", "/api/me"),
    ("POST", "/api/signout"),
    ("GET", "/api/user/keys"),
    ("POST", "/api/user/keys/abc"),
    ("DELETE", "/api/user/keys/abc"),
    ("POST", "/api/experimental/web_search"),
    ("POST", "/api/experimental/web_fetch"),
    ("GET", "/api/experimental/"),
    ("POST", "/api/web_search"),
    ("GET", "/api/status"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/metrics"),  # (GET /metrics is keygate's own, never forwarded)
    ("GET", "/metrics/"),
    ("GET", "/debug/pprof/"),
]


@pytest.mark.parametrize("method, path", HOSTILE)
def test_not_in_the_table(method, path):
    assert classify(method, path) is None


@pytest.mark.parametrize("method, path, api, kind, streams, native", [
    ("GET", "/", "ollama", "root", False, True),
    ("POST", "/api/chat", "ollama", "inference", True, True),
    ("POST", "/api/generate", "ollama", "inference", True, True),
    ("POST", "/api/embed", "ollama", "inference", False, True),
    ("POST", "/api/embeddings", "ollama", "inference", False, True),
    ("POST", "/v1/chat/completions", "openai", "inference", False, False),
    ("POST", "/v1/completions", "openai", "inference", False, False),
    ("POST", "/v1/embeddings", "openai", "inference", False, False),
    ("POST", "/v1/responses", "responses", "inference", False, False),
    ("POST", "/v1/messages", "anthropic", "inference", False, True),  # Ollama only
    ("GET", "/api/tags", "ollama", "list", False, True),
    ("GET", "/v1/models", "openai", "list", False, False),
    ("GET", "/v1/models/x", "openai", "model", False, False),
    ("POST", "/api/show", "ollama", "show", False, True),
    ("GET", "/api/ps", "ollama", "read", False, True),
    ("POST", "/api/pull", "ollama", "admin", True, True),
    ("DELETE", "/api/delete", "ollama", "admin", False, True),
    ("POST", f"/api/blobs/{DIGEST}", "ollama", "upload", False, True),
    ("HEAD", f"/api/blobs/{DIGEST}", "ollama", "admin", False, True),
])
def test_endpoint_details(method, path, api, kind, streams, native):
    ep = classify(method, path)
    assert (ep.api, ep.kind, ep.streams_by_default, ep.native) == (api, kind, streams, native)


def test_parameterised_paths_share_one_name():
    assert classify("GET", "/v1/models/a").path == "/v1/models/{model}"
    assert classify("GET", "/v1/models/b").path == "/v1/models/{model}"
    assert classify("POST", f"/api/blobs/{DIGEST}").path == "/api/blobs/{digest}"
    assert classify("POST", "/api/chat").path == "/api/chat"


@pytest.mark.parametrize("path, model", [
    ("/v1/models/llama3.2:1b", "llama3.2:1b"),
    ("/v1/models/llama3.2%3A1b", "llama3.2:1b"),
    ("/v1/models/gpt-4o-mini", "gpt-4o-mini"),
])
def test_path_model(path, model):
    assert path_model(path) == model
