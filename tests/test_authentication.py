"""keygate/stages/auth.py: the client address, the presented key, and the Auth addon
(docs/endpoints.md#authentication)."""

from __future__ import annotations

import ipaddress
import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from helpers.unit import make_config, make_flow, secret_of
from keygate.request import state_of
from keygate.stages.auth import Auth, client_address, take_credentials

S = "sk-test-0123456789"


def headers(*pairs: tuple[str, str]) -> http.Headers:
    return http.Headers([(k.encode(), v.encode()) for k, v in pairs])


# --------------------------------------------------------------------------- the presented key


@pytest.mark.parametrize("pairs, key", [
    ([("authorization", f"Bearer {S}")], S),
    ([("Authorization", f"bearer {S}")], S),
    ([("AUTHORIZATION", f"BEARER {S}")], S),
    ([("authorization", f"BeArEr {S}")], S),
    ([("authorization", f"  Bearer {S}  ")], S),
    ([("authorization", f"Bearer   {S}")], S),
    ([("x-api-key", S)], S),
    ([("X-Api-Key", f" {S} ")], S),
    ([("authorization", f"Bearer {S}"), ("x-api-key", S)], S),  # both, equal
    ([("authorization", f"Bearer {S}"), ("x-api-key", S + "x")], None),  # both, different
    ([("x-api-key", S), ("authorization", "Bearer other-key-1")], None),
    ([("authorization", f"Bearer {S}"), ("authorization", f"Bearer {S}")], None),  # two headers
    ([("authorization", f"Bearer {S}"), ("Authorization", "Bearer other-key-1")], None),
    ([("x-api-key", S), ("x-api-key", S)], None),
    ([("authorization", f"Bearer {S}, Bearer other")], f"{S}, Bearer other"),  # one odd key
    ([("authorization", "Basic dXNlcjpwYXNz")], None),
    ([("authorization", f"Token {S}")], None),
    ([("authorization", S)], None),  # no scheme
    ([("authorization", "Bearer")], None),
    ([("authorization", "Bearer ")], None),
    ([("authorization", "Bearer    ")], None),
    ([("authorization", "")], None),
    ([("x-api-key", "")], None),
    ([("x-api-key", "   ")], None),
    ([("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", S)], None),  # one malformed
    ([("authorization", f"Bearer {S}"), ("x-api-key", "")], None),
    ([], None),
    ([("cookie", f"key={S}")], None),
    ([("api-key", S)], None),
])
def test_presented_key(pairs, key):
    assert take_credentials(headers(*pairs), None)[0] == key


# --------------------------------------------------------------------------- client_address

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize("peer, xff, trusted, expected", [
    # No trusted proxies: the TCP peer, whatever X-Forwarded-For says.
    ("198.51.100.7", [], (), "198.51.100.7"),
    ("198.51.100.7", ["203.0.113.9"], (), "198.51.100.7"),
    ("127.0.0.1", ["203.0.113.9"], (), "127.0.0.1"),
    # A peer that is not trusted cannot speak for anyone.
    ("198.51.100.7", ["203.0.113.9"], NETS, "198.51.100.7"),
    # A trusted peer: the right-most address that is not a trusted proxy.
    ("10.0.0.1", ["203.0.113.9"], NETS, "203.0.113.9"),
    ("10.0.0.1", ["1.1.1.1, 203.0.113.9"], NETS, "203.0.113.9"),  # left part is client-written
    ("10.0.0.1", ["1.1.1.1, 203.0.113.9, 10.0.0.2"], NETS, "203.0.113.9"),
    ("10.0.0.1", ["1.1.1.1,203.0.113.9,10.0.0.2,10.0.0.3"], NETS, "203.0.113.9"),
    ("10.0.0.1", ["1.1.1.1", "203.0.113.9, 10.0.0.2"], NETS, "203.0.113.9"),  # two headers
    ("10.0.0.1", ["203.0.113.9", "10.0.0.2"], NETS, "203.0.113.9"),
    ("::1", ["2001:db8::5"], NETS, "2001:db8::5"),
    # Everything trusted: the left-most trusted hop is the best we know.
    ("10.0.0.1", ["10.0.0.2, 10.0.0.3"], NETS, "10.0.0.2"),
    # A trusted peer without X-Forwarded-For is itself the client.
    ("10.0.0.1", [], NETS, "10.0.0.1"),
    ("10.0.0.1", [""], NETS, "10.0.0.1"),
    # Garbage in the chain: nothing left of it is believed.
    ("10.0.0.1", ["203.0.113.9, garbage"], NETS, "10.0.0.1"),
    ("10.0.0.1", ["garbage, 203.0.113.9"], NETS, "203.0.113.9"),
    ("10.0.0.1", ["203.0.113.9, garbage, 10.0.0.2"], NETS, "10.0.0.2"),
    # IPv4-mapped IPv6 peers and hops are their IPv4 address.
    ("::ffff:10.0.0.1", ["203.0.113.9"], NETS, "203.0.113.9"),
    ("::ffff:198.51.100.7", [], (), "198.51.100.7"),
    ("10.0.0.1", ["::ffff:203.0.113.9"], NETS, "203.0.113.9"),
    ("10.0.0.1", ["[2001:db8::5]"], NETS, "2001:db8::5"),
])
def test_client_address(peer, xff, trusted, expected):
    assert client_address(peer, xff, trusted) == expected


# --------------------------------------------------------------------------- the Auth addon


@pytest.fixture
def auth():
    return Auth(make_config())


def assert_no_credentials(f):
    assert "authorization" not in f.request.headers
    assert "x-api-key" not in f.request.headers


def assert_secret_nowhere(f, secret: str):
    assert secret not in repr(dict(f.metadata))
    if f.response is not None:
        assert secret.encode() not in (f.response.content or b"")
        assert secret not in repr(f.response.headers)


def test_valid_key(auth):
    f = make_flow("POST", "/api/chat?x=1", key="alice", body={"model": "m"})
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response is None
    assert state_of(f).key == "alice"
    assert state_of(f).client_ip == "127.0.0.1"
    assert state_of(f).path == "/api/chat"  # without the query
    assert_no_credentials(f)
    assert_secret_nowhere(f, secret_of("alice"))


@pytest.mark.parametrize("name", ["alice", "plain", "future", "admin"])
@pytest.mark.parametrize("style", ["bearer", "x-api-key", "both"])
def test_valid_keys_in_every_header_style(auth, name, style):
    secret = secret_of(name)
    hdrs = {"bearer": [("Authorization", f"Bearer {secret}")],
            "x-api-key": [("x-api-key", secret)],
            "both": [("Authorization", f"bearer {secret}"), ("X-API-Key", secret)]}[style]
    f = make_flow("POST", "/v1/messages", headers=hdrs, body={"model": "m"})
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response is None
    assert state_of(f).key == name
    assert_no_credentials(f)
    assert_secret_nowhere(f, secret)


@pytest.mark.parametrize("hdrs, status, code", [
    ([("authorization", "Bearer sk-unknown-key-000")], 401, "invalid_api_key"),
    ([("x-api-key", "sk-unknown-key-000")], 401, "invalid_api_key"),
    ([("authorization", f"Bearer {secret_of('disabled')}")], 401, "invalid_api_key"),
    ([("authorization", f"Bearer {secret_of('expired')}")], 401, "invalid_api_key"),
    ([("x-api-key", secret_of("expired"))], 401, "invalid_api_key"),
    ([], 401, "invalid_api_key"),
    ([("authorization", f"Basic {secret_of('alice')}")], 401, "invalid_api_key"),
    ([("authorization", f"Bearer {secret_of('alice')}"), ("x-api-key", secret_of("admin"))],
     401, "invalid_api_key"),
    ([("authorization", f"Bearer {secret_of('alice')}"),
      ("authorization", f"Bearer {secret_of('alice')}")], 401, "invalid_api_key"),
    ([("authorization", f"Bearer {secret_of('alice')}x")], 401, "invalid_api_key"),
])
def test_refused_keys(auth, hdrs, status, code):
    f = make_flow("POST", "/v1/chat/completions", headers=hdrs, body={"model": "m"})
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == status
    assert f.response.headers["x-keygate-error"] == code
    assert json.loads(f.response.content)["error"]["code"] == code  # /v1/*: OpenAI shape
    assert not state_of(f).key
    assert state_of(f).error == code
    assert_no_credentials(f)
    for _, value in hdrs:
        assert_secret_nowhere(f, value.split()[-1])


def test_ip_denied_key(auth):
    # A valid key used from the wrong place: 403, and the log still says whose key it was.
    f = make_flow("POST", "/api/chat", key="elsewhere", body={"model": "m"})
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == 403
    assert f.response.headers["x-keygate-error"] == "permission_denied"
    assert json.loads(f.response.content) == {
        "error": "This API key may not be used from 127.0.0.1."}
    assert state_of(f).key == "elsewhere"
    assert_no_credentials(f)
    assert_secret_nowhere(f, secret_of("elsewhere"))


@pytest.mark.parametrize("peer, ok", [
    ("203.0.113.5", True), ("::ffff:203.0.113.5", True), ("203.0.114.5", False), ("::1", False),
])
def test_allow_ips_uses_the_peer(auth, peer, ok):
    f = make_flow("POST", "/api/chat", key="elsewhere", body={"model": "m"}, peer=peer)
    with taddons.context(auth):
        auth.requestheaders(f)
    assert (f.response is None) is ok
    assert state_of(f).key == "elsewhere"


@pytest.mark.parametrize("peer, xff, client, ok", [
    ("10.0.0.1", "203.0.113.5", "203.0.113.5", True),  # trusted proxy, allowed client
    ("10.0.0.1", "203.0.113.5, 10.0.0.9", "203.0.113.5", True),
    ("10.0.0.1", "198.51.100.1", "198.51.100.1", False),
    # The right-most untrusted hop counts; what the client wrote further left does not.
    ("10.0.0.1", "203.0.113.5, 198.51.100.1", "198.51.100.1", False),
    ("10.0.0.1", "198.51.100.1, 203.0.113.5", "203.0.113.5", True),
    ("198.51.100.1", "203.0.113.5", "198.51.100.1", False),  # an untrusted peer claims nothing
])
def test_allow_ips_behind_trusted_proxies(peer, xff, client, ok):
    auth = Auth(make_config('[gateway]\ntrusted_proxies = ["10.0.0.0/8"]\n'))
    f = make_flow("POST", "/api/chat", key="elsewhere", body={"model": "m"}, peer=peer,
                  headers={"x-forwarded-for": xff})
    with taddons.context(auth):
        auth.requestheaders(f)
    assert state_of(f).client_ip == client
    assert (f.response is None) is ok


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/me"), ("GET", "/nope"), ("POST", "//api/pull"), ("GET", "/api/chat"),
])
def test_unknown_endpoints_without_a_key_are_401(auth, method, path):
    f = make_flow(method, path)
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == 401
    assert f.response.headers["x-keygate-error"] == "invalid_api_key"


def test_unknown_endpoint_with_a_valid_key_passes_on(auth):
    # The 404 is Policy's; Auth only establishes who is asking.
    f = make_flow("POST", "/api/me", key="alice")
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response is None
    assert state_of(f).key == "alice"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("hdrs", [[], [("authorization", "Bearer sk-unknown-key-000")],
                                  [("x-api-key", secret_of("alice"))]])
def test_root_needs_no_key_and_forwards_none(auth, method, hdrs):
    f = make_flow(method, "/", headers=hdrs)
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response is None
    assert not state_of(f).key
    assert_no_credentials(f)


def test_no_key_message_says_how(auth):
    f = make_flow("POST", "/api/chat", body={"model": "m"})
    with taddons.context(auth):
        auth.requestheaders(f)
    assert "Authorization: Bearer" in json.loads(f.response.content)["error"]


def test_refusal_shape_follows_the_api(auth):
    f = make_flow("POST", "/v1/messages", headers={"x-api-key": "sk-nope-nope-nope"})
    with taddons.context(auth):
        auth.requestheaders(f)
    doc = json.loads(f.response.content)
    assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error"


def test_head_refusal_has_no_body(auth):
    f = make_flow("HEAD", "/api/tags")
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == 401
    assert f.response.raw_content == b""


def test_already_answered_flows_are_left_alone(auth):
    f = make_flow("POST", "/api/chat", key="alice")
    f.response = http.Response.make(204)
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == 204
    assert not state_of(f).key


def test_killed_flows_are_left_alone(auth):
    f = make_flow("POST", "/api/chat", headers={"authorization": "Bearer sk-nope-nope"})
    f.kill()
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response is None
    assert not state_of(f).key


def test_key_from_a_reloaded_keyring(auth):
    # Auth reads config.state on every request: a swapped keyring takes effect at once.
    f = make_flow("POST", "/api/chat", key="alice")
    auth.config.state = make_config(keys={"bob": {}}).state
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == 401


@pytest.mark.parametrize("presented", ["alice", None])
def test_headers_bearing_any_key_are_not_forwarded(auth, presented):
    """Besides the credential headers, any header holding the presented key, and any
    header with a credential's name holding another valid key (alone, after a scheme, as a
    cookie or list item), is dropped; others stay."""
    other = secret_of("admin")
    hdrs = [("api-key", other), ("X-Goog-Api-Key", "whatever"), ("Proxy-Authorization", "x"),
            ("Cookie", f"a=1; session={other}"), ("X-Custom-Token", f"Token {other}"),
            ("X-Auth-List", f"one, {other}"), ("User-Agent", "OpenAI/Python 1.50.0"),
            ("X-Near-Key", other[:-1]), ("X-Trace", "0123456789abcdef")]
    if presented:
        hdrs += [("x-api-key", secret_of(presented)), ("X-Echo", f"k={secret_of(presented)}")]
    f = make_flow("GET", "/api/version", headers=hdrs)
    with taddons.context(auth):
        auth.requestheaders(f)
    kept = {k.lower() for k in f.request.headers}
    assert {"user-agent", "x-near-key", "x-trace"} <= kept
    assert not kept & {"api-key", "x-goog-api-key", "proxy-authorization", "cookie",
                       "x-custom-token", "x-auth-list", "x-api-key", "x-echo"}
    assert other not in repr(f.request.headers)
    assert state_of(f).key == presented


def test_client_headers_named_like_keygates_own_are_not_forwarded(auth):
    f = make_flow("POST", "/api/chat", key="alice", headers=[
        ("X-Keygate-Key", "admin"), ("x-keygate-request-id", "req_forged"),
        ("X-KEYGATE-ERROR", "none"), ("X-Keygated", "kept")])
    with taddons.context(auth):
        auth.requestheaders(f)
    assert [k.lower() for k in f.request.headers if k.lower().startswith("x-keygate")] == [
        "x-keygated"]


class CountingRing:
    """A key ring that counts the header values it is asked to search for keys."""

    def __init__(self, ring) -> None:
        self.ring, self.asked = ring, 0

    def holds_key(self, value: bytes) -> bool:
        self.asked += 1
        return self.ring.holds_key(value)


def test_only_credential_headers_are_searched_for_other_keys(auth):
    """A head full of short tokens costs no hashing: only the values of headers named
    like a credential are searched for keys; the rest only for the presented key."""
    ring = CountingRing(auth.config.state.keys)
    many = " ".join(f"tok{i:06d}" for i in range(20_000))
    bearer = f"Bearer {secret_of('alice')}".encode()
    hdrs = http.Headers([(b"X-Many-%d" % i, many.encode()) for i in range(4)]
                        + [(b"X-Session-Token", b"abc"), (b"Authorization", bearer)])
    secret, _ = take_credentials(hdrs, ring)
    assert secret == secret_of("alice")
    assert ring.asked == 1  # X-Session-Token alone
    assert len([k for k in hdrs if k.startswith("X-Many")]) == 4


@pytest.mark.parametrize("query, forwarded", [
    ("key={alice}", ""),
    ("a=1&key={alice}&b=2", "?a=1&b=2"),
    ("api_key=sk%2D{alice_rest}", ""),  # percent-encoded
    ("token=Bearer+{alice}", ""),  # form-encoded space
    ("other={admin}&x=%41", "?x=%41"),  # another valid key; the rest byte for byte
    ("q=llama&stream=1", "?q=llama&stream=1"),
])
def test_a_key_in_the_query_string_is_not_forwarded(auth, query, forwarded):
    alice, admin = secret_of("alice"), secret_of("admin")
    q = query.format(alice=alice, admin=admin, alice_rest=alice[3:])
    f = make_flow("GET", "/api/tags?" + q, key="alice")
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response is None
    assert f.request.path == "/api/tags" + forwarded
    assert alice not in f.request.path and admin not in f.request.path


def test_a_key_in_the_url_path_is_refused(auth):
    f = make_flow("GET", "/v1/models/" + secret_of("alice"), key="alice")
    with taddons.context(auth):
        auth.requestheaders(f)
    assert f.response.status_code == 400
    assert secret_of("alice").encode() not in f.response.content
