"""The upstream edge: what mitmproxy does when an upstream fails, made keygate's.

When mitmproxy cannot connect to the upstream, or the upstream resets, answers garbage or
is closed by keygate after `upstream_timeout_s`, mitmproxy's HTTP stream calls the `error`
hook and answers the client with a page of its own (HTML, `Server: mitmproxy`, the
upstream's address in it). No addon hook runs at a point where the request could still go
elsewhere. This module wraps methods of mitmproxy 11.0's `HttpStream`, once per
process (like the HTTP/1 edge, outside the reloadable pipeline):

- `make_server_connection`, which asks for an upstream connection: a failure to get one
  (refused, unreachable, DNS, TLS handshake, connect timeout) is a failure before anything
  was sent upstream;
- `handle_protocol_error`, which takes the upstream's failure after the request went out.

In both cases, while nothing has gone to the client and the request's body is held whole,
the Router is asked first (`failover`): it cools the channel down and either points the
request at another channel, which the stream then connects to and sends it to, or says
there is none. Then keygate answers: `502 upstream_error`, or `504 upstream_timeout` when
keygate gave up waiting, in the client's API shape (docs/errors.md), through the usual
`responseheaders` and `response` hooks, so the answer carries `x-keygate-request-id` and
the usage line is written from it. A healthy request never enters either path: on it,
`make_server_connection` does what mitmproxy's own does, and `send_response` (below) adds
one attribute check.

An upstream that answers 429 or 503 to a request whose body is held, before any of the
answer went out, has said it did not take the request on: the Router marks it in its
`responseheaders` hook (`resend`), and a third wrapped method, `send_response`, sends it
once to another channel in place of passing that answer on.

What cannot be answered here goes on as mitmproxy has it (and the HTTP/1 edge puts
keygate's JSON in place of mitmproxy's page): a streamed answer whose headers went out
already just ends; a streamed upload (blob) gets keygate's 502 from the HTTP/1 edge.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import status_codes
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import (
    GetHttpConnection,
    HttpResponseHeadersHook,
    HttpStream,
    SendHttp,
)
from mitmproxy.proxy.layers.http._base import HttpConnection
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestTrailers,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._http1 import Http1Client

from keygate.edge import http1
from keygate.model.errors import make_error
from keygate.request import ATTRIBUTE, state_of

log = logging.getLogger("keygate")

MESSAGES = {
    "upstream_error": "The upstream could not be reached or broke off.",
    "upstream_timeout": "The upstream did not answer in time.",
}


class _Settings:
    # (flow, why, sent) -> True when the request now points at another channel. `sent`:
    # the request may have reached the upstream (False: the connection failed). Set by
    # gateway.py to the Router's `failover`; None: no failover, keygate's answer only.
    failover: Callable[[http.HTTPFlow, str, bool], bool] | None = None


settings = _Settings()


def answerable(stream: HttpStream) -> bool:
    """Whether keygate can still answer `stream`'s request or send it elsewhere: the
    request is admitted and its body held whole, nothing of an answer went to the client,
    and the client can still be written to."""
    flow = stream.flow
    if flow is None or flow.request is None or flow.error is not None or not flow.live:
        return False
    if stream.client_state != stream.state_done or flow.request.stream:
        return False  # still sending its body upstream (a blob): no body to send again
    if stream.server_state not in (stream.state_wait_for_response_headers,
                                   stream.state_consume_response_body):
        return False  # the answer's headers are out (a stream), or it is over
    if not (stream.context.client.state & ConnectionState.CAN_WRITE):
        return False
    st = getattr(flow, ATTRIBUTE, None)  # (made by the pipeline: none, not admitted)
    return st is not None and st.admitted


def _upstream_failed(stream: HttpStream, why: str, sent: bool):
    """The upstream of an answerable stream failed: another channel, or keygate's answer."""
    flow = stream.flow
    rerouted = False
    if settings.failover is not None:
        try:
            rerouted = settings.failover(flow, why, sent)
        except Exception:  # keygate's answer still goes out
            log.exception("keygate: failover failed")
    if sent:
        yield from _detach(stream)
    if rerouted:
        yield from _reroute(stream)
        return
    st = state_of(flow)
    code = "upstream_timeout" if st.error == "upstream_timeout" else "upstream_error"
    st.upstream_failed = True
    flow.response = make_error(flow, code, MESSAGES[code])
    flow.response.timestamp_start = time.time()
    # As mitmproxy does for an answer an addon set in the request hook.
    yield HttpResponseHeadersHook(flow)
    if (yield from stream.check_killed(True)):
        return
    yield from stream.send_response()


def _detach(stream: HttpStream):
    """Part the stream from the upstream connection that failed it. mitmproxy's HTTP/1
    client layer reports a connection's end to the stream it last served even after it
    reported the failure (the connection closes a moment later): to mitmproxy's stream,
    gone by then, that changes nothing; to a stream that went on to another channel, it
    would look like that channel's failure."""
    conn = stream.context.server
    layer = http1.http_layer(stream)
    client = layer.connections.get(conn) if layer is not None else None
    while client is not None and not isinstance(client, HttpConnection):
        client = getattr(client, "child_layer", None)  # through TLS, HttpClient
    if isinstance(client, Http1Client) and client.stream_id == stream.stream_id:
        client.state = client.done  # (which takes every event and does nothing)
        if conn.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(conn)


def _send_request(stream: HttpStream):
    """Connect to the request's (new) upstream and send it the request, as mitmproxy's
    `state_consume_request_body` does once the request hook has run."""
    ok = yield from stream.make_server_connection()
    if not ok:
        return
    req = stream.flow.request
    content = req.raw_content
    server = stream.context.server
    yield SendHttp(RequestHeaders(stream.stream_id, req, not (content or req.trailers)), server)
    if content:
        yield SendHttp(RequestData(stream.stream_id, content), server)
    if req.trailers:
        yield SendHttp(RequestTrailers(stream.stream_id, req.trailers), server)
    yield SendHttp(RequestEndOfMessage(stream.stream_id), server)


def _forget_failed(stream: HttpStream, address: tuple[str, int]) -> None:
    """mitmproxy keeps a connection that failed to open among its client connection's
    upstream connections and answers every later request to that address with the old
    error, without trying again: a channel back up would look down to this client for as
    long as it stays connected. Forgotten, the next request connects afresh."""
    layer = http1.http_layer(stream)
    if layer is not None:
        for conn in [c for c in layer.connections
                     if isinstance(c, Server) and c.error and c.address == address]:
            del layer.connections[conn]


def _make_server_connection(self: HttpStream):
    # mitmproxy 11.0's own, with keygate's failover in place of its error answer.
    req = self.flow.request
    address = (req.host, req.port)
    connection, err = yield GetHttpConnection(
        address,
        req.scheme == "https",
        self.flow.server_conn.via,
        self.flow.server_conn.transport_protocol,
    )
    if not err:
        self.context.server = self.flow.server_conn = connection
        return True
    _forget_failed(self, address)
    if answerable(self):
        yield from _upstream_failed(self, err, sent=False)
    else:
        yield from self.handle_protocol_error(ResponseProtocolError(self.stream_id, err))
    return False


def _wrap_send_response(original):
    @functools.wraps(original)
    def send_response(self: HttpStream, already_streamed: bool = False):
        st = getattr(self.flow, ATTRIBUTE, None)
        if st is not None and st.resend and not already_streamed:
            return _resend(self, original)
        return original(self, already_streamed)  # (its generator as it is: no frame of ours)

    return send_response


def _resend(stream: HttpStream, send_response):
    """The channel answered 429 or 503 and the Router marked the request to go once to
    another channel (`resend`): there, if failover finds one; else the answer goes out."""
    flow = stream.flow
    state_of(flow).resend = False
    if answerable(stream) and settings.failover is not None:
        try:
            rerouted = settings.failover(flow, f"answered {flow.response.status_code}", True)
        except Exception:
            log.exception("keygate: failover failed")
            rerouted = False
        if rerouted:
            yield from _reroute(stream)
            return
    yield from send_response(stream, False)


def _reroute(stream):
    """Send the flow's request again, to where the Router has just pointed it: whatever
    answer the failed channel began is dropped."""
    stream.flow.response = None
    stream.response_body_buf.clear()
    stream.server_state = stream.state_wait_for_response_headers
    yield from _send_request(stream)


def _wrap_handle_protocol_error(original):
    @functools.wraps(original)
    def handle_protocol_error(self: HttpStream, event):
        if (isinstance(event, ResponseProtocolError)
                and event.code != status_codes.NO_RESPONSE and answerable(self)):
            yield from _upstream_failed(self, event.message, sent=True)
            return
        yield from original(self, event)

    return handle_protocol_error


_installed = False


def install(failover: Callable[[http.HTTPFlow, str, bool], bool] | None = None) -> None:
    """Wrap mitmproxy's HTTP stream (once per process); a later call only points it at a
    new Router, so a reload of gateway.py uses its own."""
    global _installed
    settings.failover = failover
    if _installed:
        return
    if not mitmproxy_version.VERSION.startswith("11.0."):
        log.warning("keygate: the upstream edge was written for mitmproxy 11.0, not %s",
                    mitmproxy_version.VERSION)
    HttpStream.make_server_connection = _make_server_connection
    HttpStream.handle_protocol_error = _wrap_handle_protocol_error(
        HttpStream.handle_protocol_error)
    HttpStream.send_response = _wrap_send_response(HttpStream.send_response)
    _installed = True
