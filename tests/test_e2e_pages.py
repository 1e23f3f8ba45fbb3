"""End to end: keygate's own endpoints on a real keygate (docs/endpoints.md#keygates-own-endpoints):
health, /keygate/me and the legacy billing endpoints (through the openai client, with a
key for each kind of quota), /keygate/usage (the same totals as `keygate usage`, and
clear 400s for bad input), and the usage page itself in a real headless Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from conftest import Gateway, KeySpec, default_keys

P = "one two three four"  # 4 prompt tokens; the fake answers 5
PRICES = '\n[[prices]]\nmodels = ["llama3.2*"]\ninput = 1.5\noutput = 2\n'
QUOTAS = {
    "tpd": {"tokens_per_day": 1000},
    "rpd": {"requests_per_day": 100},
    "ttot": {"tokens_total": 5000},
    "tpm": {"tokens_per_month": 3000},
    "rpm": {"requests_per_month": 300},
    "bday": {"budget_per_day": 1},
    "bmonth": {"budget_per_month": 20},
    "btot": {"budget_total": 50},
}
KEYGATE = str(Path(sys.executable).with_name("keygate"))


def keys() -> dict[str, KeySpec]:
    k = default_keys()
    for name, limits in QUOTAS.items():
        k[name] = KeySpec(name, settings={"limits": limits})
    k["bob"] = KeySpec("bob", settings={"models": ["qwen*"]})
    return k


@pytest.fixture(scope="module")
def gw(fake, tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("pages"), fake.url, keys=keys(),
                gateway_toml=PRICES).start()
    try:
        yield g
    finally:
        g.stop()


def chat(gw, key: str, model: str = "llama3.2", n: int = 1) -> None:
    for _ in range(n):
        r = httpx.post(gw.url + "/api/chat", headers=gw.key(key).auth, timeout=10,
                       json={"model": model, "stream": False,
                             "messages": [{"role": "user", "content": P}]})
        assert r.status_code == 200, r.text


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key(key).secret, max_retries=0)


def counted(gw, key: str) -> list[dict]:
    """The key's lines that count for quotas (docs/limits.md#what-counts)."""
    from keygate.accounting.ledger import counts

    gw.settled_count()
    return [r for r in gw.usage() if r["key"] == key and counts(r)]


# --------------------------------------------------------------------------- health


def test_health(gw):
    r = httpx.get(gw.url + "/keygate/health/live", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "live"}
    r = httpx.get(gw.url + "/keygate/health/ready", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    # No key needed, and a key changes nothing.
    r = httpx.get(gw.url + "/keygate/health/ready", headers=gw.key("alice").auth, timeout=10)
    assert r.status_code == 200
    r = httpx.get(gw.url + "/keygate/health/other", timeout=10)
    assert r.status_code == 401  # not in the table: no key, 401


def test_not_ready_when_the_log_cannot_be_written(make_gateway, fake):
    g = make_gateway(fake.url).start()
    assert httpx.get(g.url + "/keygate/health/ready", timeout=10).status_code == 200
    g.settled_count()
    logs = g.usage_log.parent
    if os.geteuid() == 0:
        # root writes anywhere: make the folder a file's place instead.
        moved = logs.with_name("logs.moved")
        logs.rename(moved)
        logs.write_text("not a folder")
    else:
        os.chmod(logs, 0o500)
    try:
        httpx.get(g.url + "/", timeout=10)  # a line to write, which fails
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = httpx.get(g.url + "/keygate/health/ready", timeout=10)
            if r.status_code == 503:
                break
            time.sleep(0.2)
        assert r.status_code == 503
        assert r.json() == {"status": "unavailable", "failed": ["usage_log"]}
        assert httpx.get(g.url + "/keygate/health/live", timeout=10).status_code == 200
    finally:
        if os.geteuid() == 0:
            logs.unlink()
            moved.rename(logs)
        else:
            os.chmod(logs, 0o700)


# --------------------------------------------------------------------------- /keygate/me


@pytest.mark.parametrize("name", sorted(QUOTAS))
def test_me_for_each_kind_of_quota(gw, name):
    chat(gw, name, n=2)
    r = client(gw, name).with_options(base_url=gw.url).get("/keygate/me", cast_to=httpx.Response)
    assert r.status_code == 200
    me = r.json()
    lines = counted(gw, name)
    tokens = sum(x["total_tokens"] for x in lines)
    cost = sum(Decimal(str(x["cost"])) for x in lines if x["cost"] is not None)
    assert me["key"] == name and me["scopes"] == ["inference", "models"]
    assert me["models"] is None
    assert me["limits"] == QUOTAS[name]
    today = me["usage"]["today"]
    assert today["requests"] == len(lines) and today["tokens"] == tokens
    assert me["usage"]["month"]["tokens"] == tokens
    assert me["usage"]["total"]["tokens"] == tokens
    assert me["currency"] == "USD"  # prices are set: money is shown
    assert Decimal(str(today["cost"])) == cost > 0
    (limit_name, limit), = QUOTAS[name].items()
    used = {"tokens_per_day": tokens, "requests_per_day": len(lines), "tokens_total": tokens,
            "tokens_per_month": tokens, "requests_per_month": len(lines),
            "budget_per_day": cost, "budget_per_month": cost, "budget_total": cost}[limit_name]
    assert me["remaining"] == {limit_name: pytest.approx(float(limit - used))}
    # Asking about oneself costs nothing.
    assert len(counted(gw, name)) == len(lines)


def test_me_never_shows_another_key(gw):
    chat(gw, "alice")
    me = httpx.get(gw.url + "/keygate/me", headers=gw.key("bob").auth, timeout=10).json()
    assert me["key"] == "bob" and me["models"] == ["qwen*"]
    assert me["usage"]["total"]["tokens"] == 0
    assert "alice" not in json.dumps(me)
    assert httpx.get(gw.url + "/keygate/me", timeout=10).status_code == 401
    r = httpx.get(gw.url + "/keygate/me", headers={"Authorization": "Bearer sk-nope-123456"},
                  timeout=10)
    assert r.status_code == 401 and r.headers["x-keygate-error"] == "invalid_api_key"


# --------------------------------------------------------------------------- billing


@pytest.mark.parametrize("name,limit", [("btot", 50.0), ("bmonth", 20.0), ("bday", 1.0),
                                        ("ttot", 100_000_000.0), ("rpd", 100_000_000.0),
                                        ("alice", 100_000_000.0)])
def test_billing_subscription(gw, name, limit):
    """Prices are set, so amounts are money: a budget is the limit; a key without one
    has none (the legacy shape's 100,000,000)."""
    r = client(gw, name).get("/dashboard/billing/subscription", cast_to=httpx.Response)
    assert r.status_code == 200 and r.request.url.path == "/v1/dashboard/billing/subscription"
    sub = r.json()
    assert sub["object"] == "billing_subscription"
    assert sub["hard_limit_usd"] == sub["soft_limit_usd"] == sub["system_hard_limit_usd"]
    assert sub["hard_limit_usd"] == limit
    assert sub["has_payment_method"] is True and sub["access_until"] == 0
    assert sub["account_name"] == name
    assert sub["keygate_unit"] == "USD"


def test_billing_usage_in_money(gw):
    chat(gw, "bmonth", n=3)
    c = client(gw, "bmonth")
    doc = c.get("/dashboard/billing/usage", cast_to=httpx.Response).json()
    lines = counted(gw, "bmonth")
    cost = sum(Decimal(str(x["cost"])) for x in lines if x["cost"] is not None)
    assert doc["object"] == "list"
    assert doc["total_usage"] == pytest.approx(float(cost * 100))  # cents
    assert sum(i["cost"] for d in doc["daily_costs"] for i in d["line_items"]) == \
        pytest.approx(doc["total_usage"])
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert [d["line_items"][0]["name"] for d in doc["daily_costs"]] == ["llama3.2"]
    assert doc["daily_costs"][0]["timestamp"] == dt.datetime.fromisoformat(
        today).replace(tzinfo=dt.timezone.utc).timestamp()


def test_billing_in_tokens_without_prices(make_gateway, fake):
    g = make_gateway(fake.url, keys=keys()).start()
    chat(g, "ttot", n=2)
    c = client(g, "ttot")
    sub = c.get("/dashboard/billing/subscription", cast_to=httpx.Response).json()
    assert sub["hard_limit_usd"] == 5000 and sub["keygate_unit"] == "tokens"
    usage = c.get("/dashboard/billing/usage", cast_to=httpx.Response).json()
    tokens = sum(x["total_tokens"] for x in counted(g, "ttot"))
    assert usage["total_usage"] == tokens * 100 and usage["keygate_unit"] == "tokens"
    me = httpx.get(g.url + "/keygate/me", headers=g.key("ttot").auth, timeout=10).json()
    assert me["currency"] is None and me["usage"]["today"]["cost"] is None
    assert me["remaining"] == {"tokens_total": 5000 - tokens}


@pytest.mark.parametrize("query,message", [
    ("?start_date=2026-12-05&end_date=2026-12-01", "end_date must be after start_date"),
    ("?start_date=2020-01-01&end_date=2026-01-01", "at most 100 days"),
    ("?start_date=yesterday", "must be dates"),
])
def test_billing_usage_bad_input(gw, query, message):
    r = httpx.get(gw.url + "/v1/dashboard/billing/usage" + query, headers=gw.key("alice").auth,
                  timeout=10)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_request"


# --------------------------------------------------------------------------- /keygate/usage


def usage_cli(log: Path, since: str, until: str, by: str) -> list[dict]:
    out = subprocess.run([KEYGATE, "usage", "--log", str(log), "--since", since, "--until",
                          until, "--by", by, "--format", "json"], capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def without(log: Path, dest: Path, rid: str) -> Path:
    """The log less the line `rid`: a query's own line lands after its answer."""
    lines = [x for x in log.read_text().split("\n") if x and json.loads(x)["id"] != rid]
    dest.write_text("".join(x + "\n" for x in lines))
    return dest


@pytest.mark.parametrize("by", ["key", "key,model", "model,channel,day", "day", "month", ""])
def test_usage_equals_keygate_usage(gw, tmp_path, by):
    chat(gw, "alice", n=2)
    chat(gw, "bob", "qwen2.5:7b")
    gw.settled_count()
    r = httpx.get(gw.url + "/keygate/usage", params={"since": "2d", "by": by},
                  headers=gw.key("admin").auth, timeout=10)
    assert r.status_code == 200, r.text
    doc = r.json()
    rid = r.headers["x-keygate-request-id"]
    gw.usage_for(rid)
    log = without(gw.usage_log, tmp_path / "usage.jsonl", rid)
    want = usage_cli(log, doc["since"], doc["until"], by)
    for row in want + doc["rows"]:
        if row["cost"] is not None:
            row["cost"] = round(float(row["cost"]), 9)
    assert doc["rows"] == want
    assert doc["total"]["requests"] == sum(x["requests"] for x in want)


@pytest.mark.parametrize("params,message", [
    ({"since": "2026-12-04", "until": "2026-12-01"}, "since is after until"),
    ({"by": "key,colour"}, "cannot group by 'colour'"),
    ({"since": "3650d"}, "longer than 366 days"),
    ({"since": "2016-01-01", "until": "2026-01-01"}, "longer than 366 days"),
    ({"since": "last tuesday"}, "since/until"),
    ({"format": "csv"}, "unknown parameter 'format'"),
])
def test_usage_bad_input(gw, params, message):
    r = httpx.get(gw.url + "/keygate/usage", params=params, headers=gw.key("admin").auth,
                  timeout=10)
    assert r.status_code == 400
    assert r.headers["x-keygate-error"] == "invalid_request"
    assert message in r.json()["error"]


def test_usage_needs_admin(gw):
    assert httpx.get(gw.url + "/keygate/usage", timeout=10).status_code == 401
    r = httpx.get(gw.url + "/keygate/usage", headers=gw.key("alice").auth, timeout=10)
    assert r.status_code == 403 and "'admin' scope" in r.json()["error"]


# --------------------------------------------------------------------------- the page


def test_page_needs_no_key_and_holds_no_data(gw):
    r = httpx.get(gw.url + "/keygate/dashboard", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy and "http" not in policy
    assert "alice" not in r.text and "keygate-data" not in r.text.split("<script>")[0]
    assert r.headers["x-frame-options"] == "DENY"
