"""End to end: an upstream that fails (keygate/edge/upstream.py, the Router's failover).

With another channel that serves the model, the client never sees the failure: the
request goes there, the usage line names the channel that served and the one that failed.
Without one, keygate answers 502 upstream_error, or 504 upstream_timeout, in the client's
API shape, with x-keygate-error and x-keygate-request-id, no Server header and no internal
address. Faults: a dead port, a TLS handshake that fails, a port that accepts and never
answers, one whose accept queue is full (the connection is never made), garbage, a reset
before the response head and one in the middle of the body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time

import httpx
import ollama
import openai
import pytest

from conftest import Gateway, KeySpec, free_port
from fakeollama import FakeOllama
from helpers.hostile import h2_request, http1, send_raw
from helpers.servers import ThreadedServer

KEY = KeySpec("worker")
KEYS = {"worker": KEY}
MSGS = [{"role": "user", "content": "why is the sky blue"}]


class Broken(ThreadedServer):
    """An HTTP/1.1 upstream on 127.0.0.1 that fails every request as `mode` says, and
    counts the requests that reached it whole. Stopped by the test's fixture."""

    def __init__(self) -> None:
        self.mode = "garbage"
        super().__init__()

    async def _handle(self, reader, writer) -> None:
        try:
            first = await reader.readexactly(1)
            if first == b"\x16":  # a TLS handshake: this upstream speaks plain HTTP only
                if self.mode == "hang":
                    await asyncio.sleep(30)  # (cancelled by stop)
                writer.close()
                return
            head = first + await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            self.requests += 1
            if self.mode == "garbage":
                writer.write(b"this is not HTTP at all\r\n\r\n")
                await writer.drain()
            elif self.mode in ("429", "503"):  # the upstream's own refusal, whole
                body = b'{"error":"busy"}'
                writer.write(b"HTTP/1.1 %s Busy\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (self.mode.encode(), len(body), body))
                await writer.drain()
            elif self.mode == "te-and-cl":  # an answer mitmproxy refuses (smuggling-shaped)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\n\r\n")
                await writer.drain()
            elif self.mode == "reset-after":  # the head, part of the body, then a reset
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"model\":")
                await writer.drain()
                await asyncio.sleep(0.05)
            elif self.mode == "reset-mid-stream":  # a streamed answer's first line, then a reset
                line = (b'{"model":"llama3.2","message":{"role":"assistant","content":"x"},'
                        b'"done":false}\n')
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(line), line))
                await writer.drain()
                await asyncio.sleep(0.05)
            elif self.mode == "hang":
                await asyncio.sleep(30)  # (cancelled by stop)
            if self.mode not in ("garbage", "te-and-cl", "429", "503"):  # a reset: RST
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        writer.close()


class Stuck:
    """A port whose accept queue is full: a connection to it is never made (a host that
    drops SYNs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.held = [socket.create_connection(("127.0.0.1", self.port), timeout=2)]
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", self.port))
            self.held.append(probe)
            pytest.skip("this kernel completes connections past a full accept queue")
        except (TimeoutError, socket.timeout):
            probe.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for s in self.held:
            s.close()
        self.sock.close()


@pytest.fixture(scope="module")
def broken():
    b = Broken()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def stuck():
    s = Stuck()
    try:
        yield s
    finally:
        s.stop()


def no_internal_address(body: bytes, *ports: int) -> None:
    text = body.decode("utf-8", "replace")
    assert "127.0.0.1" not in text and "Errno" not in text, text
    for port in ports:
        assert str(port) not in text, text


# -- with two channels: the client never sees the failure ---------------------------------

# What a client asks for, one kind per broken channel (a failed channel cools down, so each
# kind gets a channel of its own that is healthy when it asks).
KINDS = ["native", "native-stream", "openai", "openai-stream", "messages"]


def failover_toml(broken_url: str, timeout: float) -> str:
    toml = f"upstream_timeout_s = {timeout}\n"
    for kind in KINDS:
        toml += (f'[[channels]]\nname = "broken-{kind}"\nbase_url = "{broken_url}"\n'
                 f'models = ["m-{kind}"]\npriority = 1\n')
    toml += '[[channels]]\nname = "backup"\nbase_url = "{backup}"\npriority = 0\n'
    toml += "[channels.model_map]\n" + "".join(f'"m-{k}" = "llama3.2"\n' for k in KINDS)
    return toml


def ask(gw, kind: str) -> str:
    """One request of `kind` through `gw` with the official clients or httpx; returns
    the reply's text, which must be the backup's."""
    model = f"m-{kind}"
    if kind == "native":
        r = httpx.post(gw.url + "/api/chat", headers=KEY.auth, timeout=20,
                       json={"model": model, "messages": MSGS, "stream": False})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.json()["message"]["content"]
    if kind == "native-stream":
        client = ollama.Client(host=gw.url, headers=KEY.auth, timeout=20)
        return "".join(part.message.content for part in client.chat(
            model=model, messages=MSGS, stream=True))
    oa = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY.secret, max_retries=0,
                       timeout=20)
    if kind == "openai":
        reply = oa.chat.completions.create(model=model, messages=MSGS)
        assert reply.model == model
        return reply.choices[0].message.content
    if kind == "openai-stream":
        return "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
            model=model, messages=MSGS, stream=True) if c.choices)
    r = httpx.post(gw.url + "/v1/messages", headers=KEY.auth, timeout=20,
                   json={"model": model, "messages": MSGS, "max_tokens": 50})
    assert r.status_code == 200, r.text
    return r.json()["content"][0]["text"]


@pytest.mark.parametrize("fault", ["dead", "tls", "tls-hang", "hang", "garbage",
                                   "reset-before", "reset-after"])
def test_failover_to_the_next_channel(fake, broken, make_gateway, fault):
    """Each kind of request fails on its broken channel and is answered by the backup:
    the client gets 200 and the backup's answer; the line names both channels; the
    broken upstream saw each request once (none: the dead port, the TLS handshake), the
    backup once."""
    broken.mode = "hang" if fault == "tls-hang" else fault
    url = {"dead": f"http://127.0.0.1:{free_port()}",
           "tls": f"https://127.0.0.1:{broken.port}",
           "tls-hang": f"https://127.0.0.1:{broken.port}"}.get(fault, broken.url)
    toml = failover_toml(url, 1).replace("{backup}", fake.url)
    gw = make_gateway("http://127.0.0.1:9", keys=KEYS, gateway_toml=toml).start()
    seen, served = broken.requests, len(fake.requests)
    for i, kind in enumerate(KINDS):
        t0 = time.monotonic()
        text = ask(gw, kind)
        took = time.monotonic() - t0
        assert text.strip(), kind
        line = gw.usage_after(i)
        assert (line["status"], line["error"], line["completed"]) == (200, None, True), line
        assert line["channel"] == "backup" and line["failed_channels"] == [f"broken-{kind}"]
        assert (line["model"], line["upstream_model"]) == (f"m-{kind}", "llama3.2")
        assert line["stream"] is kind.endswith("stream")
        assert line["completion_tokens"] > 0
        if fault.endswith("hang"):  # given up on after upstream_timeout_s, then the backup
            assert 0.9 < took < 5, took
        assert broken.requests - seen == (0 if fault.startswith(("dead", "tls")) else i + 1)
        assert len(fake.requests) - served == i + 1
    assert f"channel broken-{KINDS[0]} failed" in gw.output


def test_failover_when_no_connection_is_made(fake, stuck, make_gateway):
    """A connection that never opens (SYNs dropped) is given up on, and the request goes
    to the next channel."""
    toml = failover_toml(stuck.url, 1).replace("{backup}", fake.url)
    gw = make_gateway("http://127.0.0.1:9", keys=KEYS, gateway_toml=toml).start()
    t0 = time.monotonic()
    assert ask(gw, "openai").strip()
    assert 0.9 < time.monotonic() - t0 < 5
    line = gw.usage_after(0)
    assert line["channel"] == "backup" and line["failed_channels"] == ["broken-openai"]
    assert "no connection to broken-openai within 1 s" in gw.output


def test_all_channels_fail(broken, make_gateway):
    """Every channel that serves the model fails: 502 in the client's shape (OpenAI's here,
    whatever path the last channel had); the line names the last channel tried and the
    ones before it, in order of priority."""
    dead = f"http://127.0.0.1:{free_port()}"
    broken.mode = "garbage"
    toml = (f'[[channels]]\nname = "first"\nbase_url = "{dead}"\npriority = 3\n'
            f'[[channels]]\nname = "second"\nbase_url = "{broken.url}"\npriority = 2\n'
            f'[[channels]]\nname = "third"\nkind = "openai"\nbase_url = "{dead}/compat/v1"\n'
            'priority = 1\n')  # (its upstream path has no /v1/: the client's shape still)
    gw = make_gateway("http://127.0.0.1:9", keys=KEYS, gateway_toml=toml).start()
    seen = broken.requests
    r = httpx.post(gw.url + "/v1/chat/completions", headers=KEY.auth, timeout=10,
                   json={"model": "llama3.2", "messages": MSGS})
    assert r.status_code == 502 and "server" not in r.headers
    assert r.json()["error"]["code"] == "upstream_error" and r.json()["error"]["type"]
    no_internal_address(r.content, broken.port, int(dead.rsplit(":", 1)[1]))
    line = gw.usage_for(r.headers["x-keygate-request-id"])
    assert (line["status"], line["error"], line["completed"]) == (502, "upstream_error", False)
    assert line["channel"] == "third" and line["failed_channels"] == ["first", "second"]
    assert broken.requests - seen == 1


def test_model_management_is_not_sent_twice(broken, make_gateway):
    """A request that changes something upstream (here a model deletion) goes to the next
    channel only when it never reached the failed one. (A fake of its own: it deletes.)"""
    admin = KeySpec("admin", settings={"scopes": ["inference", "models", "admin"]})
    dead = f"http://127.0.0.1:{free_port()}"
    broken.mode = "reset-before"
    body = {"model": "llama3.2"}
    with FakeOllama() as fake:
        def toml(first: str) -> str:
            return (f'[[channels]]\nname = "first"\nbase_url = "{first}"\npriority = 1\n'
                    f'[[channels]]\nname = "backup"\nbase_url = "{fake.url}"\n')

        gw = make_gateway("http://127.0.0.1:9", keys={"admin": admin},
                          gateway_toml=toml(dead)).start()
        r = httpx.request("DELETE", gw.url + "/api/delete", headers=admin.auth, json=body,
                          timeout=10)
        assert r.status_code == 200 and len(fake.requests) == 1  # never reached "first"
        gw2 = make_gateway("http://127.0.0.1:9", keys={"admin": admin},
                           gateway_toml=toml(broken.url)).start()
        seen = broken.requests
        r = httpx.request("DELETE", gw2.url + "/api/delete", headers=admin.auth, json=body,
                          timeout=10)
        assert r.status_code == 502 and r.headers["x-keygate-error"] == "upstream_error"
        assert broken.requests == seen + 1 and len(fake.requests) == 1


def test_stream_broken_after_its_head_went_out(fake, broken, make_gateway):
    """The one case no failover can mend: a streamed answer whose head (and first line)
    went to the client. The client keeps what it got; the stream ends; the line says so."""
    broken.mode = "reset-mid-stream"
    toml = (f'[[channels]]\nname = "first"\nbase_url = "{broken.url}"\npriority = 1\n'
            f'[[channels]]\nname = "backup"\nbase_url = "{fake.url}"\n')
    gw = make_gateway("http://127.0.0.1:9", keys=KEYS, gateway_toml=toml).start()
    served = len(fake.requests)
    got = b""
    with httpx.stream("POST", gw.url + "/api/chat", headers=KEY.auth, timeout=10,
                      json={"model": "llama3.2", "messages": MSGS}) as r:
        assert r.status_code == 200
        try:
            for chunk in r.iter_raw():
                got += chunk
        except httpx.HTTPError:
            pass
    assert b'"content":"x"' in got
    line = gw.usage_for(r.headers["x-keygate-request-id"])
    assert (line["status"], line["error"], line["completed"]) == (200, "upstream_error", False)
    assert line["channel"] == "first" and line["failed_channels"] == []
    assert len(fake.requests) == served


@pytest.mark.parametrize("status", [429, 503])
def test_busy_answer_is_tried_once_on_another_channel(fake, broken, make_gateway, status):
    """An upstream's 429 or 503 to a request whose answer has not begun: the request goes
    once to another channel. Tried once: a second busy channel's answer goes out as it is."""
    broken.mode = str(status)
    toml = (f'[[channels]]\nname = "busy"\nbase_url = "{broken.url}"\npriority = 2\n'
            f'[[channels]]\nname = "backup"\nbase_url = "{fake.url}"\npriority = 1\n')
    gw = make_gateway("http://127.0.0.1:9", keys=KEYS, gateway_toml=toml).start()
    seen, served = broken.requests, len(fake.requests)
    oa = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY.secret, max_retries=0, timeout=10)
    text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="llama3.2", messages=MSGS, stream=True) if c.choices)
    assert text.strip()
    line = gw.usage_after(0)
    assert (line["status"], line["error"], line["channel"], line["failed_channels"]) == (
        200, None, "backup", ["busy"])
    assert broken.requests == seen + 1 and len(fake.requests) == served + 1
    assert f"channel busy failed (answered {status})" in gw.output

    toml = (f'[[channels]]\nname = "busy"\nbase_url = "{broken.url}"\npriority = 2\n'
            f'[[channels]]\nname = "busy2"\nbase_url = "{broken.url}"\npriority = 1\n'
            f'[[channels]]\nname = "backup"\nbase_url = "{fake.url}"\npriority = 0\n')
    gw = make_gateway("http://127.0.0.1:9", keys=KEYS, gateway_toml=toml).start()
    seen, served = broken.requests, len(fake.requests)
    r = httpx.post(gw.url + "/api/chat", headers=KEY.auth, timeout=10,
                   json={"model": "llama3.2", "messages": MSGS, "stream": False})
    assert r.status_code == status and r.json() == {"error": "busy"}  # the upstream's own
    assert "x-keygate-error" not in r.headers
    line = gw.usage_for(r.headers["x-keygate-request-id"])
    assert (line["status"], line["channel"], line["failed_channels"]) == (
        status, "busy2", ["busy"])
    assert broken.requests == seen + 2 and len(fake.requests) == served


def test_busy_answer_without_another_channel_passes(broken, lone):
    broken.mode = "429"
    r = httpx.post(lone.url + "/api/chat", headers=KEY.auth, timeout=10,
                   json={"model": "llama3.2", "messages": MSGS, "stream": False})
    assert r.status_code == 429 and r.json() == {"error": "busy"}
    line = lone.usage_for(r.headers["x-keygate-request-id"])
    assert (line["status"], line["error"], line["failed_channels"]) == (429, None, [])


# -- without channels: keygate's 502 and 504 ----------------------------------------------

@pytest.fixture(scope="module")
def lone(broken, tmp_path_factory):
    """keygate in front of `broken` alone (mitmdump's reverse target, no channels)."""
    gw = Gateway(tmp_path_factory.mktemp("lone"), broken.url, keys=KEYS,
                 gateway_toml="upstream_timeout_s = 1\n").start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def deadgw(tmp_path_factory):
    """keygate in front of a port nothing listens on."""
    gw = Gateway(tmp_path_factory.mktemp("dead"), f"http://127.0.0.1:{free_port()}",
                 keys=KEYS).start()
    try:
        yield gw
    finally:
        gw.stop()


REQUESTS = [
    ("/api/chat", {"model": "llama3.2", "messages": MSGS, "stream": False}),
    ("/api/chat", {"model": "llama3.2", "messages": MSGS}),  # streamed by default
    ("/api/generate", {"model": "llama3.2", "prompt": "why"}),
    ("/v1/chat/completions", {"model": "llama3.2", "messages": MSGS}),
    ("/v1/chat/completions", {"model": "llama3.2", "messages": MSGS, "stream": True}),
    ("/v1/messages", {"model": "llama3.2", "messages": MSGS, "max_tokens": 50}),
    ("/v1/messages", {"model": "llama3.2", "messages": MSGS, "max_tokens": 50,
                      "stream": True}),
]


def expected(fault: str) -> tuple[int, str]:
    return (504, "upstream_timeout") if fault == "hang" else (502, "upstream_error")


def check_shape(path: str, code: str, doc: dict) -> None:
    if path == "/v1/messages":
        assert doc["type"] == "error" and doc["error"]["type"] == "api_error", doc
        message = doc["error"]["message"]
    elif path.startswith("/v1/"):
        assert doc["error"]["code"] == code and doc["error"]["type"] == "api_error", doc
        message = doc["error"]["message"]
    else:
        message = doc["error"]
    assert message in ("The upstream could not be reached or broke off.",
                       "The upstream did not answer in time."), doc


@pytest.mark.parametrize("fault", ["dead", "hang", "garbage", "reset-before", "reset-after"])
def test_no_channel_left_raw_http(broken, lone, deadgw, fault):
    """Raw HTTP/1.1, kept alive: every request gets keygate's answer in its API's shape,
    and the same connection serves the next request."""
    gw = deadgw if fault == "dead" else lone
    broken.mode = fault
    status, code = expected(fault)
    seen = broken.requests
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        f = sock.makefile("rb")
        for path, body in REQUESTS:
            data = json.dumps(body).encode()
            sock.sendall(http1("POST", path, [("Authorization", f"Bearer {KEY.secret}"),
                                              ("Content-Type", "application/json")],
                               data, close=False))
            head = []
            while (line := f.readline()) not in (b"\r\n", b""):
                head.append(line.decode().rstrip("\r\n"))
            assert head and head[0].split(" ", 2)[1] == str(status), head
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            doc_bytes = f.read(int(headers["content-length"]))
            assert "server" not in headers and headers["content-type"] == "application/json"
            assert headers["x-keygate-error"] == code and "connection" not in headers
            no_internal_address(doc_bytes + "\n".join(head).encode(), broken.port)
            check_shape(path, code, json.loads(doc_bytes))
            line = gw.usage_for(headers["x-keygate-request-id"])
            assert (line["status"], line["error"], line["completed"]) == (status, code, False)
            assert line["failed_channels"] == [] and line["stream"] is False
    if fault != "dead":
        assert broken.requests - seen == len(REQUESTS)


@pytest.mark.parametrize("fault", ["dead", "hang", "reset-before"])
def test_no_channel_left_official_clients(broken, lone, deadgw, fault):
    """The openai and ollama clients see an API error with the status and keygate's
    message, streamed or not (no retries: the error itself is what is checked)."""
    gw = deadgw if fault == "dead" else lone
    broken.mode = fault
    status, code = expected(fault)
    oa = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY.secret, max_retries=0, timeout=10)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            reply = oa.chat.completions.create(model="llama3.2", messages=MSGS, stream=stream)
            if stream:
                list(reply)
        assert e.value.status_code == status
        assert e.value.body["code"] == code and "server" not in e.value.response.headers
        assert e.value.response.headers["x-keygate-request-id"].startswith("req_")
    client = ollama.Client(host=gw.url, headers=KEY.auth, timeout=10)
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as e:
            reply = client.chat(model="llama3.2", messages=MSGS, stream=stream)
            if stream:
                list(reply)
        assert e.value.status_code == status
        assert e.value.error in ("The upstream could not be reached or broke off.",
                                 "The upstream did not answer in time.")


@pytest.mark.parametrize("fault", ["dead", "hang", "reset-before", "te-and-cl"])
def test_http2_clients_get_keygate_answers(broken, lone, deadgw, fault):
    """Over HTTP/2 (TLS) too: keygate's answer, never mitmproxy's page, whether keygate
    answers through the flow or in place of mitmproxy's own (te-and-cl)."""
    gw = deadgw if fault == "dead" else lone
    broken.mode = fault
    status, code = expected(fault)
    for path, body in REQUESTS[2:6]:
        r = h2_request(gw.port, "POST", path, [("authorization", f"Bearer {KEY.secret}"),
                                                ("content-type", "application/json")],
                       json.dumps(body).encode())
        assert r.status == status, r
        assert r.header("server") is None and r.header("content-type") == "application/json"
        assert r.header("x-keygate-error") == code
        no_internal_address(r.body, broken.port)
        check_shape(path, code, json.loads(r.body))
        line = gw.usage_for(r.request_id)
        assert (line["status"], line["error"]) == (status, code)


def test_no_connection_made_is_a_timeout(stuck, make_gateway):
    """No connection within upstream_timeout_s (shorter than the connect limit): 504."""
    gw = make_gateway(stuck.url, keys=KEYS, gateway_toml="upstream_timeout_s = 1\n").start()
    t0 = time.monotonic()
    r = httpx.post(gw.url + "/api/chat", headers=KEY.auth, timeout=10,
                   json={"model": "llama3.2", "messages": MSGS, "stream": False})
    assert r.status_code == 504 and 0.9 < time.monotonic() - t0 < 5
    assert r.json() == {"error": "The upstream did not answer in time."}
    no_internal_address(r.content, stuck.port)
    line = gw.usage_for(r.headers["x-keygate-request-id"])
    assert (line["status"], line["error"]) == (504, "upstream_timeout")


def test_upstream_back_on_a_kept_connection(make_gateway):
    """An upstream that was down and comes back serves the next request on the same client
    connection (mitmproxy would otherwise answer it with the old connection error)."""
    port = free_port()
    gw = make_gateway(f"http://127.0.0.1:{port}", keys=KEYS).start()
    body = {"model": "llama3.2", "messages": MSGS, "stream": False}
    with httpx.Client(headers=KEY.auth, timeout=10) as h:
        assert h.post(gw.url + "/api/chat", json=body).status_code == 502
        with FakeOllama(port=port) as up:
            r = h.post(gw.url + "/api/chat", json=body)
            assert r.status_code == 200, r.text
            assert len(up.requests) == 1


# -- mitmproxy's own answers to malformed requests -----------------------------------------

@pytest.mark.parametrize("data,status", [
    # a header line without a colon, holding the key: never echoed
    (b"GET /api/tags HTTP/1.1\r\nHost: x\r\nbad line " + KEY.secret.encode() + b"\r\n\r\n",
     400),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.secret.encode()
     + b"\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"GET /api/tags HTTP/1.1\r\nHost: x\r\nb@d: " + KEY.secret.encode() + b"\r\n\r\n", 400),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.secret.encode()
     + b"\r\nContent-Length: 99999999999\r\n\r\n", 413),
], ids=["line-without-colon", "two-lengths", "bad-field-name", "huge-length"])
def test_malformed_requests_get_keygate_answers(deadgw, data, status):
    r = send_raw(deadgw.port, data, timeout=5)
    assert r.status == status, r
    assert r.header("server") is None and r.header("content-type") == "application/json"
    assert KEY.secret.encode() not in r.body and b"<html" not in r.body.lower()
    assert json.loads(r.body)["error"]
