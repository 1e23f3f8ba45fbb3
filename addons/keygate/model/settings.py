"""gateway.toml, parsed into frozen values.

Parsing is pure: `parse_settings` takes the file's text and returns a `Settings` or raises
`ConfigError` naming the file, the line where it can, and what is wrong. Nothing here keeps
state; the `Config` addon decides when to read and swaps whole `Settings` objects.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

from keygate.model.prices import DEFAULT_CURRENCY, PriceList, parse_currency, parse_prices

CHECKOUT = Path(__file__).resolve().parents[3]  # addons/keygate/model/settings.py -> the checkout
DEFAULT_CONFIG = CHECKOUT / "config" / "gateway.toml"

KINDS = ("ollama", "openai")
MB = 1024 * 1024


class ConfigError(ValueError):
    """A configuration file that does not parse or validate. The message is for operators."""


def is_cloud_model(model: str) -> bool:
    """Names Ollama hands on to ollama.com instead of running locally. Ollama compares
    names without regard to case, so "x:CLOUD" is a cloud name too."""
    m = model.rstrip()[-6:].lower()  # (only the end matters: O(1) for any name)
    return m.endswith(":cloud") or m.endswith("-cloud")


# What a model name may not hold: C0 and C1 controls and DEL. Ollama would ignore or
# fold some of them, keygate's patterns would not, and they end up in logs and terminals.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


MAX_MODEL_NAME = 1024  # characters; Ollama's own parts come to under 600 (350 + 3 x 80)


def model_name_problem(model: str) -> str | None:
    """Why a requested model name is refused (400), or None: a length no model has (every
    check and cache after this one would work on it), surrounding white space (Ollama
    would strip it, so the name would be another one to keygate than to Ollama) and
    control characters."""
    if len(model) > MAX_MODEL_NAME:
        return f"is longer than {MAX_MODEL_NAME} characters"
    if model != model.strip():
        return "begins or ends with white space"
    if _CONTROL.search(model):
        return "holds a control character"
    return None


def with_default_tag(name: str) -> str | None:
    """"llama3.2" is Ollama's "llama3.2:latest": the name with its default tag, or None
    when the name already has a tag."""
    return None if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def cloud_allowed(model: str, channels: "tuple[Channel, ...]") -> bool:
    """docs/configuration.md: a cloud name only where a channel names it with a "cloud" pattern."""
    return not is_cloud_model(model) or any(c.serves(model) for c in channels)


@functools.lru_cache(maxsize=4096)
def match_any(patterns: tuple[str, ...], name: str) -> bool:
    """Whether a model name matches a glob; a name without a tag also matches as
    name:latest, so "llama3.2:*" covers a request for "llama3.2". Cached: every request
    asks it for its key and for each channel, with the same few names."""
    tagged = with_default_tag(name)
    names = (name,) if tagged is None else (name, tagged)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


@functools.lru_cache(maxsize=4096)
def match_any_nocase(patterns: tuple[str, ...], name: str) -> bool:
    """match_any() as Ollama resolves names: without regard to case. For the rules that
    keep a name out (a key's models, the cloud rule), where another spelling of the same
    model must not slip past a pattern."""
    # (match_any's own cache left out: this one already holds the answer)
    return match_any.__wrapped__(tuple(p.lower() for p in patterns), name.lower())


@dataclass(frozen=True)
class Channel:
    """One upstream. `base_url` is split once here so routing only copies fields."""

    name: str
    kind: str
    base_url: str
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix without trailing slash ("" or "/v1" ...)
    models: tuple[str, ...] = ("*",)
    model_map: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    priority: int = 0
    weight: float = 1.0
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    stream_usage: bool = True

    def serves(self, model: str) -> bool:
        """Whether a request for `model` may be sent here (docs/configuration.md, cloud names
        included)."""
        if model in self.model_map:
            return True
        if is_cloud_model(model):
            return match_any_nocase(
                tuple(p for p in self.models if "cloud" in p.lower()), model)
        return match_any(self.models, model)

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)

    def upstream_path(self, path: str) -> str:
        """Path on this upstream for a client path such as /v1/chat/completions.

        An openai channel's base_url is what one gives the openai client, so it already
        ends in the API version: /v1/chat/completions goes to base_url + /chat/completions.
        """
        if self.kind == "openai" and path.startswith("/v1/"):
            return self.prefix + path[3:]
        return self.prefix + path


@dataclass(frozen=True)
class Settings:
    path: Path | None
    keys_file: Path
    usage_log: Path
    usage_log_max_bytes: int = 100 * MB
    usage_log_keep: int = 10
    max_body_bytes: int = 32 * MB
    max_header_bytes: int = 64 * 1024
    max_keep_alive: float = 3600.0
    upstream_timeout: float = 300.0
    client_header_timeout: float = 60.0
    client_body_timeout: float = 120.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    cors_origins: frozenset[str] = frozenset()
    instance: str = ""
    """This process's name in usage lines ([gateway] instance); see `instance_name`."""
    metrics: bool = True
    """GET /metrics answers, and requests are counted for it ([gateway] metrics)."""
    redis_url: str = field(default="", repr=False)
    """Shared counters ([gateway] redis_url, or the variable redis_url_env names): empty
    for this process alone (docs/shared-state.md). It may hold a password: never logged."""
    redis_failure: str = "closed"
    """What limits do while Redis is unreachable: "closed" (503) or "local"."""
    channels: tuple[Channel, ...] = ()
    prices: PriceList = field(default_factory=PriceList)
    """[[prices]] and [gateway] currency (docs/configuration.md#prices)."""


def instance_name(configured: str, environ: Mapping[str, str] = os.environ) -> str:
    """The `instance` of usage lines (docs/usage-log.md): [gateway] instance when set, else
    the host's name; with `keygate serve --workers N`, each worker's number is added
    ("gpu1/2"), from KEYGATE_WORKER that serve gives each process."""
    name = configured or socket.gethostname()
    worker = environ.get("KEYGATE_WORKER", "")
    return f"{name}/{worker}" if worker else name


def default_settings(path: Path = DEFAULT_CONFIG) -> Settings:
    """What a missing gateway.toml at `path` means: parse_settings' defaults."""
    return dataclasses.replace(parse_settings("", path), path=None)


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read gateway.toml; a missing file means all defaults (docs/configuration.md)."""
    p = Path(path).expanduser() if path else DEFAULT_CONFIG
    try:
        p = p.resolve()  # a symlink loop raises RuntimeError here, not OSError
    except RuntimeError as e:
        raise ConfigError(f"{p}: cannot read: {e}") from e
    try:
        if p.exists() and not p.is_file():
            # Reading a FIFO (or a device) would block the reload thread for good.
            raise ConfigError(f"{p}: cannot read: not a regular file")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return default_settings(p)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from e
    return parse_settings(text, p)


def parse_settings(text: str, path: Path, environ: Mapping[str, str] = os.environ) -> Settings:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # "Invalid value (at line 2, column 15)" -> "gateway.toml:2: Invalid value (column 15)"
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(e))
        if m:
            raise ConfigError(f"{path}:{m[2]}: {m[1]} (column {m[3]})") from e
        raise ConfigError(f"{path}: {e}") from e
    where = _Locator(text, path)

    unknown = set(doc) - {"gateway", "channels", "prices"}
    if unknown:
        raise where.error(f"unknown table {sorted(unknown)[0]!r}", sorted(unknown)[0])
    gw = doc.get("gateway", {})
    if not isinstance(gw, dict):
        raise where.error("[gateway] must be a table", "gateway")
    known = {
        "keys_file", "usage_log", "usage_log_max_mb", "usage_log_keep", "max_body_mb",
        "max_header_kb", "max_keep_alive_s",
        "upstream_timeout_s", "client_header_timeout_s", "client_body_timeout_s",
        "trusted_proxies", "cors_origins", "instance", "currency",
        "redis_url", "redis_url_env", "redis_failure",
        "metrics",
    }
    for k in gw:
        if k not in known:
            raise where.error(f"unknown setting [gateway] {k!r}", k)

    base = path.parent

    def file_setting(name: str, default: str) -> Path:
        v = gw.get(name, default)
        if not isinstance(v, str) or not v:
            raise where.error(f"{name} must be a non-empty string", name)
        try:
            return (base / Path(v).expanduser()).resolve()
        except RuntimeError as e:  # a symlink loop
            raise where.error(f"{name}: {e}", name) from e

    def number(name: str, default: float, minimum: float, integer: bool = False) -> float:
        v = gw.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < minimum:
            raise where.error(f"{name} must be a number >= {minimum}, not {v!r}", name)
        if integer and not isinstance(v, int):
            raise where.error(f"{name} must be a whole number, not {v!r}", name)
        return v

    def str_list(name: str) -> list[str]:
        v = gw.get(name, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise where.error(f"{name} must be a list of strings", name)
        return v

    proxies = []
    for cidr in str_list("trusted_proxies"):
        try:
            proxies.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            raise where.error(f"trusted_proxies: {e}", "trusted_proxies") from e

    origins = []
    for origin in str_list("cors_origins"):
        if origin == "*" or not re.fullmatch(r"https?://[^/\s]+", origin):
            raise where.error(
                f"cors_origins: {origin!r} is not an origin like https://app.example.com "
                "(no wildcard, no path)",
                "cors_origins",
            )
        origins.append(origin.lower())

    max_mb = number("usage_log_max_mb", 100, 0.001)
    instance = gw.get("instance", "")
    if not isinstance(instance, str) or not re.fullmatch(r"[A-Za-z0-9._:/-]{0,64}", instance):
        raise where.error("instance must be up to 64 letters, digits or . _ : / -, "
                          f"not {instance!r}", "instance")
    channels = _parse_channels(doc.get("channels", []), where, environ)
    metrics = gw.get("metrics", True)
    if not isinstance(metrics, bool):
        raise where.error(f"metrics must be true or false, not {metrics!r}", "metrics")
    try:
        currency = parse_currency(gw.get("currency", DEFAULT_CURRENCY))
    except ValueError as e:
        raise where.error(str(e), "currency") from None
    prices = PriceList(currency=currency)
    if "prices" in doc:
        # Read again with decimal floats: a price is exact (0.27 is not 0.27000000000000002).
        exact = tomllib.loads(text, parse_float=Decimal)["prices"]
        prices = parse_prices(exact, text, path, currency, tuple(c.name for c in channels))
    redis_url = _redis_url(gw, where, environ)
    redis_failure = gw.get("redis_failure", "closed")
    if redis_failure not in REDIS_FAILURE:
        raise where.error(f"redis_failure must be one of {', '.join(REDIS_FAILURE)}, not "
                          f"{redis_failure!r}", "redis_failure")
    usage_log = file_setting("usage_log", "../logs/usage.jsonl")
    if environ.get("KEYGATE_WORKER"):
        usage_log = instance_log(usage_log, instance_name(instance, environ))

    return Settings(
        path=path,
        keys_file=file_setting("keys_file", "keys.yaml"),
        usage_log=usage_log,
        usage_log_max_bytes=max(1, int(max_mb * MB)),
        usage_log_keep=int(number("usage_log_keep", 10, 0, integer=True)),
        max_body_bytes=int(number("max_body_mb", 32, 0.001) * MB),
        # A head needs its request line and a few headers: 1 KB at the least.
        max_header_bytes=int(number("max_header_kb", 64, 1) * 1024),
        max_keep_alive=float(number("max_keep_alive_s", 3600, 1)),
        upstream_timeout=float(number("upstream_timeout_s", 300, 0.001)),
        client_header_timeout=float(number("client_header_timeout_s", 60, 0.001)),
        client_body_timeout=float(number("client_body_timeout_s", 120, 0.001)),
        trusted_proxies=tuple(proxies),
        cors_origins=frozenset(origins),
        instance=instance,
        metrics=metrics,
        redis_url=redis_url,
        redis_failure=redis_failure,
        channels=channels,
        prices=prices,
    )


REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_FAILURE = ("closed", "local")


def redis_url_problem(url: str) -> str | None:
    """Why `url` is not a Redis URL keygate can use, or None. The message never repeats
    the URL: it may hold a password."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as e:
        return f"does not parse ({str(e).split(':')[0]})"
    if parts.scheme not in REDIS_SCHEMES:
        return "must start with redis://, rediss:// or unix://"
    if parts.scheme == "unix":
        return None if parts.path else "needs the socket's path (unix:///run/redis.sock)"
    if not parts.hostname:
        return "needs a host (redis://HOST:6379/0)"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"database must be a number, not {db[:20]!r}"
    return None


def _redis_url(gw: dict, where: "_Locator", environ: Mapping[str, str]) -> str:
    """[gateway] redis_url, or the URL in the variable redis_url_env names; "" for none."""
    url, env = gw.get("redis_url", ""), gw.get("redis_url_env")
    if not isinstance(url, str):
        raise where.error("redis_url must be a string", "redis_url")
    if env is not None:
        if not isinstance(env, str) or not env:
            raise where.error("redis_url_env must name an environment variable",
                              "redis_url_env")
        if url:
            raise where.error("set redis_url or redis_url_env, not both", "redis_url_env")
        url = environ.get(env, "")
        if not url:
            raise where.error(f"environment variable {env} (redis_url_env) is not set",
                              "redis_url_env")
    problem = redis_url_problem(url) if url else None
    if problem:
        name = "redis_url_env" if env is not None else "redis_url"
        raise where.error(f"{name}: the Redis URL {problem}", name)
    return url


def instance_log(usage_log: Path, instance: str) -> Path:
    """The usage log of one worker of `keygate serve --workers`: usage.jsonl ->
    usage-<instance>.jsonl in the same folder, the instance made safe for a file name
    ("gpu1/2" -> "gpu1-2"). `log_family` finds them all again."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", instance)
    return usage_log.with_name(f"{usage_log.stem}-{safe}{usage_log.suffix}")


def _parse_channels(raw: Any, where: "_Locator", environ: Mapping[str, str]) -> tuple[Channel, ...]:
    if not isinstance(raw, list):
        raise where.error("channels must be an array of tables: [[channels]]", "channels")
    seen: set[str] = set()
    out = []
    for i, ch in enumerate(raw):
        at = where.channel(i)
        if not isinstance(ch, dict):
            raise at(f"channel #{i + 1} must be a table")
        name = ch.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise at(f"channel #{i + 1}: name must be letters, digits, '.', '_' or '-', "
                     f"not {name!r}")
        label = f"channel {name!r}"
        if name in seen:
            raise at(f"{label}: duplicate channel name")
        seen.add(name)
        allowed = {
            "name", "kind", "base_url", "models", "model_map", "priority", "weight",
            "api_key_env", "stream_usage",
        }
        for k in ch:
            if k not in allowed:
                raise at(f"{label}: unknown setting {k!r}")
        kind = ch.get("kind", "ollama")
        if kind not in KINDS:
            raise at(f"{label}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        base_url = ch.get("base_url")
        if not isinstance(base_url, str):
            raise at(f"{label}: base_url is required")
        try:
            parts = urlsplit(base_url)
            port = parts.port
        except ValueError as e:
            raise at(f"{label}: base_url {base_url!r}: {e}") from e
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise at(f"{label}: base_url must be an http:// or https:// URL, not {base_url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise at(f"{label}: base_url must not carry a query, fragment or credentials")
        models = ch.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise at(f"{label}: models must be a list of glob patterns")
        mm = ch.get("model_map", {})
        if not isinstance(mm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in mm.items()
        ):
            raise at(f"{label}: model_map must map model names to model names")
        priority = ch.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise at(f"{label}: priority must be a whole number")
        weight = ch.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise at(f"{label}: weight must be a number > 0")
        stream_usage = ch.get("stream_usage", True)
        if not isinstance(stream_usage, bool):
            raise at(f"{label}: stream_usage must be true or false")
        env = ch.get("api_key_env")
        api_key = None
        if env is not None:
            if not isinstance(env, str) or not env:
                raise at(f"{label}: api_key_env must name an environment variable")
            api_key = environ.get(env)
            if not api_key:
                raise at(f"{label}: environment variable {env} (api_key_env) is not set")
        out.append(
            Channel(
                name=name,
                kind=kind,
                base_url=base_url,
                scheme=parts.scheme,
                host=parts.hostname,
                port=port or (443 if parts.scheme == "https" else 80),
                prefix=parts.path.rstrip("/"),
                models=tuple(models),
                model_map=MappingProxyType(dict(mm)),
                priority=priority,
                weight=float(weight),
                api_key_env=env,
                api_key=api_key,
                stream_usage=stream_usage,
            )
        )
    return tuple(out)


def _located(path: Path, index: int | None, msg: str) -> ConfigError:
    """An error at 0-based line `index` of `path` (or of the file as a whole)."""
    return ConfigError(f"{path}:{index + 1}: {msg}" if index is not None else f"{path}: {msg}")


class _Locator:
    """Finds the line a TOML setting sits on, for error messages (tomllib keeps no positions)."""

    def __init__(self, text: str, path: Path):
        self.lines = text.splitlines()
        self.path = path

    def _line_of(self, pattern: str, start: int = 0) -> int | None:
        rx = re.compile(pattern)
        for n in range(start, len(self.lines)):
            if rx.search(self.lines[n]):
                return n
        return None

    def error(self, msg: str, key: str | None = None) -> ConfigError:
        n = None
        if key:
            n = self._line_of(rf"^\s*(\[+\s*)?{re.escape(key)}\b")
        return _located(self.path, n, msg)

    def channel(self, index: int):
        seen, n = -1, None
        for i, line in enumerate(self.lines):
            if re.match(r"^\s*\[\[\s*channels\s*\]\]", line):
                seen += 1
                if seen == index:
                    n = i
                    break

        if n is None:  # channels = [...] written inline: point at that line
            n = self._line_of(r"^\s*channels\s*=")

        def make(msg: str) -> ConfigError:
            return _located(self.path, n, msg)

        return make
