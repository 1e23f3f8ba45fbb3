"""End to end: the usage log under real traffic: every endpoint's token counts, streams cut
short, concurrency, restarts (also after kill -9), and a log that cannot be written."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat

import httpx
import pytest

from conftest import Gateway, eventually

P = "one two three four"

# endpoint, body, expected (prompt, completion) with the fake's 5-piece replies
CASES = [
    ("/api/chat", {"messages": [{"role": "user", "content": P}], "stream": False}, (4, 5)),
    ("/api/chat", {"messages": [{"role": "user", "content": P}]}, (4, 5)),
    ("/api/generate", {"prompt": P, "stream": False}, (4, 5)),
    ("/api/generate", {"prompt": P}, (4, 5)),
    ("/api/embed", {"input": [P, "five"]}, (5, 0)),
    ("/api/embeddings", {"prompt": P}, (0, 0)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": P}]}, (4, 5)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": P}], "stream": True},
     (4, 5)),
    ("/v1/completions", {"prompt": P}, (4, 5)),
    ("/v1/completions", {"prompt": P, "stream": True}, (4, 5)),
    ("/v1/embeddings", {"input": P}, (4, 0)),
    ("/v1/responses", {"input": P}, (4, 5)),
    ("/v1/responses", {"input": P, "stream": True}, (4, 5)),
    ("/v1/messages", {"max_tokens": 100, "messages": [{"role": "user", "content": P}]}, (4, 5)),
    ("/v1/messages", {"max_tokens": 100, "messages": [{"role": "user", "content": P}],
                      "stream": True}, (4, 5)),
]


@pytest.mark.parametrize("path,body,expected", CASES,
                         ids=[f"{c[0]}{' stream' if c[1].get('stream') else ''}" for c in CASES])
def test_exact_token_counts(gateway, fake, path, body, expected):
    model = "nomic-embed-text" if "embed" in path else "llama3.2"
    r = httpx.post(gateway.url + path, headers=gateway.key("alice").auth, timeout=10,
                   json={"model": model, **body})
    assert r.status_code == 200, r.text
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == expected
    assert rec["total_tokens"] == sum(expected)
    streamed = body.get("stream", path in ("/api/chat", "/api/generate"))
    assert rec["stream"] is bool(streamed)
    assert rec["completed"] is True and rec["error"] is None
    assert rec["duration_ms"] > 0
    assert rec["ts"].endswith("Z") and len(rec["ts"]) == 24


def test_stream_byte_identical_without_and_through_keygate(gateway, fake):
    """keygate asks the upstream for usage, then removes it: the client's bytes are what
    the upstream sends a client that did not ask."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": P}], "stream": True}
    direct = httpx.post(fake.url + "/v1/chat/completions", json=body, timeout=10).text
    via = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                     headers=gateway.key("alice").auth).text
    scrub = lambda s: [json.loads(x[6:]) | {"id": 0, "created": 0} if x.startswith("data: {")  # noqa: E731
                       else x for x in s.split("\n\n")]
    assert scrub(via) == scrub(direct)
    assert "usage" not in via


@pytest.mark.parametrize("style", ["new", "legacy"])
def test_usage_on_every_chunk_is_removed(gateway, fake, style):
    fake.usage_every_chunk, fake.openai_style = True, style
    try:
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": P}], "stream": True}
        r = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10,
                       headers=gateway.key("alice").auth)
    finally:
        fake.usage_every_chunk, fake.openai_style = False, "new"
    assert '"usage"' not in r.text and r.text.endswith("data: [DONE]\n\n")
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (4, 5)


def test_byte_at_a_time_upstream(gateway, fake):
    """Frames split across arbitrary chunk boundaries: a stream sent one byte per chunk."""
    fake.byte_at_a_time = True
    try:
        for path, body in [("/api/chat", {"messages": [{"role": "user", "content": P}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": P}],
                                                     "stream": True})]:
            r = httpx.post(gateway.url + path, json={"model": "llama3.2", **body}, timeout=20,
                           headers=gateway.key("alice").auth)
            rec = gateway.usage_for(r.headers["x-keygate-request-id"])
            assert (rec["prompt_tokens"], rec["completion_tokens"]) == (4, 5), path
            assert rec["completed"] is True
    finally:
        fake.byte_at_a_time = False


def test_midstream_error_is_logged(gateway, fake):
    fake.fail = "midstream"
    try:
        r = httpx.post(gateway.url + "/api/chat", headers=gateway.key("alice").auth, timeout=10,
                       json={"model": "llama3.2", "messages": [{"role": "user", "content": P}]})
    finally:
        fake.fail = None
    assert r.status_code == 200 and '"error"' in r.text.splitlines()[-1]
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert rec["error"] == "upstream_error" and rec["completed"] is False


def test_upstream_cut_midstream_is_logged_incomplete(gateway, fake):
    fake.fail = "cut"
    n = gateway.settled_count()
    try:
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("POST", gateway.url + "/api/chat", timeout=10,
                              headers=gateway.key("alice").auth,
                              json={"model": "llama3.2",
                                    "messages": [{"role": "user", "content": P}]}) as r:
                for _ in r.iter_lines():
                    pass
    finally:
        fake.fail = None
    rec = gateway.usage_after(n)
    assert rec["stream"] is True and rec["completed"] is False and rec["status"] == 200


def test_client_disconnect_midstream_still_logs(gateway, fake):
    fake.chunk_delay = 0.3
    n = gateway.settled_count()
    try:
        body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": P}]})
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            s.sendall((f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                       f"Authorization: Bearer {gateway.key('alice').secret}\r\n\r\n{body}")
                      .encode())
            got = b""
            while b'"done":false' not in got:
                got += s.recv(4096)
        # closed after the first chunk, while the upstream still has four to send
        rec = gateway.usage_after(n, timeout=10)
    finally:
        fake.chunk_delay = 0.0
    assert rec["completed"] is False and rec["stream"] is True and rec["key"] == "alice"
    # The counts come only in the final chunk: what went out counts instead (docs/usage-log.md).
    assert rec["completion_tokens"] >= 1 and rec["tokens_estimated"] is True


def test_500_concurrent_requests_500_lines(gateway, fake):
    before = gateway.settled_count()
    auth = gateway.key("alice").auth

    async def run():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=60, limits=limits, headers=auth) as c:
            async def one(i):
                if i % 5 == 0:
                    return await c.post(gateway.url + "/api/chat", json={"model": "llama3.2"})
                return await c.post(gateway.url + "/api/generate", json={
                    "model": "llama3.2", "prompt": f"n {i}", "stream": i % 2 == 0})
            return await asyncio.gather(*(one(i) for i in range(500)))

    responses = asyncio.run(run())
    ids = {r.headers["x-keygate-request-id"] for r in responses}
    assert len(ids) == 500
    eventually(lambda: len(gateway.usage()) >= before + 500, timeout=10, interval=0.1)
    raw = gateway.usage_log.read_bytes().splitlines()[before:]
    records = [json.loads(line) for line in raw]  # every line whole and parseable
    assert len(records) == 500 and {r["id"] for r in records} == ids


def test_refused_requests_are_logged_too(gateway):
    r = httpx.post(gateway.url + "/api/pull", json={"model": "x"}, timeout=5)
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert rec == rec | {"key": None, "status": 401, "error": "invalid_api_key",
                         "method": "POST", "path": "/api/pull", "model": None, "stream": False,
                         "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def recount(lines: list[dict], key: str) -> tuple[int, int]:
    counted = [r for r in lines if r["key"] == key and r["error"] not in (
        "invalid_request", "invalid_api_key", "permission_denied", "unknown_endpoint",
        "model_not_found", "request_too_large", "rate_limit_exceeded", "insufficient_quota",
        "gateway_unavailable")]
    return len(counted), sum(r["total_tokens"] for r in counted)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_counters_survive_restart(fake, tmp_path, how):
    """A quota is the log: after a restart (graceful or kill -9) a key is refused exactly
    when a recount of the log says its quota is used up."""
    from conftest import KeySpec, default_keys
    keys = default_keys()
    budget = KeySpec("budget", settings={"limits": {"tokens_total": 40, "requests_per_day": 100}})
    keys["budget"] = budget
    gw = Gateway(tmp_path, fake.url, keys=keys).start()
    body = {"model": "llama3.2", "prompt": "a b c", "stream": False}  # 3 + 5 tokens
    h = httpx.Client(timeout=10, headers=budget.auth)
    for _ in range(3):
        assert h.post(gw.url + "/api/generate", json=body).status_code == 200
    eventually(lambda: len(gw.usage()) >= 3)
    if how == "sigkill":
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
    else:
        assert gw.stop() == 0
    lines = gw.usage()
    assert recount(lines, "budget") == (3, 24)

    gw2 = Gateway(tmp_path, fake.url, keys=keys).start()
    assert "usage counters rebuilt" in gw2.output
    for _ in range(2):  # 24 -> 32 -> 40: the request that crosses the quota completes
        assert h.post(gw2.url + "/api/generate", json=body).status_code == 200
    r = h.post(gw2.url + "/api/generate", json=body)
    assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
    assert "retry-after" not in r.headers
    h.close()
    gw2.stop()
    assert recount(gw2.usage(), "budget") == (5, 40)


def test_unwritable_log_keeps_serving_and_recovers(fake, tmp_path):
    gw = Gateway(tmp_path, fake.url).start()
    h = httpx.Client(timeout=10, headers=gw.key("alice").auth)
    body = {"model": "llama3.2", "prompt": "x", "stream": False}
    assert h.post(gw.url + "/api/generate", json=body).status_code == 200
    eventually(lambda: len(gw.usage()) >= 1)
    # The log goes away and its path becomes a directory: nothing can be written there.
    moved = tmp_path / "usage.before.jsonl"
    gw.usage_log.rename(moved)
    gw.usage_log.mkdir()
    ids = [h.post(gw.url + "/api/generate", json=body).headers["x-keygate-request-id"]
           for _ in range(3)]
    # (A directory rather than permission bits: root, as in CI, ignores those.)
    gw.wait_for(r"cannot write usage log", timeout=5, after=0)
    gw.usage_log.rmdir()
    eventually(gw.usage_log.exists, timeout=10, interval=0.1)
    eventually(lambda: len(gw.usage()) >= 3, interval=0.1)
    assert [r["id"] for r in gw.usage()] == ids
    h.close()
    gw.stop()
    assert stat.S_ISREG(gw.usage_log.stat().st_mode)


def test_serves_while_counters_load_and_quota_keys_wait(fake, tmp_path):
    """A long log without its cache: keygate serves at once; a key with a quota waits
    until the counters are rebuilt, then is judged by them."""
    from conftest import KeySpec, default_keys
    keys = default_keys()
    budget = KeySpec("budget", settings={"limits": {"tokens_total": 1000}})
    keys["budget"] = budget
    gw = Gateway(tmp_path, fake.url, keys=keys)
    gw.usage_log.parent.mkdir(parents=True)
    line = json.dumps({
        "ts": "2026-01-01T00:00:00.000Z", "id": "req_x", "key": "other", "status": 200,
        "error": None, "method": "POST", "path": "/api/chat", "model": "m",
        "upstream_model": "m", "channel": None, "stream": False, "prompt_tokens": 1,
        "completion_tokens": 1, "total_tokens": 2, "duration_ms": 1.0,
        "client_ip": "127.0.0.1", "completed": True}, separators=(",", ":")) + "\n"
    spent = line.replace('"key":"other"', '"key":"budget"').replace(
        '"total_tokens":2', '"total_tokens":1000')
    with gw.usage_log.open("w") as f:
        f.write(line * 150_000 + spent)
    gw.start(wait=False)
    try:
        gw.wait_for(r"listening at .*:(\d+)")
        gw.port = int(gw.wait_for(r"listening at .*:(\d+)").rsplit(":", 1)[1].split(".")[0])
        gw.wait_for(r"keygate: config ")
        body = {"model": "llama3.2", "prompt": "x", "stream": False}
        r = httpx.post(gw.url + "/api/generate", json=body, headers=gw.key("alice").auth,
                       timeout=30)
        assert r.status_code == 200
        loaded_before_alice = "usage counters rebuilt" in gw.output
        r = httpx.post(gw.url + "/api/generate", json=body, headers=budget.auth, timeout=60)
        assert "usage counters rebuilt" in gw.output
        assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
        print("alice served before the counters were loaded:", not loaded_before_alice)
    finally:
        gw.stop()
    ids = [rec["id"] for rec in gw.usage()[150_001:]]
    assert len(ids) == 2 and len(set(ids)) == 2  # both requests logged, once each


def test_sigterm_lets_streams_in_flight_finish(fake, tmp_path):
    gw = Gateway(tmp_path, fake.url).start()
    fake.chunk_delay = 0.4
    try:
        with httpx.stream("POST", gw.url + "/api/chat", headers=gw.key("alice").auth,
                          timeout=20, json={"model": "llama3.2",
                                            "messages": [{"role": "user", "content": P}]}) as r:
            lines = r.iter_lines()
            next(lines)
            gw.proc.terminate()  # SIGTERM with four chunks still to come
            rest = [json.loads(x) for x in lines if x]
        assert rest[-1]["done"] is True
        assert gw.proc.wait(15) == 0
    finally:
        fake.chunk_delay = 0.0
        gw.stop()
    rec = gw.usage()[-1]
    assert rec["completed"] is True and rec["completion_tokens"] == 5
    assert "waiting up to 8 s for the requests in flight (1)" in gw.output
