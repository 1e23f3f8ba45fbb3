"""The `Deadlines` addon: slow clients lose their connection.

mitmproxy's only client timeout is 10 minutes of inactivity, and every byte counts as
activity: a client sending its request head or body a byte at a time would hold its
connection, and the buffers behind it, for ever. keygate closes a client connection when

- no request is in flight and the head of the next one is not complete within
  `client_header_timeout_s`, counted from when the client connected or its last request
  ended (keep-alive idling included, as nginx's client_header_timeout and
  keepalive_timeout do); with HTTP/2, only while none of its requests is in flight;
- a request's headers are in but its body is not complete within `client_body_timeout_s`
  (per request; streamed uploads, whose body goes upstream as it comes, are exempt). The
  request's usage line then says `408`, `request_timeout`, as nginx logs it.

The hooks only note times in dicts (they run for every request); one periodic timer on
the event loop compares them with the settings in force, so a reload applies at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from mitmproxy import connection, ctx, http

from keygate.request import state_of
from keygate.stages.config import Config

log = logging.getLogger("keygate")

TICK = 0.5  # seconds between checks at most; a quarter of the shorter timeout if less
MIN_TICK = 0.05


def check_interval(*timeouts: float) -> float:
    """How often deadlines of these lengths are checked: every TICK, or a quarter of the
    shortest if less, but not more often than every MIN_TICK. A deadline is acted on at
    most that long after it passed. (The router's upstream timeout uses it too.)"""
    return max(MIN_TICK, min(TICK, *(t / 4 for t in timeouts)))


def connection_handler(client_id: str):
    """mitmproxy's handler of a client connection (its transports, close_connection), or
    None once the connection is gone or outside a running proxy."""
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master else None
    return proxyserver.connections.get(client_id) if proxyserver else None


class _Conn:
    """One client connection: its flows in flight, and since when it has had none."""

    __slots__ = ("client", "flows", "idle_since")

    def __init__(self, client: connection.Client, idle_since: float | None) -> None:
        self.client = client
        self.flows: set[str] = set()
        self.idle_since = idle_since  # None while a flow is in flight


class Deadlines:
    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.conns: dict[str, _Conn] = {}
        # flow id -> (when its headers were in, the flow), until its body is complete
        self.bodies: dict[str, tuple[float, http.HTTPFlow]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- lifecycle ------------------------------------------------------------------

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        s = self.config.state.settings
        log.info("keygate: client deadlines: request head %g s, request body %g s",
                 s.client_header_timeout, s.client_body_timeout)
        self._arm()

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # -- hooks: bookkeeping only, O(1) --------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        self.conns[client.id] = _Conn(client, self.clock())
        if self._timer is None:
            self._arm()

    def client_disconnected(self, client: connection.Client) -> None:
        c = self.conns.pop(client.id, None)
        if c is not None:
            for fid in c.flows:
                self.bodies.pop(fid, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # No "already answered" guard: a refused request still has its body read.
        now = self.clock()
        c = self.conns.get(flow.client_conn.id)
        if c is None:  # connected before this addon was loaded (a script reload)
            c = self.conns[flow.client_conn.id] = _Conn(flow.client_conn, None)
            if self._timer is None:
                self._arm()
        c.flows.add(flow.id)
        c.idle_since = None
        if flow.error is None:  # else mitmproxy refused the head and reads no body
            self.bodies[flow.id] = (now, flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self.bodies.pop(flow.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        self.bodies.pop(flow.id, None)
        c = self.conns.get(flow.client_conn.id)
        if c is not None and flow.id in c.flows:
            c.flows.discard(flow.id)
            if not c.flows:
                c.idle_since = self.clock()

    # -- the timer --------------------------------------------------------------------

    def _arm(self) -> None:
        if self._loop is None or self._timer is not None or not (self.conns or self.bodies):
            return
        s = self.config.state.settings
        every = check_interval(s.client_header_timeout, s.client_body_timeout)
        self._timer = self._loop.call_later(every, self._tick)

    def _tick(self) -> None:
        self._timer = None
        try:
            self.check()
        except Exception:  # the timer must survive whatever one connection does
            log.exception("keygate: checking client deadlines failed")
        self._arm()

    def check(self) -> None:
        """Close the connections whose client is past a deadline (settings in force)."""
        s = self.config.state.settings
        now = self.clock()
        head_by = now - s.client_header_timeout
        body_by = now - s.client_body_timeout

        late: dict[str, list[http.HTTPFlow]] = {}
        for fid, (since, flow) in list(self.bodies.items()):
            req = flow.request
            if req.stream or req.timestamp_end is not None or flow.error is not None:
                # Streamed upload (exempt), or the body is in and its hook on its way.
                del self.bodies[fid]
            elif since <= body_by:
                late.setdefault(flow.client_conn.id, []).append(flow)
        for cid, flows in late.items():
            c = self.conns.get(cid)
            if c is None:
                for flow in flows:
                    self.bodies.pop(flow.id, None)
                continue
            if self._close(c, f"request body not complete within {s.client_body_timeout:g} s",
                           now, flows):
                for flow in flows:
                    state_of(flow).error = "request_timeout"

        for c in [c for c in self.conns.values()
                  if c.idle_since is not None and c.idle_since <= head_by]:
            self._close(c, f"request head not complete within {s.client_header_timeout:g} s",
                        now)

    def _close(self, c: _Conn, why: str, now: float,
               flows: list[http.HTTPFlow] | None = None) -> bool:
        """Close `c`'s connection through mitmproxy; False where it is not the client's
        fault after all (or the connection is already gone)."""
        handler = connection_handler(c.client.id)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is None or io.handler is None:
            self._forget(c)
            return False
        if flows is None:
            if handler.hook_tasks:
                return False  # a hook on its way may start a request: look again next tick
            transport = getattr(io.writer, "transport", None)
            if transport is not None and transport.get_write_buffer_size():
                # Still receiving its last answer: the idle time starts when that is out.
                # (A client that never reads is mitmproxy's backpressure's, see README.)
                c.idle_since = now
                return False
        self._forget(c)
        peer = c.client.peername[0] if c.client.peername else "?"
        log.warning("keygate: closed connection from %s: %s", peer, why)
        handler.close_connection(handler.client)
        return True

    def _forget(self, c: _Conn) -> None:
        self.conns.pop(c.client.id, None)
        for fid in c.flows:
            self.bodies.pop(fid, None)
