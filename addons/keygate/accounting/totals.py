"""Totals of requests, tokens, errors and cost over the usage log, grouped by key, model,
channel, UTC day and UTC month: what `keygate usage` prints, and what a dashboard can show.
Costs are summed in decimal arithmetic (the log reader gives each line's cost as the
Decimal it spells), so a total is exactly the sum of its lines.

Pure: records in, `Row`s out; nothing here prints or formats. `read_into` is the one
function that touches files, and it only feeds the log's records (rotated files oldest
first, then the live file) to a sink.

Bounds are canonical timestamp strings, the form keygate writes `ts` in, so the filter is
a string comparison per record: since <= ts < until.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

from keygate.accounting.log import log_family, log_files, read_records
from keygate.model.prices import MONEY, to_decimal
from keygate.times import parse_when

GROUPS = ("key", "model", "channel", "day", "month")
_add = MONEY.add  # exact: wide enough for any sum of costs
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors")


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0
    cost: Decimal | None = None
    """The sum of the lines' cost; None when none of them had one (no price applied)."""

    def __add__(self, other: Totals) -> Totals:
        a, b = self.cost, other.cost
        cost = a if b is None else b if a is None else MONEY.add(a, b)
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                        if f.name != "cost"), cost=cost)


@dataclass(frozen=True)
class Row:
    group: tuple[str | None, ...]  # values of the grouping fields, in order
    totals: Totals


def parse_by(values: Iterable[str]) -> tuple[str, ...]:
    """`key,model` and `day` (comma-separated, any number) -> ("key", "model", "day");
    duplicates dropped. ValueError naming the field for anything not in GROUPS."""
    out: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in GROUPS:
                raise ValueError(f"cannot group by {name!r}: choose from {', '.join(GROUPS)}")
            if name not in out:
                out.append(name)
    return tuple(out)


def canonical(t: datetime) -> str:
    """The log's timestamp form (2026-11-26T22:42:26.123Z), rounded up to the millisecond,
    so that bounds compare as strings with `ts` values: ts >= since, ts < until."""
    t = t.astimezone(timezone.utc)
    ms = math.ceil(t.microsecond / 1000)
    t = t.replace(microsecond=0) + timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


# The form keygate writes, "2026-11-27T01:02:03.123Z": minutes and seconds checked here;
# the date and hour, which the hourly totals compute with, once per hour by `_valid_hour`.
_KEYGATE_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:[0-5]\d:[0-5]\d\.\d{3}Z")


@functools.lru_cache(maxsize=1024)
def _valid_hour(hour: str) -> bool:
    try:
        datetime.strptime(hour, "%Y-%m-%dT%H")
    except ValueError:
        return False
    return True


def record_ts(record: dict) -> str | None:
    """The record's `ts` in canonical form, or None if it has no readable one."""
    ts = record.get("ts")
    if type(ts) is not str:
        return None
    if len(ts) == 24 and _KEYGATE_TS.fullmatch(ts) and _valid_hour(ts[:13]):
        return ts  # what keygate writes: no parsing beyond the hour's, once per hour
    try:
        return canonical(parse_when(ts))
    except ValueError:
        return None


def _int(v: Any) -> int:
    return v if type(v) is int else 0


def group_text(v: Any) -> str | None:
    """A group value (key, model, channel, status, error) as `keygate usage`, the hourly
    totals and the usage page show it: a string as it is, anything else as its JSON."""
    return v if v is None or type(v) is str else json.dumps(v)


def _group_value(record: dict, name: str, ts: str | None) -> str | None:
    if name == "day":
        return ts[:10] if ts else None
    if name == "month":
        return ts[:7] if ts else None
    return group_text(record.get(name))


class Summer:
    """Accumulates totals per group over records with since <= ts < until (canonical
    strings; None: unbounded). `add` is the sink given to the log reader."""

    def __init__(self, by: tuple[str, ...], since: str | None = None,
                 until: str | None = None) -> None:
        self.by, self.since, self.until = by, since, until
        self._acc: dict[tuple, list[int]] = {}

    def add(self, r: dict) -> None:
        ts = record_ts(r)
        if self.since is not None or self.until is not None:
            if ts is None:
                return
            if self.since is not None and ts < self.since:
                return
            if self.until is not None and ts >= self.until:
                return
        group = tuple(_group_value(r, name, ts) for name in self.by)
        c = self._acc.get(group)
        if c is None:
            c = self._acc[group] = [0, 0, 0, 0, 0, None]
        c[0] += 1
        c[1] += _int(r.get("prompt_tokens"))
        c[2] += _int(r.get("completion_tokens"))
        c[3] += _int(r.get("total_tokens"))
        c[4] += r.get("error") is not None
        cost = r.get("cost")
        if cost is not None:
            # (the log reader gives Decimals; NaN, Infinity and < 0 are no cost)
            if type(cost) is not Decimal or not cost.is_finite() or cost < 0:
                cost = to_decimal(cost)
            if cost is not None:
                c[5] = cost if c[5] is None else _add(c[5], cost)

    def add_totals(self, group: tuple, requests: int, prompt: int, completion: int,
                   total: int, errors: int, cost: Decimal | None) -> None:
        """The totals of many records of one `group` at once, not filtered by time: what
        the cache of the log's hours holds (accounting/hourcache.py)."""
        c = self._acc.get(group)
        if c is None:
            c = self._acc[group] = [0, 0, 0, 0, 0, None]
        c[0] += requests
        c[1] += prompt
        c[2] += completion
        c[3] += total
        c[4] += errors
        if cost is not None:
            c[5] = cost if c[5] is None else _add(c[5], cost)

    def rows(self) -> list[Row]:
        """Rows sorted by group (nulls first). With no `by`: exactly one row, zeros if no
        record matched, like SQL's aggregate without GROUP BY."""
        acc = dict(self._acc)
        if not self.by and not acc:
            acc[()] = [0, 0, 0, 0, 0, None]
        order = sorted(acc, key=lambda g: tuple((v is not None, v or "") for v in g))
        return [Row(g, Totals(*acc[g])) for g in order]


def aggregate(records: Iterable[dict], by: tuple[str, ...], since: str | None = None,
              until: str | None = None) -> list[Row]:
    """`Summer` over an iterable."""
    summer = Summer(by, since, until)
    for r in records:
        summer.add(r)
    return summer.rows()


def total(rows: list[Row]) -> Totals:
    out = Totals()
    for row in rows:
        out = out + row.totals
    return out


def read_into(log_path: Path, sink: Callable[[dict], Any]) -> int:
    """Feed every record of the log to `sink`, rotated files (oldest first) then the live
    file, and so for each worker's log beside it (`log_family`); return the number of
    garbage lines skipped (a torn last line among them)."""
    return sum(read_records(p, sink) for live in log_family(log_path) for p in log_files(live))
