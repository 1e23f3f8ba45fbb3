"""The cache of the log's hours (keygate.accounting.hourcache, docs/usage-log.md#the-hour-cache):
its answers are exactly what reading every line gives, before and after rotation and
appending, and a cache that does not match the files is not trusted."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keygate.accounting import hourcache
from keygate.accounting.hourcache import HourCache, sidecar_path
from keygate.accounting.hourly import Hourly
from keygate.accounting.log import encode, rotated_name
from keygate.accounting.totals import GROUPS, Summer, canonical, read_into
from keygate.cli.main import main as keygate

BASE = dt.datetime(2026, 11, 24, 0, 0, tzinfo=dt.timezone.utc)
KEYS = ["alice", "bob", None, 7]
MODELS = ["llama3.2", "qwen2.5:7b", None, "m\u2028x"]
CHANNELS = ["local", "gpu", None]
ERRORS = [None, None, None, "upstream_error", "rate_limit_exceeded", {"odd": 1}]
COSTS = [None, "0.000011", "1.10", "0", "0.00000070", "12", "2E-7", "-1", "0.0"]


def _ts(seconds: float) -> str:
    return canonical(BASE + dt.timedelta(seconds=seconds))


@st.composite
def records(draw, start: float, n: int) -> tuple[list[bytes], float]:
    """`n` log lines in write order from `start` seconds after BASE: each request ends
    after the one before and started up to 2 h before it ended (ts is the start)."""
    lines = []
    t = start
    for i in range(n):
        t += draw(st.floats(0, 3600, allow_nan=False))
        started = t - draw(st.sampled_from([0.0, 0.5, 30.0, 1800.0, 7200.0]))
        ts: object = _ts(started)
        odd = draw(st.integers(0, 40))
        if odd == 0:
            ts = None
        elif odd == 1:
            ts = 12
        elif odd == 2:
            ts = (BASE + dt.timedelta(seconds=started)).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif odd == 3:
            ts = "garbage-gaTrbage-garbagZ"
        elif odd == 4:
            ts = "not a time"
        r = {"ts": ts, "id": f"req_{start}_{i}", "key": draw(st.sampled_from(KEYS)),
             "status": draw(st.sampled_from([200, 429, 502, None])),
             "error": draw(st.sampled_from(ERRORS)),
             "model": draw(st.sampled_from(MODELS)), "channel": draw(st.sampled_from(CHANNELS)),
             "prompt_tokens": draw(st.sampled_from([0, 1, 17, None])),
             "completion_tokens": draw(st.sampled_from([0, 5, 1000])),
             "total_tokens": draw(st.sampled_from([0, 22, None, True])),
             "duration_ms": draw(st.sampled_from([0.4, 3, 150.5, 90000, None]))}
        cost = draw(st.sampled_from(COSTS))
        line = encode(r)
        if cost is not None:
            line = line[:-2] + b',"cost":' + cost.encode() + b"}\n"
        if draw(st.integers(0, 30)) == 0:
            line = b"{not json\n"
        lines.append(line)
    return lines, t


def expected(log: Path, by, since, until):
    summer = Summer(by, since, until)
    bad = read_into(log, summer.add)
    return _plain(summer.rows()), bad


def _plain(rows):
    """Rows with their costs' digits, not only their values."""
    return [(r.group, r.totals.requests, r.totals.prompt_tokens, r.totals.completion_tokens,
             r.totals.total_tokens, r.totals.errors, None if r.totals.cost is None
             else str(r.totals.cost)) for r in rows]


bounds = st.one_of(st.none(), st.integers(-7200, 5 * 86400).map(
    lambda s: _ts(s) if s % 3 else _ts(s - s % 3600)))
queries = st.lists(st.tuples(
    st.lists(st.sampled_from(GROUPS), unique=True, max_size=3).map(tuple), bounds, bounds),
    min_size=1, max_size=4)


def check(log: Path, qs, cache: HourCache | None = None) -> HourCache:
    cache = cache or HourCache(log)
    with cache.survey() as survey:
        for by, since, until in qs:
            want, bad = expected(log, by, since, until)
            assert _plain(survey.rows(by, since, until)) == want, (by, since, until)
            assert survey.bad == bad
    cache.save()
    return cache


def rotate(log: Path) -> None:
    """What the writer's rotation does to the files (keep 3)."""
    rotated_name(log, 3).unlink(missing_ok=True)
    for k in (2, 1):
        if rotated_name(log, k).exists():
            rotated_name(log, k).rename(rotated_name(log, k + 1))
    log.rename(rotated_name(log, 1))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), qs=queries, worker=st.booleans(),
       tail=st.sampled_from([b"", b'{"ts":"2026-11-2', None]))
def test_cached_answers_equal_a_full_read(data, qs, worker, tail):
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "usage.jsonl"
        first, t = data.draw(records(0.0, 40))
        second, t = data.draw(records(t, 30))
        rotated_name(log, 2).write_bytes(b"".join(first[:15]))
        rotated_name(log, 1).write_bytes(b"".join(first[15:]))
        last = b'{"ts":"%s","id":"last","key":"bob"}' % _ts(t).encode() if tail is None else tail
        log.write_bytes(b"".join(second) + last)
        if worker:
            more, _ = data.draw(records(100.0, 20))
            (Path(d) / "usage-w1.jsonl").write_bytes(b"".join(more))

        check(log, qs)  # cold
        assert sidecar_path(log).exists()
        check(log, qs)  # warm: every complete line from the cache

        # Lines appended (the torn last line completed first), then a rotation, then more.
        third, t = data.draw(records(t, 25))
        with open(log, "ab") as f:
            if last:
                f.write(b"\n")
            f.write(b"".join(third[:10]))
        check(log, qs)
        rotate(log)
        log.write_bytes(b"".join(third[10:]))
        check(log, qs)
        check(log, qs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hourly_from_the_cache_equals_hourly_from_the_lines(data):
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "usage.jsonl"
        first, t = data.draw(records(0.0, 40))
        second, _ = data.draw(records(t, 30))
        # (Hourly.add itself fails on a `ts` of 24 characters that is no time: not here)
        rotated_name(log, 1).write_bytes(b"".join(x for x in first if b"garbage" not in x))
        log.write_bytes(b"".join(x for x in second if b"garbage" not in x))
        HourCache(log).survey().close()
        for _ in range(2):  # cold, then warm
            cached = Hourly()
            HourCache(log).load_hourly(cached)
            direct = Hourly()
            read_into(log, direct.add)
            assert cached.hours == direct.hours
            assert cached.latency == direct.latency
            assert (cached.skipped, cached.groups, cached.models) == (
                direct.skipped, direct.groups, direct.models)


# --------------------------------------------------------------------------- trust


def _log(tmp_path: Path, n: int = 50) -> Path:
    log = tmp_path / "usage.jsonl"
    rotated_name(log, 1).write_bytes(b"".join(
        encode({"ts": _ts(600 * i), "id": f"a{i}", "key": "alice", "total_tokens": 1,
                "cost": Decimal("0.5")}) for i in range(n)))
    log.write_bytes(b"".join(
        encode({"ts": _ts(600 * (n + i)), "id": f"b{i}", "key": "bob", "total_tokens": 2})
        for i in range(n)))
    return log


def _by_key(log: Path, **kw):
    with HourCache(log).survey(**kw) as s:
        return _plain(s.rows(("key",)))


def test_the_cache_is_used_and_read_only_where_it_ends(tmp_path, monkeypatch):
    log = _log(tmp_path)
    want = _by_key(log)
    c = HourCache(log)
    c.survey().close()
    assert c.save()
    scanned = []
    real = hourcache.scan_lines
    monkeypatch.setattr(hourcache, "scan_lines", lambda data, fold, base: scanned.append(
        len(data)) or real(data, fold, base))
    assert _by_key(log) == want and scanned == []
    with open(log, "ab") as f:
        f.write(encode({"ts": _ts(10**6), "id": "c", "key": "bob", "total_tokens": 2}))
    assert _by_key(log)[1][1] == 51
    assert len(scanned) == 1 and scanned[0] < 200  # only the new line


@pytest.mark.parametrize("damage", ["garbage", "not json", "wrong counts", "version 0",
                                    "negative cost"])
def test_a_damaged_cache_is_ignored_and_replaced(tmp_path, damage, caplog):
    log = _log(tmp_path)
    want = _by_key(log)
    c = HourCache(log)
    c.survey().close()
    c.save()
    side = sidecar_path(log)
    lines = side.read_bytes().split(b"\n")  # a version line, then two lines per file
    hours = orjson.loads(lines[2])
    if damage == "garbage":
        lines[2] = b"\x00garbage"
    elif damage == "not json":
        lines[1] = b'{"head":1}'
    elif damage == "wrong counts":
        hours[0][5][0][5] = "many"
        lines[2] = orjson.dumps(hours)
    elif damage == "version 0":
        lines[0] = b'{"version":0}'
    else:
        hours[0][5][0][9] = "-5"
        lines[2] = orjson.dumps(hours)
    side.write_bytes(b"\n".join(lines))
    assert _by_key(log) == want
    c = HourCache(log)
    c.survey().close()
    assert c.save()
    assert orjson.loads(side.read_bytes().split(b"\n")[0])["version"] == hourcache.VERSION
    assert _by_key(log) == want


def test_a_refresh_keeps_what_did_not_change_as_it_was(tmp_path):
    log = _log(tmp_path)
    c = HourCache(log)
    c.refresh()
    side = sidecar_path(log)
    rotated = side.read_bytes().split(b"\n")[1:3]  # usage.jsonl.1's lines
    with open(log, "ab") as f:
        f.write(encode({"ts": _ts(10**6), "id": "c", "key": "carol", "total_tokens": 2}))
    c.refresh()
    assert side.read_bytes().split(b"\n")[1:3] == rotated
    assert _by_key(log) == _by_key(log, use_cache=False)
    # A damaged entry of a file that grew is read again, even by a refresh.
    lines = side.read_bytes().split(b"\n")
    lines[4] = b"[[1]]"
    side.write_bytes(b"\n".join(lines))
    with open(log, "ab") as f:
        f.write(encode({"ts": _ts(10**6), "id": "d", "key": "carol", "total_tokens": 2}))
    c.refresh()
    assert _by_key(log) == _by_key(log, use_cache=False)
    assert ("carol",) in [r[0] for r in _by_key(log)]


def test_a_newer_cache_is_left_alone(tmp_path):
    log = _log(tmp_path)
    side = sidecar_path(log)
    side.write_text('{"version":99}')
    want = _by_key(log, use_cache=False)
    c = HourCache(log)
    with c.survey() as s:
        assert _plain(s.rows(("key",))) == want
    assert not c.save()
    assert side.read_text() == '{"version":99}'


def test_a_rewritten_or_truncated_file_is_read_again(tmp_path):
    log = _log(tmp_path)
    c = HourCache(log)
    c.survey().close()
    c.save()
    # Same first line (so the same head), other lines after it.
    lines = log.read_bytes().splitlines(keepends=True)
    lines[-1] = encode({"ts": _ts(10**5), "id": "zz", "key": "carol", "total_tokens": 9})
    log.write_bytes(b"".join(lines))
    assert _by_key(log) == _by_key(log, use_cache=False)
    assert ("carol",) in [r[0] for r in _by_key(log)]
    log.write_bytes(b"".join(lines[:10]))  # truncated
    assert _by_key(log) == _by_key(log, use_cache=False)


def test_a_cache_written_after_the_start_is_not_used_at_start_up(tmp_path):
    log = _log(tmp_path)
    c = HourCache(log)
    c.survey().close()
    c.save()
    before = os.stat(sidecar_path(log)).st_mtime_ns
    seen: set = set()
    h = Hourly()
    HourCache(log).load_hourly(h, watch={"b3", "a1"}, seen=seen, written_before_ns=before)
    assert seen == {"b3", "a1"}  # every line was read again
    seen2: set = set()
    HourCache(log).load_hourly(Hourly(), watch={"b3"}, seen=seen2,
                               written_before_ns=before + 10**12)
    assert seen2 == set()  # from the cache


def test_no_log_writes_no_cache(tmp_path):
    c = HourCache(tmp_path / "none" / "usage.jsonl")
    c.survey().close()
    assert c.save()
    assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- the command


def test_keygate_usage_answers_the_same_with_the_cache(tmp_path, capsys):
    log = _log(tmp_path, 300)
    argvs = [["--by", "key,model,day"], ["--since", _ts(3600 * 30 + 1234), "--by", "key"],
             ["--since", _ts(1800), "--until", _ts(3600 * 70 + 7), "--format", "json"]]
    outs = []
    for _ in range(2):
        row = []
        for argv in argvs:
            assert keygate(["usage", "--log", str(log), *argv]) == 0
            row.append(capsys.readouterr().out)
        outs.append(row)
        assert sidecar_path(log).exists()
    assert outs[0] == outs[1]
    assert json.loads(outs[0][2])[0]["cost"] == 0.5 * (300 - 3)


def test_refresh_reads_only_what_changed(tmp_path, monkeypatch):
    log = _log(tmp_path)
    c = HourCache(log)
    c.refresh()
    side = sidecar_path(log)
    first = side.read_bytes()
    calls = []
    real = HourCache.survey
    monkeypatch.setattr(HourCache, "survey", lambda self, **kw: calls.append(1) or real(
        self, **kw))
    c.refresh()  # nothing changed: not even the cache is read
    assert calls == [] and side.read_bytes() == first
    with open(log, "ab") as f:
        f.write(encode({"ts": _ts(10**6), "id": "c", "key": "carol", "total_tokens": 2}))
    c.refresh()
    assert calls == [1] and side.read_bytes() != first
    assert _by_key(log) == _by_key(log, use_cache=False)


def test_the_pages_start_up_counts_each_record_once(tmp_path):
    """stages/pages.py: the hourly totals from the cache and the log's newest lines, and
    the records that ended during the load once each, whether their lines were read or not."""
    import asyncio

    from helpers.unit import make_config
    from keygate.stages.pages import Pages
    from keygate.stages.routing import Router

    class Recorder:
        writer = ledger = None

    log = _log(tmp_path)
    HourCache(log).refresh()  # a cache from before the start
    config = make_config(f'[gateway]\nusage_log = "{log}"\n')
    p = Pages(config, Recorder(), Router(config))
    written = {"ts": _ts(10**6), "id": "late1", "key": "carol", "total_tokens": 3}
    unwritten = {"ts": _ts(10**6 + 1), "id": "late2", "key": "carol", "total_tokens": 3}
    p.observe(written)
    p.observe(unwritten)
    with open(log, "ab") as f:
        f.write(encode(written))

    async def start() -> None:
        p.running()
        await asyncio.wait_for(p.loaded.wait(), 30)
        p.done()

    asyncio.run(start())
    rows = {r.group: (r.totals.requests, r.totals.total_tokens)
            for r in p.hourly.rows(("key",), "0000", "9999")}
    assert rows == {("alice",): (50, 50), ("bob",): (50, 100), ("carol",): (2, 6)}
