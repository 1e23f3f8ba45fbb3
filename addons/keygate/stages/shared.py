"""The `Shared` addon: the connection to Redis that the Limiter counts through when
`[gateway] redis_url` is set (docs/shared-state.md; the counting itself:
keygate/accounting/shared.py).

Start-up: the URL is tried once, synchronously, before keygate serves. A wrong password or
a server that is not Redis stops mitmdump with that error (fail closed, as a bad file
does); a Redis that does not answer yet is not an error of the configuration: keygate
starts, applies redis_failure, and connects when Redis answers. Reload: a new URL is
tried off the event loop, and replaces the old connection only if it answers as Redis;
otherwise the error is logged and the last good URL stays in force.

Each finished request's record also adds to the hourly totals in Redis (`observe`), which
`/keygate/usage` and the dashboard read on every instance (`shared_hourly`;
docs/shared-state.md#usage-totals-of-every-instance).

Counters that Redis lost (the marker key is gone) are rebuilt from the usage logs at
start-up and whenever Redis answers again (keygate/accounting/restore.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from mitmproxy import exceptions

from keygate.accounting import shared as sc
from keygate.accounting.shared import MARKER, Check, SharedCounters, check_url
from keygate.model.prices import money_text
from keygate.stages.config import Config

log = logging.getLogger("keygate")

WATCH_S = 1.0  # how often the configured URL and the marker are looked at
CLOSE_WAIT_S = 9.0  # at a stop: the Recorder's drain (8 s), and a moment to settle


class Shared:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters: SharedCounters | None = None
        self.failure = "closed"
        self._url = ""  # the URL of `counters` (never logged)
        self._tried: str | None = None  # a reload URL that failed, not tried again
        self._task: asyncio.Task | None = None
        self._restoring: asyncio.Task | None = None
        self._was_reachable = True
        self._marker_seen = False  # the marker was in Redis at the last look
        self._answered = True  # Redis answered the check at start-up

    @property
    def reachable(self) -> bool:
        """Whether Redis answers (True without redis_url: nothing to reach)."""
        return self.counters is None or self.counters.reachable

    def observe(self, record: dict, flow=None) -> None:
        """Each finished request's record (a Recorder observer): its hourly increments."""
        if self.counters is not None:
            self.counters.add_record(record)

    def configure(self, updated: set[str]) -> None:
        if self.config.state is None or self.counters is not None or self._task is not None:
            return
        s = self.config.state.settings
        self.failure = s.redis_failure
        if not s.redis_url:
            return
        problem = check_url(s.redis_url)
        if problem is not None and not problem.startswith("unreachable"):
            raise exceptions.OptionsError(f"keygate: redis_url: {problem}")
        if problem is not None:
            log.warning("keygate: Redis %s; starting with redis_failure = %r until it answers",
                        problem, s.redis_failure)
        self._url = s.redis_url
        self.counters = SharedCounters(s.redis_url)
        self._answered = problem is None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.counters is not None:
            self.counters.start(self._answered)
            if self._answered:
                self._restore_if_missing()
        if self._task is None:
            self._task = loop.create_task(self._watch())

    def done(self):
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.counters is not None:
            # A task, not a coroutine: mitmproxy awaits what done returns when it stops,
            # but not on a reload of gateway.py, where the task still closes it.
            try:
                return asyncio.get_running_loop().create_task(self._close(self.counters))
            except RuntimeError:  # no event loop (a test calling done directly)
                self.counters = None
        return None

    async def _close(self, counters: SharedCounters) -> None:
        """Close once the requests admitted through Redis have settled (they drain with the
        Recorder's DRAIN_SECONDS): a request that ended after would hold its slot and its
        reservation in Redis until its lease ran out."""
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_S
        while counters.leases and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await counters.close()
        if self.counters is counters:
            self.counters = None

    def _restore_if_missing(self) -> None:
        """Rebuild Redis' counters from the logs if it has none (its marker is gone),
        keeping what it counted since it was found so (accounting/restore.py)."""
        if self._restoring is not None and not self._restoring.done():
            return
        from keygate.accounting.restore import base_log
        from keygate.model.settings import instance_name

        s = self.config.state.settings
        url, usage_log = self._url, base_log(s.usage_log, instance_name(s.instance))
        self._restoring = asyncio.get_running_loop().create_task(
            self._restore(url, usage_log))

    async def _restore(self, url: str, usage_log) -> None:
        def work():
            import redis

            from keygate.accounting.restore import restore

            client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=2)
            try:
                return restore(client, usage_log, only_if_missing=True)
            finally:
                client.close()

        try:
            n = await asyncio.to_thread(work)
        except Exception as e:
            log.warning("keygate: could not check or rebuild Redis' counters from the usage "
                        "logs: %s", type(e).__name__)
            return
        # The marker is there now (found, set by this rebuild, or about to be by the
        # process at it): a flush from here on is noticed at the next look, also one in
        # the first second after start-up, before any look had seen the marker.
        self._marker_seen = True
        if n:
            log.warning("keygate: Redis had no keygate counters: day, month and lifetime "
                        "counters of %d keys rebuilt from the usage logs", n)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            state = self.config.state
            if state is None:
                continue
            s = state.settings
            self.failure = s.redis_failure
            counters = self.counters
            if counters is not None:
                if counters.reachable and not self._was_reachable:
                    self._restore_if_missing()  # it may have come back empty
                elif counters.reachable:
                    await self._look_for_marker(counters)
                self._was_reachable = counters.reachable
            if s.redis_url == self._url or s.redis_url == self._tried:
                continue
            await self._switch(s.redis_url)

    async def _look_for_marker(self, counters: SharedCounters) -> None:
        """Redis flushed while it kept answering: the marker is gone. The counters are
        rebuilt from the logs, keeping what Redis counted since; the requests of the moment
        between the flush and this look (WATCH_S at most) may count twice, never not at
        all."""
        try:
            kept = await asyncio.wait_for(counters.redis.exists(MARKER), WATCH_S)
        except Exception:
            return  # (a call of the Limiter's finds out and says so)
        if kept:
            self._marker_seen = True
        elif self._marker_seen and (self._restoring is None or self._restoring.done()):
            self._restore_if_missing()
            self._marker_seen = False

    async def _switch(self, url: str) -> None:
        if url:
            problem = await asyncio.to_thread(check_url, url)
            if problem is not None:
                self._tried = url
                log.error("keygate: redis_url: %s; keeping the last good Redis connection",
                          problem)
                return
        old, self._url, self._tried = self.counters, url, None
        self.counters = None
        if url:
            self.counters = SharedCounters(url)
            self.counters.start()
            log.info("keygate: limits are now shared through the Redis of the new redis_url")
            self._restore_if_missing()
        else:
            log.info("keygate: redis_url removed: limits are counted by this process alone")
        if old is not None:
            await old.close()


# --------------------------------------------------------------------------- usage totals


async def shared_hourly(shared: Shared | None, local, start: dt.datetime, end: dt.datetime,
                        quotas: dict | None = None, now: dt.datetime | None = None):
    """(the hourly totals `/keygate/usage` answers from, what the answer adds about them):
    with redis_url, every instance's, read from Redis for the hours start <= h < end
    ({"shared": True}); if Redis does not answer, this process's own `local` totals
    ({"partial": True}); without redis_url, `local` ({}). With Redis, the "used" of
    `quotas` ({key: {quota: {"used", "limit"}}}, pages.all_quotas) become the shared
    counters' (the ones the limits are held to), read in the same round trip."""
    from keygate.accounting.shared import Unavailable, hourly_from, key_base

    counters = shared.counters if shared is not None else None
    if counters is None:
        return local, {}
    hours = []
    t = start
    while t < end:
        hours.append(t.strftime("%Y-%m-%dT%H"))
        t += dt.timedelta(hours=1)
    names = [name for name, q in (quotas or {}).items() if q]
    now = now or dt.datetime.now(dt.timezone.utc)
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    more = [key_base(name) + p for name in names for p in (f"d:{day}", f"m:{month}", "all")]
    try:
        replies = await counters.read_hours(hours, more)
    except Unavailable as e:
        log.warning("keygate: /keygate/usage: Redis did not answer (%s); this process's "
                    "own totals are shown, marked partial", e)
        return local, {"partial": True}
    periods = replies[len(hours):]
    for i, name in enumerate(names):
        for quota, q in quotas[name].items():
            where = _QUOTA_PLACE.get(quota)
            if where is not None:
                v = periods[3 * i + where[0]].get(where[1].encode())
                q["used"] = (round(float(v or 0), 9) if where[1] == "c" else int(v or 0))
    return await asyncio.to_thread(hourly_from, hours, replies[:len(hours)]), {"shared": True}


# --------------------------------------------------------------------------- the Limiter's part

# The quotas ADMIT checks, in the Limiter's order (docs/limits.md#quotas): (limit, period:
# 0 day, 1 month, 2 lifetime; field; whether reservations in flight count against it).
# A limit a Limits has no attribute for is skipped. Each is one of limiter.QUOTAS.
QUOTAS = (
    ("requests_per_day", 0, "r", False),
    ("tokens_per_day", 0, "t", True),
    ("tokens_total", 2, "t", True),
    ("requests_per_month", 1, "r", False),
    ("tokens_per_month", 1, "t", True),
    ("budget_per_day", 0, "c", False),
    ("budget_per_month", 1, "c", False),
    ("budget_total", 2, "c", False),
)
_QUOTA_PLACE = {name: (period, field) for name, period, field, _ in QUOTAS}


def quota_checks(lim) -> list[tuple[str, object]]:
    """[(limit name, Check)] for the quotas `lim` sets, in QUOTAS' order."""
    out = []
    for name, period, field, reserved in QUOTAS:
        value = getattr(lim, name, None)
        if value is not None:
            limit = str(value) if field == "c" else value
            out.append((name, Check(period, field, limit, reserved)))
    return out


def refusal(verdict, checks: list, lim, now: float,
            currency: str = "") -> tuple[str, str, float | None]:
    """(error code, message, Retry-After seconds or None) for a verdict of ADMIT that
    refused: the Limiter's own answers (docs/limits.md), in its words (limiter.QUOTAS)."""
    from keygate.stages import limiter  # (limiter imports this module)

    kind = verdict.kind
    if kind == sc.CONCURRENT:
        return ("rate_limit_exceeded",
                f"Too many requests in flight for this key (limit {lim.concurrent}).", 1.0)
    if kind == sc.RPM:
        return ("rate_limit_exceeded", f"Rate limit reached: {lim.rpm} requests per minute.",
                verdict.wait)
    if kind == sc.TPM:
        return ("rate_limit_exceeded", f"Rate limit reached: {lim.tpm} tokens per minute.",
                verdict.wait)
    quotas = limiter.QUOTAS
    if kind == sc.HELD:  # (only a token quota, whose reservations count, holds)
        if verdict.check == 0:
            held = f"{lim.tpm} tokens per minute"
        else:
            name, check = checks[verdict.check - 1]
            held = quotas[name].held.format(limit=check.limit)
        return ("rate_limit_exceeded",
                f"Token quota nearly used up ({held}) by this key's requests in flight: "
                "retry when they have finished.", 1.0)
    name, check = checks[verdict.check - 1]
    wait = (limiter.seconds_to_utc_midnight(now) if check.period == 0 else
            limiter.seconds_to_next_utc_month(now) if check.period == 1 else None)
    limit = getattr(lim, name, None)
    if limit is None:
        limit = check.limit
    elif check.field == "c":
        limit = money_text(limit)
    return ("insufficient_quota", quotas[name].message.format(limit=limit, currency=currency),
            wait)
