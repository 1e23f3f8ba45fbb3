"""What keygate knows about one request, carried from stage to stage.

Each stage of the pipeline (keygate/stages/, in gateway.py's order) reads what the stages
before it decided and adds what it decides itself. All of it is one `RequestState` per
flow, here, field by field with the stage that sets it; `state_of(flow)` gives it.

It lives on the flow object, not in `flow.metadata`: metadata is what mitmproxy saves
with a flow (`mitmdump -w`) and shows in its tools, and keygate's working state is
neither serialisable nor anyone else's business. The client's key is never in it, only
the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mitmproxy import http

ATTRIBUTE = "keygate"  # the flow attribute that holds the state


@dataclass(slots=True)
class RequestState:
    # -- who asks, what for (Auth, Cors, Policy) -----------------------------------------
    path: str | None = None
    """The path as the client sent it, without the query (Auth, before routing rewrites
    `flow.request.path`); model/endpoints.py's `client_path` reads it."""
    client_ip: str | None = None
    """The client address: the TCP peer, or X-Forwarded-For behind a trusted proxy (Auth)."""
    key: str | None = None
    """The name of the valid key presented; None until Auth found one (never the key)."""
    origin: str | None = None
    """The request's Origin when it is one of cors_origins (Cors)."""
    model: str | None = None
    """The model the client asked for, from the body or /v1/models/{model} (Policy)."""
    wants_stream: bool = False
    """Whether the client asked for a streamed answer, as its API defaults (Policy)."""
    body: dict[str, Any] | None = None
    """The JSON body, parsed once by Policy; the Router edits and serialises it."""
    body_changed: bool = False
    """Policy removed fields from `body`: the Router must write it back (Policy)."""

    # -- where it goes (Router, Limiter) -------------------------------------------------
    admitted: bool = False
    """The Router sent it on to an upstream: fail-closed lets only these through."""
    channel: str | None = None
    """The channel that serves it (Router)."""
    upstream_model: str | None = None
    """The model name the upstream sees, after the channel's model_map (Router)."""
    credential: bool = False
    """The Router put the channel's own credential on the upstream request."""
    strip_usage: bool = False
    """The Router asked the upstream for usage the client did not ask for; the Meter
    takes it out of the stream again."""
    counted: bool = False
    """The Limiter counted it against the key's limits (and must release it at the end)."""
    failed_channels: list[str] | None = None
    """Channels tried before the one that serves, which failed before any of the answer
    went to the client (Router, on failover), in order; None for none."""
    resend: bool = False
    """The channel answered 429 or 503 before any of the answer went out: it goes once to
    another channel that serves it (Router; keygate/edge/upstream.py sends it)."""
    reserved: int = 0
    """Tokens the Limiter reserved for it against the key's token quotas."""
    ratelimit: dict[str, str] | None = None
    """The x-ratelimit-* headers for the answer (Limiter)."""

    # -- what came back (Meter) ----------------------------------------------------------
    stream: bool = False
    """The answer is streamed (NDJSON or server-sent events)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int | None = None
    """Token counts the upstream reported (total_tokens: where it states one)."""
    cached_tokens: int = 0
    """Prompt tokens the upstream served from its cache, where it reports them (priced at
    a price's cached_input)."""
    finished: bool = False
    """The upstream's own end marker of a stream was seen."""
    tokens_estimated: bool = False
    """The stream ended before the upstream's counts: completion_tokens is keygate's
    count of the content it passed on."""

    cost: Any = None
    """The request's price (a Decimal) at the prices in force, or None where none applies
    (set when its tokens are known, before the usage line)."""

    # -- how it ended (every stage, the Recorder) ----------------------------------------
    error: str | None = None
    """keygate's error code (docs/errors.md) for the answer, or for how it ended."""
    id: str | None = None
    """The request id of x-keygate-request-id and the usage line (drawn on first use)."""
    seen: bool = False
    """Its headers passed every stage: the Recorder, the last, sets it (fail-closed)."""
    malformed: bool = False
    """mitmproxy refused the request as malformed before any stage could act."""
    upstream_failed: bool = False
    """Its upstream failed before answering and no other channel took it: keygate answered
    502 or 504 itself (keygate/edge/upstream.py)."""
    logged: bool = False
    """Its usage line is written: never a second one."""
    stamped: int | None = None
    """id() of the response that got x-keygate-request-id (once per response object)."""
    cors_stamped: int | None = None
    """id() of the response that got the CORS headers (Cors)."""


def state_of(flow: http.HTTPFlow) -> RequestState:
    """The flow's RequestState, made on first use. (getattr with a default: a missing
    attribute then costs no exception object, on the first call of every request.)"""
    st = getattr(flow, ATTRIBUTE, None)
    if st is None:
        st = RequestState()
        setattr(flow, ATTRIBUTE, st)
    return st


class InFlight(dict):
    """Flows in flight by flow id (a dict), also indexed by their client connection:
    `of_client` answers without looking at every flow in flight. A client that leaves asks
    it (the Recorder, the Limiter); scanning them all instead cost every disconnect time in
    proportion to the streams held open, 1,000 of them by one client if it likes. Only
    `self[id] = flow`, `pop` and `del` keep the index: nothing else writes to it."""

    __slots__ = ("_by_client",)

    def __init__(self) -> None:
        super().__init__()
        self._by_client: dict[str, dict[str, http.HTTPFlow]] = {}

    def __setitem__(self, fid: str, flow: http.HTTPFlow) -> None:
        super().__setitem__(fid, flow)
        cid = flow.client_conn.id
        flows = self._by_client.get(cid)
        if flows is None:
            flows = self._by_client[cid] = {}
        flows[fid] = flow

    def pop(self, fid: str, *default):
        if fid not in self:
            return super().pop(fid, *default)  # (the default, or KeyError)
        flow = super().pop(fid)
        cid = flow.client_conn.id
        flows = self._by_client.get(cid)
        if flows is not None:
            flows.pop(fid, None)
            if not flows:
                del self._by_client[cid]
        return flow

    def __delitem__(self, fid: str) -> None:
        self.pop(fid)

    def of_client(self, cid: str) -> list[http.HTTPFlow]:
        flows = self._by_client.get(cid)
        return list(flows.values()) if flows else []
