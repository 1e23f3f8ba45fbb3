"""End to end, things going wrong around keygate (issue #7): upstreams that refuse, reset,
stall, break off, answer garbage or far too much; keygate's own files deleted, emptied,
replaced or looped while it runs; and load with an upstream that keeps failing.

What must hold throughout: the client gets the documented answer (or the part of a stream
that was sent), keygate keeps serving, and the usage log accounts for every request
exactly once, with `completed: false` where a stream broke and `error: "upstream_error"`
where the upstream failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Gateway, KeySpec, eventually, keys_yaml
from fakeollama import FakeOllama
from helpers.hostile import Tracker, http1, rss_mb, send_raw
from helpers.servers import ThreadedServer

KEY = KeySpec("worker")
KEYS = {"worker": KEY, "limited": KeySpec("limited", settings={"limits": {"concurrent": 3}}),
        "reader": KeySpec("reader", settings={"scopes": ["models"]})}
AUTH = KEY.auth
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue"}]}
REFUSED = {"invalid_request", "invalid_api_key", "permission_denied", "unknown_endpoint",
           "model_not_found", "request_too_large", "rate_limit_exceeded", "insufficient_quota",
           "gateway_unavailable"}


# -- a scripted upstream: answers what the fake cannot be made to ---------------------------

class Scripted(ThreadedServer):
    """A tiny HTTP/1.1 upstream on 127.0.0.1 whose answer to the next requests is `mode`.
    GET /api/version is always answered normally (the tests' health check)."""

    LINE = b'{"model":"llama3.2","message":{"role":"assistant","content":"x "},"done":false}\n'

    def __init__(self) -> None:
        self.mode = "ok"
        super().__init__()

    async def _handle(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                if head.startswith(b"GET /api/version "):
                    body = b'{"version":"0.33.0"}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                await getattr(self, "_" + self.mode.replace("-", "_"))(writer)
                writer.close()
                return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _ok(self, w):
        body = b'{"model":"llama3.2","done":true,"prompt_eval_count":2,"eval_count":3}'
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))
        await w.drain()

    async def _bad_json(self, w):
        body = b'{"model": "llama3.2", "message": {'
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))
        await w.drain()

    async def _garbage(self, w):
        w.write(b"this is not HTTP at all\r\n\r\n")
        await w.drain()

    async def _short_body(self, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"a\":")
        await w.drain()

    async def _te_and_cl(self, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        await w.drain()

    async def _huge(self, w, n=50 * 1024 * 1024):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % n)
        w.write(b'{"a":"')
        chunk, sent = b" " * (1 << 20), 6
        while sent < n - 2:
            part = chunk[:min(len(chunk), n - 2 - sent)]
            w.write(part)
            sent += len(part)
            await w.drain()
        w.write(b'"}')
        await w.drain()

    async def _huge_chunked(self, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * (1 << 20)
        for _ in range(50):
            w.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()

    async def _lines(self, w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        buf = b""
        for _ in range(100_000):
            buf += self.LINE
            if len(buf) > 60_000:
                w.write(b"%x\r\n%s\r\n" % (len(buf), buf))
                buf = b""
                await w.drain()
        buf += b'{"model":"llama3.2","done":true,"prompt_eval_count":3,"eval_count":100000}\n'
        w.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(buf), buf))
        await w.drain()


@pytest.fixture(scope="module")
def scripted():
    s = Scripted()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def sgw(scripted, tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("scripted"), scripted.url, keys=KEYS).start()
    try:
        yield gw
    finally:
        gw.stop()


def post_chat(gw, timeout=30, body=None):
    return httpx.post(gw.url + "/api/chat", headers=AUTH, timeout=timeout,
                      json=body or {**CHAT, "stream": False})


# -- 2. failing upstreams -------------------------------------------------------------------

# keygate answers all of these in its shape, with the request id; `by_flow`: through the
# flow's hooks (keygate/edge/upstream.py, or the Meter for bad JSON), the connection kept;
# else from its HTTP/1 edge where mitmproxy ended the request (keygate/edge/http1.py),
# which closes the connection.
@pytest.mark.parametrize("mode,status,by_flow", [
    ("bad-json", 502, True),  # a success that is garbage
    ("garbage", 502, True),  # no HTTP at all
    ("short-body", 502, True),  # closed before its Content-Length was sent
    ("te-and-cl", 502, False),  # a smuggling-shaped answer: mitmproxy refuses it
    ("huge", 502, False),  # 50 MB, over body_size_limit (max_body_mb + 1 MiB = 33 MiB)
    ("huge-chunked", 502, False),  # the same without a length: cut off once over the limit
])
def test_upstream_answers_garbage_or_too_much(sgw, scripted, mode, status, by_flow):
    """Whatever mitmproxy or keygate sends instead, the line says 502 upstream_error, not
    the upstream's 200 (before: 200 and completed false for the last four)."""
    t = Tracker(sgw)
    scripted.mode = mode
    before = rss_mb(sgw.proc.pid)
    try:
        r = post_chat(sgw)
    finally:
        scripted.mode = "ok"
    assert r.status_code == status
    assert r.headers.get("x-keygate-error") == "upstream_error"
    assert r.json()["error"] and "server" not in r.headers
    assert (r.headers.get("connection") == "close") is not by_flow
    rec = t.health(KEY.secret)
    lines = [x for x in t.since_mark() if x["id"] != rec["id"]]
    assert len(lines) == 1, lines
    assert lines[0]["id"] == r.headers["x-keygate-request-id"]
    assert (lines[0]["status"], lines[0]["error"]) == (502, "upstream_error"), lines[0]
    assert lines[0]["key"] == "worker" and lines[0]["completed"] is (mode == "bad-json")
    if mode.startswith("huge"):
        # mitmproxy holds what it buffered until it gives up, then lets go of it
        print(f"{mode}: mitmdump RSS {before:.0f} MB -> {rss_mb(sgw.proc.pid):.0f} MB")
        assert rss_mb(sgw.proc.pid) - before < 200


def test_stream_of_100k_lines_passes_whole(sgw, scripted):
    t = Tracker(sgw)
    scripted.mode = "lines"
    try:
        t0 = time.monotonic()
        with httpx.stream("POST", sgw.url + "/api/chat", headers=AUTH, json=CHAT,
                          timeout=60) as r:
            n = sum(1 for line in r.iter_lines() if line)
        took = time.monotonic() - t0
    finally:
        scripted.mode = "ok"
    assert n == 100_001
    rec = t.wait_id(r.headers["x-keygate-request-id"])
    assert rec["stream"] is True and rec["completed"] is True and rec["error"] is None
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (3, 100_000)
    print(f"100,001 NDJSON lines (8 MB) through keygate in {took:.2f} s")


@pytest.fixture(scope="module")
def fgw(fake, tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("faults"), fake.url, keys=KEYS).start()
    try:
        yield gw
    finally:
        gw.stop()


def test_refused_connection(fake, make_gateway):
    """Nothing listens upstream: keygate answers 502 upstream_error in its shape, with the
    request id; it still answers what it answers itself, and stays up."""
    dead = FakeOllama().start()
    url = dead.url
    dead.stop()
    gw = make_gateway(url, keys=KEYS).start()
    t = Tracker(gw)
    ids = []
    for _ in range(20):
        r = post_chat(gw)
        assert r.status_code == 502 and r.json() == {
            "error": "The upstream could not be reached or broke off."}
        assert "server" not in r.headers and r.headers["x-keygate-error"] == "upstream_error"
        ids.append(r.headers["x-keygate-request-id"])
    r = httpx.post(gw.url + "/api/pull", headers=AUTH, json={"model": "x"}, timeout=5)
    assert r.status_code == 403  # refused without any upstream connection (lazy)
    assert httpx.get(gw.url + "/", timeout=5).status_code == 200
    assert eventually(lambda: len(t.read()) >= 22)
    lines = t.read()
    assert len(lines) == 22
    assert [(x["status"], x["error"], x["completed"]) for x in lines[:20]] == [
        (502, "upstream_error", False)] * 20
    assert [x["id"] for x in lines[:20]] == ids
    assert gw.proc.poll() is None


@pytest.mark.parametrize("path,body", [
    ("/api/chat", {**CHAT, "stream": False}),
    ("/api/chat", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/messages", {**CHAT, "max_tokens": 50, "stream": True}),
])
def test_reset_before_answering(fgw, fake, path, body):
    t = Tracker(fgw, [fake])
    fake.fail = "reset"
    try:
        r = httpx.post(fgw.url + path, headers=AUTH, json=body, timeout=10)
    finally:
        fake.fail = None
    assert r.status_code == 502 and r.headers["x-keygate-error"] == "upstream_error"
    rec = t.health(KEY.secret)
    lines = [x for x in t.since_mark() if x["id"] != rec["id"]]
    assert [(x["status"], x["error"], x["completed"], x["id"]) for x in lines] == [
        (502, "upstream_error", False, r.headers["x-keygate-request-id"])]


def test_upstream_500_passes_through(fgw, fake):
    fake.fail = "500"
    try:
        r = httpx.post(fgw.url + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=10)
    finally:
        fake.fail = None
    assert r.status_code == 500 and "llama runner" in r.json()["error"]["message"]
    assert "x-keygate-error" not in r.headers  # the upstream's own error, as it is
    rec = Tracker(fgw).wait_id(r.headers["x-keygate-request-id"])
    assert (rec["status"], rec["error"]) == (500, None)


@pytest.mark.parametrize("path,body", [
    ("/api/chat", CHAT),
    ("/api/generate", {"model": "llama3.2", "prompt": "why"}),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", {"model": "llama3.2", "prompt": "why", "stream": True}),
    ("/v1/responses", {"model": "llama3.2", "input": "why", "stream": True}),
    ("/v1/messages", {**CHAT, "max_tokens": 50, "stream": True}),
])
@pytest.mark.parametrize("fault", ["cut", "midstream"])
def test_stream_broken_midway(fgw, fake, path, body, fault):
    """cut: the connection closes without the last chunk; midstream: an error frame, then
    a clean end. The client gets what was sent; the line: completed false, upstream_error."""
    t = Tracker(fgw, [fake])
    fake.fail = fault
    got = b""
    try:
        with httpx.stream("POST", fgw.url + path, headers=AUTH, json=body, timeout=10) as r:
            assert r.status_code == 200
            rid = r.headers["x-keygate-request-id"]
            try:
                for chunk in r.iter_raw():
                    got += chunk
            except httpx.HTTPError:
                assert fault == "cut"
    finally:
        fake.fail = None
    assert got  # the part the upstream sent before it broke
    rec = t.wait_id(rid)
    assert (rec["status"], rec["stream"], rec["completed"], rec["error"]) == (
        200, True, False, "upstream_error"), rec


def test_stall_client_gives_up_and_gateway_serves_others(fgw, fake):
    """upstream_timeout_s (300 here) is far away: the client gives up first. Meanwhile
    other requests are served; the stalled request's line is written when the client
    leaves (499, nothing was sent)."""
    t = Tracker(fgw, [fake])
    fake.fail = "stall"
    n = len(fake.requests)
    result = {}

    def stalled():
        try:
            httpx.post(fgw.url + "/api/chat", headers=AUTH, json=CHAT, timeout=3)
        except httpx.ReadTimeout:
            result["timeout"] = time.monotonic()

    th = threading.Thread(target=stalled)
    th.start()
    try:
        assert eventually(lambda: len(fake.requests) > n)  # held by the upstream now
    finally:
        fake.fail = None  # requests already held stay held
    for _ in range(5):
        assert post_chat(fgw, timeout=5).status_code == 200
    th.join(10)
    assert "timeout" in result
    lines = eventually(lambda: [x for x in t.read()[t.mark_line:] if x["status"] == 499], 5)
    assert len(lines) == 1
    assert lines[0]["completed"] is False and lines[0]["key"] == "worker"
    assert time.monotonic() - result["timeout"] < 5


def test_stall_past_upstream_timeout(fake, make_gateway):
    gw = make_gateway(fake.url, keys=KEYS, gateway_toml="upstream_timeout_s = 1\n").start()
    t = Tracker(gw)
    fake.fail = "stall"
    try:
        t0 = time.monotonic()
        r = httpx.post(gw.url + "/api/chat", headers=AUTH, json=CHAT, timeout=10)
        took = time.monotonic() - t0
    finally:
        fake.fail = None
    assert r.status_code == 504 and 0.9 < took < 5
    assert r.json() == {"error": "The upstream did not answer in time."}
    assert r.headers["x-keygate-error"] == "upstream_timeout"
    rec = t.health(KEY.secret)
    lines = [x for x in t.since_mark() if x["id"] != rec["id"]]
    assert [(x["status"], x["error"]) for x in lines] == [(504, "upstream_timeout")]


def test_client_request_body_never_finished(fgw, fake):
    """A client that announces more body than it sends, then stops: never forwarded, and
    the line says so (499, invalid_request: counts for nothing), not upstream_error."""
    t = Tracker(fgw, [fake])
    body = json.dumps(CHAT).encode()
    data = http1("POST", "/api/chat", [("Authorization", f"Bearer {KEY.secret}"),
                                       ("Content-Length", str(len(body) + 100))],
                 body, framing="none")
    r = send_raw(fgw.port, data, timeout=1)
    assert r.status is None
    rec = t.health(KEY.secret)
    lines = [x for x in t.since_mark() if x["id"] != rec["id"]]
    assert [(x["status"], x["error"], x["key"]) for x in lines] == [
        (499, "invalid_request", "worker")]
    assert t.upstream_since_mark()[:-1] == []


# -- 3. keygate's own files while it runs --------------------------------------------------

def break_file(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "emptied":
        path.write_text("")
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "symlink-loop":
        path.unlink()
        os.symlink(path.name, path)
    elif how == "dangling-symlink":
        path.unlink()
        os.symlink("/nonexistent/keygate/file", path)
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "binary":
        path.write_bytes(b"\xff\xfe\x00\x01 not text")
    else:
        raise AssertionError(how)


def clear_path(path: Path) -> None:
    if path.is_symlink() or path.is_file() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@pytest.fixture(scope="module")
def cgw(fake, tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("files"), fake.url, keys=dict(KEYS),
                 gateway_toml="max_body_mb = 4\n").start()
    try:
        yield gw
    finally:
        gw.stop()


FILE_FAULTS = ["deleted", "emptied", "directory", "symlink-loop", "dangling-symlink", "fifo",
               "binary"]


@pytest.mark.parametrize("how", FILE_FAULTS)
@pytest.mark.parametrize("which", ["keys_file", "config"])
def test_config_file_broken_while_running(cgw, which, how):
    """keygate keeps serving with the last good configuration, says which file and what is
    wrong, and takes the fixed file when it comes back; every request has its line.
    (Before: an emptied keys.yaml meant no keys at all; a deleted or emptied gateway.toml
    silently meant all defaults, with the usage log moved to ../logs/; a symlink loop at
    gateway.toml killed the reload watcher for good, and a FIFO hung it for good.)"""
    gw = cgw
    t = Tracker(gw)
    path = getattr(gw, which)
    good_text = path.read_text()
    sent = 0

    def serve_ok():
        nonlocal sent
        r = post_chat(gw, timeout=10)
        sent += 1
        assert r.status_code == 200, r.text
        return r

    serve_ok()
    mark = len(gw.lines)
    break_file(path, how)
    try:
        line = gw.wait_for(r"keeping the last good configuration", timeout=5, after=mark)
        assert str(path.name) in line or "/nonexistent/keygate/file" in line, line
        for _ in range(3):
            serve_ok()
        assert "maximum recursion" not in "".join(gw.lines[mark:])
        assert "Traceback" not in "".join(gw.lines[mark:]), "".join(gw.lines[mark:])
    finally:
        # Fixed, by rename as editors do, with a new key in it: recovery is visible.
        clear_path(path)
        fresh = KeySpec("fresh-" + which)
        gw.keys[fresh.name] = fresh
        tmp = path.with_name(path.name + ".new")
        tmp.write_text(keys_yaml(gw.keys) if which == "keys_file" else good_text + "\n# fixed\n")
        tmp.replace(path)
    mark = len(gw.lines)
    gw.wait_for(r"reloaded configuration", timeout=5, after=mark)
    if which == "keys_file":
        r = httpx.post(gw.url + "/api/chat", headers=fresh.auth, json={**CHAT, "stream": False},
                       timeout=10)
        sent += 1
        assert r.status_code == 200
    serve_ok()
    # The log stayed where it was, and holds every request exactly once.
    assert eventually(lambda: len(t.read()) - t.mark_line >= sent)
    time.sleep(0.2)
    lines = t.read()[t.mark_line:]
    assert len(lines) == sent and len({x["id"] for x in lines}) == sent
    assert not (gw.dir.parent / "logs").exists()  # the defaults' ../logs/ was never used


@pytest.mark.parametrize("how", ["symlink-loop", "fifo", "directory"])
def test_start_with_unreadable_config_fails_closed(fake, tmp_path, how):
    gw = Gateway(tmp_path, fake.url, keys=KEYS)
    break_file(gw.keys_file, how)
    gw.start(wait=False)
    try:
        rc = gw.proc.wait(timeout=20)
    finally:
        gw.stop()
    assert rc != 0
    # (mitmproxy prints a traceback with any configuration error raised at start-up)
    wanted = {"symlink-loop": "Symlink loop", "fifo": "not a regular file",
              "directory": "Is a directory"}[how]
    assert any("keys.yaml" in x and wanted in x and "OptionsError" in x for x in gw.lines), (
        gw.output)


@pytest.mark.parametrize("how", ["file", "symlink-loop"])
def test_usage_log_folder_unusable(fake, make_gateway, how):
    """The log's folder replaced by a file (or a symlink loop): keygate keeps serving,
    says so, holds the lines in memory and writes them, in order, once it can."""
    gw = make_gateway(fake.url, keys=KEYS).start()
    ids = [post_chat(gw).headers["x-keygate-request-id"]]
    assert eventually(lambda: gw.usage_log.exists() and len(gw.usage()) == 1)
    folder = gw.usage_log.parent
    moved = gw.dir / "old-logs"
    folder.rename(moved)
    if how == "file":
        folder.write_text("not a folder")
    else:
        os.symlink(folder.name, folder)
    mark = len(gw.lines)
    for _ in range(5):
        r = post_chat(gw)
        assert r.status_code == 200
        ids.append(r.headers["x-keygate-request-id"])
    gw.wait_for(r"cannot write usage log", timeout=5, after=mark)
    folder.unlink()
    gw.wait_for(r"writable again: wrote 5 held records", timeout=10, after=mark)
    assert [x["id"] for x in gw.usage()] == ids[1:]
    old = [json.loads(x) for x in (moved / "usage.jsonl").read_text().splitlines()]
    assert [x["id"] for x in old] == ids[:1]


# -- 5. load with faults --------------------------------------------------------------------

async def _load(gw, fake, seconds: float, clients: int, stats: dict) -> None:
    """`clients` concurrent clients for `seconds`, each looping over a mix of requests."""
    keys = gw.keys
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        deadline = time.monotonic() + seconds

        async def one(rng: random.Random) -> None:
            kind = rng.random()
            h = AUTH
            if kind < 0.35:
                method, path, body, stream = "POST", "/api/chat", CHAT, True
            elif kind < 0.55:
                method, path, stream = "POST", "/v1/chat/completions", True
                body = {**CHAT, "stream": True}
            elif kind < 0.65:
                method, path, body, stream = "POST", "/api/generate", {
                    "model": "llama3.2", "prompt": "x", "stream": False}, False
            elif kind < 0.72:
                method, path, body, stream = "POST", "/api/chat", CHAT, False
                h = {"Authorization": "Bearer sk-not-a-key"} if rng.random() < 0.5 else {}
            elif kind < 0.78:
                method, path, body, stream = rng.choice([
                    ("POST", "/api/pull", {"model": "x"}, False),
                    ("POST", "//api/chat", CHAT, False), ("GET", "/api/me", None, False),
                    ("POST", "/api/chat", {"model": 5}, False)])
            elif kind < 0.86:
                method, path, body, stream = "POST", "/api/chat", CHAT, True
                h = keys["limited"].auth
            elif kind < 0.9:
                method, path, body, stream = "GET", "/api/tags", None, False
                h = keys["reader"].auth
            else:
                # leaves after the first chunk: 499 or completed false, but forwarded
                method, path, body, stream = "POST", "/api/chat", CHAT, "leave"
            stats["sent"] += 1
            try:
                async with c.stream(method, gw.url + path, headers=h, json=body) as r:
                    if stream == "leave":
                        async for _ in r.aiter_raw():
                            break
                    else:
                        await r.aread()
                    stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                    rid = r.headers.get("x-keygate-request-id")
                    if rid:
                        stats["ids"].add(rid)
                    else:
                        stats["no_id"] += 1
            except httpx.HTTPError as e:
                stats["errors"][type(e).__name__] = stats["errors"].get(type(e).__name__, 0) + 1

        async def client(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < deadline:
                await one(rng)

        await asyncio.gather(*(client(i) for i in range(clients)))


def run_load(gw, fake, seconds: float, clients: int = 100, flap: bool = True) -> dict:
    stats = {"sent": 0, "status": {}, "ids": set(), "no_id": 0, "errors": {}}
    stop = threading.Event()

    def flapper():
        rng = random.Random(7)
        while not stop.is_set():
            fake.fail = rng.choices([None, "500", "reset", "cut"], [70, 12, 12, 6])[0]
            stop.wait(rng.uniform(0.1, 0.4))
        fake.fail = None

    th = threading.Thread(target=flapper, daemon=True)
    if flap:
        th.start()
    try:
        asyncio.run(_load(gw, fake, seconds, clients, stats))
    finally:
        stop.set()
        if flap:
            th.join(5)
        fake.fail = None
    return stats


def account(gw, fake, t: Tracker, stats: dict) -> list[dict]:
    """Every request sent has exactly one line; every forwarded line one upstream request."""
    assert eventually(lambda: len(t.read()) - t.mark_line >= stats["sent"], timeout=20), (
        len(t.read()) - t.mark_line, stats["sent"])
    time.sleep(0.5)
    lines = t.read()[t.mark_line:]
    assert len(lines) == stats["sent"], (len(lines), stats)
    ids = [x["id"] for x in lines]
    assert len(set(ids)) == len(ids)
    assert stats["ids"] <= set(ids)
    forwarded = [x for x in lines if x["key"] is not None and x["error"] not in REFUSED]
    upstream = t.upstream_since_mark()
    assert len(upstream) == len(forwarded), (len(upstream), len(forwarded))
    return lines


def test_load_with_faults_short(fake, make_gateway):
    """~100 concurrent clients for 20 s: streams (some left midway), refused keys, bad paths,
    a key with concurrent: 3, while the upstream flaps between healthy, 500, reset and cut."""
    fake.chunk_delay = 0.01
    try:
        gw = make_gateway(fake.url, keys=dict(KEYS)).start()
        t = Tracker(gw, [fake])
        rss0 = rss_mb(gw.proc.pid)
        stats = run_load(gw, fake, seconds=20, clients=100)
        rss1 = rss_mb(gw.proc.pid)
    finally:
        fake.chunk_delay = 0.0
    lines = account(gw, fake, t, stats)
    by = {}
    for x in lines:
        by[(x["status"], x["error"])] = by.get((x["status"], x["error"]), 0) + 1
    print(f"sent {stats['sent']}, statuses {stats['status']}, client errors {stats['errors']}")
    print(f"lines by (status, error): {sorted(by.items(), key=lambda kv: -kv[1])[:12]}")
    print(f"mitmdump RSS {rss0:.0f} MB -> {rss1:.0f} MB")
    assert stats["sent"] > 300  # ~1000 on 2 cores shared with the load generator
    assert by.get((502, "upstream_error"), 0) > 0 and by.get((500, None), 0) > 0
    assert by.get((429, "rate_limit_exceeded"), 0) > 0
    assert any(not x["completed"] and x["stream"] for x in lines)
    # Nothing leaked: the limited key has no request in flight left over.
    for _ in range(4):
        r = httpx.post(gw.url + "/api/chat", headers=gw.keys["limited"].auth,
                       json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 200, r.text
    assert gw.proc.poll() is None


@pytest.mark.slow
def test_load_with_faults_15_minutes(fake, make_gateway):
    """The long version: 15 minutes. mitmdump's memory stays roughly flat after warm-up,
    and every request is accounted for."""
    fake.chunk_delay = 0.01
    try:
        gw = make_gateway(fake.url, keys=dict(KEYS)).start()
        t = Tracker(gw, [fake])
        warm = run_load(gw, fake, seconds=60, clients=100)
        account(gw, fake, t, warm)
        t.mark()
        rss_warm = rss_mb(gw.proc.pid)
        samples = []
        total = {"sent": 0, "status": {}, "ids": set(), "no_id": 0, "errors": {}}
        for _ in range(14):
            s = run_load(gw, fake, seconds=60, clients=100)
            total["sent"] += s["sent"]
            total["ids"] |= s["ids"]
            samples.append(rss_mb(gw.proc.pid))
        rss_end = rss_mb(gw.proc.pid)
    finally:
        fake.chunk_delay = 0.0
    print(f"RSS after warm-up {rss_warm:.0f} MB, per minute {[round(x) for x in samples]}, "
          f"end {rss_end:.0f} MB; {total['sent']} requests")
    account(gw, fake, t, total)
    assert rss_end - rss_warm < max(64, 0.5 * rss_warm), (rss_warm, samples)
    assert gw.proc.poll() is None
