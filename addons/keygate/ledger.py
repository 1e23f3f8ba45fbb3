"""Per-key counters derived from the usage log (SPEC 6, 7): they feed the quotas.

The log is the source of truth. `Ledger.load` rebuilds the counters from the live file and
its rotated files; `Ledger.add` keeps them current in memory as requests finish.

Counting 1,000,000 log lines costs seconds, so a sidecar cache `<usage_log>.ledger` keeps
the summary of what was already counted, per file:

- a file is known by the digest of its first line (request ids make it unique, and
  rotation renames files without touching their content, so `usage.jsonl` and, later,
  `usage.jsonl.3` have the same first line);
- its summary covers bytes [0, offset) at a line boundary, validated by the digest of the
  bytes just before offset, so a truncated, replaced or rewritten file is recounted;
- at load every file is summarised from its valid cache entry plus a scan of the bytes the
  entry does not cover (for a rotated file usually none, for the live file the last
  seconds). A missing, stale or corrupt sidecar only costs time.

The sidecar only ever states what was read back from the files, and it is replaced
atomically (tmp + os.replace), so after a kill -9 at any moment the counters still equal a
full recount of the log. It is written by `Ledger.load` and `Ledger.checkpoint`; the usage
writer calls the latter from its thread (after a rotation, every few seconds, on close).

Memory stays bounded: day counters are kept only for the newest `window_days` days seen
(today and yesterday are what quotas need), plus a lifetime token total per key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from .usagelog import log_files, parse_line, read_log

log = logging.getLogger("keygate")

REFUSED = frozenset({
    "invalid_request", "invalid_api_key", "permission_denied", "unknown_endpoint",
    "model_not_found", "request_too_large", "rate_limit_exceeded", "insufficient_quota",
    "gateway_unavailable", "request_timeout",
})
WINDOW_DAYS = 3
SIDECAR_VERSION = 1
HEAD_MAX = 1 << 16  # a first line longer than this leaves the file uncached (never happens)
TAIL_BYTES = 4096  # ~10 lines, request ids included


def counts(record: dict) -> bool:
    """Whether a record counts for quotas (SPEC 7): a key was identified (a string) and
    keygate did not refuse the request. Upstream failures count: they were forwarded."""
    error = record.get("error")
    return type(record.get("key")) is str and not (type(error) is str and error in REFUSED)


def day_of(ts: Any) -> str | None:
    """The UTC day "YYYY-MM-DD" of a SPEC 6 timestamp, or None if it has none."""
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


class Tally:
    """Counters of the records that count, fed in log order. Not thread-safe.

    Keeps per-(day, key) [requests, tokens] for days >= horizon = newest day seen minus
    (window - 1), and lifetime tokens per key. For every day >= the final horizon the
    counters equal a full recount, whatever the order of records, and `merge` of the
    tallies of consecutive pieces of a log equals the tally of the whole (the horizon
    only moves forward, so nothing dropped early was still needed).
    """

    __slots__ = ("window", "newest", "horizon", "totals", "days", "_valid")

    def __init__(self, window: int = WINDOW_DAYS) -> None:
        if window < 1:
            raise ValueError("window must be at least one day")
        self.window = window
        self.newest = ""
        self.horizon = ""
        self.totals: dict[str, int] = {}
        self.days: dict[str, dict[str, list[int]]] = {}
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
        t = record.get("total_tokens")
        tokens = t if type(t) is int and t > 0 else 0
        totals = self.totals
        totals[key] = totals.get(key, 0) + tokens
        ts = record.get("ts")
        day = ts[:10] if type(ts) is str else None
        if day not in self._valid:
            if day_of(ts) is None:
                return
            self._valid.add(day)
        if day > self.newest:
            self._advance(day)
        elif day < self.horizon:
            return
        per_key = self.days.get(day)
        if per_key is None:
            per_key = self.days[day] = {}
        c = per_key.get(key)
        if c is None:
            per_key[key] = [1, tokens]
        else:
            c[0] += 1
            c[1] += tokens

    def _advance(self, day: str) -> None:
        self.newest = day
        self.horizon = (date.fromisoformat(day) - timedelta(days=self.window - 1)).isoformat()
        for d in [d for d in self.days if d < self.horizon]:
            del self.days[d]
        self._valid = {d for d in self._valid if d >= self.horizon}

    def merge(self, other: Tally) -> None:
        """Add `other`, the tally of what follows in the log. `other` is not changed."""
        totals = self.totals
        for k, v in other.totals.items():
            totals[k] = totals.get(k, 0) + v
        if other.newest > self.newest:
            self._advance(other.newest)
        for day, theirs in other.days.items():
            if day < self.horizon:
                continue
            mine = self.days.setdefault(day, {})
            for k, (r, t) in theirs.items():
                c = mine.get(k)
                if c is None:
                    mine[k] = [r, t]
                else:
                    c[0] += r
                    c[1] += t

    def copy(self) -> Tally:
        new = Tally(self.window)
        new.merge(self)
        return new

    def requests_on(self, key: str, day: str) -> int:
        return self.days.get(day, {}).get(key, (0, 0))[0]

    def tokens_on(self, key: str, day: str) -> int:
        return self.days.get(day, {}).get(key, (0, 0))[1]

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, int]]]:
        return (dict(self.totals), {(k, d): (c[0], c[1]) for d, pk in self.days.items()
                                    for k, c in pk.items()})

    def to_json(self) -> dict:
        return {"newest": self.newest, "totals": self.totals, "days": self.days}

    @classmethod
    def from_json(cls, doc: Any, window: int) -> Tally:
        """Inverse of to_json; ValueError on anything malformed."""
        new = cls(window)
        newest, totals, days = doc["newest"], doc["totals"], doc["days"]
        if type(newest) is not str or (newest and day_of(newest) is None):
            raise ValueError("bad newest day")
        if not isinstance(totals, dict) or not all(
                type(k) is str and type(v) is int for k, v in totals.items()):
            raise ValueError("bad totals")
        if not isinstance(days, dict):
            raise ValueError("bad days")
        for day, per_key in days.items():
            if day_of(day) is None or not isinstance(per_key, dict):
                raise ValueError(f"bad day {day!r}")
            for k, c in per_key.items():
                if (type(k) is not str or not isinstance(c, list) or len(c) != 2
                        or not all(type(x) is int for x in c)):
                    raise ValueError(f"bad counter for {k!r} on {day}")
        if newest:
            new._advance(newest)
        new.totals = dict(totals)
        new.days = {d: {k: list(c) for k, c in pk.items()} for d, pk in days.items()
                    if d >= new.horizon}
        return new


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class Segment:
    """What bytes [0, offset) of one log file hold. The tally is never changed once the
    segment exists (a longer segment gets a new tally)."""

    head: str  # digest of the file's first line: identifies the file across renames
    offset: int  # covered bytes, ending at a line boundary
    tail: str  # digest of the TAIL_BYTES before offset: the file still has what was counted
    bad: int  # garbage lines in the covered bytes
    tally: Tally

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
        return cls(head, offset, tail, bad, Tally.from_json(doc, window))


@dataclass(frozen=True)
class FileSummary:
    """One log file: the cacheable segment (None: no complete line) and the tally of the
    whole file, its unterminated last line included."""

    segment: Segment | None
    tally: Tally
    bad: int
    reused: int  # bytes taken from the cache
    scanned: int  # bytes read and parsed


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _head(f: BinaryIO) -> str | None:
    data = os.pread(f.fileno(), HEAD_MAX, 0)
    nl = data.find(b"\n")
    return _digest(data[:nl + 1]) if nl >= 0 else None


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
        delta = Tally(window)
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


def read_sidecar(path: Path, window: int) -> dict[str, Segment]:
    """The cached segments by head; {} (with a warning) if the file is unusable."""
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("version") != SIDECAR_VERSION or doc.get("window_days") != window:
            return {}
        segments = [Segment.from_json(s, window) for s in doc["files"]]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("keygate: ignoring usage ledger cache %s (%s); counting the log again",
                    path, e)
        return {}
    return {s.head: s for s in segments}


def write_sidecar(path: Path, segments: list[Segment], window: int) -> None:
    """Replace the sidecar atomically: a reader sees the old or the new one, never a mix."""
    text = (f'{{"version":{SIDECAR_VERSION},"window_days":{window},"files":['
            + ",".join(s.json_text for s in segments) + "]}")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(text.encode("utf-8", "backslashreplace"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class LoadStats:
    files: int
    reused_bytes: int
    scanned_bytes: int
    bad_lines: int
    seconds: float


class Ledger:
    """Per-key counters for quotas. `add` and the queries run on the event loop;
    `checkpoint` may run on another thread (it touches only the cache state)."""

    def __init__(self, window_days: int = WINDOW_DAYS) -> None:
        self._tally = Tally(window_days)
        self._window = window_days
        self._log_path: Path | None = None
        self._keep = 0
        self._segments: dict[str, Segment] = {}
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

    def tokens_total(self, key: str) -> int:
        """Lifetime tokens of `key`, as far as the kept log files go back."""
        return self._tally.totals.get(key, 0)

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], tuple[int, int]]]:
        """(lifetime tokens per key, {(key, day): (requests, tokens)} for the days kept),
        for tests and diagnostics."""
        return self._tally.snapshot()

    @classmethod
    def load(cls, log_path: Path, keep: int, *, window_days: int = WINDOW_DAYS,
             use_cache: bool = True) -> Ledger:
        """Rebuild from `log_path` and `log_path.1` .. `.keep` (missing files are empty),
        using and refreshing the sidecar cache unless `use_cache` is false."""
        t0 = time.perf_counter()
        log_path = Path(log_path)
        ledger = cls(window_days)
        ledger._log_path, ledger._keep = log_path, keep
        known = {}
        if use_cache:
            _remove_stale_temps(sidecar_path(log_path))
            known = read_sidecar(sidecar_path(log_path), window_days)
        summaries = _survey(log_path, keep, known, window_days)
        for s in summaries:
            ledger._tally.merge(s.tally)
        if use_cache:
            ledger._store(summaries, known)
        bad = sum(s.bad for s in summaries)
        if bad:
            log.warning("keygate: usage log %s: skipped %d lines that are not JSON records",
                        log_path, bad)
        ledger.stats = LoadStats(len(summaries), sum(s.reused for s in summaries),
                                 sum(s.scanned for s in summaries), bad,
                                 time.perf_counter() - t0)
        return ledger

    def checkpoint(self, log_path: Path | None = None, keep: int | None = None) -> None:
        """Bring the sidecar up to date with the log files (not with `add`: only what is
        on disk is ever cached). Blocking file I/O: call it off the event loop."""
        with self._lock:
            if log_path is not None and Path(log_path) != self._log_path:
                self._log_path = Path(log_path)
                self._segments = read_sidecar(sidecar_path(self._log_path), self._window)
            if keep is not None:
                self._keep = keep
            if self._log_path is None:
                return
            self._store(_survey(self._log_path, self._keep, self._segments, self._window),
                        self._segments)

    def _store(self, summaries: list[FileSummary], known: Mapping[str, Segment]) -> None:
        segments = {s.segment.head: s.segment for s in summaries if s.segment is not None}
        self._segments = segments
        if {h: s.offset for h, s in segments.items()} == {h: s.offset for h, s in known.items()}:
            return
        path = sidecar_path(self._log_path)
        try:
            write_sidecar(path, list(segments.values()), self._window)
        except OSError as e:
            log.warning("keygate: cannot write usage ledger cache %s: %s", path, e)


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


def _survey(log_path: Path, keep: int, known: Mapping[str, Segment],
            window: int) -> list[FileSummary]:
    summaries = (summarize(p, known, window) for p in log_files(log_path, keep))
    return [s for s in summaries if s is not None]
