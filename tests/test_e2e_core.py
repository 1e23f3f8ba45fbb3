"""End to end: a real mitmdump running addons/gateway.py in front of the fake Ollama,
spoken to by the official openai and ollama clients and by raw HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import ollama
import openai
import pytest

from fakeollama import count_tokens

PROMPT = "Why is the sky blue today"


def openai_client(gw, name="alice", **kw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key(name).secret,
                         timeout=15, max_retries=0, **kw)


def ollama_client(gw, name="alice"):
    return ollama.Client(host=gw.url, headers=gw.key(name).auth, timeout=15)


def upstream_count(fake) -> int:
    return len(fake.requests)


def assert_no_secret(gw, fake):
    """No client key in mitmdump's output, the usage log, or anything the upstream got."""
    secrets_ = [k.secret for k in gw.keys.values()]
    log_text = gw.usage_log.read_text() if gw.usage_log.exists() else ""
    upstream_text = "\n".join(
        repr(r.headers) + r.body.decode("utf-8", "replace") for r in fake.requests)
    for s in secrets_:
        assert s not in gw.output
        assert s not in log_text
        assert s not in upstream_text


# -- the happy paths, with real clients ------------------------------------------------

def test_openai_chat_non_streamed(gateway, fake):
    fake.clear()
    client = openai_client(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="llama3.2", messages=[{"role": "user", "content": PROMPT}])
    resp = raw.parse()
    assert resp.model == "llama3.2"
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens == count_tokens(PROMPT)
    rid = raw.headers["x-keygate-request-id"]
    rec = gateway.usage_for(rid)
    assert rec["key"] == "alice" and rec["status"] == 200 and rec["error"] is None
    assert rec["path"] == "/v1/chat/completions" and rec["method"] == "POST"
    assert rec["model"] == rec["upstream_model"] == "llama3.2"
    assert rec["stream"] is False and rec["completed"] is True
    assert rec["prompt_tokens"] == resp.usage.prompt_tokens
    assert rec["completion_tokens"] == resp.usage.completion_tokens
    assert rec["total_tokens"] == resp.usage.total_tokens
    assert rec["client_ip"] == "127.0.0.1"
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.header("authorization") is None and sent.header("x-api-key") is None
    assert_no_secret(gateway, fake)


def test_openai_chat_streamed_usage_is_counted_but_not_shown(gateway, fake):
    fake.clear()
    client = openai_client(gateway)
    n = gateway.settled_count()
    chunks = list(client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": PROMPT}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # The client did not ask for usage: it gets none, though keygate asked upstream.
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}
    rec = gateway.usage_after(n)
    assert rec["stream"] is True and rec["completed"] is True
    assert rec["prompt_tokens"] == count_tokens(PROMPT)
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert rec["completion_tokens"] == len(pieces)


def test_openai_chat_streamed_with_usage_requested(gateway, fake):
    client = openai_client(gateway)
    n = gateway.settled_count()
    chunks = list(client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": PROMPT}], stream=True,
        stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1
    rec = gateway.usage_after(n)
    assert rec["prompt_tokens"] == usage[0].prompt_tokens
    assert rec["completion_tokens"] == usage[0].completion_tokens


def test_openai_embeddings_and_models(gateway, fake):
    client = openai_client(gateway)
    n = gateway.settled_count()
    emb = client.embeddings.create(model="nomic-embed-text", input=["hello world", "x"])
    assert len(emb.data) == 2
    rec = gateway.usage_after(n)
    assert rec["prompt_tokens"] == emb.usage.prompt_tokens > 0
    ids = [m.id for m in client.models.list()]
    assert "llama3.2:latest" in ids


def test_ollama_client_chat_and_generate(gateway, fake):
    client = ollama_client(gateway)
    n = gateway.settled_count()
    resp = client.chat(model="llama3.2", messages=[{"role": "user", "content": PROMPT}])
    assert resp.message.content
    rec = gateway.usage_after(n)
    assert rec["stream"] is False
    assert rec["prompt_tokens"] == resp.prompt_eval_count == count_tokens(PROMPT)
    assert rec["completion_tokens"] == resp.eval_count

    parts = list(client.generate(model="llama3.2", prompt=PROMPT, stream=True))
    assert parts[-1].done and parts[-1].eval_count
    rec = gateway.usage_after(n + 1)
    assert rec["path"] == "/api/generate" and rec["stream"] is True
    assert rec["completed"] is True
    assert rec["prompt_tokens"] == parts[-1].prompt_eval_count
    assert rec["completion_tokens"] == parts[-1].eval_count

    streamed = list(client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}],
                                stream=True))
    assert streamed[-1].done
    assert gateway.usage_after(n + 2)["completion_tokens"] == streamed[-1].eval_count

    emb = client.embed(model="nomic-embed-text", input="hello there")
    assert emb.embeddings
    assert gateway.usage_after(n + 3)["prompt_tokens"] == emb.prompt_eval_count

    listed = [m.model for m in client.list().models]
    assert "llama3.2:latest" in listed
    assert_no_secret(gateway, fake)


def test_x_api_key_and_anthropic_messages(gateway, fake):
    key = gateway.key("alice").secret
    r = httpx.post(gateway.url + "/v1/messages", headers={"x-api-key": key},
                   json={"model": "llama3.2", "max_tokens": 50,
                         "messages": [{"role": "user", "content": PROMPT}]}, timeout=15)
    assert r.status_code == 200, r.text
    body = r.json()
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert rec["prompt_tokens"] == body["usage"]["input_tokens"]
    assert rec["completion_tokens"] == body["usage"]["output_tokens"]


def test_root_is_answered_locally(gateway, fake):
    before = upstream_count(fake)
    r = httpx.get(gateway.url + "/", timeout=5)
    assert r.status_code == 200 and "Ollama is running" not in r.text
    assert r.headers["x-keygate-request-id"]
    h = httpx.head(gateway.url + "/", timeout=5)
    assert h.status_code == 200
    assert upstream_count(fake) == before


# -- refusals: status, code, shape, and nothing upstream --------------------------------

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}

REFUSALS = [
    # (name of key or None, extra headers, method, path, body, status, code)
    (None, {}, "POST", "/api/chat", CHAT, 401, "invalid_api_key"),
    ("wrong", {}, "POST", "/api/chat", CHAT, 401, "invalid_api_key"),
    ("disabled", {}, "POST", "/v1/chat/completions", CHAT, 401, "invalid_api_key"),
    ("expired", {}, "POST", "/api/chat", CHAT, 401, "invalid_api_key"),
    ("elsewhere", {}, "POST", "/api/chat", CHAT, 403, "permission_denied"),
    ("reader", {}, "POST", "/api/chat", CHAT, 403, "permission_denied"),
    ("llama-only", {}, "POST", "/api/chat", {**CHAT, "model": "qwen2.5:7b"}, 403,
     "permission_denied"),
    ("alice", {}, "POST", "/api/chat", {**CHAT, "model": "gpt-oss:120b-cloud"}, 403,
     "permission_denied"),
    ("alice", {}, "POST", "/api/chat", b"{not json", 400, "invalid_request"),
    ("alice", {}, "POST", "/api/chat", [1, 2], 400, "invalid_request"),
    ("alice", {}, "POST", "/v1/chat/completions", {"messages": []}, 400, "invalid_request"),
    ("alice", {}, "POST", "/api/generate", {"model": 5}, 400, "invalid_request"),
    ("alice", {}, "GET", "/api/me", None, 404, "unknown_endpoint"),
    ("alice", {}, "POST", "/api/experimental/web_search", {"query": "x"}, 404,
     "unknown_endpoint"),
    ("alice", {}, "GET", "/api/status", None, 404, "unknown_endpoint"),
    ("alice", {}, "GET", "/api/chat", None, 404, "unknown_endpoint"),
    ("alice", {}, "GET", "/v1/models/qwen2.5:7b/../x", None, 404, "unknown_endpoint"),
    ("llama-only", {}, "GET", "/v1/models/qwen2.5:7b", None, 404, "model_not_found"),
    ("llama-only", {}, "POST", "/api/show", {"name": "qwen2.5:7b"}, 403, "permission_denied"),
    (None, {"Authorization": "Basic dXNlcjpwYXNz"}, "GET", "/api/tags", None, 401,
     "invalid_api_key"),
]

ADMIN_CALLS = [
    ("POST", "/api/pull", {"model": "all-minilm"}),
    ("POST", "/api/push", {"model": "llama3.2"}),
    ("POST", "/api/create", {"model": "x", "from": "llama3.2"}),
    ("POST", "/api/copy", {"source": "llama3.2", "destination": "scratch:latest"}),
    ("DELETE", "/api/delete", {"model": "scratch:latest"}),
    ("HEAD", "/api/blobs/sha256:" + "a" * 64, None),
    ("POST", "/api/blobs/sha256:" + "a" * 64, b"blob"),
]
for method, path, body in ADMIN_CALLS:
    REFUSALS.append(("alice", {}, method, path, body, 403, "permission_denied"))

# Ways to spell an admin endpoint that must not reach it: none is in the table.
PATH_VARIANTS = ["//api/pull", "/api/../api/pull", "/API/pull", "/api/Pull", "/%2Fapi%2Fpull",
                 "/api%2Fpull", "/api/pull/", "/api/pull?x=1/", "/./api/pull", "/api/pull%00",
                 "/api/pull;x", "/api/blobs/sha256:../../etc/passwd", "/api//pull"]
for p in PATH_VARIANTS:
    code = 404 if not p.startswith("/api/pull?") else 403
    REFUSALS.append(("admin" if code == 404 else "alice", {}, "POST", p, {"model": "x"}, code,
                     "unknown_endpoint" if code == 404 else "permission_denied"))


def raw_request(gw, method, path, headers=None, body=None, timeout=10) -> tuple[int, dict, bytes]:
    """HTTP/1.1 over a plain socket: the path goes out exactly as written."""
    if body is None:
        payload = b""
    elif isinstance(body, bytes):
        payload = body
    else:
        payload = json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", "Connection: close",
             f"Content-Length: {len(payload)}"]
    if payload:
        lines.append("Content-Type: application/json")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), hdrs, rest


@pytest.mark.parametrize("who,extra,method,path,body,status,code", REFUSALS,
                         ids=[f"{r[2]} {r[3]} as {r[0]}" for r in REFUSALS])
def test_refusals(gateway, fake, who, extra, method, path, body, status, code):
    headers = dict(extra)
    if who == "wrong":
        headers["Authorization"] = "Bearer sk-not-a-key-at-all"
    elif who:
        headers.update(gateway.key(who).auth)
    before = upstream_count(fake)
    got, hdrs, payload = raw_request(gateway, method, path, headers, body)
    assert got == status, payload
    assert hdrs["x-keygate-error"] == code
    assert hdrs["x-keygate-request-id"].startswith("req_")
    if method != "HEAD":
        doc = json.loads(payload)
        if path.startswith("/v1/"):
            assert doc["error"]["code"] == code and doc["error"]["message"]
        else:
            assert isinstance(doc["error"], str) and doc["error"]
    time.sleep(0.05)
    assert upstream_count(fake) == before, "a refused request reached the upstream"
    rec = gateway.usage_for(hdrs["x-keygate-request-id"])
    assert rec["status"] == status and rec["error"] == code
    assert rec["key"] == (who if who in ("elsewhere", "reader", "llama-only", "alice", "admin")
                          else None)


def test_request_target_that_is_not_a_path_is_refused_by_mitmproxy(gateway, fake):
    # Not origin-form, so mitmproxy's HTTP parser answers 400 before any addon runs.
    before = upstream_count(fake)
    got, _, _ = raw_request(gateway, "POST", "%2Fapi%2Fpull", gateway.key("admin").auth,
                            {"model": "x"})
    assert got == 400
    assert upstream_count(fake) == before


def test_anthropic_error_shape(gateway, fake):
    r = httpx.post(gateway.url + "/v1/messages", json=CHAT, timeout=5)
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error",
                                                   "message": r.json()["error"]["message"]}}


def test_admin_scope_reaches_admin_endpoints(gateway, fake):
    for method, path, body in ADMIN_CALLS:
        before = upstream_count(fake)
        got, hdrs, payload = raw_request(gateway, method, path, gateway.key("admin").auth, body)
        assert got < 500 and "x-keygate-error" not in hdrs, (path, got, payload)
        assert upstream_count(fake) == before + 1
        assert fake.requests[-1].path == path


def test_query_string_is_forwarded_unchanged(gateway, fake):
    got, hdrs, _ = raw_request(gateway, "GET", "/api/tags?verbose=1&x=%2F",
                               gateway.key("alice").auth)
    assert got == 200
    assert fake.requests[-1].path == "/api/tags?verbose=1&x=%2F"


def test_model_lists_are_filtered_per_key(gateway, fake):
    got, _, body = raw_request(gateway, "GET", "/api/tags", gateway.key("llama-only").auth)
    names = [m["name"] for m in json.loads(body)["models"]]
    assert names and all(n.startswith("llama3.2:") for n in names)
    got, _, body = raw_request(gateway, "GET", "/v1/models", gateway.key("llama-only").auth)
    assert [m["id"] for m in json.loads(body)["data"]] == names


def test_body_is_cleaned(gateway, fake):
    body = {**CHAT, "stream": False, "_debug_render_only": True, "keep_alive": 0}
    got, _, _ = raw_request(gateway, "POST", "/api/chat", gateway.key("alice").auth, body)
    assert got == 200
    sent = fake.requests[-1].json
    assert "_debug_render_only" not in sent and "keep_alive" not in sent
    got, _, _ = raw_request(gateway, "POST", "/api/chat", gateway.key("admin").auth, body)
    sent = fake.requests[-1].json
    assert "_debug_render_only" not in sent and sent["keep_alive"] == 0


def test_origin_is_not_forwarded(gateway, fake):
    got, hdrs, _ = raw_request(gateway, "GET", "/api/version",
                               {**gateway.key("alice").auth, "Origin": "https://evil.example"})
    assert got == 200
    assert fake.requests[-1].header("origin") is None
    assert "access-control-allow-origin" not in hdrs


# -- streams are not buffered -----------------------------------------------------------

def test_stream_first_chunk_arrives_while_upstream_holds_the_rest(gateway, fake):
    gate = threading.Event()
    fake.gate = gate
    n = gateway.settled_count()
    try:
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", gateway.url + "/api/chat", headers=gateway.key("alice").auth,
                          json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = json.loads(next(lines))  # upstream still holds the rest
                assert first["done"] is False and first["message"]["content"]
                assert not gate.is_set()
                gate.set()
                rest = [json.loads(x) for x in lines if x]
        assert rest[-1]["done"] is True
    finally:
        fake.gate = None
        gate.set()
    rec = gateway.usage_after(n)
    assert rec["stream"] is True and rec["completed"] is True and rec["completion_tokens"] > 0


def test_sse_first_event_arrives_while_upstream_holds_the_rest(gateway, fake):
    gate = threading.Event()
    fake.gate = gate
    try:
        client = openai_client(gateway)
        stream = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
        first = next(iter(stream))
        assert first.choices and not gate.is_set()
        gate.set()
        rest = list(stream)
        assert rest and rest[-1].choices[0].finish_reason
    finally:
        fake.gate = None
        gate.set()
