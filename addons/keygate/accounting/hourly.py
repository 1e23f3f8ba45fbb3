"""Hourly totals of the usage log, in memory: what `/keygate/usage` and the dashboard read
(docs/endpoints.md#keygates-own-endpoints).

Reading a 1,000,000-line log takes seconds, a dashboard query must take milliseconds. So
keygate keeps the log folded into hours: per UTC hour, per (key, model, channel, status,
error), the requests, tokens and cost; and per (hour, channel) a histogram of durations
for percentiles. It is built once from the log at start-up (`load`, in a thread) and kept
current from each finished request's record (`add`). A query sums the hours of its
period, so its cost depends on the number of groups in those hours, never on the log's
length.

Bounds (memory): hours older than `retention_days` are dropped; at most `max_groups`
groups are kept (past that the oldest hours go first, and `covers_since` says from when
the totals are whole); at most `max_models` distinct model names are kept apart, the rest
count under OTHER_MODEL. A duration histogram has at most BUCKETS buckets.

Totals over whole hours equal what `keygate usage` (keygate.accounting.totals) prints for
the same bounds: the same records, the same group values, the same counters.
"""

from __future__ import annotations

import math
import threading
from decimal import Decimal
from typing import Any, Iterable

from keygate.accounting.ledger import REFUSED
from keygate.accounting.totals import COUNTERS, GROUPS, Row, Totals, group_text, record_ts
from keygate.model.prices import MONEY, to_decimal

OTHER_MODEL = "(other)"
MAX_GROUPS = 200_000
MAX_MODELS = 1_000
RETENTION_DAYS = 400
# Durations: bucket i holds [2^(i/4), 2^((i+1)/4)) ms, bucket 0 everything under 1 ms;
# 84 buckets reach ~2 million ms (35 minutes), the last holds everything above. Each bucket
# is ~19 % wide, so a percentile read from one is within ~10 % of the exact value.
STEPS_PER_OCTAVE = 4
BUCKETS = 88


def bucket_of(ms: float) -> int:
    if not ms > 1.0:  # (NaN too)
        return 0
    return min(BUCKETS - 1, 1 + int(math.log2(ms) * STEPS_PER_OCTAVE))


def bucket_value(i: int) -> float:
    """The representative duration (ms) of bucket i: the geometric middle of its bounds."""
    if i == 0:
        return 0.5
    return 2 ** ((i - 0.5) / STEPS_PER_OCTAVE)


def percentile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram {bucket: count}, or None when it is empty."""
    n = sum(hist.values())
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i in sorted(hist):
        seen += hist[i]
        if seen >= rank:
            return round(bucket_value(i), 3)
    return None  # (unreachable)


class Hourly:
    """See the module docstring. Thread-safe: `load` runs in a thread while requests add."""

    def __init__(self, max_groups: int = MAX_GROUPS, max_models: int = MAX_MODELS,
                 retention_days: int = RETENTION_DAYS) -> None:
        self.max_groups = max_groups
        self.max_models = max_models
        self.retention_hours = retention_days * 24
        # hour ("2026-11-27T01") -> {(key, model, channel, status, error):
        #                            [requests, prompt, completion, total, cost or None]}
        self.hours: dict[str, dict[tuple, list]] = {}
        # (hour, channel) -> {bucket: count}: durations of forwarded requests
        self.latency: dict[tuple[str, str | None], dict[int, int]] = {}
        self.models: set[str] = set()
        self.groups = 0
        self.newest = ""
        self.covers_since = ""  # hours before this one were dropped (bounds): not whole
        self.skipped = 0  # records without a readable ts
        # One string object per distinct key, channel and error: every group of every hour
        # holds the same few (a record's own strings are new objects, each ~60 bytes).
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()

    # ---- feeding

    def add(self, record: dict) -> None:
        ts = record_ts(record)
        if ts is None:
            self.skipped += 1
            return
        with self._lock:
            self._add(record, ts[:13])

    def add_all(self, records: Iterable[dict]) -> None:
        for r in records:
            self.add(r)

    def _add(self, r: dict, hour: str) -> None:
        if hour < self.covers_since:
            return
        status = r.get("status")
        group = self._group(group_text(r.get("key")), group_text(r.get("model")),
                            group_text(r.get("channel")),
                            status if type(status) is int else None,
                            group_text(r.get("error")))
        channel, error = group[2], group[4]
        c = self._counter(hour, group)
        if c is None:
            return
        c[0] += 1
        p, q, t = r.get("prompt_tokens"), r.get("completion_tokens"), r.get("total_tokens")
        c[1] += p if type(p) is int else 0
        c[2] += q if type(q) is int else 0
        c[3] += t if type(t) is int else 0
        cost = r.get("cost")
        if cost is not None:
            d = to_decimal(cost)
            if d is not None:
                c[4] = d if c[4] is None else MONEY.add(c[4], d)
        if not (type(error) is str and error in REFUSED):
            ms = r.get("duration_ms")
            if type(ms) in (int, float):
                h = self.latency.get((hour, channel))
                if h is None:
                    h = self.latency[(hour, channel)] = {}
                b = bucket_of(ms)
                h[b] = h.get(b, 0) + 1

    def _group(self, key, model, channel, status, error) -> tuple:
        """A record's group: model names past max_models distinct ones are OTHER_MODEL,
        and each string is the one object kept for it."""
        names = self._names
        if model is not None:
            if model in names:
                model = names[model]
            elif len(self.models) >= self.max_models:
                model = OTHER_MODEL
            else:
                self.models.add(model)
                names[model] = model
        if len(names) < 100_000:  # (key names: bounded by keys.yaml; the rest by few codes)
            error = names.setdefault(error, error) if error is not None else None
            channel = names.setdefault(channel, channel) if channel is not None else None
            key = names.setdefault(key, key) if key is not None else None
        return (key, model, channel, status, error)

    def _counter(self, hour: str, group: tuple) -> list | None:
        """The counters of `group` in `hour`, made if new (the hour too); None if the hour
        is no longer kept (dropped to stay within the bounds)."""
        per_hour = self.hours.get(hour)
        if per_hour is None:
            per_hour = self.hours[hour] = {}
            if hour > self.newest:
                self.newest = hour
                self._expire()
                if hour < self.covers_since:
                    return None
        c = per_hour.get(group)
        if c is None:
            c = per_hour[group] = [0, 0, 0, 0, None]
            self.groups += 1
            if self.groups > self.max_groups:
                self._shrink()
        return c

    def add_hour(self, hour: str, groups: Iterable[tuple[tuple, list]],
                 latency: Iterable[tuple[str | None, dict[int, int]]] = ()) -> None:
        """One hour's totals at once, as `add` of each of their records would add them:
        `groups` of ((key, model, channel, status, error), [requests, prompt, completion,
        total, cost or None]) and (channel, {bucket: count}) histograms of durations. What
        the cache of the log's hours gives at start-up (accounting/hourcache.py)."""
        with self._lock:
            if hour < self.covers_since:
                return
            for values, n in groups:
                c = self._counter(hour, self._group(*values))
                if c is None:
                    return
                c[0] += n[0]
                c[1] += n[1]
                c[2] += n[2]
                c[3] += n[3]
                if n[4] is not None:
                    c[4] = n[4] if c[4] is None else MONEY.add(c[4], n[4])
            if hour < self.covers_since:
                return
            names = self._names
            for channel, hist in latency:
                channel = names.get(channel, channel) if channel is not None else None
                h = self.latency.get((hour, channel))
                if h is None:
                    h = self.latency[(hour, channel)] = {}
                for b, k in hist.items():
                    h[b] = h.get(b, 0) + k

    def _drop_hour(self, hour: str) -> None:
        self.groups -= len(self.hours.pop(hour, {}))
        for lk in [k for k in self.latency if k[0] == hour]:
            del self.latency[lk]

    def _expire(self) -> None:
        """Drop hours past the retention (the newest hour just moved)."""
        horizon = _hour_minus(self.newest, self.retention_hours)
        old = [h for h in self.hours if h < horizon]
        for h in old:
            self._drop_hour(h)
        if horizon > self.covers_since:
            self.covers_since = horizon

    def _shrink(self) -> None:
        """Over max_groups: drop the oldest hours (not the newest, which is being fed)."""
        for h in sorted(self.hours):
            if self.groups <= self.max_groups * 9 // 10 or h == self.newest:
                break
            self._drop_hour(h)
            self.covers_since = _hour_plus(h, 1)

    # ---- reading

    def _groups(self, since: str, until: str) -> Iterable[tuple[str, tuple, list]]:
        """(hour, group, counters) of the hours with since <= hour < until. Safe to run in
        another thread while records are added: the lock is held for one hour's copy at a
        time, so `add` never waits for a whole query."""
        with self._lock:
            hours = sorted(h for h in self.hours if since <= h < until)
        for hour in hours:
            with self._lock:
                per_hour = self.hours.get(hour)
                items = [(g, c[:]) for g, c in per_hour.items()] if per_hour else ()
            for group, c in items:
                yield hour, group, c

    def _latency(self, since: str, until: str) -> list[tuple[str | None, dict[int, int]]]:
        with self._lock:
            return [(ch, dict(h)) for (hour, ch), h in self.latency.items()
                    if since <= hour < until]

    def rows(self, by: tuple[str, ...], since: str, until: str) -> list[Row]:
        """Totals grouped by `by` (of totals.GROUPS) over whole hours since <= h < until
        ("YYYY-MM-DDTHH"), in the order `keygate usage` prints them."""
        index = {"key": 0, "model": 1, "channel": 2}
        acc: dict[tuple, list] = {}
        for hour, g, c in self._groups(since, until):
            out = tuple(hour[:10] if name == "day" else hour[:7] if name == "month"
                        else g[index[name]] for name in by)
            a = acc.get(out)
            if a is None:
                a = acc[out] = [0, 0, 0, 0, 0, None]
            a[0] += c[0]
            a[1] += c[1]
            a[2] += c[2]
            a[3] += c[3]
            if g[4] is not None:
                a[4] += c[0]
            if c[4] is not None:
                a[5] = c[4] if a[5] is None else MONEY.add(a[5], c[4])
        if not by and not acc:
            acc[()] = [0, 0, 0, 0, 0, None]
        order = sorted(acc, key=lambda g: tuple((v is not None, v or "") for v in g))
        return [Row(g, Totals(*acc[g])) for g in order]

    def series(self, since: str, until: str, step_hours: int = 1) -> dict[str, Any]:
        """What the dashboard draws, over whole hours since <= h < until:

        - "tokens_by_day": {"key": {day: {key: tokens}}, "model": {day: {model: tokens}}}
        - "requests": [{"t": hour or day, "requests": n, "errors": {code: n}}] per step
          (an hour; a day when step_hours is 24), every step of the period present
        - "latency": {channel or "-": {"p50": ms, "p95": ms, "requests": n}}
        - "cost": total cost of the period as a string, or None when no line had one
        """
        by_key: dict[str, dict[str, int]] = {}
        by_model: dict[str, dict[str, int]] = {}
        steps: dict[str, list] = {}
        cost: Decimal | None = None
        hists: dict[str, dict[int, int]] = {}
        for hour, (key, model, _channel, _status, error), c in self._groups(since, until):
            day = hour[:10]
            k = "-" if key is None else key
            m = "-" if model is None else model
            dk = by_key.setdefault(day, {})
            dk[k] = dk.get(k, 0) + c[3]
            dm = by_model.setdefault(day, {})
            dm[m] = dm.get(m, 0) + c[3]
            t = day if step_hours >= 24 else hour
            s = steps.get(t)
            if s is None:
                s = steps[t] = [0, {}]
            s[0] += c[0]
            if error is not None:
                s[1][error] = s[1].get(error, 0) + c[0]
            if c[4] is not None:
                cost = c[4] if cost is None else MONEY.add(cost, c[4])
        for channel, h in self._latency(since, until):
            into = hists.setdefault("-" if channel is None else channel, {})
            for b, n in h.items():
                into[b] = into.get(b, 0) + n
        out_steps = []
        t = since if step_hours < 24 else since[:10]
        end = until if step_hours < 24 else until[:10]
        while t < end:
            s = steps.get(t, [0, {}])
            out_steps.append({"t": t, "requests": s[0], "errors": s[1]})
            t = _hour_plus(t, 1) if step_hours < 24 else _day_plus(t, 1)
        return {
            "tokens_by_day": {"key": by_key, "model": by_model},
            "requests": out_steps,
            "latency": {ch: {"p50": percentile(h, 0.5), "p95": percentile(h, 0.95),
                             "requests": sum(h.values())} for ch, h in sorted(hists.items())},
            "cost": None if cost is None else str(cost),
        }

    def key_totals(self, key: str, since: str, until: str) -> dict[str, Any]:
        """One key's requests, tokens and cost that count (docs/limits.md#what-counts) over
        whole hours, and the same per model and UTC day: /v1/dashboard/billing/usage."""
        days: dict[str, dict[str, list]] = {}
        for hour, (k, model, _ch, _st, error), c in self._groups(since, until):
            if k != key or (error is not None and error in REFUSED):
                continue
            per = days.setdefault(hour[:10], {}).setdefault(model or "-", [0, 0, None])
            per[0] += c[0]
            per[1] += c[3]
            if c[4] is not None:
                per[2] = c[4] if per[2] is None else MONEY.add(per[2], c[4])
        return days


def _hour_plus(hour: str, n: int) -> str:
    import datetime as dt

    t = dt.datetime.strptime(hour, "%Y-%m-%dT%H") + dt.timedelta(hours=n)
    return t.strftime("%Y-%m-%dT%H")


def _hour_minus(hour: str, n: int) -> str:
    return _hour_plus(hour, -n)


def _day_plus(day: str, n: int) -> str:
    import datetime as dt

    return (dt.date.fromisoformat(day) + dt.timedelta(days=n)).isoformat()


def row_dicts(rows: list[Row], by: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows as `keygate usage --format json` writes them."""
    out = []
    for row in rows:
        d: dict[str, Any] = dict(zip(by, row.group))
        d.update((name, getattr(row.totals, name)) for name in COUNTERS)
        d["cost"] = row.totals.cost
        out.append(d)
    return out


__all__ = ["Hourly", "GROUPS", "OTHER_MODEL", "bucket_of", "percentile", "row_dicts"]
