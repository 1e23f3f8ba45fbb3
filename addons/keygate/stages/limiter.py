"""The `Limiter` addon: per-key rate limits and quotas (docs/limits.md).

Counters count requests keygate forwards: the check runs after the router has admitted a
request, and a refusal takes the admission back. Rolling windows (rpm, tpm) live here in
memory; day, month and lifetime quotas, budgets in money among them, come from the usage
ledger, which is rebuilt from the log, so they survive restarts (QUOTAS: one table of
them). Everything a check touches is per key: O(1) in the number of keys.

Token quotas under concurrency. A request's tokens are known only when it ends, so a check
against the tokens already counted alone would let through every request that arrives
while the first ones are still running. So each request of a key with tpm or a token
quota (per day, per month, total) holds a reservation while it is in flight: e tokens, the
key's recent mean per request (an exponentially weighted mean over this process's finished
requests of the key that reported tokens, rounded up, so at least 1; FIRST_ESTIMATE before
the first).
Reservations count against each of those quotas until their request ends (response,
error, client gone, refused after all), when the real count replaces them. A request is
admitted only while

    used + reserved < quota    (used: tokens counted; reserved: the key's requests in flight)

and one refused only because of the reservations gets 429 rate_limit_exceeded with
Retry-After: 1, since the quota itself is not used up. Refused requests reserve nothing.

The bound, for each quota and keygate process: let L be the last request admitted against
the quota (in its day, window or lifetime), F the requests in flight right after L was
admitted (L among them), a_i the tokens request i really used and e_i its reservation.
At L's admission used + sum(e_i, i in F - L) <= quota - 1, and the tokens counted once F
has ended are that `used` plus sum(a_i, i in F), so the quota is exceeded by at most

    (a_L - 1) + sum(a_i - e_i, i in F - L)

that is, the last request's tokens less one (as for one client sending one request at a
time: the request that crosses a quota completes), plus by how much the others then in
flight outran their reservations. And F holds at most ceil(R / e) requests, R = quota -
used when L was admitted and e the smallest reservation in F (so one, when the reservation
of a request in flight covers what remains).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

from mitmproxy import http

from keygate.accounting.shared import ADMITTED, Unavailable
from keygate.model.errors import refuse
from keygate.model.keyring import Limits
from keygate.model.prices import money_text
from keygate.request import InFlight, state_of
from keygate.stages.config import Config
from keygate.stages.headerfields import set_fields
from keygate.stages.recorder import Recorder
from keygate.stages.shared import Shared, quota_checks, refusal

WINDOW = 60.0
FIRST_ESTIMATE = 1024  # tokens reserved per request of a key with no finished request yet
ESTIMATE_WEIGHT = 0.25  # of the latest request in the key's mean tokens per request
# Seconds after its client left that a flow with no end hook ends here: after the Recorder has
# logged it and counted its tokens (1 s), so its reservation stands in for them until then.
ABANDONED_AFTER = 1.5


class RollingWindow:
    """Amounts added at moments in time; the total over the last WINDOW seconds."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: int = 1) -> None:
        # (Expired here too: a window kept after its limit was taken out of keys.yaml is
        # no longer checked, and would grow with every request of the key.)
        self.expire(now)
        if amount:
            self.events.append((now, amount))
            self.total += amount

    def wait_below(self, limit: int, now: float) -> float:
        """Seconds until the total drops below `limit` (0 if it already is)."""
        total = self.total
        if total < limit:
            return 0.0
        for ts, amount in self.events:
            total -= amount
            if total < limit:
                return max(0.0, ts + WINDOW - now)
        return WINDOW  # a limit of 0 never opens


def _window(windows: dict[str, RollingWindow], name: str) -> RollingWindow:
    """The key's window, made on first use (setdefault would build one every call)."""
    w = windows.get(name)
    if w is None:
        w = windows[name] = RollingWindow()
    return w


@dataclass(frozen=True)
class Quota:
    """One quota of docs/limits.md#quotas: what it counts, over which period, the Ledger
    query that says how much of it is used, and what a refusal says."""

    counter: str  # "requests", "tokens" or "money" (the usage lines' cost)
    period: str  # "day" and "month" (UTC; the query takes "YYYY-MM-DD" or "YYYY-MM"), "total"
    used: str  # the Ledger method: (key, period) or, for "total", (key)
    message: str  # with {limit} and {currency}
    held: str = ""  # for token quotas: the quota named while reservations hold it


# Every quota of a key, by its limit's name (keyring.QUOTA_NAMES, checked in that order).
QUOTAS = {
    "requests_per_day": Quota("requests", "day", "requests_on",
                              "Daily request quota used up ({limit} per UTC day)."),
    "tokens_per_day": Quota("tokens", "day", "tokens_on",
                            "Daily token quota used up ({limit} per UTC day).",
                            "{limit} per UTC day"),
    "tokens_total": Quota("tokens", "total", "tokens_total",
                          "Token quota used up ({limit} tokens in total).",
                          "{limit} tokens in total"),
    "requests_per_month": Quota("requests", "month", "requests_in_month",
                                "Monthly request quota used up ({limit} per UTC month)."),
    "tokens_per_month": Quota("tokens", "month", "tokens_in_month",
                              "Monthly token quota used up ({limit} per UTC month).",
                              "{limit} per UTC month"),
    "budget_per_day": Quota("money", "day", "spent_on",
                            "Daily budget used up ({limit} {currency} per UTC day)."),
    "budget_per_month": Quota("money", "month", "spent_in_month",
                              "Monthly budget used up ({limit} {currency} per UTC month)."),
    "budget_total": Quota("money", "total", "spent_total",
                          "Budget used up ({limit} {currency} in total)."),
}


def seconds_to_next_utc_month(now: float) -> float:
    t = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    first = (t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
             + dt.timedelta(days=32)).replace(day=1)
    return (first - t).total_seconds()


def utc_month(now: float) -> str:
    """The UTC month of a Unix time as "YYYY-MM"."""
    return utc_day(now)[:7]


def seconds_to_utc_midnight(now: float) -> float:
    t = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    midnight = (t + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - t).total_seconds()


@functools.lru_cache(maxsize=4)
def _day_name(day_number: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day_number)).isoformat()


def utc_day(now: float) -> str:
    """The UTC day of a Unix time as "YYYY-MM-DD". Every request with a day quota asks: it is
    computed once per day, not formatted each time."""
    return _day_name(int(now // 86400))


def ratelimit_headers(lim: Limits, requests_used: int, tokens_used: int) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers for the rpm and tpm a key has, given what its
    windows hold."""
    out = {}
    if lim.rpm is not None:
        out["x-ratelimit-limit-requests"] = str(lim.rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, lim.rpm - requests_used))
    if lim.tpm is not None:
        out["x-ratelimit-limit-tokens"] = str(lim.tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, lim.tpm - tokens_used))
    return out


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Limiter:
    def __init__(self, config: Config, usage: Recorder, clock=time.time,
                 shared: Shared | None = None) -> None:
        self.config = config
        self.usage = usage
        self.clock = clock
        # With redis_url: counters shared by every keygate process (stages/shared.py);
        # the flows counted there rather than here, by flow id.
        self.shared = shared
        self.remote: set[str] = set()
        self.requests: dict[str, RollingWindow] = {}
        self.tokens: dict[str, RollingWindow] = {}
        self.inflight: dict[str, int] = {}
        # Token quotas: tokens reserved by each key's requests in flight, the key's mean
        # tokens per request, and the flows holding reservations or slots (by flow id).
        self.reserved: dict[str, int] = {}
        self.estimates: dict[str, float] = {}
        self.counted = InFlight()  # by flow id, and by client (`of_client`)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return
        if not state_of(flow).admitted or state_of(flow).counted:
            return
        name = state_of(flow).key
        key = self.config.state.keys.by_name.get(name)
        if key is None:
            return
        lim = key.limits
        if self.shared is not None and self.shared.counters is not None and lim.any():
            return self._shared_admit(flow, name, lim)
        ready = getattr(self.usage, "ready", None)
        if ready is not None and not ready.is_set() and lim.quotas:
            # Quotas need the counters rebuilt from the log: this key waits for them
            # (only at start-up; keys without quotas are served meanwhile).
            return self._after_ready(flow, ready)
        self._admit_or_refuse(flow, name, lim)

    async def _after_ready(self, flow: http.HTTPFlow, ready) -> None:
        await ready.wait()
        if flow.response or flow.error or not flow.live:
            return
        name = state_of(flow).key
        key = self.config.state.keys.by_name.get(name)
        if key is not None:
            self._admit_or_refuse(flow, name, key.limits)

    def _admit_or_refuse(self, flow: http.HTTPFlow, name: str, lim: Limits) -> None:
        st = state_of(flow)
        # Not admitted until counted: should anything below raise, the pipeline's last
        # stage (stages/failclosed.py) refuses the request rather than forward it uncounted.
        st.admitted = False
        verdict = self.check(name, lim, self.clock())
        if verdict is not None:
            code, message, wait = verdict
            # Not forwarded after all: it must not look routed in the log.
            st.channel, st.upstream_model = None, None
            headers = {"retry_after": retry_after(wait)} if wait is not None else {}
            refuse(flow, code, message, **headers)
            return
        reserve = self.reservation(name, lim)
        self.admit(name, self.clock(), reserve)
        st.counted, st.reserved = True, reserve
        self.counted[flow.id] = flow
        st.ratelimit = self.headers(name, lim)
        st.admitted = True

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Streamed uploads are admitted at headers time; count them all the same.
        if flow.request.stream and state_of(flow).admitted:
            return self.request(flow)
        return None

    def check(self, name: str, lim: Limits, now: float) -> tuple[str, str, float | None] | None:
        """None to admit, else (error code, message, Retry-After seconds or None)."""
        if not lim.any():
            return None
        if lim.concurrent is not None and self.inflight.get(name, 0) >= lim.concurrent:
            return ("rate_limit_exceeded",
                    f"Too many requests in flight for this key (limit {lim.concurrent}).", 1.0)
        if lim.rpm is not None:
            w = _window(self.requests, name)
            w.expire(now)
            if w.total >= lim.rpm:
                return ("rate_limit_exceeded",
                        f"Rate limit reached: {lim.rpm} requests per minute.",
                        w.wait_below(lim.rpm, now))
        # Reserved by the key's requests in flight; the first token quota they fill. A quota
        # used up answers first: it does not free up when they end.
        reserved = self.reserved.get(name, 0)
        held: str | None = None
        if lim.tpm is not None:
            w = _window(self.tokens, name)
            w.expire(now)
            if w.total >= lim.tpm:
                return ("rate_limit_exceeded",
                        f"Rate limit reached: {lim.tpm} tokens per minute.",
                        w.wait_below(lim.tpm, now))
            if reserved and w.total + reserved >= lim.tpm:
                held = f"{lim.tpm} tokens per minute"
        ledger = self.usage.ledger
        for limit_name in lim.quotas:
            q = QUOTAS[limit_name]
            limit = getattr(lim, limit_name)
            if q.period == "total":
                used = getattr(ledger, q.used)(name)
            else:
                used = getattr(ledger, q.used)(name, utc_day(now) if q.period == "day"
                                               else utc_month(now))
            if q.counter == "requests":
                used += self.inflight.get(name, 0)  # (those in flight are not in the log yet)
            if used >= limit:
                return ("insufficient_quota", q.message.format(
                    limit=money_text(limit) if q.counter == "money" else limit,
                    currency=self.config.state.settings.prices.currency),
                    None if q.period == "total" else
                    seconds_to_utc_midnight(now) if q.period == "day" else
                    seconds_to_next_utc_month(now))
            if (q.counter == "tokens" and reserved and held is None
                    and used + reserved >= limit):
                held = q.held.format(limit=limit)
        if held is not None:
            # Not used up, but spoken for: admitted once those requests have ended and
            # their real counts are known.
            return ("rate_limit_exceeded",
                    f"Token quota nearly used up ({held}) by this key's requests in flight: "
                    "retry when they have finished.", 1.0)
        return None

    def reservation(self, name: str, lim: Limits) -> int:
        """The tokens a request of this key reserves while in flight: 0 without token quotas,
        else the key's recent mean per request rounded up (FIRST_ESTIMATE before any)."""
        if (lim.tpm is None and lim.tokens_per_day is None and lim.tokens_total is None
                and lim.tokens_per_month is None):
            return 0
        mean = self.estimates.get(name)
        return FIRST_ESTIMATE if mean is None else max(1, math.ceil(mean))

    def admit(self, name: str, now: float, reserve: int = 0) -> None:
        self.inflight[name] = self.inflight.get(name, 0) + 1
        if reserve:
            self.reserved[name] = self.reserved.get(name, 0) + reserve
        if name in self.requests or self._limits(name).rpm is not None:
            _window(self.requests, name).add(now)

    def finish(self, name: str, tokens: int, now: float, reserved: int = 0) -> None:
        """A request admitted with admit(name, _, reserved) ended having used `tokens`."""
        n = self.inflight.get(name, 0) - 1
        if n > 0:
            self.inflight[name] = n
        else:
            self.inflight.pop(name, None)
        if reserved:
            left = self.reserved.get(name, 0) - reserved
            if left > 0:
                self.reserved[name] = left
            else:
                self.reserved.pop(name, None)
            if tokens > 0:
                mean = self.estimates.get(name)
                self.estimates[name] = (
                    float(tokens) if mean is None else mean + (tokens - mean) * ESTIMATE_WEIGHT)
        if tokens and (name in self.tokens or self._limits(name).tpm is not None):
            _window(self.tokens, name).add(now, tokens)

    def _limits(self, name: str) -> Limits:
        key = self.config.state.keys.by_name.get(name)
        return key.limits if key else Limits()

    def headers(self, name: str, lim: Limits) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* headers, for the limits this key has."""
        return ratelimit_headers(
            lim, self.requests[name].total if name in self.requests else 0,
            self.tokens[name].total if name in self.tokens else 0)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        hdrs = state_of(flow).ratelimit
        if hdrs and flow.response is not None:
            set_fields(flow.response.headers, hdrs)

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def client_disconnected(self, client) -> None:
        # A flow mitmproxy gave up on without a response or error hook (see the Recorder) must not
        # hold its slot and reservation for good: once the hooks still on their way have
        # had a moment, it ends here with what it used.
        if self.counted:
            flows = self.counted.of_client(client.id)
            if flows:
                asyncio.get_running_loop().call_later(ABANDONED_AFTER, self._abandoned, flows)

    def _abandoned(self, flows: list[http.HTTPFlow]) -> None:
        for flow in flows:
            self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        self.counted.pop(flow.id, None)
        st = state_of(flow)
        if st.counted:
            reserved, st.counted, st.reserved = st.reserved, False, 0
            if flow.id in self.remote:
                self.remote.discard(flow.id)
                self._shared_settle(flow, reserved)
                return
            self.finish(st.key, st.total_tokens or 0, self.clock(), reserved)
            counters = self.shared.counters if self.shared is not None else None
            if counters is not None and self._limits(st.key).any():
                # Admitted here while Redis was unreachable ("local"): Redis' day, month
                # and lifetime counters get it once Redis answers.
                self._shared_settle(flow, reserved, local=True)

    # -- counters shared through Redis (docs/shared-state.md) ------------------------------

    async def _shared_admit(self, flow: http.HTTPFlow, name: str, lim: Limits) -> None:
        counters = self.shared.counters
        st = state_of(flow)
        # Not admitted until Redis has counted it: should anything below raise, the
        # pipeline's last stage (stages/failclosed.py) refuses the request.
        st.admitted = False
        reserve = self.reservation(name, lim)
        checks = quota_checks(lim)
        now = self.clock()
        try:
            verdict = await counters.admit(
                name, st.id or flow.id, flow.request.timestamp_start, reserve, lim.rpm,
                lim.tpm, lim.concurrent, [c for _, c in checks])
        except Unavailable:
            if self.shared.failure == "local":
                counters.warn_local()
                if not (flow.response or flow.error or not flow.live):
                    self._admit_or_refuse(flow, name, lim)
                return
            st.admitted, st.channel, st.upstream_model = False, None, None
            if not (flow.response or flow.error or not flow.live):
                refuse(flow, "gateway_unavailable",
                       "The gateway cannot reach its shared counters; retry shortly.",
                       retry_after="1")
            return
        if verdict.kind != ADMITTED:
            prices = getattr(self.config.state.settings, "prices", None)
            code, message, wait = refusal(verdict, checks, lim, now,
                                          getattr(prices, "currency", ""))
            st.admitted, st.channel, st.upstream_model = False, None, None
            if not (flow.response or flow.error or not flow.live):
                headers = {"retry_after": retry_after(wait)} if wait is not None else {}
                refuse(flow, code, message, **headers)
            return
        st.counted, st.reserved, st.admitted = True, reserve, True
        self.remote.add(flow.id)
        self.counted[flow.id] = flow
        if flow.error or not flow.live:
            self._end(flow)  # the client left while Redis answered: released at once
            return
        st.ratelimit = ratelimit_headers(lim, verdict.rpm_used, verdict.tpm_used)

    def _shared_settle(self, flow: http.HTTPFlow, reserved: int, local: bool = False) -> None:
        st = state_of(flow)
        name = st.key
        tokens = (st.prompt_tokens + st.completion_tokens if st.total_tokens is None
                  else st.total_tokens) or 0
        if reserved and tokens > 0 and not local:
            mean = self.estimates.get(name)
            self.estimates[name] = (
                float(tokens) if mean is None else mean + (tokens - mean) * ESTIMATE_WEIGHT)
        counters = self.shared.counters
        if counters is None:  # stopped, or redis_url taken out: nothing to settle with
            return
        cost = getattr(st, "cost", None)
        counters.settle(
            name, st.id or flow.id, flow.request.timestamp_start, tokens,
            self._limits(name).tpm is not None,
            {"c": str(cost)} if cost is not None else None, local=local,
            in_rpm=local and self._limits(name).rpm is not None)
