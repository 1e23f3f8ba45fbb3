"""keygate/stages/catalog.py: what model lists show a key (docs/endpoints.md), here /api/ps: the
models an
Ollama server has loaded, with their digests and sizes, filtered like /api/tags."""

from __future__ import annotations

import copy

from keygate.stages.catalog import filter_running
from keygate_unit import make_config


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
