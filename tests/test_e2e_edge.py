"""End to end, the holes a hostile client found at keygate's edge (issue #16): what mitmproxy
does with a request before any addon hook runs, and what keygate must not forward.

A real mitmdump runs keygate in front of the fake Ollama, which records every request it
receives byte for byte; clients are raw sockets (hostile.send_raw) and httpx. Each test
checks what reached the upstream, what the client got, and the usage line where a
request was formed.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib

import httpx
import pytest

from conftest import Gateway, KeySpec
from helpers.hostile import http1, rss_mb, send_raw

USER = KeySpec("user", settings={"models": ["llama3.2:*"]})
ANY = KeySpec("any")  # every model
ADMIN = KeySpec("admin", settings={"scopes": ["inference", "models", "admin"]})
KEYS = {k.name: k for k in (USER, ANY, ADMIN)}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
        "stream": False}


@pytest.fixture(scope="module")
def gw(fake, tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("edge"), fake.url, keys=KEYS,
                gateway_toml="max_header_kb = 16\n").start()
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture(autouse=True)
def _fresh(fake):
    fake.clear()
    yield


def auth(key: KeySpec) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key.secret}")]


def assert_keygate_error(reply, status: int, code: str) -> None:
    assert reply.status == status, reply
    assert reply.error_code == code, reply.headers
    assert reply.header("server") is None, reply.headers
    assert reply.header("content-type") == "application/json"
    assert "error" in json.loads(reply.body)
    assert b"mitmproxy" not in reply.body and b"<html" not in reply.body.lower()


def served_quickly(gw, timeout: float = 2.0) -> float:
    """Seconds an ordinary request takes meanwhile (it must be answered)."""
    t0 = time.monotonic()
    r = httpx.get(f"{gw.url}/api/version", headers=dict(auth(USER)), timeout=timeout)
    assert r.status_code == 200
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the head


def test_an_unterminated_head_over_max_header_kb_gets_431_and_is_not_buffered(gw, fake):
    """Item 2: a head without its blank line is cut off at max_header_kb: 431 in keygate's
    shape, the connection closed long before the client is done sending, memory flat,
    every other client served meanwhile."""
    before = rss_mb(gw.proc.pid)
    head = (b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + USER.secret.encode() + b"\r\nX-Pad: " + b"a" * (20 * 1024 * 1024))
    t0 = time.monotonic()
    reply = send_raw(gw.port, head)  # reads while it sends: the answer comes mid-send
    assert time.monotonic() - t0 < 5
    assert_keygate_error(reply, 431, "headers_too_large")
    assert fake.requests == []
    assert served_quickly(gw) < 1.0
    assert rss_mb(gw.proc.pid) - before < 40
    # mitmdump's log says what happened, without the request's bytes (the key).
    gw.wait_for(r"request head over 16384 bytes: answered 431")
    assert USER.secret not in gw.output


def test_a_complete_head_over_max_header_kb_gets_431(gw, fake):
    big = [("X-Pad", "b" * 20_000)]
    reply = send_raw(gw.port, http1("GET", "/v1/models", auth(USER) + big, framing="none"))
    assert_keygate_error(reply, 431, "headers_too_large")
    assert json.loads(reply.body)["error"]["code"] == "headers_too_large"  # /v1 shape
    assert reply.request_id
    assert fake.requests == []


def test_a_head_within_max_header_kb_is_served(gw, fake):
    reply = send_raw(gw.port, http1("GET", "/api/version", auth(USER) + [("X-Pad", "c" * 15_000)],
                                    framing="none"))
    assert reply.status == 200
    assert len(fake.requests) == 1


def test_a_client_leaving_mid_head_leaves_no_request_bytes_in_the_log(gw, fake):
    """Item 2: mitmproxy logged the unfinished head's bytes, and keygate's redaction ran a
    regular expression over megabytes of them on the event loop."""
    n = len(gw.lines)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nx-api-key: " + ANY.secret.encode()
                 + b"\r\nX-Pad: " + b"d" * 12_000)
    time.sleep(0.2)
    sock.close()
    line = gw.wait_for(r"before completing its request head \(\d+ bytes, not shown\)", after=n)
    assert ANY.secret not in "".join(gw.lines[n:])
    assert "d" * 100 not in line


def test_a_folded_header_line_is_refused_and_nothing_is_smuggled(gw, fake):
    """Item 9: obs-fold went upstream byte for byte; an upstream reading the fold as a new
    line saw a second request keygate never checked."""
    body = json.dumps(CHAT).encode()
    raw = (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
           + USER.secret.encode() + b"\r\nContent-Length: %d\r\n" % len(body)
           + b"X-Foo: a\r\n Transfer-Encoding: chunked\r\n\r\n" + body
           + b"0\r\n\r\nPOST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    reply = send_raw(gw.port, raw)
    assert_keygate_error(reply, 400, "invalid_request")
    assert "fold" in json.loads(reply.body)["error"]
    assert fake.requests == []


@pytest.mark.parametrize("value", [b"a\rb", b"a\x00b", b"a\x1bb", b"a\x7fb"])
def test_a_control_character_in_a_header_line_is_refused(gw, fake, value):
    raw = http1("POST", "/api/chat", auth(USER) + [(b"X-Foo", value)], json.dumps(CHAT).encode())
    reply = send_raw(gw.port, raw)
    assert_keygate_error(reply, 400, "invalid_request")
    assert fake.requests == []


def test_mitmproxys_own_400_is_keygates_and_never_echoes_the_line(gw, fake):
    """A header line without a colon: mitmproxy answered with its HTML page, its name and
    version, and the line itself, key included."""
    raw = (b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization Bearer " + USER.secret.encode()
           + b"\r\n\r\n")
    reply = send_raw(gw.port, raw)
    assert_keygate_error(reply, 400, "invalid_request")
    assert USER.secret.encode() not in reply.body
    assert USER.secret not in gw.output
    assert fake.requests == []


def test_mitmproxys_own_413_is_keygates(gw, fake):
    # Over body_size_limit (max_body_mb + 1 MiB): mitmproxy refuses at the declared length.
    raw = http1("POST", "/api/chat", auth(USER) + [("Content-Length", str(40 * 1024 * 1024))],
                b"", framing="none")
    reply = send_raw(gw.port, raw)
    assert_keygate_error(reply, 413, "request_too_large")
    assert fake.requests == []


# --------------------------------------------------------------------------- bodies


def test_bodies_of_refused_requests_are_not_buffered(gw, fake):
    """Item 10: twenty concurrent 30 MB bodies without a key took memory from 112 to
    911 MB, and it stayed there."""
    before = rss_mb(gw.proc.pid)
    body = b"x" * (30 * 1024 * 1024)
    raw = http1("POST", "/v1/chat/completions", [("Content-Type", "application/json")], body)
    replies: list = []

    def one() -> None:
        replies.append(send_raw(gw.port, raw, timeout=60))

    threads = [threading.Thread(target=one) for _ in range(20)]
    peak = before
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(gw.proc.pid))
        time.sleep(0.05)
    assert [r.status for r in replies] == [401] * 20
    assert all(r.error_code == "invalid_api_key" for r in replies)
    assert peak - before < 150, (before, peak)
    assert fake.requests == []
    assert served_quickly(gw) < 1.0


@pytest.mark.parametrize("encoding, pack", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", lambda b: b)])
def test_an_encoded_request_body_is_refused_not_checked_as_inflated(gw, fake, encoding, pack):
    """Item 1: keygate checked the inflated body but forwarded the raw bytes, which Ollama
    reads as they are: a restricted key ran another model. keygate checks exactly what it
    forwards, so an encoded body is refused."""
    body = pack(json.dumps(CHAT).encode())
    reply = send_raw(gw.port, http1("POST", "/api/chat", auth(USER) + [
        ("Content-Encoding", encoding)], body))
    assert_keygate_error(reply, 400, "invalid_request")
    assert "Content-Encoding" in json.loads(reply.body)["error"]
    assert fake.requests == []
    line = gw.usage_for(reply.request_id)
    assert (line["status"], line["error"], line["model"]) == (400, "invalid_request", None)


def test_a_decompression_bomb_is_never_inflated(gw, fake):
    """Item 4: 1 MB of gzip that inflates to 1 GB stalled everyone for seconds and took
    memory to gigabytes."""
    bomb = gzip.compress(b"\0" * (1024 * 1024 * 1024), compresslevel=9)
    before = rss_mb(gw.proc.pid)
    t0 = time.monotonic()
    reply = send_raw(gw.port, http1("POST", "/v1/chat/completions", auth(ANY) + [
        ("Content-Encoding", "gzip"), ("Content-Type", "application/json")], bomb))
    assert_keygate_error(reply, 400, "invalid_request")
    assert time.monotonic() - t0 < 3
    assert rss_mb(gw.proc.pid) - before < 40
    assert fake.requests == []


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("model, status", [
    ("gpt-oss:120b-CLOUD", 403), ("GPT-OSS:120B-Cloud", 403), ("gpt-oss:20B-CLOUD", 403),
    ("qwen3-coder:480b-Cloud", 403), ("gpt-oss:120b-cloud ", 400), ("gpt-oss:120b-cloud\t", 400),
    (" llama3.2:1b", 400), ("llama3.2:1b\n", 400), ("llama\x1b[2J", 400), ("llama\u0085x", 400),
])
def test_cloud_and_disguised_model_names_are_not_forwarded(gw, fake, model, status):
    """Item 7: other spellings of a cloud name were forwarded (Ollama compares names
    without regard to case and strips white space)."""
    r = httpx.post(f"{gw.url}/api/chat", headers=dict(auth(ANY)),
                   json={**CHAT, "model": model}, timeout=10)
    assert r.status_code == status, r.text
    assert r.headers["x-keygate-error"] == ("permission_denied" if status == 403
                                            else "invalid_request")
    assert fake.requests == []


def test_a_restricted_key_may_use_its_models_in_any_case_but_no_other(gw, fake):
    r = httpx.post(f"{gw.url}/api/chat", headers=dict(auth(USER)),
                   json={**CHAT, "model": "LLAMA3.2"}, timeout=10)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{gw.url}/api/chat", headers=dict(auth(USER)),
                   json={**CHAT, "model": "QWEN2.5:7B"}, timeout=10)
    assert r.status_code == 403
    assert [q.json["model"] for q in fake.requests] == ["LLAMA3.2"]


@pytest.mark.parametrize("value", [0.5, "0.1ns", "1ns", "999999h", 1e300, -1, "-5m", 0, "0s",
                                   3601, "1h0m1s", "bogus"])
def test_keep_alive_that_unloads_or_pins_is_removed(gw, fake, value):
    """Item 8: Ollama truncates numbers to whole seconds and parses Go durations: all of
    these unload the model for everyone or pin it for a century."""
    r = httpx.post(f"{gw.url}/api/chat", headers=dict(auth(USER)),
                   json={**CHAT, "keep_alive": value}, timeout=10)
    assert r.status_code == 200, r.text
    (sent,) = fake.requests
    assert "keep_alive" not in sent.json, sent.json
    assert sent.json["model"] == "llama3.2"


@pytest.mark.parametrize("value", [1, "5m", 3600, "1h", "30s"])
def test_keep_alive_within_bounds_is_forwarded(gw, fake, value):
    r = httpx.post(f"{gw.url}/api/chat", headers=dict(auth(USER)),
                   json={**CHAT, "keep_alive": value}, timeout=10)
    assert r.status_code == 200, r.text
    assert fake.requests[0].json["keep_alive"] == value


def test_an_admin_key_may_unload_a_model(gw, fake):
    r = httpx.post(f"{gw.url}/api/chat", headers=dict(auth(ADMIN)),
                   json={**CHAT, "keep_alive": 0}, timeout=10)
    assert r.status_code == 200, r.text
    assert fake.requests[0].json["keep_alive"] == 0


# --------------------------------------------------------------------------- the key


def test_the_key_never_leaves_through_the_query_string(gw, fake):
    """Item 12: with a valid header and ?key=<key> in the URL, the upstream received the
    key."""
    k = USER.secret
    r = httpx.get(f"{gw.url}/api/tags?key={k}&x=1&api_key=Bearer%20{k}&token={ANY.secret}",
                  headers=dict(auth(USER)), timeout=10)
    assert r.status_code == 200
    (sent,) = fake.requests
    assert sent.path == "/api/tags?x=1"
    assert k not in repr(sent) and ANY.secret not in repr(sent)
    line = gw.usage_for(r.headers["x-keygate-request-id"])
    assert line["path"] == "/api/tags" and k not in json.dumps(line)


def test_keygate_headers_from_the_client_are_not_forwarded(gw, fake):
    """Item 13."""
    r = httpx.post(f"{gw.url}/api/chat", json=CHAT, timeout=10, headers={
        **dict(auth(USER)), "X-Keygate-Key": "admin", "x-keygate-request-id": "req_forged",
        "X-Keygate-Anything": "1"})
    assert r.status_code == 200
    (sent,) = fake.requests
    assert not [k for k, _ in sent.headers if k.lower().startswith("x-keygate")], sent.headers
    assert r.headers["x-keygate-request-id"] != "req_forged"


def test_a_head_of_many_short_tokens_costs_no_hashing(gw, fake):
    """Item 16: a header of 900,000 short tokens cost 1.3 s of the event loop (each token
    hashed). Now the head is bounded and only credential headers are searched for keys:
    a head at the limit is answered at once, and others are served meanwhile."""
    tokens = " ".join(f"t{i:07d}" for i in range(1_600))  # ~14 KB, under max_header_kb
    t0 = time.monotonic()
    reply = send_raw(gw.port, http1("GET", "/api/version", auth(USER) + [("X-Many", tokens)],
                                    framing="none"))
    assert reply.status == 200
    assert time.monotonic() - t0 < 1.0
    big = " ".join(f"t{i:07d}" for i in range(900_000))
    holder: list = []
    sender = threading.Thread(target=lambda: holder.append(send_raw(
        gw.port, http1("GET", "/api/version", auth(USER) + [("X-Many", big)], framing="none"))))
    sender.start()
    assert served_quickly(gw) < 1.0
    sender.join(20)
    assert holder and holder[0].status in (431, None)


def test_bytes_sent_ahead_while_a_request_waits_are_bounded(fake, make_gateway):
    """mitmproxy kept everything a client sent after a request while that request waited
    for its upstream: 200 MB behind one keyed GET to a silent upstream was all buffered."""
    gw = make_gateway(fake.url, keys=KEYS, gateway_toml="max_body_mb = 1\n").start()
    before = rss_mb(gw.proc.pid)
    fake.gate = threading.Event()  # the upstream answers nothing until released
    try:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        sock.sendall(http1("GET", "/api/version", auth(USER), framing="none", close=False))
        sent, closed = 0, False
        try:
            while sent < 50 * 1024 * 1024:
                sock.sendall(b"x" * 65536)
                sent += 65536
        except OSError:
            closed = True
        sock.close()
        assert closed, "the connection stayed open"
        assert rss_mb(gw.proc.pid) - before < 40
        gw.wait_for(r"more bytes sent ahead than one request holds")
    finally:
        fake.gate.set()
        fake.gate = None
