"""The `Router` addon: sends an admitted request to its upstream (docs/configuration.md,
docs/endpoints.md#authentication).

It picks the channel for the requested model (highest priority first, spread by weight,
skipping channels that are cooling down after failures), rewrites scheme, host, port and
path for it, puts the upstream model name in the body, and gives the upstream the
channel's own credential (Auth has removed the client's, and Origin). Without channels
it leaves the destination to mitmdump's reverse target. It is the last addon to touch a
request, so it is the one that marks it admitted; the fail-closed guard refuses anything
not so marked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from urllib.parse import quote

from mitmproxy import http

from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.model.settings import Channel
from keygate.request import state_of
from keygate.stages.config import Config
from keygate.stages.deadlines import check_interval, connection_handler
from keygate.stages.headerfields import has_field, set_fields
from keygate.stages.recorder import client_gone

log = logging.getLogger("keygate")

# Streams of these endpoints report usage only when asked with stream_options (docs/usage-log.md).
USAGE_OPTION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

COOLDOWN_FIRST = 2.0
COOLDOWN_MAX = 60.0

# A connection to an upstream not made within this long (or upstream_timeout_s, if
# shorter) counts as a failure to connect: the request fails over (docs/configuration.md).
CONNECT_TIMEOUT = 10.0
# Endpoints whose request goes to another channel even after it may have reached the
# failed one: nothing is changed upstream by sending them twice (model management is).
RESENDABLE = frozenset({"inference", "show", "list", "model", "read"})
# Answers that say the upstream did not take the request on: a non-streamed request is
# sent once to another channel (docs/configuration.md#choice-and-failover).
RESEND_STATUSES = frozenset({429, 503})
# Endpoints routed by their model; the others (admin calls, reads without a model) go to
# the Ollama channels whatever model they name.
BY_MODEL = frozenset({"inference", "show", "model"})


def encode_json(doc: object) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800" is valid JSON) has no UTF-8: escape it, as it came.
        return json.dumps(doc).encode()


class Health:
    """Cooldown per channel: starts at a few seconds, doubles while failures go on,
    and is forgotten on the first success."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.until: dict[str, float] = {}
        self.backoff: dict[str, float] = {}
        self.failed_at: dict[str, float] = {}

    def cooling(self, name: str) -> bool:
        return self.until.get(name, 0.0) > self.clock()

    def failure(self, name: str) -> float:
        step = min(self.backoff.get(name, COOLDOWN_FIRST / 2) * 2, COOLDOWN_MAX)
        self.backoff[name] = step
        now = self.clock()
        self.failed_at[name] = now
        self.until[name] = now + step
        return step

    def success(self, name: str) -> None:
        if name in self.backoff:
            self.backoff.pop(name, None)
            self.until.pop(name, None)
            self.failed_at.pop(name, None)


def candidates(channels: tuple[Channel, ...], model: str | None, native: bool) -> list[Channel]:
    """Channels that may serve the request, before priority and health are applied."""
    out = []
    for c in channels:
        if native and c.kind != "ollama":
            continue
        if model is None or c.serves(model):
            out.append(c)
    return out


def choose(cands: list[Channel], health: Health, rng: random.Random) -> Channel | None:
    """Highest priority group among healthy channels, weighted; if all are cooling, the one
    that failed longest ago (it is the likeliest to be back)."""
    if not cands:
        return None
    healthy = [c for c in cands if not health.cooling(c.name)] if health.until else cands
    if not healthy:
        return min(cands, key=lambda c: health.failed_at.get(c.name, 0.0))
    top = max(c.priority for c in healthy)
    group = [c for c in healthy if c.priority == top]
    if len(group) == 1:
        return group[0]
    return rng.choices(group, weights=[c.weight for c in group])[0]


class Router:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self.config = config
        self.health = Health()
        self.rng = rng or random.Random()
        # Flows waiting for response headers: flow id -> (deadline, flow, timeout, later).
        # `later`: the deadline for response headers while `deadline` is the one for the
        # connection (see _arm), else None. One sweep checks them (see _sweep), not a
        # timer per request to set and cancel.
        self._waiting: dict[str, tuple[float, http.HTTPFlow, float, float | None]] = {}
        self._sweeping: asyncio.TimerHandle | None = None
        # candidates() per (model, native) for the settings in force: the same few models
        # are asked for again and again, and patterns cost more than a lookup.
        self._routes: dict[tuple[str | None, bool], list[Channel]] = {}
        self._routes_for: object = None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Blob uploads stream their body: they leave before the request hook.
        if flow.response or flow.error or not flow.live or not flow.request.stream:
            return
        self._forward(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or state_of(flow).admitted:
            return
        self._forward(flow)

    def _forward(self, flow: http.HTTPFlow) -> None:
        target = flow.request.path
        path, sep, query = target.partition("?")
        ep = endpoints.classify(flow.request.method, path)
        if ep is None or ep.own:  # Policy refuses these; never forward one by accident
            refuse(flow, "unknown_endpoint", f"Unknown endpoint: {flow.request.method} {path}")
            return
        if flow.request.is_http2 or flow.request.is_http3:
            # mitmproxy turns an HTTP/2 request into HTTP/1 for the upstream without framing
            # its body: without content-length the upstream would read the body as the next
            # request on the connection (request smuggling, past the endpoint table).
            if not flow.request.stream:
                set_fields(flow.request.headers,
                           {"content-length": str(len(flow.request.raw_content or b""))})
            elif not has_field(flow.request.headers, b"content-length"):
                refuse(flow, "invalid_request", "An HTTP/2 upload needs a content-length.")
                return
        st = state_of(flow)
        model = st.model
        doc, changed = st.body, st.body_changed
        st.body, st.body_changed = None, False  # (the request holds it from here on)
        settings = self.config.state.settings
        channels = settings.channels

        channel = None
        if channels:
            # Admin calls and reads without a model go to the first Ollama channel.
            routed_model = model if ep.kind in BY_MODEL else None
            channel = choose(self._candidates(settings, routed_model, ep.native),
                             self.health, self.rng)
            if channel is None:
                where = " on the native Ollama API" if ep.native else ""
                refuse(flow, "model_not_found",
                       f"No upstream serves the model '{model}'{where}." if model
                       else "No upstream is configured for this endpoint.")
                return

        self._send_to(flow, channel, ep, path, sep, query, target, doc, changed)
        state_of(flow).admitted = True
        self._arm(flow)

    def _send_to(self, flow: http.HTTPFlow, channel: Channel | None, ep: endpoints.Endpoint,
                 path: str, sep: str, query: str, target: str, doc: dict | None,
                 changed: bool) -> None:
        """Point the request at `channel` (None: mitmdump's reverse target): destination,
        path, model name, the channel's credential, and the body's edits. `path`, `sep`
        and `query`: the client's target split; `target`: the request's target as it
        stands."""
        model = state_of(flow).model
        upstream_model = channel.upstream_model(model) if channel and model else model
        state_of(flow).upstream_model = upstream_model
        if channel:
            if ep.kind == "model" and upstream_model != model:
                path = "/v1/models/" + quote(upstream_model, safe=":@")
            req = flow.request
            if (req.host, req.port, req.scheme) != (channel.host, channel.port, channel.scheme):
                # (Each setter rewrites the Host header: skipped when nothing changes.)
                req.scheme = channel.scheme
                req.host = channel.host
                req.port = channel.port
            upstream_target = channel.upstream_path(path) + sep + query
            if upstream_target != target:  # (the setter re-encodes: skipped when the same)
                flow.request.path = upstream_target
            state_of(flow).channel = channel.name
            if channel.api_key:
                set_fields(flow.request.headers, {"authorization": f"Bearer {channel.api_key}"})
                state_of(flow).credential = True
            elif state_of(flow).credential:  # (failover from a channel that has one)
                flow.request.headers.pop("authorization", None)
                state_of(flow).credential = False
        if doc is not None:
            if upstream_model != model:
                if "model" in doc or "name" not in doc:
                    doc["model"] = upstream_model
                else:
                    doc["name"] = upstream_model
                changed = True
            if (state_of(flow).wants_stream and path in USAGE_OPTION_PATHS
                    and (channel is None or channel.stream_usage)):
                opts = doc.get("stream_options")
                if not (isinstance(opts, dict) and opts.get("include_usage") is True):
                    # Ask for usage, and have the meter take back out what this added.
                    doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                             "include_usage": True}
                    state_of(flow).strip_usage = True
                    changed = True
            if changed:
                flow.request.content = encode_json(doc)

        if not (flow.request.is_http2 or flow.request.is_http3):
            # An absolute-form target ("POST http://host/api/chat") would go upstream as
            # sent, and Go's net/http takes the request's host from it: send the origin
            # form keygate checked, as mitmproxy's regular mode does.
            if flow.request.data.authority:
                flow.request.authority = ""

    def _arm(self, flow: http.HTTPFlow) -> None:
        """Start the request's upstream deadlines: the connection within CONNECT_TIMEOUT
        (when shorter than upstream_timeout_s), the response headers within
        upstream_timeout_s."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside mitmproxy's event loop: nothing to time
            return
        timeout = self.config.state.settings.upstream_timeout
        now = loop.time()
        if timeout > CONNECT_TIMEOUT:
            self._waiting[flow.id] = (now + CONNECT_TIMEOUT, flow, timeout, now + timeout)
        else:
            self._waiting[flow.id] = (now + timeout, flow, timeout, None)
        if self._sweeping is None:
            self._sweeping = loop.call_later(check_interval(timeout), self._sweep, loop)

    def failover(self, flow: http.HTTPFlow, why: str, sent: bool) -> bool:
        """The request's upstream failed before any answer went to the client (called by
        keygate/edge/upstream.py, which holds the request whole). The channel cools down;
        True when the request now points at another channel of the same or lower
        priority that serves it, for the edge to send it there; False when keygate
        answers 502 (504 after upstream_timeout_s) instead. `sent`: the request may have
        reached the failed upstream; only endpoints that change nothing upstream
        (RESENDABLE) are then sent again."""
        self._waiting.pop(flow.id, None)
        st = state_of(flow)
        name = st.channel
        if name is None:  # mitmdump's reverse target: nowhere else to go
            return False
        step = self.health.failure(name)
        log.warning("keygate: channel %s failed (%s); cooling down for %.0f s",
                    name, why, step)
        if flow.request.stream:  # a blob upload: its body went by, it is not held
            return False
        # Everything needed is in the flow and its state: nothing is kept per request
        # for a failover that healthy channels never need.
        path = endpoints.client_path(flow)
        ep = endpoints.classify(flow.request.method, path)
        if ep is None or (sent and ep.kind not in RESENDABLE):
            return False
        cands = self._candidates(self.config.state.settings,
                                 st.model if ep.kind in BY_MODEL else None, ep.native)
        tried = {name, *(st.failed_channels or ())}
        priority = next((c.priority for c in cands if c.name == name), None)
        channel = choose([c for c in cands if c.name not in tried
                          and (priority is None or c.priority <= priority)],
                         self.health, self.rng)
        if channel is None:
            return False
        st.failed_channels = [*(st.failed_channels or ()), name]
        st.error = None  # (an upstream_timeout was the failed channel's)
        doc = self._body_as_sent_by_client(flow)
        target = flow.request.path
        _, sep, query = target.partition("?")
        log.info("keygate: request %s goes to channel %s instead", st.id or "", channel.name)
        self._send_to(flow, channel, ep, path, sep, query, target, doc, doc is not None)
        self._arm(flow)
        return True

    def _may_resend(self, flow: http.HTTPFlow) -> bool:
        """Whether an answer of RESEND_STATUSES goes to another channel instead of the
        client: the request's first channel answered it, the request's body is held, and
        another channel serves it (failover decides which)."""
        st = state_of(flow)
        if st.failed_channels or flow.request.stream:
            return False  # once only; a blob's body went by
        ep = endpoints.classify(flow.request.method, endpoints.client_path(flow))
        if ep is None or ep.kind not in RESENDABLE:
            return False
        cands = self._candidates(self.config.state.settings,
                                 st.model if ep.kind in BY_MODEL else None, ep.native)
        return len(cands) > 1

    @staticmethod
    def _body_as_sent_by_client(flow: http.HTTPFlow) -> dict | None:
        """The request's JSON body with the Router's edits for the failed channel taken
        back (for `_send_to` to make the next channel's), or None for a body it never
        edits. The model name goes back to the one asked for; the stream usage it asked
        for goes, which the client had not asked for (false or absent: the same)."""
        st = state_of(flow)
        content = flow.request.raw_content
        if not content or st.model is None:
            return None
        try:
            doc = json.loads(content)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        if st.upstream_model != st.model:
            doc["model" if "model" in doc or "name" not in doc else "name"] = st.model
        if st.strip_usage:
            opts = doc.get("stream_options")
            if isinstance(opts, dict):
                opts.pop("include_usage", None)
                if not opts:
                    del doc["stream_options"]
            st.strip_usage = False
        return doc

    def _candidates(self, settings: object, model: str | None, native: bool) -> list[Channel]:
        if settings is not self._routes_for:
            self._routes, self._routes_for = {}, settings
        found = self._routes.get((model, native))
        if found is None:
            found = candidates(settings.channels, model, native)
            if len(self._routes) >= 4096:  # many distinct names (a client probing): start over
                self._routes.clear()
            self._routes[(model, native)] = found
        return found

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give up on the flows past their deadline; runs while any flow waits."""
        self._sweeping = None
        now = loop.time()
        expired = [w for w in self._waiting.values() if now >= w[0]]
        for _, flow, timeout, later in expired:
            del self._waiting[flow.id]
            if later is None:
                self._expire(flow, timeout)
            elif flow.server_conn.connected:  # connected in time: now the headers
                self._waiting[flow.id] = (later, flow, timeout, None)
            else:
                self._expire(flow, CONNECT_TIMEOUT, connecting=True)
        if self._waiting:
            shortest = min(w[2] for w in self._waiting.values())
            self._sweeping = loop.call_later(check_interval(shortest), self._sweep, loop)

    def _expire(self, flow: http.HTTPFlow, timeout: float, connecting: bool = False) -> None:
        """No connection within CONNECT_TIMEOUT (`connecting`), or no response headers
        within upstream_timeout_s: give up on the upstream.

        mitmproxy has neither timeout and no hook while it waits, so keygate closes the
        upstream connection itself, or cancels its opening. The failure then reaches
        keygate/edge/upstream.py: the request fails over, or keygate answers 504
        upstream_timeout (502 upstream_error when only the connection timed out)."""
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        handler = connection_handler(flow.client_conn.id)
        if handler is None:
            return
        conn = flow.server_conn
        opened = conn in handler.transports and conn.connected
        if opened:
            doomed = [conn]
        else:
            # Still opening (TCP or TLS): the flow's connection is not its own yet, but
            # the one being opened to its destination on this client connection.
            address = (flow.request.host, flow.request.port)
            doomed = [c for c in handler.transports if c is not handler.client
                      and getattr(c, "address", None) == address
                      and (not c.connected or (c.tls and not c.tls_established))]
        if not doomed:
            return
        if not connecting:
            state_of(flow).error = "upstream_timeout"
        log.warning("keygate: %s %s within %g s; giving up",
                    "no response headers from" if opened else "no connection to",
                    state_of(flow).channel or flow.request.host, timeout)
        for c in doomed:
            handler.close_connection(c)

    def _disarm(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        st = state_of(flow)
        if st.credential:
            st.credential = False
            # Sent by now: the channel's credential stays out of what runs after keygate
            # (mitmdump's flow dump prints request headers at flow_detail >= 2, saved flows).
            flow.request.headers.pop("authorization", None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)  # refused after admission (limits): never forwarded

    # Channel health: failures seen by the meter and the usage log feed the cooldown.
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)
        st = state_of(flow)
        name = st.channel
        # (An answer of keygate's own, st.error set, says nothing of the channel: a
        # failure that led to one was counted in failover.)
        if name and flow.response is not None and st.error is None:
            if flow.response.status_code in RESEND_STATUSES and self._may_resend(flow):
                # Sent on by keygate/edge/upstream.py once the answer's body is in, through
                # failover, which cools the channel down.
                st.resend = True
                return
            if flow.response.status_code >= 500:
                step = self.health.failure(name)
                log.warning("keygate: channel %s answered %d; cooling down for %.0f s",
                            name, flow.response.status_code, step)
            else:
                self.health.success(name)

    def error(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow)
        name = state_of(flow).channel
        if name and flow.response is None and not client_gone(flow):
            step = self.health.failure(name)
            log.warning("keygate: channel %s failed (%s); cooling down for %.0f s",
                        name, flow.error.msg if flow.error else "?", step)
