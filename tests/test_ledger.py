"""Ledger: counters equal a naive full recount of every line the log ever held, the lines
of files that rotation deleted included (carried in the sidecar), with or without the
sidecar's cache of the files on disk, after rotation, torn lines, garbage, and crashes
(simulated and real kill -9)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ADDONS = Path(__file__).resolve().parents[1] / "addons"
sys.path.insert(0, str(ADDONS))

from keygate.accounting import ledger as ledger_module  # noqa: E402
from keygate.accounting.ledger import (  # noqa: E402
    REFUSED,
    SIDECAR_VERSION,
    Counters,
    Ledger,
    counts,
    day_of,
    month_before,
    read_sidecar,
    sidecar_path,
    tokens_of,
)
from keygate.accounting.log import LogFile, Target, UsageWriter, encode, rotated_name  # noqa: E402

BASE = date(2026, 11, 20)
REAL_LATEST_DAY = ledger_module.latest_day


@pytest.fixture(autouse=True, scope="module")
def any_day_is_past():
    """The records here are dated from BASE on, some of them after the day the tests run:
    for these tests no day is too far ahead of the clock (latest_day; its own test below
    puts it back)."""
    ledger_module.latest_day = lambda: "9999-12-31"
    yield
    ledger_module.latest_day = REAL_LATEST_DAY


# --------------------------------------------------------------------------- the reference


def naive_records(path: Path, keep: int | None = None) -> list[dict]:
    """Every record of the log's files on disk (`.keep` .. `.1` and the live file; with
    keep None, every `.N` there is), read the simplest way."""
    if keep is None:
        numbers = sorted((int(m.group(1)) for x in path.parent.glob(path.name + ".*")
                          if (m := re.fullmatch(re.escape(path.name) + r"\.(\d+)", x.name))),
                         reverse=True)
    else:
        numbers = range(keep, 0, -1)
    out = []
    for p in [path.with_name(f"{path.name}.{k}") for k in numbers] + [path]:
        if p.is_file():
            out.extend(records_of(p))
    return out


def records_of(p: Path) -> list[dict]:
    out = []
    for line in p.read_bytes().split(b"\n"):
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def naive_day(ts) -> str | None:
    if not isinstance(ts, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", ts[:10]):
        return None
    try:
        date.fromisoformat(ts[:10])
    except ValueError:
        return None
    return ts[:10]


def naive_counts(records: list[dict], window: int = 3):
    """(tokens per key, {(key, day): (requests, tokens)} for the newest `window` days)."""
    totals: dict[str, int] = defaultdict(int)
    per: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        key, err = r.get("key"), r.get("error")
        if not isinstance(key, str) or (isinstance(err, str) and err in REFUSED):
            continue
        t = r.get("total_tokens")
        tokens = t if isinstance(t, int) and not isinstance(t, bool) and t > 0 else 0
        totals[key] += tokens
        d = naive_day(r.get("ts"))
        if d is not None:
            per[(key, d)][0] += 1
            per[(key, d)][1] += tokens
    if per:
        newest = max(date.fromisoformat(d) for _, d in per)
        horizon = (newest - timedelta(days=window - 1)).isoformat()
        per = {kd: v for kd, v in per.items() if kd[1] >= horizon}
    return dict(totals), {kd: tuple(v) for kd, v in per.items()}


def naive_months(records: list[dict]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(key, month): (requests, tokens)} for the newest day's month and the one before."""
    per: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    newest = ""
    for r in records:
        key, err = r.get("key"), r.get("error")
        d = naive_day(r.get("ts"))
        if not isinstance(key, str) or (isinstance(err, str) and err in REFUSED) or d is None:
            continue
        t = r.get("total_tokens")
        per[(key, d[:7])][0] += 1
        per[(key, d[:7])][1] += t if isinstance(t, int) and not isinstance(t, bool) and t > 0 else 0
        newest = max(newest, d)
    if not newest:
        return {}
    y, m = int(newest[:4]), int(newest[5:7])
    before = f"{y - 1}-12" if m == 1 else f"{y:04d}-{m - 1:02d}"
    return {km: tuple(v) for km, v in per.items() if km[1] >= before}


def assert_recount(ledger: Ledger, records: list[dict]) -> None:
    totals, days = naive_counts(records)
    assert ledger.snapshot() == (totals, days)
    for (key, day), (r, t) in days.items():
        assert ledger.requests_on(key, day) == r
        assert ledger.tokens_on(key, day) == t
    for key, t in totals.items():
        assert ledger.tokens_total(key) == t
    months = naive_months(records)
    assert ledger.month_snapshot() == months
    for (key, month), (r, t) in months.items():
        assert (ledger.requests_in_month(key, month), ledger.tokens_in_month(key, month)) == (r, t)


def rec(i: int, key="alice", error=None, day: int = 0, tokens: int = 10, **extra) -> dict:
    ts = (BASE + timedelta(days=day)).isoformat() + f"T12:00:{i % 60:02d}.{i % 1000:03d}Z"
    r = {"ts": ts, "id": f"req_{i:020x}", "key": key, "status": 200, "error": error,
         "method": "POST", "path": "/api/chat", "model": "llama3.2", "upstream_model": "llama3.2",
         "channel": "local", "stream": True, "prompt_tokens": tokens // 2,
         "completion_tokens": tokens - tokens // 2, "total_tokens": tokens,
         "duration_ms": 12.5, "client_ip": "127.0.0.1", "completed": True}
    r.update(extra)
    return r


def write_log(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("record, expected", [
    ({"key": "a", "error": None}, True),
    ({"key": "a", "error": "upstream_error"}, True),  # forwarded: counts
    ({"key": "a", "error": "upstream_timeout"}, True),
    ({"key": "a", "error": "rate_limit_exceeded"}, False),
    ({"key": "a", "error": "insufficient_quota"}, False),
    ({"key": "a", "error": "gateway_unavailable"}, False),
    ({"key": "a", "error": "request_timeout"}, False),  # its body never came: not forwarded
    ({"key": None, "error": None}, False),
    ({"error": None}, False),
    ({"key": "a"}, True),
    ({"key": 5, "error": None}, False),
    ({"key": "a", "error": ["odd"]}, True),  # unhashable junk must not raise
])
def test_counts(record, expected):
    assert counts(record) is expected


def test_refused_is_every_code_keygate_answers_itself():
    assert REFUSED == {
        "invalid_request", "invalid_api_key", "permission_denied", "unknown_endpoint",
        "model_not_found", "request_too_large", "rate_limit_exceeded", "insufficient_quota",
        "gateway_unavailable", "request_timeout"}


@pytest.mark.parametrize("ts, day", [
    ("2026-11-26T22:42:26.123Z", "2026-11-26"),
    ("2026-11-26", "2026-11-26"),
    ("2026-02-30T00:00:00.000Z", None),
    ("2026-W48-4", None),
    ("26-11-2026", None),
    ("", None),
    (None, None),
    (1764197000, None),
])
def test_day_of(ts, day):
    assert day_of(ts) == day


def test_tokens_of():
    assert [tokens_of({"total_tokens": v}) for v in (5, 0, -3, True, 2.5, None, "7")] == [
        5, 0, 0, 0, 0, 0, 0]
    assert tokens_of({}) == 0


def test_add_counts_and_queries():
    led = Ledger()
    led.add(rec(1, tokens=100))
    led.add(rec(2, tokens=50, day=1))
    led.add(rec(3, key="bob", tokens=7, day=1))
    led.add(rec(4, error="rate_limit_exceeded", tokens=1000, day=1))  # refused: nothing
    led.add(rec(5, key=None, tokens=1000, day=1))
    led.add(rec(6, error="upstream_error", tokens=0, day=1))
    d0, d1 = BASE.isoformat(), (BASE + timedelta(days=1)).isoformat()
    assert (led.requests_on("alice", d0), led.tokens_on("alice", d0)) == (1, 100)
    assert (led.requests_on("alice", d1), led.tokens_on("alice", d1)) == (2, 50)
    assert led.tokens_total("alice") == 150
    assert led.tokens_total("bob") == 7
    assert led.requests_on("carol", d1) == 0 and led.tokens_total("carol") == 0


def test_memory_stays_bounded_to_the_window():
    led = Ledger()
    for i in range(3000):
        led.add(rec(i, key=f"k{i % 7}", day=i // 100))  # 30 days
    _, days = led.snapshot()
    assert {d for _, d in days} == {(BASE + timedelta(days=n)).isoformat() for n in (27, 28, 29)}
    assert led.tokens_total("k0") == 10 * len(range(0, 3000, 7))


def test_months_are_counted_and_bounded_to_this_month_and_the_last():
    led = Ledger()
    for i in range(400):
        led.add(rec(i, key=f"k{i % 2}", day=i, tokens=3))  # 2026-11-20 + 400 days
    months = {m for _, m in led.month_snapshot()}
    assert months == {"2027-11", "2027-12"}
    assert led.requests_in_month("k0", "2027-12") == 12  # Dec 1..24: every other day
    assert led.tokens_in_month("k1", "2027-11") == 3 * 15
    assert led.requests_in_month("k0", "2027-10") == 0  # gone with the window
    assert [month_before(m) for m in ("2027-01", "2027-12", "2026-10")] == [
        "2026-12", "2027-11", "2026-09"]


def test_a_late_record_counts_in_its_month_after_its_day_is_gone():
    led = Ledger()
    led.add(rec(1, day=10))  # 2026-11-30
    led.add(rec(2, day=0, tokens=7))  # a long stream of 2026-11-20, logged late
    assert led.requests_on("alice", "2026-11-20") == 0  # before the day window
    assert (led.requests_in_month("alice", "2026-11"), led.tokens_in_month(
        "alice", "2026-11")) == (2, 17)


# hypothesis: records as the gateway writes them, plus the junk a log can hold
keys = st.sampled_from(["alice", "bob", "carol", None])
odd_keys = st.one_of(keys, st.integers(), st.just(""))
errors = st.one_of(st.none(), st.sampled_from(sorted(REFUSED) + ["upstream_error",
                                                                  "upstream_timeout"]))
odd_errors = st.one_of(errors, st.integers(), st.lists(st.integers(), max_size=1))
stamps = st.builds(lambda d, s: (BASE + timedelta(days=d)).isoformat() + s,
                   # most within days, some across months and a year's end
                   st.one_of(st.integers(0, 9), st.integers(10, 70)),
                   st.sampled_from(["T00:00:00.000Z", "T23:59:59.999Z"]))
odd_stamps = st.one_of(stamps, st.text(max_size=12), st.none(), st.just("2026-13-01T00:00Z"))
tokens = st.one_of(st.integers(0, 10_000), st.integers(-5, 5), st.booleans(), st.none())


SLOW_OK = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def records(draw, odd=True):
    r = {"ts": draw(odd_stamps if odd else stamps), "key": draw(odd_keys if odd else keys),
         "error": draw(odd_errors if odd else errors),
         "total_tokens": draw(tokens if odd else st.integers(0, 10_000))}
    if odd and draw(st.booleans()):
        del r[draw(st.sampled_from(sorted(r)))]
    return r


@SLOW_OK
@given(st.lists(records(), max_size=80))
def test_add_equals_naive_recount(rs):
    led = Ledger()
    for r in rs:
        led.add(r)
    assert_recount(led, rs)


@settings(SLOW_OK, max_examples=400)
@given(st.lists(st.one_of(records(odd=False), records()), max_size=60),
       st.lists(st.integers(0, 100), max_size=4))
def test_merge_of_pieces_equals_the_whole(rs, cuts_percent):
    whole = Counters()
    for r in rs:
        whole.add(r)
    cuts = {c * len(rs) // 100 for c in cuts_percent}
    merged, bounds = Counters(), sorted(cuts | {0, len(rs)})
    for a, b in zip(bounds, bounds[1:]):
        piece = Counters()
        for r in rs[a:b]:
            piece.add(r)
        merged.merge(piece)
    assert merged.snapshot() == whole.snapshot()
    assert Counters.from_json(json.loads(json.dumps(whole.to_json())), 3).snapshot() == \
        whole.snapshot()


def test_merge_drops_what_the_whole_would_have_dropped():
    # A later piece may hold older days (a long stream is logged when it ends).
    late, early = Counters(), Counters()
    late.add(rec(1, day=5))
    early.add(rec(2, day=1))
    whole = Counters()
    whole.add(rec(1, day=5))
    whole.add(rec(2, day=1))
    late.merge(early)
    assert late.snapshot() == whole.snapshot()
    assert late.snapshot()[1] == {("alice", "2026-11-25"): (1, 10)}


# --------------------------------------------------------------------------- load


def test_load_missing_log_is_empty(tmp_path):
    led = Ledger.load(tmp_path / "nothing" / "usage.jsonl", 10)
    assert led.snapshot() == ({}, {})
    assert not (tmp_path / "nothing").exists()


def test_load_rotated_files_garbage_and_torn_line(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, key=["alice", "bob", None][i % 3], day=i // 40,
              error=[None, "upstream_error", "permission_denied"][i % 4 % 3],
              tokens=i) for i in range(200)]
    # Beyond keep (left from a larger one): still the log's until a rotation retires it.
    write_log(rotated_name(p, 3), [encode(r) for r in rs[:10]])
    write_log(rotated_name(p, 2), [encode(r) for r in rs[10:60]] + [b"garbage\n"])
    write_log(rotated_name(p, 1), [encode(r) for r in rs[60:120]] + [b"\n", b"[1,2]\n"])
    write_log(p, [encode(r) for r in rs[120:199]] + [encode(rs[199])[:40]])
    led = Ledger.load(p, 2)
    assert_recount(led, rs[:199])
    assert "skipped 3 lines" in caplog.text
    assert led.stats.bad_lines == 3 and led.stats.files == 4
    assert_recount(Ledger.load(p, 2), rs[:199])  # second time from the sidecar
    assert_recount(Ledger.load(p, 2, use_cache=False), rs[:199])


def test_unterminated_but_whole_last_line_counts(tmp_path):
    p = tmp_path / "usage.jsonl"
    write_log(p, [encode(rec(1)), encode(rec(2))[:-1]])
    assert Ledger.load(p, 3).tokens_total("alice") == 20
    assert Ledger.load(p, 3).tokens_total("alice") == 20


def test_sidecar_saves_the_scan(tmp_path):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, day=i // 100) for i in range(300)]
    write_log(rotated_name(p, 1), [encode(r) for r in rs[:150]])
    write_log(p, [encode(r) for r in rs[150:250]])
    first = Ledger.load(p, 5)
    assert first.stats.reused_bytes == 0 and sidecar_path(p).exists()
    # The gateway appends more lines, then a rotation.
    with open(p, "ab") as f:
        f.write(b"".join(encode(r) for r in rs[250:270]))
    second = Ledger.load(p, 5)
    assert second.stats.scanned_bytes == 20 * len(encode(rs[260]))
    assert_recount(second, rs[:270])
    os.replace(rotated_name(p, 1), rotated_name(p, 2))
    os.replace(p, rotated_name(p, 1))
    write_log(p, [encode(r) for r in rs[270:]])
    third = Ledger.load(p, 5)
    assert third.stats.scanned_bytes == p.stat().st_size  # only the new live file
    assert_recount(third, rs)


def test_sidecar_is_trusted_for_what_it_covers(tmp_path):
    # How we know the cache is really used: an edit in the middle of a covered region
    # (keeping first line and tail) goes unnoticed until the sidecar is deleted. That is
    # the documented contract: rotated files and counted lines are never edited.
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, tokens=5) for i in range(100)]
    lines = [encode(r) for r in rs]
    write_log(p, lines)
    Ledger.load(p, 3)
    for i in (40, 41):  # same length, far from the first line and the tail
        lines[i] = lines[i].replace(b'"total_tokens":5,', b'"total_tokens":6,')
    write_log(p, lines)
    assert Ledger.load(p, 3).tokens_total("alice") == 500
    sidecar_path(p).unlink()
    assert Ledger.load(p, 3).tokens_total("alice") == 502


@pytest.mark.parametrize("damage", ["truncate", "rewrite_tail", "replace", "shrink_then_grow"])
def test_sidecar_is_not_trusted_when_the_file_changed(tmp_path, damage):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, tokens=i) for i in range(100)]
    write_log(p, [encode(r) for r in rs])
    Ledger.load(p, 3)
    if damage == "truncate":
        keep = rs[:50]
    elif damage == "rewrite_tail":
        keep = rs[:90] + [rec(1000 + i, tokens=3) for i in range(10)]
    elif damage == "replace":
        keep = [rec(500 + i) for i in range(100)]
    else:
        keep = rs[:50] + [rec(2000 + i, tokens=1) for i in range(80)]
    write_log(p, [encode(r) for r in keep])
    # A file with another first line is another file: the one counted is gone, and what it
    # held is carried forward like a file rotation deleted. Edits keep the first line.
    assert_recount(Ledger.load(p, 3), rs + keep if damage == "replace" else keep)
    assert_recount(Ledger.load(p, 3, use_cache=False), keep)


@pytest.mark.parametrize("content", [b"{not json", b'{"version":1,"window_days":3}',
                                     b'{"version":1,"window_days":3,"files":[{"head":1}]}',
                                     b"\xff\xfe", b"[]"])
def test_corrupt_sidecar_is_ignored(tmp_path, caplog, content):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i) for i in range(20)]
    write_log(p, [encode(r) for r in rs])
    sidecar_path(p).write_bytes(content)
    assert_recount(Ledger.load(p, 3), rs)
    assert read_sidecar(sidecar_path(p), 3)  # rewritten, usable again


def test_sidecar_of_another_window_is_ignored(tmp_path):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, day=i // 10) for i in range(100)]
    write_log(p, [encode(r) for r in rs])
    Ledger.load(p, 3, window_days=5)
    led = Ledger.load(p, 3)
    assert led.stats.reused_bytes == 0
    assert_recount(led, rs)


def test_unwritable_sidecar_only_warns(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    write_log(p, [encode(rec(1))])
    sidecar_path(p).mkdir()  # cannot be replaced by a file
    led = Ledger.load(p, 3)
    assert led.tokens_total("alice") == 10
    assert "cannot write usage ledger" in caplog.text


def test_checkpoint_follows_the_writer(tmp_path):
    p = tmp_path / "usage.jsonl"
    led = Ledger.load(p, 3)
    f = LogFile(Target(p, 3000, 3), rotate=lambda dropped, renames: led.rotate(
        p, 3, dropped, renames))
    rs = [rec(i, day=i // 30) for i in range(100)]
    for r in rs:
        f.append(deque([encode(r)]))
        led.add(r)
        if r["id"].endswith("7"):
            led.checkpoint(p, 3)
    f.close()
    led.checkpoint()
    again = Ledger.load(p, 3)
    assert again.stats.scanned_bytes == 0  # everything came from the sidecar
    # The in-memory ledger saw every record; the log kept the last few files only, and
    # the sidecar carries the rest: a restart counts what the running gateway counted.
    assert led.tokens_total("alice") == 1000
    assert_recount(again, rs)
    assert again.snapshot() == led.snapshot()
    assert len(naive_records(p)) < len(rs)
    assert_recount(Ledger.load(p, 3, use_cache=False), naive_records(p))


def test_checkpoint_on_a_new_path(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_log(a, [encode(rec(1))])
    write_log(b, [encode(rec(2)), encode(rec(3))])
    led = Ledger.load(a, 3)
    led.checkpoint(b, 3)
    assert Ledger.load(b, 3).stats.scanned_bytes == 0


# --------------------------------------------------------------------------- crashes


def dropped_by_rotation(path: Path, keep: int) -> list[Path]:
    """The files LogFile._rotate deletes (for keep >= 1): .keep when .keep-1 moves onto it."""
    last, before = rotated_name(path, keep), rotated_name(path, keep - 1) if keep > 1 else path
    return [last] if last.exists() and before.exists() else []


def rotation_steps(path: Path, keep: int, led: Ledger, gone: list[dict]) -> list:
    """Ledger.rotate's steps for one rotation, as callables, in order: count, delete (the
    records deleted go to `gone`), each rename, count again."""
    dropped = dropped_by_rotation(path, keep)

    def delete() -> None:
        for p in dropped:
            gone.extend(records_of(p))
            p.unlink()

    renames = [(rotated_name(path, k), rotated_name(path, k + 1)) for k in range(keep - 1, 0, -1)]
    renames.append((path, rotated_name(path, 1)))
    steps = [lambda: led.checkpoint(path, keep), delete]
    steps += [lambda s=s, d=d: s.exists() and os.replace(s, d) for s, d in renames]
    return steps + [lambda: led.checkpoint(path, keep)]


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(1, 25)),
    st.tuples(st.just("checkpoint"), st.just(0)),
    st.tuples(st.just("crash_mid_line"), st.integers(1, 300)),
    st.tuples(st.just("crash_mid_rotation"), st.integers(0, 6)),
    st.tuples(st.just("crash_mid_sidecar"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops, st.randoms(use_true_random=False))
def test_crash_at_any_point_recounts_exactly(tmp_path_factory, steps, rnd):
    """Drive the writer's file operations, rotations and checkpoints step by step; a crash
    (kill -9) can leave a torn line, a rotation half done or a stray temp file. After
    every restart the loaded counters must equal a naive recount of what is on disk plus
    every line of the files rotation deleted."""
    d = tmp_path_factory.mktemp("crash")
    p, keep = d / "usage.jsonl", 3
    target = Target(p, 2500, keep)
    gone: list[dict] = []  # records of the files deleted
    n = 0

    def rotate(dropped, renames):
        for x in dropped:
            gone.extend(records_of(x))
        led.rotate(p, keep, dropped, renames)

    def restart():
        new = Ledger.load(p, keep)
        assert_recount(new, gone + naive_records(p))
        return new, LogFile(target, rotate=rotate)

    led, f = restart()
    for op, arg in steps:
        if op == "write":
            batch = []
            for _ in range(arg):
                # days mostly rise; a long stream is logged late, under an older day
                r = rec(n, key=rnd.choice(["a", "b", None]),
                        day=max(0, n // 20 - rnd.choice([0, 0, 0, 1, 4])),
                        error=rnd.choice([None, None, "upstream_error", "insufficient_quota"]),
                        tokens=rnd.randint(0, 500))
                n += 1
                batch.append(encode(r))
            f.append(deque(batch))
        elif op == "checkpoint":
            led.checkpoint(p, keep)
        elif op == "crash_mid_line":
            f.close()
            line = encode(rec(n, day=n // 20))
            n += 1
            with open(p, "ab") as raw:
                raw.write(line[: min(arg, len(line) - 1)])
            led, f = restart()
        elif op == "crash_mid_rotation":
            f.close()
            if p.exists():
                if not p.read_bytes().endswith(b"\n"):
                    with open(p, "ab") as raw:  # as LogFile.append does before rotating
                        raw.write(b"\n")
                for step in rotation_steps(p, keep, led, gone)[:arg]:
                    step()
            led, f = restart()
        elif op == "crash_mid_sidecar":
            sc = sidecar_path(p)
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout.strip()
            sc.with_name(f"{sc.name}.{dead}.tmp").write_bytes(b'{"version":2,"files":[{"he')
            led, f = restart()
            assert not list(d.glob("*.tmp"))  # cleaned up at load
        else:
            f.close()
            led, f = restart()
    f.close()
    restart()
    assert_recount(Ledger.load(p, keep, use_cache=False), naive_records(p))


def child_record(i: int) -> dict:
    """The records CHILD writes (the same formula)."""
    return {"ts": "2026-11-%02dT10:00:00.000Z" % (1 + i // 400 % 28), "id": "req_%020x" % i,
            "key": ["a", "b", "c", None][i % 4], "status": 200,
            "error": [None, None, "upstream_error", "rate_limit_exceeded"][i % 7 % 4],
            "total_tokens": i % 1000, "path": "/api/chat"}


CHILD = r"""
import itertools, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from keygate.accounting.ledger import Ledger
from keygate.accounting.log import UsageWriter
path, start = Path(sys.argv[2]), int(sys.argv[3])
ledger = Ledger.load(path, 4)
writer = UsageWriter(path, 30_000, 4, checkpoint=ledger.checkpoint, rotate=ledger.rotate,
                     checkpoint_interval=0.003)
print("ready", flush=True)
for i in itertools.count(start):
    r = {"ts": "2026-11-%02dT10:00:00.000Z" % (1 + i // 400 % 28), "id": "req_%020x" % i,
         "key": ["a", "b", "c", None][i % 4], "status": 200,
         "error": [None, None, "upstream_error", "rate_limit_exceeded"][i % 7 % 4],
         "total_tokens": i % 1000, "path": "/api/chat"}
    ledger.add(r)
    writer.write(r)
    if i % 25 == 0:
        time.sleep(0.0005)
"""


def test_kill_9_at_random_moments_recounts_exactly(tmp_path):
    """A writer rotating every ~200 lines, killed at random moments: after each kill the
    counters equal a recount of every line it wrote (rotation deleted most of them)."""
    p = tmp_path / "logs" / "usage.jsonl"
    rnd = random.Random(7)
    reused = 0
    written: list[dict] = []
    for round_ in range(4):
        start = round_ * 10_000_000
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ADDONS), str(p),
                                  str(start)], stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rnd.uniform(0.2, 0.7))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            child.stdout.close()
        # The writer writes in order: every record up to the last one on disk was written.
        mine = [int(r["id"][4:], 16) for r in naive_records(p)
                if start <= int(r["id"][4:], 16) < start + 10_000_000]
        if mine:
            written += [child_record(i) for i in range(start, max(mine) + 1)]
        led = Ledger.load(p, 4)
        reused += led.stats.reused_bytes
        assert_recount(led, written)
        assert_recount(Ledger.load(p, 4, use_cache=False), naive_records(p))
    assert reused > 0  # the sidecar written by the killed writers was used
    assert len(naive_records(p)) < len(written) / 2  # most lines were rotated away


READER = r"""
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from keygate.accounting.ledger import Ledger
path, stop = Path(sys.argv[2]), Path(sys.argv[3])
seen = []
while not stop.exists():
    seen.append(Ledger.load(path, 2).tokens_total("a"))
print(len(seen), max(seen, default=0), flush=True)
"""


def test_a_second_process_counting_while_the_log_rotates_agrees(tmp_path):
    """`scripts/keys list` loads (and writes) the ledger from another process while the
    gateway rotates: it must neither take a file renamed under it for deleted nor write a
    view older than the gateway's. In the end the counters are every line's."""
    p, stop = tmp_path / "usage.jsonl", tmp_path / "stop"
    led = Ledger.load(p, 2)
    w = UsageWriter(p, 3000, 2, checkpoint=led.checkpoint, rotate=led.rotate,
                    checkpoint_interval=0.01, gather=0)
    rs = [child_record(i) for i in range(6000)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(ADDONS), str(p), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # (its start-up)
        for i, r in enumerate(rs):
            led.add(r)
            w.write(r)
            if i % 50 == 0:
                time.sleep(0.002)
        w.close()
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    loads, seen = map(int, out.split())
    assert loads > 5
    final = Ledger.load(p, 2)
    assert_recount(final, rs)
    assert final.snapshot() == led.snapshot()
    assert seen <= final.tokens_total("a")


def test_load_keeps_the_temp_file_of_a_live_writer(tmp_path):
    p = tmp_path / "usage.jsonl"
    write_log(p, [encode(rec(1))])
    sc = sidecar_path(p)
    live = sc.with_name(f"{sc.name}.{os.getppid()}.tmp")
    live.write_bytes(b"being written")
    Ledger.load(p, 3)
    assert live.exists() and read_sidecar(sc, 3)


def test_load_logs_nothing_alarming_for_a_clean_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, "keygate")
    p = tmp_path / "usage.jsonl"
    write_log(p, [encode(rec(i)) for i in range(10)])
    Ledger.load(p, 3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- carried forward
#
# Rotation must not change a quota (docs/usage-log.md): the counts of the files it deletes are
# carried in the sidecar, and tokens_total is the key's lifetime.


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_a_rotating_flood_changes_no_counter(tmp_path, keep):
    """Lines of ~600 KB (what a 600 KB path made before lines were bounded) rotate a
    1 MB log on every line: a restart still counts every line."""
    p = tmp_path / "usage.jsonl"
    led = Ledger.load(p, keep)
    w = UsageWriter(p, 1 << 20, keep, checkpoint=led.checkpoint, rotate=led.rotate)
    rs = [rec(i, key=["quota", "flood"][i % 2], tokens=100, blob="x" * 600_000)
          for i in range(12)]
    for r in rs:
        led.add(r)
        w.write(r)
    w.close()
    # Rotation deleted the rest, and only what it had to: one line a file, keep + 1 files.
    assert len(naive_records(p)) == keep + 1 == len(list(tmp_path.glob("usage.jsonl*"))) - 2
    again = Ledger.load(p, keep)
    assert again.tokens_total("quota") == 600
    assert again.requests_on("quota", BASE.isoformat()) == 6
    assert again.requests_in_month("quota", "2026-11") == 6
    assert again.snapshot() == led.snapshot()
    assert again.stats.retired_files == 0  # all carried by the writer, none found missing


def test_a_summary_whose_file_is_gone_counts_as_retired(tmp_path):
    """A crash between a rotation's deletion and its sidecar write: the sidecar still holds
    the whole file's summary, and the next load carries it forward, once."""
    p = tmp_path / "usage.jsonl"
    old, new = [rec(i, tokens=5) for i in range(30)], [rec(100 + i, tokens=7) for i in range(4)]
    write_log(rotated_name(p, 1), [encode(r) for r in old])
    write_log(p, [encode(r) for r in new])
    Ledger.load(p, 1)  # the sidecar summarises both files to their end
    rotated_name(p, 1).unlink()
    first = Ledger.load(p, 1)
    assert first.stats.retired_files == 1
    assert_recount(first, old + new)
    again = Ledger.load(p, 1)
    assert again.stats.retired_files == 0 and again.stats.scanned_bytes == 0
    assert_recount(again, old + new)
    assert_recount(Ledger.load(p, 1, use_cache=False), new)  # the files alone


def test_deleting_the_logs_carries_forward_and_deleting_the_ledger_too_resets(tmp_path):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i) for i in range(10)]
    write_log(p, [encode(r) for r in rs])
    Ledger.load(p, 3)
    p.unlink()  # the logs alone: like a rotation, their counts stay
    assert Ledger.load(p, 3).tokens_total("alice") == 100
    sidecar_path(p).unlink()  # and the ledger: a real reset
    assert Ledger.load(p, 3).snapshot() == ({}, {})


def test_version_1_sidecar_is_replaced_and_a_newer_one_left_alone(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i) for i in range(10)]
    write_log(p, [encode(r) for r in rs])
    sc = sidecar_path(p)
    sc.write_text('{"version":1,"window_days":3,"files":[]}')
    assert_recount(Ledger.load(p, 3), rs)
    assert json.loads(sc.read_text())["version"] == SIDECAR_VERSION == 3
    newer = '{"version":4,"window_days":3,"retired":{"what":"we cannot read"},"files":[]}'
    sc.write_text(newer)
    assert_recount(Ledger.load(p, 3), rs)
    assert "written by a newer keygate" in caplog.text
    assert sc.read_text() == newer


def test_retired_counts_are_kept_by_a_ledger_of_another_window(tmp_path):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, day=i // 10) for i in range(30)]
    write_log(p, [encode(r) for r in rs])
    Ledger.load(p, 3, window_days=5)
    p.unlink()
    led = Ledger.load(p, 3)
    assert_recount(led, rs)
    assert led.stats.retired_files == 1


@pytest.mark.parametrize("content", [
    b'{"version":2,"window_days":3,"retired":{"files":-1,"newest":"","totals":{},"days":{},'
    b'"months":{}},"files":[]}',
    b'{"version":2,"window_days":3,"retired":{"files":0,"newest":"","totals":{},"days":{},'
    b'"months":{"2026-13":{}}},"files":[]}',
    b'{"version":2,"window_days":3,"files":[]}',
])
def test_corrupt_retired_tally_is_ignored(tmp_path, caplog, content):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i) for i in range(5)]
    write_log(p, [encode(r) for r in rs])
    sidecar_path(p).write_bytes(content)
    assert_recount(Ledger.load(p, 3), rs)
    assert "ignoring usage ledger" in caplog.text


def test_a_load_waits_for_a_rotation_in_progress(tmp_path):
    """Rotations and counts of the same log exclude each other (the sidecar's lock): a
    count that saw a file between its rename and its next one could take it for deleted."""
    from keygate.accounting.ledger import sidecar_lock
    p = tmp_path / "usage.jsonl"
    rs = [rec(i) for i in range(20)]
    write_log(rotated_name(p, 1), [encode(r) for r in rs[:10]])
    write_log(p, [encode(r) for r in rs[10:]])
    Ledger.load(p, 2)
    loaded: list[Ledger] = []
    with sidecar_lock(sidecar_path(p)):
        os.replace(rotated_name(p, 1), rotated_name(p, 2))
        t = threading.Thread(target=lambda: loaded.append(Ledger.load(p, 2)))
        t.start()
        time.sleep(0.3)
        assert not loaded  # waiting
        os.replace(p, rotated_name(p, 1))
    t.join(10)
    assert_recount(loaded[0], rs)
    assert loaded[0].stats.retired_files == 0


def test_a_sidecar_that_cannot_be_written_does_not_stop_rotation(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    led = Ledger.load(p, 1)
    sidecar_path(p).mkdir()  # cannot be replaced by a file
    w = UsageWriter(p, 300, 1, checkpoint=led.checkpoint, rotate=led.rotate)
    for i in range(6):
        w.write(rec(i))
    w.close()
    assert len(naive_records(p)) <= 2
    assert "a restart will not count its lines" in caplog.text


# --------------------------------------------------------------------------- money
#
# Budgets read the money of the lines (their `cost`, docs/usage-log.md#cost) per UTC day, per
# UTC month and in total: the same counters as tokens, in exact decimals, carried the same
# way across rotation and restarts.

from decimal import Decimal  # noqa: E402


def naive_money(records: list[dict], window: int = 3):
    """(money per key, {(key, day)} for the newest `window` days, {(key, month)} for the
    newest day's month and the one before), zeros left out, exact."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    days: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    months: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    newest = ""  # the newest day of every line that counts, with money or not
    for r in records:
        key, err, cost = r.get("key"), r.get("error"), r.get("cost")
        if not isinstance(key, str) or (isinstance(err, str) and err in REFUSED):
            continue
        d = naive_day(r.get("ts"))
        newest = max(newest, d or "")
        if isinstance(cost, bool) or not isinstance(cost, (int, Decimal)) or cost < 0:
            continue
        totals[key] += cost
        if d is not None:
            days[(key, d)] += cost
            months[(key, d[:7])] += cost
    if newest:
        horizon = (date.fromisoformat(newest) - timedelta(days=window - 1)).isoformat()
        days = {kd: v for kd, v in days.items() if kd[1] >= horizon}
        before = month_before(newest[:7])
        months = {km: v for km, v in months.items() if km[1] >= before}
    return ({k: v for k, v in totals.items() if v}, {k: v for k, v in days.items() if v},
            {k: v for k, v in months.items() if v})


def assert_money(ledger: Ledger, records: list[dict]) -> None:
    totals, days, months = naive_money(records)
    assert ledger.money_snapshot() == (totals, days, months)
    for key, m in totals.items():
        assert ledger.spent_total(key) == m
    for (key, day), m in days.items():
        assert ledger.spent_on(key, day) == m
    for (key, month), m in months.items():
        assert ledger.spent_in_month(key, month) == m
    assert ledger.spent_total("nobody") == 0 and ledger.spent_on("nobody", "2026-11-20") == 0


costs = st.one_of(st.none(), st.integers(0, 5),
                  st.decimals(min_value=0, max_value=100, places=9, allow_nan=False),
                  st.just(Decimal("0.1")), st.just(Decimal("-1")), st.just("0.5"))


@st.composite
def priced(draw, odd=True):
    r = draw(records(odd=odd))
    r["cost"] = draw(costs)
    return r


def test_money_is_counted_per_day_month_and_in_total():
    rs = [rec(1, day=0, cost=Decimal("0.00002277")), rec(2, day=0, cost=Decimal("0.1")),
          rec(3, day=11, cost=Decimal("0.2")),  # 2026-12-01: a new month
          rec(4, day=11, cost=None), rec(5, day=11, key="bob", cost=Decimal("1.5")),
          rec(6, day=11, cost=Decimal("9"), error="insufficient_quota"),  # refused: nothing
          rec(7, day=11, cost=Decimal("0.3"), error="upstream_error")]  # forwarded: counts
    led = Ledger()
    for r in rs:
        led.add(r)
    assert_money(led, rs)
    assert led.spent_total("alice") == Decimal("0.60002277")
    assert led.spent_in_month("alice", "2026-11") == Decimal("0.10002277")
    assert led.spent_in_month("alice", "2026-12") == led.spent_on("alice", "2026-12-01") \
        == Decimal("0.5")


@SLOW_OK
@given(st.lists(priced(), max_size=80))
def test_money_add_equals_naive_recount(rs):
    led = Ledger()
    for r in rs:
        led.add(r)
    assert_money(led, rs)


@settings(SLOW_OK, max_examples=200)
@given(st.lists(st.one_of(priced(odd=False), priced()), max_size=60),
       st.lists(st.integers(0, 100), max_size=4))
def test_money_merge_of_pieces_and_the_sidecar_form_equal_the_whole(rs, cuts_percent):
    whole = Counters()
    for r in rs:
        whole.add(r)
    cuts = {c * len(rs) // 100 for c in cuts_percent}
    merged, bounds = Counters(), sorted(cuts | {0, len(rs)})
    for a, b in zip(bounds, bounds[1:]):
        piece = Counters()
        for r in rs[a:b]:
            piece.add(r)
        merged.merge(piece)
    assert merged.money_snapshot() == whole.money_snapshot()
    again = Counters.from_json(json.loads(json.dumps(whole.to_json())), 3)
    assert again.money_snapshot() == whole.money_snapshot()
    assert again.snapshot() == whole.snapshot()


def test_money_survives_restarts_through_the_sidecar_and_without_it(tmp_path):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, day=i % 4, cost=Decimal("0.000000297") * i) for i in range(40)]
    write_log(p, [encode(r) for r in rs])
    assert_money(Ledger.load(p, 3), rs)
    cached = Ledger.load(p, 3)
    assert cached.stats.scanned_bytes == 0  # all from the sidecar
    assert_money(cached, rs)
    assert '"spent":{"alice":"0.00023166"}' in sidecar_path(p).read_text()
    sidecar_path(p).unlink()
    assert_money(Ledger.load(p, 3), rs)


def test_money_of_deleted_files_is_carried_forward(tmp_path):
    """Rotation deletes a file: its money stays in the retired tally, like its tokens."""
    p = tmp_path / "usage.jsonl"
    led = Ledger.load(p, 1)
    w = UsageWriter(p, 1 << 20, 1, checkpoint=led.checkpoint, rotate=led.rotate)
    rs = [rec(i, tokens=100, cost=Decimal("0.1"), blob="x" * 600_000) for i in range(9)]
    for r in rs:
        led.add(r)
        w.write(r)
    w.close()
    assert len(naive_records(p)) == 2  # most files are gone
    again = Ledger.load(p, 1)
    assert again.spent_total("alice") == Decimal("0.9")
    assert again.spent_on("alice", BASE.isoformat()) == Decimal("0.9")
    assert again.spent_in_month("alice", "2026-11") == Decimal("0.9")
    assert again.money_snapshot() == led.money_snapshot()
    # a crash between a deletion and the sidecar's update: the file's summary is retired
    rotated_name(p, 1).unlink()
    assert Ledger.load(p, 1).spent_total("alice") == Decimal("0.9")


def test_a_version_2_sidecar_keeps_its_retired_tally_and_recounts_the_files(tmp_path):
    """Version 2 knew no money (keygate wrote no costs then): its retired counts are kept,
    with no money, and the files on disk are counted again for theirs."""
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, cost=Decimal("0.25")) for i in range(4)]
    write_log(p, [encode(r) for r in rs])
    day = BASE.isoformat()
    sidecar_path(p).write_text(json.dumps({
        "version": 2, "window_days": 3,
        "retired": {"files": 1, "newest": day, "totals": {"alice": 1000},
                    "days": {day: {"alice": [7, 1000]}}, "months": {}},
        "files": [{"head": "x", "offset": 5, "tail": "y", "bad": 0, "newest": day,
                   "totals": {"alice": 40}, "days": {day: {"alice": [4, 40]}},
                   "months": {}}]}))
    led = Ledger.load(p, 3)
    assert led.tokens_total("alice") == 1000 + 40
    assert led.requests_on("alice", day) == 7 + 4
    assert led.spent_total("alice") == Decimal("1.00")
    assert json.loads(sidecar_path(p).read_text())["version"] == 3
    assert Ledger.load(p, 3).money_snapshot() == led.money_snapshot()


@pytest.mark.parametrize("money", ['"-1"', '"abc"', "1.5", '"NaN"'])
def test_bad_money_in_the_sidecar_is_ignored(tmp_path, caplog, money):
    p = tmp_path / "usage.jsonl"
    rs = [rec(i, cost=Decimal("0.5")) for i in range(3)]
    write_log(p, [encode(r) for r in rs])
    day = BASE.isoformat()
    sidecar_path(p).write_text(
        '{"version":3,"window_days":3,"retired":{"files":0,"newest":"%s","totals":{},'
        '"days":{"%s":{"alice":[1,1,%s]}},"months":{}},"files":[]}' % (day, day, money))
    assert_money(Ledger.load(p, 3), rs)
    assert "ignoring usage ledger" in caplog.text


def test_a_line_dated_days_ahead_of_the_clock_moves_no_window(monkeypatch):
    """A machine whose clock is wrong writes into a log folder others read: its line dated
    ten days ahead must not become the newest day and push today out of the window."""
    monkeypatch.setattr(ledger_module, "latest_day", REAL_LATEST_DAY)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    ahead = (date.fromisoformat(today) + timedelta(days=10)).isoformat()
    tomorrow = (date.fromisoformat(today) + timedelta(days=1)).isoformat()

    def line(day, tokens, i):
        return {"ts": f"{day}T10:00:00.000Z", "id": f"req_{i:020x}", "key": "k",
                "status": 200, "error": None, "total_tokens": tokens}

    c = Counters()
    c.add(line(today, 5, 1))
    c.add(line(ahead, 7, 2))
    c.add(line(today, 5, 3))
    c.add(line(tomorrow, 1, 4))  # (a clock a few hours ahead: that day counts)
    assert c.newest == tomorrow
    assert c.days[today]["k"][:2] == [2, 10] and ahead not in c.days
    assert c.totals["k"] == 18  # its tokens still count in the lifetime total
    # The same in a merge, from a tally saved with such a day (an older version's).
    saved = Counters()
    saved.add(line(today, 5, 5))
    saved.days[ahead] = {"k": [1, 7, ledger_module.ZERO]}
    saved.newest = ahead
    whole = Counters()
    whole.add(line(today, 5, 6))
    whole.merge(saved)
    assert whole.newest == today and ahead not in whole.days
    assert whole.days[today]["k"][:2] == [2, 10]
