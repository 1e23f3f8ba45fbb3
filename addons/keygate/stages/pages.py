"""The `Pages` stage: keygate's own endpoints other than /metrics
(docs/endpoints.md#keygates-own-endpoints), answered here and never forwarded.

- `GET /keygate/health/live`, `/keygate/health/ready` (no key): whether the process
  serves; whether it is ready (configuration loaded, usage log writable, and whatever
  else registered a check in `checks`: shared state, when configured). 503 names the
  checks that fail, and nothing else is in either answer.
- `GET /keygate/dashboard` (no key: the page holds no data) and `GET /keygate/usage`
  (`admin`): the usage page and its data, from the hourly totals kept here
  (keygate/accounting/hourly.py), built from the log at start-up and fed each finished
  request's record by the Recorder.
- `GET /keygate/me` and the legacy `GET /v1/dashboard/billing/subscription` and
  `/v1/dashboard/billing/usage` (any valid key): the calling key's own settings and use,
  never another key's.

Policy has checked the scope before this stage runs; what reaches it unanswered is a
request for one of these endpoints that may have its answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from mitmproxy import http

from keygate import pages
from keygate.accounting import hourcache
from keygate.accounting.hourly import Hourly
from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.request import state_of

log = logging.getLogger("keygate")

UTC = dt.timezone.utc
LOAD_WAIT = 20.0  # seconds a usage query waits for the hourly totals at start-up
JSON = "application/json; charset=utf-8"
UNLIMITED = 100_000_000  # the legacy billing shape's "no limit" (what One API answers)
BILLING_MAX_DAYS = 100  # OpenAI's own bound for /v1/dashboard/billing/usage


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> http.Response:
    body = json.dumps(doc, separators=(",", ":"), default=_default).encode()
    return http.Response.make(status, body, {"content-type": JSON, "cache-control": "no-store",
                                             **(headers or {})})


def _default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    raise TypeError(type(v).__name__)


class Pages:
    def __init__(self, config, recorder, router, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.recorder = recorder
        self.router = router
        self.clock = clock
        self._page: tuple[bytes, str] | None = None  # the usage page and its CSP
        self._folder_ok: tuple[float, object, bool] | None = None  # (when, folder, verdict)
        self.hourly = Hourly()
        self.loaded = asyncio.Event()
        # While the totals are built from the log: the records that ended meanwhile (the
        # reader skips their lines, they are added once it is done).
        self._live: list[dict] | None = []
        self._live_ids: set = set()
        self._loading: asyncio.Task | None = None
        # The cache of the log's hours is used at start-up only if written before this
        # process could write lines of the records it observes (docs/usage-log.md#the-hour-cache).
        self._started_ns = time.time_ns()
        # Readiness checks beyond config and the usage log: name -> "is it fine?". A stage
        # that keygate needs to serve (shared state, when configured) adds its own.
        self.checks: dict[str, Callable[[], bool]] = {}
        # With redis_url: the Shared stage, whose Redis holds every instance's hourly
        # totals (docs/shared-state.md#usage-totals-of-every-instance).
        self.shared = None

    # ---- the hourly totals

    def observe(self, record: dict, flow: http.HTTPFlow | None = None) -> None:
        """Each finished request's record (the Recorder calls it before the line is
        written)."""
        live = self._live
        if live is not None:
            live.append(record)
            self._live_ids.add(record.get("id"))
        else:
            self.hourly.add(record)

    def running(self) -> None:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load())

    def done(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()

    async def _load(self) -> None:
        # After the ledger, which quotas need first: one read of the log at a time.
        ready = getattr(self.recorder, "ready", None)
        if ready is not None:
            await ready.wait()
        path = self.config.state.settings.usage_log
        t0 = time.monotonic()
        hourly = Hourly()
        # From the cache of the log's hours and the lines it does not cover; the records
        # that ended meanwhile (in _live) are added unless their lines were read (`seen`).
        cache = hourcache.HourCache(path)
        seen: set = set()
        try:
            await asyncio.to_thread(cache.load_hourly, hourly, self._live_ids, seen,
                                    self._started_ns)
        except Exception:
            log.exception("keygate: could not read %s for the usage page; it shows what "
                          "ended since the start", path)
            hourly, seen = Hourly(), set()
        for record in self._live or ():
            if record.get("id") not in seen:
                hourly.add(record)
        self.hourly, self._live, self._live_ids = hourly, None, set()
        self.loaded.set()
        log.info("keygate: usage totals for the dashboard read from %s in %.2f s", path,
                 time.monotonic() - t0)
        await self._keep_cache(cache)

    async def _keep_cache(self, cache: hourcache.HourCache) -> None:
        """Bring the cache of the log's hours up to date every hourcache.INTERVAL s, in a
        thread, so `keygate usage` and the next start-up read only the newest lines."""
        while True:
            await asyncio.sleep(hourcache.INTERVAL)
            path = self.config.state.settings.usage_log
            if path != cache.log_path:
                cache = hourcache.HourCache(path)
            try:
                await asyncio.to_thread(cache.refresh)
            except Exception as e:
                log.warning("keygate: cannot bring %s up to date: %s", cache.sidecar, e)

    # ---- answers

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return None
        ep = endpoints.classify_request(flow)
        if ep is None or not ep.own:
            return None
        kind = ep.kind
        if kind == "health":
            self._health(flow, ep.path.endswith("/ready"))
        elif kind == "page":
            if self._page is None:  # (built once: anyone may ask for it, without a key)
                page, policy = pages.page_html()
                self._page = (page.encode(), policy)
            page, policy = self._page
            flow.response = http.Response.make(200, page, {
                "content-type": "text/html; charset=utf-8",
                "content-security-policy": policy, **pages.SECURITY_HEADERS})
        elif kind == "usage":
            return self._usage(flow)
        elif kind == "me":
            self._me(flow)
        elif kind == "billing":
            return self._billing(flow, ep.path.endswith("/usage"))
        return None

    def _health(self, flow: http.HTTPFlow, ready: bool) -> None:
        if not ready:
            flow.response = _json(200, {"status": "live"})
            return
        failed = [name for name, ok in self._checks() if not ok]
        if failed:
            state_of(flow).error = "gateway_unavailable"
            flow.response = _json(503, {"status": "unavailable", "failed": failed},
                                  {"x-keygate-error": "gateway_unavailable"})
        else:
            flow.response = _json(200, {"status": "ready"})

    def _checks(self) -> list[tuple[str, bool]]:
        out = [("config", self.config.state is not None), ("usage_log", self._log_writable())]
        for name, check in list(self.checks.items()):
            try:
                ok = bool(check())
            except Exception:
                ok = False
            out.append((name, ok))
        return out

    def _log_writable(self) -> bool:
        """The writer is open (the counters are rebuilt), its last write did not fail, and
        its folder still takes new files (a rotation makes one)."""
        writer = self.recorder.writer
        if writer is None or writer.failing or self.config.state is None:
            return False
        folder = self.config.state.settings.usage_log.parent
        now = time.monotonic()
        known = self._folder_ok
        if known is not None and known[1] == folder and now - known[0] < 1.0:
            return known[2]  # (file-system calls once a second, whoever polls ready)
        probe = folder
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent  # (made at the first write)
        ok = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
        self._folder_ok = (now, folder, ok)
        return ok

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), UTC)

    async def _usage(self, flow: http.HTTPFlow) -> None:
        q = flow.request.query
        now = self._now()
        try:
            for name in q.keys():
                if name not in ("since", "until", "by"):
                    raise pages.BadQuery(f"unknown parameter {name[:40]!r}: the query takes "
                                         "since, until and by")
            start, end, by = pages.parse_period(q.get("since"), q.get("until"), q.get("by"),
                                                now)
        except pages.BadQuery as e:
            refuse(flow, "invalid_request", str(e))
            return
        if not self.loaded.is_set():
            try:
                await asyncio.wait_for(self.loaded.wait(), LOAD_WAIT)
            except asyncio.TimeoutError:
                refuse(flow, "gateway_unavailable",
                       "The usage totals are still being read from the log: try again soon.")
                return
        if flow.response or flow.error or not flow.live:
            return
        state = self.config.state
        quotas = pages.all_quotas(state.keys, self.recorder.ledger, self.hourly, now)
        from keygate.stages.shared import shared_hourly

        hourly, note = await shared_hourly(self.shared, self.hourly, start, end, quotas, now)
        if flow.response or flow.error or not flow.live:
            return
        # Summing a month of hours takes a moment: in a thread, so the proxy goes on meanwhile
        # (the totals are safe to read from there; the ledger was read above).
        doc = await asyncio.to_thread(
            pages.usage_answer, hourly, start, end, by, keys=state.keys,
            channels=self.channel_health(), currency=_currency(state.settings), now=now,
            quotas=quotas)
        if flow.response or flow.error or not flow.live:
            return
        doc.update(note)
        flow.response = _json(200, doc)

    def channel_health(self) -> list[dict]:
        health = self.router.health
        now = health.clock()
        out = []
        for ch in self.config.state.settings.channels:
            until = health.until.get(ch.name, 0.0)
            out.append({"name": ch.name, "kind": ch.kind,
                        "state": "cooling" if until > now else "up",
                        "cooling_for_s": round(max(0.0, until - now), 1)})
        return out

    def _key(self, flow: http.HTTPFlow):
        return self.config.state.keys.by_name.get(state_of(flow).key)

    def _me(self, flow: http.HTTPFlow) -> None:
        key = self._key(flow)
        if key is None:
            refuse(flow, "invalid_api_key", "Invalid API key.")
            return
        now = self._now()
        ledger = self.recorder.ledger
        day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
        money = self._money(key)
        quotas = pages.quota_use(key, ledger, self.hourly, now)
        today_cost = pages.used_of("budget_per_day", key.name, ledger, self.hourly, now)
        month_cost = pages.used_of("budget_per_month", key.name, ledger, self.hourly, now)
        total_cost = pages.used_of("budget_total", key.name, ledger, self.hourly, now)
        doc = {
            "key": key.name,
            "models": list(key.models) if key.models is not None else None,
            "scopes": sorted(key.scopes),
            "expires_at": key.expires_at.isoformat().replace("+00:00", "Z")
            if key.expires_at else None,
            "limits": pages.limits_dict(key.limits),
            "usage": {
                "today": {"day": day, "requests": ledger.requests_on(key.name, day),
                          "tokens": ledger.tokens_on(key.name, day),
                          "cost": today_cost if money else None},
                "month": {"month": month, "requests": ledger.requests_in_month(key.name, month),
                          "tokens": ledger.tokens_in_month(key.name, month),
                          "cost": month_cost if money else None},
                "total": {"tokens": ledger.tokens_total(key.name),
                          "cost": total_cost if money else None},
            },
            "remaining": {name: _remaining(q["limit"], q["used"]) for name, q in quotas.items()},
            "currency": _currency(self.config.state.settings) if money else None,
        }
        flow.response = _json(200, doc)

    def _money(self, key) -> bool:
        """Whether a key's use is shown in money: it has a budget, or prices are set."""
        lim = key.limits
        if any(getattr(lim, n, None) is not None
               for n in ("budget_per_day", "budget_per_month", "budget_total")):
            return True
        prices = getattr(self.config.state.settings, "prices", None)
        return bool(getattr(prices, "entries", ()))

    def _billing(self, flow: http.HTTPFlow, usage: bool) -> Awaitable[None] | None:
        """OpenAI's legacy billing endpoints, which chat front-ends read to show a balance.
        Amounts are money in [gateway] currency where the key's use is priced
        (`_money`), else tokens (docs/endpoints.md#billing)."""
        key = self._key(flow)
        if key is None:
            refuse(flow, "invalid_api_key", "Invalid API key.")
            return
        money = self._money(key)
        now = self._now()
        if not usage:
            limit = _hard_limit(key.limits, money)
            until = int(key.expires_at.timestamp()) if key.expires_at else 0
            flow.response = _json(200, {
                "object": "billing_subscription",
                "has_payment_method": True,
                "canceled": False,
                "canceled_at": None,
                "delinquent": None,
                "access_until": until,
                "soft_limit": int(limit * 100),
                "hard_limit": int(limit * 100),
                "system_hard_limit": int(limit * 100),
                "soft_limit_usd": limit,
                "hard_limit_usd": limit,
                "system_hard_limit_usd": limit,
                "plan": {"title": "keygate", "id": "keygate"},
                "primary": True,
                "account_name": key.name,
                "po_number": None,
                "billing_email": None,
                "tax_ids": None,
                "billing_address": None,
                "business_address": None,
                "keygate_unit": _currency(self.config.state.settings) if money else "tokens",
            })
            return
        q = flow.request.query
        try:
            start = dt.date.fromisoformat(q.get("start_date") or now.strftime("%Y-%m-01"))
            end = dt.date.fromisoformat(q.get("end_date")
                                        or (now.date() + dt.timedelta(days=1)).isoformat())
        except ValueError:
            refuse(flow, "invalid_request",
                   "start_date and end_date must be dates like 2026-12-01.")
            return
        if end <= start:
            refuse(flow, "invalid_request", "end_date must be after start_date.")
            return
        if (end - start).days > BILLING_MAX_DAYS:
            refuse(flow, "invalid_request",
                   f"Usage can be asked for at most {BILLING_MAX_DAYS} days at a time.")
            return
        return self._billing_usage(flow, key.name, money, start, end)

    async def _billing_usage(self, flow: http.HTTPFlow, name: str, money: bool,
                             start: dt.date, end: dt.date) -> None:
        # Any key may ask, up to BILLING_MAX_DAYS: looking through every group of those
        # hours is done in a thread (as for /keygate/usage), not in the proxy's loop.
        days = await asyncio.to_thread(self.hourly.key_totals, name, start.isoformat() + "T00",
                                       end.isoformat() + "T00")
        if flow.response or flow.error or not flow.live:
            return
        daily = []
        grand = Decimal(0)
        for day in sorted(days):
            items = []
            for model, (_req, tokens, cost) in sorted(days[day].items()):
                amount = (cost or Decimal(0)) if money else Decimal(tokens)
                if not amount:
                    continue  # (keygate's own answers, refusals: no model, nothing used)
                grand += amount
                items.append({"name": model, "cost": float(amount * 100)})
            ts = int(dt.datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())
            daily.append({"timestamp": float(ts), "line_items": items})
        flow.response = _json(200, {
            "object": "list", "daily_costs": daily, "total_usage": float(grand * 100),
            "keygate_unit": _currency(self.config.state.settings) if money else "tokens",
        })


def _currency(settings) -> str | None:
    prices = getattr(settings, "prices", None)
    return getattr(prices, "currency", None)


def _remaining(limit, used):
    if used is None:
        return None
    left = limit - used
    return max(0, left) if isinstance(left, int) else max(0.0, round(left, 9))


def _hard_limit(limits, money: bool) -> float:
    """The key's spending limit in the legacy shape: its largest-scope budget (money) or
    token quota (tokens); UNLIMITED when it has none."""
    names = (("budget_total", "budget_per_month", "budget_per_day") if money
             else ("tokens_total", "tokens_per_month", "tokens_per_day"))
    for name in names:
        v = getattr(limits, name, None)
        if v is not None:
            return float(v)
    return float(UNLIMITED)
