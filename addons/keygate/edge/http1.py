"""The HTTP/1 edge: what mitmproxy's HTTP/1 server layer does before any addon hook can.

mitmproxy reads a request head into a buffer until it finds the blank line, parses it,
and only then runs addon hooks. Four things happen in that stretch that keygate must
decide itself, so this module wraps four methods of mitmproxy's HTTP/1 layers, once per
process (like `redact`, outside the reloadable pipeline, so a broken reload of
gateway.py cannot undo it):

- **Head size.** mitmproxy buffers an unterminated head without limit (its own FIXME in
  `proxy/layers/http/_http1.py`): one client sending megabytes without a blank line
  grows the process by gigabytes. A head over `[gateway] max_header_kb` gets
  `431 headers_too_large` in keygate's shape and the connection is closed. The check
  scans each received byte once (the same incremental search h11's buffer makes).
- **Header lines a lenient parser reads differently.** mitmproxy joins a line folded
  onto the previous one (obs-fold, RFC 9112 5.2) into that header's value and forwards
  it with its CR LF; an upstream that reads the fold as a new line sees a header keygate
  never checked. A head with a folded line, or with a control character in a header line
  (a bare CR, NUL, ...), gets `400 invalid_request` and the connection is closed.
- **mitmproxy's own error page.** Where mitmproxy answers by itself (a head it cannot
  parse, a body over `body_size_limit`, an upstream answer it refuses, an upstream failure
  keygate/edge/upstream.py cannot answer), it sends an HTML page with `Server: mitmproxy
  <version>` that can echo the offending header line, key included, or name an internal
  address. keygate sends its JSON error instead, with `x-keygate-error`, the flow's
  `x-keygate-request-id` where there is a flow, and a message of its own (on HTTP/2:
  keygate/edge/http2.py).
- **Bodies of refused requests.** A request refused at headers time (no key, a wrong
  scope) has its body read before the answer goes out, so the connection stays usable.
  mitmproxy would buffer that body whole; here it is discarded as it arrives.
- **Bytes sent ahead.** While a request waits for its answer, mitmproxy buffers whatever
  the client sends next; past one head and one body (max_header_kb + max_body_mb) the
  connection is closed.

Every answer made here says `Connection: close` and the connection is closed after it.
The wrapped methods are mitmproxy 11.0's (`install` checks the version it wraps).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

from mitmproxy import version as mitmproxy_version
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import RequestData, ResponseProtocolError

from keygate.model.errors import CODES, error_body
from keygate.request import ATTRIBUTE

log = logging.getLogger("keygate")

DEFAULT_MAX_HEAD = 64 * 1024
DEFAULT_MAX_BODY = 32 * 1024 * 1024

# Where the head ends: the blank line, as h11's buffer finds it (LF LF or LF CR LF).
_HEAD_END = re.compile(rb"\n\r?\n")
# What no header line may hold: a line that starts with SP or HTAB (a fold: the LF before
# it), controls other than HTAB, and DEL (RFC 9110 5.5); CR only right before LF (else a
# bare CR).
_LINE_PROBLEM = re.compile(rb"\n[ \t]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
_NOT_SPACE = re.compile(rb"\S")
_REQUEST_LINE = re.compile(rb"([A-Za-z]{1,20}) (\S{1,8192}) HTTP/\d\.\d\r?$")

# status -> keygate's code for the answers mitmproxy would otherwise make itself
_CODE_OF_STATUS = {400: "invalid_request", 413: "request_too_large", 431: "headers_too_large",
                   502: "upstream_error", 503: "gateway_unavailable", 504: "upstream_timeout"}
_REASONS = {431: "Request Header Fields Too Large"}  # (not in mitmproxy's table)
# What the client is told instead of mitmproxy's message (which may hold request bytes or
# an internal address).
_MESSAGES = {
    400: "The request could not be read as HTTP.",
    413: "Request body is larger than this gateway accepts.",
    431: "Request head is larger than this gateway accepts.",
    502: "The upstream could not be reached or broke off.",
    503: "The gateway is unavailable.",
    504: "The upstream did not answer in time.",
}


class _Settings:
    """What the wrapped layers read: set by `install`, read on every head."""

    max_head: Callable[[], int] = staticmethod(lambda: DEFAULT_MAX_HEAD)
    max_body: Callable[[], int] = staticmethod(lambda: DEFAULT_MAX_BODY)
    new_request_id: Callable[[], str] | None = None
    # Told of every head refused here, which no flow (and so no addon) ever sees:
    # (request id, status, code, method, path, client address), for the usage log.
    report: Callable[[str, int, str, str, str, str], None] | None = None


settings = _Settings()


def head_problem(data: bytes | bytearray, start: int, limit: int) -> tuple[int, str] | None:
    """What is wrong with the request head at the front of `data`, or None.

    `start` is where the search for the blank line may begin (bytes before it were
    searched already). Returns (431, why) when the head, complete or not, is over `limit`
    bytes; (400, why) for a folded or control-laden header line; None while the head is
    incomplete and within the limit, or complete and clean.
    """
    if data[:1] == b"\n" or data[:2] == b"\r\n":
        # Blank lines before a request (RFC 9112 lets a server skip them): h11 drops one
        # per received chunk and parses nothing else, so they count against the limit as
        # they pile up, or a stream of CR LF would grow the buffer without end.
        return (431, f"request head over {limit} bytes") if len(data) > limit else None
    m = _HEAD_END.search(data, max(0, start))
    if m is None:
        if len(data) > limit:
            return 431, f"request head over {limit} bytes"
        return None
    end = m.end()
    if end > limit:
        return 431, f"request head of {end} bytes, over {limit}"
    # The header lines, from the end of the request line to the last line's LF: one search
    # (a head of 16,000 tiny lines costs a Python loop 4 ms, this under 1).
    bad = _LINE_PROBLEM.search(data, data.find(b"\n"), m.start() + 1)
    if bad is None:
        return None
    if bad.group()[:1] == b"\n":
        return 400, "a header line folded onto the previous one (obs-fold)"
    return 400, "a control character in a header line"


def _request_line(data: bytes | bytearray) -> tuple[str, str]:
    """(method, path without the query) of the request line at the front of `data`, for
    the error's shape and the usage line; ("", "") when there is no readable one."""
    nl = data.find(b"\n", 0, 8300)
    m = _REQUEST_LINE.match(bytes(data[:nl])) if nl >= 0 else None
    if m is None:
        return "", ""
    target = m.group(2).decode("utf-8", "surrogateescape")
    if "://" in target:  # absolute form
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return m.group(1).decode("ascii"), target.split("?", 1)[0]


def code_of(status: int) -> tuple[int, str]:
    """keygate's (status, code) for a status mitmproxy answers with."""
    code = _CODE_OF_STATUS.get(status)
    if code is None or code not in CODES:
        return 502, "upstream_error"
    return status, code


def error_parts(status: int, path: str = "", message: str | None = None) -> tuple[int, str, bytes]:
    """keygate's (status, code, body) in place of an answer of mitmproxy's with `status`
    to a request for `path` (its shape, docs/errors.md)."""
    status, code = code_of(status)
    return status, code, error_body(path or "/", code, message or _MESSAGES[status])


def error_response(status: int, path: str = "", message: str | None = None,
                   request_id: str | None = None, method: str = "") -> bytes:
    """A whole HTTP/1.1 answer in keygate's shape (docs/errors.md) that closes the connection.
    To a HEAD request: the same head, no body (its length still says what it would be)."""
    status, code, body = error_parts(status, path, message)
    reason = _REASONS.get(status) or status_codes.RESPONSES.get(status, "Error")
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"x-keygate-error: {code}",
    ]
    if request_id is not None:
        headers.append(f"x-keygate-request-id: {request_id}")
    headers += [f"content-length: {len(body)}", "connection: close"]
    if method == "HEAD":
        body = b""
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


# --------------------------------------------------------------------------- the wraps


def _wrap_read_headers(original):
    @functools.wraps(original)
    def read_headers(self, event):
        if isinstance(event, events.DataReceived):
            buf = self.buf
            # h11's buffer: `_data` holds the bytes, `_multiple_lines_search` where its own
            # search for the blank line resumes (so no byte is searched twice).
            problem = head_problem(buf._data, buf._multiple_lines_search, settings.max_head())
            if problem is not None:
                status, why = problem
                method, path = _request_line(buf._data)
                rid = settings.new_request_id() if settings.new_request_id else None
                yield commands.Log(f"{why}: answered {status}, connection closed",
                                   logging.WARNING)
                yield commands.SendData(self.conn, error_response(
                    status, path, why[0].upper() + why[1:] + "." if status == 400 else None,
                    rid, method))
                if settings.report is not None and rid is not None:
                    peer = self.conn.peername[0] if self.conn.peername else ""
                    try:
                        settings.report(rid, status, code_of(status)[1], method, path, peer)
                    except Exception:  # the answer is out; a lost line is the log's to say
                        log.exception("keygate: could not record a refused request head")
                yield commands.CloseConnection(self.conn)
                self.buf = type(buf)()  # let the buffered bytes go now
                self.state = self.done
                return
        elif isinstance(event, events.ConnectionClosed):
            # mitmproxy would log the unfinished head's bytes, credentials and all.
            if _NOT_SPACE.search(self.buf._data):  # (no copy of what was buffered)
                yield commands.Log("client closed the connection before completing its "
                                   f"request head ({len(self.buf)} bytes, not shown)")
            yield commands.CloseConnection(self.conn)
            return
        yield from original(self, event)

    return read_headers


def _wrap_wait(original):
    @functools.wraps(original)
    def wait(self, event):
        # While a request waits for its answer, mitmproxy keeps what the client sends next
        # (a pipelined request) in its buffer. A next request is at most a head and a body:
        # past that the connection is closed, or a client could fill memory meanwhile.
        if (isinstance(event, events.DataReceived)
                and len(self.buf) > settings.max_head() + settings.max_body()):
            yield commands.Log("more bytes sent ahead than one request holds, while the "
                               "last is answered: connection closed", logging.WARNING)
            self.buf = type(self.buf)()
            yield commands.CloseConnection(self.conn)
            return
        yield from original(self, event)

    return wait


def _wrap_send(original):
    @functools.wraps(original)
    def send(self, event):
        if (isinstance(event, ResponseProtocolError) and not self.response
                and event.code != status_codes.NO_RESPONSE):
            # mitmproxy's own answer to a request it could not complete: keygate's instead.
            if not (self.conn.state & ConnectionState.CAN_WRITE):
                return
            path = self.request.path if self.request is not None else ""
            method = self.request.method if self.request is not None else ""
            rid = request_id_of(flow_of(self, event.stream_id))
            yield commands.SendData(self.conn, error_response(
                event.code, path, method=method, request_id=rid))
            yield commands.CloseConnection(self.conn)
            return
        yield from original(self, event)

    return send


def http_layer(layer) -> http_layers.HttpLayer | None:
    """The HTTP layer above a connection's layer (or a stream), the one that holds its
    streams; None when there is none."""
    for above in reversed(layer.context.layers):
        if isinstance(above, http_layers.HttpLayer):
            return above
    return None


def flow_of(server, stream_id: int):
    """The flow on `stream_id` of a client connection's HTTP server layer, or None: the
    HTTP layer above the connection holds the stream, and the stream the flow."""
    layer = http_layer(server)
    return None if layer is None else getattr(layer.streams.get(stream_id), "flow", None)


def request_id_of(flow) -> str | None:
    """The flow's request id, when its addons gave it one."""
    st = getattr(flow, ATTRIBUTE, None)
    return st.id if st is not None else None


def _wrap_consume_body(original):
    @functools.wraps(original)
    def consume(self, event):
        if isinstance(event, RequestData) and self.flow.response is not None:
            return  # refused at headers time: the body is read and let go, never kept
        yield from original(self, event)

    return consume


def _replacement_error_response(status_code: int, message: str = "") -> bytes:
    """For mitmproxy's `make_error_response` (the 400 for a head it cannot parse): the
    message it passes may quote the request's bytes, so it is not used."""
    return error_response(status_code)


_installed = False


def install(max_head: Callable[[], int] | None = None,
            max_body: Callable[[], int] | None = None,
            new_request_id: Callable[[], str] | None = None,
            report: Callable[[str, int, str, str, str, str], None] | None = None) -> None:
    """Wrap mitmproxy's HTTP/1 layers (once per process); a later call only updates the
    settings, so a reload of gateway.py points them at its new configuration."""
    global _installed
    if max_head is not None:
        settings.max_head = max_head
    if max_body is not None:
        settings.max_body = max_body
    if new_request_id is not None:
        settings.new_request_id = new_request_id
    if report is not None:
        settings.report = report
    if _installed:
        return
    if not mitmproxy_version.VERSION.startswith("11.0."):
        log.warning("keygate: the HTTP/1 edge was written for mitmproxy 11.0, not %s",
                    mitmproxy_version.VERSION)
    server = _http1.Http1Server
    server.read_headers = _wrap_read_headers(server.read_headers)
    server.send = _wrap_send(server.send)
    server.wait = _wrap_wait(server.wait)
    stream = http_layers.HttpStream
    stream.state_consume_request_body = _wrap_consume_body(stream.state_consume_request_body)
    _http1.make_error_response = _replacement_error_response
    from keygate.edge import http2  # (it builds on this module)

    http2.install()  # the same answers in place of mitmproxy's on HTTP/2
    _installed = True
