"""End to end: with redis_url, /keygate/usage on any instance shows every instance
(docs/shared-state.md#usage-totals-of-every-instance): a real redis-server, two keygate
mitmdump instances writing their own usage logs, traffic of several keys and models to
both; each answers what `keygate usage --format json` prints over both logs together,
and the keys' quota use is the shared counters'. Redis flushed: the hours are rebuilt from
the logs. Redis stopped: still 200, from the instance's own totals, marked partial. A
hostile model name stays bounded in Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import Gateway, KeySpec, default_keys
from helpers.redisserver import RedisServer, needs_redis

pytestmark = needs_redis

KEYGATE = str(Path(sys.executable).with_name("keygate"))
PRICES = '\n[[prices]]\nmodels = ["llama3.2*"]\ninput = 1.5\noutput = 2.1\n'
MODELS = ("llama3.2", "qwen2.5:7b", "mistral")


@pytest.fixture(scope="module")
def setup(fake, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared-usage")
    redis = RedisServer(tmp / "redis").start()
    keys = default_keys()
    keys["carol"] = KeySpec("carol", settings={"limits": {"tokens_per_day": 100000}})
    logs = tmp / "logs"
    gws = []
    try:
        for i in (1, 2):
            gw = Gateway(tmp / f"gw{i}", fake.url, keys=keys, env={"KEYGATE_WORKER": str(i)})
            gw.config.write_text(f'[gateway]\nusage_log = "{logs}/usage.jsonl"\n'
                                 f'redis_url = "{redis.url}"\n{PRICES}')
            gws.append(gw.start())
        yield gws, redis, logs, tmp
    finally:
        for gw in gws:
            gw.stop()
        redis.stop()


def chat(gw: Gateway, key: str, model: str, n: int = 1) -> None:
    for _ in range(n):
        r = httpx.post(gw.url + "/api/chat", headers=gw.key(key).auth, timeout=10,
                       json={"model": model, "stream": False,
                             "messages": [{"role": "user", "content": "one two three"}]})
        assert r.status_code in (200, 400, 403, 404), r.text


def records(logs: Path) -> list[dict]:
    out = []
    for p in sorted(logs.glob("usage*.jsonl")):
        out += [json.loads(x) for x in p.read_text().split("\n") if x.strip()]
    return out


def wait_for_line(logs: Path, rid: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(r["id"] == rid for r in records(logs)):
            time.sleep(0.3)  # (its increments reach Redis as its line is written)
            return
        time.sleep(0.05)
    raise AssertionError(f"no line for {rid}")


def usage_cli(logs: Path, dest: Path, rid: str, since: str, until: str, by: str):
    """`keygate usage --format json` over both logs, less the query's own line (it lands
    after its answer)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    (dest / "usage.jsonl").write_text("")
    for p in logs.glob("usage*.jsonl"):
        kept = [x for x in p.read_text().split("\n") if x and json.loads(x)["id"] != rid]
        (dest / p.name).write_text("".join(x + "\n" for x in kept))
    out = subprocess.run([KEYGATE, "usage", "--log", str(dest / "usage.jsonl"), "--since",
                          since, "--until", until, "--by", by, "--format", "json"],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def plain(rows: list[dict]) -> list[dict]:
    for row in rows:
        if row["cost"] is not None:
            row["cost"] = round(float(row["cost"]), 9)
    return rows


def ask(gw: Gateway, by: str) -> httpx.Response:
    return httpx.get(gw.url + "/keygate/usage", params={"since": "2d", "by": by},
                     headers=gw.key("admin").auth, timeout=20)


def test_every_instance_shows_both_and_falls_back_to_its_own(setup):
    gws, redis, logs, tmp = setup
    a, b = gws
    for i, model in enumerate(MODELS):
        chat(a, "alice", model, n=2 + i)
        chat(b, "alice", model, n=1)
        chat(b, "carol", model, n=i + 1)
        chat(a, "llama-only", model)  # a refusal for two of them
    httpx.get(a.url + "/v1/models", timeout=10)  # no key: 401
    # A hostile model name: bounded in its line, and so in Redis.
    chat(b, "alice", 'x","y",1,null]' + "\u2028" * 3 + "z" * 20_000)  # 400: too long
    chat(b, "alice", 'x","y",1,null]' + "\u2028" * 3 + "z" * 1000)  # kept, bounded
    time.sleep(0.5)
    for by in ("key,model", "key,model,channel,day", ""):
        for gw in (a, b):
            r = ask(gw, by)
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc.get("shared") is True and "partial" not in doc
            rid = r.headers["x-keygate-request-id"]
            wait_for_line(logs, rid)
            want = usage_cli(logs, tmp / "cli", rid, doc["since"], doc["until"], by)
            assert plain(doc["rows"]) == plain(want), (by, gw.url)
            assert doc["total"]["requests"] == sum(x["requests"] for x in want)
    # Both instances' traffic is in either answer.
    doc = ask(a, "key").json()
    alice = next(row for row in doc["rows"] if row["key"] == "alice")
    assert alice["requests"] == (2 + 3 + 4) + 3 + 2
    carol = next(k for k in doc["keys"] if k["key"] == "carol")
    assert carol["requests"] == 6
    # Quota use: the shared counters', both instances' requests.
    from keygate.accounting.ledger import counts

    used = sum(r["total_tokens"] for r in records(logs) if r["key"] == "carol" and counts(r))
    assert used > 0 and carol["quotas"]["tokens_per_day"]["used"] == used
    # Bounded: every field of every hour in Redis is short, whatever the client sent.
    client = redis.client()
    hours = list(client.scan_iter(match="keygate:h:*"))
    assert hours
    fields = [f for h in hours for f in client.hkeys(h)]
    assert all(len(f.encode()) < 2_000 for f in fields)
    assert any("zzz" in f for f in fields)  # (the long name is there, cut)
    # Redis flushed: the hours are rebuilt from the logs with the other counters.
    client.flushall()
    deadline = time.monotonic() + 30
    while not client.exists("keygate:counters") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.exists("keygate:counters")
    time.sleep(4)  # (its second look at the logs, 3 s later)
    for gw in (b, a):
        r = ask(gw, "key,model")
        assert r.status_code == 200 and r.json().get("shared") is True
        rid = r.headers["x-keygate-request-id"]
        wait_for_line(logs, rid)
        want = usage_cli(logs, tmp / "cli", rid, r.json()["since"], r.json()["until"],
                         "key,model")
        assert plain(r.json()["rows"]) == plain(want)
    # Redis gone: still 200, each instance's own totals, marked partial.
    redis.stop()
    for gw in (a, b):
        r = ask(gw, "key")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["partial"] is True and "shared" not in doc
        assert doc["total"]["requests"] >= 1
    assert httpx.get(a.url + "/keygate/dashboard", timeout=10).status_code == 200
