"""End to end: prices, the cost of every request, and budgets, under a real mitmdump
(docs/configuration.md#prices, docs/usage-log.md#cost, docs/limits.md#budgets).

Two upstreams with known token counts (demo/fakeollama: a reply is 5 tokens, a prompt one
token a word): an Ollama, and an OpenAI-compatible API that reports cached prompt tokens.
Channels with and without prices; every endpoint kind, streamed and not; the cost on each
line to the digit, `keygate usage`'s totals, budgets at their boundary, and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import pytest

from conftest import ROOT, Gateway, KeySpec, default_keys
from fakeollama import FakeOllama

CACHED = 4  # prompt tokens the OpenAI-compatible upstream reports as cached

PRICES = """
[[prices]]
models = ["deepseek-*"]
input = 100
output = 100

[[prices]]
models = ["deepseek-*"]
channel = "remote"
input = 0.27
output = 1.10
cached_input = 0.07

[[prices]]
models = ["llama3.2:*"]
input = 0.5
output = 1.5
"""


def channels(local: str, remote: str) -> str:
    return f"""
[[channels]]
name = "local"
kind = "ollama"
base_url = "{local}"
models = ["llama3.2:*", "qwen2.5:*"]

[[channels]]
name = "remote"
kind = "openai"
base_url = "{remote}/compat/v1"
models = ["deepseek-*"]
"""


@pytest.fixture(scope="module")
def upstreams():
    local = FakeOllama(name="local").start()
    remote = FakeOllama(name="remote", kind="openai", prefix="/compat",
                        models=("deepseek-chat",)).start()
    remote.cached_tokens = CACHED
    try:
        yield local, remote
    finally:
        local.stop()
        remote.stop()


@pytest.fixture(scope="module")
def gw(upstreams, tmp_path_factory):
    local, remote = upstreams
    g = Gateway(tmp_path_factory.mktemp("prices"), "http://127.0.0.1:9",
                gateway_toml=channels(local.url, remote.url) + PRICES).start()
    try:
        yield g
    finally:
        g.stop()


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def call(gw: Gateway, path: str, body: dict, key: str = "alice") -> httpx.Response:
    """One request, its whole answer read (streamed or not)."""
    with httpx.stream("POST", gw.url + path, json=body, headers=gw.key(key).auth,
                      timeout=15) as r:
        r.read()
    return r


def line_of(gw: Gateway, r: httpx.Response) -> tuple[bytes, dict]:
    """The raw usage line of a response, and the record it holds (costs as Decimals)."""
    rid = r.headers["x-keygate-request-id"]
    gw.usage_for(rid)
    for raw in gw.usage_log.read_bytes().split(b"\n"):
        if rid.encode() in raw:
            return raw, json.loads(raw, parse_float=Decimal)
    raise AssertionError(rid)


# (path, body, channel, prompt tokens, cached of them, expected cost; None: no price)
CASES = {
    "native generate": ("/api/generate", {"model": "llama3.2", "prompt": words(3),
                                          "stream": False}, "local", 3, 0, "0.000009"),
    "native chat streamed": ("/api/chat", {"model": "llama3.2", "messages": [
        {"role": "user", "content": words(2)}]}, "local", 2, 0, "0.0000085"),
    "openai on ollama": ("/v1/chat/completions", {"model": "llama3.2", "messages": [
        {"role": "user", "content": words(4)}]}, "local", 4, 0, "0.0000095"),
    "openai on ollama streamed": ("/v1/chat/completions", {"model": "llama3.2", "stream": True,
                                                           "messages": [{"role": "user",
                                                                         "content": words(4)}]},
                                  "local", 4, 0, "0.0000095"),
    # 6 x 0.27 + 4 x 0.07 (cached) + 5 x 1.10, per million
    "openai cached": ("/v1/chat/completions", {"model": "deepseek-chat", "messages": [
        {"role": "user", "content": words(10)}]}, "remote", 10, 4, "0.0000074"),
    "openai cached streamed": ("/v1/chat/completions", {
        "model": "deepseek-chat", "stream": True,
        "messages": [{"role": "user", "content": words(10)}]}, "remote", 10, 4, "0.0000074"),
    # 3 prompt tokens, all cached: 3 x 0.07 + 5 x 1.10
    "completions streamed": ("/v1/completions", {"model": "deepseek-chat", "prompt": words(3),
                                                 "stream": True}, "remote", 3, 3, "0.00000571"),
    "responses": ("/v1/responses", {"model": "llama3.2", "input": words(2)}, "local", 2, 0,
                  "0.0000085"),
    "responses streamed": ("/v1/responses", {"model": "llama3.2", "input": words(2),
                                             "stream": True}, "local", 2, 0, "0.0000085"),
    "messages": ("/v1/messages", {"model": "llama3.2", "max_tokens": 64, "messages": [
        {"role": "user", "content": words(2)}]}, "local", 2, 0, "0.0000085"),
    "messages streamed": ("/v1/messages", {"model": "llama3.2", "max_tokens": 64,
                                           "stream": True, "messages": [
                                               {"role": "user", "content": words(2)}]},
                          "local", 2, 0, "0.0000085"),
    "native embed": ("/api/embed", {"model": "llama3.2", "input": words(3)}, "local", 3, 0,
                     "0.0000015"),
    "no price": ("/api/generate", {"model": "qwen2.5:7b", "prompt": words(3), "stream": False},
                 "local", 3, 0, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_line_carries_its_exact_cost(gw, case):
    path, body, channel, prompt, cached, expected = CASES[case]
    r = call(gw, path, body)
    assert r.status_code == 200, r.text
    raw, rec = line_of(gw, r)
    completion = 0 if "embed" in path else 5
    assert (rec["channel"], rec["prompt_tokens"], rec["completion_tokens"]) == (
        channel, prompt, completion)
    if expected is None:
        assert rec["cost"] is None and raw.endswith(b'"cost":null}')
    else:
        assert rec["cost"] == Decimal(expected)
        assert raw.endswith(f'"cost":{expected}}}'.encode())  # its digits, no float repr
    if case.endswith("streamed") and path in ("/v1/chat/completions", "/v1/completions"):
        assert b'"usage"' not in r.content  # the usage keygate asked for is taken out


def usage_cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "addons"))
    return subprocess.run([sys.executable, "-m", "keygate.cli.main", "usage", "--config",
                           str(gw.config), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_keygate_usage_totals_are_the_sum_of_the_lines(gw):
    for case in CASES.values():
        assert call(gw, case[0], case[1]).status_code == 200
    gw.settled_count()
    records = [json.loads(x, parse_float=Decimal) for x in gw.usage_log.read_bytes().split(b"\n")
               if x.strip()]
    expected = sum((r["cost"] for r in records if r["cost"] is not None), Decimal(0))
    done = usage_cli(gw, "--by", "model,month", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout, parse_float=Decimal)
    assert sum((r["cost"] for r in rows if r["cost"] is not None), Decimal(0)) == expected
    by_model = {r["model"]: r for r in rows}
    assert by_model["qwen2.5:7b"]["cost"] is None
    assert all(len(r["month"]) == 7 for r in rows)
    table = usage_cli(gw).stdout.splitlines()
    assert table[0].split()[-1] == "cost"
    assert Decimal(table[-1].split()[-1].replace(",", "")) == expected


def test_a_price_change_affects_later_lines_only_and_a_bad_one_changes_nothing(gw, upstreams):
    body = {"model": "llama3.2", "prompt": words(3), "stream": False}
    first = line_of(gw, call(gw, "/api/generate", body))[1]["cost"]
    assert first == Decimal("0.000009")
    local, remote = upstreams
    after = len(gw.lines)
    toml = gw.config.read_text()
    gw.config.write_text(toml.replace("input = 0.5\noutput = 1.5", "input = 1\noutput = 3"))
    gw.wait_for(r"reloaded configuration", after=after)
    second = line_of(gw, call(gw, "/api/generate", body))[1]["cost"]
    assert second == Decimal("0.000018")
    after = len(gw.lines)
    gw.config.write_text(toml.replace("input = 0.5\noutput = 1.5", "input = -1\noutput = 3"))
    line = gw.wait_for(r"keeping the last good configuration", after=after)
    assert "input must be a number >= 0" in line and "gateway.toml:" in line
    third = line_of(gw, call(gw, "/api/generate", body))[1]["cost"]
    assert third == Decimal("0.000018")  # the last good prices
    # costs are read from the lines, never computed again
    costs = [json.loads(x, parse_float=Decimal)["cost"] for x in
             gw.usage_log.read_bytes().split(b"\n") if b'"model":"llama3.2"' in x
             and b"/api/generate" in x]
    assert costs[-3:] == [first, second, third]
    gw.config.write_text(toml)
    gw.wait_for(r"reloaded configuration", after=after)


# --------------------------------------------------------------------------- budgets


GEN = {"model": "llama3.2", "prompt": "a b c", "stream": False}  # 3 + 5 tokens: 0.000009
SIMPLE_PRICES = """
[[prices]]
models = ["llama3.2:*"]
input = 0.5
output = 1.5
"""


def budget_keys() -> dict[str, KeySpec]:
    keys = default_keys()
    keys["day"] = KeySpec("day", settings={"limits": {"budget_per_day": "0.00002"}})
    keys["month"] = KeySpec("month", settings={"limits": {"budget_per_month": 0.00001}})
    keys["total"] = KeySpec("total", settings={"limits": {"budget_total": "0.000018"}})
    return keys


def restart(gw: Gateway, how: str) -> Gateway:
    gw.settled_count()
    if how == "sigkill":
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
    else:
        assert gw.stop() == 0
    return Gateway(gw.dir, gw.upstream, keys=gw.keys, gateway_toml=SIMPLE_PRICES).start()


def away_from_midnight() -> None:
    """A day budget resets at 00:00 UTC: a run within seconds of it waits it out."""
    left = 86400 - time.time() % 86400
    if left < 30:
        time.sleep(left + 1)


def test_budgets_cross_then_refuse_and_restarts_carry_the_spend(fake, tmp_path):
    away_from_midnight()
    gw = Gateway(tmp_path, fake.url, keys=budget_keys(), gateway_toml=SIMPLE_PRICES).start()
    try:
        def post(name):
            return httpx.post(gw.url + "/api/generate", json=GEN, headers=gw.key(name).auth,
                              timeout=10)

        # 0, 0.000009 and 0.000018 spent: something remains each time; the third crosses
        assert [post("day").status_code for _ in range(3)] == [200, 200, 200]
        r = post("day")
        assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
        assert "Daily budget used up (0.00002 USD per UTC day)" in r.text
        until_midnight = 86400 - time.time() % 86400
        assert abs(int(r.headers["retry-after"]) - until_midnight) <= 2
        before = len(fake.requests)
        assert post("day").status_code == 429 and len(fake.requests) == before

        assert [post("month").status_code for _ in range(3)] == [200, 200, 429]
        r = post("month")
        assert "Monthly budget used up" in r.text and int(r.headers["retry-after"]) >= 1
        assert [post("total").status_code for _ in range(3)] == [200, 200, 429]
        r = post("total")
        assert "retry-after" not in r.headers and "in total" in r.text
        assert post("alice").status_code == 200  # other keys are not affected

        refused = [x for x in gw.usage() if x["status"] == 429]
        assert refused and all(x["cost"] is None for x in refused)

        for how in ("sigkill", "sigterm"):
            gw = restart(gw, how)
            for name in ("day", "month", "total"):
                r = post(name)
                assert r.status_code == 429, (how, name, r.text)
                assert r.headers["x-keygate-error"] == "insufficient_quota"

        listing = subprocess.run(
            [str(ROOT / "scripts" / "keys"), "--config", str(gw.config), "list",
             "--format", "json"], capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        rows = {r["name"]: r for r in json.loads(listing.stdout, parse_float=Decimal)}
        assert rows["day"]["spent_today"] == rows["day"]["spent_total"] == Decimal("0.000027")
        assert rows["month"]["spent_month"] == Decimal("0.000018")
        assert rows["alice"]["spent_total"] == Decimal("0.000009")
    finally:
        gw.stop()
