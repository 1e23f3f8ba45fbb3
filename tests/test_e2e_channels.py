"""End to end: channels. One key and one base URL in front of several upstreams: an
Ollama, an OpenAI-compatible API behind a path prefix that wants its own credential, and
upstreams that fail on demand."""

from __future__ import annotations

import collections
import json
import time

import httpx
import openai
import pytest

from conftest import Gateway
from fakeollama import FakeOllama

UPSTREAM_SECRET = "up-" + "s3cr3t" * 4


def channels_toml(local: str, remote: str) -> str:
    return f"""
[[channels]]
name = "local"
kind = "ollama"
base_url = "{local}"
models = ["llama3.2:*", "qwen2.5:*", "nomic-embed-text:*"]
[channels.model_map]
"gpt-4o-mini" = "qwen2.5:7b"

[[channels]]
name = "remote"
kind = "openai"
base_url = "{remote}/compat/v1"
models = ["deepseek-*"]
api_key_env = "REMOTE_KEY"
"""


@pytest.fixture(scope="module")
def upstreams():
    local = FakeOllama(name="local").start()
    remote = FakeOllama(name="remote", kind="openai", prefix="/compat",
                        models=("deepseek-chat", "deepseek-reasoner"),
                        require_bearer=UPSTREAM_SECRET).start()
    try:
        yield local, remote
    finally:
        local.stop()
        remote.stop()


@pytest.fixture(scope="module")
def gw(upstreams, tmp_path_factory):
    local, remote = upstreams
    # The reverse target is a dead port: with channels, nothing may go there.
    g = Gateway(tmp_path_factory.mktemp("chan"), "http://127.0.0.1:9",
                gateway_toml=channels_toml(local.url, remote.url),
                env={"REMOTE_KEY": UPSTREAM_SECRET}).start()
    try:
        yield g
    finally:
        g.stop()


def client(gw, name="alice"):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key(name).secret, timeout=15,
                         max_retries=0)


def test_alias_is_mapped_upstream_and_back(gw, upstreams):
    local, remote = upstreams
    local.clear()
    n = gw.settled_count()
    resp = client(gw).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    assert resp.model == "gpt-4o-mini"
    sent = local.requests[-1]
    assert sent.json["model"] == "qwen2.5:7b"
    assert sent.header("authorization") is None
    rec = gw.usage_after(n)
    assert (rec["model"], rec["upstream_model"], rec["channel"]) == (
        "gpt-4o-mini", "qwen2.5:7b", "local")
    assert rec["prompt_tokens"] == 2

    chunks = list(client(gw).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert chunks and all(c.model == "gpt-4o-mini" for c in chunks)

    native = httpx.post(gw.url + "/api/chat", headers=gw.key("alice").auth, timeout=10, json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    lines = [json.loads(x) for x in native.text.splitlines()]
    assert all(x["model"] == "gpt-4o-mini" for x in lines)
    assert local.requests[-1].json["model"] == "qwen2.5:7b"


def test_openai_channel_gets_its_own_credential_and_prefix(gw, upstreams):
    local, remote = upstreams
    remote.clear()
    before_local = len(local.requests)
    resp = client(gw).chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "one two three"}])
    assert resp.model == "deepseek-chat" and resp.usage.prompt_tokens == 3
    sent = remote.requests[-1]
    assert sent.path == "/compat/v1/chat/completions"
    assert sent.header("authorization") == f"Bearer {UPSTREAM_SECRET}"
    assert gw.key("alice").secret not in repr(sent.headers)
    assert len(local.requests) == before_local
    # streamed, with usage counted from the usage chunk keygate asked for
    n = gw.settled_count()
    chunks = list(client(gw).chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "a b"}], stream=True))
    assert all(c.usage is None for c in chunks)
    rec = gw.usage_after(n)
    assert rec["channel"] == "remote" and rec["prompt_tokens"] == 2 and rec["completion_tokens"]
    assert UPSTREAM_SECRET not in gw.output and UPSTREAM_SECRET not in gw.usage_log.read_text()


def test_native_endpoints_only_reach_ollama_channels(gw, upstreams):
    local, remote = upstreams
    before = (len(local.requests), len(remote.requests))
    r = httpx.post(gw.url + "/api/chat", headers=gw.key("alice").auth, timeout=10,
                   json={"model": "deepseek-chat", "messages": []})
    assert r.status_code == 404 and r.headers["x-keygate-error"] == "model_not_found"
    r = httpx.post(gw.url + "/v1/chat/completions", headers=gw.key("alice").auth, timeout=10,
                   json={"model": "mistral", "messages": []})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (len(local.requests), len(remote.requests)) == before


def test_model_lists_merge_channels_and_aliases(gw):
    ids = sorted(m.id for m in client(gw).models.list())
    assert ids == sorted(["llama3.2:latest", "qwen2.5:7b", "nomic-embed-text:latest",
                          "gpt-4o-mini", "deepseek-chat", "deepseek-reasoner"])
    tags = httpx.get(gw.url + "/api/tags", headers=gw.key("alice").auth, timeout=10).json()
    names = [m["name"] for m in tags["models"]]
    assert sorted(names) == sorted(["llama3.2:latest", "qwen2.5:7b",
                                    "nomic-embed-text:latest", "gpt-4o-mini"])
    alias = next(m for m in tags["models"] if m["name"] == "gpt-4o-mini")
    assert alias["model"] == "gpt-4o-mini" and alias["details"]["family"] == "qwen"
    # per key
    assert [m.id for m in client(gw, "llama-only").models.list()] == ["llama3.2:latest"]
    assert client(gw).models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        client(gw).models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        client(gw, "llama-only").models.retrieve("gpt-4o-mini")


def weighted_toml(a: str, b: str, c: str | None = None) -> str:
    out = f"""
[[channels]]
name = "a"
base_url = "{a}"
weight = 3

[[channels]]
name = "b"
base_url = "{b}"
weight = 1
"""
    if c:
        out += f'\n[[channels]]\nname = "c"\nbase_url = "{c}"\npriority = 1\n'
    return out


def test_weight_split_and_priority(make_gateway):
    with FakeOllama() as a, FakeOllama() as b, FakeOllama() as c:
        gw = make_gateway("http://127.0.0.1:9", gateway_toml=weighted_toml(a.url, b.url)).start()
        n = 400
        with httpx.Client(timeout=10, headers=gw.key("alice").auth) as h:
            for _ in range(n):
                assert h.post(gw.url + "/api/embed", json={
                    "model": "nomic-embed-text", "input": "x"}).status_code == 200
        share = len(a.requests) / n
        print(f"weight split a:b = {len(a.requests)}:{len(b.requests)} (share of a {share:.3f})")
        assert len(a.requests) + len(b.requests) == n
        assert 0.68 <= share <= 0.82  # 3:1 is 0.75; 400 draws put 0.68..0.82 at > 4 sigma

        # A higher priority channel takes everything.
        gw.config.write_text(gw.config.read_text().replace(
            weighted_toml(a.url, b.url), weighted_toml(a.url, b.url, c.url)))
        gw.wait_for(r"reloaded configuration \(\d+ keys, 3 channels\)", timeout=5)
        before = (len(a.requests), len(b.requests))
        with httpx.Client(timeout=10, headers=gw.key("alice").auth) as h:
            for _ in range(20):
                h.post(gw.url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"})
        assert len(c.requests) == 20 and (len(a.requests), len(b.requests)) == before


def failover_toml(primary: str, backup: str) -> str:
    return f"""
[[channels]]
name = "primary"
base_url = "{primary}"
priority = 1

[[channels]]
name = "backup"
base_url = "{backup}"
"""


def test_failover_cooldown_and_recovery(make_gateway):
    with FakeOllama() as primary, FakeOllama() as backup:
        gw = make_gateway("http://127.0.0.1:9",
                          gateway_toml=failover_toml(primary.url, backup.url)).start()
        h = httpx.Client(timeout=10, headers=gw.key("alice").auth)
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                "stream": False}
        assert h.post(gw.url + "/api/chat", json=body).status_code == 200
        assert len(primary.requests) == 1

        primary.fail = "500"
        r = h.post(gw.url + "/api/chat", json=body)
        assert r.status_code == 500  # the upstream's own error passes through
        # Cooling down: the next requests go to the backup, unnoticed by the client.
        t_fail = time.monotonic()
        for _ in range(5):
            assert h.post(gw.url + "/api/chat", json=body).status_code == 200
        assert len(backup.requests) == 5
        assert "channel primary answered 500; cooling down" in gw.output

        primary.fail = None
        # After the cooldown the primary is tried again and, healthy, takes over.
        deadline = t_fail + 10
        while time.monotonic() < deadline and len(primary.requests) < 3:
            h.post(gw.url + "/api/chat", json=body)
            time.sleep(0.2)
        assert len(primary.requests) >= 3
        count = len(backup.requests)
        for _ in range(5):
            assert h.post(gw.url + "/api/chat", json=body).status_code == 200
        assert len(backup.requests) == count
        h.close()

        usage = gw.usage()
        by_channel = collections.Counter(r["channel"] for r in usage)
        assert by_channel["backup"] >= 5 and by_channel["primary"] >= 3


def test_refused_connection_fails_over(make_gateway):
    with FakeOllama() as backup:
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        toml = failover_toml(dead, backup.url)
        gw = make_gateway("http://127.0.0.1:9", gateway_toml=toml).start()
        h = httpx.Client(timeout=10, headers=gw.key("alice").auth)
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        # The first request already: nothing reached the primary, so the backup takes it.
        first = h.post(gw.url + "/api/generate", json=body)
        assert first.status_code == 200
        rec = gw.usage_after(0)
        assert (rec["status"], rec["error"], rec["completed"]) == (200, None, True)
        assert rec["channel"] == "backup" and rec["failed_channels"] == ["primary"]
        assert "channel primary failed" in gw.output
        # The primary cools down: the next ones go straight to the backup.
        for _ in range(3):
            assert h.post(gw.url + "/api/generate", json=body).status_code == 200
        assert len(backup.requests) == 4
        gw.usage_after(3)
        assert [r["failed_channels"] for r in gw.usage()[1:4]] == [[]] * 3
        h.close()


def test_channel_edit_is_reloaded(make_gateway):
    with FakeOllama() as local:
        toml = f'[[channels]]\nname = "local"\nbase_url = "{local.url}"\n' \
               '[channels.model_map]\n"house" = "llama3.2:latest"\n'
        gw = make_gateway("http://127.0.0.1:9", gateway_toml=toml).start()
        body = {"model": "house", "prompt": "hi", "stream": False}
        h = httpx.Client(timeout=10, headers=gw.key("alice").auth)
        assert h.post(gw.url + "/api/generate", json=body).json()["model"] == "house"
        assert local.requests[-1].json["model"] == "llama3.2:latest"
        gw.config.write_text(gw.config.read_text().replace('"llama3.2:latest"', '"qwen2.5:7b"'))
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            h.post(gw.url + "/api/generate", json=body)
            if local.requests[-1].json["model"] == "qwen2.5:7b":
                break
            time.sleep(0.05)
        assert local.requests[-1].json["model"] == "qwen2.5:7b"
        h.close()


def test_upstream_timeout_gives_up_and_cools_the_channel(make_gateway):
    with FakeOllama() as slow, FakeOllama() as backup:
        toml = "upstream_timeout_s = 1\n" + failover_toml(slow.url, backup.url)
        gw = make_gateway("http://127.0.0.1:9", gateway_toml=toml).start()
        slow.fail = "stall"
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        h = httpx.Client(timeout=30, headers=gw.key("alice").auth)
        t0 = time.monotonic()
        r = h.post(gw.url + "/api/generate", json=body)
        waited = time.monotonic() - t0
        # Given up on after upstream_timeout_s, then sent to the backup, which answers.
        assert r.status_code == 200 and 0.9 < waited < 5
        rec = gw.usage_after(0)
        assert (rec["status"], rec["error"]) == (200, None)
        assert rec["channel"] == "backup" and rec["failed_channels"] == ["primary"]
        assert len(slow.requests) == 1 and len(backup.requests) == 1
        # the stalled channel is cooling: the next request goes to the backup at once
        t0 = time.monotonic()
        assert h.post(gw.url + "/api/generate", json=body).status_code == 200
        assert time.monotonic() - t0 < 0.9
        assert len(backup.requests) == 2 and len(slow.requests) == 1
        h.close()
