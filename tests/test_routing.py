"""keygate/stages/routing.py: channel choice, cooldown and the upstream rewrite
(docs/configuration.md, docs/endpoints.md#authentication, docs/usage-log.md)."""

from __future__ import annotations

import asyncio
import collections
import math
import random

import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons

from helpers.unit import make_config, make_flow, request_json, run_request, secret_of, with_state
from keygate.model.settings import Channel
from keygate.request import state_of
from keygate.stages.auth import Auth
from keygate.stages.policy import Policy
from keygate.stages.routing import COOLDOWN_FIRST, COOLDOWN_MAX, Health, Router, candidates, choose


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ch(name: str, kind: str = "ollama", models=("*",), priority: int = 0, weight: float = 1.0,
       model_map=None) -> Channel:
    return Channel(name=name, kind=kind, base_url=f"http://{name}", scheme="http", host=name,
                   port=80, prefix="", models=tuple(models), model_map=model_map or {},
                   priority=priority, weight=weight)


# --------------------------------------------------------------------------- candidates


def test_candidates_filter_by_model_and_kind():
    a = ch("a", models=["llama*"])
    b = ch("b", kind="openai", models=["*"])
    c = ch("c", models=["qwen*"], model_map={"gpt-4o-mini": "qwen2.5:7b"})
    chans = (a, b, c)
    assert candidates(chans, "llama3.2:1b", native=False) == [a, b]
    assert candidates(chans, "llama3.2:1b", native=True) == [a]  # native: ollama only
    assert candidates(chans, "gpt-4o-mini", native=False) == [b, c]
    assert candidates(chans, "gpt-4o-mini", native=True) == [c]
    assert candidates(chans, "mistral", native=True) == []
    assert candidates(chans, None, native=True) == [a, c]  # no model: every channel of the kind
    assert candidates(chans, None, native=False) == [a, b, c]
    assert candidates(chans, "gpt-oss:120b-cloud", native=False) == []


# --------------------------------------------------------------------------- Health


def test_health_cooldown_doubles_caps_and_resets():
    clock = Clock()
    h = Health(clock)
    assert not h.cooling("a")
    assert h.failure("a") == COOLDOWN_FIRST
    assert h.cooling("a")
    clock.t += COOLDOWN_FIRST - 0.01
    assert h.cooling("a")
    clock.t += 0.02
    assert not h.cooling("a")
    steps = [h.failure("a") for _ in range(10)]
    assert steps[:4] == [COOLDOWN_FIRST * 2, COOLDOWN_FIRST * 4, COOLDOWN_FIRST * 8,
                         COOLDOWN_FIRST * 16]
    assert max(steps) == COOLDOWN_MAX and steps[-1] == COOLDOWN_MAX
    h.success("a")
    assert not h.cooling("a")
    assert h.failure("a") == COOLDOWN_FIRST  # forgotten on success
    assert not h.cooling("b")


# --------------------------------------------------------------------------- choose


def test_choose_nothing():
    assert choose([], Health(Clock()), random.Random(1)) is None


def test_choose_highest_priority_group():
    a, b, c = ch("a", priority=0), ch("b", priority=5), ch("c", priority=-1)
    rng = random.Random(7)
    assert {choose([a, b, c], Health(Clock()), rng).name for _ in range(200)} == {"b"}


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (1, 9), (0.5, 0.25, 0.25), (2, 2, 4)])
def test_choose_splits_by_weight(weights):
    chans = [ch(f"c{i}", weight=w) for i, w in enumerate(weights)]
    rng = random.Random(12345)
    n = 20_000
    counts = collections.Counter(choose(chans, Health(Clock()), rng).name for _ in range(n))
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[f"c{i}"] / n - w / total) < 0.02, counts


def test_choose_picks_the_last_channel_at_the_top_of_the_range():
    # random() just under 1, with weights whose float sum is not exact: the pick is still
    # a channel, the last one.
    class Top(random.Random):
        def random(self):
            return math.nextafter(1.0, 0.0)

    chans = [ch("a", weight=0.1), ch("b", weight=0.2), ch("c", weight=0.3)]
    assert choose(chans, Health(Clock()), Top()).name == "c"


def test_choose_weights_only_within_the_top_group():
    chans = [ch("hi", priority=1, weight=0.01), ch("lo", priority=0, weight=1000)]
    rng = random.Random(3)
    assert {choose(chans, Health(Clock()), rng).name for _ in range(500)} == {"hi"}


def test_cooling_channels_are_skipped():
    clock = Clock()
    h = Health(clock)
    hi1, hi2, lo = ch("hi1", priority=1), ch("hi2", priority=1), ch("lo", priority=0)
    rng = random.Random(5)
    h.failure("hi1")
    assert {choose([hi1, hi2, lo], h, rng).name for _ in range(200)} == {"hi2"}
    h.failure("hi2")
    assert {choose([hi1, hi2, lo], h, rng).name for _ in range(200)} == {"lo"}
    clock.t += COOLDOWN_FIRST
    assert {choose([hi1, hi2, lo], h, rng).name for _ in range(200)} == {"hi1", "hi2"}


def test_all_cooling_picks_the_least_recently_failed():
    clock = Clock()
    h = Health(clock)
    a, b, c = ch("a", priority=9), ch("b"), ch("c")
    h.failure("b")
    clock.t += 0.5
    h.failure("a")
    clock.t += 0.5
    h.failure("c")
    assert choose([a, b, c], h, random.Random(1)).name == "b"
    clock.t += 0.1
    h.failure("b")  # b fails again: now a failed longest ago
    assert choose([a, b, c], h, random.Random(1)).name == "a"


# --------------------------------------------------------------------------- the Router addon

TWO = (
    '[[channels]]\nname = "gpu"\nkind = "ollama"\nbase_url = "http://10.0.0.5:11434"\n'
    'models = ["llama3.2:*", "qwen2.5:*"]\n'
    '[channels.model_map]\n"gpt-4o-mini" = "qwen2.5:7b"\n'
    '[[channels]]\nname = "ds"\nkind = "openai"\nbase_url = "https://api.deepseek.com/v1"\n'
    'models = ["deepseek-*"]\napi_key_env = "DS_KEY"\n'
    '[channels.model_map]\n"gpt-4o" = "deepseek-chat"\n'
)
ENV = {"DS_KEY": "sk-upstream-deepseek"}


def route(method, path, body=None, toml="", key="alice", headers=None, environ=None,
          router=None):
    config = make_config(toml, environ=environ)
    f = make_flow(method, path, key=key, body=body, headers=headers)
    router = router or Router(config, rng=random.Random(1))
    router.config = config
    with taddons.context():
        run_request(f, Auth(config), Policy(config), router)
    return f


def test_no_channels_leaves_the_reverse_target():
    f = route("POST", "/api/chat?x=1", {"model": "llama3.2:1b", "stream": False},
              headers={"origin": "https://evil.example"})
    assert f.response is None
    assert (f.request.scheme, f.request.host, f.request.port) == ("http", "127.0.0.1", 11434)
    assert f.request.path == "/api/chat?x=1"
    assert state_of(f).admitted is True
    assert state_of(f).upstream_model == "llama3.2:1b"
    assert not state_of(f).channel
    assert not state_of(f).body  # parsed body does not linger in metadata
    assert "origin" not in f.request.headers
    assert "authorization" not in f.request.headers and "x-api-key" not in f.request.headers


@pytest.mark.parametrize("method, path, body, channel, scheme, host, port, upstream_path", [
    ("POST", "/api/chat", {"model": "llama3.2:1b"}, "gpu", "http", "10.0.0.5", 11434, "/api/chat"),
    ("POST", "/v1/chat/completions", {"model": "llama3.2:1b"}, "gpu", "http", "10.0.0.5", 11434,
     "/v1/chat/completions"),
    ("POST", "/v1/chat/completions?trace=1", {"model": "deepseek-chat"}, "ds", "https",
     "api.deepseek.com", 443, "/v1/chat/completions?trace=1"),
    ("POST", "/v1/embeddings", {"model": "deepseek-embed"}, "ds", "https", "api.deepseek.com", 443,
     "/v1/embeddings"),
    ("GET", "/api/tags", None, "gpu", "http", "10.0.0.5", 11434, "/api/tags"),
    ("GET", "/api/version", None, "gpu", "http", "10.0.0.5", 11434, "/api/version"),
    ("POST", "/api/show", {"model": "qwen2.5:7b"}, "gpu", "http", "10.0.0.5", 11434, "/api/show"),
    ("GET", "/v1/models/deepseek-chat", None, "ds", "https", "api.deepseek.com", 443,
     "/v1/models/deepseek-chat"),
])
def test_rewrite_to_the_channel(method, path, body, channel, scheme, host, port, upstream_path):
    f = route(method, path, body, toml=TWO, environ=ENV)
    assert f.response is None, f.response and f.response.content
    assert state_of(f).channel == channel
    assert (f.request.scheme, f.request.host, f.request.port) == (scheme, host, port)
    assert f.request.path == upstream_path


@pytest.mark.parametrize("base_url, kind, path, upstream_path", [
    ("https://gw.example.com/proxy/v1", "openai", "/v1/chat/completions",
     "/proxy/v1/chat/completions"),
    ("https://gw.example.com/proxy/v1/", "openai", "/v1/models?limit=5",
     "/proxy/v1/models?limit=5"),
    ("https://open.bigmodel.cn/api/paas/v4", "openai", "/v1/chat/completions",
     "/api/paas/v4/chat/completions"),
    ("http://box:8080/ollama", "ollama", "/api/generate", "/ollama/api/generate"),
    ("http://box:8080/ollama/", "ollama", "/v1/completions", "/ollama/v1/completions"),
])
def test_base_url_with_a_path_prefix(base_url, kind, path, upstream_path):
    toml = f'[[channels]]\nname = "c"\nkind = "{kind}"\nbase_url = "{base_url}"\n'
    method = "GET" if "/models" in path else "POST"
    body = None if method == "GET" else {"model": "m", "prompt": "x"}
    f = route(method, path, body, toml=toml)
    assert f.response is None, f.response and f.response.content
    assert f.request.path == upstream_path
    assert f.request.host == base_url.split("/")[2].split(":")[0]


def test_model_map_rewrites_the_body():
    f = route("POST", "/v1/chat/completions",
              {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo"}]},
              toml=TWO, environ=ENV)
    assert state_of(f).channel == "gpu"
    assert state_of(f).model == "gpt-4o-mini"
    assert state_of(f).upstream_model == "qwen2.5:7b"
    assert request_json(f) == {"model": "qwen2.5:7b",
                               "messages": [{"role": "user", "content": "héllo"}]}
    assert int(f.request.headers["content-length"]) == len(f.request.content)


def test_model_map_to_an_openai_channel():
    f = route("POST", "/v1/chat/completions", {"model": "gpt-4o"}, toml=TWO, environ=ENV)
    assert state_of(f).channel == "ds"
    assert request_json(f)["model"] == "deepseek-chat"


def test_model_map_rewrites_the_deprecated_show_name():
    f = route("POST", "/api/show", {"name": "gpt-4o-mini"}, toml=TWO, environ=ENV)
    assert request_json(f) == {"name": "qwen2.5:7b"}


def test_model_map_rewrites_the_model_endpoint_path():
    # docs/configuration.md: the upstream sees model_map.get(requested, requested), here in the
    # path.
    f = route("GET", "/v1/models/gpt-4o-mini", toml=TWO, environ=ENV)
    assert f.response is None
    assert state_of(f).channel == "gpu"
    assert state_of(f).upstream_model == "qwen2.5:7b"
    assert f.request.path == "/v1/models/qwen2.5:7b"


def test_unmapped_model_body_is_forwarded_as_sent():
    raw = b'{"model":"llama3.2:1b",   "prompt":"x"}'
    f = route("POST", "/api/generate", raw, toml=TWO, environ=ENV)
    assert f.request.content == raw


def test_channel_credential_replaces_the_clients():
    f = route("POST", "/v1/chat/completions", {"model": "deepseek-chat"}, toml=TWO, environ=ENV,
              headers={"x-api-key": secret_of("alice")})  # the client sent both headers
    assert f.response is None
    assert f.request.headers.get_all("authorization") == ["Bearer sk-upstream-deepseek"]
    assert "x-api-key" not in f.request.headers
    assert "sk-upstream-deepseek" not in repr(dict(f.metadata))


def test_no_credential_for_a_channel_without_one():
    f = route("POST", "/api/chat", {"model": "llama3.2:1b"}, toml=TWO, environ=ENV)
    assert state_of(f).channel == "gpu"
    assert "authorization" not in f.request.headers
    assert "x-api-key" not in f.request.headers


def test_origin_is_not_forwarded():
    f = route("POST", "/v1/chat/completions", {"model": "deepseek-chat"}, toml=TWO, environ=ENV,
              headers={"Origin": "https://app.example.com"})
    assert "origin" not in f.request.headers


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/chat", {"model": "deepseek-chat"}),  # native: ollama channels only
    ("POST", "/v1/messages", {"model": "deepseek-chat"}),
    ("POST", "/api/chat", {"model": "gpt-4o"}),
    ("POST", "/v1/chat/completions", {"model": "mistral:7b"}),  # nobody serves it
    ("GET", "/v1/models/mistral:7b", None),
])
def test_no_channel_serves_the_model(method, path, body):
    f = route(method, path, body, toml=TWO, environ=ENV)
    assert f.response.status_code == 404
    assert f.response.headers["x-keygate-error"] == "model_not_found"
    assert not state_of(f).admitted


# --------------------------------------------------------------------------- include_usage


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_include_usage_added_to_streams(path):
    f = route("POST", path, {"model": "llama3.2:1b", "stream": True})
    assert request_json(f)["stream_options"] == {"include_usage": True}
    assert state_of(f).strip_usage is True


def test_include_usage_keeps_other_stream_options():
    f = route("POST", "/v1/chat/completions",
              {"model": "llama3.2:1b", "stream": True,
               "stream_options": {"include_usage": False, "x": 1}})
    assert request_json(f)["stream_options"] == {"include_usage": True, "x": 1}
    assert state_of(f).strip_usage is True


def test_include_usage_asked_for_by_the_client():
    raw = b'{"model":"llama3.2:1b","stream":true,"stream_options":{"include_usage":true}}'
    f = route("POST", "/v1/chat/completions", raw)
    assert f.request.content == raw
    assert not state_of(f).strip_usage


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "llama3.2:1b"}),
    ("/v1/chat/completions", {"model": "llama3.2:1b", "stream": False}),
    ("/v1/responses", {"model": "llama3.2:1b", "stream": True}),
    ("/v1/messages", {"model": "llama3.2:1b", "stream": True}),
    ("/api/chat", {"model": "llama3.2:1b"}),
    ("/v1/embeddings", {"model": "llama3.2:1b", "stream": True}),
])
def test_include_usage_not_added_elsewhere(path, body):
    f = route("POST", path, body)
    assert "stream_options" not in request_json(f)
    assert not state_of(f).strip_usage


def test_include_usage_not_added_when_the_channel_says_no():
    toml = ('[[channels]]\nname = "v"\nkind = "openai"\nbase_url = "http://vllm:8000/v1"\n'
            "stream_usage = false\n")
    f = route("POST", "/v1/chat/completions", {"model": "m", "stream": True}, toml=toml)
    assert state_of(f).channel == "v"
    assert "stream_options" not in request_json(f)
    assert not state_of(f).strip_usage


def test_include_usage_with_an_alias_rewrites_both():
    f = route("POST", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True},
              toml=TWO, environ=ENV)
    assert request_json(f) == {"model": "qwen2.5:7b", "stream": True,
                               "stream_options": {"include_usage": True}}


# --------------------------------------------------------------------------- choice and health


PAIR = ('[[channels]]\nname = "a"\nbase_url = "http://a:1"\nweight = 3\n'
        '[[channels]]\nname = "b"\nbase_url = "http://b:1"\nweight = 1\n'
        '[[channels]]\nname = "backup"\nbase_url = "http://c:1"\npriority = -1\n')


def test_router_spreads_by_weight_with_its_rng():
    config = make_config(PAIR)
    router = Router(config, rng=random.Random(99))
    seen = collections.Counter()
    n = 2000
    with taddons.context():
        for _ in range(n):
            f = make_flow("POST", "/api/chat", body={"model": "m"})
            with_state(f, key="alice", model="m")
            router.request(f)
            seen[state_of(f).channel] += 1
    assert set(seen) == {"a", "b"}
    assert abs(seen["a"] / n - 0.75) < 0.04


def test_router_health_from_responses():
    clock = Clock()
    config = make_config(PAIR)
    router = Router(config, rng=random.Random(1))
    router.health = Health(clock)

    def send(status: int | None) -> str:
        f = route("POST", "/api/chat", {"model": "m"}, toml=PAIR, router=router)
        with taddons.context():
            if status is None:
                f.error = Error("connection refused")
                router.error(f)
            else:
                f.response = http.Response.make(status)
                router.responseheaders(f)
        return state_of(f).channel

    first = send(502)
    assert router.health.cooling(first)
    other = ({"a", "b"} - {first}).pop()
    assert send(None) == other  # the failing one is skipped
    assert router.health.cooling(other)
    assert send(200) == "backup"  # both top channels cool: the lower priority serves
    clock.t += COOLDOWN_FIRST
    assert send(200) in {"a", "b"}


def test_already_answered_flows_are_not_routed():
    config = make_config(TWO, environ=ENV)
    f = make_flow("POST", "/api/chat", key="alice", body={"model": "llama3.2:1b"})
    f.response = http.Response.make(403)
    with taddons.context():
        Router(config).request(f)
    assert f.request.host == "127.0.0.1"
    assert not state_of(f).admitted


def test_never_forwards_an_unclassified_request():
    config = make_config()
    f = make_flow("POST", "/api/me", key="alice")
    with taddons.context():
        Router(config).request(f)
    assert f.response.status_code == 404
    assert not state_of(f).admitted


def test_blob_uploads_are_routed_at_headers_time():
    # Their body streams through, so there is no request hook before it leaves.
    digest = "sha256:" + "cd" * 32
    config = make_config(TWO, environ=ENV)
    f = make_flow("POST", f"/api/blobs/{digest}", key="admin",
                  headers={"content-length": str(10 ** 10)})
    with taddons.context():
        for addon in (Auth(config), Policy(config), Router(config)):
            addon.requestheaders(f)
    assert f.response is None
    assert f.request.stream is True
    assert state_of(f).admitted is True
    assert state_of(f).channel == "gpu"  # an ollama channel
    assert (f.request.host, f.request.port, f.request.path) == ("10.0.0.5", 11434,
                                                                f"/api/blobs/{digest}")


# --------------------------------------------------------------------------- upstream timeout


def test_one_sweep_gives_up_on_late_flows_only_and_stops_when_none_wait():
    from keygate.stages.deadlines import check_interval as sweep_interval

    assert sweep_interval(300) == 0.5 and sweep_interval(1) == 0.25
    config = make_config("[gateway]\nupstream_timeout_s = 0.4\n")
    router = Router(config, rng=random.Random(1))
    expired: list[tuple[str, float]] = []
    router._expire = lambda flow, timeout: expired.append((flow.id, timeout))

    async def main():
        loop = asyncio.get_running_loop()
        late = make_flow("POST", "/api/chat", key="alice", body={"model": "llama3.2:1b"})
        answered = make_flow("POST", "/api/chat", key="alice", body={"model": "llama3.2:1b"})
        t0 = loop.time()
        with taddons.context():
            for f in (late, answered):
                run_request(f, Auth(config), Policy(config), router)
                assert state_of(f).admitted, f.response
        assert set(router._waiting) == {late.id, answered.id}
        await asyncio.sleep(0.2)
        answered.response = http.Response.make(200, b"{}")
        router.responseheaders(answered)  # headers in time: no longer waiting
        while not expired and loop.time() - t0 < 3:
            await asyncio.sleep(0.02)
        waited = loop.time() - t0
        assert expired == [(late.id, 0.4)]
        # Given up on after its timeout, at most one sweep interval (0.1 s here) late.
        assert 0.4 <= waited < 0.4 + 0.1 + 0.15, waited
        assert router._waiting == {}
        await asyncio.sleep(0.25)
        assert router._sweeping is None  # nothing waits: no timer keeps running

    asyncio.run(main())


# --------------------------------------------------------------------------- failover

FAILOVER = (
    '[[channels]]\nname = "remote"\nkind = "openai"\nbase_url = "https://api.example/v1"\n'
    'priority = 2\napi_key_env = "REMOTE_KEY"\n'
    '[channels.model_map]\n"gpt-4o-mini" = "remote-mini"\n'
    '[[channels]]\nname = "gpu"\nbase_url = "http://10.0.0.5:11434"\npriority = 1\n'
    'stream_usage = false\n'
    '[channels.model_map]\n"gpt-4o-mini" = "qwen2.5:7b"\n'
    '[[channels]]\nname = "cpu"\nbase_url = "http://10.0.0.6:11434"\npriority = 1\n'
    '[[channels]]\nname = "higher"\nbase_url = "http://10.0.0.7:11434"\npriority = 9\n'
    'models = ["other"]\n'
)
FAILOVER_ENV = {"REMOTE_KEY": "sk-upstream-remote"}


def failover_route(path="/v1/chat/completions", body=None, rng=3):
    config = make_config(FAILOVER, environ=FAILOVER_ENV)
    router = Router(config, rng=random.Random(rng))
    body = body or {"model": "gpt-4o-mini", "messages": [], "stream": True}
    f = make_flow("POST", path + "?q=1", key="alice", body=body)
    with taddons.context():
        run_request(f, Auth(config), Policy(config), router)
    return router, f


def test_failover_rewrites_the_request_for_the_next_channel():
    router, f = failover_route()
    st = state_of(f)
    assert st.channel == "remote" and f.request.path == "/v1/chat/completions?q=1"
    assert f.request.headers["authorization"] == "Bearer sk-upstream-remote"
    assert request_json(f)["model"] == "remote-mini"
    assert request_json(f)["stream_options"] == {"include_usage": True} and st.strip_usage

    assert router.failover(f, "connection refused", sent=False) is True
    assert router.health.cooling("remote")
    assert st.failed_channels == ["remote"] and st.channel in ("gpu", "cpu")
    assert (f.request.host, f.request.port, f.request.scheme) == (
        {"gpu": "10.0.0.5", "cpu": "10.0.0.6"}[st.channel], 11434, "http")
    assert f.request.path == "/v1/chat/completions?q=1"
    assert "authorization" not in f.request.headers and not st.credential
    first = st.channel
    body = request_json(f)
    if first == "gpu":  # its model_map, and it asks for no stream usage
        assert body["model"] == "qwen2.5:7b" and "stream_options" not in body
        assert not st.strip_usage and st.upstream_model == "qwen2.5:7b"
    else:
        assert body["model"] == "gpt-4o-mini" and st.strip_usage
    assert body["messages"] == [] and body["stream"] is True

    # The other channel of the same priority; never "higher", which does not serve it.
    assert router.failover(f, "reset", sent=True) is True
    assert st.failed_channels == ["remote", first]
    assert st.channel == ({"gpu", "cpu"} - {first}).pop()
    assert router.failover(f, "reset", sent=True) is False  # none left
    assert st.failed_channels == ["remote", first]  # the line's channel: the last one tried
    assert all(router.health.cooling(n) for n in ("remote", "gpu", "cpu"))


def test_failover_keeps_the_client_stream_options():
    router, f = failover_route(body={"model": "gpt-4o-mini", "messages": [], "stream": True,
                                     "stream_options": {"include_usage": False, "x": 1}})
    assert request_json(f)["stream_options"] == {"include_usage": True, "x": 1}
    while state_of(f).channel != "gpu":
        assert router.failover(f, "refused", sent=False)
    # What keygate added is gone (include_usage false or absent: the same to a server).
    assert request_json(f)["stream_options"] == {"x": 1} and not state_of(f).strip_usage
    router, f = failover_route()  # the client sent none
    while state_of(f).channel != "gpu":
        assert router.failover(f, "refused", sent=False)
    assert "stream_options" not in request_json(f)


def test_failover_to_lower_priority_only():
    # "other" is served by every channel; "higher" is cooling, so "remote" serves first.
    config = make_config(FAILOVER, environ=FAILOVER_ENV)
    router = Router(config, rng=random.Random(1))
    router.health.failure("higher")
    f = make_flow("POST", "/v1/chat/completions", key="alice",
                  body={"model": "other", "messages": []})
    with taddons.context():
        run_request(f, Auth(config), Policy(config), router)
    assert state_of(f).channel == "remote"
    assert router.failover(f, "refused", sent=False) is True
    assert router.failover(f, "refused", sent=False) is True
    assert {state_of(f).channel, *state_of(f).failed_channels} == {"remote", "gpu", "cpu"}
    # Never back up to a higher priority, cooling or not.
    assert router.failover(f, "refused", sent=False) is False
    # One candidate: no failover.
    f = make_flow("POST", "/api/chat", key="alice", body={"model": "llama3.2"})
    config = make_config('[[channels]]\nname = "only"\nbase_url = "http://10.0.0.5:1"\n')
    router = Router(config)
    with taddons.context():
        run_request(f, Auth(config), Policy(config), router)
    assert state_of(f).channel == "only"
    assert router.failover(f, "refused", sent=False) is False
    assert router.health.cooling("only")


def test_failover_after_sending_only_what_changes_nothing():
    config = make_config(PAIR)
    router = Router(config, rng=random.Random(1))
    admin = make_flow("DELETE", "/api/delete", key="admin", body={"model": "m"})
    with taddons.context():
        run_request(admin, Auth(config), Policy(config), router)
    assert state_of(admin).admitted and state_of(admin).channel in ("a", "b")
    assert router.failover(admin, "reset", sent=True) is False  # it may have been deleted
    assert router.failover(admin, "refused", sent=False) is True  # it never arrived


def test_no_failover_without_channels_or_for_streamed_uploads():
    router, f = Router(make_config(), rng=random.Random(1)), None
    f = route("POST", "/api/chat", {"model": "m"}, router=router)
    assert state_of(f).admitted and state_of(f).channel is None
    assert router.failover(f, "refused", sent=False) is False
    digest = "sha256:" + "cd" * 32
    config = make_config(PAIR)
    router = Router(config)
    up = make_flow("POST", f"/api/blobs/{digest}", key="admin",
                   headers={"content-length": "100"})
    with taddons.context():
        for addon in (Auth(config), Policy(config), router):
            addon.requestheaders(up)
    assert up.request.stream and state_of(up).admitted
    # Its body went by as it came: it cannot go twice, not even when it never arrived.
    assert router.failover(up, "refused", sent=False) is False


def test_failover_from_a_body_sent_as_is():
    # The client's body went to the first channel untouched (no edit needed there): the
    # next channel still gets its own model name.
    config = make_config(
        '[[channels]]\nname = "a"\nbase_url = "http://a:1"\npriority = 1\n'
        '[[channels]]\nname = "b"\nbase_url = "http://b:1"\n'
        '[channels.model_map]\n"m" = "b-model"\n')
    router = Router(config, rng=random.Random(1))
    f = make_flow("POST", "/api/show", key="alice", body=b'  {"name": "m"}')
    with taddons.context():
        run_request(f, Auth(config), Policy(config), router)
    assert state_of(f).channel == "a" and f.request.content == b'  {"name": "m"}'
    assert router.failover(f, "reset", sent=True) is True
    assert request_json(f) == {"name": "b-model"} and state_of(f).upstream_model == "b-model"


def test_keygate_own_answer_leaves_the_channel_health_alone():
    router, f = failover_route()
    state_of(f).error = "rate_limit_exceeded"  # e.g. refused by the Limiter after routing
    f.response = http.Response.make(429)
    router.responseheaders(f)
    assert "remote" not in router.health.backoff and "remote" not in router.health.until


def test_connect_deadline_then_headers_deadline():
    from keygate.stages import routing

    config = make_config("[gateway]\nupstream_timeout_s = 0.6\n")
    router = Router(config, rng=random.Random(1))
    expired: list[tuple[str, float, bool]] = []
    router._expire = lambda flow, timeout, connecting=False: expired.append(
        (flow.id, timeout, connecting))
    old = routing.CONNECT_TIMEOUT
    routing.CONNECT_TIMEOUT = 0.2

    async def main():
        loop = asyncio.get_running_loop()
        never = make_flow("POST", "/api/chat", key="alice", body={"model": "m"})
        slow = make_flow("POST", "/api/chat", key="alice", body={"model": "m"})
        never.server_conn.state = slow.server_conn.state = 0  # not connected
        t0 = loop.time()
        with taddons.context():
            for f in (never, slow):
                run_request(f, Auth(config), Policy(config), router)
        slow.server_conn.timestamp_start = 1.0
        from mitmproxy.connection import ConnectionState
        slow.server_conn.state = ConnectionState.OPEN  # connected in time
        while len(expired) < 2 and loop.time() - t0 < 3:
            await asyncio.sleep(0.02)
        return loop.time() - t0

    try:
        took = asyncio.run(main())
    finally:
        routing.CONNECT_TIMEOUT = old
    ids = [e[0] for e in expired]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert expired[0][1:] == (0.2, True)  # never connected: given up at the connect limit
    assert expired[1][1:] == (0.6, False)  # connected: given up when no headers came
    assert 0.6 <= took < 1.2, took


def test_a_busy_answer_marks_the_request_for_another_channel():
    router, f = failover_route(body={"model": "gpt-4o-mini", "messages": []})
    f.response = http.Response.make(429, b'{"error": "busy"}')
    router.responseheaders(f)
    st = state_of(f)
    assert st.resend is True
    assert "remote" not in router.health.until  # failover counts it, if it happens
    # Once only: a request that already went elsewhere passes the next busy answer on.
    assert router.failover(f, "answered 429", sent=True) is True
    st.resend = False
    f.response = http.Response.make(503, b"{}")
    router.responseheaders(f)
    assert st.resend is False and router.health.cooling(st.channel)


@pytest.mark.parametrize("toml,method,path,body", [
    ('[[channels]]\nname = "only"\nbase_url = "http://a:1"\n', "POST", "/api/chat",
     {"model": "m"}),  # nowhere else to go
    (PAIR, "DELETE", "/api/delete", {"model": "m"}),  # model management
])
def test_a_busy_answer_passes_when_it_cannot_go_elsewhere(toml, method, path, body):
    config = make_config(toml)
    router = Router(config, rng=random.Random(1))
    f = make_flow(method, path, key="admin", body=body)
    with taddons.context():
        run_request(f, Auth(config), Policy(config), router)
    assert state_of(f).admitted
    f.response = http.Response.make(429, b"{}")
    router.responseheaders(f)
    assert state_of(f).resend is False
