"""Ledger: counters equal a naive full recount of the log, with or without the sidecar
cache, after rotation, torn lines, garbage, and crashes (simulated and real kill -9)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict, deque
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ADDONS = Path(__file__).resolve().parents[1] / "addons"
sys.path.insert(0, str(ADDONS))

from keygate.ledger import (  # noqa: E402
    REFUSED,
    Ledger,
    Tally,
    counts,
    day_of,
    read_sidecar,
    sidecar_path,
    tokens_of,
)
from keygate.usagelog import LogFile, Target, encode, rotated_name  # noqa: E402

BASE = date(2026, 11, 20)


# --------------------------------------------------------------------------- the reference


def naive_records(path: Path, keep: int) -> list[dict]:
    """Every record of the log, read the simplest way."""
    out = []
    for p in [path.with_name(f"{path.name}.{k}") for k in range(keep, 0, -1)] + [path]:
        if not p.is_file():
            continue
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


def assert_recount(ledger: Ledger, records: list[dict]) -> None:
    totals, days = naive_counts(records)
    assert ledger.snapshot() == (totals, days)
    for (key, day), (r, t) in days.items():
        assert ledger.requests_on(key, day) == r
        assert ledger.tokens_on(key, day) == t
    for key, t in totals.items():
        assert ledger.tokens_total(key) == t


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


# hypothesis: records as the gateway writes them, plus the junk a log can hold
keys = st.sampled_from(["alice", "bob", "carol", None])
odd_keys = st.one_of(keys, st.integers(), st.just(""))
errors = st.one_of(st.none(), st.sampled_from(sorted(REFUSED) + ["upstream_error",
                                                                  "upstream_timeout"]))
odd_errors = st.one_of(errors, st.integers(), st.lists(st.integers(), max_size=1))
stamps = st.builds(lambda d, s: (BASE + timedelta(days=d)).isoformat() + s,
                   st.integers(0, 9), st.sampled_from(["T00:00:00.000Z", "T23:59:59.999Z"]))
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
    whole = Tally()
    for r in rs:
        whole.add(r)
    cuts = {c * len(rs) // 100 for c in cuts_percent}
    merged, bounds = Tally(), sorted(cuts | {0, len(rs)})
    for a, b in zip(bounds, bounds[1:]):
        piece = Tally()
        for r in rs[a:b]:
            piece.add(r)
        merged.merge(piece)
    assert merged.snapshot() == whole.snapshot()
    assert Tally.from_json(json.loads(json.dumps(whole.to_json())), 3).snapshot() == \
        whole.snapshot()


def test_merge_drops_what_the_whole_would_have_dropped():
    # A later piece may hold older days (a long stream is logged when it ends).
    late, early = Tally(), Tally()
    late.add(rec(1, day=5))
    early.add(rec(2, day=1))
    whole = Tally()
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
    write_log(rotated_name(p, 3), [encode(r) for r in rs[:10]])  # beyond keep: not read
    write_log(rotated_name(p, 2), [encode(r) for r in rs[10:60]] + [b"garbage\n"])
    write_log(rotated_name(p, 1), [encode(r) for r in rs[60:120]] + [b"\n", b"[1,2]\n"])
    write_log(p, [encode(r) for r in rs[120:199]] + [encode(rs[199])[:40]])
    led = Ledger.load(p, 2)
    assert_recount(led, rs[10:199])
    assert "skipped 3 lines" in caplog.text
    assert led.stats.bad_lines == 3 and led.stats.files == 3
    assert_recount(Ledger.load(p, 2), rs[10:199])  # second time from the sidecar
    assert_recount(Ledger.load(p, 2, use_cache=False), rs[10:199])


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
    assert_recount(Ledger.load(p, 3), keep)


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
    assert "cannot write usage ledger cache" in caplog.text


def test_checkpoint_follows_the_writer(tmp_path):
    p = tmp_path / "usage.jsonl"
    led = Ledger.load(p, 3)
    f = LogFile(Target(p, 3000, 3))
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
    assert again.snapshot() == Ledger.load(p, 3, use_cache=False).snapshot()
    # The in-memory ledger saw every record; the log kept the last few files only.
    assert led.tokens_total("alice") == 1000


def test_checkpoint_on_a_new_path(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_log(a, [encode(rec(1))])
    write_log(b, [encode(rec(2)), encode(rec(3))])
    led = Ledger.load(a, 3)
    led.checkpoint(b, 3)
    assert Ledger.load(b, 3).stats.scanned_bytes == 0


# --------------------------------------------------------------------------- crashes


def _rotation_steps(path: Path, keep: int) -> list[tuple[Path, Path]]:
    """The renames LogFile._rotate makes, in order (for keep >= 1)."""
    steps = [(rotated_name(path, k), rotated_name(path, k + 1)) for k in range(keep - 1, 0, -1)]
    return steps + [(path, rotated_name(path, 1))]


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(1, 25)),
    st.tuples(st.just("checkpoint"), st.just(0)),
    st.tuples(st.just("crash_mid_line"), st.integers(1, 300)),
    st.tuples(st.just("crash_mid_rotation"), st.integers(0, 3)),
    st.tuples(st.just("crash_mid_sidecar"), st.just(0)),
    st.tuples(st.just("restart"), st.just(0)),
), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops, st.randoms(use_true_random=False))
def test_crash_at_any_point_recounts_exactly(tmp_path_factory, steps, rnd):
    """Drive the writer's file operations and checkpoints step by step; a crash (kill -9)
    can leave a torn line, a half-done rotation or a stray temp file. After every restart
    the loaded counters must equal a naive recount of what is on disk."""
    d = tmp_path_factory.mktemp("crash")
    p, keep = d / "usage.jsonl", 3
    target = Target(p, 2500, keep)
    n = 0

    def restart():
        led = Ledger.load(p, keep)
        assert_recount(led, naive_records(p, keep))
        return led, LogFile(target)

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
                for src, dst in _rotation_steps(p, keep)[:arg]:
                    if src.exists():
                        os.replace(src, dst)
            led, f = restart()
        elif op == "crash_mid_sidecar":
            sc = sidecar_path(p)
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout.strip()
            sc.with_name(f"{sc.name}.{dead}.tmp").write_bytes(b'{"version":1,"files":[{"he')
            led, f = restart()
            assert not list(d.glob("*.tmp"))  # cleaned up at load
        else:
            f.close()
            led, f = restart()
    f.close()
    restart()
    assert_recount(Ledger.load(p, keep, use_cache=False), naive_records(p, keep))


CHILD = r"""
import itertools, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from keygate.ledger import Ledger
from keygate.usagelog import UsageWriter
path, start = Path(sys.argv[2]), int(sys.argv[3])
ledger = Ledger.load(path, 4)
writer = UsageWriter(path, 30_000, 4, checkpoint=ledger.checkpoint, checkpoint_interval=0.003)
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
    p = tmp_path / "logs" / "usage.jsonl"
    rnd = random.Random(7)
    reused = 0
    for round_ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ADDONS), str(p),
                                  str(round_ * 10_000_000)], stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"ready\n"
            time.sleep(rnd.uniform(0.2, 0.7))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            child.stdout.close()
        led = Ledger.load(p, 4)
        reused += led.stats.reused_bytes
        assert_recount(led, naive_records(p, 4))
        assert_recount(Ledger.load(p, 4, use_cache=False), naive_records(p, 4))
    assert reused > 0  # the sidecar written by the killed writers was used


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
