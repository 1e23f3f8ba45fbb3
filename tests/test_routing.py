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
