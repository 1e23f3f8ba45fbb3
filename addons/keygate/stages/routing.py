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
        # Flows waiting for response headers: flow id -> (deadline, flow, timeout). One
        # sweep checks them (see _sweep), not a timer per request to set and cancel.
        self._waiting: dict[str, tuple[float, http.HTTPFlow, float]] = {}
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
        if ep is None:  # Policy refuses these; never forward one by accident
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
            routed_model = model if ep.kind in ("inference", "show", "model") else None
            channel = choose(self._candidates(settings, routed_model, ep.native),
                             self.health, self.rng)
            if channel is None:
                where = " on the native Ollama API" if ep.native else ""
                refuse(flow, "model_not_found",
                       f"No upstream serves the model '{model}'{where}." if model
                       else "No upstream is configured for this endpoint.")
                return

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
        state_of(flow).admitted = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside mitmproxy's event loop: nothing to time
            return
        timeout = self.config.state.settings.upstream_timeout
        self._waiting[flow.id] = (loop.time() + timeout, flow, timeout)
        if self._sweeping is None:
            self._sweeping = loop.call_later(check_interval(timeout), self._sweep, loop)

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
        for _, flow, timeout in expired:
            del self._waiting[flow.id]
            self._expire(flow, timeout)
        if self._waiting:
            shortest = min(timeout for _, _, timeout in self._waiting.values())
            self._sweeping = loop.call_later(check_interval(shortest), self._sweep, loop)

    def _expire(self, flow: http.HTTPFlow, timeout: float) -> None:
        """No response headers within upstream_timeout_s: give up on the upstream.

        mitmproxy has no such timeout and no hook while it waits, so keygate closes the
        upstream connection itself. mitmproxy then answers the client with its own 502
        (it cannot be made to send a 504); the usage line says upstream_timeout."""
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        handler = connection_handler(flow.client_conn.id)
        if handler is None or flow.server_conn not in handler.transports:
            return
        state_of(flow).error = "upstream_timeout"
        log.warning("keygate: no response headers from %s within %.0f s; giving up",
                    state_of(flow).channel or flow.request.host, timeout)
        handler.close_connection(flow.server_conn)

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
        name = state_of(flow).channel
        if name and flow.response is not None:
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
