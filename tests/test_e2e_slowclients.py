"""End to end, slow clients: a real mitmdump running keygate with client_header_timeout_s and
client_body_timeout_s of 1 s, in front of the fake Ollama, fed over raw sockets.

A client that dribbles its request head or body loses its connection within a few seconds
(one tick of keygate's timer after the deadline), while other clients are served; a client
that is slow but keeps within the deadlines is not touched.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import ssl
import threading
import time
import urllib.request

import h2.config
import h2.connection
import h2.events
import pytest

from conftest import Gateway, KeySpec

USER = KeySpec("user")
ADMIN = KeySpec("admin", settings={"scopes": ["inference", "models", "admin"]})
KEYS = {"user": USER, "admin": ADMIN}

HEAD_S = BODY_S = 1.0
CLOSED_BY = 3.0  # a deadline, plus a tick of the timer, plus slack for a busy machine

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                   "stream": False}).encode()


@pytest.fixture(scope="module")
def gw(fake, tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("slow"), fake.url, keys=KEYS,
                gateway_toml=f"client_header_timeout_s = {HEAD_S}\n"
                             f"client_body_timeout_s = {BODY_S}\n").start()
    try:
        yield g
    finally:
        g.stop()


def head(method: str, path: str, secret: str | None, length: int | None = None,
         extra: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: keygate.test"]
    if secret:
        lines.append(f"Authorization: Bearer {secret}")
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return "\r\n".join(lines).encode() + b"\r\n" + extra + b"\r\n"


class Wire:
    """One raw connection: send pieces with pauses, notice when the gateway closes it."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.started = time.monotonic()
        self.closed_at: float | None = None
        self.got = bytearray()

    def poll(self, wait: float) -> bool:
        """Read what is there for up to `wait` s; True once the peer has closed."""
        end = time.monotonic() + wait
        while self.closed_at is None:
            left = end - time.monotonic()
            if left <= 0:
                break
            if not select.select([self.sock], [], [], left)[0]:
                continue
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_at = time.monotonic()
            self.got += chunk
        return self.closed_at is not None

    def dribble(self, data: bytes, every: float, piece: int = 1, limit: float = 15.0) -> None:
        """Send `data` `piece` bytes at a time, `every` s apart, until done or closed."""
        for i in range(0, len(data), piece):
            if self.poll(every) or time.monotonic() - self.started > limit:
                return
            try:
                self.sock.sendall(data[i:i + piece])
            except OSError:
                self.poll(1.0)
                self.closed_at = self.closed_at or time.monotonic()
                return

    def wait(self, done, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not done() and self.closed_at is None and time.monotonic() < end:
            self.poll(0.05)
        return done()

    def response(self, timeout: float = 5.0) -> tuple[int, dict, bytes]:
        """Read one whole Content-Length response off the connection."""
        assert self.wait(lambda: b"\r\n\r\n" in self.got, timeout), (
            f"no response head (closed: {self.closed_at is not None}): {bytes(self.got)!r}")
        h = bytes(self.got).partition(b"\r\n\r\n")[0]
        lines = h.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (x.partition(":") for x in lines[1:])}
        start, n = len(h) + 4, int(headers.get("content-length", 0))
        assert self.wait(lambda: len(self.got) >= start + n, timeout), bytes(self.got)
        body = bytes(self.got[start:start + n])
        del self.got[:start + n]
        return int(lines[0].split()[1]), headers, body

    def close(self) -> None:
        self.sock.close()


def served(gw: Gateway) -> int:
    req = urllib.request.Request(gw.url + "/api/version", headers=USER.auth)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def closed_line(gw: Gateway, what: str, after: int) -> str:
    return gw.wait_for(rf"keygate: closed connection from 127\.0\.0\.1: {what} not complete "
                       rf"within 1 s", timeout=CLOSED_BY, after=after)


# -- (a) a head sent a byte at a time -----------------------------------------------------

def test_head_dribbled_byte_by_byte_is_cut_while_others_are_served(gw):
    n, mark = gw.settled_count(), len(gw.lines)
    wire = Wire(gw.port)
    t = threading.Thread(target=wire.dribble,
                         args=(head("GET", "/api/version", USER.secret), 0.2))
    t.start()
    try:
        statuses = []
        while t.is_alive() and len(statuses) < 50:
            statuses.append(served(gw))  # meanwhile, a normal client is served
            time.sleep(0.05)
        t.join(CLOSED_BY + 15)
        took = wire.closed_at - wire.started
        assert HEAD_S * 0.9 <= took <= CLOSED_BY, took
        assert statuses and set(statuses) == {200}
        assert wire.got == b""  # no answer: no request was ever formed
    finally:
        wire.close()
    closed_line(gw, "request head", mark)
    # A head that never completed is no request: only the normal client's lines.
    assert gw.settled_count() == n + len(statuses)
    assert all(x["path"] == "/api/version" and x["status"] == 200 for x in gw.usage()[n:])


def test_cut_head_is_not_logged_with_the_key_in_it(gw):
    mark = len(gw.lines)
    wire = Wire(gw.port)
    try:
        wire.sock.sendall(head("POST", "/api/chat", USER.secret, len(CHAT))[:-2])
        wire.dribble(b"X-Slow: " + b"a" * 100, 0.2)
        assert wire.closed_at is not None
        assert wire.closed_at - wire.started <= CLOSED_BY
    finally:
        wire.close()
    closed_line(gw, "request head", mark)
    gw.wait_for(r"closed the connection before completing its request head "
                r"\(\d+ bytes, not shown\)", timeout=5, after=mark)
    assert USER.secret not in "".join(gw.lines[mark:])


# -- (b) a body sent a byte at a time -----------------------------------------------------

def test_body_dribbled_byte_by_byte_is_cut_and_logged_as_408(gw, fake):
    n, mark = gw.settled_count(), len(gw.lines)
    upstream_before = len(fake.requests)
    wire = Wire(gw.port)
    try:
        wire.sock.sendall(head("POST", "/api/chat", USER.secret, 1000))
        wire.dribble(b"x" * 1000, 0.2)
        assert wire.closed_at is not None
        assert BODY_S * 0.9 <= wire.closed_at - wire.started <= CLOSED_BY
        assert wire.got == b""
    finally:
        wire.close()
    closed_line(gw, "request body", mark)
    rec = gw.usage_after(n)
    assert (rec["status"], rec["error"], rec["key"]) == (408, "request_timeout", "user"), rec
    assert (rec["method"], rec["path"], rec["completed"]) == ("POST", "/api/chat", False)
    assert gw.settled_count() == n + 1
    assert len(fake.requests) == upstream_before  # nothing was forwarded
    assert served(gw) == 200


def test_body_of_a_refused_request_is_cut_too(gw):
    # No key: refused at headers time, but the answer waits for the body (README).
    n = gw.settled_count()
    wire = Wire(gw.port)
    try:
        wire.sock.sendall(head("POST", "/api/chat", None, 1000) + b"{")
        assert wire.poll(CLOSED_BY)
    finally:
        wire.close()
    rec = gw.usage_after(n)
    assert (rec["status"], rec["error"], rec["key"]) == (408, "request_timeout", None), rec


# -- (c) an idle keep-alive connection ----------------------------------------------------

def test_idle_keep_alive_connection_is_closed_after_the_head_timeout(gw):
    mark = len(gw.lines)
    wire = Wire(gw.port)
    try:
        wire.sock.sendall(head("GET", "/api/version", USER.secret))
        status, headers, _ = wire.response()
        assert status == 200 and "close" not in headers.get("connection", "")
        answered = time.monotonic()
        assert wire.poll(CLOSED_BY + 2)
        idle = wire.closed_at - answered
        assert HEAD_S * 0.8 <= idle <= CLOSED_BY, idle
        assert wire.got == b""
    finally:
        wire.close()
    closed_line(gw, "request head", mark)


# -- (d) slow but steady -------------------------------------------------------------------

def test_slow_but_steady_client_is_unaffected(gw):
    # The head deadline runs from the end of the previous request: idle time and head
    # together stay under client_header_timeout_s (~0.4 s of 1 s); each body takes ~0.6 s
    # of client_body_timeout_s's 1 s. Altogether the connection lives well past either.
    n = gw.settled_count()
    wire = Wire(gw.port)
    try:
        for _ in range(4):  # four requests on one connection
            h = head("POST", "/api/chat", USER.secret, len(CHAT))
            wire.dribble(h, 0.1, piece=len(h) // 3 + 1)  # the head in 3 pieces
            wire.dribble(CHAT, 0.15, piece=len(CHAT) // 4 + 1)  # the body in 4 pieces
            status, _, body = wire.response()
            assert status == 200 and json.loads(body)["done"] is True
            assert not wire.poll(0.1)  # idle a moment before the next request
        assert wire.closed_at is None
        assert time.monotonic() - wire.started > 3 * HEAD_S
    finally:
        wire.close()
    lines = [gw.usage_after(n + i) for i in range(4)]
    assert [(x["status"], x["error"], x["key"]) for x in lines] == [(200, None, "user")] * 4


def test_streamed_blob_upload_is_exempt_from_the_body_deadline(gw):
    blob = b"blob-" * 40
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    n = gw.settled_count()
    wire = Wire(gw.port)
    try:
        wire.sock.sendall(head("POST", f"/api/blobs/{digest}", ADMIN.secret, len(blob)))
        wire.dribble(blob, 0.25, piece=len(blob) // 10)  # ~2.5 s: past client_body_timeout_s
        status, _, _ = wire.response()
        assert status == 201
    finally:
        wire.close()
    rec = gw.usage_after(n)
    assert (rec["status"], rec["error"], rec["key"]) == (201, None, "admin")


# -- HTTP/2: deadlines per stream, the head deadline only while no stream is in flight -----

class H2:
    def __init__(self, port: int) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="keygate.test")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()
        self.status: dict[int, int] = {}
        self.ended: set[int] = set()
        self.closed_at: float | None = None

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def send(self, method: str, path: str, secret: str, body: bytes | None,
             length: int | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "https"),
                (":authority", "keygate.test"), ("authorization", f"Bearer {secret}")]
        if length is not None:
            hdrs.append(("content-length", str(length)))
        self.conn.send_headers(sid, hdrs, end_stream=body is None)
        if body:
            self.conn.send_data(sid, body, end_stream=length == len(body))
        self.flush()
        return sid

    def pump(self, wait: float) -> bool:
        """Handle what arrives for up to `wait` s; True once the gateway closed."""
        end = time.monotonic() + wait
        while self.closed_at is None and time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed_at = time.monotonic()
                break
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.closed_at = time.monotonic()
            try:
                self.flush()
            except OSError:
                self.closed_at = self.closed_at or time.monotonic()
        return self.closed_at is not None


def test_http2_late_stream_body_closes_the_connection_and_is_logged_as_408(gw):
    n = gw.settled_count()
    c = H2(gw.port)
    try:
        quick = c.send("GET", "/api/version", USER.secret, None)
        late = c.send("POST", "/api/chat", USER.secret, b"{", length=1000)
        t0 = time.monotonic()
        assert c.pump(CLOSED_BY + 2)
        assert c.status.get(quick) == 200 and quick in c.ended
        assert BODY_S * 0.9 <= c.closed_at - t0 <= CLOSED_BY
        assert late not in c.status
    finally:
        c.sock.close()
    gw.settled_count()
    lines = {x["path"]: x for x in gw.usage()[n:]}
    assert (lines["/api/chat"]["status"], lines["/api/chat"]["error"]) == (408, "request_timeout")
    assert lines["/api/version"]["status"] == 200


def test_http2_stream_in_flight_holds_off_the_head_deadline(gw, fake):
    # A streamed answer that lasts longer than client_header_timeout_s: the connection is
    # busy, not idle. Once the stream has ended, it idles out.
    fake.gate = threading.Event()
    c = H2(gw.port)
    try:
        body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                           "stream": True}).encode()
        sid = c.send("POST", "/api/chat", USER.secret, body, length=len(body))
        assert not c.pump(3 * HEAD_S)
        assert c.status.get(sid) == 200 and sid not in c.ended  # first step only, waiting
        fake.gate.set()
        ended = time.monotonic() + 5
        while sid not in c.ended and time.monotonic() < ended and not c.pump(0.05):
            pass
        assert sid in c.ended and c.closed_at is None
        t0 = time.monotonic()
        assert c.pump(CLOSED_BY + 2)
        assert HEAD_S * 0.8 <= c.closed_at - t0 <= CLOSED_BY
    finally:
        fake.gate.set()
        fake.gate = None
        c.sock.close()


# -- reloads --------------------------------------------------------------------------------

def test_reload_applies_new_timeouts_to_open_connections(fake, make_gateway):
    g = make_gateway(fake.url, keys=KEYS, gateway_toml="client_header_timeout_s = 60\n").start()
    wire = Wire(g.port)
    try:
        wire.sock.sendall(b"GET /api/ver")  # an unfinished head, well within 60 s
        assert not wire.poll(1.0)
        mark = len(g.lines)
        g.config.write_text(g.config.read_text().replace(
            "client_header_timeout_s = 60\n", "client_header_timeout_s = 1\n"))
        g.wait_for(r"keygate: reloaded configuration", timeout=5, after=mark)
        assert wire.poll(CLOSED_BY)  # already past the new deadline: closed at the next tick
        closed_line(g, "request head", mark)
    finally:
        wire.close()
