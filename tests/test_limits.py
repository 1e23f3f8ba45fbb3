"""keygate/stages/limiter.py: per-key rate limits and quotas with an injected clock
(docs/errors.md, docs/limits.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons

from helpers.unit import make_config, make_flow, with_state
from keygate.model.keyring import Limits as KeyLimits
from keygate.request import state_of
from keygate.stages import limiter as limits_module
from keygate.stages.limiter import (
    FIRST_ESTIMATE,
    WINDOW,
    Limiter,
    RollingWindow,
    retry_after,
    seconds_to_utc_midnight,
    utc_day,
)


def at(text: str) -> float:
    """A UTC moment as a timestamp: at("2026-03-01T23:59:30")."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


T0 = at("2026-03-01T12:00:00")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeLedger:
    """What the usage log says: requests and tokens per key and UTC day, tokens in total."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self.asked: list[tuple] = []

    def requests_on(self, key: str, day: str) -> int:
        self.asked.append(("requests_on", key, day))
        return self.requests[(key, day)]

    def tokens_on(self, key: str, day: str) -> int:
        self.asked.append(("tokens_on", key, day))
        return self.tokens[(key, day)]

    def tokens_total(self, key: str) -> int:
        self.asked.append(("tokens_total", key))
        return self.total[key]


class FakeUsage:
    def __init__(self) -> None:
        self.ledger = FakeLedger()


def make_limits(clock: Clock | None = None, keys: dict | None = None) -> Limiter:
    config = make_config(keys=keys or {"k": {}})
    return Limiter(config, FakeUsage(), clock=clock or Clock())


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("seconds, header", [
    (0, "1"), (0.001, "1"), (0.5, "1"), (1, "1"), (1.0001, "2"), (57, "57"), (57.4, "58"),
    (59.999, "60"), (86400, "86400"),
])
def test_retry_after_is_whole_seconds_rounded_up(seconds, header):
    assert retry_after(seconds) == header


@pytest.mark.parametrize("now, seconds, day", [
    ("2026-03-01T12:00:00", 43200, "2026-03-01"),
    ("2026-03-01T23:59:30", 30, "2026-03-01"),
    ("2026-03-01T00:00:00", 86400, "2026-03-01"),
    ("2026-12-31T23:00:00", 3600, "2026-12-31"),
    ("2028-02-28T23:59:59", 1, "2028-02-28"),
])
def test_utc_midnight_and_day(now, seconds, day):
    assert seconds_to_utc_midnight(at(now)) == pytest.approx(seconds)
    assert utc_day(at(now)) == day


# --------------------------------------------------------------------------- RollingWindow


def test_rolling_window_basics():
    w = RollingWindow()
    w.add(0.0)
    w.add(10.0, 5)
    w.add(20.0, 0)  # nothing to remember
    assert w.total == 6 and len(w.events) == 2
    w.expire(59.9)
    assert w.total == 6
    w.expire(60.0)  # the event at 0 is now 60 s old: out of the window
    assert w.total == 5
    assert w.wait_below(5, 60.0) == pytest.approx(10.0)
    assert w.wait_below(6, 60.0) == 0.0
    w.expire(70.0)
    assert w.total == 0 and not w.events


def ref_total(events: list[tuple[int, int]], now: int) -> int:
    return sum(a for t, a in events if t > now - WINDOW)


def ref_wait(events: list[tuple[int, int]], limit: int, now: int) -> float:
    """The earliest moment, from now on, at which the window total is below `limit`."""
    live = [(t, a) for t, a in events if t > now - WINDOW]
    if sum(a for _, a in live) < limit:
        return 0.0
    for t in sorted({t for t, _ in live}):
        if sum(a for u, a in live if u > t) < limit:
            return max(0.0, t + WINDOW - now)
    return WINDOW  # a limit of 0 never opens


ops = st.lists(
    st.tuples(st.integers(0, 45),  # time step
              st.one_of(st.tuples(st.just("add"), st.integers(0, 50)),
                        st.tuples(st.just("check"), st.integers(0, 120)))),
    max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_rolling_window_against_a_reference_model(ops):
    w = RollingWindow()
    events: list[tuple[int, int]] = []
    now = 0
    for step, (op, n) in ops:
        now += step
        w.expire(now)
        assert w.total == ref_total(events, now)
        if op == "add":
            w.add(now, n)
            events.append((now, n))
        else:
            wait = w.wait_below(n, now)
            assert wait == ref_wait(events, n, now)
            if n > 0 and wait < WINDOW:
                # And it really is below the limit then.
                assert ref_total(events, now + wait) < n
        assert w.total == ref_total(events, now)


# --------------------------------------------------------------------------- check: rpm


def test_rpm_refuses_exactly_the_rpm_plus_first():
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": {"rpm": 3}}})
    limits = KeyLimits(rpm=3)
    for i in range(3):
        clock.t = T0 + i
        assert lim.check("k", limits, clock.t) is None
        lim.admit("k", clock.t)
        lim.finish("k", 0, clock.t)
    clock.t = T0 + 3
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "rate_limit_exceeded"
    assert "3 requests per minute" in message
    assert retry_after(wait) == "57"  # the request at T0 leaves the window at T0 + 60
    clock.t = T0 + 59.5
    assert retry_after(lim.check("k", limits, clock.t)[2]) == "1"
    clock.t = T0 + 60
    assert lim.check("k", limits, clock.t) is None


def test_rpm_refused_requests_count_for_nothing():
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": {"rpm": 2}}})
    limits = KeyLimits(rpm=2)
    for _ in range(2):
        lim.admit("k", clock.t)
    for i in range(50):  # hammering while refused does not push the window on
        clock.t = T0 + i
        assert lim.check("k", limits, clock.t) is not None
    clock.t = T0 + 60
    assert lim.check("k", limits, clock.t) is None
    lim.admit("k", clock.t)
    assert lim.check("k", limits, clock.t) is None  # one of two used
    lim.admit("k", clock.t)
    assert lim.check("k", limits, clock.t) is not None


def test_rpm_window_rolls_over():
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": {"rpm": 2}}})
    limits = KeyLimits(rpm=2)
    admitted = []
    for second in range(0, 300):
        clock.t = T0 + second
        if lim.check("k", limits, clock.t) is None:
            lim.admit("k", clock.t)
            lim.finish("k", 0, clock.t)
            admitted.append(second)
    # Two per rolling minute: at 0, 1, then 60, 61, 120, 121 ...
    assert admitted == [0, 1, 60, 61, 120, 121, 180, 181, 240, 241]
    for a, b in zip(admitted, admitted[2:]):
        assert b - a >= 60


def test_rpm_is_per_key():
    lim = make_limits(keys={"a": {"limits": {"rpm": 1}}, "b": {"limits": {"rpm": 1}}})
    limits = KeyLimits(rpm=1)
    lim.admit("a", T0)
    assert lim.check("a", limits, T0) is not None
    assert lim.check("b", limits, T0) is None


# --------------------------------------------------------------------------- tpm, concurrent


def test_tpm():
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": {"tpm": 100}}})
    limits = KeyLimits(tpm=100)
    assert lim.check("k", limits, clock.t) is None
    lim.admit("k", clock.t)
    lim.finish("k", 60, clock.t)
    clock.t = T0 + 1
    assert lim.check("k", limits, clock.t) is None  # 60 used: below the limit
    lim.admit("k", clock.t)
    lim.finish("k", 50, clock.t)  # the request that crosses the quota completes
    clock.t = T0 + 2
    code, message, wait = lim.check("k", limits, clock.t)  # ... the next is refused
    assert code == "rate_limit_exceeded" and "100 tokens per minute" in message
    assert retry_after(wait) == "58"  # at T0 + 60 the 60 tokens leave: 50 < 100
    clock.t = T0 + 60
    assert lim.check("k", limits, clock.t) is None


def test_tpm_exactly_at_the_limit_is_refused():
    lim = make_limits(keys={"k": {"limits": {"tpm": 100}}})
    lim.admit("k", T0)
    lim.finish("k", 100, T0)
    assert lim.check("k", KeyLimits(tpm=100), T0 + 1) is not None
    assert lim.check("k", KeyLimits(tpm=101), T0 + 1) is None


def test_concurrent():
    lim = make_limits()
    limits = KeyLimits(concurrent=2)
    lim.admit("k", T0)
    lim.admit("k", T0)
    code, message, wait = lim.check("k", limits, T0)
    assert code == "rate_limit_exceeded" and "in flight" in message
    assert retry_after(wait) == "1"
    lim.finish("k", 0, T0)
    assert lim.check("k", limits, T0) is None
    lim.finish("k", 0, T0)
    assert lim.inflight.get("k", 0) == 0


# --------------------------------------------------------------------------- quotas


@pytest.mark.parametrize("now, header", [
    ("2026-03-01T12:00:00", "43200"), ("2026-03-01T23:59:30", "30"),
    ("2026-03-01T23:59:59.500", "1"), ("2026-03-01T00:00:01", "86399"),
])
def test_requests_per_day(now, header):
    clock = Clock(at(now))
    lim = make_limits(clock)
    limits = KeyLimits(requests_per_day=5)
    ledger = lim.usage.ledger
    ledger.requests[("k", "2026-03-01")] = 4
    assert lim.check("k", limits, clock.t) is None
    assert ("requests_on", "k", "2026-03-01") in ledger.asked
    lim.admit("k", clock.t)  # the fifth, in flight: not in the log yet, counted all the same
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "insufficient_quota" and "5 per UTC day" in message
    assert retry_after(wait) == header
    ledger.requests[("k", "2026-03-01")] = 5
    lim.finish("k", 0, clock.t)
    assert lim.check("k", limits, clock.t) is not None
    clock.t = at("2026-03-02T00:00:00")  # a new UTC day
    assert lim.check("k", limits, clock.t) is None


def test_tokens_per_day():
    clock = Clock(at("2026-03-01T22:00:00"))
    lim = make_limits(clock)
    limits = KeyLimits(tokens_per_day=1000)
    ledger = lim.usage.ledger
    ledger.tokens[("k", "2026-03-01")] = 999
    assert lim.check("k", limits, clock.t) is None
    ledger.tokens[("k", "2026-03-01")] = 1000
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "insufficient_quota" and "1000 per UTC day" in message
    assert retry_after(wait) == "7200"
    ledger.tokens[("k", "2026-02-28")] = 10 ** 9  # other days do not matter
    clock.t = at("2026-03-02T00:00:00")
    assert lim.check("k", limits, clock.t) is None


def test_tokens_total_has_no_retry_after():
    lim = make_limits()
    limits = KeyLimits(tokens_total=50)
    lim.usage.ledger.total["k"] = 49
    assert lim.check("k", limits, T0) is None
    lim.usage.ledger.total["k"] = 50
    code, message, wait = lim.check("k", limits, T0)
    assert code == "insufficient_quota" and "50 tokens in total" in message
    assert wait is None
    assert lim.check("k", limits, T0 + 10 * 86400) is not None  # it never resets


def test_no_limits_no_questions():
    lim = make_limits()
    assert lim.check("k", KeyLimits(), T0) is None
    assert lim.usage.ledger.asked == []


# --------------------------------------------------------------------------- the addon


def admitted(key: str = "k", path: str = "/api/chat") -> http.HTTPFlow:
    f = make_flow("POST", path, body={"model": "m"})
    with_state(f, key=key, admitted=True, channel="local",
                       upstream_model="m", model="m")
    return f


def finish(lim: Limiter, f: http.HTTPFlow, tokens: int = 0) -> None:
    f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    state_of(f).total_tokens = tokens
    lim.responseheaders(f)
    lim.response(f)


def test_addon_rpm_refusal():
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": {"rpm": 2}}})
    with taddons.context():
        for _ in range(2):
            f = admitted()
            lim.request(f)
            assert f.response is None
            assert state_of(f).admitted is True
            finish(lim, f)
            assert f.response.headers["x-ratelimit-limit-requests"] == "2"
        assert f.response.headers["x-ratelimit-remaining-requests"] == "0"
        clock.t += 10
        f = admitted()
        lim.request(f)
    assert f.response.status_code == 429
    assert f.response.headers["x-keygate-error"] == "rate_limit_exceeded"
    assert f.response.headers["retry-after"] == "50"
    # Not forwarded after all: it must not look routed.
    st = state_of(f)
    assert (st.admitted, st.channel, st.upstream_model) == (False, None, None)
    assert not state_of(f).counted


def test_addon_concurrent_and_release_on_error():
    lim = make_limits(keys={"k": {"limits": {"concurrent": 1}}})
    with taddons.context():
        first = admitted()
        lim.request(first)
        assert first.response is None
        second = admitted()
        lim.request(second)
        assert second.response.status_code == 429
        assert second.response.headers["retry-after"] == "1"
        first.error = Error("client disconnected")
        lim.error(first)  # the stream broke: the slot is free again
        third = admitted()
        lim.request(third)
        assert third.response is None
        finish(lim, third)
        finish(lim, third)  # a second end hook must not free a slot twice
    assert lim.inflight.get("k", 0) == 0


def test_addon_tpm_from_finished_requests():
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": {"tpm": 100}}})
    with taddons.context():
        f = admitted()
        lim.request(f)
        finish(lim, f, tokens=150)
        assert f.response.headers["x-ratelimit-limit-tokens"] == "100"
        clock.t += 5
        f = admitted()
        lim.request(f)
    assert f.response.status_code == 429
    assert f.response.headers["retry-after"] == "55"


def test_addon_quota_refusals():
    clock = Clock(at("2026-03-01T23:00:00"))
    lim = make_limits(clock, keys={"d": {"limits": {"tokens_per_day": 10}},
                                   "t": {"limits": {"tokens_total": 10}}})
    lim.usage.ledger.tokens[("d", "2026-03-01")] = 10
    lim.usage.ledger.total["t"] = 11
    with taddons.context():
        fd, ft = admitted("d", "/v1/chat/completions"), admitted("t", "/v1/messages")
        lim.request(fd)
        lim.request(ft)
    assert fd.response.status_code == ft.response.status_code == 429
    assert fd.response.headers["x-keygate-error"] == "insufficient_quota"
    assert fd.response.headers["retry-after"] == "3600"
    assert fd.response.json()["error"]["code"] == "insufficient_quota"
    assert ft.response.headers["x-keygate-error"] == "insufficient_quota"
    assert "retry-after" not in ft.response.headers
    assert ft.response.json()["type"] == "error"


def test_addon_ignores_flows_it_should_not_count():
    lim = make_limits(keys={"k": {"limits": {"rpm": 0}}, "free": {}})
    with taddons.context():
        refused = admitted()
        state_of(refused).admitted = False  # refused earlier: counts for nothing
        lim.request(refused)
        assert refused.response is None
        answered = admitted()
        answered.response = http.Response.make(403)
        lim.request(answered)
        assert answered.response.status_code == 403
        free = admitted("free")
        lim.request(free)
        assert free.response is None
        assert "x-ratelimit-limit-requests" not in state_of(free).ratelimit
        gone = admitted("nobody")  # dropped from keys.yaml meanwhile
        lim.request(gone)
        assert gone.response is None
    assert lim.requests == {} or all(w.total == 0 for w in lim.requests.values())


# --------------------------------------------------------------------------- reservations


DAY = "2026-03-01"


def settle(lim: Limiter, f: http.HTTPFlow, tokens: int) -> None:
    """The request ends having used `tokens`, counted as the usage log counts it."""
    ledger = lim.usage.ledger
    name = state_of(f).key
    finish(lim, f, tokens)
    ledger.tokens[(name, DAY)] += tokens
    ledger.total[name] += tokens


def test_reservations_hold_back_a_token_quota_until_their_requests_end():
    lim = make_limits(keys={"k": {"limits": {"tokens_per_day": 10}}})
    with taddons.context():
        first = admitted()
        lim.request(first)
        assert first.response is None
        assert state_of(first).reserved == FIRST_ESTIMATE  # nothing known yet
        assert lim.reserved == {"k": FIRST_ESTIMATE}
        for _ in range(5):
            f = admitted()
            lim.request(f)
            # Not used up, spoken for: retry soon, not at midnight.
            assert f.response.status_code == 429
            assert f.response.headers["x-keygate-error"] == "rate_limit_exceeded"
            assert f.response.headers["retry-after"] == "1"
            assert "nearly used up (10 per UTC day)" in f.response.json()["error"]
            assert not state_of(f).reserved and not state_of(f).counted
            lim.response(f)  # a refused request reserved nothing, so frees nothing
        assert lim.reserved == {"k": FIRST_ESTIMATE} and lim.inflight == {"k": 1}
        settle(lim, first, 8)
        assert lim.reserved == {} and lim.inflight == {} and lim.estimates == {"k": 8.0}
        second = admitted()
        lim.request(second)  # 8 used + 0 reserved < 10
        assert second.response is None and state_of(second).reserved == 8
        third = admitted()
        lim.request(third)  # 8 used + 8 reserved >= 10
        assert third.response.headers["x-keygate-error"] == "rate_limit_exceeded"
        settle(lim, second, 8)  # crosses the quota and completes (docs/limits.md)
        fourth = admitted()
        lim.request(fourth)
    assert fourth.response.headers["x-keygate-error"] == "insufficient_quota"
    assert lim.counted == {}


@pytest.mark.parametrize("limits, used, what", [
    ({"tpm": 100}, 60, "100 tokens per minute"),
    ({"tokens_per_day": 100}, 60, "100 per UTC day"),
    ({"tokens_total": 100}, 60, "100 tokens in total"),
])
def test_each_token_quota_counts_reservations(limits, used, what):
    clock = Clock()
    lim = make_limits(clock, keys={"k": {"limits": limits}})
    lim.estimates["k"] = 39.2  # reserves 40
    kl = KeyLimits(**limits)
    if "tpm" in limits:
        lim.admit("k", clock.t)
        lim.finish("k", used, clock.t)
    lim.usage.ledger.tokens[("k", DAY)] = used
    lim.usage.ledger.total["k"] = used
    assert lim.reservation("k", kl) == 40
    lim.admit("k", clock.t, 39)
    assert lim.check("k", kl, clock.t) is None  # 60 + 39 < 100
    lim.admit("k", clock.t, 1)
    code, message, wait = lim.check("k", kl, clock.t)  # 60 + 40 >= 100
    assert code == "rate_limit_exceeded" and what in message and wait == 1.0
    lim.finish("k", 0, clock.t, 1)
    assert lim.check("k", kl, clock.t) is None


def test_a_quota_used_up_answers_before_reservations():
    lim = make_limits(keys={"k": {"limits": {"tokens_per_day": 100, "tokens_total": 50}}})
    limits = KeyLimits(tokens_per_day=100, tokens_total=50)
    lim.usage.ledger.tokens[("k", DAY)] = 40
    lim.usage.ledger.total["k"] = 50
    lim.admit("k", T0, 80)
    code, message, wait = lim.check("k", limits, T0)
    assert code == "insufficient_quota" and "50 tokens in total" in message and wait is None


def test_keys_without_token_quotas_reserve_nothing():
    lim = make_limits(keys={"k": {"limits": {"rpm": 5, "concurrent": 3}}, "free": {}})
    with taddons.context():
        for name in ("k", "free"):
            f = admitted(name)
            lim.request(f)
            assert f.response is None and not state_of(f).reserved
            finish(lim, f, 500)
    assert lim.reserved == {} and lim.estimates == {}
    assert lim.reservation("k", KeyLimits(rpm=5)) == 0


def test_the_estimate_is_a_recent_mean_of_requests_that_reported_tokens():
    lim = make_limits(keys={"k": {"limits": {"tokens_total": 10 ** 9}}})
    limits = KeyLimits(tokens_total=10 ** 9)
    assert lim.reservation("k", limits) == FIRST_ESTIMATE
    for tokens, mean in [(100, 100.0), (0, 100.0), (20, 80.0), (1, 60.25)]:
        lim.admit("k", T0, lim.reservation("k", limits))
        lim.finish("k", tokens, T0, lim.reserved["k"])
        assert lim.estimates["k"] == mean
    assert lim.reservation("k", limits) == 61  # rounded up
    lim.estimates["k"] = 0.01
    assert lim.reservation("k", limits) == 1  # never less than one


def test_every_way_a_request_ends_releases_its_reservation(monkeypatch):
    monkeypatch.setattr(limits_module, "ABANDONED_AFTER", 0.05)
    lim = make_limits(keys={"k": {"limits": {"tokens_total": 10 ** 6, "concurrent": 10}}})

    async def main():
        with taddons.context():
            flows = [admitted() for _ in range(5)]
            for f in flows:
                lim.request(f)
                assert f.response is None
            assert lim.reserved == {"k": 5 * FIRST_ESTIMATE} and len(lim.counted) == 5
            answered, broke, left, refused, abandoned = flows
            finish(lim, answered, 7)
            broke.error = Error("server disconnected")
            lim.error(broke)
            left.error = Error("Client disconnected.")
            lim.error(left)
            lim.error(left)  # a second end hook frees nothing twice
            # A stage after the Limiter refused it after all: mitmproxy sends that answer and
            # runs the response hook.
            refused.response = http.Response.make(503)
            lim.response(refused)
            assert lim.reserved == {"k": FIRST_ESTIMATE} and lim.inflight == {"k": 1}
            # No end hook at all (mitmproxy gave up on it): ended once its client is gone.
            lim.client_disconnected(flows[0].client_conn)  # no flow of that client left
            lim.client_disconnected(abandoned.client_conn)
            await asyncio.sleep(0.1)
            assert lim.reserved == {}
            assert lim.inflight == {} and lim.counted == {}

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 40)),  # its real token count
    st.tuples(st.just("end"), st.integers(0, 1000)),  # which request in flight ends
), max_size=60), quota=st.integers(1, 120), tpd=st.booleans())
def test_the_overshoot_bound_against_a_model(steps, quota, tpd):
    """limits.py's bound: with L the last request admitted and F the requests in flight
    right after (L among them), the quota ends exceeded by at most
    (a_L - 1) + sum(a_i - e_i, i in F - L), and F holds at most ceil(R / min e)."""
    limits = {"tokens_per_day": quota} if tpd else {"tokens_total": quota}
    lim = make_limits(keys={"k": {"limits": limits}})
    ledger = lim.usage.ledger
    actual: dict[str, int] = {}
    flight: list[http.HTTPFlow] = []
    last: tuple | None = None  # (L, F, used at L's admission)
    estimates: dict[str, int] = {}  # reservation of each flow, by flow id
    with taddons.context():
        for op, n in steps + [("end", 0)] * 60:
            if op == "arrive":
                f = admitted()
                used = ledger.total["k"]
                lim.request(f)
                if f.response is None:
                    actual[f.id] = n
                    flight.append(f)
                    last = (f, list(flight), used)
                else:
                    assert not state_of(f).reserved
            elif flight:
                f = flight.pop(n % len(flight))
                reserved = state_of(f).reserved
                assert reserved >= 1
                estimates[f.id] = reserved  # kept for the check below
                settle(lim, f, actual[f.id])
    assert lim.reserved == {} and lim.inflight == {}
    if last is None:
        return
    L, F, used = last
    e = {f.id: estimates[f.id] for f in F}
    over = ledger.total["k"] - quota
    assert over <= actual[L.id] - 1 + sum(actual[f.id] - e[f.id] for f in F if f is not L)
    assert len(F) <= math.ceil((quota - used) / min(e.values()))


def test_a_rolling_window_keeps_only_its_last_minute():
    w = RollingWindow()
    for t in range(10_000):
        w.add(float(t))
    assert len(w.events) <= WINDOW + 1 and w.total == len(w.events)


# --------------------------------------------------------------------------- months, budgets
#
# The quotas of docs/limits.md#quotas over UTC months, and budgets in money over the lines'
# cost (a real Ledger here, fed lines as the Recorder feeds it), with the clock set by the
# test: the crossing request completes, the next is refused until the reset.

from decimal import Decimal  # noqa: E402

from keygate.accounting.ledger import Ledger  # noqa: E402
from keygate.stages.limiter import seconds_to_next_utc_month, utc_month  # noqa: E402


class RealUsage:
    def __init__(self) -> None:
        self.ledger = Ledger()


def budgeted(clock: Clock, toml: str = "", **limits) -> Limiter:
    config = make_config(toml, keys={"k": {"limits": limits}})
    return Limiter(config, RealUsage(), clock=clock)


def spend(lim: Limiter, when: str, cost: str | None, tokens: int = 0, key: str = "k") -> None:
    """A finished request's line, as the Recorder hands it to the ledger."""
    lim.usage.ledger.add({"ts": when + ".000Z", "key": key, "error": None,
                          "total_tokens": tokens,
                          "cost": None if cost is None else Decimal(cost)})


@pytest.mark.parametrize("now, seconds, month", [
    ("2026-03-31T23:59:30", 30, "2026-03"),
    ("2026-03-01T00:00:00", 31 * 86400, "2026-03"),
    ("2026-02-15T12:00:00", 13.5 * 86400, "2026-02"),
    ("2028-02-29T23:00:00", 3600, "2028-02"),
    ("2026-12-31T23:59:59", 1, "2026-12"),  # the turn of a year
])
def test_next_utc_month(now, seconds, month):
    assert seconds_to_next_utc_month(at(now)) == pytest.approx(seconds)
    assert utc_month(at(now)) == month


def test_budget_per_day_crossing_completes_and_midnight_resets():
    clock = Clock(at("2026-03-01T23:00:00"))
    lim = budgeted(clock, '[gateway]\ncurrency = "EUR"\n', budget_per_day=5)
    limits = lim.config.state.keys.by_name["k"].limits
    assert limits.budget_per_day == Decimal(5)
    spend(lim, "2026-03-01T10:00:00", "4.99999999")
    spend(lim, "2026-02-28T10:00:00", "1000")  # another day
    assert lim.check("k", limits, clock.t) is None  # something remains: admitted
    spend(lim, "2026-03-01T23:00:00", "0.5")  # ... and it crosses: it completed
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "insufficient_quota"
    assert message == "Daily budget used up (5 EUR per UTC day)."
    assert retry_after(wait) == "3600"
    clock.t = at("2026-03-01T23:59:59.5")
    assert retry_after(lim.check("k", limits, clock.t)[2]) == "1"
    clock.t = at("2026-03-02T00:00:00")  # midnight UTC: a new day's budget
    assert lim.check("k", limits, clock.t) is None


def test_a_budget_used_exactly_is_used_up_and_zero_refuses_all():
    clock = Clock(at("2026-03-01T12:00:00"))
    lim = budgeted(clock, budget_per_day=0.3, budget_total=0)
    spend(lim, "2026-03-01T10:00:00", "0.1")
    spend(lim, "2026-03-01T10:00:01", "0.2")  # 0.1 + 0.2 is 0.3, exactly
    day_only = KeyLimits(budget_per_day=Decimal("0.3"))
    assert lim.check("k", day_only, clock.t)[0] == "insufficient_quota"
    assert lim.check("k", KeyLimits(budget_per_day=Decimal("0.30000001")), clock.t) is None
    code, message, wait = lim.check("k", KeyLimits(budget_total=Decimal(0)), clock.t)
    assert (code, wait) == ("insufficient_quota", None)
    assert message == "Budget used up (0 USD in total)."


def test_budget_per_month_resets_at_the_month_turn():
    clock = Clock(at("2026-03-31T23:59:30"))
    lim = budgeted(clock, budget_per_month=10)
    limits = KeyLimits(budget_per_month=Decimal(10))
    for day in ("2026-03-01", "2026-03-15", "2026-03-31"):
        spend(lim, day + "T08:00:00", "3.5")
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "insufficient_quota" and "10 USD per UTC month" in message
    assert retry_after(wait) == "30"
    clock.t = at("2026-04-01T00:00:00")
    assert lim.check("k", limits, clock.t) is None
    spend(lim, "2026-04-01T00:00:00", "9.99")
    assert lim.check("k", limits, clock.t) is None
    spend(lim, "2026-04-01T00:00:01", "0.01")
    assert lim.check("k", limits, clock.t)[0] == "insufficient_quota"


def test_budget_total_never_resets_and_has_no_retry_after():
    clock = Clock(at("2026-03-01T12:00:00"))
    lim = budgeted(clock, budget_total=1)
    limits = KeyLimits(budget_total=Decimal(1))
    spend(lim, "2026-01-05T12:00:00", "0.6")
    assert lim.check("k", limits, clock.t) is None
    spend(lim, "2026-03-01T12:00:00", "0.4")
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "insufficient_quota" and wait is None
    assert message == "Budget used up (1 USD in total)."
    assert lim.check("k", limits, at("2027-06-01T00:00:00")) is not None


def test_lines_without_cost_spend_nothing():
    clock = Clock(at("2026-03-01T12:00:00"))
    lim = budgeted(clock, budget_per_day=0.000001)
    for i in range(100):
        spend(lim, f"2026-03-01T11:00:{i % 60:02d}", None, tokens=1000)
    assert lim.check("k", KeyLimits(budget_per_day=Decimal("0.000001")), clock.t) is None


def test_requests_per_month_counts_those_in_flight():
    clock = Clock(at("2026-03-31T23:00:00"))
    lim = budgeted(clock, requests_per_month=3)
    limits = KeyLimits(requests_per_month=3)
    spend(lim, "2026-03-02T00:00:00", None)
    spend(lim, "2026-02-28T23:59:59", None)  # last month
    assert lim.check("k", limits, clock.t) is None
    lim.admit("k", clock.t)  # in flight: not in the log yet
    assert lim.check("k", limits, clock.t) is None
    lim.admit("k", clock.t)
    code, message, wait = lim.check("k", limits, clock.t)
    assert code == "insufficient_quota"
    assert message == "Monthly request quota used up (3 per UTC month)."
    assert retry_after(wait) == "3600"
    clock.t = at("2026-04-01T00:00:00")
    assert lim.check("k", limits, clock.t) is None


def test_tokens_per_month_and_its_reservations():
    clock = Clock(at("2026-03-20T12:00:00"))
    lim = budgeted(clock, tokens_per_month=5000)
    limits = KeyLimits(tokens_per_month=5000)
    spend(lim, "2026-03-01T00:00:00", None, tokens=3000)
    assert lim.reservation("k", limits) == FIRST_ESTIMATE
    assert lim.check("k", limits, clock.t) is None
    lim.admit("k", clock.t, FIRST_ESTIMATE)
    lim.admit("k", clock.t, FIRST_ESTIMATE)  # 3000 + 2 x 1024 >= 5000: held, not used up
    code, message, wait = lim.check("k", limits, clock.t)
    assert (code, wait) == ("rate_limit_exceeded", 1.0)
    assert "5000 per UTC month" in message
    spend(lim, "2026-03-20T12:00:00", None, tokens=2000)  # now used up
    assert lim.check("k", limits, clock.t)[0] == "insufficient_quota"


def test_addon_budget_refusal_has_retry_after_until_midnight():
    clock = Clock(at("2026-03-01T18:00:00"))
    lim = budgeted(clock, budget_per_day=0.01)
    with taddons.context():
        f = admitted()
        lim.request(f)
        assert f.response is None  # nothing spent yet
        spend(lim, "2026-03-01T18:00:00", "0.02")  # it crossed, and completed
        finish(lim, f)
        f = admitted()
        lim.request(f)
    assert f.response.status_code == 429
    assert f.response.headers["x-keygate-error"] == "insufficient_quota"
    assert f.response.headers["retry-after"] == str(6 * 3600)
    assert not state_of(f).admitted and not state_of(f).counted


def test_quota_keys_wait_for_the_counters():
    """Any quota (months and budgets too) needs the ledger rebuilt from the log."""
    assert KeyLimits(budget_total=Decimal(1)).quotas == ("budget_total",)
    assert KeyLimits(requests_per_month=1, rpm=5).quotas == ("requests_per_month",)
    assert KeyLimits(rpm=5, tpm=5, concurrent=1).quotas == ()
    assert KeyLimits(budget_per_month=Decimal(0)).any()
