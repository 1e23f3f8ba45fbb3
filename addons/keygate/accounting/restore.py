"""Redis' period counters rebuilt from the usage logs (docs/shared-state.md#restoring-counters).

Day, month and lifetime counters in Redis say what the logs say only as long as Redis
keeps its data: a Redis restarted without persistence, or flushed, has none. keygate then
rebuilds them from the logs it can read: every log of the usage log's folder (each
worker's, `log_family`), rotated files and the counts of deleted files included (each
log's ledger, accounting/ledger.py). `keygate usage --restore-counters` does it on demand;
a keygate process does it at start-up, and when Redis answers again, if MARKER is gone.

The hourly totals that /keygate/usage reads with Redis (`keygate:h:HOUR`,
docs/shared-state.md#usage-totals-of-every-instance) are rebuilt with them, from the
records of the logs (rotated files included; deleted files' records are gone).

Rate windows (rpm, tpm) and requests in flight are not in the logs: they start afresh.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from keygate.accounting.ledger import Counters, Ledger
from keygate.accounting.log import log_family, log_files, read_records
from keygate.accounting.shared import (
    BACK,
    BACK_MS,
    DAY_TTL_MS,
    HOUR_TTL_MS,
    HOURLY,
    HOURS,
    MARKER,
    MONTH_TTL_MS,
    PREFIX,
    hour_fields,
    hour_item,
    key_base,
)

LOCK = PREFIX + "restoring"
LOCK_MS = 120_000
CATCH_UP_S = 3.0  # lines of requests that started before BACK, written after the first read


def base_log(usage_log: Path, instance: str) -> Path:
    """The configured usage log of a worker of `keygate serve --workers`, whose own log is
    `instance_log(base, instance)`; any other log is its own base."""
    from keygate.model.settings import instance_log

    for stem_end in range(len(usage_log.stem) - 1, 0, -1):
        if usage_log.stem[stem_end] != "-":
            continue
        base = usage_log.with_name(usage_log.stem[:stem_end] + usage_log.suffix)
        if instance_log(base, instance) == usage_log:
            return base
    return usage_log


def counters_from_logs(usage_log: Path) -> Counters:
    """Every log of `usage_log`'s folder counted together."""
    whole = Counters()
    for live in log_family(usage_log):
        ledger = Ledger.load(live)
        whole.merge(ledger._tally)
    return whole


def counters_since(usage_log: Path, since: str) -> Counters:
    """The lines of the folder's logs whose request started at `since` (an ISO time as the
    lines write it) or later: those of the last moments, in the live files and the files
    just rotated out of them."""
    later = Counters()

    def sink(record: dict) -> None:
        ts = record.get("ts")
        if type(ts) is str and ts >= since:
            later.add(record)

    for live in log_family(usage_log):
        for path in log_files(live)[-2:]:
            read_records(path, sink)
    return later


def hours_from_logs(usage_log: Path, before: str | None = None) -> dict[str, dict]:
    """The hourly totals of the folder's logs as HOURLY adds them ({hour: {field: [op,
    amount]}}, accounting/shared.py's `hour_fields`): every record, or those of requests
    that started before `before`; hours past the retention are left out."""
    out: dict[str, dict] = {}
    models: set[str] = set()
    oldest = iso(int((time.time() - HOUR_TTL_MS / 1000) * 1000))[:13]

    def sink(record: dict) -> None:
        item = hour_item(record, models)
        if item is None or item[1] < oldest or (before is not None and item[0] >= before):
            return
        hour_fields((item,), out)

    for live in log_family(usage_log):
        for path in log_files(live):
            read_records(path, sink)
    return out


def write_hours(client, hours: dict[str, dict], minus: dict[str, dict] | None = None,
                replace: bool = False) -> None:
    """Add `hours` (less `minus`) to Redis' hourly totals; with `replace`, every hour
    Redis holds is deleted first, so they become what the logs say."""
    from keygate.model.prices import MONEY, money_text

    sha = client.script_load(HOURLY)
    pipe = client.pipeline(transaction=False)
    if replace:
        for name in client.scan_iter(match=HOURS + "*", count=1000):
            pipe.delete(name)
    queued = 0
    for hour, fields in hours.items():
        less = (minus or {}).get(hour, {})
        args: list = []
        for field, (op, n) in fields.items():
            was = less.get(field)
            d = MONEY.subtract(n, was[1] if was else 0) if op == "d" else n - (
                was[1] if was else 0)  # (money: exact, Decimal's default context rounds)
            if d > 0 or (op == "d" and was is None):  # (a cost of 0 is not "no cost")
                args += (op, field, money_text(d) if op == "d" else d)
        if args:
            pipe.evalsha(sha, 1, HOURS + hour, HOUR_TTL_MS, *args)
            queued += 1
            if queued % 500 == 0:
                pipe.execute()
    pipe.execute()


def _values(counters: Counters) -> dict[tuple[str, str], dict[str, object]]:
    """{(key name, period key suffix): {field: value}} of `counters`, as Redis holds them."""
    out: dict[tuple[str, str], dict[str, object]] = {}
    totals, days = counters.snapshot()
    for name, tokens in totals.items():
        out.setdefault((name, "all"), {})["t"] = tokens
    for (name, day), (r, t) in days.items():
        out.setdefault((name, f"d:{day}"), {}).update(r=r, t=t)
    for (name, month), (r, t) in counters.month_snapshot().items():
        out.setdefault((name, f"m:{month}"), {}).update(r=r, t=t)
    money = getattr(counters, "money_snapshot", None)
    if money is not None:  # the lines' cost, for budgets
        spent, spent_days, spent_months = money()
        for name, amount in spent.items():
            out.setdefault((name, "all"), {})["c"] = amount
        for (name, day), amount in spent_days.items():
            out.setdefault((name, f"d:{day}"), {})["c"] = amount
        for (name, month), amount in spent_months.items():
            out.setdefault((name, f"m:{month}"), {})["c"] = amount
    return out


def _net(whole: Counters, later: Counters | None) -> dict[tuple[str, str], dict]:
    """`whole` less `later`, field by field (Redis' layout: `_values`)."""
    values = _values(whole)
    if later is None:
        return values
    for where, fields in _values(later).items():
        mine = values.setdefault(where, {})
        for f, v in fields.items():
            mine[f] = mine.get(f, 0) - v
    return values


def _before(usage_log: Path, since: str) -> dict[tuple[str, str], dict]:
    """What the logs count of requests that started before `since`: all of it less the
    lines from `since` on. Those are read first: a line written between the two reads is
    then counted here and by Redis (twice, never not at all)."""
    later = counters_since(usage_log, since)
    return _net(counters_from_logs(usage_log), later)


def _write(client, values: dict[tuple[str, str], dict], add: bool,
           minus: dict[tuple[str, str], dict] | None = None) -> None:
    """Set Redis' period counters to `values`, or add `values` (less `minus`) to them;
    then set MARKER."""
    pipe = client.pipeline(transaction=False)
    for where, fields in values.items():
        key = key_base(where[0]) + where[1]
        if not add:
            pipe.hset(key, mapping={f: str(v) for f, v in fields.items()})
        else:
            for f, v in fields.items():
                delta = v - (minus or {}).get(where, {}).get(f, 0)
                if delta and f == "c":
                    pipe.hincrbyfloat(key, f, str(delta))
                elif delta:
                    pipe.hincrby(key, f, delta)
        if where[1] != "all":
            pipe.pexpire(key, DAY_TTL_MS if where[1].startswith("d:") else MONTH_TTL_MS)
    pipe.set(MARKER, "1")
    pipe.delete(BACK)
    pipe.execute()


def write_counters(client, counters: Counters) -> int:
    """Set Redis' period counters to `counters` (a synchronous redis-py client): the
    lifetime, day and month counts (requests, tokens and money) replace what Redis holds;
    then MARKER is set. Returns how many keys' counters were written."""
    values = _values(counters)
    _write(client, values, add=False)
    return len({name for name, _ in values})


def iso(ms: int) -> str:
    """A time in ms as the usage lines write `ts`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def restore(client, usage_log: Path, only_if_missing: bool,
            catch_up: float = CATCH_UP_S) -> int | None:
    """Rebuild the counters from the logs of `usage_log`'s folder.

    Without `only_if_missing` (`keygate usage --restore-counters`), Redis' counters are set
    to what the logs say. With it (a keygate process), only when MARKER is gone, and only
    by one process at a time (the others find the marker set afterwards); then what Redis
    counted since BACK (when the first process found it without its counters) is kept,
    and the lines of requests that started before BACK are added to it, twice over: at
    once, and `catch_up` seconds later those that were still being written then. Returns
    the number of keys written, None if nothing was done."""
    if not only_if_missing:
        write_hours(client, hours_from_logs(usage_log), replace=True)
        return write_counters(client, counters_from_logs(usage_log))
    if client.exists(MARKER):
        return None
    client.set(BACK, int(time.time() * 1000), nx=True, px=BACK_MS)
    token = secrets.token_hex(16)
    if not client.set(LOCK, token, nx=True, px=LOCK_MS):
        return None  # another keygate process is at it
    try:
        if client.exists(MARKER):
            return None  # another one finished between the look above and the lock
        back = client.get(BACK)
        since = iso(int(back)) if back else iso(int(time.time() * 1000))
        hours_first = hours_from_logs(usage_log, before=since)
        write_hours(client, hours_first)
        first = _before(usage_log, since)
        _write(client, first, add=True)
        time.sleep(catch_up)
        if client.exists(MARKER):  # (flushed meanwhile: the next rebuild starts over)
            write_hours(client, hours_from_logs(usage_log, before=since), minus=hours_first)
            second = _before(usage_log, since)
            _write(client, second, add=True, minus=first)
    finally:
        # (Only this process's lock: one that outlived LOCK_MS may be another's by now.)
        client.eval(_UNLOCK, 1, LOCK, token)
    return len({name for name, _ in first})


_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
