"""The cache of the usage log's hours beside it, `<usage_log>.hours`
(docs/usage-log.md#the-hour-cache): what `keygate usage` and the usage page's start-up
read instead of every line of the log.

Per log file (known, as in the ledger's sidecar, by the digest of its first line, and
valid up to a byte offset checked by the digest of the bytes before it:
accounting/ledger.py), per hour of `ts` (the first 13 characters of totals.record_ts,
"YYYY-MM-DDTHH"; records without a readable ts under null), it keeps:

- per (key, model, channel, status, error), the group values `keygate usage` and the
  hourly totals use: requests, prompt, completion and total tokens, and the cost, its
  exact digits;
- per channel, the histogram of durations the hourly totals keep (hourly.bucket_of);
- the byte range [first, end) of that hour's lines in the file, and the smallest and
  largest `ts` among them.

A query over [since, until) takes an hour of a file whole when all of its `ts` are inside
(smallest >= since, largest < until), leaves it out when none is, and otherwise reads that
hour's byte range again and counts its lines one by one. Lines are in write order and `ts`
is when the request started, so the ranges of neighbouring hours may overlap: a line read
there counts only for its own hour. So an answer is exactly what reading every line gives
(the same rows, the same digits of cost), and costs the cache, the lines of the hours at
the period's edges, and what the cache does not cover yet (the live file's newest lines).

The cache only ever says what was read from the files, and is checked against them: a
file it does not know, or whose bytes no longer end as cached (truncated, rewritten), is
read again; a cache that cannot be read, or of another version, is ignored and replaced (a
newer keygate's is left as it is). It is replaced atomically (keygate.files.write_atomic),
so two processes writing it (the gateway, `keygate usage`) can only each put a whole cache
there, each one true of the files; the later write wins. The files of the log are listed
and opened under the ledger's lock (ledger.sidecar_lock), so no rotation is seen halfway,
and read through those open files afterwards.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Callable

import orjson

from keygate.accounting import ledger as _ledger
from keygate.accounting.hourly import Hourly, bucket_of
from keygate.accounting.log import (
    READ_CHUNK,
    log_family,
    log_files,
    parse_line,
    scan_lines,
)
from keygate.accounting.totals import Row, Summer, group_text, record_ts
from keygate.files import write_atomic
from keygate.model.prices import MONEY, to_decimal

log = logging.getLogger("keygate")

VERSION = 1
# How often the running gateway brings the cache up to date (stages/pages.py), so that
# `keygate usage` and the next start-up read at most this much of the log line by line.
INTERVAL = 60.0
REFUSED = _ledger.REFUSED
_add = MONEY.add
_write_lock = threading.Lock()  # (one temp file name per process)

# A bucket: the totals of one hour of one file.
FIRST, END, LO, HI, GROUPS, LATENCY = range(6)


def sidecar_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".hours")


@dataclass
class Part:
    """What bytes [0, offset) of one log file hold, per hour (buckets, see FIRST..LATENCY).
    `text`: the JSON of its hours, as read or written, while they are unchanged; `hours`
    None: not parsed from `text` yet (the gateway's refresh parses only the files that
    grew)."""

    head: str | None
    offset: int = 0
    tail: str = ""
    bad: int = 0
    hours: dict | None = field(default_factory=dict)
    text: bytes | None = None

    def buckets(self) -> dict:
        if self.hours is None:
            self.hours = _hours_from(orjson.loads(self.text), self.offset)
        return self.hours

    def lines(self) -> bytes:
        """Its two lines of the sidecar: what file and bytes, and the hours."""
        if self.text is None:
            hours = []
            for hour, b in self.hours.items():
                groups = [[*g, c[0], c[1], c[2], c[3], None if c[4] is None else str(c[4])]
                          for g, c in b[GROUPS].items()]
                lat = [[ch, [x for kv in h.items() for x in kv]] for ch, h in b[LATENCY].items()]
                hours.append([hour, b[FIRST], b[END], b[LO], b[HI], groups, lat])
            self.text = orjson.dumps(hours)
        return orjson.dumps({"head": self.head, "offset": self.offset, "tail": self.tail,
                             "bad": self.bad}) + b"\n" + self.text + b"\n"


def _str_or_none(v: Any) -> bool:
    return v is None or type(v) is str


def _part_from(meta: bytes, text: bytes, parse: bool) -> Part:
    """A Part from its two lines of the sidecar (its hours parsed now or when needed);
    ValueError (or TypeError, KeyError) when they are not what keygate wrote."""
    doc = orjson.loads(meta)
    head, offset, tail, bad = doc["head"], doc["offset"], doc["tail"], doc["bad"]
    if not (type(head) is str and type(tail) is str and type(offset) is int and offset > 0
            and type(bad) is int and bad >= 0):
        raise ValueError("bad file entry")
    part = Part(head, offset, tail, bad, None, text)
    if parse:
        part.buckets()
    return part


def _hours_from(doc: Any, offset: int) -> dict:
    hours: dict = {}
    for hour, first, end, lo, hi, groups, lat in doc:
        if not (type(first) is int and type(end) is int and 0 <= first < end <= offset):
            raise ValueError("bad range")
        if hour is None:
            if lo is not None or hi is not None:
                raise ValueError("bad bounds")
        elif not (type(hour) is str and type(lo) is str and type(hi) is str and lo <= hi
                  and lo[:13] == hour and hi[:13] == hour):
            raise ValueError("bad hour")
        if hour in hours:
            raise ValueError("hour twice")
        gs = {}
        for k, m, ch, st, err, req, p, c, t, cost in groups:
            if not (_str_or_none(k) and _str_or_none(m) and _str_or_none(ch)
                    and _str_or_none(err) and (st is None or type(st) is int)
                    and type(req) is int and req > 0 and type(p) is int and type(c) is int
                    and type(t) is int):
                raise ValueError("bad group")
            if cost is not None:
                if type(cost) is not str:
                    raise ValueError("bad cost")
                cost = to_decimal(Decimal(cost))
                if cost is None:
                    raise ValueError("bad cost")
            g = (k, m, ch, st, err)
            if g in gs:
                raise ValueError("group twice")
            gs[g] = [req, p, c, t, cost]
        ls = {}
        for ch, flat in lat:
            if not (_str_or_none(ch) and type(flat) is list and len(flat) % 2 == 0
                    and all(type(x) is int and x >= 0 for x in flat)):
                raise ValueError("bad latency")
            ls[ch] = dict(zip(flat[::2], flat[1::2]))
        hours[hour] = [first, end, lo, hi, gs, ls]
    return hours


# --------------------------------------------------------------------------- reading


def _folder(hours: dict, watch: Any, seen: set) -> Callable[[dict, int, int], None]:
    """The sink that adds one record, on bytes [start, end) of its file, to `hours`.
    Records whose id is in `watch` have it added to `seen`."""

    def fold(r: dict, start: int, end: int) -> None:
        ts = record_ts(r)  # (the same rule as a full read: a ts that is no time is none)
        hour = None if ts is None else ts[:13]
        b = hours.get(hour)
        if b is None:
            b = hours[hour] = [start, end, ts, ts, {}, {}]
        else:
            b[END] = end
            if ts is not None:
                if ts < b[LO]:
                    b[LO] = ts
                elif ts > b[HI]:
                    b[HI] = ts
        key, model, channel, error = r.get("key"), r.get("model"), r.get("channel"), r.get(
            "error")
        if key is not None and type(key) is not str:
            key = group_text(key)
        if model is not None and type(model) is not str:
            model = group_text(model)
        if channel is not None and type(channel) is not str:
            channel = group_text(channel)
        if error is not None and type(error) is not str:
            error = group_text(error)
        status = r.get("status")
        g = (key, model, channel, status if type(status) is int else None, error)
        groups = b[GROUPS]
        c = groups.get(g)
        if c is None:
            c = groups[g] = [0, 0, 0, 0, None]
        c[0] += 1
        p, q, t = r.get("prompt_tokens"), r.get("completion_tokens"), r.get("total_tokens")
        if type(p) is int:
            c[1] += p
        if type(q) is int:
            c[2] += q
        if type(t) is int:
            c[3] += t
        cost = r.get("cost")
        if cost is not None:
            cost = to_decimal(cost)
            if cost is not None:
                c[4] = cost if c[4] is None else _add(c[4], cost)
        if error is None or error not in REFUSED:
            ms = r.get("duration_ms")
            if type(ms) is int or type(ms) is float:
                lat = b[LATENCY]
                h = lat.get(channel)
                if h is None:
                    h = lat[channel] = {}
                i = bucket_of(ms)
                h[i] = h.get(i, 0) + 1
        if watch:
            rid = r.get("id")
            if type(rid) is str and rid in watch:
                seen.add(rid)

    return fold


def _read(f: BinaryIO, start: int, stop: int | None,
          scan: Callable[[bytes, int], int]) -> tuple[int, int, bytes]:
    """Feed the complete lines of bytes [start, stop) (stop None: to the end) to `scan`
    in pieces; (offset after the last complete line, garbage lines, the rest)."""
    pos, bad, rest = start, 0, b""
    fd = f.fileno()
    at = start
    while stop is None or at < stop:
        n = READ_CHUNK if stop is None else min(READ_CHUNK, stop - at)
        chunk = os.pread(fd, n, at)
        if not chunk:
            break
        at += len(chunk)
        buf = rest + chunk if rest else chunk
        cut = buf.rfind(b"\n") + 1
        if cut:
            bad += scan(buf[:cut], pos)
            pos += cut
        rest = buf[cut:]
    return pos, bad, rest


@dataclass
class View:
    """One log file as a survey found it: `part` covers its complete lines, `extra` is a
    last line without its newline that holds a record, `bad` its garbage lines."""

    path: Path
    f: BinaryIO
    part: Part
    extra: dict | None
    bad: int


class Survey:
    """Every file of a log at one moment (open), summarised per hour. Close it."""

    def __init__(self, views: list[View]) -> None:
        self.views = views
        self.bad = sum(v.bad for v in views)

    def close(self) -> None:
        for v in self.views:
            v.f.close()

    def __enter__(self) -> Survey:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def rows(self, by: tuple[str, ...], since: str | None = None,
             until: str | None = None) -> list[Row]:
        """What totals.aggregate of every record of the log gives: totals grouped by `by`
        over since <= ts < until (canonical strings; None: unbounded)."""
        summer = Summer(by, since, until)
        put = summer.add_totals
        where = [(0, name) if name == "day" else (1, name) if name == "month"
                 else (2, ("key", "model", "channel").index(name)) for name in by]
        for v in self.views:
            partial: dict[str, tuple[int, int]] = {}
            for hour, b in v.part.buckets().items():
                if hour is None:
                    if since is not None or until is not None:
                        continue
                elif (since is not None and b[HI] < since) or (
                        until is not None and b[LO] >= until):
                    continue
                elif (since is not None and b[LO] < since) or (
                        until is not None and b[HI] >= until):
                    partial[hour] = (b[FIRST], b[END])
                    continue
                day = None if hour is None else hour[:10]
                month = None if hour is None else hour[:7]
                for g, c in b[GROUPS].items():
                    out = tuple(day if kind == 0 else month if kind == 1 else g[i]
                                for kind, i in where)
                    put(out, c[0], c[1], c[2], c[3], c[0] if g[4] is not None else 0, c[4])
            if partial:
                _read_hours(v.f, partial, summer.add)
            if v.extra is not None:
                summer.add(v.extra)
        return summer.rows()

    def fill(self, hourly: Hourly) -> None:
        """Add every record of the log to `hourly`, as `hourly.add` of each would (but for
        which model names count under hourly.OTHER_MODEL once there are too many: here the
        first in hour order, file by file)."""
        for v in self.views:
            hours = v.part.buckets()
            for hour in sorted(h for h in hours if h is not None):
                b = hours[hour]
                if _is_hour(hour):
                    hourly.add_hour(hour, b[GROUPS].items(), b[LATENCY].items())
                else:  # (a `ts` of 24 characters that is no time: skipped like none)
                    hourly.skipped += sum(c[0] for c in b[GROUPS].values())
            b = hours.get(None)
            if b is not None:
                hourly.skipped += sum(c[0] for c in b[GROUPS].values())
            if v.extra is not None:
                hourly.add(v.extra)


def _is_hour(hour: str) -> bool:
    try:
        dt.datetime.strptime(hour, "%Y-%m-%dT%H")
    except ValueError:
        return False
    return True


def _read_hours(f: BinaryIO, partial: dict[str, tuple[int, int]],
                sink: Callable[[dict], Any]) -> None:
    """Feed the records of the hours `partial` ({hour: byte range}) of one file to
    `sink`, each once, reading each byte once."""
    ranges = sorted(partial.values())
    merged: list[list[int]] = []
    for a, z in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], z)
        else:
            merged.append([a, z])

    def keep(r: dict) -> None:
        ts = record_ts(r)
        if ts is not None and ts[:13] in partial:
            sink(r)

    for a, z in merged:
        _read(f, a, z, lambda data, _pos: scan_lines(data, keep))


# --------------------------------------------------------------------------- the cache


class HourCache:
    """The cache of the log at `log_path` (the files `totals.read_into` reads: each
    worker's log beside it too), in `<log_path>.hours`."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.sidecar = sidecar_path(self.log_path)
        self._parts: dict[str, Part] = {}
        self._on_disk: dict[str, int] | None = None  # {head: offset} the sidecar holds
        self._writable = True
        self._stamp: list | None = None  # the log's files when refresh last saved

    def _read_sidecar(self, written_before_ns: int | None, parse: bool) -> dict[str, Part]:
        """The sidecar's entries: a first line {"version": n}, then two lines per file."""
        self._on_disk, self._writable = None, True
        try:
            if written_before_ns is not None and \
                    os.stat(self.sidecar).st_mtime_ns >= written_before_ns:
                return {}
            lines = self.sidecar.read_bytes().split(b"\n")
            doc = orjson.loads(lines[0])
            version = doc.get("version")
            if type(version) is int and version > VERSION:
                log.warning("keygate: %s was written by a newer keygate (version %r); "
                            "reading the log without it and leaving it as it is",
                            self.sidecar, version)
                self._writable = False
                return {}
            if version != VERSION:
                return {}
            if len(lines) % 2 != 0 or lines[-1]:
                raise ValueError("not whole")
            parts = [_part_from(lines[i], lines[i + 1], parse)
                     for i in range(1, len(lines) - 1, 2)]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:
            log.warning("keygate: ignoring %s (%s); reading the log again", self.sidecar, e)
            return {}
        known = {p.head: p for p in parts}
        self._on_disk = {h: p.offset for h, p in known.items()}
        return known

    def survey(self, *, use_cache: bool = True, written_before_ns: int | None = None,
               watch: Any = None, seen: set | None = None, parse: bool = True) -> Survey:
        """Every file of the log, summarised from the cache where it is valid and by reading
        what it does not cover. `written_before_ns`: use the sidecar only if it was written
        before then. Ids of records read (not taken from the cache) that are in `watch`
        go into `seen`. `parse` false: the hours of a file that did not grow are not
        read from the sidecar (only written back), for a survey that is only saved.
        OSError if a file cannot be read."""
        known = self._read_sidecar(written_before_ns, parse) if use_cache else {}
        seen = set() if seen is None else seen
        views: list[View] = []
        try:
            for live in log_family(self.log_path):
                opened = []
                with _ledger.sidecar_lock(_ledger.sidecar_path(live)):
                    for p in log_files(live):
                        try:
                            opened.append((p, open(p, "rb")))
                        except FileNotFoundError:
                            continue
                for p, f in opened:
                    views.append(_view(p, f, known, watch, seen))
        except BaseException:
            for v in views:
                v.f.close()
            raise
        self._parts = {v.part.head: v.part for v in views
                       if v.part.head is not None and v.part.offset > 0}
        return Survey(views)

    def save(self) -> bool:
        """Write what the last survey found, if the sidecar on disk says less; whether the
        sidecar now says it. Never raises: a cache that cannot be written costs time."""
        parts = self._parts
        if self._on_disk == {h: p.offset for h, p in parts.items()} or (
                not parts and self._on_disk is None):
            return True  # (no log, no cache: nothing is written where there is no log)
        if not self._writable:
            return False
        try:
            text = b'{"version":%d}\n' % VERSION + b"".join(
                p.lines() for p in parts.values())
            with _write_lock:
                _ledger._remove_stale_temps(self.sidecar)
                write_atomic(self.sidecar, text, 0o644, durable=False,
                             tmp=self.sidecar.with_name(f"{self.sidecar.name}.{os.getpid()}.tmp"))
        except (OSError, ValueError, TypeError) as e:
            log.debug("keygate: cannot write %s: %s", self.sidecar, e)
            return False
        self._on_disk = {h: p.offset for h, p in parts.items()}
        return True

    def refresh(self) -> None:
        """Bring the sidecar up to date with the log (the running gateway, in a thread);
        nothing to do while no file of the log changed since the last time."""
        stamp = []
        for live in log_family(self.log_path):
            for p in log_files(live):
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                stamp.append((p.name, st.st_ino, st.st_size, st.st_mtime_ns))
        if stamp == self._stamp and self.sidecar.exists():
            return
        with self.survey(parse=False):
            pass
        if self.save():
            self._stamp = stamp
        self._parts = {}  # (not kept in memory between refreshes)

    def load_hourly(self, hourly: Hourly, watch: Any = None, seen: set | None = None,
                    written_before_ns: int | None = None) -> None:
        """Fill `hourly` with every record of the log, from the cache and the lines it does
        not cover, and bring the sidecar up to date (the gateway's start-up, in a thread)."""
        with self.survey(watch=watch, seen=seen, written_before_ns=written_before_ns) as s:
            s.fill(hourly)
        self.save()
        self._parts = {}


def _view(path: Path, f: BinaryIO, known: dict[str, Part], watch: Any, seen: set) -> View:
    size = os.fstat(f.fileno()).st_size
    head = _ledger._head(f)
    part = known.pop(head, None) if head is not None else None  # (one file per entry)
    if part is not None and not (part.offset <= size
                                 and _ledger._tail(f, part.offset) == part.tail):
        part = None  # truncated or rewritten: read it again
    if part is not None and size > part.offset:  # (lines to add to its hours)
        try:
            part.buckets()
        except (ValueError, TypeError, KeyError, ArithmeticError) as e:
            log.warning("keygate: the hour cache's entry for %s is damaged (%s); reading the "
                        "file again", path, e)
            part = None
    if part is None:
        part = Part(head)
    fold = _folder(part.hours, watch, seen)
    end, bad, rest = _read(f, part.offset, None, lambda data, pos: scan_lines(data, fold, pos))
    if end != part.offset:
        part.offset, part.bad, part.text = end, part.bad + bad, None
        part.tail = _ledger._tail(f, end)
    extra, torn = None, 0
    if rest.strip():  # a torn last line is garbage; a complete one without "\n" counts
        extra = parse_line(rest)
        if extra is None:
            torn = 1
        elif watch:
            rid = extra.get("id")
            if type(rid) is str and rid in watch:
                seen.add(rid)
    return View(path, f, part, extra, part.bad + torn)


__all__ = ["HourCache", "Survey", "INTERVAL", "sidecar_path"]
