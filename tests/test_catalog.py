"""keygate/stages/catalog.py: what model lists show a key (docs/endpoints.md#model-lists):
/api/ps (the models an Ollama server has loaded, with their digests and sizes) filtered
like /api/tags, and with channels the `Catalog` stage answering /api/tags, /v1/models and
/v1/models/{model} itself from the channels' own lists."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import urllib.error

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from helpers.unit import make_config, make_flow, response_json, run_request, with_state
from keygate.stages.auth import Auth
from keygate.stages.catalog import Catalog, filter_running
from keygate.stages.policy import Policy
from keygate.stages.routing import Router


def ps_entry(name: str) -> dict:
    return {"name": name, "model": name, "size": 2_019_393_189, "digest": "a80c4f17acd5" + name,
            "details": {"family": "llama"}, "expires_at": "2026-11-26T22:47:26.123Z",
            "size_vram": 2_019_393_189, "context_length": 4096}


LOADED = {"models": [ps_entry(n) for n in (
    "llama3.2:latest", "qwen2.5:7b", "llama3.2:1b", "gpt-oss:120b-cloud")]}

CHANNELS = """
[[channels]]
name = "local"
kind = "ollama"
base_url = "http://127.0.0.1:11434"
models = ["llama3.2:*", "qwen2.5:*"]
[channels.model_map]
"gpt-4o-mini" = "qwen2.5:7b"
"claude-haiku" = "mistral:7b"

[[channels]]
name = "cloud"
kind = "ollama"
base_url = "http://127.0.0.1:11435"
models = ["*-cloud"]
"""

KEYS = {"alice": {}, "llama": {"models": ["llama3.2:*"]}, "alias": {"models": ["gpt-4o-mini"]},
        "nothing": {"models": ["mistral:*"]}}


def names(doc: dict) -> list[str]:
    return [m["name"] for m in doc["models"]]


def filtered(key: str | None, toml: str = "", channel: str | None = None) -> dict:
    config = make_config(toml, keys=KEYS)
    state = config.state
    ch = next((c for c in state.settings.channels if c.name == channel), None)
    doc = copy.deepcopy(LOADED)
    assert filter_running(doc, state.keys.by_name.get(key), ch, state.settings.channels)
    return doc


def test_without_channels_a_key_sees_the_loaded_models_it_may_use():
    assert names(filtered("llama")) == ["llama3.2:latest", "llama3.2:1b"]
    assert names(filtered("nothing")) == []
    # A cloud name needs a channel that names it (docs/configuration.md), like in /api/tags.
    assert names(filtered("alice")) == ["llama3.2:latest", "qwen2.5:7b", "llama3.2:1b"]
    assert filtered("llama")["models"][0] == ps_entry("llama3.2:latest")  # kept whole


def test_with_channels_what_the_answering_channel_serves_aliases_included():
    assert names(filtered("alice", CHANNELS, "local")) == [
        "llama3.2:latest", "qwen2.5:7b", "llama3.2:1b", "gpt-4o-mini"]
    assert names(filtered("llama", CHANNELS, "local")) == ["llama3.2:latest", "llama3.2:1b"]
    # An alias shows its loaded target under the name the key may use; one whose target
    # is not loaded ("claude-haiku") is not running.
    alias = filtered("alias", CHANNELS, "local")["models"]
    assert alias == [dict(ps_entry("qwen2.5:7b"), name="gpt-4o-mini", model="gpt-4o-mini")]
    assert names(filtered("alice", CHANNELS, "cloud")) == ["gpt-oss:120b-cloud"]


def test_no_key_sees_nothing_and_other_shapes_are_left_alone():
    assert filtered(None)["models"] == []
    config = make_config(keys=KEYS)
    for doc in ({"error": "not running"}, {"models": None}):
        before = copy.deepcopy(doc)
        assert not filter_running(doc, config.state.keys.by_name["alice"], None, ())
        assert doc == before


# --------------------------------------------------------------------------- Catalog
#
# Four channels: two Ollama servers at different priorities, an Ollama that serves only
# cloud names, and an OpenAI-compatible server with a credential. Each fake upstream answers
# its own list; the fetches are recorded, with their headers.

LIST_CHANNELS = """
[[channels]]
name = "local"
kind = "ollama"
base_url = "http://127.0.0.1:11434"
models = ["llama3.2:*", "qwen2.5:*"]
[channels.model_map]
"gpt-4o-mini" = "qwen2.5:7b"
"claude-haiku" = "mistral:7b"

[[channels]]
name = "gpu"
kind = "ollama"
base_url = "http://127.0.0.1:11436"
priority = 10

[[channels]]
name = "cloud"
kind = "ollama"
base_url = "http://127.0.0.1:11435"
models = ["*-cloud"]

[[channels]]
name = "vllm"
kind = "openai"
base_url = "http://127.0.0.1:8000/v1"
api_key_env = "VLLM_KEY"
models = ["Qwen/*"]
"""
LOCAL_URL = "http://127.0.0.1:11434/api/tags"
GPU_URL = "http://127.0.0.1:11436/api/tags"
CLOUD_URL = "http://127.0.0.1:11435/api/tags"
VLLM_URL = "http://127.0.0.1:8000/v1/models"  # an openai channel's base_url ends in /v1

LIST_KEYS = {"alice": {}, "llama": {"models": ["llama3.2:*"]},
             "alias": {"models": ["gpt-4o-mini"]}, "nothing": {"models": ["mistral:*"]},
             "qwen": {"models": ["QWEN*"]}, "adminonly": {"scopes": ["admin"]}}

MARCH = "2024-03-02T08:30:00Z"  # 1709368200


def tag(name: str, digest: str, modified: str = MARCH) -> dict:
    """An /api/tags entry as Ollama writes it."""
    return {"name": name, "model": name, "modified_at": modified, "size": 2_019_393_189,
            "digest": digest, "details": {"format": "gguf", "family": "llama"}}


def lists() -> dict[str, object]:
    return {
        LOCAL_URL: {"models": [
            tag("llama3.2:latest", "local-llama"),
            tag("qwen2.5:7b", "local-qwen", "2024-05-01T17:00:00.123456789Z"),  # Go's ns
            tag("mistral:7b", "local-mistral"),  # listed, not served here: only an alias's
            tag("gpt-oss:120b-cloud", "local-cloud")]},  # a cloud name local does not name
        GPU_URL: {"models": [
            tag("llama3.2:latest", "gpu-llama", "2024-06-15T00:00:00Z"),
            tag("phi3:mini", "gpu-phi", "2024-03-02T10:30:00+02:00"),  # 08:30 UTC
            tag("myteam/coder:7b", "gpu-coder"),
            tag("GPT-OSS:20B-CLOUD", "gpu-cloud")]},  # "*" does not cover cloud names
        CLOUD_URL: {"models": [
            tag("gpt-oss:120b-cloud", "cloud-gpt"),
            tag("llama3.2:1b", "cloud-llama")]},  # not a cloud name: not served here
        VLLM_URL: {"object": "list", "data": [
            {"id": "Qwen/Qwen2.5-7B", "object": "model", "created": 1700000000,
             "owned_by": "Qwen"},
            {"id": "Qwen/Qwen2.5-72B", "object": "model"},
            {"id": "meta/Llama-3-8B", "object": "model", "created": 1, "owned_by": "meta"}]},
    }


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Upstreams:
    """The channels' list endpoints, standing in for fetch_json: URL -> the document it
    answers, or an exception it raises. Records every fetch as (url, headers)."""

    def __init__(self, docs: dict[str, object], delay: float = 0.0) -> None:
        self.docs = docs
        self.delay = delay
        self.fetched: list[tuple[str, dict]] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, headers: dict[str, str]) -> object:
        with self._lock:
            self.fetched.append((url, dict(headers)))
        if self.delay:
            time.sleep(self.delay)
        doc = self.docs[url]
        if isinstance(doc, Exception):
            raise doc
        return copy.deepcopy(doc)

    def urls(self) -> list[str]:
        return sorted(url for url, _ in self.fetched)


def catalog_for(toml: str = LIST_CHANNELS, docs: dict | None = None, clock=None,
                delay: float = 0.0) -> tuple[Catalog, Upstreams]:
    config = make_config(toml, keys=LIST_KEYS, environ={"VLLM_KEY": "sk-vllm-upstream"})
    upstreams = Upstreams(lists() if docs is None else docs, delay)
    return Catalog(config, Router(config), fetch=upstreams, clock=clock or Clock()), upstreams


@pytest.fixture(autouse=True)
def tctx():
    """One mitmproxy context per test, made outside the event loops the tests run (its log
    handler stays installed for the test, and must not point at a loop already closed)."""
    with taddons.context() as tctx:
        yield tctx


async def answer(catalog: Catalog, f: http.HTTPFlow, policy: bool = True) -> http.HTTPFlow:
    """The request hooks up to the Catalog, as the pipeline calls them (Auth and Policy
    first unless `policy` is False), the Catalog's coroutine awaited as mitmproxy would."""
    if policy:
        run_request(f, Auth(catalog.config), Policy(catalog.config))
    pending = catalog.request(f)
    if pending is not None:
        await pending
    return f


def ask(catalog: Catalog, method: str, path: str, key: str | None = "alice",
        body: dict | None = None) -> http.HTTPFlow:
    return asyncio.run(answer(catalog, make_flow(method, path, key=key, body=body)))


def tags_of(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None and f.response.status_code == 200, f.response
    return [m["name"] for m in response_json(f)["models"]]


def ids_of(f: http.HTTPFlow) -> list[str]:
    assert f.response is not None and f.response.status_code == 200, f.response
    doc = response_json(f)
    assert doc["object"] == "list"
    return [m["id"] for m in doc["data"]]


def entry(f: http.HTTPFlow, name: str) -> dict:
    (m,) = [m for m in response_json(f)["models"] if m["name"] == name]
    return m


def test_tags_merges_the_ollama_channels_by_priority():
    catalog, upstreams = catalog_for()
    f = ask(catalog, "GET", "/api/tags")
    assert f.response.headers["content-type"] == "application/json; charset=utf-8"
    # gpu (priority 10) first, then the others in their order; each channel's list kept
    # to what it serves, its aliases after it, a name listed twice shown once.
    assert tags_of(f) == ["llama3.2:latest", "phi3:mini", "myteam/coder:7b",
                          "qwen2.5:7b", "gpt-4o-mini", "claude-haiku",
                          "gpt-oss:120b-cloud"]
    # Entries are the upstream's own, whole; of a name listed twice, the higher priority's.
    assert entry(f, "llama3.2:latest") == lists()[GPU_URL]["models"][0]
    assert entry(f, "qwen2.5:7b") == lists()[LOCAL_URL]["models"][1]
    assert entry(f, "gpt-oss:120b-cloud")["digest"] == "cloud-gpt"
    # Only ollama channels answer native requests: the openai channel is not even asked.
    assert upstreams.urls() == sorted([LOCAL_URL, GPU_URL, CLOUD_URL])
    assert all(headers == {} for _, headers in upstreams.fetched)  # no credential set


def test_v1_models_lists_every_channel_in_the_openai_format():
    catalog, upstreams = catalog_for()
    f = ask(catalog, "GET", "/v1/models")
    assert f.response.headers["content-type"] == "application/json; charset=utf-8"
    assert response_json(f) == {"object": "list", "data": [
        {"id": i, "object": "model", "created": c, "owned_by": o} for i, c, o in [
            ("llama3.2:latest", 1718409600, "library"),  # created: the entry's modified_at
            ("phi3:mini", 1709368200, "library"),  # the zone read
            ("myteam/coder:7b", 1709368200, "myteam"),  # owned by its namespace
            ("qwen2.5:7b", 1714582800, "library"),  # nanoseconds read
            ("gpt-4o-mini", 1714582800, "library"),  # an alias: its target's
            ("claude-haiku", 1709368200, "library"),
            ("gpt-oss:120b-cloud", 1709368200, "library"),
            ("Qwen/Qwen2.5-7B", 1700000000, "Qwen"),  # an openai upstream's own fields
            ("Qwen/Qwen2.5-72B", 0, "vllm"),  # without them: 0 and the channel's name
        ]]}
    assert upstreams.urls() == sorted([LOCAL_URL, GPU_URL, CLOUD_URL, VLLM_URL])
    # The channel's credential goes to its own list endpoint, and nowhere else.
    assert dict(upstreams.fetched)[VLLM_URL] == {"authorization": "Bearer sk-vllm-upstream"}
    assert all(h == {} for url, h in upstreams.fetched if url != VLLM_URL)


@pytest.mark.parametrize("key, tags, ids", [
    ("llama", ["llama3.2:latest"], ["llama3.2:latest"]),
    # the alias only, not its target, which the key may not use
    ("alias", ["gpt-4o-mini"], ["gpt-4o-mini"]),
    # mistral:7b is listed upstream, but no channel serves it under that name
    ("nothing", [], []),
    # patterns compared without regard to case, as Ollama compares names
    ("qwen", ["qwen2.5:7b"], ["qwen2.5:7b", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-72B"]),
])
def test_a_key_sees_only_the_models_it_may_use(key, tags, ids):
    catalog, _ = catalog_for()
    assert tags_of(ask(catalog, "GET", "/api/tags", key)) == tags
    assert ids_of(ask(catalog, "GET", "/v1/models", key)) == ids


def test_empty_lists_keep_their_shape():
    catalog, _ = catalog_for()
    assert response_json(ask(catalog, "GET", "/api/tags", "nothing")) == {"models": []}
    assert response_json(ask(catalog, "GET", "/v1/models", "nothing")) == {
        "object": "list", "data": []}


def test_cloud_names_only_from_a_channel_that_names_them():
    catalog, _ = catalog_for()
    f = ask(catalog, "GET", "/api/tags")
    # gpu serves "*" and lists GPT-OSS:20B-CLOUD; local lists gpt-oss:120b-cloud: neither
    # names cloud models, so the one cloud name shown is the cloud channel's own entry.
    assert [n for n in tags_of(f) if "cloud" in n.lower()] == ["gpt-oss:120b-cloud"]
    assert entry(f, "gpt-oss:120b-cloud")["digest"] == "cloud-gpt"
    # And the cloud channel shows only cloud names, although it lists llama3.2:1b.
    only_cloud = LIST_CHANNELS[LIST_CHANNELS.index('[[channels]]\nname = "cloud"'):
                               LIST_CHANNELS.index('[[channels]]\nname = "vllm"')]
    catalog, _ = catalog_for(only_cloud)
    assert tags_of(ask(catalog, "GET", "/api/tags")) == ["gpt-oss:120b-cloud"]
    # Without that channel there is no cloud name at all.
    without = LIST_CHANNELS.replace(only_cloud, "")
    catalog, _ = catalog_for(without)
    assert not [n for n in tags_of(ask(catalog, "GET", "/api/tags")) if "cloud" in n.lower()]


def test_aliases_show_their_targets_under_the_alias():
    catalog, _ = catalog_for()
    f = ask(catalog, "GET", "/api/tags")
    qwen, mistral = lists()[LOCAL_URL]["models"][1:3]
    assert entry(f, "gpt-4o-mini") == dict(qwen, name="gpt-4o-mini", model="gpt-4o-mini")
    # The target need not be served under its own name for the alias to be shown.
    assert entry(f, "claude-haiku") == dict(mistral, name="claude-haiku", model="claude-haiku")
    assert "mistral:7b" not in tags_of(f)


def test_aliases_of_a_bare_name_and_of_an_unlisted_target():
    toml = ('[[channels]]\nname = "small"\nbase_url = "http://127.0.0.1:11434"\n'
            'models = ["qwen2.5:*"]\n[channels.model_map]\n'
            '"tiny" = "qwen2.5"\n"ghost" = "nowhere:1b"\n')
    latest = tag("qwen2.5:latest", "qwen-latest")
    catalog, _ = catalog_for(toml, {LOCAL_URL: {"models": [latest]}})
    f = ask(catalog, "GET", "/api/tags")
    assert tags_of(f) == ["qwen2.5:latest", "tiny", "ghost"]
    assert entry(f, "tiny") == dict(latest, name="tiny", model="tiny")  # "qwen2.5" is :latest
    ghost = entry(f, "ghost")  # a well-formed entry that claims nothing about the model
    assert (ghost["model"], ghost["size"], ghost["digest"]) == ("ghost", 0, "")
    assert ghost["modified_at"] == "1970-01-01T00:00:00Z"
    assert response_json(ask(catalog, "GET", "/v1/models"))["data"][1:] == [
        {"id": "tiny", "object": "model", "created": 1709368200, "owned_by": "library"},
        {"id": "ghost", "object": "model", "created": 0, "owned_by": "small"}]


@pytest.mark.parametrize("model, found", [
    ("llama3.2:latest", {"created": 1718409600, "owned_by": "library"}),
    ("gpt-4o-mini", {"created": 1714582800, "owned_by": "library"}),
    ("Qwen%2FQwen2.5-7B", {"created": 1700000000, "owned_by": "Qwen"}),
    ("mistral:7b", None),  # listed upstream, not served
    ("GPT-OSS:20B-CLOUD", None),  # listed only where cloud names are not served
    ("nowhere:1b", None),
])
def test_one_model(model, found):
    catalog, _ = catalog_for()
    f = ask(catalog, "GET", f"/v1/models/{model}")
    if found is None:
        assert f.response.status_code == 404
        assert f.response.headers["x-keygate-error"] == "model_not_found"
        return
    assert f.response.status_code == 200
    name = model.replace("%2F", "/")
    assert response_json(f) == {"id": name, "object": "model", **found}


def test_one_model_the_key_may_not_use_does_not_exist():
    catalog, _ = catalog_for()
    assert ask(catalog, "GET", "/v1/models/llama3.2:latest", "llama").response.status_code == 200
    # Policy refuses this before the Catalog; the Catalog on its own refuses it too.
    f = with_state(make_flow("GET", "/v1/models/phi3:mini", key="llama"), key="llama")
    asyncio.run(answer(catalog, f, policy=False))
    assert f.response.status_code == 404
    assert f.response.headers["x-keygate-error"] == "model_not_found"
    assert b"phi3" in f.response.content and b"gpu" not in f.response.content


def test_head_of_tags_is_answered_without_a_body():
    catalog, upstreams = catalog_for()
    full = ask(catalog, "GET", "/api/tags").response
    head = ask(catalog, "HEAD", "/api/tags").response
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == full.headers["content-type"]
    assert upstreams.urls() == sorted([LOCAL_URL, GPU_URL, CLOUD_URL])  # the GET's lists


def test_head_of_tags_has_the_length_of_the_list():
    catalog, _ = catalog_for()
    full = ask(catalog, "GET", "/api/tags").response
    head = ask(catalog, "HEAD", "/api/tags").response
    assert head.headers["content-length"] == str(len(full.content))


def test_created_reads_a_go_timestamp_with_nanoseconds_and_a_zone():
    toml = '[[channels]]\nname = "local"\nbase_url = "http://127.0.0.1:11434"\n'
    late = tag("qwen2.5:7b", "q", "2024-05-01T10:00:00.123456789-07:00")  # 17:00 UTC
    catalog, _ = catalog_for(toml, {LOCAL_URL: {"models": [late]}})
    (model,) = response_json(ask(catalog, "GET", "/v1/models"))["data"]
    assert model["created"] == 1714582800


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/chat", {"model": "llama3.2:latest", "messages": []}),
    ("POST", "/v1/chat/completions", {"model": "llama3.2:latest", "messages": []}),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("POST", "/api/show", {"model": "llama3.2:latest"}),
])
def test_other_requests_go_upstream(method, path, body):
    catalog, upstreams = catalog_for()
    f = ask(catalog, method, path, body=body)
    assert f.response is None and upstreams.fetched == []


@pytest.mark.parametrize("path", ["/api/tags", "/v1/models", "/v1/models/llama3.2:latest"])
def test_without_channels_lists_go_to_the_reverse_target(path):
    catalog, upstreams = catalog_for("")
    f = ask(catalog, "GET", path)
    assert f.response is None and upstreams.fetched == []


@pytest.mark.parametrize("key, status", [(None, 401), ("adminonly", 403)])
def test_a_refused_request_keeps_its_refusal(key, status):
    catalog, upstreams = catalog_for()
    f = ask(catalog, "GET", "/v1/models", key)
    assert f.response.status_code == status
    assert b"llama3.2" not in f.response.content
    assert upstreams.fetched == []


def test_lists_are_reused_for_ten_seconds():
    clock = Clock()
    catalog, upstreams = catalog_for(clock=clock)
    ask(catalog, "GET", "/api/tags")
    ask(catalog, "GET", "/api/tags", "llama")
    ask(catalog, "GET", "/v1/models")  # the ollama lists are reused, only vllm's fetched
    assert upstreams.urls() == sorted([LOCAL_URL, GPU_URL, CLOUD_URL, VLLM_URL])
    upstreams.docs[GPU_URL]["models"].append(tag("gemma2:2b", "gpu-gemma"))
    clock.t += 9.9
    assert "gemma2:2b" not in tags_of(ask(catalog, "GET", "/api/tags"))
    assert len(upstreams.fetched) == 4
    clock.t += 0.2
    assert "gemma2:2b" in tags_of(ask(catalog, "GET", "/api/tags"))
    assert upstreams.urls() == sorted([LOCAL_URL, LOCAL_URL, GPU_URL, GPU_URL, CLOUD_URL,
                                       CLOUD_URL, VLLM_URL])


def test_requests_at_once_share_one_fetch_per_channel():
    catalog, upstreams = catalog_for(delay=0.05)

    async def main():
        return await asyncio.gather(*(
            answer(catalog, make_flow("GET", "/api/tags", key=key))
            for key in ("alice", "alice", "llama", "alias")))

    flows = asyncio.run(main())
    assert upstreams.urls() == sorted([LOCAL_URL, GPU_URL, CLOUD_URL])
    assert tags_of(flows[0]) == tags_of(flows[1]) and len(tags_of(flows[0])) == 7
    assert tags_of(flows[2]) == ["llama3.2:latest"] and tags_of(flows[3]) == ["gpt-4o-mini"]


def test_a_channel_moved_by_a_reload_is_asked_at_its_new_address():
    catalog, upstreams = catalog_for()
    ask(catalog, "GET", "/api/tags")
    moved = LIST_CHANNELS.replace("127.0.0.1:11436", "127.0.0.1:11437")
    upstreams.docs["http://127.0.0.1:11437/api/tags"] = {"models": [tag("moved:1b", "m")]}
    catalog.config.state = make_config(moved, keys=LIST_KEYS,
                                       environ={"VLLM_KEY": "sk-vllm-upstream"}).state
    names = tags_of(ask(catalog, "GET", "/api/tags"))  # well within the 10 s
    assert names[0] == "moved:1b" and "phi3:mini" not in names
    assert upstreams.fetched[-1][0] == "http://127.0.0.1:11437/api/tags"


def test_a_channel_that_cannot_list_lists_nothing_and_cools_down(caplog):
    docs = lists()
    docs[VLLM_URL] = urllib.error.URLError("[Errno 111] Connection refused")
    catalog, _ = catalog_for(docs=docs)
    with caplog.at_level(logging.WARNING, logger="keygate"):
        f = ask(catalog, "GET", "/v1/models")
    ids = ids_of(f)
    assert "llama3.2:latest" in ids and not [i for i in ids if i.startswith("Qwen/")]
    assert catalog.router.health.cooling("vllm")
    assert not any(catalog.router.health.cooling(c) for c in ("local", "gpu", "cloud"))
    assert [r.getMessage() for r in caplog.records if r.name == "keygate"] == [
        "keygate: channel vllm: cannot list models ([Errno 111] Connection refused)"]


def test_a_channel_that_fails_later_keeps_its_last_list():
    clock = Clock()
    catalog, upstreams = catalog_for(clock=clock)
    before = tags_of(ask(catalog, "GET", "/api/tags"))
    clock.t += 60
    upstreams.docs[GPU_URL] = TimeoutError("timed out")
    assert tags_of(ask(catalog, "GET", "/api/tags")) == before
    assert catalog.router.health.cooling("gpu")
    assert upstreams.urls().count(GPU_URL) == 2  # it was asked again


def test_lists_in_the_wrong_shape_list_nothing():
    docs = {
        LOCAL_URL: {"models": "none"},
        GPU_URL: [tag("phi3:mini", "x")],
        CLOUD_URL: {"models": [{"name": ""}, 5, {"digest": "x"}, {"model": "gpt-oss:20b-cloud"}]},
        VLLM_URL: {"data": [{"id": 3}, "junk", {"id": "Qwen/x", "created": "2024",
                                                 "owned_by": 7}]},
    }
    catalog, _ = catalog_for(docs=docs)
    # local's aliases stay, their targets unknown; cloud's one usable entry, as it came
    assert response_json(ask(catalog, "GET", "/api/tags"))["models"][2:] == [
        {"model": "gpt-oss:20b-cloud"}]
    assert response_json(ask(catalog, "GET", "/v1/models"))["data"] == [
        {"id": i, "object": "model", "created": 0, "owned_by": o} for i, o in [
            ("gpt-4o-mini", "local"), ("claude-haiku", "local"),
            ("gpt-oss:20b-cloud", "library"), ("Qwen/x", "vllm")]]
