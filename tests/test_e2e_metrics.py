"""End to end: GET /metrics of a real keygate, parsed with prometheus-client's own parser,
after known traffic (sequential and concurrent, several keys, models, channels, errors,
refusals by a limit, streams): every counter equals what the usage log says. Also the
scope (401, 403), the gauges (in flight, channel health, reloads, the log's backlog),
`[gateway] metrics = false`, and several processes summed through
PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import collections
import concurrent.futures
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import KeySpec, default_keys, eventually

P = "one two three four"
MAX_MODELS = 100  # keygate.stages.metrics.MAX_MODELS


def keys() -> dict[str, KeySpec]:
    k = default_keys()
    k["prom"] = KeySpec("prom", settings={"scopes": ["metrics"]})
    k["limited"] = KeySpec("limited", settings={"limits": {"rpm": 2}})
    return k


def channels(fake_url: str) -> str:
    return (f'\n[[channels]]\nname = "local"\nkind = "ollama"\nbase_url = "{fake_url}"\n'
            'models = ["llama3.2*", "nomic-embed-text*"]\n'
            f'\n[[channels]]\nname = "compat"\nkind = "openai"\nbase_url = "{fake_url}/v1"\n'
            'models = ["qwen*"]\n')


def scrape(gw, key: str = "prom") -> tuple[dict, str]:
    r = httpx.get(gw.url + "/metrics", headers=gw.key(key).auth, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, r.headers["x-keygate-request-id"]


def family(samples: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def expected(lines: list[dict], keys_known: set[str]) -> dict[str, collections.Counter]:
    """What the metrics must say, computed from the usage log alone, in its order."""
    served: set[str] = set()
    out = {n: collections.Counter() for n in ("requests", "tokens", "duration", "first")}
    for r in lines:
        key = "" if r["key"] is None else (r["key"] if r["key"] in keys_known else "other")
        m = r["model"]
        if m is None:
            model = ""
        elif m in served:
            model = m
        elif len(served) < MAX_MODELS and r["status"] < 400 and r["error"] is None:
            served.add(m)
            model = m
        else:
            model = "other"
        ch = r["channel"] or ""
        out["requests"][(("channel", ch), ("code", r["error"] or ""), ("key", key),
                         ("model", model), ("status", str(r["status"])))] += 1
        if r["prompt_tokens"]:
            out["tokens"][(("key", key), ("kind", "prompt"), ("model", model))] += \
                r["prompt_tokens"]
        if r["completion_tokens"]:
            out["tokens"][(("key", key), ("kind", "completion"), ("model", model))] += \
                r["completion_tokens"]
        out["duration"][(("channel", ch),)] += 1
        if r["stream"]:
            out["first"][(("channel", ch),)] += 1
    return out


def traffic(gw, n_concurrent: int = 0) -> None:
    """Requests of several keys, models, channels, endpoints and outcomes."""
    alice, admin = gw.key("alice").auth, gw.key("admin").auth
    chat = {"messages": [{"role": "user", "content": P}]}
    calls = [
        (alice, "/api/chat", {"model": "llama3.2", **chat, "stream": False}),
        (alice, "/api/chat", {"model": "llama3.2", **chat}),  # streamed
        (admin, "/v1/chat/completions", {"model": "qwen2.5:7b", **chat}),
        (admin, "/v1/chat/completions", {"model": "qwen2.5:7b", **chat, "stream": True}),
        (alice, "/api/embed", {"model": "nomic-embed-text", "input": P}),
        (gw.key("llama-only").auth, "/api/chat", {"model": "qwen2.5:7b", **chat}),  # 403
        (alice, "/api/chat", {"model": "no-such-model", **chat}),  # 404 model_not_found
        ({}, "/api/chat", {"model": "llama3.2", **chat}),  # 401
        (alice, "/api/nope", {}),  # 404 unknown_endpoint
    ]
    for auth, path, body in calls:
        httpx.post(gw.url + path, headers=auth, json=body, timeout=10)
    for _ in range(4):  # rpm 2: two pass, two refused
        httpx.post(gw.url + "/api/chat", headers=gw.key("limited").auth, timeout=10,
                   json={"model": "llama3.2", **chat, "stream": False})
    httpx.get(gw.url + "/api/tags", headers=alice, timeout=10)
    if n_concurrent:
        def one(i: int) -> int:
            model = ("llama3.2", "qwen2.5:7b")[i % 2]
            path = ("/api/chat", "/v1/chat/completions")[i % 2]
            body = {"model": model, **chat, "stream": i % 3 == 0}
            who = (alice, admin)[i % 2]
            return httpx.post(gw.url + path, headers=who, json=body, timeout=20).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(one, range(n_concurrent)))
        assert all(c == 200 for c in codes), collections.Counter(codes)


def check_against_log(gw, samples: dict, scrape_id: str) -> None:
    lines = [r for r in gw.usage() if r["id"] != scrape_id]
    want = expected(lines, set(gw.keys))
    got = family(samples, "keygate_requests_total")
    assert got == dict(want["requests"])
    tokens = {k: v for k, v in family(samples, "keygate_tokens_total").items() if v}
    assert tokens == dict(want["tokens"])
    assert family(samples, "keygate_request_duration_seconds_count") == dict(want["duration"])
    first = family(samples, "keygate_stream_first_byte_seconds_count")
    assert first == dict(want["first"])
    refusals = collections.Counter()
    for r in lines:
        if r["error"] in ("rate_limit_exceeded", "insufficient_quota"):
            refusals[(("key", r["key"]), ("limit", "rpm"))] += 1
    assert family(samples, "keygate_limit_refusals_total") == dict(refusals)


@pytest.fixture(scope="module")
def gw(fake, tmp_path_factory):
    from conftest import Gateway

    g = Gateway(tmp_path_factory.mktemp("metrics"), fake.url, keys=keys(),
                gateway_toml=channels(fake.url)).start()
    try:
        yield g
    finally:
        g.stop()


def test_scope(gw):
    assert httpx.get(gw.url + "/metrics", timeout=10).status_code == 401
    r = httpx.get(gw.url + "/metrics", headers=gw.key("alice").auth, timeout=10)
    assert r.status_code == 403 and "'metrics' scope" in r.text
    assert r.headers["x-keygate-error"] == "permission_denied"
    # Admin opens model management and the usage pages, not /metrics.
    assert httpx.get(gw.url + "/metrics", headers=gw.key("admin").auth,
                     timeout=10).status_code == 403


def test_counters_equal_the_usage_log(gw):
    traffic(gw)
    gw.settled_count()
    samples, rid = scrape(gw)
    check_against_log(gw, samples, rid)
    lines = gw.usage()
    assert any(r["error"] == "rate_limit_exceeded" for r in lines)
    assert any(r["channel"] == "compat" for r in lines)
    # Nothing in flight (the scrape is answered before the Recorder counts it in).
    assert family(samples, "keygate_requests_in_flight") == {(): 0.0}
    assert family(samples, "keygate_channel_up") == {(("channel", "compat"),): 1.0,
                                                       (("channel", "local"),): 1.0}
    assert family(samples, "keygate_usage_log_backlog") == {(): 0.0}
    assert family(samples, "keygate_usage_log_write_errors_total") == {(): 0.0}
    assert family(samples, "keygate_config_last_reload_success_timestamp_seconds")[()] > \
        time.time() - 3600


def test_counters_under_concurrent_load(gw):
    traffic(gw, n_concurrent=120)
    gw.settled_count()
    samples, rid = scrape(gw)
    check_against_log(gw, samples, rid)


def test_model_labels_are_bounded(gw):
    """Made-up model names a client sends are not labels: refused or failed ones count
    as "other"."""
    for i in range(30):
        httpx.post(gw.url + "/api/chat", headers=gw.key("alice").auth, timeout=10,
                   json={"model": f"made-up-{i}", "messages": []})
    gw.settled_count()
    samples, rid = scrape(gw)
    models = {dict(labels)["model"] for labels in family(samples, "keygate_requests_total")}
    assert not any(m.startswith("made-up") for m in models)
    assert "other" in models
    check_against_log(gw, samples, rid)


def test_reloads_are_counted(gw):
    before, _ = scrape(gw)
    ok0 = family(before, "keygate_config_reloads_total").get((("result", "success"),), 0)
    fail0 = family(before, "keygate_config_reloads_total").get((("result", "failure"),), 0)
    text = gw.keys_file.read_text()
    n = len(gw.lines)
    gw.keys_file.write_text(text + "  broken: [\n")
    gw.wait_for(r"keeping the last good configuration", after=n)
    n = len(gw.lines)
    gw.keys_file.write_text(text)
    gw.wait_for(r"reloaded configuration", after=n)

    def counted():
        s, _ = scrape(gw)
        r = family(s, "keygate_config_reloads_total")
        return r if r.get((("result", "success"),), 0) >= ok0 + 1 else None

    reloads = eventually(counted, timeout=5)
    assert reloads and reloads[(("result", "failure"),)] >= fail0 + 1


def test_metrics_off(make_gateway, fake):
    gw = make_gateway(fake.url, keys=keys(), gateway_toml="metrics = false\n").start()
    r = httpx.get(gw.url + "/metrics", headers=gw.key("prom").auth, timeout=10)
    assert r.status_code == 404 and r.headers["x-keygate-error"] == "unknown_endpoint"


def test_several_processes_are_summed(make_gateway, fake, tmp_path):
    """Two keygate processes sharing PROMETHEUS_MULTIPROC_DIR (as `keygate serve
    --workers 2` runs them): a scrape of either returns the sum over both."""
    shared = tmp_path / "prom"
    shared.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared)}
    a = make_gateway(fake.url, keys=keys(), env=env).start()
    b = make_gateway(fake.url, keys=keys(), env=env)
    b.keys = a.keys
    b.keys_file.write_text(a.keys_file.read_text())
    b.start()
    for gw, n in ((a, 3), (b, 5)):
        for _ in range(n):
            r = httpx.post(gw.url + "/api/chat", headers=gw.key("alice").auth, timeout=10,
                           json={"model": "llama3.2", "messages": [], "stream": False})
            assert r.status_code == 200
    a.settled_count()
    b.settled_count()
    samples, rid = scrape(a)
    lines = [r for r in a.usage() + b.usage() if r["id"] != rid]
    got = family(samples, "keygate_requests_total")
    want = collections.Counter()
    for r in lines:
        want[(r["key"] or "", r["status"])] += 1
    summed = collections.Counter()
    for labels, v in got.items():
        d = dict(labels)
        summed[(d["key"], int(d["status"]))] += v
    assert summed == want
    tokens = sum(family(samples, "keygate_tokens_total").values())
    assert tokens == sum(r["prompt_tokens"] + r["completion_tokens"] for r in lines)
    # Both live processes' gauges are there, summed.
    assert family(samples, "keygate_requests_in_flight") == {(): 0.0}
