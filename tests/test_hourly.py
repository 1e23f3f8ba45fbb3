"""Unit: the hourly totals behind /keygate/usage and the dashboard
(keygate/accounting/hourly.py), the period a query asks for (keygate/pages), and the
limit a refusal names (keygate/stages/metrics.py)."""

from __future__ import annotations

import datetime as dt
import random
import time
from decimal import Decimal

import pytest

from keygate import pages
from keygate.accounting import hourly as hourly_mod
from keygate.accounting.hourly import OTHER_MODEL, Hourly, bucket_of, percentile
from keygate.accounting.ledger import OWN_PATHS
from keygate.accounting.totals import aggregate
from keygate.model import endpoints
from keygate.stages.metrics import limit_of

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 20, tzinfo=UTC)


def record(i: int, rng: random.Random, hours: int = 24 * 10) -> dict:
    t = T0 + dt.timedelta(seconds=rng.randrange(hours * 3600), milliseconds=rng.randrange(1000))
    error = rng.choice([None, None, None, "upstream_error", "rate_limit_exceeded",
                        "permission_denied"])
    p, c = rng.randrange(50), rng.randrange(50)
    return {
        "ts": t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z",
        "id": f"req_{i}", "key": rng.choice(["alice", "bob", "carol", None]),
        "status": 200 if error is None else 429, "error": error,
        "model": rng.choice(["llama3.2", "qwen2.5:7b", None]),
        "channel": rng.choice(["local", "remote", None]),
        "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
        "duration_ms": rng.uniform(1, 5000),
        "cost": rng.choice([None, 0.001, 0.25]),
    }


def hour(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H")


@pytest.fixture(scope="module")
def log_records():
    rng = random.Random(7)
    return [record(i, rng) for i in range(5000)]


@pytest.mark.parametrize("by", [(), ("key",), ("model",), ("channel",), ("day",),
                                ("key", "model"), ("day", "key", "channel"),
                                ("model", "key", "day", "channel")])
@pytest.mark.parametrize("span", [(0, 240), (5, 29), (48, 49), (100, 300)])
def test_rows_equal_keygate_usage(log_records, by, span):
    """Over whole hours the totals are exactly what `keygate usage` computes."""
    h = Hourly()
    h.add_all(log_records)
    start, end = T0 + dt.timedelta(hours=span[0]), T0 + dt.timedelta(hours=span[1])
    since = start.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    until = end.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert h.rows(by, hour(start), hour(end)) == aggregate(log_records, by, since, until)


def test_order_does_not_matter(log_records):
    a, b = Hourly(), Hourly()
    a.add_all(log_records)
    b.add_all(reversed(log_records))
    assert a.rows(("key", "day"), "2000", "3000") == b.rows(("key", "day"), "2000", "3000")


def test_series(log_records):
    h = Hourly()
    h.add_all(log_records)
    start, end = T0 + dt.timedelta(hours=24), T0 + dt.timedelta(hours=72)
    s = h.series(hour(start), hour(end))
    assert [x["t"] for x in s["requests"]] == [hour(start + dt.timedelta(hours=i))
                                               for i in range(48)]
    inside = [r for r in log_records if hour(start) <= r["ts"][:13] < hour(end)]
    assert sum(x["requests"] for x in s["requests"]) == len(inside)
    codes = {}
    for r in inside:
        if r["error"]:
            codes[r["error"]] = codes.get(r["error"], 0) + 1
    got = {}
    for x in s["requests"]:
        for c, n in x["errors"].items():
            got[c] = got.get(c, 0) + n
    assert got == codes
    per_key = {}
    for r in inside:
        k = r["key"] or "-"
        per_key[k] = per_key.get(k, 0) + r["total_tokens"]
    summed = {}
    for day in s["tokens_by_day"]["key"].values():
        for k, v in day.items():
            summed[k] = summed.get(k, 0) + v
    assert summed == per_key
    assert Decimal(s["cost"]) == sum(Decimal(str(r["cost"])) for r in inside
                                     if r["cost"] is not None)
    daily = h.series(hour(start), hour(end), 24)["requests"]
    assert [x["t"] for x in daily] == ["2026-11-21", "2026-11-22"]
    assert sum(x["requests"] for x in daily) == len(inside)


def test_latency_percentiles_are_close(log_records):
    h = Hourly()
    h.add_all(log_records)
    lat = h.series(hour(T0), hour(T0 + dt.timedelta(days=10)))["latency"]
    for ch, label in (("local", "local"), (None, "-")):
        d = sorted(r["duration_ms"] for r in log_records if r["channel"] == ch
                   and r["error"] not in ("rate_limit_exceeded", "permission_denied"))
        assert lat[label]["requests"] == len(d)
        for q, name in ((0.5, "p50"), (0.95, "p95")):
            exact = d[max(0, int(q * len(d) + 0.999) - 1)]
            assert abs(lat[label][name] - exact) / exact < 0.11


def test_buckets():
    assert bucket_of(0) == bucket_of(0.5) == bucket_of(float("nan")) == 0
    assert bucket_of(1e12) == hourly_mod.BUCKETS - 1
    assert percentile({}, 0.5) is None
    assert percentile({bucket_of(100.0): 3}, 0.5) == pytest.approx(100, rel=0.1)


def test_models_are_capped():
    h = Hourly(max_models=3)
    for i in range(10):
        h.add({"ts": "2026-11-20T01:00:00.000Z", "key": "a", "model": f"m{i}", "status": 200,
               "error": None, "total_tokens": 1})
    rows = h.rows(("model",), "2026", "2027")
    assert [r.group[0] for r in rows] == ["(other)", "m0", "m1", "m2"]
    assert rows[0].totals.requests == 7 and OTHER_MODEL == "(other)"


def test_memory_is_bounded():
    h = Hourly(max_groups=1000, retention_days=2)
    rng = random.Random(1)
    for i in range(20000):
        r = record(i, rng, hours=24 * 10)
        r["key"] = f"k{i % 50}"
        h.add(r)
    assert h.groups <= 1000
    assert len(h.hours) <= 49
    assert h.covers_since > "2026-11-20"
    n = sum(len(v) for v in h.hours.values())
    assert n == h.groups


def test_unreadable_ts_is_skipped():
    h = Hourly()
    h.add({"ts": "garbage", "key": "a"})
    h.add({"key": "a"})
    assert h.skipped == 2 and not h.hours


@pytest.mark.parametrize("ts", ["XXXXXXXXXXTXXXXXXXXXXXXZ", "2026-02-31T01:02:03.123Z",
                                "2026-11-27T24:02:03.123Z", "2026-11-27T01:60:03.123Z"])
def test_a_damaged_ts_of_keygate_s_length_is_skipped_and_queries_still_answer(ts):
    """A line with a ts of the written form's length but no real time (a damaged log)
    went into the totals as an hour that the hour arithmetic of every later query
    choked on."""
    h = Hourly()
    h.add({"ts": ts, "key": "a", "status": 200})
    h.add({"ts": "2026-11-27T01:02:03.123Z", "key": "a", "status": 200})
    assert h.skipped == 1 and list(h.hours) == ["2026-11-27T01"]
    rows = h.rows(("key",), "2026-11-27T00", "2026-11-28T00")
    assert [r.totals.requests for r in rows] == [1]


def test_query_cost_depends_on_groups_not_lines():
    """A month of traffic from 20 keys, 10 models, 3 channels: a query over all of it
    sums the month's groups, whatever the number of lines they came from."""
    h = Hourly()
    rng = random.Random(3)
    for i in range(100_000):
        r = record(i, rng, hours=24 * 30)
        r["key"], r["model"] = f"key{i % 20}", f"model{i % 10}"
        h.add(r)
    t0 = time.perf_counter()
    start, end = T0, T0 + dt.timedelta(days=30)
    doc = pages.usage_answer(h, start, end, ("key", "model", "day"))
    took = time.perf_counter() - t0
    assert doc["total"]["requests"] == 100_000
    assert took < 2.0, took


@pytest.mark.parametrize("since,until,by,message", [
    ("2026-11-20", "2026-11-19", None, "since is after until"),
    ("1h", "3h", None, "since is after until"),
    ("2016-01-01", "2026-01-01", None, "longer than 366 days"),
    ("3650d", None, None, "longer than 366 days"),
    ("yesterday", None, None, "since/until"),
    (None, None, "key,colour", "cannot group by 'colour'"),
])
def test_bad_periods(since, until, by, message):
    now = dt.datetime(2026, 12, 4, 12, 30, tzinfo=UTC)
    with pytest.raises(pages.BadQuery, match=message):
        pages.parse_period(since, until, by, now)


def test_period_is_whole_hours():
    now = dt.datetime(2026, 12, 4, 12, 30, tzinfo=UTC)
    start, end, by = pages.parse_period("24h", None, "key,model", now)
    assert (start, end) == (dt.datetime(2026, 12, 3, 12, tzinfo=UTC),
                            dt.datetime(2026, 12, 4, 13, tzinfo=UTC))
    assert by == ("key", "model")
    start, end, _ = pages.parse_period("2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z", None,
                                       now)
    assert end - start == dt.timedelta(hours=1)


@pytest.mark.parametrize("message,limit", [
    ("Too many requests in flight for this key (limit 2).", "concurrent"),
    ("Rate limit reached: 60 requests per minute.", "rpm"),
    ("Rate limit reached: 1000 tokens per minute.", "tpm"),
    ("Daily request quota used up (5 per UTC day).", "requests_per_day"),
    ("Daily token quota used up (5 per UTC day).", "tokens_per_day"),
    ("Token quota used up (5 tokens in total).", "tokens_total"),
    ("Token quota nearly used up (5 tokens in total) by this key's requests in flight: "
     "retry when they have finished.", "reserved"),
    ("Monthly budget used up (50 USD per UTC month).", "budget_per_month"),
    ("something else", "other"),
])
def test_limit_of(message, limit):
    assert limit_of(message) == limit


def test_own_paths_agree_with_the_endpoint_table():
    own = {p for (_, p), ep in endpoints.TABLE.items() if ep.own and ep.kind != "root"}
    assert own == set(OWN_PATHS)


def test_metrics_observe_edge_lines_and_money():
    """A line of the edge (no flow, no key) and a priced line with a Decimal cost."""
    from prometheus_client.parser import text_string_to_metric_families

    from helpers.unit import make_config
    from keygate.stages.metrics import Metrics
    from keygate.stages.routing import Router

    class Recorder:
        writer, in_flight, ledger = None, 0, None

    config = make_config()
    m = Metrics(config, Recorder(), Router(config))
    base = {"key": None, "status": 431, "error": "headers_too_large", "model": None,
            "channel": None, "stream": False, "prompt_tokens": 0, "completion_tokens": 0,
            "duration_ms": 0.0, "cost": None}
    m.observe(base, None)
    m.observe({**base, "key": "alice", "status": 200, "error": None, "model": "llama3.2",
               "prompt_tokens": 3, "completion_tokens": 4, "cost": Decimal("0.000011")})
    m.refresh()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render().decode())
               for s in f.samples}
    assert samples[("keygate_requests_total", (("channel", ""), ("code", "headers_too_large"),
                                               ("key", ""), ("model", ""),
                                               ("status", "431")))] == 1
    assert samples[("keygate_cost_total", (("key", "alice"), ("model", "llama3.2")))] == \
        pytest.approx(0.000011)
    assert samples[("keygate_request_duration_seconds_count", (("channel", ""),))] == 2
