"""End to end: what a usage line may hold, and what it counts, under a real mitmdump.

Three findings of a security review, each reproduced against the running gateway:

- A client without a key wrote 600 KB usage lines (the path in full); size-based rotation
  then deleted the lines that held a key's quota, and after a restart the key was served
  again. Lines are bounded now, and rotation carries deleted files' counts forward.
- A stream the client left before the upstream's final counts was logged with 0 tokens:
  eight native streams cut before `done: true` delivered their replies for free. Now the
  content delivered counts, marked `tokens_estimated`.
- /api/ps listed models a key may not use, digests and sizes included. Now filtered like
  /api/tags.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading

import httpx
import pytest

from conftest import ROOT, Gateway, KeySpec, default_keys, eventually

GEN = {"model": "llama3.2", "prompt": "a b c", "stream": False}  # 3 + 5 = 8 tokens
P = "one two three four"  # 4 prompt tokens


def quota_keys() -> dict[str, KeySpec]:
    """Three keys, each with one quota that two 8-token requests use up."""
    keys = default_keys()
    for name, limits in (("daytok", {"tokens_per_day": 16}), ("total", {"tokens_total": 16}),
                         ("reqs", {"requests_per_day": 2})):
        keys[name] = KeySpec(name, settings={"limits": limits})
    return keys


QUOTA_KEYS = ("daytok", "total", "reqs")


def spend_quotas(gw: Gateway, fake) -> None:
    for name in QUOTA_KEYS:
        for _ in range(2):
            r = httpx.post(gw.url + "/api/generate", json=GEN, headers=gw.key(name).auth,
                           timeout=10)
            assert r.status_code == 200, r.text
    assert_quotas_refuse(gw, fake)


def assert_quotas_refuse(gw: Gateway, fake) -> None:
    """Each quota key is refused with 429 insufficient_quota and nothing goes upstream."""
    for name in QUOTA_KEYS:
        before = len(fake.requests)
        r = httpx.post(gw.url + "/api/generate", json=GEN, headers=gw.key(name).auth,
                       timeout=10)
        assert r.status_code == 429, (name, r.status_code, r.text)
        assert r.headers["x-keygate-error"] == "insufficient_quota", name
        assert len(fake.requests) == before, name


def restart(gw: Gateway, toml: str, how: str = "sigterm") -> Gateway:
    """The same gateway (folder, keys, settings, log) stopped and started again."""
    if how == "sigkill":
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
    else:
        assert gw.stop() == 0
    return Gateway(gw.dir, gw.upstream, keys=gw.keys, gateway_toml=toml).start()


def log_files_on_disk(gw: Gateway) -> list:
    return sorted(p for p in gw.usage_log.parent.iterdir()
                  if p.name == "usage.jsonl" or p.name[len("usage.jsonl."):].isdigit())


def lines_on_disk(gw: Gateway) -> list[dict]:
    return [json.loads(x) for p in log_files_on_disk(gw)
            for x in p.read_bytes().splitlines() if x.strip()]


def keys_list(gw: Gateway) -> dict[str, dict]:
    res = subprocess.run([str(ROOT / "scripts" / "keys"), "--config", str(gw.config), "list",
                          "--format", "json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return {row["name"]: row for row in json.loads(res.stdout)}


def assert_listed_usage(gw: Gateway) -> None:
    """`scripts/keys list` reads the same ledger: it shows what the quotas count."""
    rows = keys_list(gw)
    assert (rows["daytok"]["requests_today"], rows["daytok"]["tokens_today"]) == (2, 16)
    assert rows["total"]["tokens_total"] == 16
    assert rows["reqs"]["requests_today"] == 2


def raw_request(port: int, head: str, timeout: float = 10) -> bytes:
    """Send a request head; return the status line and headers of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got.split(b"\r\n\r\n")[0]


# --------------------------------------------------------------------------- (A) bounded lines


def test_huge_paths_without_a_key_cannot_rotate_a_quota_away(fake, tmp_path):
    """The review's case: usage_log_max_mb = 1, usage_log_keep = 2, eight 600 KB paths from
    a client without a key. They were logged in full, rotation deleted the quota's lines,
    and after a restart the keys were served again."""
    toml = "usage_log_max_mb = 1\nusage_log_keep = 2\nmax_header_kb = 1024\n"
    gw = Gateway(tmp_path, fake.url, keys=quota_keys(), gateway_toml=toml).start()
    spend_quotas(gw, fake)
    n = gw.settled_count()
    before = len(fake.requests)
    for i in range(8):
        path = f"/{i}" + "a" * 600_000
        head = raw_request(gw.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), head[:200]
    assert len(fake.requests) == before  # nothing unclassified is forwarded
    eventually(lambda: len(gw.usage()) >= n + 8, timeout=10)
    raw = gw.usage_log.read_bytes().splitlines()[n:]
    assert len(raw) == 8
    for i, line in enumerate(raw):
        rec = json.loads(line)
        assert len(line) < 2048, len(line)
        assert (rec["key"], rec["status"], rec["error"]) == (None, 401, "invalid_api_key")
        assert rec["path"].startswith(f"/{i}aaaa") and rec["path"].endswith(
            f"...[{600_002 - 512} chars cut]")
    assert not gw.usage_log.with_name("usage.jsonl.1").exists()  # nothing rotated

    gw = restart(gw, toml)
    assert_quotas_refuse(gw, fake)
    gw.stop()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_rotation_however_fast_changes_no_quota(fake, tmp_path, how):
    """A log that rotates every other line (1 KB files, one kept): the lines of the quota
    keys are deleted, yet after a restart (graceful or kill -9) every quota still refuses,
    and `scripts/keys list` shows the same usage, before and after."""
    toml = "usage_log_max_mb = 0.001\nusage_log_keep = 1\n"
    gw = Gateway(tmp_path, fake.url, keys=quota_keys(), gateway_toml=toml).start()
    spend_quotas(gw, fake)
    auth = gw.key("alice").auth
    for _ in range(12):  # other traffic: the quota lines rotate away
        assert httpx.post(gw.url + "/api/generate", json=GEN, headers=auth,
                          timeout=10).status_code == 200
    eventually(lambda: not any(r["key"] in QUOTA_KEYS for r in lines_on_disk(gw)), timeout=10)
    assert not any(r["key"] in QUOTA_KEYS for r in lines_on_disk(gw))
    assert len(log_files_on_disk(gw)) == 2
    assert_quotas_refuse(gw, fake)
    assert_listed_usage(gw)

    gw = restart(gw, toml, how)
    assert "usage counters rebuilt" in gw.output
    assert_quotas_refuse(gw, fake)
    assert_listed_usage(gw)
    # alice's lifetime total is every request of hers, not what the kept files hold
    rows = keys_list(gw)
    assert rows["alice"]["tokens_total"] == 12 * 8
    assert sum(r["total_tokens"] for r in lines_on_disk(gw) if r["key"] == "alice") < 12 * 8
    gw.stop()


# --------------------------------------------------------------------------- (B) streams left


# endpoint -> (body, marker of one content frame, prompt tokens known before the end)
STREAMS = {
    "/api/chat": ({"messages": [{"role": "user", "content": P}]}, b'"done":false', 0),
    "/api/generate": ({"prompt": P}, b'"done":false', 0),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": P}], "stream": True},
                             b'"finish_reason":null', 0),
    "/v1/completions": ({"prompt": P, "stream": True}, b'"finish_reason":null', 0),
    "/v1/responses": ({"input": P, "stream": True}, b"event: response.output_text.delta", 0),
    "/v1/messages": ({"max_tokens": 100, "messages": [{"role": "user", "content": P}],
                      "stream": True}, b"event: content_block_delta", 4),
}


def read_then_leave(port: int, secret: str, path: str, body: dict, marker: bytes,
                    frames: int = 5) -> bytes:
    """POST a streamed request on a raw socket, read until `frames` content frames have
    come, then close the connection: a client that leaves before the stream's end."""
    data = json.dumps(body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\nAuthorization: Bearer {secret}\r\n\r\n"
                   f"{data}").encode())
        got = b""
        while got.count(marker) < frames:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    return got


@pytest.fixture
def held_final(fake):
    """The fake sends every content step of a stream, then holds the one with the counts."""
    fake.hold_final = threading.Event()
    try:
        yield fake
    finally:
        fake.hold_final.set()
        fake.hold_final = None


def test_native_streams_left_before_their_counts_use_the_daily_quota(held_final, tmp_path):
    """The review's case: eight /api/chat streams cut just before the final `done: true`
    line delivered the whole reply and were logged with 0 tokens; tokens_per_day did not
    move. Now each counts its 5 content lines, and the ninth request is refused."""
    fake = held_final
    keys = default_keys()
    keys["day"] = KeySpec("day", settings={"limits": {"tokens_per_day": 40}})
    gw = Gateway(tmp_path, fake.url, keys=keys).start()
    body = {"model": "llama3.2", **STREAMS["/api/chat"][0]}
    for _ in range(8):
        n = gw.settled_count()
        before = len(fake.requests)
        got = read_then_leave(gw.port, gw.key("day").secret, "/api/chat", body,
                              b'"done":false')
        assert b'"done":true' not in got and got.count(b'"done":false') == 5
        assert len(fake.requests) == before + 1
        assert fake.requests[-1].path == "/api/chat"
        rec = gw.usage_after(n, timeout=10)
        assert (rec["key"], rec["status"], rec["stream"], rec["completed"]) == (
            "day", 200, True, False)
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (
            0, 5, 5)
        assert rec["tokens_estimated"] is True
    before = len(fake.requests)
    r = httpx.post(gw.url + "/api/chat", json={**body, "stream": False},
                   headers=gw.key("day").auth, timeout=10)
    assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
    assert len(fake.requests) == before
    gw.stop()


@pytest.mark.parametrize("path", STREAMS)
def test_every_stream_shape_left_early_counts_its_content(held_final, gateway, path):
    """An Anthropic-shape stream cut early counted only its input tokens; the other shapes
    nothing. Each counts its 5 content frames now, marked as estimated."""
    fake = held_final
    body, marker, prompt = STREAMS[path]
    n = gateway.settled_count()
    got = read_then_leave(gateway.port, gateway.key("alice").secret, path,
                          {"model": "llama3.2", **body}, marker)
    assert got.count(marker) == 5
    assert fake.requests[-1].path == path
    rec = gateway.usage_after(n, timeout=10)
    assert (rec["path"], rec["stream"], rec["completed"]) == (path, True, False)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (
        prompt, 5, prompt + 5)
    assert rec["tokens_estimated"] is True


@pytest.mark.parametrize("path", STREAMS)
def test_a_whole_stream_is_counted_by_the_upstream(gateway, path):
    body, _, _ = STREAMS[path]
    r = httpx.post(gateway.url + path, json={"model": "llama3.2", **body},
                   headers=gateway.key("alice").auth, timeout=10)
    assert r.status_code == 200
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (4, 5)
    assert rec["completed"] is True and rec["tokens_estimated"] is False


# --------------------------------------------------------------------------- (C) /api/ps


def load_models(fake, *names: str) -> None:
    for name in names:
        r = httpx.post(fake.url + "/api/generate", timeout=10,
                       json={"model": name, "prompt": "x", "stream": False})
        assert r.status_code == 200


def test_ps_shows_only_the_models_a_key_may_use(fake, gateway):
    """/api/ps listed a model the key may not use, with its digest and size."""
    load_models(fake, "qwen2.5:7b", "llama3.2")
    direct = httpx.get(fake.url + "/api/ps", timeout=10).json()["models"]
    qwen = next(m for m in direct if m["name"] == "qwen2.5:7b")
    before = len(fake.requests)
    r = httpx.get(gateway.url + "/api/ps", headers=gateway.key("llama-only").auth, timeout=10)
    assert r.status_code == 200
    assert len(fake.requests) == before + 1 and fake.requests[-1].path == "/api/ps"
    models = r.json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest"]
    assert models == [m for m in direct if m["name"] == "llama3.2:latest"]  # kept whole
    assert qwen["digest"] not in r.text and "qwen" not in r.text
    rec = gateway.usage_for(r.headers["x-keygate-request-id"])
    assert (rec["key"], rec["status"], rec["path"]) == ("llama-only", 200, "/api/ps")
    # a key without model limits sees everything loaded
    r = httpx.get(gateway.url + "/api/ps", headers=gateway.key("alice").auth, timeout=10)
    assert {m["name"] for m in r.json()["models"]} >= {"llama3.2:latest", "qwen2.5:7b"}


def test_ps_through_a_channel_shows_aliases_as_the_key_names_them(fake, tmp_path):
    keys = default_keys()
    keys["mini"] = KeySpec("mini", settings={"models": ["gpt-4o-mini"]})
    toml = (f'[[channels]]\nname = "local"\nkind = "ollama"\nbase_url = "{fake.url}"\n'
            'models = ["llama3.2:*"]\n[channels.model_map]\n"gpt-4o-mini" = "qwen2.5:7b"\n')
    gw = Gateway(tmp_path, fake.url, keys=keys, gateway_toml=toml).start()
    load_models(fake, "qwen2.5:7b", "llama3.2")
    r = httpx.get(gw.url + "/api/ps", headers=gw.key("mini").auth, timeout=10)
    assert r.status_code == 200
    models = r.json()["models"]
    assert [(m["name"], m["model"]) for m in models] == [("gpt-4o-mini", "gpt-4o-mini")]
    assert "qwen2.5" not in r.text
    r = httpx.get(gw.url + "/api/ps", headers=gw.key("llama-only").auth, timeout=10)
    assert [m["name"] for m in r.json()["models"]] == ["llama3.2:latest"]
    gw.stop()
