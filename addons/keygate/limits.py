"""The `Limits` addon: per-key rate limits and quotas (SPEC 7).

Counters count requests keygate forwards: the check runs after the router has admitted a
request, and a refusal takes the admission back. Rolling windows (rpm, tpm) live here in
memory; day and lifetime quotas come from the usage ledger, which is rebuilt from the log,
so they survive restarts. Everything a check touches is per key: O(1) in the number of keys.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable

from mitmproxy import http

from .configuration import Config
from .errors import refuse
from .headerfields import set_fields
from .keys import Limits as KeyLimits
from .usage import Usage

WINDOW = 60.0


class RollingWindow:
    """Amounts added at moments in time; the total over the last WINDOW seconds."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: int = 1) -> None:
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


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Limits:
    def __init__(self, config: Config, usage: Usage, clock=time.time) -> None:
        self.config = config
        self.usage = usage
        self.clock = clock
        self.requests: dict[str, RollingWindow] = {}
        self.tokens: dict[str, RollingWindow] = {}
        self.inflight: dict[str, int] = {}

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return
        if not flow.metadata.get("keygate.admitted") or flow.metadata.get("keygate.counted"):
            return
        name = flow.metadata.get("keygate.key")
        key = self.config.state.keys.by_name.get(name)
        if key is None:
            return
        lim = key.limits
        ready = getattr(self.usage, "ready", None)
        if ready is not None and not ready.is_set() and (
                lim.requests_per_day is not None or lim.tokens_per_day is not None
                or lim.tokens_total is not None):
            # Quotas need the counters rebuilt from the log: this key waits for them
            # (only at start-up; keys without quotas are served meanwhile).
            return self._after_ready(flow, ready)
        self._admit_or_refuse(flow, name, lim)

    async def _after_ready(self, flow: http.HTTPFlow, ready) -> None:
        await ready.wait()
        if flow.response or flow.error or not flow.live:
            return
        name = flow.metadata.get("keygate.key")
        key = self.config.state.keys.by_name.get(name)
        if key is not None:
            self._admit_or_refuse(flow, name, key.limits)

    def _admit_or_refuse(self, flow: http.HTTPFlow, name: str, lim: KeyLimits) -> None:
        verdict = self.check(name, lim, self.clock())
        if verdict is not None:
            code, message, wait = verdict
            # Not forwarded after all: it must not look routed in the log.
            for k in ("keygate.admitted", "keygate.channel", "keygate.upstream_model"):
                flow.metadata.pop(k, None)
            headers = {"retry_after": retry_after(wait)} if wait is not None else {}
            refuse(flow, code, message, **headers)
            return
        self.admit(name, self.clock())
        flow.metadata["keygate.counted"] = True
        flow.metadata["keygate.ratelimit"] = self.headers(name, lim)

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Streamed uploads are admitted at headers time; count them all the same.
        if flow.request.stream and flow.metadata.get("keygate.admitted"):
            return self.request(flow)
        return None

    def check(self, name: str, lim: KeyLimits, now: float) -> tuple[str, str, float | None] | None:
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
        if lim.tpm is not None:
            w = _window(self.tokens, name)
            w.expire(now)
            if w.total >= lim.tpm:
                return ("rate_limit_exceeded",
                        f"Rate limit reached: {lim.tpm} tokens per minute.",
                        w.wait_below(lim.tpm, now))
        ledger = self.usage.ledger
        if lim.requests_per_day is not None or lim.tokens_per_day is not None:
            day = utc_day(now)
            if lim.requests_per_day is not None and (
                    ledger.requests_on(name, day) + self.inflight.get(name, 0)
                    >= lim.requests_per_day):
                return ("insufficient_quota",
                        f"Daily request quota used up ({lim.requests_per_day} per UTC day).",
                        seconds_to_utc_midnight(now))
            if lim.tokens_per_day is not None and ledger.tokens_on(name, day) >= lim.tokens_per_day:
                return ("insufficient_quota",
                        f"Daily token quota used up ({lim.tokens_per_day} per UTC day).",
                        seconds_to_utc_midnight(now))
        if lim.tokens_total is not None and ledger.tokens_total(name) >= lim.tokens_total:
            return ("insufficient_quota",
                    f"Token quota used up ({lim.tokens_total} tokens in total).", None)
        return None

    def admit(self, name: str, now: float) -> None:
        self.inflight[name] = self.inflight.get(name, 0) + 1
        if name in self.requests or self._limits(name).rpm is not None:
            _window(self.requests, name).add(now)

    def finish(self, name: str, tokens: int, now: float) -> None:
        n = self.inflight.get(name, 0) - 1
        if n > 0:
            self.inflight[name] = n
        else:
            self.inflight.pop(name, None)
        if tokens and (name in self.tokens or self._limits(name).tpm is not None):
            _window(self.tokens, name).add(now, tokens)

    def _limits(self, name: str) -> KeyLimits:
        key = self.config.state.keys.by_name.get(name)
        return key.limits if key else KeyLimits()

    def headers(self, name: str, lim: KeyLimits) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* headers, for the limits this key has."""
        out = {}
        if lim.rpm is not None:
            used = self.requests[name].total if name in self.requests else 0
            out["x-ratelimit-limit-requests"] = str(lim.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, lim.rpm - used))
        if lim.tpm is not None:
            used = self.tokens[name].total if name in self.tokens else 0
            out["x-ratelimit-limit-tokens"] = str(lim.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, lim.tpm - used))
        return out

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        hdrs = flow.metadata.get("keygate.ratelimit")
        if hdrs and flow.response is not None:
            set_fields(flow.response.headers, hdrs)

    def response(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.pop("keygate.counted", None):
            self.finish(flow.metadata["keygate.key"],
                        flow.metadata.get("keygate.total_tokens", 0), self.clock())
