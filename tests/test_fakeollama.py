"""Fidelity tests for demo/fakeollama.py, using the real clients against it directly.

No gateway is involved: these prove the fake speaks Ollama's wire formats (as the official
`ollama` and `openai` clients and raw HTTP see them), so end-to-end tests built on it test
keygate against something realistic.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

DEMO = Path(__file__).resolve().parent.parent / "demo"
sys.path.insert(0, str(DEMO))

import fakeollama  # noqa: E402
from fakeollama import FakeOllama, count_tokens  # noqa: E402

TIMEOUT = 5.0


@pytest.fixture
def fake():
    server = FakeOllama().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(fake):
    with httpx.Client(base_url=fake.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def oc(fake):
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def oll(fake):
    return ollama.Client(host=fake.url, timeout=TIMEOUT)


# --------------------------------------------------------------------------- raw HTTP helper


class RawConn:
    """A bare HTTP/1.1 connection, to see status lines, chunk boundaries and keep-alive."""

    def __init__(self, port: int, timeout: float = TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, method, path, body=b"", headers=()):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *(f"{k}: {v}" for k, v in headers)]
        if body or method in ("POST", "PUT", "DELETE"):
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _until(self, sep):
        while sep not in self.buf:
            self._fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self):
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return status, headers

    def read_chunk(self):
        """The next chunk's data, or None at the last-chunk marker."""
        size = int(self._until(b"\r\n").strip(), 16)
        if size == 0:
            self._until(b"\r\n")
            return None
        data = self._exact(size)
        assert self._exact(2) == b"\r\n"
        return data

    def read_response(self, head_only=False):
        status, headers = self.read_head()
        if headers.get("transfer-encoding") == "chunked":
            chunks = []
            while (chunk := self.read_chunk()) is not None:
                chunks.append(chunk)
            return status, headers, chunks
        body = b"" if head_only else self._exact(int(headers.get("content-length", 0)))
        return status, headers, body


def raw(fake, method, path, body=b"", headers=(), head_only=False):
    conn = RawConn(fake.port)
    try:
        conn.send(method, path, body, headers)
        return conn.read_response(head_only=head_only or method == "HEAD")
    finally:
        conn.close()


def sse_frames(chunks):
    """Split SSE chunks into (event, data) pairs, checking every chunk holds whole frames."""
    frames = []
    for chunk in chunks:
        text = chunk.decode()
        assert text.endswith("\n\n"), f"chunk does not end on a frame boundary: {text!r}"
        for frame in text[:-2].split("\n\n"):
            event, data = None, None
            for line in frame.split("\n"):
                key, _, value = line.partition(": ")
                if key == "event":
                    event = value
                else:
                    assert key == "data", line
                    data = value
            frames.append((event, data if data == "[DONE]" else json.loads(data)))
    return frames


def ndjson_lines(chunks):
    lines = []
    for chunk in chunks:
        assert chunk.endswith(b"\n"), f"chunk does not end on a line boundary: {chunk!r}"
        lines.extend(json.loads(line) for line in chunk.decode().splitlines())
    return lines


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "one two three"}]}
METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")


# --------------------------------------------------------------------------- basics


def test_count_tokens_rules():
    assert count_tokens("") == 0
    assert count_tokens(" ") == 1
    assert count_tokens("one") == 1
    assert count_tokens("  one   two\nthree ") == 3


def test_root_version_status_and_head(fake, http):
    r = http.get("/")
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    r = http.head("/")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "17"
    r = http.get("/api/version")
    assert r.json() == {"version": "0.33.0"}
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert http.head("/api/version").status_code == 200
    assert http.head("/api/tags").status_code == 200


def test_404_and_405_are_gin_text(fake, http):
    for method, path in [("GET", "/nope"), ("POST", "/api/me"), ("GET", "/v1/models/a/b"), ("GET", "/api/blobs/")]:
        r = http.request(method, path)
        assert (r.status_code, r.text) == (404, "404 page not found"), path
        assert r.headers["content-type"].startswith("text/plain")
    for method, path in [("GET", "/api/chat"), ("POST", "/"), ("HEAD", "/api/ps"), ("POST", "/api/delete"),
                         ("GET", "/api/blobs/sha256:00")]:
        r = http.request(method, path)
        assert r.status_code == 405, path
        if method != "HEAD":
            assert r.text == "405 method not allowed"


def test_tags_ps_and_models_lists(fake, http, oll):
    tags = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == list(fakeollama.DEFAULT_MODELS)  # newest first
    entry = tags[0]
    assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert entry["name"] == entry["model"] and len(entry["digest"]) == 64 and ":" not in entry["digest"]
    assert set(entry["details"]) == {"parent_model", "format", "family", "families", "parameter_size",
                                     "quantization_level"}
    assert [m.model for m in oll.list().models] == list(fakeollama.DEFAULT_MODELS)

    assert http.get("/api/ps").json() == {"models": []}
    oll.chat(model="qwen2.5:7b", messages=[{"role": "user", "content": "hi"}])
    running = http.get("/api/ps").json()["models"]
    assert [m["name"] for m in running] == ["qwen2.5:7b"]
    assert {"expires_at", "size_vram", "context_length", "details", "digest"} <= set(running[0])


def test_empty_model_lists():
    with FakeOllama(models=()) as fake:
        assert httpx.get(fake.url + "/api/tags", timeout=TIMEOUT).json() == {"models": []}
        assert httpx.get(fake.url + "/v1/models", timeout=TIMEOUT).json() == {"object": "list", "data": None}


def test_requests_are_recorded_exactly(fake, http):
    http.post("/api/chat?x=1&y=%20", content=b'{"model":"nope"}', headers={"X-Custom-Case": "Value"})
    http.get("/api/tags")
    first, second = fake.requests
    assert (first.method, first.path, first.body, first.json) == ("POST", "/api/chat?x=1&y=%20",
                                                                   b'{"model":"nope"}', {"model": "nope"})
    assert ("X-Custom-Case", "Value") in first.headers
    assert first.header("x-custom-case") == "Value"
    assert (second.method, second.path, second.body, second.json) == ("GET", "/api/tags", b"", None)
    fake.clear()
    assert fake.requests == []


def test_keep_alive_and_content_length(fake):
    conn = RawConn(fake.port)
    try:
        for _ in range(3):
            conn.send("POST", "/api/chat", {**CHAT, "stream": False})
            status, headers, body = conn.read_response()
            assert status == 200 and int(headers["content-length"]) == len(body)
            assert json.loads(body)["done"] is True
        conn.send("POST", "/api/chat", CHAT)  # a chunked stream, then the connection is reused
        status, headers, chunks = conn.read_response()
        assert headers["transfer-encoding"] == "chunked" and len(chunks) == 6
        conn.send("GET", "/api/version")
        assert conn.read_response()[2] == b'{"version":"0.33.0"}'
    finally:
        conn.close()


# --------------------------------------------------------------------------- native API via the ollama client


def test_ollama_chat_non_streamed(oll):
    r = oll.chat(model="llama3.2", messages=[{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "one two three"}])
    assert r.model == "llama3.2"
    assert r.message.role == "assistant" and r.message.content == "Hello from the fake model "
    assert (r.done, r.done_reason, r.prompt_eval_count, r.eval_count) == (True, "stop", 5, 5)
    assert all(isinstance(getattr(r, k), int) for k in METRICS)


def test_ollama_chat_streamed_counts_only_in_final_chunk(oll):
    parts = list(oll.chat(**CHAT, stream=True))
    assert [p.message.content for p in parts] == ["Hello ", "from ", "the ", "fake ", "model ", ""]
    assert all(p.done is False and p.eval_count is None and p.prompt_eval_count is None for p in parts[:-1])
    final = parts[-1]
    assert (final.done, final.done_reason, final.prompt_eval_count, final.eval_count) == (True, "stop", 3, 5)


def test_native_stream_wire_format(fake):
    status, headers, chunks = raw(fake, "POST", "/api/generate", {"model": "llama3.2", "prompt": "a b"})
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    assert headers["transfer-encoding"] == "chunked"
    assert len(chunks) == 6  # one JSON line per HTTP chunk
    lines = ndjson_lines(chunks)
    for line in lines[:-1]:
        assert set(line) == {"model", "created_at", "response", "done"}
        assert line["created_at"].endswith("Z")
    final = lines[-1]
    assert list(final)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
    assert set(METRICS) <= set(final) and final["response"] == ""
    assert (final["prompt_eval_count"], final["eval_count"]) == (2, 5)


def test_ollama_generate(oll):
    r = oll.generate(model="llama3.2", prompt="tell me a joke", system="you are funny")
    assert r.response == "Hello from the fake model " and r.context
    assert (r.prompt_eval_count, r.eval_count, r.done_reason) == (7, 5, "stop")
    parts = list(oll.generate(model="llama3.2", prompt="x", stream=True))
    assert "".join(p.response for p in parts) == "Hello from the fake model "
    assert parts[-1].prompt_eval_count == 1 and parts[-1].eval_count == 5 and parts[-1].context


def test_model_echo_and_name_matching(oll):
    assert oll.chat(model="LLAMA3.2", messages=[{"role": "user", "content": "x"}]).model == "LLAMA3.2"
    assert oll.generate(model="llama3.2:latest", prompt="x").model == "llama3.2:latest"
    with pytest.raises(ollama.ResponseError) as info:
        oll.generate(model="qwen2.5", prompt="x")  # only qwen2.5:7b exists
    assert info.value.status_code == 404 and info.value.error == "model 'qwen2.5' not found"


def test_num_predict_limits_reply(oll, fake):
    r = oll.generate(model="llama3.2", prompt="x", options={"num_predict": 2})
    assert (r.response, r.eval_count, r.done_reason) == ("Hello from ", 2, "length")
    fake.chunks = 20
    r = oll.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert r.eval_count == 20 and r.message.content.split()[16:18] == ["Hello", "from"]  # the words cycle


def test_load_and_unload_replies(fake, http):
    for path, body in [("/api/generate", {"model": "llama3.2"}), ("/api/chat", {"model": "llama3.2", "messages": []})]:
        r = http.post(path, json=body)  # streaming is on by default, but this is one object
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert r.json()["done_reason"] == "load" and r.json()["done"] is True
        assert http.post(path, json={**body, "keep_alive": 0}).json()["done_reason"] == "unload"
        assert http.post(path, json={**body, "keep_alive": "0s"}).json()["done_reason"] == "unload"


def test_native_errors(fake, http, oll):
    def err(path, **kw):
        r = http.post(path, **kw)
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        return r.status_code, r.json()

    assert err("/api/generate", json={"model": "nope", "prompt": "x"}) == (404, {"error": "model 'nope' not found"})
    assert err("/api/chat", json={"model": "nope"}) == (404, {"error": "model 'nope' not found"})
    assert err("/api/generate", json={"prompt": "x"}) == (404, {"error": "model '' not found"})
    assert err("/api/chat", json={"messages": []}) == (400, {"error": "model is required"})
    assert err("/api/chat", content=b"") == (400, {"error": "missing request body"})
    assert err("/api/chat", content=b"null") == (400, {"error": "model is required"})
    assert err("/api/chat", content=b"xyz") == (400, {"error": "invalid character 'x' looking for beginning of value"})
    assert err("/api/chat", content=b'{"model":') == (400, {"error": "unexpected EOF"})
    assert err("/api/chat", content=b"[1]")[1]["error"].startswith("json: cannot unmarshal array into Go value")
    assert err("/api/chat", json={"model": 5})[1]["error"] == (
        "json: cannot unmarshal number into Go struct field ChatRequest.model of type string")
    assert err("/api/generate", json={"model": "nomic-embed-text", "prompt": "x"}) == (
        400, {"error": '"nomic-embed-text" does not support generate'})
    with pytest.raises(ollama.ResponseError) as info:
        oll.chat(model="missing:1b", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404


def test_embed_and_legacy_embeddings(oll, http):
    r = oll.embed(model="nomic-embed-text", input=["one two", "three"])
    assert r.model == "nomic-embed-text" and r.prompt_eval_count == 3
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == fakeollama.EMBED_DIM
    assert abs(sum(x * x for x in r.embeddings[0]) - 1) < 1e-4
    assert oll.embed(model="nomic-embed-text", input="one two").embeddings == r.embeddings[:1]  # deterministic
    body = http.post("/api/embed", json={"model": "nomic-embed-text", "input": "a", "dimensions": 8}).json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert len(body["embeddings"][0]) == 8
    assert http.post("/api/embed", json={"model": "nomic-embed-text", "input": ""}).json() == {
        "model": "nomic-embed-text", "embeddings": []}
    assert http.post("/api/embed", json={"model": "nomic-embed-text", "input": 3}).json() == {
        "error": "invalid input type"}
    legacy = http.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": "hello"}).json()
    assert list(legacy) == ["embedding"] and len(legacy["embedding"]) == fakeollama.EMBED_DIM
    assert oll.embeddings(model="nomic-embed-text", prompt="hello").embedding == legacy["embedding"]
    r = http.post("/api/embeddings", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found, try pulling it first'}


def test_show(oll, http):
    shown = oll.show("llama3.2")
    assert shown.details.family == "llama" and "completion" in shown.capabilities and shown.modelfile
    by_name = http.post("/api/show", json={"name": "llama3.2"})  # deprecated alias
    assert by_name.status_code == 200 and "model_info" in by_name.json()
    r = http.post("/api/show", json={"model": "nope"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}


def test_admin_endpoints(fake, http, oll):
    progress = list(oll.pull("tinyllama", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert http.get("/api/tags").json()["models"][0]["name"] == "tinyllama:latest"  # newest first, tag filled in
    assert http.post("/api/pull", json={"model": "x:1b", "stream": False}).json() == {"status": "success"}
    status, headers, chunks = raw(fake, "POST", "/api/push", {"model": "tinyllama"})
    assert headers["content-type"] == "application/x-ndjson" and ndjson_lines(chunks)[-1] == {"status": "success"}
    assert ndjson_lines(raw(fake, "POST", "/api/create", {"model": "mine", "from": "llama3.2"})[2])[-1] == {
        "status": "success"}

    r = http.post("/api/copy", json={"source": "llama3.2", "destination": "copy1"})
    assert (r.status_code, r.content) == (200, b"")
    assert http.post("/api/copy", json={"source": "nope", "destination": "d"}).status_code == 404
    r = http.request("DELETE", "/api/delete", json={"model": "copy1"})
    assert (r.status_code, r.content) == (200, b"")
    r = http.request("DELETE", "/api/delete", json={"model": "copy1"})
    assert r.status_code == 404 and r.json() == {"error": "model 'copy1' not found"}

    blob = b"some bytes"
    digest = "sha256:" + __import__("hashlib").sha256(blob).hexdigest()
    assert http.head(f"/api/blobs/{digest}").status_code == 404
    assert http.post(f"/api/blobs/{digest}", content=b"other").status_code == 400
    assert http.post(f"/api/blobs/{digest}", content=blob).status_code == 201
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    paths = [(r.method, r.path.split("?")[0]) for r in fake.requests]
    assert ("DELETE", "/api/delete") in paths and ("HEAD", f"/api/blobs/{digest}") in paths


# --------------------------------------------------------------------------- OpenAI-compatible


def test_openai_chat_non_streamed(oc, fake):
    r = oc.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "one two three"}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.system_fingerprint == "fp_ollama"
    assert r.model == "llama3.2" and r.choices[0].message.content == "Hello from the fake model "
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)
    r = oc.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_openai_chat_stream_usage_only_when_asked(oc):
    chunks = list(oc.chat.completions.create(**CHAT, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the fake model "
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 5 + ["stop"]

    chunks = list(oc.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_openai_chat_stream_styles(fake):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, chunks = raw(fake, "POST", "/v1/chat/completions", body)
    assert headers["content-type"] == "text/event-stream"
    frames = sse_frames(chunks)
    assert all(event is None for event, _ in frames)  # Ollama's chat SSE has no event: lines
    data = [d for _, d in frames]
    assert data[-1] == "[DONE]"
    deltas = [d["choices"][0]["delta"] for d in data[:-2]]
    assert deltas[0] == {"role": "assistant", "content": "Hello "}
    assert deltas[1:5] == [{"content": w} for w in ("from ", "the ", "fake ", "model ")]
    assert deltas[5] == {} and data[-3]["choices"][0]["finish_reason"] == "stop"
    assert data[-2]["choices"] == [] and data[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                                               "total_tokens": 8}

    fake.openai_style = "legacy"
    data = [d for _, d in sse_frames(raw(fake, "POST", "/v1/chat/completions", body)[2])]
    choices = [d["choices"][0] for d in data[:-2]]
    assert len(choices) == 6 and all(c["delta"]["role"] == "assistant" for c in choices)
    assert [c["finish_reason"] for c in choices] == [None] * 5 + ["stop"]
    assert choices[-1]["delta"] == {"role": "assistant", "content": ""}


def test_openai_legacy_style_with_client(oc, fake):
    fake.openai_style = "legacy"
    chunks = list(oc.chat.completions.create(**CHAT, stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks) == "Hello from the fake model "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_usage_every_chunk(fake):
    fake.usage_every_chunk = True
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    data = [d for _, d in sse_frames(raw(fake, "POST", "/v1/chat/completions", body)[2])][:-1]
    assert all("usage" in d and d["usage"] is None for d in data[:-1])
    assert data[-1]["usage"]["total_tokens"] == 8
    data = [d for _, d in sse_frames(raw(fake, "POST", "/v1/chat/completions", {**CHAT, "stream": True})[2])][:-1]
    assert all("usage" not in d for d in data)  # only when include_usage is asked


def test_openai_completions(oc, fake):
    r = oc.completions.create(model="llama3.2", prompt="say something nice")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == "Hello from the fake model " and r.usage.prompt_tokens == 3
    chunks = list(oc.completions.create(model="llama3.2", prompt="a b", stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from the fake model "
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    # Ollama's quirk: with include_usage every other chunk carries a zeroed usage.
    assert all(c.usage.total_tokens == 0 for c in chunks[:-1])
    chunks = list(oc.completions.create(model="llama3.2", prompt="a b", stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"


def test_openai_embeddings(oc):
    r = oc.embeddings.create(model="nomic-embed-text", input=["one two", "three four five"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == fakeollama.EMBED_DIM
    assert r.usage.prompt_tokens == r.usage.total_tokens == 5
    # The SDK asks for base64 unless told otherwise, and returns it undecoded when asked explicitly.
    assert json.loads(oc.embeddings.with_raw_response.create(
        model="nomic-embed-text", input="x").http_request.content)["encoding_format"] == "base64"
    b64 = oc.embeddings.create(model="nomic-embed-text", input="one two", encoding_format="base64")
    decoded = struct.unpack(f"<{fakeollama.EMBED_DIM}f", base64.b64decode(b64.data[0].embedding))
    assert r.data[0].embedding == pytest.approx(list(decoded), abs=1e-6)
    floats = oc.embeddings.create(model="nomic-embed-text", input="one two", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(list(decoded), abs=1e-6)


def test_openai_models(oc):
    models = oc.models.list()
    assert [m.id for m in models.data] == list(fakeollama.DEFAULT_MODELS)
    assert all(m.owned_by == "library" and m.object == "model" for m in models.data)
    assert oc.models.retrieve("llama3.2").id == "llama3.2"  # echoes the path
    with pytest.raises(openai.NotFoundError) as info:
        oc.models.retrieve("nope")
    assert info.value.body == {"message": "model 'nope' not found", "type": "not_found_error", "param": None,
                               "code": None}


def test_openai_errors(fake, http, oc):
    r = http.post("/v1/chat/completions", json={"model": "llama3.2", "messages": []})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"message": "[] is too short - 'messages'", "type": "invalid_request_error",
                                  "param": None, "code": None}}
    r = http.post("/v1/chat/completions", content=b"")
    assert r.status_code == 400 and r.json()["error"]["message"] == "EOF"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is required"
    with pytest.raises(openai.NotFoundError) as info:
        oc.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "not_found_error" and info.value.body["message"] == "model 'nope' not found"


def test_responses(oc):
    r = oc.responses.create(model="llama3.2", input="one two", instructions="be nice")
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "Hello from the fake model " and r.output[0].type == "message"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (4, 5, 9)

    events = list(oc.responses.create(model="llama3.2", input=[{"role": "user", "content": "a b c"}], stream=True))
    types = [e.type for e in events]
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * 5
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1].response
    assert (completed.usage.input_tokens, completed.usage.output_tokens) == (3, 5)
    assert completed.output[0].content[0].text == "Hello from the fake model "


def test_responses_wire_format(fake):
    body = {"model": "llama3.2", "input": "x", "stream": True}
    status, headers, chunks = raw(fake, "POST", "/v1/responses", body)
    assert headers["content-type"] == "text/event-stream" and len(chunks) == 6
    frames = sse_frames(chunks)
    assert all(event == data["type"] for event, data in frames)  # "event:" lines name each frame


def test_anthropic_messages(fake, http):
    body = {"model": "llama3.2", "max_tokens": 100, "system": "sys prompt",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a b c"}]}]}
    r = http.post("/v1/messages", json=body)
    assert r.json() == {
        "id": r.json()["id"], "type": "message", "role": "assistant", "model": "llama3.2",
        "content": [{"type": "text", "text": "Hello from the fake model "}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 5}}
    assert r.json()["id"].startswith("msg_")

    with http.stream("POST", "/v1/messages", json={**body, "stream": True, "max_tokens": 3}) as r:
        assert r.headers["content-type"] == "text/event-stream"
        frames = sse_frames(list(r.iter_raw()))  # raw bytes may merge chunks; frames stay whole
    names = [e for e, _ in frames]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert all(event == data["type"] for event, data in frames)
    start, delta = frames[0][1], frames[-2][1]
    assert start["message"]["usage"] == {"input_tokens": 5, "output_tokens": 0}
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 3
    assert "".join(d["delta"]["text"] for e, d in frames if e == "content_block_delta") == "Hello from the "


def test_anthropic_errors(http):
    r = http.post("/v1/messages", json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"] == {
        "type": "invalid_request_error", "message": "max_tokens is required and must be positive"}
    body = {"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# --------------------------------------------------------------------------- auth, kinds


def test_require_bearer():
    with FakeOllama(require_bearer="sekret") as fake:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(fake.url + "/api/tags", headers=headers, timeout=TIMEOUT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(fake.url + "/api/tags", headers={"Authorization": "Bearer sekret"},
                         timeout=TIMEOUT).status_code == 200
        client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sekret", timeout=TIMEOUT, max_retries=0)
        assert client.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=fake.url + "/v1", api_key="bad", timeout=TIMEOUT, max_retries=0).models.list()


def test_kind_openai_with_prefix():
    with FakeOllama(kind="openai", prefix="/compat", models=("deepseek-chat",)) as fake:
        client = openai.OpenAI(base_url=fake.url + "/compat/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        r = client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello from the fake model " and r.usage.prompt_tokens == 1
        chunks = list(client.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "a"}],
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.total_tokens == 6
        assert [m.id for m in client.models.list().data] == ["deepseek-chat"]
        assert client.embeddings.create(model="deepseek-chat", input="x").usage.total_tokens == 1
        assert client.completions.create(model="deepseek-chat", prompt="x").choices[0].text
        for method, path in [("GET", "/compat/api/tags"), ("POST", "/v1/chat/completions"), ("GET", "/"),
                             ("POST", "/compat/v1/responses"), ("POST", "/compat/v1/messages"),
                             ("GET", "/compat/v1/models/deepseek-chat")]:
            r = httpx.request(method, fake.url + path, timeout=TIMEOUT)
            assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", path
        assert httpx.post(fake.url + "/compat/v1/models", timeout=TIMEOUT).status_code == 405


# --------------------------------------------------------------------------- fault injection


def test_fail_500(fake, http):
    fake.fail = "500"
    r = http.post("/api/chat", json=CHAT)
    assert r.status_code == 500 and r.json() == {"error": fakeollama.RUNNER_ERROR}
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert http.post("/v1/messages", json=CHAT).json()["type"] == "error"
    fake.fail = None
    assert http.post("/api/chat", json={**CHAT, "stream": False}).status_code == 200


def test_fail_reset(fake):
    fake.fail = "reset"
    with pytest.raises(httpx.TransportError):
        httpx.get(fake.url + "/api/tags", timeout=TIMEOUT)
    assert fake.requests[-1].path == "/api/tags"  # read, then dropped
    fake.fail = None
    assert httpx.get(fake.url + "/api/tags", timeout=TIMEOUT).status_code == 200


def test_fail_stall_and_bounded_stop():
    fake = FakeOllama().start()
    try:
        fake.fail = "stall"
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(fake.url + "/api/chat", json=CHAT, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3
        assert fake.requests[-1].json == CHAT
        # a stalled connection is still open when stop() runs; stop must not hang on it
        conn = RawConn(fake.port)
        conn.send("POST", "/api/chat", CHAT)
        time.sleep(0.1)
    finally:
        started = time.monotonic()
        fake.stop()
    assert time.monotonic() - started < 3
    with pytest.raises(EOFError):
        conn.read_head()
    conn.close()


def test_fail_midstream_native(fake, oll):
    fake.fail = "midstream"
    got = []
    with pytest.raises(ollama.ResponseError) as info:
        for part in oll.chat(**CHAT, stream=True):
            got.append(part.message.content)
    assert got == ["Hello ", "from "] and info.value.error == fakeollama.RUNNER_ERROR
    status, _, chunks = raw(fake, "POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
    lines = ndjson_lines(chunks)
    assert status == 200 and len(lines) == 3 and lines[-1] == {"error": fakeollama.RUNNER_ERROR}
    assert oll.chat(**CHAT).message.content  # non-streamed replies are unaffected


def test_fail_midstream_sse(fake, oc):
    fake.fail = "midstream"
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in oc.chat.completions.create(**CHAT, stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["Hello ", "from "] and fakeollama.RUNNER_ERROR in str(info.value)
    data = [d for _, d in sse_frames(raw(fake, "POST", "/v1/completions",
                                         {"model": "llama3.2", "prompt": "x", "stream": True})[2])]
    assert len(data) == 3 and data[-1]["error"]["message"] == fakeollama.RUNNER_ERROR  # no [DONE]

    frames = sse_frames(raw(fake, "POST", "/v1/messages", {**CHAT, "max_tokens": 9, "stream": True})[2])
    assert frames[-1] == ("error", {"type": "error", "error": {"type": "api_error",
                                                               "message": fakeollama.RUNNER_ERROR}})
    frames = sse_frames(raw(fake, "POST", "/v1/responses", {"model": "llama3.2", "input": "x", "stream": True})[2])
    assert frames[-1][0] == "error" and frames[-1][1]["message"] == fakeollama.RUNNER_ERROR
    assert "response.completed" not in [e for e, _ in frames]


def test_fail_cut(fake, oll, oc):
    fake.fail = "cut"
    got = []
    with pytest.raises(Exception):  # httpx reports the truncated chunked body
        for part in oll.chat(**CHAT, stream=True):
            got.append(part.message.content)
    assert got == ["Hello ", "from "]
    with pytest.raises(Exception):
        list(oc.chat.completions.create(**CHAT, stream=True))
    conn = RawConn(fake.port)
    try:
        conn.send("POST", "/v1/chat/completions", {**CHAT, "stream": True})
        status, headers = conn.read_head()
        assert conn.read_chunk() and conn.read_chunk()
        with pytest.raises(EOFError):  # closed without the last-chunk marker
            conn.read_chunk()
    finally:
        conn.close()
    assert oll.chat(**CHAT).done  # non-streamed replies are unaffected


def test_gate_holds_stream_after_first_chunk(fake):
    fake.gate = threading.Event()
    conn = RawConn(fake.port)
    try:
        conn.send("POST", "/api/chat", CHAT)
        status, headers = conn.read_head()
        first = json.loads(conn.read_chunk())
        assert status == 200 and first["message"]["content"] == "Hello "
        conn.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):  # nothing more while the gate is closed
            conn.read_chunk()
        conn.sock.settimeout(TIMEOUT)
        fake.gate.set()
        rest = []
        while (chunk := conn.read_chunk()) is not None:
            rest.append(json.loads(chunk))
        assert [r["message"]["content"] for r in rest] == ["from ", "the ", "fake ", "model ", ""]
        assert rest[-1]["done"] is True
    finally:
        conn.close()


@pytest.mark.parametrize("path, body, last", [
    ("/api/chat", CHAT, b'"done":true'),
    ("/v1/messages", {**CHAT, "max_tokens": 100, "stream": True}, b"event: message_delta"),
])
def test_hold_final_sends_the_whole_reply_but_not_its_counts(fake, path, body, last):
    fake.hold_final = threading.Event()
    conn = RawConn(fake.port)
    try:
        conn.send("POST", path, body)
        conn.read_head()
        content = [conn.read_chunk() for _ in range(5)]
        assert all(last not in c for c in content)
        conn.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):  # the final step waits for the event
            conn.read_chunk()
        conn.sock.settimeout(TIMEOUT)
        fake.hold_final.set()
        final = conn.read_chunk()
        assert last in final and conn.read_chunk() is None
    finally:
        fake.hold_final = None
        conn.close()


def test_chunk_delay_spaces_the_chunks(fake):
    fake.chunk_delay = 0.05
    conn = RawConn(fake.port)
    try:
        conn.send("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"})
        conn.read_head()
        stamps = []
        while conn.read_chunk() is not None:
            stamps.append(time.monotonic())
    finally:
        conn.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(gaps) == 5 and min(gaps) > 0.03


# --------------------------------------------------------------------------- chunk boundaries


@pytest.mark.parametrize("path, body, parse", [
    ("/api/chat", CHAT, ndjson_lines),
    ("/api/generate", {"model": "llama3.2", "prompt": "x"}, ndjson_lines),
    ("/api/pull", {"model": "m"}, ndjson_lines),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, sse_frames),
    ("/v1/completions", {"model": "llama3.2", "prompt": "x", "stream": True}, sse_frames),
    ("/v1/responses", {"model": "llama3.2", "input": "x", "stream": True}, sse_frames),
    ("/v1/messages", {**CHAT, "max_tokens": 50, "stream": True}, sse_frames),
])
@pytest.mark.parametrize("chunks", [0, 1, 5])
def test_every_chunk_holds_whole_frames(path, body, parse, chunks):
    with FakeOllama(chunks=chunks) as fake:
        status, headers, raw_chunks = raw(fake, "POST", path, body)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert "content-length" not in headers
        items = parse(raw_chunks)  # raises if a chunk splits a line or frame
        assert items
        if path == "/api/pull":
            return
        if parse is sse_frames and path in ("/v1/chat/completions", "/v1/completions"):
            assert items[-1] == (None, "[DONE]")
        if path.startswith("/api/"):
            assert items[-1]["eval_count"] == chunks


# --------------------------------------------------------------------------- CLI


def test_cli_prints_one_line_and_exits_cleanly_on_sigterm():
    proc = subprocess.Popen([sys.executable, str(DEMO / "fakeollama.py"), "--port", "0", "--chunks", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fakeollama listening on http://127.0.0.1:")
        url = line.split(" on ", 1)[1].strip()
        r = ollama.Client(host=url, timeout=TIMEOUT).generate(model="llama3.2", prompt="x")
        assert r.eval_count == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.read() == ""  # exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
