"""Tools for the hostile-input and fault end-to-end tests (test_e2e_hostile.py,
test_e2e_faults.py): clients that put bytes on the wire exactly as given (HTTP/1.1 over a
plain socket, HTTP/2 over TLS with the h2 library), a reader that follows the usage log,
and the invariants every exchange with keygate must keep, stated here independently of
keygate's own code.
"""

from __future__ import annotations

import fnmatch
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions

# -- what a key without the admin scope may make keygate forward (docs/endpoints.md) -------------

INFERENCE_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
                   "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                   "/v1/responses", "/v1/messages")
MODELS_ENDPOINTS = {("GET", "/api/tags"), ("HEAD", "/api/tags"), ("GET", "/api/ps"),
                    ("GET", "/api/version"), ("HEAD", "/api/version"), ("POST", "/api/show"),
                    ("GET", "/v1/models")}
ADMIN_ENDPOINTS = {("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                   ("POST", "/api/copy"), ("DELETE", "/api/delete")}
DIGEST = "sha256:" + "a" * 64
FORWARDABLE = {("POST", p) for p in INFERENCE_PATHS} | MODELS_ENDPOINTS
# The table as a client sees it, for a key with scopes [inference, models].
TABLE = FORWARDABLE | ADMIN_ENDPOINTS | {("GET", "/"), ("HEAD", "/"),
                                         ("HEAD", "/api/blobs/" + DIGEST),
                                         ("POST", "/api/blobs/" + DIGEST)}

STATUS_OF = {
    "invalid_request": 400, "invalid_api_key": 401, "permission_denied": 403,
    "unknown_endpoint": 404, "model_not_found": 404, "request_too_large": 413,
    "headers_too_large": 431, "rate_limit_exceeded": 429, "insufficient_quota": 429,
    "upstream_error": 502, "gateway_unavailable": 503,
}
# Fields keygate reads or cleans (docs/endpoints.md, docs/usage-log.md); Ollama's Go decoder folds
# case on them.
INSPECTED = ("model", "name", "stream", "stream_options", "keep_alive", "_debug_render_only")


def model_allowed(name: object, patterns: tuple[str, ...]) -> bool:
    """docs/configuration.md: glob patterns over requested names; a name without a tag is
    name:latest;
    cloud names are never allowed here (no channel serves them in these tests)."""
    if not isinstance(name, str) or not name:
        return False
    if name.lower().endswith(":cloud") or name.lower().endswith("-cloud"):
        return False
    # Without regard to case, as Ollama resolves names (docs/configuration.md).
    name = name.lower()
    tagged = name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
    return any(fnmatch.fnmatchcase(name, p.lower()) or fnmatch.fnmatchcase(tagged, p.lower())
               for p in patterns)


def go_would_read_as(key: str, name: str) -> bool:
    """Whether Go's encoding/json could take JSON field `key` for struct field `name`: it
    matches case-insensitively rune by rune with Unicode folding (a dotless i, a long s or
    the Kelvin sign stand for i, s and k), so any non-ASCII rune is counted as a match."""
    return key != name and len(key) == len(name) and all(
        a.lower() == b or not a.isascii() for a, b in zip(key, name))


_GO_DURATION = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+")
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_GO_SECONDS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "\u00b5s": Decimal("1e-6"),
               "\u03bcs": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": Decimal(1),
               "m": Decimal(60), "h": Decimal(3600)}


def disruptive_keep_alive(v: object, max_seconds: int = 3600) -> bool:
    """A keep_alive a key without admin may not send: one that does not come to between
    1 s and max_keep_alive_s as Ollama reads it (numbers: whole seconds, truncated;
    strings: Go durations), or one Ollama would not read at all. Written apart from
    keygate's own reader, as a second opinion."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return True
    if isinstance(v, str):
        if v in ("0", "+0", "-0"):
            return True
        if not _GO_DURATION.fullmatch(v):
            return True
        seconds = sum(Decimal(n) * _GO_SECONDS[u] for n, u in _GO_PART.findall(v))
        if v.startswith("-"):
            return True
    else:
        if v != v or v < 0:
            return True
        seconds = Decimal(int(v)) if v != float("inf") else Decimal("Infinity")
    return not (1 <= seconds <= max_seconds)


def check_upstream_request(req, secrets: list[str], models: tuple[str, ...]) -> None:
    """What the upstream received must be something this (non-admin, model-restricted)
    key may do, in origin form, without any client credential."""
    assert req.path.startswith("/"), f"not origin-form upstream: {req.path!r}"
    path = req.path.split("?", 1)[0]
    if req.method == "GET" and path.startswith("/v1/models/"):
        segment = path[len("/v1/models/"):]
        assert segment and "/" not in segment and segment not in (".", ".."), req.path
        assert model_allowed(unquote(segment), models), f"model {segment!r} reached upstream"
    else:
        assert (req.method, path) in FORWARDABLE, f"{req.method} {req.path!r} reached upstream"
    for name in ("authorization", "x-api-key", "proxy-authorization", "api-key", "origin"):
        assert req.header(name) is None, f"{name} reached upstream"
    blob = repr(req.headers) + req.path + req.body.decode("utf-8", "replace")
    for s in secrets:
        assert s not in blob, "a client key reached upstream"
    doc = req.json
    if isinstance(doc, dict):
        for k in ("model", "name"):
            if k in doc and (k == "model" or "model" not in doc):
                assert model_allowed(doc[k], models), f"{k}={doc[k]!r} reached upstream"
        for k in doc:
            for name in INSPECTED:
                assert not go_would_read_as(k, name), f"field {k!r} (Go: {name}) went upstream"
        assert "_debug_render_only" not in doc
        if "keep_alive" in doc:
            assert not disruptive_keep_alive(doc["keep_alive"]), doc["keep_alive"]


def error_shape_ok(path: str, method: str, code: str, body: bytes) -> None:
    """docs/errors.md: the body for `code` on the path keygate saw (query removed)."""
    if method.upper() == "HEAD":
        assert body == b""
        return
    doc = json.loads(body)
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        assert doc["type"] == "error" and isinstance(doc["error"]["message"], str)
        assert isinstance(doc["error"]["type"], str)
    elif path.startswith("/v1/"):
        assert doc["error"]["code"] == code and isinstance(doc["error"]["message"], str)
    else:
        assert isinstance(doc["error"], str) and doc["error"]


# -- replies -----------------------------------------------------------------------------

@dataclass
class Reply:
    status: int | None  # None: no HTTP answer at all (closed, reset or timed out)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    local_port: int = 0
    timed_out: bool = False
    complete: bool = True  # the body arrived whole (its length or final chunk)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def request_id(self) -> str | None:
        return self.header("x-keygate-request-id")

    @property
    def error_code(self) -> str | None:
        return self.header("x-keygate-error")

    @property
    def from_edge(self) -> bool:
        """keygate's answer where mitmproxy's HTTP/1 layer ends a request before any
        addon could (a head it cannot parse, a body over body_size_limit): keygate's
        shape and code, the connection closed; a request id only where mitmproxy had
        formed a flow."""
        return (self.status is not None and self.header("connection") == "close"
                and self.error_code in ("invalid_request", "request_too_large",
                                        "upstream_error")
                and self.header("server") is None)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out, pos = bytearray(), 0
    while True:
        nl = data.find(b"\r\n", pos)
        if nl < 0:
            return bytes(out), False
        try:
            size = int(data[pos:nl].split(b";")[0].strip() or b"x", 16)
        except ValueError:
            return bytes(out), False
        if size == 0:
            return bytes(out), True
        chunk = data[nl + 2:nl + 2 + size]
        out += chunk
        if len(chunk) < size:
            return bytes(out), False
        pos = nl + 2 + size + 2


def parse_reply(data: bytes, head_only: bool = False) -> Reply:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return Reply(None, body=data)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    reply = Reply(status, headers)
    if head_only:
        return reply
    if "chunked" in (reply.header("transfer-encoding") or "").lower():
        reply.body, reply.complete = _dechunk(rest)
    elif reply.header("content-length") is not None:
        n = int(reply.header("content-length"))
        reply.body, reply.complete = rest[:n], len(rest) >= n
    else:
        reply.body = rest
    return reply


def send_raw(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False,
             head_only: bool = False) -> Reply:
    """One exchange over a fresh connection: send `data` (while already reading, so a
    refusal before the whole body is sent is seen), read until the peer closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    local_port = sock.getsockname()[1]
    got: list[bytes] = []
    flags = {"timed_out": False}

    def reader() -> None:
        try:
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return
                got.append(chunk)
        except socket.timeout:
            flags["timed_out"] = True
        except OSError:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # answered and closed before we were done sending
    t.join(timeout + 2)
    sock.close()
    reply = parse_reply(b"".join(got), head_only)
    reply.local_port, reply.timed_out = local_port, flags["timed_out"]
    return reply


def http1(method: bytes | str, target: bytes | str, headers: list[tuple] = (),
          body: bytes = b"", framing: str = "length", close: bool = True) -> bytes:
    """A request head and body, bytes as given. framing: "length" (exact Content-Length),
    "chunked", "none" (no framing header at all), or the headers say it themselves."""
    def b(x):
        return x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape")
    lines = [b(method) + b" " + b(target) + b" HTTP/1.1", b"Host: keygate.test"]
    if close:
        lines.append(b"Connection: close")
    lines += [b(k) + b": " + b(v) for k, v in headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


# -- HTTP/2 ------------------------------------------------------------------------------

def h2_request(port: int, method: str, path: str, headers: list[tuple[str, str]] = (),
               body: bytes = b"", timeout: float = 10.0, validate: bool = True) -> Reply:
    """One HTTP/2 request over TLS (ALPN h2, mitmproxy's own certificate, not verified).
    validate=False lets the h2 library send what HTTP/2 forbids (upper-case names...)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    local_port = raw.getsockname()[1]
    sock = ctx.wrap_socket(raw, server_hostname="keygate.test")
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=validate,
        normalize_outbound_headers=validate, validate_inbound_headers=False))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    hdrs = [(":method", method), (":path", path), (":scheme", "https"),
            (":authority", "keygate.test"), *headers]
    raw = [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
           for k, v in hdrs]
    conn.send_headers(sid, raw, end_stream=not body)
    if body:
        for i in range(0, len(body), 16000):
            conn.send_data(sid, body[i:i + 16000], end_stream=i + 16000 >= len(body))
    reply = Reply(None, local_port=local_port, complete=False)
    data = bytearray()
    try:
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    reply.headers = [(k.decode(), v.decode("latin-1")) for k, v in ev.headers]
                    reply.status = int(reply.header(":status"))
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    reply.complete = done = True
                elif isinstance(ev, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    done = True
            sock.sendall(conn.data_to_send())
    except socket.timeout:
        reply.timed_out = True
    except (OSError, h2.exceptions.ProtocolError):
        pass
    finally:
        sock.close()
    reply.body = bytes(data)
    return reply


# -- the usage log and the upstream, followed across one exchange -------------------------

class Tracker:
    """Follows the usage log (by byte offset) and the fakes' request lists, so each step
    of a test sees exactly the lines and upstream requests that step caused."""

    def __init__(self, gw, upstreams=()) -> None:
        self.gw = gw
        self.upstreams = list(upstreams)
        self.offset = 0
        self.lines: list[dict] = []
        self.seen_up = [len(u.requests) for u in self.upstreams]
        self.read()
        self.mark_line = len(self.lines)

    def read(self) -> list[dict]:
        path = self.gw.usage_log
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        cut = data.rfind(b"\n") + 1
        for line in data[:cut].splitlines():
            if line.strip():
                self.lines.append(json.loads(line))
        self.offset += cut
        return self.lines

    def mark(self) -> None:
        self.read()
        self.mark_line = len(self.lines)
        self.seen_up = [len(u.requests) for u in self.upstreams]

    def wait_id(self, request_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for rec in reversed(self.read()):
                if rec["id"] == request_id:
                    return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage line for {request_id}")
            time.sleep(0.01)

    def since_mark(self) -> list[dict]:
        return self.read()[self.mark_line:]

    def upstream_since_mark(self) -> list:
        out = []
        for u, n in zip(self.upstreams, self.seen_up):
            out += u.requests[n:]
        return out

    def health(self, secret: str, timeout: float = 10.0) -> dict:
        """A normal request must still work; returns its usage line. Lines are queued in
        the order requests end, so once this line is in, so is every earlier one."""
        assert self.gw.proc.poll() is None, "mitmdump died:\n" + self.gw.output[-3000:]
        r = send_raw(self.gw.port, http1("GET", "/api/version",
                                          [("Authorization", f"Bearer {secret}")]),
                     timeout=timeout)
        assert r.status == 200 and r.request_id, (r, self.gw.output[-2000:])
        rec = self.wait_id(r.request_id)
        time.sleep(0.02)  # an error hook racing the client's EOF lands well within this
        self.read()
        return rec


MITMPROXY_HEAD_REJECTS = ("Bad HTTP request line", "Invalid header line",
                          "client closed the connection before completing its request head",
                          "a header line folded onto the previous one",
                          "a control character in a header line", "request head over",
                          "request head of")


def mitmproxy_rejected_head(gw, local_port: int, timeout: float = 2.0) -> str | None:
    """The reason mitmproxy logged for refusing the request head of the connection from
    `local_port` (no flow, so no addon and no usage line), or None."""
    tag = f"127.0.0.1:{local_port}]"
    deadline = time.monotonic() + timeout
    while True:
        for line in gw.lines[-400:]:
            if tag in line:
                for reason in MITMPROXY_HEAD_REJECTS:
                    if reason in line:
                        return reason
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
