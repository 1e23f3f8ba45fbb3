"""keygate/model/settings.py: gateway.toml parsed into frozen Settings and Channels
(docs/configuration.md)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest

from keygate.model.settings import (
    MB,
    Channel,
    ConfigError,
    is_cloud_model,
    load_settings,
    parse_settings,
)

PATH = Path("/tmp/x/gateway.toml")


def parse(text: str, environ: dict | None = None):
    return parse_settings(text, PATH, environ=environ or {})


def channel(text: str, environ: dict | None = None) -> Channel:
    (ch,) = parse(text, environ).channels
    return ch


def assert_error_at(text: str, lines: int | tuple[int, ...], match: str,
                    environ: dict | None = None) -> str:
    """The ConfigError names gateway.toml and one of `lines` as `path:line:`."""
    with pytest.raises(ConfigError, match=match) as info:
        parse(text, environ)
    msg = str(info.value)
    lines = (lines,) if isinstance(lines, int) else lines
    at = "|".join(str(n) for n in lines)
    assert re.match(rf"{re.escape(str(PATH))}:({at}): ", msg), msg
    return msg


# --------------------------------------------------------------------------- defaults


def test_empty_file_means_all_defaults():
    s = parse("")
    assert s.path == PATH
    assert s.keys_file == Path("/tmp/x/keys.yaml")
    assert s.usage_log == Path("/tmp/logs/usage.jsonl")
    assert s.usage_log_max_bytes == 100 * MB
    assert s.usage_log_keep == 10
    assert s.max_body_bytes == 32 * MB
    assert s.upstream_timeout == 300.0
    assert s.trusted_proxies == ()
    assert s.cors_origins == frozenset()
    assert s.channels == ()


def test_empty_gateway_table_means_defaults():
    assert parse("[gateway]\n") == parse("")


def test_settings_are_frozen():
    s = parse("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_body_bytes = 1  # type: ignore[misc]


def test_missing_file_means_defaults(tmp_path):
    s = load_settings(tmp_path / "nope" / "gateway.toml")
    assert s.keys_file == tmp_path / "nope" / "keys.yaml"
    assert s.usage_log == (tmp_path / "logs" / "usage.jsonl").resolve()
    assert s.channels == ()


def test_load_settings_reads_the_file(tmp_path):
    p = tmp_path / "gateway.toml"
    p.write_text('[gateway]\nkeys_file = "k/keys.yaml"\nmax_body_mb = 2\n')
    s = load_settings(p)
    assert s.path == p.resolve()
    assert s.keys_file == (tmp_path / "k" / "keys.yaml").resolve()
    assert s.max_body_bytes == 2 * MB


def test_every_gateway_setting():
    s = parse(
        "[gateway]\n"
        'keys_file = "secrets/keys.yaml"\n'
        'usage_log = "/var/log/keygate/usage.jsonl"\n'
        "usage_log_max_mb = 0.5\n"
        "usage_log_keep = 0\n"
        "max_body_mb = 1.5\n"
        "upstream_timeout_s = 12\n"
        'trusted_proxies = ["10.0.0.0/8", "::1", "192.168.1.7/24"]\n'
        'cors_origins = ["https://App.Example.com", "http://localhost:5173"]\n'
    )
    assert s.keys_file == Path("/tmp/x/secrets/keys.yaml")
    assert s.usage_log == Path("/var/log/keygate/usage.jsonl")
    assert s.usage_log_max_bytes == MB // 2
    assert s.usage_log_keep == 0
    assert s.max_body_bytes == int(1.5 * MB)
    assert s.upstream_timeout == 12.0
    assert s.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.0/24"),  # host bits are tolerated
    )
    assert s.cors_origins == frozenset({"https://app.example.com", "http://localhost:5173"})


def test_relative_paths_are_relative_to_the_config_folder():
    s = parse('[gateway]\nkeys_file = "../k.yaml"\nusage_log = "logs/u.jsonl"\n')
    assert s.keys_file == Path("/tmp/k.yaml")
    assert s.usage_log == Path("/tmp/x/logs/u.jsonl")


# --------------------------------------------------------------------------- errors


def test_toml_syntax_error_names_file_and_line():
    with pytest.raises(ConfigError) as info:
        parse("[gateway]\n\nmax_body_mb = = 3\n")
    msg = str(info.value)
    assert msg.startswith(str(PATH))
    assert re.search(r"gateway\.toml:3:|line 3\b", msg), msg


@pytest.mark.parametrize("text, line, match", [
    ("[gateway]\nmax_body_mb = 1\n\n[gatway]\n", 4, "unknown table 'gatway'"),
    ("# comment\ngateway = 3\n", 2, r"\[gateway\] must be a table"),
    ("[gateway]\nmax_body_mb = 1\nmax_bodymb = 2\n", 3, "unknown setting .*'max_bodymb'"),
    ('[gateway]\n\nkeys_file = ""\n', 3, "keys_file must be a non-empty string"),
    ("[gateway]\nusage_log = 5\n", 2, "usage_log must be a non-empty string"),
    ("[gateway]\n\n\nmax_body_mb = 0\n", 4, "max_body_mb must be a number"),
    ("[gateway]\nmax_body_mb = -1\n", 2, "max_body_mb must be a number"),
    ('[gateway]\nmax_body_mb = "32"\n', 2, "max_body_mb must be a number"),
    ("[gateway]\nmax_body_mb = true\n", 2, "max_body_mb must be a number"),
    ("[gateway]\nusage_log_max_mb = 0\n", 2, "usage_log_max_mb must be a number"),
    ("[gateway]\nusage_log_keep = -1\n", 2, "usage_log_keep must be a number"),
    ("[gateway]\nusage_log_keep = 2.5\n", 2, "usage_log_keep must be a whole number"),
    ("[gateway]\nupstream_timeout_s = 0\n", 2, "upstream_timeout_s must be a number"),
    ('[gateway]\ntrusted_proxies = "10.0.0.0/8"\n', 2, "trusted_proxies must be a list"),
    ('[gateway]\ntrusted_proxies = ["10.0.0.0/33"]\n', 2, "trusted_proxies: "),
    ('[gateway]\ntrusted_proxies = ["proxy.local"]\n', 2, "trusted_proxies: "),
    ("[gateway]\ncors_origins = [1]\n", 2, "cors_origins must be a list of strings"),
    ('[gateway]\ncors_origins = ["*"]\n', 2, "cors_origins: '\\*' is not an origin"),
    ('[gateway]\ncors_origins = ["https://a.example.com/"]\n', 2, "not an origin"),
    ('[gateway]\ncors_origins = ["https://a.example.com/app"]\n', 2, "not an origin"),
    ('[gateway]\ncors_origins = ["a.example.com"]\n', 2, "not an origin"),
    ("channels = 3\n", 1, "channels must be an array of tables"),
])
def test_gateway_errors_name_file_and_line(text, line, match):
    assert_error_at(text, line, match)


CH = '[[channels]]\nname = "{name}"\nbase_url = "http://127.0.0.1:11434"\n'


@pytest.mark.parametrize("setting, match", [
    ('kind = "vllm"', "channel 'b': kind must be one of ollama, openai, not 'vllm'"),
    ('bse_url = "http://x"', "channel 'b': unknown setting 'bse_url'"),
    ('models = "llama*"', "channel 'b': models must be a list of glob patterns"),
    ('models = [""]', "channel 'b': models must be a list of glob patterns"),
    ('model_map = {a = 1}', "channel 'b': model_map must map model names"),
    ('model_map = {a = ""}', "channel 'b': model_map must map model names"),
    ("priority = 1.5", "channel 'b': priority must be a whole number"),
    ("priority = true", "channel 'b': priority must be a whole number"),
    ("weight = 0", "channel 'b': weight must be a number > 0"),
    ("weight = -2", "channel 'b': weight must be a number > 0"),
    ('weight = "1"', "channel 'b': weight must be a number > 0"),
    ('stream_usage = "no"', "channel 'b': stream_usage must be true or false"),
    ('api_key_env = ""', "channel 'b': api_key_env must name an environment variable"),
    ("api_key_env = 5", "channel 'b': api_key_env must name an environment variable"),
])
def test_channel_setting_errors_name_the_channel_and_its_line(setting, match):
    # The second channel is the bad one: its [[channels]] header is line 5, the setting line 8.
    text = CH.format(name="a") + "\n" + CH.format(name="b") + setting + "\n"
    assert_error_at(text, (5, 8), match)


@pytest.mark.parametrize("body, match", [
    ('name = "a b"\nbase_url = "http://x"', "channel #2: name must be letters"),
    ('base_url = "http://x"', "channel #2: name must be letters"),
    ('name = "-x"\nbase_url = "http://x"', "channel #2: name must be letters"),
    ('name = "a"\nbase_url = "http://x"', "channel 'a': duplicate channel name"),
    ('name = "b"', "channel 'b': base_url is required"),
    ('name = "b"\nbase_url = 5', "channel 'b': base_url is required"),
    ('name = "b"\nbase_url = "ftp://x"', "base_url must be an http:// or https:// URL"),
    ('name = "b"\nbase_url = "127.0.0.1:11434"', "base_url must be an http:// or https:// URL"),
    ('name = "b"\nbase_url = "http://"', "base_url must be an http:// or https:// URL"),
    ('name = "b"\nbase_url = "http://x:99999"', "channel 'b': base_url 'http://x:99999': "),
    ('name = "b"\nbase_url = "http://x/v1?k=1"', "must not carry a query, fragment or credentials"),
    ('name = "b"\nbase_url = "http://x/v1#f"', "must not carry a query, fragment or credentials"),
    ('name = "b"\nbase_url = "http://u:p@x/v1"', "must not carry a query, fragment or credentials"),
])
def test_channel_identity_errors(body, match):
    text = CH.format(name="a") + "\n[[channels]]\n" + body + "\n"
    assert_error_at(text, (5, 6, 7), match)


@pytest.mark.parametrize("text, line, match", [
    ("channels = [1]\n", 1, r"channel #1 must be a table"),
    # Valid TOML for an array of tables: the error still needs its line.
    ('# channels\n\nchannels = [{ name = "a b", base_url = "http://x" }]\n[gateway]\n', 3,
     r"channel #1: name must be letters"),
])
def test_channels_written_inline(text, line, match):
    assert_error_at(text, line, match)


def test_api_key_env_missing_from_the_environment():
    text = CH.format(name="up") + 'api_key_env = "UP_KEY"\n'
    msg = assert_error_at(text, (1, 4), "environment variable UP_KEY \\(api_key_env\\) is not set")
    assert "channel 'up'" in msg
    # Set but empty is as good as missing.
    assert_error_at(text, (1, 4), "UP_KEY", environ={"UP_KEY": ""})


def test_api_key_env_read_from_the_environment_and_kept_out_of_repr():
    ch = channel(CH.format(name="up") + 'api_key_env = "UP_KEY"\n',
                 environ={"UP_KEY": "sk-upstream-secret"})
    assert ch.api_key_env == "UP_KEY"
    assert ch.api_key == "sk-upstream-secret"
    assert "sk-upstream-secret" not in repr(ch)
    assert "sk-upstream-secret" not in repr(parse(CH.format(name="up") + 'api_key_env = "UP_KEY"\n',
                                                  environ={"UP_KEY": "sk-upstream-secret"}))


# --------------------------------------------------------------------------- channels


def test_channel_defaults():
    ch = channel(CH.format(name="local"))
    assert ch.name == "local"
    assert ch.kind == "ollama"
    assert ch.models == ("*",)
    assert dict(ch.model_map) == {}
    assert ch.priority == 0
    assert ch.weight == 1.0
    assert ch.api_key_env is None and ch.api_key is None
    assert ch.stream_usage is True


def test_channel_all_settings():
    ch = channel(
        '[[channels]]\nname = "ds"\nkind = "openai"\nbase_url = "https://api.deepseek.com/v1"\n'
        'models = ["deepseek-*"]\npriority = -3\nweight = 2.5\nstream_usage = false\n'
        '[channels.model_map]\n"gpt-4o-mini" = "deepseek-chat"\n'
    )
    assert (ch.kind, ch.models, ch.priority, ch.weight, ch.stream_usage) == (
        "openai", ("deepseek-*",), -3, 2.5, False)
    assert dict(ch.model_map) == {"gpt-4o-mini": "deepseek-chat"}
    with pytest.raises(TypeError):
        ch.model_map["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("url, scheme, host, port, prefix", [
    ("http://127.0.0.1:11434", "http", "127.0.0.1", 11434, ""),
    ("http://127.0.0.1:11434/", "http", "127.0.0.1", 11434, ""),
    ("http://ollama.lan", "http", "ollama.lan", 80, ""),
    ("https://api.deepseek.com/v1", "https", "api.deepseek.com", 443, "/v1"),
    ("https://api.deepseek.com/v1/", "https", "api.deepseek.com", 443, "/v1"),
    ("https://GW.Example.com:8443/proxy/v1", "https", "gw.example.com", 8443, "/proxy/v1"),
    ("http://[::1]:8080/ollama/", "http", "::1", 8080, "/ollama"),
])
def test_channel_url_parsing(url, scheme, host, port, prefix):
    ch = channel(f'[[channels]]\nname = "c"\nbase_url = "{url}"\n')
    got = (ch.base_url, ch.scheme, ch.host, ch.port, ch.prefix)
    assert got == (url, scheme, host, port, prefix)


def make_channel(**kw) -> Channel:
    base = dict(name="c", kind="ollama", base_url="http://h", scheme="http", host="h", port=80,
                prefix="")
    return Channel(**{**base, **kw})


@pytest.mark.parametrize("models, model_map, model, served", [
    (("*",), {}, "llama3.2:1b", True),
    (("llama3.2:*",), {}, "llama3.2:1b", True),
    (("llama3.2:*",), {}, "llama3.1:8b", False),
    (("llama3.2:*",), {}, "llama3.2", True),  # untagged means :latest
    (("llama3.2:1b",), {}, "llama3.2", False),
    (("llama3.2:*",), {}, "LLAMA3.2:1b", False),  # case-sensitive
    (("qwen2.5:7b",), {}, "qwen2.5:7b", True),
    (("qwen2.5:7b",), {}, "qwen2.5:7b-instruct", False),
    ((), {"gpt-4o-mini": "qwen2.5:7b"}, "gpt-4o-mini", True),  # a model_map key is served
    (("llama*",), {"gpt-4o-mini": "qwen2.5:7b"}, "gpt-4o", False),
    # Cloud names: "*" does not cover them; a pattern that itself says "cloud" does.
    (("*",), {}, "gpt-oss:120b-cloud", False),
    (("*",), {}, "deepseek-v3.1:671b-cloud", False),
    (("*",), {}, "kimi:cloud", False),
    (("gpt-oss:*",), {}, "gpt-oss:120b-cloud", False),
    (("*-cloud",), {}, "gpt-oss:120b-cloud", True),
    (("gpt-oss:*cloud",), {}, "gpt-oss:120b-cloud", True),
    (("*cloud*",), {}, "kimi:cloud", True),
    (("*:cloud",), {}, "kimi:cloud", True),
    (("*:cloud",), {}, "gpt-oss:120b-cloud", False),
    (("*-cloud",), {}, "llama3.2:1b", False),
    (("*", "*-cloud"), {}, "llama3.2:1b", True),
    (("gpt-oss:120b-cloud",), {}, "gpt-oss:120b-cloud", True),
    (("*",), {}, "cloudy:7b", True),  # not a cloud name
])
def test_channel_serves(models, model_map, model, served):
    assert make_channel(models=models, model_map=model_map).serves(model) is served


@pytest.mark.parametrize("model, cloud", [
    ("x:cloud", True), ("x:7b-cloud", True), ("x-cloud", True),
    ("x:7b", False), ("cloud", False), ("x:cloudy", False), ("x-cloud:7b", False),
])
def test_is_cloud_model(model, cloud):
    assert is_cloud_model(model) is cloud


def test_upstream_model_uses_model_map():
    ch = make_channel(model_map={"gpt-4o-mini": "qwen2.5:7b"})
    assert ch.upstream_model("gpt-4o-mini") == "qwen2.5:7b"
    assert ch.upstream_model("llama3.2:1b") == "llama3.2:1b"


@pytest.mark.parametrize("kind, prefix, path, upstream", [
    # openai: base_url is what the openai client gets, so it already ends in the version.
    ("openai", "/v1", "/v1/chat/completions", "/v1/chat/completions"),
    ("openai", "/v1", "/v1/models", "/v1/models"),
    ("openai", "/v1", "/v1/models/x", "/v1/models/x"),
    ("openai", "", "/v1/chat/completions", "/chat/completions"),
    ("openai", "/proxy/openai/v1", "/v1/embeddings", "/proxy/openai/v1/embeddings"),
    ("openai", "/api/paas/v4", "/v1/chat/completions", "/api/paas/v4/chat/completions"),
    # ollama: base_url is the server root.
    ("ollama", "", "/api/chat", "/api/chat"),
    ("ollama", "", "/v1/chat/completions", "/v1/chat/completions"),
    ("ollama", "/ollama", "/api/chat", "/ollama/api/chat"),
    ("ollama", "/ollama", "/v1/messages", "/ollama/v1/messages"),
])
def test_upstream_path(kind, prefix, path, upstream):
    assert make_channel(kind=kind, prefix=prefix).upstream_path(path) == upstream


def test_upstream_path_from_parsed_base_url():
    ch = channel('[[channels]]\nname = "ds"\nkind = "openai"\n'
                 'base_url = "https://api.deepseek.com/v1/"\n')
    assert ch.upstream_path("/v1/chat/completions") == "/v1/chat/completions"
    ch = channel('[[channels]]\nname = "ds"\nkind = "openai"\nbase_url = "https://api.deepseek.com"\n')
    assert ch.upstream_path("/v1/chat/completions") == "/chat/completions"


def test_several_channels_keep_their_order():
    text = CH.format(name="a") + CH.format(name="b") + CH.format(name="c")
    assert [c.name for c in parse(text).channels] == ["a", "b", "c"]
