"""`scripts/usage`: totals from the usage log (SPEC 8).

    usage [--config PATH] [--log PATH] [--since 30m|24h|7d|DATE] [--until ..]
          [--by key,model,channel,day] [--format table|json|toml]

Reads the rotated files (oldest first) and the live file, skips garbage and a torn last
line (counted on stderr), and prints one row per group. Everything but `main` is pure.

Group values are what clients sent (a model name is any string a valid key sends), so no
output passes them through raw: the table escapes and cuts them (keygate.cli.tables), and the
JSON and TOML texts write the characters a terminal would act on as escapes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from keygate.accounting.log import log_files, read_records
from keygate.cli.tables import escape, escape_encoded, escape_surrogates, render_table

GROUPS = ("key", "model", "channel", "day")
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors")
FORMATS = ("table", "json", "toml")
MAX_GROUP_WIDTH = 60  # columns of a group value in a table; longer ones are cut, marked
KEY_NAME_MAX = 128  # the longest key name keys.yaml allows
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+)([smhdw])")


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    errors: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Row:
    group: tuple[str | None, ...]  # values of the --by fields, in order
    totals: Totals


# --------------------------------------------------------------------------- parsing


def parse_when(text: str, now: datetime) -> datetime:
    """`30m`, `24h`, `7d`, `2w`, `90s` (back from `now`) or an ISO 8601 date or datetime
    (UTC when it has no zone). ValueError with a message for the user otherwise."""
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        return now - timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])
    try:
        if len(text.strip()) == 10:
            d = date.fromisoformat(text.strip())
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 30m, 24h, 7d nor an ISO 8601 "
                         "date or datetime") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def parse_by(values: Iterable[str]) -> tuple[str, ...]:
    """`--by key,model --by day` -> ("key", "model", "day"); duplicates dropped."""
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


def record_ts(record: dict) -> str | None:
    """The record's `ts` in canonical form, or None if it has no readable one."""
    ts = record.get("ts")
    if type(ts) is not str:
        return None
    if len(ts) == 24 and ts[10] == "T" and ts[23] == "Z":
        return ts  # what keygate writes: no parsing needed
    try:
        t = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return canonical(t if t.tzinfo else t.replace(tzinfo=timezone.utc))


# --------------------------------------------------------------------------- counting


def _int(v: Any) -> int:
    return v if type(v) is int else 0


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
            c = self._acc[group] = [0, 0, 0, 0, 0]
        c[0] += 1
        c[1] += _int(r.get("prompt_tokens"))
        c[2] += _int(r.get("completion_tokens"))
        c[3] += _int(r.get("total_tokens"))
        c[4] += r.get("error") is not None

    def rows(self) -> list[Row]:
        """Rows sorted by group (nulls first). With no `by`: exactly one row, zeros if no
        record matched, like SQL's aggregate without GROUP BY."""
        acc = dict(self._acc)
        if not self.by and not acc:
            acc[()] = [0, 0, 0, 0, 0]
        order = sorted(acc, key=lambda g: tuple((v is not None, v or "") for v in g))
        return [Row(g, Totals(*acc[g])) for g in order]


def aggregate(records: Iterable[dict], by: tuple[str, ...], since: str | None = None,
              until: str | None = None) -> list[Row]:
    """`Summer` over an iterable."""
    summer = Summer(by, since, until)
    for r in records:
        summer.add(r)
    return summer.rows()


def _group_value(record: dict, name: str, ts: str | None) -> str | None:
    if name == "day":
        return ts[:10] if ts else None
    v = record.get(name)
    return v if v is None or type(v) is str else json.dumps(v)


def total(rows: list[Row]) -> Totals:
    out = Totals()
    for row in rows:
        out = out + row.totals
    return out


def read_into(log_path: Path, sink: Callable[[dict], Any]) -> int:
    """Feed every record of the log to `sink`, rotated files (oldest first) then the live
    file; return the number of garbage lines skipped (a torn last line among them)."""
    return sum(read_records(p, sink) for p in log_files(log_path))


# --------------------------------------------------------------------------- output


def _row_dict(row: Row, by: tuple[str, ...]) -> dict[str, Any]:
    d: dict[str, Any] = dict(zip(by, row.group))
    d.update((name, getattr(row.totals, name)) for name in COUNTERS)
    return d


def format_json(rows: list[Row], by: tuple[str, ...]) -> str:
    text = json.dumps([_row_dict(r, by) for r in rows], indent=2, ensure_ascii=False)
    return escape_encoded(text)  # C1, DEL, bidi and lone surrogates as \uXXXX


def format_toml(rows: list[Row], by: tuple[str, ...]) -> str:
    import tomli_w  # only this format needs it

    # TOML has no null: a group value that is null (no key, no model) is left out. Nor
    # has it an escape for a lone surrogate (a byte that was not UTF-8): those show as text.
    table = [{k: escape_surrogates(v) if type(v) is str else v
              for k, v in _row_dict(r, by).items() if v is not None} for r in rows]
    return escape_encoded(tomli_w.dumps({"rows": table}).rstrip("\n"))


def format_table(rows: list[Row], by: tuple[str, ...],
                 max_width: int | None = MAX_GROUP_WIDTH) -> str:
    """Aligned columns, a header and a TOTAL row; "-" stands for null. Without groups
    only the TOTAL row is shown. Group values are escaped and cut at `max_width` columns
    (keygate.cli.tables): a client's model name can neither act on the terminal nor forge or
    widen a row; a key name (at most 128 characters) is never cut."""
    labels = list(by) or [""]
    counters = [[f"{getattr(t, c):,}" for c in COUNTERS] for t in [r.totals for r in rows]]
    grid = [labels + list(COUNTERS)]
    if by:
        grid += [["-" if v is None else v for v in r.group] + cs for r, cs in zip(rows, counters)]
    whole = total(rows)
    grid.append(["TOTAL"] + [""] * (len(labels) - 1)
                + [f"{getattr(whole, c):,}" for c in COUNTERS])
    caps = [max(max_width, KEY_NAME_MAX) if max_width is not None and name == "key"
            else max_width for name in labels]
    return render_table(grid, right=range(len(labels), len(grid[0])),
                        max_width=caps + [None] * len(COUNTERS))


RENDER = {"table": format_table, "json": format_json, "toml": format_toml}


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="usage",
        description="Totals of requests, tokens and errors from keygate's usage log "
                    "(rotated files included), grouped as asked.",
        epilog="Times: a duration back from now (30m, 24h, 7d, also s and w) or an ISO 8601 "
               "date or datetime, UTC when it has no zone; --since is inclusive, --until "
               "exclusive. 'errors' counts records with a non-null error. Null group values "
               "(no key, model or channel) show as '-' in tables, null in JSON, and are "
               "omitted from TOML rows (TOML has no null).",
    )
    p.add_argument("--config", metavar="PATH",
                   help="gateway.toml to take usage_log from (default: config/gateway.toml "
                        "of the checkout)")
    p.add_argument("--log", metavar="PATH", help="usage log to read instead of the configured one")
    p.add_argument("--since", metavar="WHEN", help="only requests from this time on")
    p.add_argument("--until", metavar="WHEN", help="only requests before this time")
    p.add_argument("--by", action="append", default=[], metavar="FIELDS",
                   help=f"group by {','.join(GROUPS)} (comma-separated, may repeat)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (table)")
    return p


def _log_path(args: argparse.Namespace) -> Path:
    if args.log:
        return Path(args.log).expanduser()
    from keygate.model.settings import load_settings  # here: with --log no config is read at all

    return load_settings(args.config).usage_log


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    now = datetime.now(timezone.utc)
    try:
        by = parse_by(args.by)
        since = parse_when(args.since, now) if args.since else None
        until = parse_when(args.until, now) if args.until else None
    except ValueError as e:
        parser.error(str(e))
    if since and until and since > until:
        parser.error("--since is after --until")
    try:
        log_path = _log_path(args)
    except ValueError as e:  # keygate.model.settings.ConfigError is a ValueError
        parser.error(escape(str(e)))
    summer = Summer(by, since and canonical(since), until and canonical(until))
    try:
        bad = read_into(log_path, summer.add)
    except OSError as e:
        parser.error(escape(f"cannot read {log_path}: {e}"))
    rows = summer.rows()
    if bad:
        lines = f"{bad} line{'s' if bad != 1 else ''}"
        print(f"usage: skipped {lines} of {escape(str(log_path))} that are not JSON records",
              file=sys.stderr)
    print(RENDER[args.format](rows, by))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
