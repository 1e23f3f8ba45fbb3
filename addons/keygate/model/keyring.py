"""keys.yaml, parsed into a `KeyRing`: an immutable digest -> `Key` lookup.

Keys are looked up by the sha256 digest of the presented string, so no code path compares
secrets one by one, and a `Key` holds only the digest: its repr, the log and the
request state see the key's name and nothing else.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from keygate.model.settings import ConfigError, match_any_nocase
from keygate.times import parse_when

SCOPES = ("inference", "models", "admin", "metrics")  # docs/endpoints.md#scopes
DEFAULT_SCOPES = frozenset({"inference", "models"})
LIMIT_NAMES = ("rpm", "tpm", "concurrent", "requests_per_day", "tokens_per_day", "tokens_total",
               "requests_per_month", "tokens_per_month",
               "budget_per_day", "budget_per_month", "budget_total")
# Quotas: counted by the ledger from the usage log (docs/limits.md#quotas); budgets in money.
QUOTA_NAMES = LIMIT_NAMES[3:]
MONEY_LIMITS = ("budget_per_day", "budget_per_month", "budget_total")
KEY_FIELDS = {
    "key", "key_sha256", "enabled", "expires_at", "models", "scopes", "allow_ips", "limits",
}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    requests_per_day: int | None = None
    tokens_per_day: int | None = None
    tokens_total: int | None = None
    requests_per_month: int | None = None
    tokens_per_month: int | None = None
    budget_per_day: Decimal | None = None  # money, in [gateway] currency
    budget_per_month: Decimal | None = None
    budget_total: Decimal | None = None

    def any(self) -> bool:
        # Every request of a key asks: spelled out, not a loop over LIMIT_NAMES (6x faster).
        return not (self.rpm is None and self.tpm is None and self.concurrent is None
                    and self.requests_per_day is None and self.tokens_per_day is None
                    and self.tokens_total is None and self.requests_per_month is None
                    and self.tokens_per_month is None and self.budget_per_day is None
                    and self.budget_per_month is None and self.budget_total is None)

    @functools.cached_property
    def quotas(self) -> tuple[str, ...]:
        """The names of the quotas set (QUOTA_NAMES' order): what needs the ledger."""
        return tuple(n for n in QUOTA_NAMES if getattr(self, n) is not None)


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes = field(repr=False)
    enabled: bool = True
    expires_at: dt.datetime | None = None
    models: tuple[str, ...] | None = None  # None: every model
    scopes: frozenset[str] = DEFAULT_SCOPES
    allow_ips: tuple[IPNetwork, ...] | None = None  # None: any address
    limits: Limits = Limits()

    def may_use(self, model: str) -> bool:
        """Whether the key's patterns cover `model`, compared as Ollama compares names
        (without regard to case): "LLAMA3.2" is the same model as "llama3.2"."""
        return self.models is None or match_any_nocase(self.models, model)

    def allows_ip(self, ip: str) -> bool:
        if self.allow_ips is None:
            return True
        addr = _address(ip)
        return addr is not None and any(addr in net for net in self.allow_ips)

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@functools.lru_cache(maxsize=4096)  # the same few client addresses ask again and again
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr


# Where a key may sit in a header value: alone, after a scheme, as a cookie value.
_TOKENS = re.compile(rb"[^\s,;=\"']{8,}")
_CLEAN_MAX, _CLEAN_LEN = 1024, 256
_MAX_TOKENS = 64


@dataclass(frozen=True)
class KeyRing:
    by_digest: dict[bytes, Key] = field(repr=False)
    by_name: dict[str, Key] = field(repr=False)
    # Short header values known to hold no key of this ring (see holds_key).
    _clean: set[bytes] = field(default_factory=set, repr=False, compare=False)

    def lookup(self, secret: str) -> Key | None:
        return self.by_digest.get(digest(secret))

    def lookup_raw(self, secret: bytes) -> Key | None:
        """lookup() of a key as the bytes on the wire (UTF-8, as digest() encodes)."""
        return self.by_digest.get(hashlib.sha256(secret).digest())

    def holds_key(self, value: bytes) -> bool:
        """Whether a header value holds a key of this ring as a token (keys are 8+
        characters). Every request asks it for each of its headers, and the same few
        values come again and again (host, content type, user agent): short values
        found to hold none are remembered, up to _CLEAN_MAX of them. A value that holds
        a key is never remembered, nor is anything of a reloaded ring kept. A value of more
        than _MAX_TOKENS tokens counts as holding one (the caller drops it): the client
        chooses how many there are, and each costs a hash."""
        if value in self._clean:
            return False
        tokens = _TOKENS.findall(value)
        if len(tokens) > _MAX_TOKENS or any(self.lookup_raw(t) for t in tokens):
            return True
        if len(value) <= _CLEAN_LEN:
            if len(self._clean) >= _CLEAN_MAX:
                self._clean.clear()
            self._clean.add(value)
        return False

    def __len__(self) -> int:
        return len(self.by_name)


EMPTY = KeyRing({}, {})


def load_keys(path: Path, cache: "EntryCache | None" = None) -> KeyRing:
    if path.exists() and not (path.is_file() or path.is_dir()):
        # Reading a FIFO (or a device) would block the reload thread for good.
        raise ConfigError(f"{path}: cannot read: not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    return parse_keys(text, path, cache)


class EntryCache:
    """Parsed entries of the last keys.yaml read, by their exact text.

    A reload of a 10,000-key file then parses only the entries that changed: the rest
    is a dictionary lookup. It holds only what the file itself holds (digests, never a
    presented secret), and only the entries of the latest read."""

    def __init__(self) -> None:
        self.entries: dict[str, Key] = {}


_HEADER = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n)*keys:[ \t]*(?:#[^\n]*)?\n")


def parse_keys(text: str, path: Path | str, cache: EntryCache | None = None) -> KeyRing:
    """keys.yaml's text -> KeyRing, or ConfigError naming file, line and problem."""
    if cache is not None:
        ring = _parse_by_entry(text, cache)
        if ring is not None:
            return ring
    doc = _yaml_load(text, path)
    ring = _build(doc, path)
    if cache is not None:
        cache.entries = {}  # the next read starts the per-entry cache afresh
    return ring


def _parse_by_entry(text: str, cache: EntryCache) -> KeyRing | None:
    """The common case, fast: `keys:` then entries in block style, each entry parsed on
    its own (or taken from the cache). None whenever the file is anything else or any
    entry has a problem: the whole-document parse then decides, and words the error."""
    head = _HEADER.match(text)
    if head is None:
        return None
    body = text[head.end():]
    first = re.search(r"^( +)[^ #\n]", body, re.M)
    if first is None:
        return None
    n = len(first.group(1))
    if re.search(rf"^ {{0,{n - 1}}}[^ #\n]", body, re.M):
        return None  # something at a shallower level: not just entries
    starts = [m.start() for m in re.finditer(rf"^ {{{n}}}(?=[^ #\n])", body, re.M)]
    fresh: dict[str, Key] = {}
    by_digest: dict[bytes, Key] = {}
    by_name: dict[str, Key] = {}
    for i, start in enumerate(starts):
        block = body[start:starts[i + 1] if i + 1 < len(starts) else len(body)]
        key = cache.entries.get(block)
        if key is None:
            key = _parse_entry(block, n)
            if key is None:
                return None
        if key.name in by_name or key.digest in by_digest:
            return None
        fresh[block] = key
        by_name[key.name] = key
        by_digest[key.digest] = key
    cache.entries = fresh
    return KeyRing(by_digest, by_name)


def _parse_entry(block: str, indent: int) -> Key | None:
    dedented = "\n".join(line[indent:] if line.startswith(" " * indent) else line.lstrip(" ")
                         for line in block.split("\n"))
    try:
        doc = yaml.load(dedented, Loader=_Loader)
    except (yaml.YAMLError, ValueError):
        return None
    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    ((name, spec),) = doc.items()
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None

    def fail(msg: str, *_: Any) -> ConfigError:
        return ConfigError(msg)

    try:
        return _parse_key(name, spec, fail)
    except ConfigError:
        return None


def _yaml_load(text: str, path: Path | str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: {e.problem or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from e
    except ValueError as e:
        # PyYAML's date constructor raises plain ValueError ("day is out of range for
        # month") without a position: find the date it choked on.
        raise ConfigError(f"{path}{_bad_date_line(text)}: {e}") from e


def _bad_date_line(text: str) -> str:
    for n, line in enumerate(text.splitlines(), start=1):
        for m in re.finditer(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b", line.split("#", 1)[0]):
            try:
                dt.date(*map(int, m.groups()))
            except ValueError:
                return f":{n}: {m.group()}"
    return ""


def _build(doc: Any, path: Path | str) -> KeyRing:
    def err(msg: str, m: Any = None, k: Any = None) -> ConfigError:
        line = getattr(m, "lines", {}).get(k) if m is not None else None
        return ConfigError(f"{path}:{line}: {msg}" if line and line > 0 else f"{path}: {msg}")

    if doc is None:
        return EMPTY
    # Besides `keys:`, only `x-...` entries are allowed: a place for YAML anchors that
    # entries merge in (`<<: *defaults`), as docker-compose files do.
    if not isinstance(doc, dict):
        raise err("the file must be a mapping with the entry 'keys:'")
    for k in doc:
        if k != "keys" and not (isinstance(k, str) and k.startswith("x-")):
            raise err(f"unknown entry {k!r}: the file holds 'keys:' (and optionally x-... "
                      "entries for YAML anchors)", doc, k)
    entries = doc.get("keys") or {}
    if not isinstance(entries, dict):
        raise err("'keys' must map key names to their settings", doc, "keys")

    by_digest: dict[bytes, Key] = {}
    by_name: dict[str, Key] = {}
    for name, spec in entries.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise err(f"key name {name!r}: use letters, digits, '.', '_', '@' or '-'",
                      entries, name)

        def key_err(msg: str, setting: Any = None, mapping: Any = None) -> ConfigError:
            if setting is None:
                return err(f"key {name!r}: {msg}", entries, name)
            return err(f"key {name!r}: {msg}", spec if mapping is None else mapping, setting)

        key = _parse_key(name, spec, key_err)
        other = by_digest.get(key.digest)
        if other is not None:
            raise err(f"key {name!r} has the same secret as key {other.name!r}", entries, name)
        by_digest[key.digest] = key
        by_name[name] = key
    return KeyRing(by_digest, by_name)


def _parse_key(name: str, spec: Any, err) -> Key:
    if not isinstance(spec, dict):
        raise err("settings must be a mapping")
    for k in spec:
        if k not in KEY_FIELDS:
            raise err(f"unknown setting {k!r}", k)

    if ("key" in spec) == ("key_sha256" in spec):
        raise err("give exactly one of key_sha256 or key")
    if "key" in spec:
        secret = spec["key"]
        if not isinstance(secret, str) or len(secret) < 8:
            raise err("key must be a string of at least 8 characters", "key")
        d = digest(secret)
    else:
        hexd = spec["key_sha256"]
        if not isinstance(hexd, str) or not HEX64_RE.fullmatch(hexd):
            raise err("key_sha256 must be 64 hex digits", "key_sha256")
        d = bytes.fromhex(hexd)

    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise err("enabled must be true or false", "enabled")

    expires_at = None
    if spec.get("expires_at") is not None:
        try:
            expires_at = parse_when(spec["expires_at"])
        except ValueError as e:
            raise err(f"expires_at: {e}", "expires_at") from None

    models = None
    if "models" in spec:
        models = spec["models"]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise err("models must be a list of model name patterns", "models")
        models = tuple(models)

    scopes = DEFAULT_SCOPES
    if "scopes" in spec:
        raw = spec["scopes"]
        if not isinstance(raw, list) or not all(s in SCOPES for s in raw):
            raise err(f"scopes must be a list drawn from {', '.join(SCOPES)}", "scopes")
        scopes = frozenset(raw)

    allow_ips = None
    if "allow_ips" in spec:
        raw = spec["allow_ips"]
        if not isinstance(raw, list):
            raise err("allow_ips must be a list of addresses or CIDRs", "allow_ips")
        nets = []
        for cidr in raw:
            try:
                nets.append(_network(str(cidr)))
            except ValueError as e:
                raise err(f"allow_ips: {e}", "allow_ips") from None
        allow_ips = tuple(nets)

    limits = Limits()
    if spec.get("limits") is not None:
        raw = spec["limits"]
        if not isinstance(raw, dict):
            raise err("limits must be a mapping", "limits")
        values = {}
        for k, v in raw.items():
            if k not in LIMIT_NAMES:
                raise err(f"unknown limit {k!r} (known: {', '.join(LIMIT_NAMES)})", k, raw)
            if v is None:
                continue
            if k in MONEY_LIMITS:
                amount = money_limit(v)
                if amount is None:
                    raise err(f"limit {k} must be a number >= 0 (money, in [gateway] "
                              f"currency), not {v!r}", k, raw)
                values[k] = amount
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise err(f"limit {k} must be a whole number >= 0, not {v!r}", k, raw)
            values[k] = v
        limits = Limits(**values)

    return Key(name, d, enabled, expires_at, models, scopes, allow_ips, limits)


_MONEY_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def money_limit(v: Any) -> Decimal | None:
    """A budget as YAML gives it (5, 0.5) as an exact Decimal (a float by its shortest
    digits, which are what was written), or None if it is not a finite number >= 0. Digits
    in a string count too: YAML reads 1e-6 (no dot) and "0.10" as text."""
    if isinstance(v, str) and _MONEY_TEXT.fullmatch(v.strip()):
        return Decimal(v.strip())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    d = Decimal(v) if isinstance(v, int) else Decimal(repr(v))
    return d if d.is_finite() and d >= 0 else None


@functools.lru_cache(maxsize=4096)
def _network(cidr: str) -> IPNetwork:
    """Parsed once per distinct string: thousands of keys share a few allow_ips values,
    and ipaddress parsing is most of what reading a key costs."""
    return _unmapped(ipaddress.ip_network(cidr, strict=False))


def _unmapped(net: IPNetwork) -> IPNetwork:
    """::ffff:203.0.113.0/120 is 203.0.113.0/24: client addresses are compared unmapped."""
    if net.version == 6 and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Lined(dict):
    """A dict that remembers the line of each of its keys (1-based), for error messages."""

    lines: dict


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Lined:
    explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    # flatten_mapping puts what `<<: *anchor` brings in first; the entry's own keys may
    # override those, but not each other.
    merged = len(node.value) - explicit
    out = Lined()
    out.lines = {}
    for i, (knode, vnode) in enumerate(node.value):
        k = loader.construct_object(knode, deep=True)
        try:
            hash(k)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable key", knode.start_mark) from None
        if k in out and i >= merged and out.lines.get(k, 0) >= 0:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate entry {k!r}", knode.start_mark)
        out[k] = loader.construct_object(vnode, deep=True)
        # Negative: came in through a merge, so the entry itself may still set it.
        out.lines[k] = knode.start_mark.line + 1 if i >= merged else -1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
