"""The `Recorder` addon: a request id on every response, and one usage-log line per request.

The line is written when the request ends (docs/usage-log.md): in the response hook (after the last
chunk of a stream), or in the error hook when the upstream broke or the client left. A
flow gets exactly one of the two hooks from mitmproxy; `keygate.logged` makes doubly sure.
Writing is queued to `UsageWriter`'s thread; the per-key counters in `Ledger` are updated
here, in memory, from the same record, so quotas see what the log says.

What a client chooses (method, path, model name) is cut to a bound in the line (`bounded`),
so no client, with a key or without, can make lines big enough to rotate the log at will.
Rotation changes no quota anyway: the writer rotates through `Ledger.rotate`, which
carries the counts of the files it deletes forward (see ledger.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable

from mitmproxy import ctx, http
from mitmproxy import flow as mitmproxy_flow

from keygate.accounting.ledger import Ledger
from keygate.accounting.log import UsageWriter
from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.model.prices import PriceList
from keygate.model.settings import instance_name
from keygate.request import InFlight, state_of
from keygate.stages.config import Config
from keygate.stages.headerfields import set_fields

log = logging.getLogger("keygate")

ID_HEADER = "x-keygate-request-id"
# How long a stopping keygate lets requests in flight finish: inside Docker's default
# 10 s stop timeout (systemd's is 90 s).
DRAIN_SECONDS = 8.0


# Request ids name log lines, they grant nothing: 80 random bits from a generator seeded
# once from the OS, instead of a system call for every request.
_ids = random.Random(secrets.randbits(128))


def new_request_id() -> str:
    return f"req_{_ids.getrandbits(80):020x}"


def request_id(flow: http.HTTPFlow) -> str:
    """The flow's request id, drawn the first time it is asked for."""
    rid = state_of(flow).id
    if rid is None:
        rid = state_of(flow).id = new_request_id()
    return rid


_second: tuple[int, str] = (-1, "")


def iso_ms(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, as datetime.fromtimestamp(ts, utc) gives them
    (microseconds rounded half to even, then cut to milliseconds). The date and time of
    the current second are formatted once for all the requests in it."""
    global _second
    frac, whole = math.modf(ts)  # the rounding datetime.fromtimestamp does
    sec, us = int(whole), round(frac * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)))
    return f"{_second[1]}{us // 1000:03d}Z"


def client_gone(flow: http.HTTPFlow) -> bool:
    return flow.error is not None and "client" in flow.error.msg.lower()


def mitmproxy_ended(flow: http.HTTPFlow) -> tuple[int, str | None] | None:
    """(status, error code) where mitmproxy, not keygate, ended the request (flow.error
    set) and so decided what the client got; None where keygate's own status stands."""
    st = state_of(flow)
    if st.malformed:
        return 400, "invalid_request"  # mitmproxy's own 400 for a malformed request
    if st.error == "request_timeout":
        # Deadlines closed the connection: the body did not arrive within
        # client_body_timeout_s. Nothing was sent or forwarded; nginx logs such a
        # request as 408.
        return 408, "request_timeout"
    if flow.error.msg.startswith("Request body exceeds mitmproxy's body_size_limit"):
        # mitmproxy's 413 goes out in place of any answer keygate had chosen.
        return 413, "request_too_large"
    if flow.request.timestamp_end is None and not flow.request.stream:
        # The body never arrived whole (the client left mid-body, broken chunking): nothing
        # was sent and nothing forwarded, so it counts for nothing (docs/limits.md).
        return 499, st.error or "invalid_request"
    if flow.response is not None and st.admitted and not flow.response.stream:
        # The upstream's whole answer broke off, was malformed or over body_size_limit
        # before any of it went out: mitmproxy answers 502 itself, unless the client left.
        return (499, None) if client_gone(flow) else (502, "upstream_error")
    if flow.response is not None and flow.response.stream and not client_gone(flow):
        # The headers went out; then the upstream broke the stream.
        return flow.response.status_code, st.error or "upstream_error"
    return None


# Bounds, in characters, of the strings a client chooses (docs/usage-log.md): a line must stay small
# whatever a client sends, or a client without a key could fill the disk with a few huge
# paths and make rotation cycle through the log. The longest real values (a blob digest
# path, a Hugging Face model name, an IPv6 address) are far below them. Even when every
# character is one JSON escapes in 6 bytes, the client's part of a line stays under 7 KB.
MAX_METHOD = 32
MAX_PATH = 512
MAX_MODEL = 256
MAX_CLIENT_IP = 64


def bounded(value: object, limit: int) -> object:
    """`value` cut to `limit` characters, the cut marked with how much it took away:
    `/api/aaaa...[599488 chars cut]`. Anything but a too long string is returned as is."""
    if type(value) is not str or len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value) - limit} chars cut]"


def set_cost(flow: http.HTTPFlow, prices: PriceList) -> None:
    """The request's cost at the prices in force now (docs/usage-log.md#cost), from its
    exact token counts; stays None for a request that was not forwarded or that no price
    covers. Computed when its tokens are known, just before its line is built; a later
    price change never touches it."""
    st = state_of(flow)
    if st.admitted and prices.entries:
        st.cost = prices.cost(st.model, st.channel, st.prompt_tokens, st.completion_tokens,
                              st.cached_tokens)


def build_record(flow: http.HTTPFlow, now: float, instance: str = "") -> dict:
    """The usage-log record (docs/usage-log.md) for a finished flow; reads only its RequestState
    and the flow."""
    st = state_of(flow)
    error = st.error
    ended = mitmproxy_ended(flow) if flow.error is not None else None
    if ended is not None:
        status, error = ended
    elif flow.response is not None:
        status = flow.response.status_code
    elif client_gone(flow):
        status = 499  # nothing was sent: the client left first (nginx's convention)
    else:
        # The upstream failed where keygate could not answer through the flow (a streamed
        # upload): the edge's 502 went out (keygate/edge/upstream.py answers the others).
        status = 502
        error = error or "upstream_error"
    streamed = bool(st.stream) and flow.response is not None and bool(
        flow.response.stream)
    if flow.error is not None:
        completed = False
    elif streamed:
        completed = bool(st.finished) and error != "upstream_error"
    else:
        completed = not st.upstream_failed
    start = flow.request.timestamp_start
    prompt = st.prompt_tokens
    completion = st.completion_tokens
    return {
        "ts": iso_ms(start),
        "id": st.id,
        "key": st.key,
        "status": status,
        "error": error,
        # As received: mitmproxy's .method is upper-cased.
        "method": bounded(flow.request.data.method.decode("utf-8", "surrogateescape"),
                          MAX_METHOD),
        "path": bounded(endpoints.client_path(flow), MAX_PATH),
        "model": bounded(st.model, MAX_MODEL),
        "upstream_model": bounded(st.upstream_model, MAX_MODEL),
        "channel": st.channel,
        "stream": streamed,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion if st.total_tokens is None else st.total_tokens,
        "duration_ms": round((now - start) * 1000, 3),
        "client_ip": bounded(st.client_ip or _peer(flow), MAX_CLIENT_IP),
        "completed": completed,
        # True when the client left (or the upstream broke off) before the upstream's counts
        # came, and completion_tokens is keygate's count of the content it passed on.
        "tokens_estimated": bool(st.tokens_estimated),
        "instance": instance,
        "failed_channels": list(st.failed_channels or ()),
        "cost": st.cost,
    }


def _peer(flow: http.HTTPFlow) -> str:
    try:
        return flow.client_conn.peername[0]
    except (TypeError, IndexError):
        return ""


class Recorder:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.writer: UsageWriter | None = None
        self.ledger = Ledger()
        # Set once the counters are rebuilt from the log; until then lines are held here.
        self.ready = asyncio.Event()
        self._held: list[dict] | None = []
        self._loading: asyncio.Task | None = None
        self._log_settings: tuple | None = None
        self._inflight = InFlight()  # by flow id, and by client (`of_client`)
        self.draining = False
        # Called with each finished request's record (and its flow, None for the edge's
        # refusals) before it is written: the metrics and the dashboard's hourly totals.
        self.observers: list = []
        self._instance: tuple[str, str] | None = None  # ([gateway] instance, its name)

    @property
    def instance(self) -> str:
        """This process's name in usage lines (docs/usage-log.md)."""
        configured = self.config.state.settings.instance if self.config.state else ""
        if self._instance is None or self._instance[0] != configured:
            self._instance = (configured, instance_name(configured))
        return self._instance[1]

    def running(self) -> None:
        s = self.config.state.settings
        self._log_settings = (s.usage_log, s.usage_log_max_bytes, s.usage_log_keep)
        if self._loading is None and self.writer is None:
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        """Rebuild the counters in a thread while keygate already serves. The writer starts
        only afterwards, so the files read are exactly the old lines and everything
        since is added here once: counters equal a recount of the log."""
        path, max_bytes, keep = self._log_settings
        t0 = time.monotonic()
        try:
            ledger = await asyncio.to_thread(Ledger.load, path, keep)
        except Exception:
            log.exception("keygate: could not rebuild usage counters from %s; quotas start "
                          "from zero", path)
            ledger = Ledger()
        held, self._held = self._held or [], None
        for record in held:
            ledger.add(record)
        self.ledger = ledger
        self.writer = UsageWriter(path, max_bytes, keep, checkpoint=ledger.checkpoint,
                                  rotate=ledger.rotate)
        for record in held:
            self.writer.write(record)
        self.ready.set()
        log.info("keygate: usage counters rebuilt from %s in %.2f s", path, time.monotonic() - t0)

    def done(self) -> Awaitable[None] | None:
        master = getattr(ctx, "master", None)
        stopping = master is not None and master.should_exit.is_set()
        if stopping and self._inflight:
            # mitmdump is stopping (SIGTERM, Ctrl-C): give requests in flight, streams
            # above all, a bounded time to finish, refusing new ones meanwhile. mitmproxy
            # awaits what a done hook returns when it shuts down; on a script reload it does
            # not, so only this path returns a coroutine.
            return self._drain_then_close()
        self._close()
        return None

    async def _drain_then_close(self) -> None:
        self.draining = True
        log.info("keygate: stopping; waiting up to %.0f s for the requests in flight (%d)",
                 DRAIN_SECONDS, len(self._inflight))
        deadline = time.monotonic() + DRAIN_SECONDS
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._inflight:
            log.warning("keygate: %d requests still in flight at exit", len(self._inflight))
        self._close()

    def _close(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self.writer is None and self._held:
            # Stopped while still loading: the held lines must not be lost.
            path, max_bytes, keep = self._log_settings
            # (Its rotations still carry counts forward: the ledger follows the path.)
            self.writer = UsageWriter(path, max_bytes, keep, rotate=self.ledger.rotate)
            for record in self._held:
                self.writer.write(record)
            self._held = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Runs for every request, refused ones included: they get an id and a line too.
        request_id(flow)
        state_of(flow).seen = True
        if flow.error is not None and flow.response is None:
            # mitmproxy found the request malformed before any addon could act (smuggling
            # checks on its framing, a CONNECT) and answers 400 itself.
            state_of(flow).malformed = True
        self._inflight[flow.id] = flow
        if self.draining and not flow.response:
            refuse(flow, "gateway_unavailable", "The gateway is shutting down.")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Streamed responses leave with these headers, before the response hook.
        self._stamp(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._stamp(flow)
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    @staticmethod
    def _stamp(flow: http.HTTPFlow) -> None:
        # Once per response object: the response hook follows responseheaders for most.
        if flow.response is not None and state_of(flow).stamped != id(
                flow.response):
            set_fields(flow.response.headers, {ID_HEADER: request_id(flow)})
            state_of(flow).stamped = id(flow.response)

    def client_disconnected(self, client) -> None:
        # A flow mitmproxy gave up on without a response or error hook (its connection
        # handler crashed, e.g. on HTTP/1 request trailers) still gets its line, and must
        # not hold a graceful stop for its full wait. Hooks run as tasks of their own: the
        # ones still on their way get a moment first.
        flows = self._inflight.of_client(client.id)
        if flows:
            asyncio.get_running_loop().call_later(1.0, self._abandoned, flows)

    def _abandoned(self, flows: list[http.HTTPFlow]) -> None:
        for flow in flows:
            if flow.id in self._inflight and flow.error is None:
                flow.error = mitmproxy_flow.Error("abandoned by mitmproxy")
                self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        self._inflight.pop(flow.id, None)
        if state_of(flow).logged:
            return
        state_of(flow).logged = True
        request_id(flow)
        if state_of(flow).cost is None and self.config.state is not None:
            # (priced by the Meter when its tokens came; else, e.g. an upstream that
            # failed before answering, here)
            set_cost(flow, self.config.state.settings.prices)
        self._record(build_record(flow, time.time(), self.instance), flow)

    def edge_refusal(self, rid: str, status: int, code: str, method: str, path: str,
                     client_ip: str) -> None:
        """The line of a request head refused at keygate's HTTP/1 edge (keygate/edge/http1.py),
        before mitmproxy formed a flow: no key was looked at, nothing was forwarded."""
        now = time.time()
        self._record({
            "ts": iso_ms(now), "id": rid, "key": None, "status": status, "error": code,
            "method": bounded(method, MAX_METHOD) or None,
            "path": bounded(path, MAX_PATH) or None,
            "model": None, "upstream_model": None, "channel": None, "stream": False,
            "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
            "duration_ms": 0.0, "client_ip": bounded(client_ip, MAX_CLIENT_IP),
            "completed": True, "tokens_estimated": False,
            "instance": self.instance, "failed_channels": [], "cost": None,
        })

    @property
    def in_flight(self) -> int:
        """Requests whose headers passed every stage and that have not ended yet."""
        return len(self._inflight)

    def _record(self, record: dict, flow: http.HTTPFlow | None = None) -> None:
        for observe in self.observers:
            try:
                observe(record, flow)
            except Exception:  # the line must be written whatever an observer does
                log.exception("keygate: usage record observer failed")
        writer = self.writer
        if writer is None:
            if self._held is not None:
                self._held.append(record)  # counted and written once the ledger is loaded
            else:
                log.error("keygate: usage log not open; lost record %s", record["id"])
            return
        self.ledger.add(record)
        s = self.config.state.settings
        wanted = (s.usage_log, s.usage_log_max_bytes, s.usage_log_keep)
        if wanted != self._log_settings:
            self._log_settings = wanted
            writer.reconfigure(*wanted)
        writer.write(record)
