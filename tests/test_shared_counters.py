"""keygate/accounting/shared.py, accounting/restore.py, stages/shared.py (the Limiter's
part) and the redis settings of model/settings.py: the Lua scripts against a real
redis-server with a clock the test moves (docs/shared-state.md, docs/limits.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from helpers.redisserver import RedisServer, needs_redis
from keygate.accounting import shared as sc
from keygate.accounting.log import log_family
from keygate.accounting.restore import base_log, counters_from_logs, write_counters
from keygate.model.keyring import Limits
from keygate.model.settings import ConfigError, instance_log, parse_settings
from keygate.stages.shared import quota_checks, refusal

NOW = 1_790_000_000.0  # a fixed moment (2026-09-21, UTC)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("line, problem", [
    ('redis_url = "http://127.0.0.1:6379"', "must start with redis://"),
    ('redis_url = "redis://127.0.0.1:port/0"', "does not parse"),
    ('redis_url = "redis:///0"', "needs a host"),
    ('redis_url = "redis://h/db"', "database must be a number"),
    ('redis_url = "unix://"', "needs the socket's path"),
    ('redis_url = 5', "redis_url must be a string"),
    ('redis_url_env = "KG_TEST_UNSET"', r"KG_TEST_UNSET \(redis_url_env\) is not set"),
    ('redis_url = "redis://h"\nredis_url_env = "X"', "not both"),
    ('redis_failure = "open"', "redis_failure must be one of closed, local"),
])
def test_bad_redis_settings_name_the_line(line, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_settings(f"[gateway]\n{line}\n", Path("/etc/keygate/gateway.toml"), {})


def test_redis_settings_and_the_password_stay_out_of_messages():
    s = parse_settings('[gateway]\nredis_url_env = "KG_REDIS"\nredis_failure = "local"\n',
                       Path("/x/gateway.toml"), {"KG_REDIS": "rediss://:s3cret@r.example:6380/2"})
    assert s.redis_url == "rediss://:s3cret@r.example:6380/2" and s.redis_failure == "local"
    assert "s3cret" not in repr(s)
    with pytest.raises(ConfigError) as e:
        parse_settings('[gateway]\nredis_url = "redis://:s3cret@h:x/0"\n', Path("/x/g.toml"), {})
    assert "s3cret" not in str(e.value)
    assert parse_settings("", Path("/x/g.toml"), {}).redis_url == ""


def test_each_worker_has_its_own_log_and_readers_find_them_all(tmp_path):
    s = parse_settings('[gateway]\ninstance = "gpu1"\n', tmp_path / "gateway.toml",
                       {"KEYGATE_WORKER": "2"})
    assert s.usage_log == tmp_path.parent / "logs" / "usage-gpu1-2.jsonl"
    assert base_log(s.usage_log, "gpu1/2") == tmp_path.parent / "logs" / "usage.jsonl"
    assert base_log(tmp_path / "usage.jsonl", "gpu1/2") == tmp_path / "usage.jsonl"
    base = tmp_path / "usage.jsonl"
    for name in ("usage.jsonl", "usage-a-1.jsonl", "usage-a-2.jsonl", "usage-a-1.jsonl.1",
                 "usage-a-1.jsonl.ledger", "other.jsonl"):
        (tmp_path / name).write_text("")
    assert [p.name for p in log_family(base)] == ["usage.jsonl", "usage-a-1.jsonl",
                                                  "usage-a-2.jsonl"]
    assert instance_log(base, "h/1").name == "usage-h-1.jsonl"


# --------------------------------------------------------------------------- scripts


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def counters(redis_server):
    redis_server.client().flushall()
    clock = Clock()
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(_make(redis_server.url, clock))
    c.loop = loop
    c.run = lambda coro: loop.run_until_complete(coro)
    yield c
    loop.run_until_complete(c.close())
    loop.close()


async def _make(url, clock):
    return sc.SharedCounters(url, clock=clock)


def admit(c, name="k", rid="r1", reserve=0, rpm=None, tpm=None, concurrent=None, checks=(),
          start=NOW):
    return c.run(c.admit(name, rid, start, reserve, rpm, tpm, concurrent, list(checks)))


def settle(c, name="k", rid="r1", tokens=0, in_tpm=False, amounts=None, local=False):
    async def go():
        c.settle(name, rid, NOW, tokens, in_tpm, amounts, local)
        await asyncio.sleep(0)
        if c._sending:
            await asyncio.wait(list(c._sending))
    c.run(go())


def test_rpm_refuses_the_next_with_the_wait_of_the_oldest(counters):
    c = counters
    for i in range(3):
        c.clock.t = NOW + i
        v = admit(c, rid=f"r{i}", rpm=3)
        assert v.kind == sc.ADMITTED and v.rpm_used == i + 1
    c.clock.t = NOW + 10
    v = admit(c, rid="r9", rpm=3)
    assert v.kind == sc.RPM and v.wait == pytest.approx(50)
    c.clock.t = NOW + 60  # the first fell out of the window
    assert admit(c, rid="r10", rpm=3).kind == sc.ADMITTED
    assert admit(c, rid="r11", rpm=0).kind == sc.RPM  # a limit of 0 never opens


def test_concurrency_and_the_lease_of_a_process_that_died(counters):
    c = counters
    assert admit(c, rid="a", concurrent=2).kind == sc.ADMITTED
    assert admit(c, rid="b", concurrent=2).kind == sc.ADMITTED
    assert admit(c, rid="c", concurrent=2).kind == sc.CONCURRENT
    settle(c, rid="a")
    assert admit(c, rid="c", concurrent=2).kind == sc.ADMITTED
    # Nobody renews b and c (their process died): after the lease they hold nothing.
    c.clock.t = NOW + sc.LEASE_MS / 1000 + 1
    assert admit(c, rid="d", concurrent=1).kind == sc.ADMITTED


def test_token_quota_reservations_and_a_late_settlement_counted_once(counters):
    c = counters
    checks = [("tokens_per_day", sc.Check(0, "t", 100, True))]
    cs = [ch for _, ch in checks]
    assert admit(c, rid="a", reserve=60, checks=cs).kind == sc.ADMITTED
    # 0 used + 60 reserved: another 60 would be admitted (60 < 100)...
    assert admit(c, rid="b", reserve=60, checks=cs).kind == sc.ADMITTED
    # ...but now 120 are spoken for: held, not used up.
    v = admit(c, rid="c", reserve=60, checks=cs)
    assert v.kind == sc.HELD and v.check == 1
    code, message, wait = refusal(v, checks, Limits(tokens_per_day=100), NOW)
    assert code == "rate_limit_exceeded" and wait == 1.0
    settle(c, rid="a", tokens=30)
    settle(c, rid="a", tokens=30)  # a replay: counted once
    r = c.redis
    day = sc.periods_of(NOW)[0]
    assert c.run(r.hget(f"keygate:{{k}}:d:{day}", "t")) == b"30"
    assert c.run(r.get("keygate:{k}:rsn")) == b"60"
    # b's lease lapses (Redis was away); its settlement still counts, once.
    c.clock.t = NOW + 40
    assert admit(c, rid="d", reserve=10, checks=cs).kind == sc.ADMITTED
    settle(c, rid="b", tokens=75)
    settle(c, rid="b", tokens=75)
    assert c.run(r.hget(f"keygate:{{k}}:d:{day}", "t")) == b"105"
    v = admit(c, rid="e", reserve=10, checks=cs)
    assert v.kind == sc.USED_UP
    code, message, wait = refusal(v, checks, Limits(tokens_per_day=100), NOW)
    assert code == "insufficient_quota" and "per UTC day" in message and wait > 0


def test_tpm_window_and_requests_per_day(counters):
    c = counters
    assert admit(c, rid="a", tpm=20).kind == sc.ADMITTED
    settle(c, rid="a", tokens=25, in_tpm=True)
    c.clock.t = NOW + 5
    v = admit(c, rid="b", tpm=20)
    assert v.kind == sc.TPM and v.wait == pytest.approx(55)
    c.clock.t = NOW + 61
    v = admit(c, rid="b", tpm=20)
    assert v.kind == sc.ADMITTED and v.tpm_used == 0
    checks = [sc.Check(0, "r", 2, False)]
    assert admit(c, name="q", rid="x1", checks=checks).kind == sc.ADMITTED
    assert admit(c, name="q", rid="x2", checks=checks).kind == sc.ADMITTED  # in flight
    assert admit(c, name="q", rid="x3", checks=checks).kind == sc.USED_UP


def test_money_amounts_and_local_admissions_land_in_every_period(counters):
    c = counters
    settle(c, name="m", rid="l1", tokens=8, amounts={"c": "0.25"}, local=True)
    settle(c, name="m", rid="l2", tokens=8, amounts={"c": "0.5"}, local=True)
    day, month = sc.periods_of(NOW)
    for period in (f"d:{day}", f"m:{month}", "all"):
        h = c.run(c.redis.hgetall(f"keygate:{{m}}:{period}"))
        assert h[b"r"] == b"2" and h[b"t"] == b"16" and float(h[b"c"]) == 0.75
    checks = [("budget_total", sc.Check(2, "c", "0.75", False))]
    v = admit(c, name="m", rid="n", checks=[ch for _, ch in checks])
    assert v.kind == sc.USED_UP
    assert refusal(v, checks, Limits(), NOW)[0] == "insufficient_quota"


def test_a_connection_redis_closed_while_it_waited_is_not_an_outage(counters, redis_server):
    c = counters
    assert admit(c, rid="a").kind == sc.ADMITTED
    assert c._idle  # kept for the next pipeline
    # Redis drops every connection (a restart, its idle `timeout`, CLIENT KILL)...
    assert redis_server.client().client_kill_filter(_type="normal", skipme=True) >= 1
    c.run(asyncio.sleep(0.1))
    # ...the next pipeline takes a new one: no "unreachable", no refusal.
    assert admit(c, rid="b").kind == sc.ADMITTED
    assert c.reachable


def test_pipelines_in_flight_are_bounded_and_later_calls_wait_to_go_together(
        counters, redis_server):
    c = counters
    assert admit(c, rid="warm").kind == sc.ADMITTED
    redis_server.client().client_pause(400)  # Redis answers nobody for 0.4 s

    async def go():
        futs = []
        for i in range(20):  # one call per turn of the event loop
            futs.append(asyncio.ensure_future(
                c.admit("k", f"p{i}", NOW, 0, None, None, None, [])))
            await asyncio.sleep(0)
        assert len(c._sending) == sc.PIPELINES
        return await asyncio.gather(*futs)

    before = c.round_trips
    verdicts = c.run(go())
    assert [v.kind for v in verdicts] == [sc.ADMITTED] * 20 and c.reachable
    # PIPELINES went out at once; the other calls waited and went out together.
    assert c.round_trips - before <= sc.PIPELINES + 2


def test_calls_queued_behind_a_pipeline_that_fails_fail_at_once(counters, redis_server):
    c = counters
    assert admit(c, rid="warm").kind == sc.ADMITTED
    redis_server.client().client_pause(int(sc.CALL_TIMEOUT_S * 1000) + 1500)

    async def go():
        futs = []
        for i in range(sc.PIPELINES + 3):
            futs.append(asyncio.ensure_future(
                c.admit("k", f"q{i}", NOW, 0, None, None, None, [])))
            await asyncio.sleep(0)
        t0 = asyncio.get_running_loop().time()
        results = await asyncio.gather(*futs, return_exceptions=True)
        return results, asyncio.get_running_loop().time() - t0

    results, took = c.run(go())
    assert all(isinstance(r, sc.Unavailable) for r in results)
    assert took < sc.CALL_TIMEOUT_S + 0.5  # the queued ones did not wait a timeout more
    assert not c.reachable


def test_local_admissions_join_the_rate_windows_when_redis_answers(counters):
    c = counters
    # Two requests admitted by a process while Redis was away, at NOW - 20 s, with 40 and
    # 25 tokens; their settlements reach Redis at NOW.
    for rid, tokens in (("l1", 40), ("l2", 25)):
        c.run(_settle_local(c, rid, tokens))
    v = admit(c, name="w", rid="n1", rpm=3, tpm=100)
    assert v.kind == sc.ADMITTED and v.rpm_used == 3 and v.tpm_used == 65
    assert admit(c, name="w", rid="n2", rpm=3).kind == sc.RPM
    c.clock.t = NOW + 41  # 61 s after they were admitted: out of the rpm window
    assert admit(c, name="w", rid="n3", rpm=3).kind == sc.ADMITTED


async def _settle_local(c, rid, tokens):
    c.settle("w", rid, NOW - 20, tokens, True, None, local=True, in_rpm=True)
    await asyncio.sleep(0)
    while c._sending:
        await asyncio.wait(list(c._sending))


@pytest.mark.parametrize("reply", [
    b"OK", None, [], [b"x"], [7], [sc.ADMITTED], [sc.USED_UP], [sc.USED_UP, 0],
    [sc.USED_UP, 3], [sc.HELD, -1], [sc.RPM, b"soon"], {"a": 1},
])
def test_an_admission_answered_otherwise_than_admit_answers_is_unavailable(
        counters, reply, caplog):
    """A server that runs Lua its own way, or something between keygate and Redis: the
    request is not admitted on that answer (redis_failure applies), and it is said."""
    c = counters

    def call(script, tail, nargs):
        fut = c.loop.create_future()
        fut.set_result(reply)
        return fut

    c._call = call
    checks = [sc.Check(0, "r", 5, False), sc.Check(2, "t", 9, True)]
    with pytest.raises(sc.Unavailable):
        admit(c, rid="odd", checks=checks)
    assert "odd" not in c.leases and c.reachable
    assert "not what keygate's script answers" in caplog.text


def test_unreachable_redis_raises_and_keeps_settlements_until_it_answers(tmp_path):
    r = RedisServer(tmp_path / "r")
    if needs_redis.args[0]:
        pytest.skip("redis-server is not installed")
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(_make(r.url, Clock()))
    try:
        with pytest.raises(sc.Unavailable):  # nothing listens there yet
            loop.run_until_complete(c.admit("k", "a", NOW, 0, 1, None, None, []))
        assert not c.reachable
        c.settle("k", "z", NOW, 8, False, None, local=True)
        assert len(c.pending) == 1
        r.start()
        r.client().set(sc.MARKER, "1")  # it came back with its data

        async def back():  # (a settlement sent is out of `pending` before Redis answers)
            for _ in range(100):
                if (c.reachable and not c.pending
                        and r.client().hget("keygate:{k}:all", "t") == "8"):
                    return True
                await asyncio.sleep(0.05)
        assert loop.run_until_complete(back())
    finally:
        loop.run_until_complete(c.close())
        loop.close()
        r.stop()


def test_quota_checks_follow_the_limiters_order():
    lim = Limits(requests_per_day=5, tokens_per_day=9, tokens_total=10)
    assert [name for name, _ in quota_checks(lim)] == [
        "requests_per_day", "tokens_per_day", "tokens_total"]
    assert quota_checks(Limits(rpm=3)) == []


def test_restore_writes_what_the_logs_say(redis_server, tmp_path):
    client = redis_server.client()
    client.flushall()
    day = "2026-09-21"
    recs = [{"ts": f"{day}T10:00:00.000Z", "id": f"r{i}", "key": "k", "error": None,
             "total_tokens": 8} for i in range(3)]
    recs.append({"ts": f"{day}T10:00:00.000Z", "id": "x", "key": "k",
                 "error": "rate_limit_exceeded", "total_tokens": 0})
    (tmp_path / "usage.jsonl").write_text(json.dumps(recs[0]) + "\n")
    (tmp_path / "usage-h-1.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs[1:]))
    n = write_counters(client, counters_from_logs(tmp_path / "usage.jsonl"))
    assert n == 1
    assert client.hgetall(f"keygate:{{k}}:d:{day}") == {"r": "3", "t": "24"}
    assert client.hget("keygate:{k}:all", "t") == "24"
    assert client.exists(sc.MARKER)


def test_a_rebuild_keeps_what_redis_counted_since_it_came_back(redis_server, tmp_path):
    from keygate.accounting.restore import iso, restore

    client = redis_server.client()
    client.flushall()
    back_ms = int(NOW * 1000)
    client.set(sc.BACK, back_ms)
    day = sc.periods_of(NOW)[0]
    # Since it came back Redis counted two requests itself; the logs hold those two and
    # three from before.
    client.hset(f"keygate:{{k}}:d:{day}", mapping={"r": 2, "t": 16})
    before = [{"ts": iso(back_ms - 1000 * i), "id": f"b{i}", "key": "k", "error": None,
               "total_tokens": 8} for i in range(1, 4)]
    after = [{"ts": iso(back_ms + 500 * i), "id": f"a{i}", "key": "k", "error": None,
              "total_tokens": 8} for i in range(2)]
    (tmp_path / "usage.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                  for r in before + after))
    assert restore(client, tmp_path / "usage.jsonl", only_if_missing=True, catch_up=0) == 1
    assert client.hgetall(f"keygate:{{k}}:d:{day}") == {"r": "5", "t": "40"}
    assert client.exists(sc.MARKER) and not client.exists(sc.BACK)
    # The marker is there now: nothing more to do.
    assert restore(client, tmp_path / "usage.jsonl", only_if_missing=True, catch_up=0) is None


def test_a_flush_right_after_start_up_is_noticed(redis_server, tmp_path):
    """A keygate that has just rebuilt (or found) Redis' counters at start-up notices a
    flush at its next look, though no look had seen the marker yet."""
    from helpers.unit import make_config
    from keygate.stages.shared import Shared

    client = redis_server.client()
    client.flushall()
    (tmp_path / "usage.jsonl").write_text(json.dumps(
        {"ts": "2026-09-21T10:00:00.000Z", "id": "r1", "key": "k", "error": None,
         "total_tokens": 8}) + "\n")
    config = make_config(f'[gateway]\nredis_url = "{redis_server.url}"\n'
                         f'usage_log = "{tmp_path / "usage.jsonl"}"\n')
    shared = Shared(config)

    async def main():
        shared._url = redis_server.url
        shared.counters = sc.SharedCounters(redis_server.url)
        try:
            await shared._restore(redis_server.url, tmp_path / "usage.jsonl")  # start-up
            assert client.exists(sc.MARKER)
            client.flushall()  # before the first look
            await shared._look_for_marker(shared.counters)
            assert shared._restoring is not None
            await shared._restoring
        finally:
            await shared.counters.close()

    asyncio.run(main())
    assert client.exists(sc.MARKER) and client.hget("keygate:{k}:all", "t") == "8"
