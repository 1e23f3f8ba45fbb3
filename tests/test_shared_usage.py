"""The hourly totals in Redis (keygate/accounting/shared.py's HOURLY, hour_item,
hourly_from; accounting/restore.py's hours_from_logs, write_hours) against a real
redis-server: what they answer equals what accounting/hourly.py's Hourly answers for the
same records, money is exact, client strings cannot merge groups or grow without bound
(docs/shared-state.md#usage-totals-of-every-instance)."""

from __future__ import annotations

import asyncio
import json
import random
from decimal import Decimal

import pytest

from helpers.redisserver import RedisServer, needs_redis
from keygate.accounting import shared as sc
from keygate.accounting.hourly import OTHER_MODEL, Hourly, row_dicts
from keygate.accounting.restore import hours_from_logs, restore, write_hours
from keygate.accounting.totals import read_into
from keygate.model.prices import MONEY, money_text

HOURS = [f"2026-12-04T{h:02d}" for h in range(10, 14)]
SINCE, UNTIL = HOURS[0], "2026-12-04T14"


@pytest.fixture
def counters(redis_server):
    redis_server.client().flushall()
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(_make(redis_server.url))
    c.run = lambda coro: loop.run_until_complete(coro)
    yield c
    loop.run_until_complete(c.close())
    loop.close()


async def _make(url):
    return sc.SharedCounters(url)


def records(n: int = 400, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    models = ["llama3.2", "qwen2.5:7b", 'evil","x",1,null]', "a\u0000b", "é\n", None]
    out = []
    for i in range(n):
        hour = rnd.choice(HOURS)
        error = rnd.choice([None, None, None, "rate_limit_exceeded", "upstream_error"])
        cost = rnd.choice([None, "0", "0.000006", "1.5", "0.1", "0.2",
                           "12345678901234567890.123456789012345678901234567"])
        out.append({
            "ts": f"{hour}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d}.{i % 1000:03d}Z",
            "id": f"r{i}", "key": rnd.choice(["alice", "bob", None, '["alice"]']),
            "model": rnd.choice(models), "channel": rnd.choice(["a", "b", None]),
            "status": rnd.choice([200, 200, 429, 502, None]), "error": error,
            "prompt_tokens": rnd.randrange(50), "completion_tokens": rnd.randrange(50),
            "total_tokens": rnd.randrange(100),
            "cost": None if cost is None else Decimal(cost),
            "duration_ms": rnd.choice([0.3, 12.5, 250, 1800.0, None]),
        })
    return out


def send(c, recs: list[dict], per_turn: int = 37) -> None:
    async def go():
        for i in range(0, len(recs), per_turn):
            for r in recs[i:i + per_turn]:
                c.add_record(r)
            await asyncio.sleep(0)  # one turn: one pipeline
            if c._sending:
                await asyncio.wait(list(c._sending))
    c.run(go())


def from_redis(c, hours=HOURS) -> Hourly:
    return sc.hourly_from(list(hours), c.run(c.read_hours(list(hours))))


def same(a: Hourly, b: Hourly) -> None:
    for by in ((), ("key",), ("model",), ("key", "model", "channel"), ("day",)):
        assert row_dicts(a.rows(by, SINCE, UNTIL), by) == row_dicts(b.rows(by, SINCE, UNTIL), by)
    assert a.series(SINCE, UNTIL) == b.series(SINCE, UNTIL)
    assert a.key_totals("alice", SINCE, UNTIL) == b.key_totals("alice", SINCE, UNTIL)


def test_redis_answers_what_hourly_answers_for_the_same_records(counters):
    recs = records()
    local = Hourly()
    local.add_all(recs)
    before = counters.round_trips
    send(counters, recs)
    assert counters.round_trips - before <= -(-len(recs) // 37)  # one pipeline per turn
    same(from_redis(counters), local)
    # Money exact: the digits of the sum, not a float's.
    total = Decimal(0)
    for r in recs:
        if r["cost"] is not None:
            total = MONEY.add(total, r["cost"])
    assert from_redis(counters).rows((), SINCE, UNTIL)[0].totals.cost == total
    # Every hash expires (the retention of accounting/hourly.py).
    ttl = counters.run(counters.redis.pttl(sc.HOURS + HOURS[0]))
    assert 0 < ttl <= sc.HOUR_TTL_MS


def test_decimal_sums_in_the_script_are_exact(counters):
    amounts = ["0", "0.1", "0.2", "9.99", "0.01", "99999999999999999999.9", "0.000000000000000001",
               "1", "123.456", "0.5"]
    items = [("2026-12-04T10:00:00.000Z", "2026-12-04T10", '["k",null,null,200,null]',
              0, 0, 0, Decimal(a), None) for a in amounts]
    async def one_by_one():  # one call each: the script adds to what is there
        for item in items:
            tail, nargs, _ = next(sc.hour_calls([item]))
            await counters._call("hourly", tail, nargs)
    counters.run(one_by_one())
    got = counters.run(counters.redis.hget(sc.HOURS + "2026-12-04T10",
                                           'c["k",null,null,200,null]')).decode()
    total = Decimal(0)
    for a in amounts:
        total = MONEY.add(total, Decimal(a))
    assert got == money_text(total) == "100000000000000000135.156000000000000001"


def test_a_hostile_model_name_stays_one_bounded_group(counters):
    recs = [{"ts": "2026-12-04T10:00:00.000Z", "id": f"m{i}", "key": "k",
             "model": f"m{i}-" + "x" * 200, "status": 200, "error": None,
             "total_tokens": 1, "duration_ms": 1.0} for i in range(sc_models() + 50)]
    recs.append({"ts": "2026-12-04T10:00:00.000Z", "id": "q", "key": "k",
                 "model": 'k",null,null,200,null]', "status": 200, "error": None})
    local = Hourly()
    local.add_all(recs)
    send(counters, recs, per_turn=500)
    h = from_redis(counters)
    same(h, local)
    models = {g[1] for g in h.hours["2026-12-04T10"]}
    assert len(models) == sc_models() + 1 and OTHER_MODEL in models
    assert 'k",null,null,200,null]' not in models  # past the cap: (other), never a new key
    assert len(counters.models) == sc_models()


def sc_models() -> int:
    from keygate.accounting.hourly import MAX_MODELS

    return MAX_MODELS


def test_held_while_unreachable_and_sent_when_redis_answers(tmp_path):
    if needs_redis.args[0]:
        pytest.skip("redis-server is not installed")
    r = RedisServer(tmp_path / "r")
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(_make(r.url))
    recs = records(60, seed=3)
    try:
        with pytest.raises(sc.Unavailable):  # nothing listens there yet
            loop.run_until_complete(c.admit("k", "a", 0, 0, 1, None, None, []))
        with pytest.raises(sc.Unavailable):
            loop.run_until_complete(c.read_hours(HOURS))

        async def feed():
            for rec in recs:
                c.add_record(rec)
        loop.run_until_complete(feed())
        assert len(c.pending_hours) == len(recs)
        r.start()
        r.client().set(sc.MARKER, "1")  # it came back with its data

        async def back():
            for _ in range(100):
                if c.reachable and not c.pending_hours:
                    return True
                await asyncio.sleep(0.05)
        assert loop.run_until_complete(back())
        local = Hourly()
        local.add_all(recs)
        got = sc.hourly_from(HOURS, loop.run_until_complete(c.read_hours(HOURS)))
        same(got, local)
    finally:
        loop.run_until_complete(c.close())
        loop.close()
        r.stop()


def test_restore_rebuilds_the_hours_from_the_logs(redis_server, tmp_path):
    client = redis_server.client()
    client.flushall()
    recs = records(300, seed=11)
    def text(rs):  # costs as JSON numbers, their digits as written
        return "".join(json.dumps({**r, "cost": None}).replace(
            '"cost": null', f'"cost": {"null" if r["cost"] is None else r["cost"]}') + "\n"
            for r in rs)

    (tmp_path / "usage.jsonl").write_text(text(recs[:100]))
    (tmp_path / "usage-h-1.jsonl").write_text(text(recs[100:]))
    client.hset(sc.HOURS + "2026-12-04T11", "r[\"stale\"]", 5)  # replaced
    restore(client, tmp_path / "usage.jsonl", only_if_missing=False)
    local = Hourly()  # (the logs as keygate reads them: `keygate usage`'s reader)
    read_into(tmp_path / "usage.jsonl", local.add)
    raw = redis_server.client()
    got = sc.hourly_from(HOURS, [raw.hgetall(sc.HOURS + h) for h in HOURS])
    same(got, local)
    # Added with `minus`: only the difference lands.
    first = hours_from_logs(tmp_path / "usage.jsonl", before="2026-12-04T12")
    client.flushall()
    write_hours(client, first)
    write_hours(client, hours_from_logs(tmp_path / "usage.jsonl"), minus=first)
    got = sc.hourly_from(HOURS, [raw.hgetall(sc.HOURS + h) for h in HOURS])
    same(got, local)
