"""keygate's usage page and what it shows (docs/endpoints.md#keygates-own-endpoints).

The page (dashboard.html, dashboard.css, dashboard.js beside this file) is one HTML
document with its style and script inline, and a Content-Security-Policy that allows
exactly those two (by their sha256) and requests to keygate itself: nothing from
anywhere else, so it works on a machine without internet. The page holds no data: it
asks for an admin key, keeps it in the tab's sessionStorage, and fetches
`/keygate/usage` with it in the Authorization header. `keygate usage --html FILE` writes
the same page with the data embedded instead (`page_html(data)`).

`usage_answer` builds that data, for the stage (keygate/stages/pages.py) and the command
(keygate/cli/usage.py) alike, from the hourly totals (keygate/accounting/hourly.py).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import json
from importlib import resources
from typing import Any

from keygate.accounting.hourly import Hourly, row_dicts
from keygate.accounting.totals import COUNTERS, GROUPS, canonical, parse_by, total
from keygate.times import parse_when

UTC = dt.timezone.utc
MAX_SPAN = dt.timedelta(days=366)  # the longest period a query may ask for
DAILY_STEPS_AFTER = dt.timedelta(days=31)  # longer periods: requests per day, not per hour
QUOTA_ORDER = ("requests_per_day", "tokens_per_day", "budget_per_day", "requests_per_month",
               "tokens_per_month", "budget_per_month", "tokens_total", "budget_total")


class BadQuery(ValueError):
    """A query keygate refuses with 400 invalid_request; the message says why."""


# --------------------------------------------------------------------------- the period


def hour_floor(t: dt.datetime) -> dt.datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_ceil(t: dt.datetime) -> dt.datetime:
    f = hour_floor(t)
    return f if f == t else f + dt.timedelta(hours=1)


def hour_name(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H")


def parse_period(since: str | None, until: str | None, by: str | None,
                 now: dt.datetime) -> tuple[dt.datetime, dt.datetime, tuple[str, ...]]:
    """The query's whole hours [since, until) and groups, or BadQuery. `since` and `until`
    are what `keygate usage` takes (a duration back from now, or an ISO 8601 date or
    datetime, UTC when it has no zone); they are widened to whole hours, the totals'
    resolution: since down, until up. Defaults: until now, since 24 h before until."""
    try:
        end = parse_when(until, now) if until else now
        start = parse_when(since, now) if since else end - dt.timedelta(hours=24)
    except ValueError as e:
        raise BadQuery(f"since/until: {e}") from None
    if start > end:
        raise BadQuery("since is after until")
    start, end = hour_floor(start), hour_ceil(end)
    if end == start:
        end = start + dt.timedelta(hours=1)
    if end - start > MAX_SPAN:
        raise BadQuery(f"the period is longer than {MAX_SPAN.days} days: ask for less")
    try:
        groups = parse_by([by or ""])
    except ValueError as e:
        raise BadQuery(f"by: {e}") from None
    return start, end, groups


# --------------------------------------------------------------------------- the answer


def limits_dict(limits: Any) -> dict[str, Any]:
    """A key's limits that are set, as JSON numbers (budgets: decimal strings kept exact
    would be awkward for the page; they are small money amounts)."""
    out = {}
    for f in dataclasses.fields(limits):
        v = getattr(limits, f.name)
        if v is not None:
            out[f.name] = v if isinstance(v, int) else float(v)
    return out


def quota_use(key: Any, ledger: Any, hourly: Hourly | None, now: dt.datetime) -> dict:
    """{quota name: {"used": n, "limit": n}} for the quotas `key` has
    (docs/limits.md#quotas), from the ledger's counters; money from the ledger where it
    keeps it, else from the hourly totals."""
    out: dict[str, dict] = {}
    lim = key.limits
    for name in QUOTA_ORDER:
        limit = getattr(lim, name, None)
        if limit is None:
            continue
        used = used_of(name, key.name, ledger, hourly, now)
        out[name] = {"used": used, "limit": limit if isinstance(limit, int) else float(limit)}
    return out


def used_of(name: str, key: str, ledger: Any, hourly: Hourly | None,
            now: dt.datetime) -> int | float | None:
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    if ledger is not None:
        if name == "requests_per_day":
            return ledger.requests_on(key, day)
        if name == "tokens_per_day":
            return ledger.tokens_on(key, day)
        if name == "requests_per_month":
            return ledger.requests_in_month(key, month)
        if name == "tokens_per_month":
            return ledger.tokens_in_month(key, month)
        if name == "tokens_total":
            return ledger.tokens_total(key)
        # Money: the ledger's own counters where it has them.
        method, arg = {"budget_per_day": ("spent_on", day),
                       "budget_per_month": ("spent_in_month", month),
                       "budget_total": ("spent_total", None)}.get(name, ("", None))
        fn = getattr(ledger, method, None) if method else None
        if fn is not None:
            v = fn(key) if arg is None else fn(key, arg)
            return float(v) if v is not None else 0.0
    if hourly is None:
        return None
    since = {"budget_per_day": day + "T00", "budget_per_month": month + "-01T00"}.get(
        name, hourly.covers_since or "0000")
    until = hour_name(hour_floor(now) + dt.timedelta(hours=1))
    cost = 0.0
    for per_model in hourly.key_totals(key, since, until).values():
        for _r, _t, c in per_model.values():
            if c is not None:
                cost += float(c)
    return round(cost, 9)


def all_quotas(keys: Any, ledger: Any, hourly: Hourly | None, now: dt.datetime) -> dict:
    """{key name: quota_use} for every key of the ring. Reads the ledger: call it where
    the ledger is fed (the event loop), not in another thread."""
    return {name: quota_use(k, ledger, hourly, now) for name, k in keys.by_name.items()}


def usage_answer(hourly: Hourly, start: dt.datetime, end: dt.datetime, by: tuple[str, ...],
                 keys: Any = None, ledger: Any = None, channels: list[dict] | None = None,
                 currency: str | None = None, now: dt.datetime | None = None,
                 quotas: dict | None = None) -> dict:
    """The JSON of `GET /keygate/usage` (docs/endpoints.md#keygate-usage). `quotas`:
    all_quotas() taken beforehand (else they are read here, from `ledger`). Only reads
    `hourly`, which is safe from another thread."""
    now = now or dt.datetime.now(UTC)
    since_h, until_h = hour_name(start), hour_name(end)
    rows = hourly.rows(by, since_h, until_h)
    whole = total(rows)
    per_key = {r.group[0]: r.totals for r in hourly.rows(("key",), since_h, until_h)}
    key_rows = []
    if keys is not None:
        if quotas is None:
            quotas = all_quotas(keys, ledger, hourly, now)
        for name in sorted(keys.by_name):
            k = keys.by_name[name]
            t = per_key.get(name)
            key_rows.append({
                "key": name, "enabled": k.enabled,
                "requests": t.requests if t else 0, "tokens": t.total_tokens if t else 0,
                "errors": t.errors if t else 0,
                "quotas": quotas.get(name, {}),
            })
    step = 24 if end - start > DAILY_STEPS_AFTER else 1
    return {
        "since": canonical(start), "until": canonical(end), "by": list(by),
        "rows": row_dicts(rows, by),
        "total": {c: getattr(whole, c) for c in COUNTERS},
        "complete_since": (hourly.covers_since + ":00:00.000Z") if hourly.covers_since
        else None,
        "step": "day" if step == 24 else "hour",
        "series": hourly.series(since_h, until_h, step),
        "keys": key_rows,
        "channels": channels or [],
        "currency": currency,
        "generated_at": canonical(now),
    }


# --------------------------------------------------------------------------- the page


@functools.lru_cache(maxsize=1)
def _parts() -> tuple[str, str, str]:
    here = resources.files(__package__)
    return tuple((here / name).read_text(encoding="utf-8")
                 for name in ("dashboard.html", "dashboard.css", "dashboard.js"))


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def csp(script: str, style: str, served: bool = True) -> str:
    """The page's Content-Security-Policy: its own inline script and style, requests to
    keygate itself (served) or to nothing (the static file), nothing else at all."""
    parts = ["default-src 'none'", f"script-src {_sha(script)}", f"style-src {_sha(style)}",
             "connect-src 'self'" if served else "connect-src 'none'", "img-src 'none'",
             "base-uri 'none'", "form-action 'none'"]
    if served:
        parts.append("frame-ancestors 'none'")  # (not allowed in a <meta> policy)
    return "; ".join(parts)


def page_html(data: dict | None = None) -> tuple[str, str]:
    """(the page, its Content-Security-Policy). With `data` (usage_answer's), the page
    shows that data and asks for nothing: the static file of `keygate usage --html`."""
    html, style, script = _parts()
    policy = csp(script, style, served=data is None)
    embedded = ""
    meta = ""
    if data is not None:
        text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
        # Inside <script> a "</script" or "<!--" would end or confuse the element: every
        # "<" is written as the JSON escape \u003c (the same string to JSON.parse).
        text = text.replace("<", "\\u003c")
        embedded = f'<script type="application/json" id="keygate-data">{text}</script>'
        meta = f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
    page = (html.replace("<!--META-->", meta).replace("/*STYLE*/", style)
            .replace("/*SCRIPT*/", script).replace("<!--DATA-->", embedded))
    return page, policy


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}

__all__ = ["BadQuery", "GROUPS", "page_html", "parse_period", "usage_answer"]


# --------------------------------------------------------------------------- the file


def write_report(out_path, log_path, since: dt.datetime | None, until: dt.datetime | None,
                 by: tuple[str, ...], config_path=None, now: dt.datetime | None = None) -> int:
    """`keygate usage --html FILE`: the usage page with its data inside, as one file, for
    the period asked (default: the last 7 days). With gateway.toml (`config_path`), the
    keys table lists keys.yaml's keys and their quotas; channels have no live health here.
    Returns the number of garbage lines skipped in the log."""
    from keygate.accounting.hourcache import HourCache
    from keygate.accounting.ledger import Ledger
    from keygate.files import write_atomic

    now = now or dt.datetime.now(UTC)
    end = hour_ceil(until or now)
    start = hour_floor(since or end - dt.timedelta(days=7))
    if start > end:
        raise BadQuery("since is after until")
    if end == start:
        end = start + dt.timedelta(hours=1)
    if end - start > MAX_SPAN:
        raise BadQuery(f"the period is longer than {MAX_SPAN.days} days: ask for less")
    hourly = Hourly(retention_days=max(RETENTION_DAYS_MIN, (now - start).days + 2))
    with HourCache(log_path).survey() as survey:  # the log's hour cache and its new lines
        survey.fill(hourly)
        bad = survey.bad
    keys = ledger = None
    channels: list[dict] = []
    currency = None
    if config_path is not None:
        from keygate.model.keyring import load_keys
        from keygate.model.settings import load_settings

        settings = load_settings(config_path)
        keys = load_keys(settings.keys_file) if settings.keys_file.exists() else None
        ledger = Ledger.load(log_path)
        channels = [{"name": c.name, "kind": c.kind, "state": "unknown", "cooling_for_s": 0}
                    for c in settings.channels]
        currency = getattr(getattr(settings, "prices", None), "currency", None)
    doc = usage_answer(hourly, start, end, by, keys=keys, ledger=ledger, channels=channels,
                       currency=currency, now=now)
    page, _ = page_html(json.loads(json.dumps(doc, default=_plain)))
    write_atomic(out_path, page, 0o644, durable=False)
    return bad


RETENTION_DAYS_MIN = 400


def _plain(v: Any) -> Any:
    from decimal import Decimal

    if isinstance(v, Decimal):
        return float(v)
    raise TypeError(type(v).__name__)
