"""Per-key counters derived from the usage log (docs/usage-log.md, docs/limits.md): they feed the
quotas. Per key: requests, tokens and money (the lines' `cost`, summed as exact decimals)
per UTC day and UTC month, and tokens and money in total.

The log is the source of truth. `Ledger.load` rebuilds the counters from the live file, its
rotated files and what rotation deleted; `Ledger.add` keeps them current in memory as
requests finish.

Counting 1,000,000 log lines costs seconds, so a sidecar `<usage_log>.ledger` keeps the
summary of what was already counted, per file:

- a file is known by the digest of its first line (request ids make it unique, and
  rotation renames files without touching their content, so `usage.jsonl` and, later,
  `usage.jsonl.3` have the same first line);
- its summary covers bytes [0, offset) at a line boundary, validated by the digest of the
  bytes just before offset, so a truncated or rewritten file is recounted;
- at load every file is summarised from its valid cache entry plus a scan of the bytes the
  entry does not cover (for a rotated file usually none, for the live file the last
  seconds).

Rotation must not change a quota (docs/usage-log.md): a client that makes the log rotate fast must
not make keygate forget what a key used. So the sidecar also carries the "retired" tally:
the counts of every log file that is gone. The writer hands each rotation to
`Ledger.rotate`, which, under a lock, counts the files it drops to their end in the
sidecar, deletes them, renames the others, then moves the dropped files' summaries into
the retired tally. A summary in the sidecar whose file no longer exists counts as retired
at the next load (a crash between the deletion and the sidecar write). Hence:

- counters = retired + every log file on disk (`usage.jsonl` and every `usage.jsonl.N`,
  whatever `keep` says now), and `tokens_total` is the key's lifetime, not what the kept
  files hold; day and month counters of deleted files are carried the same way;
- for the files on disk the sidecar is only a cache (a stale or corrupt one costs time);
  the retired tally exists nowhere else. Deleting `usage.jsonl.ledger` forgets the counts
  of deleted files. To really reset counters, an operator stops keygate and deletes the
  log files AND `usage.jsonl.ledger`; deleting the log files alone carries their counts
  forward, like a rotation.

The sidecar only ever states what was read back from the files, and it is replaced
atomically (tmp + os.replace), so after a kill -9 at any moment the counters still equal
the retired tally plus a full recount of the files. Every read-count-write of it, and
every rotation, holds an flock on `<usage_log>.ledger.lock`: `scripts/keys list` counts the
same log from another process while the gateway writes it, and must never see a
rotation half done (a file missed would be taken for deleted and counted twice).

Memory stays bounded: day counters are kept only for the newest `window_days` days seen
(today and yesterday are what quotas need), month counters for the newest month and the
one before, plus a lifetime token total per key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from keygate.accounting.log import log_files, parse_line, read_log
from keygate.files import write_atomic
from keygate.model.prices import MONEY, ZERO, money_text, to_decimal

try:
    import fcntl
except ImportError:  # (not on Windows: there a second process may see a rotation midway)
    fcntl = None

log = logging.getLogger("keygate")

REFUSED = frozenset({
    "invalid_request", "invalid_api_key", "permission_denied", "unknown_endpoint",
    "model_not_found", "request_too_large", "rate_limit_exceeded", "insufficient_quota",
    "gateway_unavailable", "request_timeout",
})
# keygate's own endpoints (docs/endpoints.md#keygates-own-endpoints): answered by keygate,
# never forwarded, so they count for no quota (a front-end polling its balance must not
# use it up). The paths of model/endpoints.py's own kinds; test_pages checks they agree.
OWN_PATHS = frozenset({
    "/keygate/health/live", "/keygate/health/ready", "/keygate/dashboard", "/keygate/usage",
    "/keygate/me", "/v1/dashboard/billing/subscription", "/v1/dashboard/billing/usage",
    "/metrics",
})
WINDOW_DAYS = 3
# Version 2 adds the retired tally and month counters, version 3 money (the `cost` of the
# lines: a counter is [requests, tokens] or [requests, tokens, "money"], and "spent" the
# lifetime money per key). A version 1 sidecar (no retired counts, no months) is ignored
# and replaced; of a version 2 one only the retired tally is kept, with no money (keygate
# wrote no costs then), and the files on disk are counted again; a newer one is left alone.
SIDECAR_VERSION = 3
HEAD_MAX = 1 << 16  # a first line longer than this is known by its first HEAD_MAX bytes
TAIL_BYTES = 4096  # ~10 lines, request ids included


def counts(record: dict) -> bool:
    """Whether a record counts for quotas (docs/limits.md): a key was identified (a string) and
    keygate did not refuse the request. Upstream failures count: they were forwarded."""
    error = record.get("error")
    return type(record.get("key")) is str and not (
        type(error) is str and error in REFUSED) and record.get("path") not in OWN_PATHS


def day_of(ts: Any) -> str | None:
    """The UTC day "YYYY-MM-DD" of a usage-log timestamp, or None if it has none."""
    if type(ts) is not str or len(ts) < 10 or ts[4] != "-" or ts[7] != "-":
        return None
    try:
        date.fromisoformat(ts[:10])
    except ValueError:
        return None
    return ts[:10]


def tokens_of(record: dict) -> int:
    """total_tokens when it is a positive integer, else 0."""
    t = record.get("total_tokens")
    return t if type(t) is int and t > 0 else 0


_add = MONEY.add  # exact (a context wide enough for any sum of costs), bound once


def money_of(record: dict) -> Decimal:
    """The record's `cost` (docs/usage-log.md#cost) when it is a number >= 0, else 0."""
    cost = record.get("cost")
    if cost is None:
        return ZERO
    return to_decimal(cost) or ZERO


def _count(periods: dict[str, dict[str, list]], period: str, key: str, requests: int,
           tokens: int, money: Decimal = ZERO) -> None:
    per_key = periods.get(period)
    if per_key is None:
        per_key = periods[period] = {}
    c = per_key.get(key)
    if c is None:
        per_key[key] = [requests, tokens, money]
    else:
        c[0] += requests
        c[1] += tokens
        if money:
            c[2] = MONEY.add(c[2], money)


AHEAD_DAYS = 1  # a line dated later than this many days ahead of this machine's clock ...


def latest_day() -> str:
    """... moves no day window: it came from a clock that is wrong (another machine's, in a
    log folder they share), and taken as the newest day it would push today's counters out
    of the window. Its tokens and money still count in the key's lifetime totals."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() + AHEAD_DAYS * 86400))


def month_before(month: str) -> str:
    """"YYYY-MM" of the month before `month` ("YYYY-MM")."""
    y, m = int(month[:4]), int(month[5:7])
    return f"{y - 1:04d}-12" if m == 1 else f"{y:04d}-{m - 1:02d}"


class Counters:
    """Counters of the records that count, fed in log order. Not thread-safe.

    Keeps per-(day, key) [requests, tokens, money] for days >= horizon = newest day seen
    minus (window - 1), per-(month, key) counts for months >= the month before the newest
    day's, and lifetime tokens and money per key (money: the lines' `cost`, Decimal). A
    month's count is `months` (the days already out of the day window, folded in as they
    leave it, and records that came too late for it) plus its days still in the window:
    the hot path counts a record once, by its day. For every day and month kept the
    counters equal a full recount, whatever the order of records, and `merge` of the
    tallies of pieces of a log, in any order, equals the tally of the whole (the horizons
    only move forward, so nothing dropped early was still needed).
    """

    __slots__ = ("window", "newest", "horizon", "month_horizon", "totals", "spent", "days",
                 "months", "_valid")

    def __init__(self, window: int = WINDOW_DAYS) -> None:
        if window < 1:
            raise ValueError("window must be at least one day")
        self.window = window
        self.newest = ""
        self.horizon = ""
        self.month_horizon = ""
        self.totals: dict[str, int] = {}
        self.spent: dict[str, Decimal] = {}  # keys that spent anything only
        self.days: dict[str, dict[str, list]] = {}
        self.months: dict[str, dict[str, list]] = {}  # days out of the window only
        self._valid: set[str] = set()  # days already checked by day_of

    def add(self, record: dict) -> None:
        # counts(), tokens_of() and day_of() inlined: this runs a million times at start-up
        # (test_ledger checks that it agrees with them).
        key = record.get("key")
        if type(key) is not str:
            return
        error = record.get("error")
        if type(error) is str and error in REFUSED:
            return
        if record.get("path") in OWN_PATHS:
            return
        t = record.get("total_tokens")
        tokens = t if type(t) is int and t > 0 else 0
        totals = self.totals
        totals[key] = totals.get(key, 0) + tokens
        money = record.get("cost")
        if money is None:
            money = ZERO
        elif type(money) is not Decimal or money < ZERO:  # (what the log reader gives: Decimal)
            money = money_of(record)
        if money:
            self.spent[key] = _add(self.spent.get(key, ZERO), money)
        ts = record.get("ts")
        day = ts[:10] if type(ts) is str else None
        if day not in self._valid:
            if day_of(ts) is None:
                return
            self._valid.add(day)
        if day > self.newest:
            if day > latest_day():
                return  # (see latest_day)
            self._advance(day)
        elif day < self.horizon:
            # Too late for its day (a long stream logged days after it began): its month.
            if day[:7] >= self.month_horizon:
                _count(self.months, day[:7], key, 1, tokens, money)
            return
        per_key = self.days.get(day)
        if per_key is None:
            per_key = self.days[day] = {}
        c = per_key.get(key)
        if c is None:
            per_key[key] = [1, tokens, money]
        else:
            c[0] += 1
            c[1] += tokens
            if money:
                c[2] = _add(c[2], money)

    def _advance(self, day: str) -> None:
        self.newest = day
        self.horizon = (date.fromisoformat(day) - timedelta(days=self.window - 1)).isoformat()
        self.month_horizon = month_before(day[:7])
        for d in [d for d in self.days if d < self.horizon]:
            if d[:7] >= self.month_horizon:
                for k, (r, t, m) in self.days[d].items():
                    _count(self.months, d[:7], k, r, t, m)
            del self.days[d]
        for m in [m for m in self.months if m < self.month_horizon]:
            del self.months[m]
        self._valid = {d for d in self._valid if d >= self.horizon}

    def merge(self, other: Counters) -> None:
        """Add `other`, the tally of other lines of the log. `other` is not changed."""
        totals = self.totals
        for k, v in other.totals.items():
            totals[k] = totals.get(k, 0) + v
        spent = self.spent
        for k, v in other.spent.items():
            spent[k] = MONEY.add(spent.get(k, ZERO), v)
        latest = latest_day()
        newest = other.newest
        if newest > latest:  # (a tally saved by a version that took such days)
            newest = max((d for d in other.days if d <= latest), default="")
        if newest > self.newest:
            self._advance(newest)
        for day, theirs in other.days.items():
            if day > latest:
                continue
            if day >= self.horizon:
                into, period = self.days, day
            elif day[:7] >= self.month_horizon:
                into, period = self.months, day[:7]
            else:
                continue
            for k, (r, t, m) in theirs.items():
                _count(into, period, k, r, t, m)
        for month, theirs in other.months.items():
            if self.month_horizon <= month <= latest[:7]:
                for k, (r, t, m) in theirs.items():
                    _count(self.months, month, k, r, t, m)

    def copy(self) -> Counters:
        new = Counters(self.window)
        new.merge(self)
        return new

    def requests_on(self, key: str, day: str) -> int:
        return self.days.get(day, {}).get(key, (0, 0))[0]

    def tokens_on(self, key: str, day: str) -> int:
        return self.days.get(day, {}).get(key, (0, 0))[1]

    def spent_on(self, key: str, day: str) -> Decimal:
        return self.days.get(day, {}).get(key, (0, 0, ZERO))[2]

    def in_month(self, key: str, month: str) -> tuple[int, int]:
        """(requests, tokens) of `key` in "YYYY-MM": folded days plus those in the window."""
        return self.month_of(key, month)[:2]

    def month_of(self, key: str, month: str) -> tuple[int, int, Decimal]:
        """(requests, tokens, money) of `key` in "YYYY-MM"."""
        r, t, m = self.months.get(month, {}).get(key, (0, 0, ZERO))
        for day, per_key in self.days.items():
            if day.startswith(month):
                c = per_key.get(key)
                if c is not None:
                    r, t = r + c[0], t + c[1]
                    if c[2]:
                        m = MONEY.add(m, c[2])
        return r, t, m

    def spent_in_month(self, key: str, month: str) -> Decimal:
        return self.month_of(key, month)[2]

    def requests_in_month(self, key: str, month: str) -> int:
        return self.in_month(key, month)[0]

    def tokens_in_month(self, key: str, month: str) -> int:
        return self.in_month(key, month)[1]

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, int]]]:
        return (dict(self.totals), {(k, d): (c[0], c[1]) for d, pk in self.days.items()
                                    for k, c in pk.items()})

    def month_snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {km: (r, t) for km, (r, t, _) in self._months_whole().items()}

    def money_snapshot(self) -> tuple[dict[str, Decimal], dict[tuple[str, str], Decimal],
                                      dict[tuple[str, str], Decimal]]:
        """(lifetime money per key, {(key, day): money}, {(key, month): money}), where
        not zero."""
        days = {(k, d): c[2] for d, pk in self.days.items() for k, c in pk.items() if c[2]}
        months = {km: m for km, (_, _, m) in self._months_whole().items() if m}
        return dict(self.spent), days, months

    def _months_whole(self) -> dict[tuple[str, str], tuple[int, int, Decimal]]:
        out: dict[tuple[str, str], tuple[int, int, Decimal]] = {}
        for periods, month_of in ((self.months, str), (self.days, lambda d: d[:7])):
            for period, per_key in periods.items():
                for k, (r, t, m) in per_key.items():
                    km = (k, month_of(period))
                    r0, t0, m0 = out.get(km, (0, 0, ZERO))
                    out[km] = (r0 + r, t0 + t, MONEY.add(m0, m))
        return out

    def to_json(self) -> dict:
        return {"newest": self.newest, "totals": self.totals,
                "spent": {k: money_text(v) for k, v in self.spent.items()},
                "days": _periods_json(self.days), "months": _periods_json(self.months)}

    @classmethod
    def from_json(cls, doc: Any, window: int) -> Counters:
        """Inverse of to_json; ValueError on anything malformed."""
        new = cls(window)
        newest, totals, days, months = doc["newest"], doc["totals"], doc["days"], doc["months"]
        if type(newest) is not str or (newest and day_of(newest) is None):
            raise ValueError("bad newest day")
        if not isinstance(totals, dict) or not all(
                type(k) is str and type(v) is int for k, v in totals.items()):
            raise ValueError("bad totals")
        spent = doc.get("spent", {})  # (none before version 3)
        if not isinstance(spent, dict) or not all(type(k) is str for k in spent):
            raise ValueError("bad spent")
        new.spent = {k: _money_json(v) for k, v in spent.items()}
        for what, periods, valid in (("day", days, day_of),
                                     ("month", months, lambda m: day_of(f"{m}-01"))):
            if not isinstance(periods, dict):
                raise ValueError(f"bad {what}s")
            for period, per_key in periods.items():
                if (type(period) is not str or len(period) != (10 if what == "day" else 7)
                        or valid(period) is None or not isinstance(per_key, dict)):
                    raise ValueError(f"bad {what} {period!r}")
                for k, c in per_key.items():
                    if (type(k) is not str or not isinstance(c, list) or len(c) not in (2, 3)
                            or not (type(c[0]) is int and type(c[1]) is int)):
                        raise ValueError(f"bad counter for {k!r} in {period}")
                    # (in place: the document is this function's own, just parsed)
                    per_key[k] = [c[0], c[1], _money_json(c[2]) if len(c) == 3 else ZERO]
        if newest:
            new._advance(newest)
        new.totals = dict(totals)
        new.months = {m: {k: list(c) for k, c in pk.items()} for m, pk in months.items()
                      if m >= new.month_horizon}
        for d, pk in days.items():
            if d >= new.horizon:  # (older days only where the writer's window was wider)
                new.days[d] = {k: list(c) for k, c in pk.items()}
            elif d[:7] >= new.month_horizon:
                for k, (r, t, m) in pk.items():
                    _count(new.months, d[:7], k, r, t, m)
        return new


def _periods_json(periods: dict[str, dict[str, list]]) -> dict:
    """Day or month counters for the sidecar: [requests, tokens], and the money as its
    exact digits where there is any."""
    return {p: {k: [c[0], c[1], money_text(c[2])] if c[2] else [c[0], c[1]]
                for k, c in pk.items()} for p, pk in periods.items()}


def _money_json(v: Any) -> Decimal:
    """Money as the sidecar writes it (its digits as a string); ValueError otherwise."""
    if type(v) is not str:
        raise ValueError("bad money")
    try:
        d = Decimal(v)
    except ArithmeticError:
        raise ValueError("bad money") from None
    if not d.is_finite() or d < 0:
        raise ValueError("bad money")
    return d


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class Segment:
    """What bytes [0, offset) of one log file hold. The tally is never changed once the
    segment exists (a longer segment gets a new tally)."""

    head: str  # digest of the file's first line (_head): identifies it across renames
    offset: int  # covered bytes, ending at a line boundary
    tail: str  # digest of the TAIL_BYTES before offset: the file still has what was counted
    bad: int  # garbage lines in the covered bytes
    tally: Counters

    def to_json(self) -> dict:
        return {"head": self.head, "offset": self.offset, "tail": self.tail, "bad": self.bad,
                **self.tally.to_json()}

    @cached_property
    def json_text(self) -> str:
        # Serialised once: the sidecar is rewritten every few seconds, but only the live
        # file's segment changes; with many keys the rotated ones are most of the text.
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, doc: Any, window: int) -> Segment:
        head, offset, tail, bad = doc["head"], doc["offset"], doc["tail"], doc["bad"]
        if not (type(head) is str and type(tail) is str and type(offset) is int
                and type(bad) is int and offset > 0):
            raise ValueError("bad segment")
        return cls(head, offset, tail, bad, Counters.from_json(doc, window))


@dataclass(frozen=True)
class FileSummary:
    """One log file: the cacheable segment (None: no complete line) and the tally of the
    whole file, its unterminated last line included."""

    segment: Segment | None
    tally: Counters
    bad: int
    reused: int  # bytes taken from the cache
    scanned: int  # bytes read and parsed


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _head(f: BinaryIO) -> str | None:
    """The file's identity: the digest of its first line, or of its first HEAD_MAX bytes
    when that line is longer (they hold its request id just as well, and never change
    once written); None while it has no complete line."""
    data = os.pread(f.fileno(), HEAD_MAX, 0)
    nl = data.find(b"\n")
    if nl >= 0:
        return _digest(data[:nl + 1])
    return _digest(data) if len(data) == HEAD_MAX else None


def _tail(f: BinaryIO, offset: int) -> str:
    n = min(offset, TAIL_BYTES)
    return _digest(os.pread(f.fileno(), n, offset - n))


def summarize(path: Path, known: Mapping[str, Segment], window: int) -> FileSummary | None:
    """Summarise one log file, reusing a valid entry of `known`. None if it is gone."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = _head(f)
        seg = known.get(head) if head else None
        if seg is not None and not (seg.offset <= size and _tail(f, seg.offset) == seg.tail):
            seg = None  # truncated or rewritten: count it again
        start = seg.offset if seg else 0
        delta = Counters(window)
        res = read_log(f, start, delta.add)
        if seg is not None and res.end == seg.offset:
            new_seg = seg
        else:
            tally = delta
            if seg is not None:
                tally = seg.tally.copy()
                tally.merge(delta)
            bad = res.bad + (seg.bad if seg else 0)
            new_seg = Segment(head, res.end, _tail(f, res.end), bad, tally) if head else None
    whole = new_seg.tally if new_seg else delta
    bad = new_seg.bad if new_seg else res.bad
    if res.trailing.strip():  # a torn last line is garbage; a complete one without "\n" counts
        record = parse_line(res.trailing)
        if record is None:
            bad += 1
        else:
            whole = whole.copy()
            whole.add(record)
    return FileSummary(new_seg, whole, bad, start, size - start)


def sidecar_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".ledger")


def lock_path(sidecar: Path) -> Path:
    return sidecar.with_name(sidecar.name + ".lock")


@dataclass
class Retired:
    """The counts of log files that are gone (rotation deleted them), carried forward."""

    tally: Counters
    files: int = 0  # how many files (for diagnostics)

    def to_json(self) -> dict:
        return {"files": self.files, **self.tally.to_json()}

    @classmethod
    def from_json(cls, doc: Any, window: int) -> Retired:
        files = doc["files"]
        if type(files) is not int or files < 0:
            raise ValueError("bad retired files")
        return cls(Counters.from_json(doc, window), files)


@dataclass
class Cache:
    """What a sidecar holds: the segments of files on disk (by head) and the retired
    tally. `writable` is false for a sidecar of a newer keygate, which is left alone; the
    segments of a sidecar of another window are not `reusable` for the files on disk (their
    day counters cover other days), only carried forward when their file is gone."""

    segments: dict[str, Segment]
    retired: Retired
    writable: bool = True
    reusable: bool = True


def read_sidecar(path: Path, window: int) -> Cache:
    """The sidecar's content; an empty cache (with a warning) if the file is unusable.

    A sidecar of another window still gives its retired tally and, for files that are
    gone, its segments (they exist nowhere else), read with this window."""
    empty = Cache({}, Retired(Counters(window)))
    try:
        doc = json.loads(path.read_bytes())
        version = doc.get("version")
        if type(version) is not int or version > SIDECAR_VERSION:
            log.warning("keygate: usage ledger %s was written by a newer keygate (version "
                        "%r); counting the log without it and leaving it as it is", path,
                        version)
            empty.writable = False
            return empty
        if version < 2:
            return empty  # nothing retired before version 2; its segments have no months
        retired = Retired.from_json(doc["retired"], window)
        # Version 2 segments have no money: their files are counted again.
        segments = ([Segment.from_json(s, window) for s in doc["files"]]
                    if version >= 3 else [])
    except FileNotFoundError:
        return empty
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("keygate: ignoring usage ledger %s (%s); counting the log again, without "
                    "the counts of deleted log files it may have held", path, e)
        return empty
    return Cache({s.head: s for s in segments}, retired,
                 reusable=doc.get("window_days") == window)


def write_sidecar(path: Path, segments: list[Segment], retired_text: str, window: int) -> None:
    """Replace the sidecar atomically: a reader sees the old or the new one, never a mix."""
    text = (f'{{"version":{SIDECAR_VERSION},"window_days":{window},"retired":{retired_text},'
            f'"files":[' + ",".join(s.json_text for s in segments) + "]}")
    # Its temp file is named for this process: _remove_stale_temps knows them by that.
    write_atomic(path, text, 0o644, durable=False,
                 tmp=path.with_name(f"{path.name}.{os.getpid()}.tmp"))


@contextmanager
def sidecar_lock(sidecar: Path) -> Iterator[None]:
    """Hold the exclusive flock of `<sidecar>.lock` (blocking; off the event loop only).

    Another process counting the same log (`scripts/keys list`) or another Ledger of this
    process (a reload) waits: no count reads the files while a rotation renames them (a
    file missed would be taken for deleted), and none deletes a file between another's
    reading of the sidecar and its survey. Where the lock file cannot be made (a folder
    not there yet, or read-only) there is no sidecar to protect."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(lock_path(sidecar), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the lock)


# --------------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class LoadStats:
    files: int
    reused_bytes: int
    scanned_bytes: int
    bad_lines: int
    seconds: float
    retired_files: int = 0  # log files gone before this load whose counts were carried


class Ledger:
    """Per-key counters for quotas. `add` and the queries run on the event loop;
    `checkpoint` and `rotate` run on the writer's thread (they touch only the cache state,
    under a lock)."""

    def __init__(self, window_days: int = WINDOW_DAYS) -> None:
        self._tally = Counters(window_days)
        self._window = window_days
        self._log_path: Path | None = None
        self._segments: dict[str, Segment] = {}
        self._retired = Retired(Counters(window_days))
        self._retired_text = json.dumps(self._retired.to_json(), separators=(",", ":"))
        self._writable = True
        self._reusable = True
        self._unsaved = False  # the last sidecar write failed
        self._lock = threading.Lock()
        self.stats: LoadStats | None = None

    def add(self, record: dict) -> None:
        """Count one finished request (ignored unless `counts(record)`). O(1)."""
        self._tally.add(record)

    def requests_on(self, key: str, day: str) -> int:
        """Requests of `key` on UTC day "YYYY-MM-DD"; 0 for days before the window."""
        return self._tally.requests_on(key, day)

    def tokens_on(self, key: str, day: str) -> int:
        return self._tally.tokens_on(key, day)

    def requests_in_month(self, key: str, month: str) -> int:
        """Requests of `key` in UTC month "YYYY-MM"; 0 for months before the previous one."""
        return self._tally.requests_in_month(key, month)

    def tokens_in_month(self, key: str, month: str) -> int:
        return self._tally.tokens_in_month(key, month)

    def tokens_total(self, key: str) -> int:
        """Lifetime tokens of `key`: the log files on disk and every one rotation deleted
        (carried in the sidecar), not only what the kept files hold."""
        return self._tally.totals.get(key, 0)

    def spent_on(self, key: str, day: str) -> Decimal:
        """Money (the lines' `cost`) of `key` on UTC day "YYYY-MM-DD"."""
        return self._tally.spent_on(key, day)

    def spent_in_month(self, key: str, month: str) -> Decimal:
        return self._tally.spent_in_month(key, month)

    def spent_total(self, key: str) -> Decimal:
        """Lifetime money of `key`, carried across rotations like tokens_total."""
        return self._tally.spent.get(key, ZERO)

    def money_snapshot(self):
        """Counters.money_snapshot, for tests and diagnostics."""
        return self._tally.money_snapshot()

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, int]]]:
        """(lifetime tokens per key, {(key, day): (requests, tokens)} for the days kept),
        for tests and diagnostics."""
        return self._tally.snapshot()

    def month_snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        """{(key, "YYYY-MM"): (requests, tokens)} for the months kept."""
        return self._tally.month_snapshot()

    @classmethod
    def load(cls, log_path: Path, keep: int | None = None, *, window_days: int = WINDOW_DAYS,
             use_cache: bool = True) -> Ledger:
        """Rebuild from the retired tally of the sidecar, `log_path` and every
        `log_path.N` present, refreshing the sidecar. `keep` is not needed to find the
        files: one beyond it is still counted until a rotation retires it. With
        `use_cache` false: a recount of the files alone, the sidecar neither read nor
        written (what was deleted is then not counted)."""
        t0 = time.perf_counter()
        log_path = Path(log_path)
        ledger = cls(window_days)
        ledger._log_path = log_path
        retired_before = 0
        if use_cache:
            sidecar = sidecar_path(log_path)
            with ledger._lock, sidecar_lock(sidecar):
                _remove_stale_temps(sidecar)
                ledger._use(read_sidecar(sidecar, window_days))
                retired_before = ledger._retired.files
                summaries = _survey(log_path, ledger._known(), window_days)
                ledger._store(summaries)
            ledger._tally.merge(ledger._retired.tally)
        else:
            summaries = _survey(log_path, {}, window_days)
        for s in summaries:
            ledger._tally.merge(s.tally)
        bad = sum(s.bad for s in summaries)
        if bad:
            log.warning("keygate: usage log %s: skipped %d lines that are not JSON records",
                        log_path, bad)
        ledger.stats = LoadStats(len(summaries), sum(s.reused for s in summaries),
                                 sum(s.scanned for s in summaries), bad,
                                 time.perf_counter() - t0,
                                 ledger._retired.files - retired_before)
        return ledger

    def checkpoint(self, log_path: Path | None = None, keep: int | None = None) -> None:
        """Bring the sidecar up to date with the log files (not with `add`: only what is
        on disk is ever cached), following the writer to a new `log_path`. (`keep`, of
        the writer's hook, is not needed: every numbered file is read.) Blocking file
        I/O: call it off the event loop."""
        with self._lock:
            self._follow(log_path)
            if self._log_path is None:
                return
            with sidecar_lock(sidecar_path(self._log_path)):
                self._store(_survey(self._log_path, self._known(), self._window))

    def rotate(self, log_path: Path, keep: int, dropped: list[Path],
               renames: Callable[[], None]) -> None:
        """Carry out one rotation of the log so that it changes no count (writer thread).

        Under the lock: count the files in `dropped` to their end in the sidecar, delete
        them, call `renames` (the rest of the rotation), then move their summaries to the
        retired tally in the sidecar. A crash anywhere in between leaves a sidecar that the
        next load reads right: a summary whose file is gone counts as retired. Counting
        that fails (a sidecar that cannot be written) is logged and the rotation goes on:
        the log must not grow past its size; the counts in memory stay right."""
        with self._lock:
            self._follow(log_path)
            with sidecar_lock(sidecar_path(self._log_path)):
                if dropped:
                    try:
                        if not self._store(_survey(self._log_path, self._known(),
                                                   self._window)):
                            raise OSError("the sidecar was not written")
                    except Exception as e:
                        log.error("keygate: usage ledger: cannot count %s before rotation "
                                  "deletes it (%s); a restart will not count its lines",
                                  ", ".join(p.name for p in dropped), e)
                    for p in dropped:
                        p.unlink(missing_ok=True)
                renames()
                if dropped:
                    try:
                        self._store(_survey(self._log_path, self._known(), self._window))
                    except Exception as e:  # the next checkpoint or load retires them
                        log.warning("keygate: usage ledger checkpoint after rotation failed: "
                                    "%s", e)

    def _follow(self, log_path: Path | None) -> None:
        """Switch to another log path (the writer was reconfigured): its own sidecar."""
        if log_path is not None and Path(log_path) != self._log_path:
            self._log_path = Path(log_path)
            with sidecar_lock(sidecar_path(self._log_path)):
                self._use(read_sidecar(sidecar_path(self._log_path), self._window))

    def _use(self, cache: Cache) -> None:
        self._segments = cache.segments
        self._reusable = cache.reusable
        self._retired = cache.retired
        self._retired_text = json.dumps(cache.retired.to_json(), separators=(",", ":"),
                                        ensure_ascii=False)
        self._writable = cache.writable

    def _known(self) -> Mapping[str, Segment]:
        """The segments a survey may take as counted."""
        return self._segments if self._reusable else {}

    def _store(self, summaries: list[FileSummary]) -> bool:
        """Make `summaries` (of every file on disk) the cached state: the segments of files
        no longer there join the retired tally. Writes the sidecar if anything changed;
        returns whether the sidecar on disk now says what the cached state does."""
        segments = {s.segment.head: s.segment for s in summaries if s.segment is not None}
        gone = [seg for head, seg in self._segments.items() if head not in segments]
        changed = bool(gone) or self._unsaved or (
            {h: s.offset for h, s in segments.items()}
            != {h: s.offset for h, s in self._segments.items()})
        if gone:
            tally = self._retired.tally.copy()
            for seg in gone:
                tally.merge(seg.tally)
            self._retired = Retired(tally, self._retired.files + len(gone))
            self._retired_text = json.dumps(self._retired.to_json(), separators=(",", ":"),
                                            ensure_ascii=False)
        self._segments = segments
        self._reusable = True
        if not changed:
            return True
        if not self._writable:
            return False
        path = sidecar_path(self._log_path)
        try:
            write_sidecar(path, list(segments.values()), self._retired_text, self._window)
        except OSError as e:
            log.warning("keygate: cannot write usage ledger %s: %s", path, e)
            self._unsaved = True
            return False
        self._unsaved = False
        return True


def _remove_stale_temps(sidecar: Path) -> None:
    """Temp files of sidecar writes that a kill -9 interrupted. Another live process (the
    gateway, while `scripts/keys list` loads a ledger) may be writing its own: keep those."""
    try:
        for p in sidecar.parent.glob(sidecar.name + ".*.tmp"):
            pid = p.name[len(sidecar.name) + 1:-len(".tmp")]
            if pid.isdigit() and _alive(int(pid)):  # ours too: a checkpoint may be writing
                continue
            p.unlink(missing_ok=True)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _survey(log_path: Path, known: Mapping[str, Segment], window: int) -> list[FileSummary]:
    """Every file of the log on disk, oldest first: every `log_path.N` present (those
    beyond `keep` too: they count until a rotation retires them), then the live file."""
    summaries = (summarize(p, known, window) for p in log_files(log_path))
    return [s for s in summaries if s is not None]
