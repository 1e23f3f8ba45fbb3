"""keygate's answers in place of mitmproxy's own error page on HTTP/2.

Where mitmproxy ends a request by itself (a body over `body_size_limit`, an upstream
answer it refuses as malformed or too large, an upstream failure keygate/edge/upstream.py
cannot answer), its HTTP/2 server layer sends an HTML page with `server: mitmproxy
<version>` and mitmproxy's message, which can name an internal address. Here the same
answer goes out in keygate's shape (docs/errors.md): JSON, `x-keygate-error`, the request
id where the flow has one, no `server`. It is the HTTP/2 side of what keygate/edge/http1.py
does for HTTP/1, with the same statuses, codes and messages.

One method of mitmproxy 11.0's `Http2Server` is wrapped, once per process; it is called
for every event of an HTTP/2 client connection, so every event but that error goes on to
mitmproxy's own method at the cost of one type check.
"""

from __future__ import annotations

import functools
import logging

from mitmproxy import version as mitmproxy_version
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy.layers.http._events import ResponseProtocolError

from keygate.edge import http1

log = logging.getLogger("keygate")


def _answer(server: _http2.Http2Server, event: ResponseProtocolError):
    """keygate's error answer on the event's stream (see mitmproxy's
    `Http2Connection._handle_event`, whose conditions it keeps)."""
    flow = http1.flow_of(server, event.stream_id)
    path = flow.request.path if flow is not None else ""
    method = flow.request.method if flow is not None else ""
    rid = http1.request_id_of(flow)
    status, code, body = http1.error_parts(event.code, path)
    headers = [(b":status", b"%d" % status), (b"content-type", b"application/json"),
               (b"x-keygate-error", code.encode())]
    if rid is not None:
        headers.append((b"x-keygate-request-id", rid.encode()))
    headers.append((b"content-length", b"%d" % len(body)))
    if method == "HEAD":
        server.h2_conn.send_headers(event.stream_id, headers, end_stream=True)
    else:
        server.h2_conn.send_headers(event.stream_id, headers)
        server.h2_conn.send_data(event.stream_id, body, end_stream=True)
    data = server.h2_conn.data_to_send()
    if data:
        yield commands.SendData(server.conn, data)


def _wrap_handle_event(original):
    @functools.wraps(original)
    def _handle_event(self, event):
        if (type(event) is ResponseProtocolError and event.code != status_codes.NO_RESPONSE
                and not self.is_closed(event.stream_id)
                and self.is_open_for_us(event.stream_id)
                and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent):
            return _answer(self, event)
        return original(self, event)  # (its generator as it is: no frame of ours on it)

    return _handle_event


_installed = False


def install() -> None:
    """Wrap mitmproxy's HTTP/2 server layer, once per process."""
    global _installed
    if _installed:
        return
    if not mitmproxy_version.VERSION.startswith("11.0."):
        log.warning("keygate: the HTTP/2 edge was written for mitmproxy 11.0, not %s",
                    mitmproxy_version.VERSION)
    server = _http2.Http2Server
    server._handle_event = _wrap_handle_event(server._handle_event)
    _installed = True
