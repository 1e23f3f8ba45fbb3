"""keygate/model/keyring.py: keys.yaml parsed into a KeyRing looked up by sha256 digest
(docs/configuration.md, docs/endpoints.md#authentication)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import re

import pytest

from keygate.model.keyring import (
    DEFAULT_SCOPES,
    EMPTY,
    LIMIT_NAMES,
    ConfigError,
    Key,
    KeyRing,
    Limits,
    digest,
    load_keys,
    parse_keys,
    parse_when,
)

UTC = dt.timezone.utc
SECRET = "sk-alice-0123456789abcdefghijklmnopqrstuv"
SECRET_HEX = hashlib.sha256(SECRET.encode()).hexdigest()


def one(body: str) -> Key:
    """Parse a single key `k` whose settings are `body` (indented 4)."""
    ring = parse_keys(f"keys:\n  k:\n    key_sha256: {SECRET_HEX}\n{body}", "keys.yaml")
    return ring.by_name["k"]


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_keys(text, "keys.yaml")
    return str(info.value)


def assert_error_at(text: str, line: int, match: str) -> str:
    msg = error_of(text)
    assert re.match(rf"keys\.yaml:{line}: ", msg), msg
    assert re.search(match, msg), msg
    return msg


# --------------------------------------------------------------------------- the ring


def test_lookup_by_sha256_and_by_plaintext():
    ring = parse_keys(
        "keys:\n"
        f"  alice:\n    key_sha256: {SECRET_HEX}\n"
        "  bob:\n    key: sk-bob-plaintext-key\n",
        "keys.yaml",
    )
    assert len(ring) == 2
    assert ring.lookup(SECRET).name == "alice"
    assert ring.lookup("sk-bob-plaintext-key").name == "bob"
    assert ring.lookup("sk-bob-plaintext-ke") is None
    assert ring.lookup(SECRET + " ") is None
    assert ring.lookup("") is None
    assert ring.by_name["alice"].digest == hashlib.sha256(SECRET.encode()).digest()
    assert ring.by_name["bob"].digest == digest("sk-bob-plaintext-key")


def test_holds_key_finds_a_key_as_a_token_and_remembers_only_clean_values():
    ring = parse_keys(f"keys:\n  alice:\n    key_sha256: {SECRET_HEX}\n", "keys.yaml")
    key = SECRET.encode()
    for value in (key, b"Bearer " + key, b"a=1; session=" + key + b"; b=2", b'"' + key + b'"'):
        assert ring.holds_key(value), value
        assert ring.holds_key(value), value  # asked again: still found, never remembered
    for value in (b"127.0.0.1:3000", b"application/json", key[:-1], key + b"x"):
        assert not ring.holds_key(value), value
        assert not ring.holds_key(value), value
    assert ring._clean == {b"127.0.0.1:3000", b"application/json", key[:-1], key + b"x"}
    assert key not in ring._clean and b"Bearer " + key not in ring._clean

    # Long values are checked every time, and the memory is bounded.
    long_value = b"x" * 300
    assert not ring.holds_key(long_value) and long_value not in ring._clean
    for i in range(3000):
        ring.holds_key(b"value-%d" % i)
    assert 0 < len(ring._clean) <= 1024

    # A ring read again (a reload that adds the key) remembers nothing of the old one.
    before = parse_keys("keys:\n  bob:\n    key: sk-bob-plaintext-key\n", "keys.yaml")
    assert not before.holds_key(b"Bearer " + key)
    after = parse_keys(f"keys:\n  alice:\n    key_sha256: {SECRET_HEX}\n", "keys.yaml")
    assert after.holds_key(b"Bearer " + key)


def test_key_sha256_in_upper_case():
    ring = parse_keys(f"keys:\n  a:\n    key_sha256: {SECRET_HEX.upper()}\n", "keys.yaml")
    assert ring.lookup(SECRET).name == "a"


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "keys:\n", "keys: {}\n", "keys: null\n"])
def test_empty_files_give_an_empty_ring(text):
    ring = parse_keys(text, "keys.yaml")
    assert len(ring) == 0
    assert ring.lookup(SECRET) is None


def test_empty_ring_constant():
    assert isinstance(EMPTY, KeyRing) and len(EMPTY) == 0


def test_defaults():
    k = one("")
    assert k.name == "k"
    assert k.enabled is True
    assert k.expires_at is None
    assert k.models is None
    assert k.scopes == DEFAULT_SCOPES == frozenset({"inference", "models"})
    assert k.allow_ips is None
    assert k.limits == Limits()
    assert not k.limits.any()


def test_every_field():
    k = one(
        "    enabled: false\n"
        "    expires_at: 2027-01-01\n"
        '    models: ["llama3.2:*", "gpt-4o-mini"]\n'
        "    scopes: [inference, models, admin]\n"
        '    allow_ips: ["203.0.113.0/24", "::1"]\n'
        "    limits:\n"
        "      rpm: 60\n      tpm: 100000\n      concurrent: 4\n"
        "      requests_per_day: 5000\n      tokens_per_day: 1000000\n"
        "      tokens_total: 50000000\n"
    )
    assert k.enabled is False
    assert k.expires_at == dt.datetime(2027, 1, 1, tzinfo=UTC)
    assert k.models == ("llama3.2:*", "gpt-4o-mini")
    assert k.scopes == frozenset({"inference", "models", "admin"})
    assert k.allow_ips == (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("::1"))
    assert k.limits == Limits(rpm=60, tpm=100000, concurrent=4, requests_per_day=5000,
                              tokens_per_day=1000000, tokens_total=50000000)
    assert k.limits.any()


@pytest.mark.parametrize("name", LIMIT_NAMES)
def test_any_limit_alone_counts(name):
    # Limits.any() spells the fields out: a limit added to the class must be added there.
    assert [f.name for f in dataclasses.fields(Limits)] == list(LIMIT_NAMES)
    assert Limits(**{name: 1}).any()
    assert Limits(**{name: 0}).any()  # zero is a limit (nothing allowed), not "no limit"


def test_partial_limits_and_null_limits():
    k = one("    limits:\n      rpm: 0\n      tpm: null\n")
    assert k.limits == Limits(rpm=0)
    assert one("    limits: null\n").limits == Limits()


def test_empty_models_and_scopes_mean_nothing_allowed():
    k = one("    models: []\n    scopes: []\n")
    assert k.models == () and not k.may_use("llama3.2:1b")
    assert k.scopes == frozenset()


def test_keys_file_in_json_form():
    ring = parse_keys('{"keys": {"a": {"key": "sk-json-key-123", "models": ["x*"]}}}', "keys.yaml")
    assert ring.lookup("sk-json-key-123").models == ("x*",)


def test_load_keys_reads_a_file(tmp_path):
    p = tmp_path / "keys.yaml"
    p.write_text(f"keys:\n  a:\n    key_sha256: {SECRET_HEX}\n")
    assert load_keys(p).lookup(SECRET).name == "a"
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "missing.yaml"))):
        load_keys(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, line, match", [
    # YAML itself
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n  b: [\n", 5, "."),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n\n  a:\n    key: sk-bbbbbbbbbb\n", 5,
     "duplicate entry 'a'"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    models: [x]\n    models: [y]\n", 5,
     "duplicate entry 'models'"),
    # structure
    ("keys: [a, b]\n", 1, "'keys' must map key names to their settings"),
    ("# c\nkeys:\n  bad name:\n    key: sk-aaaaaaaaaa\n", 3, "key name 'bad name'"),
    ("keys:\n  -x:\n    key: sk-aaaaaaaaaa\n", 2, "key name '-x'"),
    ("keys:\n  123:\n    key: sk-aaaaaaaaaa\n", 2, "key name 123"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n  b: 5\n", 4, "key 'b': settings must be a mapping"),
    ("keys:\n  a:\n", 2, "key 'a': settings must be a mapping"),
    # the secret
    ("keys:\n  a:\n    enabled: true\n", 2, "key 'a': give exactly one of key_sha256 or key"),
    (f"keys:\n  a:\n    key: sk-aaaaaaaaaa\n    key_sha256: {SECRET_HEX}\n", 2,
     "give exactly one of key_sha256 or key"),
    ("keys:\n  a:\n    enabled: true\n    key: short\n", 4,
     "key 'a': key must be a string of at least 8 characters"),
    ("keys:\n  a:\n    key: 123456789\n", 3, "key must be a string"),
    ("keys:\n  a:\n\n    key_sha256: abc\n", 4, "key 'a': key_sha256 must be 64 hex digits"),
    (f"keys:\n  a:\n    key_sha256: {SECRET_HEX[:-1]}g\n", 3, "key_sha256 must be 64 hex digits"),
    # the other fields
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    modles: [x]\n", 4,
     "key 'a': unknown setting 'modles'"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    enabled: 'no'\n", 4,
     "enabled must be true or false"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    expires_at: soon\n", 4,
     "expires_at: 'soon' is not an ISO 8601 date or datetime"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    expires_at: 20270101\n", 4, "expires_at: "),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    models: llama3.2\n", 4,
     "models must be a list of model name patterns"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    models: ['']\n", 4, "models must be a list"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    scopes: [inference, root]\n", 4,
     "scopes must be a list drawn from inference, models, admin"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    scopes: admin\n", 4, "scopes must be a list"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    allow_ips: 10.0.0.0/8\n", 4,
     "allow_ips must be a list"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    allow_ips: [10.0.0.0/33]\n", 4, "allow_ips: "),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    allow_ips: [office]\n", 4, "allow_ips: "),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    limits: 60\n", 4, "limits must be a mapping"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    limits:\n      rpm: 1\n      rph: 5\n", 6,
     r"unknown limit 'rph' \(known: rpm, tpm, "),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    limits:\n      rpm: -1\n", 5,
     "limit rpm must be a whole number >= 0, not -1"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    limits:\n      tpm: 1.5\n", 5, "limit tpm must be"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    limits:\n      concurrent: true\n", 5,
     "limit concurrent must be"),
    ("keys:\n  a:\n    key: sk-aaaaaaaaaa\n    limits:\n      tokens_total: '5'\n", 5,
     "limit tokens_total must be"),
])
def test_errors_name_file_and_line(text, line, match):
    assert_error_at(text, line, match)


def test_unknown_top_level_entry_names_its_line():
    # A misspelt "keys:" is the likeliest mistake in the whole file.
    assert_error_at("# my keys\nkyes:\n  a:\n    key: sk-aaaaaaaaaa\n", 2, "keys")


def test_a_list_at_top_level_is_refused():
    assert "keys.yaml" in error_of("- a\n- b\n")


def test_duplicate_names_name_the_second_line():
    msg = assert_error_at(
        f"keys:\n  alice:\n    key_sha256: {SECRET_HEX}\n  bob:\n    key: sk-bob-1234567\n"
        "  alice:\n    key: sk-alice-2-1234567\n",
        6, "duplicate entry 'alice'")
    assert SECRET_HEX not in msg and "sk-alice-2-1234567" not in msg


@pytest.mark.parametrize("first, second", [
    (f"key_sha256: {SECRET_HEX}", f"key_sha256: {SECRET_HEX}"),
    (f"key_sha256: {SECRET_HEX}", f"key_sha256: {SECRET_HEX.upper()}"),
    (f"key: {SECRET}", f"key_sha256: {SECRET_HEX}"),
    (f"key_sha256: {SECRET_HEX}", f"key: {SECRET}"),
    (f"key: {SECRET}", f"key: {SECRET}"),
])
def test_duplicate_secrets_are_refused(first, second):
    msg = assert_error_at(
        f"keys:\n  alice:\n    {first}\n\n  bob:\n    {second}\n",
        5, "key 'bob' has the same secret as key 'alice'")
    assert SECRET not in msg and SECRET_HEX not in msg.lower()


def test_errors_never_echo_a_secret():
    texts = [
        f"keys:\n  a:\n    key: {SECRET}\n    key_sha256: {SECRET_HEX}\n",
        f"keys:\n  a:\n    key: {SECRET}\n    scopes: [root]\n",
        f"keys:\n  a:\n    key: {SECRET}\n    limits: {{rpm: -1}}\n",
        f"keys:\n  a:\n    key_sha256: {SECRET_HEX}\n    enabled: maybe\n",
        "keys:\n  a:\n    key: sk-short\n".replace("sk-short", "sk-sho"),
    ]
    for text in texts:
        msg = error_of(text)
        assert SECRET not in msg and SECRET_HEX not in msg and "sk-sho" not in msg, msg


# --------------------------------------------------------------------------- expires_at


@pytest.mark.parametrize("yaml_value, expected", [
    ("2027-01-01", dt.datetime(2027, 1, 1, tzinfo=UTC)),  # a YAML date: 00:00 UTC that day
    ("'2027-01-01'", dt.datetime(2027, 1, 1, tzinfo=UTC)),  # the same, as a string
    ("2027-01-01T12:30:00", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),  # no zone: UTC
    ("2027-01-01 12:30:00", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("'2027-01-01T12:30:00'", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("2027-01-01T12:30:00Z", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("'2027-01-01T12:30:00Z'", dt.datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
    ("2027-01-01T12:30:00+02:00", dt.datetime(2027, 1, 1, 10, 30, tzinfo=UTC)),
    ("'2027-01-01T12:30:00-05:00'", dt.datetime(2027, 1, 1, 17, 30, tzinfo=UTC)),
    ("null", None),
])
def test_expires_at(yaml_value, expected):
    k = one(f"    expires_at: {yaml_value}\n")
    assert k.expires_at == expected
    if expected is not None:
        assert k.expires_at.utcoffset() == dt.timedelta(0)


def test_expired_is_inclusive_of_the_moment():
    k = one("    expires_at: 2027-01-01\n")
    assert not k.expired(dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert k.expired(dt.datetime(2027, 1, 1, tzinfo=UTC))
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert not k.expired(dt.datetime(2027, 1, 1, 1, tzinfo=plus2))  # 23:00 UTC the day before
    assert k.expired(dt.datetime(2027, 1, 1, 2, tzinfo=plus2))  # 00:00 UTC
    assert not one("").expired(dt.datetime(9999, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize("value", ["", "tomorrow", "2027-13-01", 5, 1.5, True, ["2027-01-01"]])
def test_parse_when_refuses(value):
    with pytest.raises(ValueError):
        parse_when(value)


def test_parse_when_accepts_date_and_datetime_objects():
    assert parse_when(dt.date(2027, 3, 4)) == dt.datetime(2027, 3, 4, tzinfo=UTC)
    assert parse_when(dt.datetime(2027, 3, 4, 5)) == dt.datetime(2027, 3, 4, 5, tzinfo=UTC)
    tz = dt.timezone(dt.timedelta(hours=-3))
    assert parse_when(dt.datetime(2027, 3, 4, 5, tzinfo=tz)) == dt.datetime(2027, 3, 4, 8,
                                                                            tzinfo=UTC)


# --------------------------------------------------------------------------- allow_ips


@pytest.mark.parametrize("allow, ip, allowed", [
    (None, "198.51.100.1", True),
    (["203.0.113.0/24"], "203.0.113.5", True),
    (["203.0.113.0/24"], "203.0.114.5", False),
    (["203.0.113.7"], "203.0.113.7", True),
    (["203.0.113.7"], "203.0.113.8", False),
    (["203.0.113.9/24"], "203.0.113.200", True),  # host bits tolerated
    (["::1"], "::1", True),
    (["::1"], "127.0.0.1", False),
    (["2001:db8::/32"], "2001:db8:1::5", True),
    (["2001:db8::/32"], "2001:db9::5", False),
    # An IPv4 client reaching a dual-stack listener shows up as ::ffff:a.b.c.d.
    (["203.0.113.0/24"], "::ffff:203.0.113.5", True),
    (["203.0.113.0/24"], "::ffff:198.51.100.5", False),
    (["127.0.0.1"], "::ffff:127.0.0.1", True),
    # ... and an operator may write the mapped form: the same client address.
    (["::ffff:203.0.113.7"], "203.0.113.7", True),
    (["::ffff:203.0.113.0/120"], "203.0.113.99", True),
    (["203.0.113.0/24", "::1"], "::1", True),
    ([], "127.0.0.1", False),
    (["203.0.113.0/24"], "not-an-ip", False),
    (["203.0.113.0/24"], "", False),
])
def test_allows_ip(allow, ip, allowed):
    body = "" if allow is None else f"    allow_ips: {allow!r}\n".replace("'", '"')
    assert one(body).allows_ip(ip) is allowed


# --------------------------------------------------------------------------- may_use


@pytest.mark.parametrize("models, model, allowed", [
    (None, "anything:at-all", True),
    (["llama3.2:*"], "llama3.2:1b", True),
    (["llama3.2:*"], "llama3.2:latest", True),
    (["llama3.2:*"], "llama3.2", True),  # Ollama's "llama3.2" is "llama3.2:latest"
    (["llama3.2:latest"], "llama3.2", True),
    (["llama3.2:1b"], "llama3.2", False),
    (["llama3.2:*"], "llama3.1:8b", False),
    # Ollama resolves names without regard to case: so do the key's patterns
    (["llama3.2:*"], "LLAMA3.2:1b", True),
    (["LLAMA3.2:*"], "llama3.2:1b", True),
    (["llama3.2:*"], "Qwen2.5:7B", False),
    (["gpt-oss:20b"], "GPT-OSS:120B", False),
    (["llama3.2:?b"], "llama3.2:1b", True),
    (["llama3.2:?b"], "llama3.2:11b", False),
    (["qwen2.5:[37]b"], "qwen2.5:7b", True),
    (["qwen2.5:[37]b"], "qwen2.5:14b", False),
    (["gpt-4o-mini"], "gpt-4o-mini", True),
    (["gpt-4o-mini"], "gpt-4o", False),
    (["llama3.2:*", "gpt-4o-mini"], "gpt-4o-mini", True),
    (["*"], "gpt-oss:120b-cloud", True),  # the cloud rule is the channels', not the key's
    ([], "llama3.2:1b", False),
])
def test_may_use(models, model, allowed):
    body = "" if models is None else f"    models: {models!r}\n".replace("'", '"')
    assert one(body).may_use(model) is allowed


# --------------------------------------------------------------------------- secrecy


def test_repr_of_a_key_names_it_and_holds_no_secret():
    ring = parse_keys(
        f"keys:\n  alice:\n    key: {SECRET}\n  bob:\n    key_sha256: {'ab' * 32}\n", "keys.yaml")
    for key in ring.by_name.values():
        text = repr(key) + str(key)
        assert key.name in text
        assert SECRET not in text
        assert key.digest.hex() not in text.lower()
        assert repr(key.digest) not in text
        assert str(key.digest) not in text


def test_key_holds_only_the_digest():
    ring = parse_keys(f"keys:\n  alice:\n    key: {SECRET}\n", "keys.yaml")
    key = ring.by_name["alice"]
    values = [getattr(key, f) for f in key.__dataclass_fields__]
    assert SECRET not in repr(values)
    assert all(v != SECRET and v != SECRET.encode() for v in values)
    assert key.digest == hashlib.sha256(SECRET.encode()).digest()


def test_a_value_of_more_tokens_than_a_credential_holds_counts_as_holding_one():
    """The client chooses how many tokens a credential-named header holds; each would cost
    a hash. Past 64 the header is dropped without hashing them."""
    ring = parse_keys(f"keys:\n  alice:\n    key_sha256: {SECRET_HEX}\n", "keys.yaml")
    assert not ring.holds_key(b" ".join(b"token%04d" % i for i in range(64)))
    assert ring.holds_key(b" ".join(b"token%04d" % i for i in range(65)))
