"""End to end, hostile clients (issue #7): a real mitmdump running keygate in front of the
fake Ollama, fed generated garbage over raw sockets and HTTP/2.

Every exchange is checked the same way (`Exchange.check`):

- the upstream received only what this key may do: a (method, path) of the table for the
  scopes [inference, models] (no admin path: the key has no admin scope), in origin form,
  models only within its patterns, no client credential, no field Go's decoder would read
  as one keygate inspects, no unloading keep_alive, no _debug_render_only;
- every refusal keygate makes has the shape of docs/errors.md and x-keygate-error; a response
without
  x-keygate-request-id is mitmproxy's own error page, and only in the documented cases:
  400 for a request mitmproxy cannot parse (then either no flow was formed, and mitmproxy
  logged why for that very connection, or the line says 400 invalid_request), 413 over
  body_size_limit, 502 when the upstream broke;
- a request that became a flow left exactly one usage line, whose status is what the
  client got (499 when it got nothing);
- afterwards a normal request still works and mitmdump is still running.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conftest import Gateway, KeySpec, keys_yaml
from helpers.hostile import (
    ADMIN_ENDPOINTS,
    FORWARDABLE,
    INFERENCE_PATHS,
    INSPECTED,
    STATUS_OF,
    TABLE,
    Reply,
    Tracker,
    check_upstream_request,
    chunked,
    error_shape_ok,
    go_would_read_as,
    h2_request,
    http1,
    mitmproxy_rejected_head,
    model_allowed,
    rss_mb,
    send_raw,
)
from keygate.model.settings import model_name_problem

MODELS = ("llama3.2:*",)
USER = KeySpec("user", settings={"models": list(MODELS)})
USER2 = KeySpec("user2", settings={"models": list(MODELS), "scopes": ["inference"]})
KEYS = {"user": USER, "user2": USER2}
SECRETS = [USER.secret, USER2.secret]
MAX_BODY = int(0.25 * 1024 * 1024)  # max_body_mb = 0.25 below; body_size_limit is 1 MiB more

HYPO = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                   "stream": False}).encode()


@pytest.fixture(scope="module")
def hg(fake, tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("hostile"), fake.url, keys=KEYS,
                 gateway_toml="max_body_mb = 0.25\n").start()
    try:
        yield Exchange(gw, Tracker(gw, [fake]))
    finally:
        gw.stop()


def seen_path(target: bytes) -> str:
    """The path keygate sees for a request target (mitmproxy's split), query removed."""
    if not (target.startswith(b"/") or target == b"*") and b"://" in target:
        target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
    return target.decode("utf-8", "surrogateescape").split("?", 1)[0]


class Exchange:
    def __init__(self, gw: Gateway, tracker: Tracker) -> None:
        self.gw = gw
        self.t = tracker

    def check(self, data: bytes, method: bytes | str, target: bytes | str, *,
              timeout: float = 10.0, half_close: bool = False,
              h2: tuple | None = None) -> tuple[Reply, dict | None]:
        """Send one hostile request and check every invariant (module docstring).
        Returns the reply and its usage line (None when no flow was formed)."""
        method = method.decode("latin-1") if isinstance(method, bytes) else method
        target = target if isinstance(target, bytes) else target.encode("utf-8", "surrogateescape")
        self.t.mark()
        if h2 is not None:
            h2_method, h2_path, h2_headers, h2_body, *validate = h2
            r = h2_request(self.gw.port, h2_method, h2_path, h2_headers, h2_body,
                           timeout=timeout, validate=validate[0] if validate else True)
        else:
            r = send_raw(self.gw.port, data, timeout=timeout, half_close=half_close)
        health = self.t.health(USER.secret)
        lines = [x for x in self.t.since_mark() if x["id"] != health["id"]]

        for req in self.t.upstream_since_mark():
            check_upstream_request(req, SECRETS, MODELS)
        assert len(lines) <= 1, f"{len(lines)} usage lines for one request: {lines}"
        line = lines[0] if lines else None

        if r.request_id:
            assert line is not None and line["id"] == r.request_id, (r, lines)
            assert line["status"] == r.status, (line, r.status)
            if r.error_code:
                assert r.error_code in STATUS_OF and STATUS_OF[r.error_code] == r.status
                assert line["error"] == r.error_code
                error_shape_ok(seen_path(target), method, r.error_code, r.body)
            else:
                # Passed on from the upstream (or GET /): no keygate error, unless the
                # upstream's own stream carried one.
                assert line["error"] in (None, "upstream_error"), line
                if line["error"]:
                    assert b'"error"' in r.body
        elif r.from_edge:
            assert r.status in (400, 413, 502), r
            if line is not None:
                expected = {400: "invalid_request", 413: "request_too_large",
                            502: "upstream_error"}[r.status]
                assert (line["status"], line["error"]) == (r.status, expected), line
            else:
                assert r.status == 400, r
                assert mitmproxy_rejected_head(self.gw, r.local_port), (
                    "mitmproxy answered without a flow, and logged no reason: " + repr(r))
        elif r.status is None:
            # Nothing came back: mitmproxy dropped the connection (a broken body, the
            # client half-closed mid-body, an HTTP/2 protocol error).
            if line is not None:
                assert line["status"] == 499, line
            elif h2 is None:
                assert mitmproxy_rejected_head(self.gw, r.local_port), r
        else:
            raise AssertionError(f"a response without x-keygate-request-id: {r}")
        return r, line


def canonical_auth(secret: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {secret}")]


# -- 1. headers: Authorization in every shape ----------------------------------------------

SCHEMES = ["Bearer", "bearer", "BEARER", "BeArEr", "Basic", "Token", "", "Bearer:",
           "B\u0435arer", "Bearer,", "Bearer\x00"]
SEPARATORS = [" ", "  ", "\t", "", " \t ", "\x0b"]
CRED_NAMES = ["Authorization", "authorization", "AUTHORIZATION", "x-api-key", "X-API-KEY",
              "X-Api-Key", "Proxy-Authorization", "api-key", "Authorization ", "X-Api-Key\t"]


def token_strategy():
    u, u2 = USER.secret, USER2.secret
    fixed = [u, u, u2, u + " ", " " + u, u + "x", u[:-1], u.upper(), "sk-nope", u + "\x00",
             u + "," + u, u + " " + u, u + " " + u2, "A" * 100_000, u + "\u00e9", "\u00e9" + u,
             u.replace("-", "\u2010"), u + "\x7f"]
    return st.one_of(st.sampled_from(fixed), st.text(max_size=40))


@st.composite
def credential_headers(draw):
    out = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(CRED_NAMES))
        tok = draw(token_strategy())
        if "auth" in name.lower():
            value = draw(st.sampled_from(SCHEMES)) + draw(st.sampled_from(SEPARATORS)) + tok
        else:
            value = draw(st.sampled_from(["", " ", "\t"])) + tok
        out.append((name, value))
    return out


HEADER_TARGETS = [("GET", "/api/version", b""), ("POST", "/api/chat", CHAT),
                  ("GET", "/v1/models", b""), ("POST", "/api/pull", b'{"model": "x"}'),
                  ("POST", "/v1/messages", json.dumps({
                      "model": "llama3.2", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()),
                  ("GET", "/", b""), ("HEAD", "/api/tags", b"")]


def credential_tokens(headers: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """(header, the key it carries per docs/endpoints.md#authentication, or None) for every
    credential header a
    server sees by that name: Authorization: Bearer <key>, x-api-key: <key>."""
    out = []
    for name, value in headers:
        n = name.lower()
        v = value.strip()  # surrounding whitespace is not part of a key
        if n == "authorization":
            m = re.fullmatch(r"(?is)bearer +(.+)", v)
            out.append((n, m.group(1).strip() if m else None))
        elif n == "x-api-key":
            out.append((n, v or None))
    return out


@HYPO
@example(creds=[("api-key", USER2.secret), ("x-api-key", USER.secret)],
         where=HEADER_TARGETS[0], extra=[])
@given(creds=credential_headers(), where=st.sampled_from(HEADER_TARGETS),
       extra=st.sampled_from([[], [("X-Forwarded-For", "203.0.113.9")], [("Origin", "https://evil.example")],
                               [("Cookie", "session=" + "x" * 5000)]]))
def test_hostile_credential_headers(hg, creds, where, extra):
    method, path, body = where
    headers = creds + extra
    raw = [(k, v) for k, v in headers]
    assume(all("\r" not in k + v and "\n" not in k + v for k, v in raw))
    data = http1(method, path, raw, body)
    r, line = hg.check(data, method, path)
    names_ok = all(re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+", k) for k, _ in raw)
    tokens = credential_tokens(raw)
    if line is not None and line["key"] is not None:
        # Soundness: a key is accepted only when every credential header carries exactly it.
        secret = KEYS[line["key"]].secret
        assert tokens and all(tok == secret for _, tok in tokens), (raw, line)
        assert sum(n == "authorization" for n, _ in tokens) <= 1
        assert sum(n == "x-api-key" for n, _ in tokens) <= 1
    canonical = (names_ok and len(tokens) == 1 and len(creds) == 1 and path != "/" and (
        creds[0] == ("Authorization", f"Bearer {USER.secret}")
        or creds[0] == ("x-api-key", USER.secret) or creds[0] == ("X-API-KEY", USER.secret)))
    if canonical:
        assert line is not None and line["key"] == "user", (raw, r, line)
    # keygate's edge refuses a head over max_header_kb (64) with 431, and one with a control
    # character in a header line with 400, before any key is looked at.
    big = len(data) > 64 * 1024
    ctl = any(re.search(r"[\x00-\x08\x0a-\x1f\x7f]", k + v) for k, v in raw)
    if big:
        assert (r.status, r.error_code) == (431, "headers_too_large"), (raw, r)
    elif ctl:
        assert (r.status, r.error_code) == (400, "invalid_request"), (raw, r)
    elif names_ok and path != "/" and (line is None or line["key"] is None):
        assert r.status == 401 and r.error_code == "invalid_api_key", (raw, r)
    if line is not None and line["key"] is not None and (method, path) in ADMIN_ENDPOINTS:
        assert r.status == 403 and r.error_code == "permission_denied"


def test_several_authorization_headers_are_no_credential(hg):
    """Two Authorization headers, or Authorization and x-api-key that disagree: refused,
    even when one of them is valid (a request must not be one key here, another there)."""
    for creds in ([("Authorization", f"Bearer {USER.secret}")] * 2,
                  [("Authorization", f"Bearer {USER.secret}"), ("Authorization", "Bearer x")],
                  [("Authorization", f"Bearer {USER.secret}"), ("x-api-key", USER2.secret)],
                  [("x-api-key", USER.secret), ("x-api-key", USER.secret)]):
        r, line = hg.check(http1("GET", "/api/version", creds), "GET", "/api/version")
        assert r.status == 401 and line["key"] is None, creds
    r, line = hg.check(http1("GET", "/api/version", [("Authorization", f"Bearer {USER.secret}"),
                                                     ("x-api-key", USER.secret)]),
                       "GET", "/api/version")
    assert r.status == 200 and line["key"] == "user"


@pytest.mark.parametrize("whose", [USER, USER2], ids=["own", "another"])
@pytest.mark.parametrize("also", [("api-key", "{k}"), ("X-Goog-Api-Key", "{k}"),
                                  ("Cookie", "session={k}"), ("X-Custom-Auth", "Bearer {k}"),
                                  ("X-Custom-Token", "a, {k}; b")])
def test_key_copied_into_other_headers_is_not_forwarded(hg, fake, also, whose):
    """A client accepted by its x-api-key that also sends its key, or another valid key,
    elsewhere (api-key, as Azure-style clients do): no key reaches the upstream
    (docs/endpoints.md#authentication).
    Another key is looked for in headers named like a credential (hashing every token of
    every header would make a big head expensive); the presented key in any header."""
    n = len(fake.requests)
    extra = (also[0], also[1].format(k=whose.secret))
    r, line = hg.check(http1("GET", "/api/version", [("x-api-key", USER.secret), extra]),
                       "GET", "/api/version")
    assert r.status == 200 and line["key"] == "user"
    assert fake.requests[n].header(also[0]) is None  # (check() also scans every upstream byte)


# -- 2. request targets and methods --------------------------------------------------------

TARGET_SEEDS = sorted({p for _, p in TABLE} | {"/v1/models/llama3.2:latest",
                                               "/v1/models/qwen2.5:7b", "/api/me",
                                               "/api/experimental/web_search", "/api/status"})
METHODS = ["GET", "POST", "HEAD", "DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "get", "Post",
           "pOST", "delete", "FOO", "M-SEARCH", "CONNECT", "G\u00c9T", "POST\x00"]
INSERTS = ["/./", "/../", "//", "/%2e/", "/%2E%2E/", "/.%2e/", "%2F", "%2f", "%252F", "\\",
           ";x", ";", "%00", "\x00", "\x01", "\x7f", "\xff", "%", "%zz", "\u0101", "?x=/../pull",
           "#f", "%20", "%09", "/api/pull", "*", "@", ":"]
SUFFIXES = ["", "/", "/.", "/..", "?", "?/../api/pull", "#x", "%2F", "%00", "\x00", ";a=b",
            "?stream=true&model=qwen2.5:7b", "/" + "a" * 9000]
PREFIXES = ["", "", "", "/", "//", "/.", "http://evil.example", "http://127.0.0.1:1",
            "https://keygate.test", "HTTP://x", "http://x@y", "*", "%2F", "./", "../"]


@st.composite
def hostile_target(draw) -> bytes:
    path = draw(st.sampled_from(TARGET_SEEDS))
    chars = list(path)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["case", "encode", "insert", "drop"]))
        if not chars:
            break
        i = draw(st.integers(0, len(chars) - 1))
        if op == "case":
            chars[i] = chars[i].swapcase()
        elif op == "encode":
            chars[i] = "".join(draw(st.sampled_from(["%{:02X}", "%{:02x}", "%25{:02X}"])).format(
                b) for b in chars[i].encode("utf-8", "surrogateescape"))
        elif op == "insert":
            chars.insert(i, draw(st.sampled_from(INSERTS)))
        else:
            del chars[i]
    text = draw(st.sampled_from(PREFIXES)) + "".join(chars) + draw(st.sampled_from(SUFFIXES))
    if draw(st.integers(0, 9)) == 0:
        text += draw(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=8))
    return text.encode("utf-8", "surrogateescape")


def table_endpoint(method: bytes, path: str) -> str | None:
    """docs/endpoints.md, exact: 'root', 'forward', 'admin', or None (not in the table)."""
    try:
        m = method.decode("ascii")
    except UnicodeDecodeError:
        return None
    if (m, path) in {("GET", "/"), ("HEAD", "/")}:
        return "root"
    if (m, path) in FORWARDABLE:
        return "forward"
    if m == "GET" and path.startswith("/v1/models/"):
        seg = path[len("/v1/models/"):]
        if seg and not re.search(r"[/?#]", seg) and seg not in (".", ".."):
            return "forward"
    if (m, path) in ADMIN_ENDPOINTS or (m in ("HEAD", "POST") and re.fullmatch(
            r"/api/blobs/sha256[:-][0-9a-f]{64}", path)):
        return "admin"
    return None


@HYPO
@given(method=st.sampled_from(METHODS), target=hostile_target(),
       body=st.sampled_from([CHAT, b"", b'{"model": "qwen2.5:7b", "prompt": "x"}']))
def test_hostile_paths_and_methods(hg, method, target, body):
    m = method.encode("utf-8", "surrogateescape")
    assume(b"\r" not in target and b"\n" not in target)
    data = http1(m, target, canonical_auth(USER.secret), body)
    r, line = hg.check(data, m, target)
    parseable = (target.startswith(b"/") or target == b"*") and len(
        (m + b" " + target + b" HTTP/1.1").split()) == 3
    if not parseable:
        return  # mitmproxy's own 400 (checked above), or keygate for an absolute URL
    assert r.request_id or (m == b"CONNECT" and r.status == 400), (m, target, r)
    if m == b"CONNECT":
        return  # mitmproxy refuses CONNECT in reverse mode: 400, line invalid_request
    path = seen_path(target)
    ep = table_endpoint(m, path)
    if ep is None:
        assert (r.status, r.error_code) == (404, "unknown_endpoint"), (m, target, r)
    elif ep == "admin":
        assert (r.status, r.error_code) == (403, "permission_denied"), (m, target, r)
    elif ep == "root":
        assert r.status == 200 and line["key"] is None
    else:
        assert r.error_code not in ("unknown_endpoint",), (m, target, r)


KNOWN_PATH_SPELLINGS = [
    # (method, target, expected status): none of these may reach /api/pull or beyond
    ("POST", "//api/pull", 404), ("POST", "/api/../api/pull", 404), ("POST", "/API/pull", 404),
    ("POST", "/api%2Fpull", 404), ("POST", "/api/pull/", 404), ("POST", "/api/pull%00", 404),
    ("POST", "/api/pull\x00", 404), ("POST", "/api/chat/../pull", 404),
    ("POST", "/api/chat;/../pull", 404), ("POST", "/api/chat%2F..%2Fpull", 404),
    ("GET", "/v1/models/..%2F..%2Fapi%2Fps", 404),  # one segment: the model "../../api/ps"
    ("GET", "/v1/models/%2e%2e", 404), ("POST", "http://evil.example/api/pull", 403),
    ("POST", "http://evil.example/api/chat", 200), ("post", "/api/chat", 404),
    ("GET", "/api/tags\x01", 404), ("GET", "/api/tags\xff", 404),
    ("GET", "/" + "a" * 60_000, 404), ("CONNECT", "/api/chat", 400),
    ("GET", "/api/tags ", 200), ("GET", "/api/ tags", 400), ("GET", "api/tags", 400),
    ("GET", "/api/\ttags", 400), ("PRI", "*", 404),
]


@pytest.mark.parametrize("method,target,status", KNOWN_PATH_SPELLINGS,
                         ids=[f"{m} {t[:40]!r}" for m, t, _ in KNOWN_PATH_SPELLINGS])
def test_known_path_spellings(hg, method, target, status):
    t = target.encode("utf-8", "surrogateescape") if target != "/api/tags\xff" else b"/api/tags\xff"
    m = method.encode()
    r, line = hg.check(http1(m, t, canonical_auth(USER.secret), CHAT if method != "GET" else b""),
                       m, t)
    assert r.status == status, (r, r.body[:200])
    if status == 400:
        assert r.from_edge


def test_absolute_form_goes_upstream_in_origin_form(hg, fake):
    """mitmproxy keeps an absolute-form target (and Go's net/http would take the host from
    it): keygate sends the origin form it checked, and the reverse target, never the
    client's host, gets the connection."""
    n = len(fake.requests)
    r, line = hg.check(http1("POST", "http://evil.example:9/api/chat",
                             canonical_auth(USER.secret), CHAT), "POST", "/api/chat")
    assert r.status == 200
    sent = [x for x in fake.requests[n:] if x.path.startswith("/api/chat")]
    assert len(sent) == 1 and sent[0].path == "/api/chat"


# -- 3. bodies ---------------------------------------------------------------------------

def json_values(max_leaves=12):
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=12),
        lambda kids: st.lists(kids, max_size=4)
        | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=max_leaves)


FIELD_SPELLINGS = ["model", "MODEL", "Model", "mOdel", "name", "NAME", "stream", "STREAM",
                   "\u017ftream", "stream_options", "Stream_Options", "\u017ftream_options",
                   "keep_alive", "KEEP_ALIVE", "keep_al\u0131ve", "\u212aeep_alive",
                   "_debug_render_only", "_DEBUG_RENDER_ONLY", "_debug_render_onl\u0443",
                   "prompt", "messages", "input", "options", "format", "mod\u0435l"]
MODEL_VALUES = ["llama3.2", "llama3.2:latest", "llama3.2:1b", "qwen2.5:7b", "LLAMA3.2",
                "llama3.2 ", "llama3.2\x00", "llama3.2:*", "*", "", "gpt-oss:120b-cloud",
                "llama3.2/../qwen2.5:7b", "registry.ollama.ai/library/qwen2.5:7b"]


@st.composite
def hostile_json_object(draw) -> bytes:
    """A JSON object as text, built by hand so it can hold duplicate keys, odd spellings,
    numbers Python and Go read differently, and deep nesting."""
    parts = []
    if draw(st.booleans()):
        parts.append(("model", json.dumps(draw(st.one_of(
            st.sampled_from(MODEL_VALUES), json_values(4))))))
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(FIELD_SPELLINGS) | st.text(max_size=10))
        value = draw(st.one_of(
            st.sampled_from([json.dumps(v) for v in MODEL_VALUES]),
            st.sampled_from(["0", "-1", '"0s"', '"0"', '"-5m"', '"5m"', "true", "false", "null",
                             "1e999", "-1e999", "1" * 5000, "NaN", "Infinity", "-0", "0.0",
                             '{"include_usage": true}', '{"include_usage": "yes"}', '"yes"',
                             "[]", "{}", '"\\ud800"', '"\\u0000"']),
            json_values(8).map(json.dumps)))
        parts.append((key, value))
    depth = draw(st.sampled_from([0, 0, 0, 50, 900, 1100, 20_000]))
    if depth:
        parts.append(("deep", "[" * depth + "]" * depth))
    if draw(st.booleans()) and parts:
        parts.append(draw(st.sampled_from(parts)))  # a duplicate key, possibly reordered
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in parts) + "}"
    return text.encode("utf-8", "surrogatepass")


def hostile_body():
    return st.one_of(
        hostile_json_object(),
        hostile_json_object(),
        st.binary(max_size=300),
        json_values().map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"{", b"null", b"[]", b'"model"', b"\xef\xbb\xbf" + CHAT,
                         CHAT.decode().encode("utf-16"), CHAT[:-1], CHAT + b"x", CHAT + b"{}",
                         b" " * 10 + CHAT, CHAT.replace(b"llama3.2", b"llama3.2\\u0000"),
                         b'{"model": "llama3.2", "model": "qwen2.5:7b"}',
                         b'{"model": "qwen2.5:7b", "model": "llama3.2", "prompt": "x"}',
                         b'{"model": "llama3.2", "mod\\u0065l": "qwen2.5:7b"}',
                         b'{"model": "llama3.2", "keep_al\\u0131ve": 0}',
                         b'{"model": "llama3.2", "\\u017ftream": true}',
                         b'{"name": "qwen2.5:7b", "model": ""}',
                         b'{"model": "llama3.2", "x": "' + b"y" * (MAX_BODY + 10) + b'"}']))


@HYPO
@given(path=st.sampled_from(list(INFERENCE_PATHS) + ["/api/show"]), body=hostile_body(),
       framing=st.sampled_from(["length", "length", "chunked", "split", "short", "long"]),
       ctype=st.sampled_from(["application/json", None, "text/plain",
                              "application/json; charset=utf-16"]))
def test_hostile_bodies(hg, path, body, framing, ctype):
    headers = canonical_auth(USER.secret) + ([("Content-Type", ctype)] if ctype else [])
    half_close = False
    if framing == "split":
        cut = [0, len(body) // 3, len(body) // 2, len(body)]
        data = http1("POST", path, headers + [("Transfer-Encoding", "chunked")], b"",
                     framing="none") + chunked([body[a:b] for a, b in zip(cut, cut[1:])])
    elif framing == "short":  # Content-Length says less than is sent
        data = http1("POST", path, headers + [("Content-Length", str(len(body) // 2))], b"",
                     framing="none") + body
    elif framing == "long":  # Content-Length says more; the client then stops sending
        data = http1("POST", path, headers + [("Content-Length", str(len(body) + 7))], b"",
                     framing="none") + body
        half_close = True
    else:
        data = http1("POST", path, headers, body, framing=framing)
    r, line = hg.check(data, "POST", path, half_close=half_close)
    if framing == "long":
        # Nothing is sent before the body is in: the client gets nothing, the line says 499
        # with keygate's verdict (413 at headers time) or invalid_request.
        assert r.status is None and line["status"] == 499, (r, line)
        assert line["error"] in ("invalid_request", "request_too_large"), line
        return
    sent = body[:len(body) // 2] if framing == "short" else body
    if len(sent) > MAX_BODY:
        assert (r.status, r.error_code) == (413, "request_too_large"), r
        return
    try:
        doc = json.loads(sent)
    except (ValueError, RecursionError):
        doc = None
    if r.error_code:
        assert r.error_code in ("invalid_request", "permission_denied"), r
    if b"[" * 400 in sent and r.error_code == "invalid_request":
        return  # deeper than keygate's parser goes inside mitmdump: refused, fine
    if not isinstance(doc, dict):
        assert (r.status, r.error_code) == (400, "invalid_request"), (sent[:200], r)
        return
    model = doc.get("model")
    if path == "/api/show" and not model:
        model = doc.get("name")
    odd = any(go_would_read_as(k, name) for k in doc for name in INSPECTED)
    if not isinstance(model, str) or not model or odd or model_name_problem(model):
        assert (r.status, r.error_code) == (400, "invalid_request"), (sent[:200], r)
    elif not model_allowed(model, MODELS):
        assert (r.status, r.error_code) == (403, "permission_denied"), (sent[:200], r)
    else:
        # Completeness: a JSON object with an allowed model and plain field names goes on.
        assert r.error_code is None, (sent[:200], r)


def test_deeply_nested_body_is_a_bad_request_not_an_outage(hg):
    """Nested beyond Python's recursion limit (Go's decoder takes up to 10,000 levels):
    keygate's JSON parse raised RecursionError, its addon chain stopped, and the
    fail-closed guard answered 503 gateway_unavailable, logging that keygate was down."""
    body = b'{"model": "qwen2.5:7b", "keep_alive": 0, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    mark = len(hg.gw.lines)
    r, line = hg.check(http1("POST", "/api/generate", canonical_auth(USER.secret), body),
                       "POST", "/api/generate")
    assert (r.status, r.error_code) == (400, "invalid_request")
    assert not any("addons are not loaded" in x for x in hg.gw.lines[mark:])


@pytest.mark.parametrize("field", ["keep_al\u0131ve", "\u212aeep_alive", "\u017ftream",
                                   "\u017ftream_options", "MODEL", "Keep_Alive"])
def test_field_names_go_would_fold_are_refused(hg, field):
    """Ollama decodes with Go's encoding/json, which matches field names case-insensitively
    with Unicode folding: "keep_al\u0131ve" (dotless i) is keep_alive to Ollama, so a key
    without admin could unload the shared model past keygate's keep_alive rule."""
    body = json.dumps({"model": "llama3.2", "prompt": "x", "stream": False, field: 0},
                      ensure_ascii=False).encode()
    r, line = hg.check(http1("POST", "/api/generate", canonical_auth(USER.secret), body),
                       "POST", "/api/generate")
    assert (r.status, r.error_code) == (400, "invalid_request")


# -- chunked bodies and framing that mitmproxy refuses itself ----------------------------

FRAMING = [
    # (name, extra head lines, body bytes as sent, expected: "keygate" | status of mitmproxy)
    ("chunked-ok", [("Transfer-Encoding", "chunked")], chunked([CHAT[:5], CHAT[5:]]), 200),
    ("chunked-ext", [("Transfer-Encoding", "chunked")],
     b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT), 200),
    ("chunk-size-garbage", [("Transfer-Encoding", "chunked")], b"zz\r\n" + CHAT + b"\r\n0\r\n\r\n",
     None),
    ("chunk-size-negative", [("Transfer-Encoding", "chunked")], b"-5\r\nhello\r\n0\r\n\r\n", None),
    ("te-and-cl", [("Transfer-Encoding", "chunked"), ("Content-Length", str(len(CHAT)))],
     chunked([CHAT]), 400),
    ("two-cl", [("Content-Length", str(len(CHAT))), ("Content-Length", str(len(CHAT)))], CHAT, 400),
    ("cl-list", [("Content-Length", f"{len(CHAT)}, {len(CHAT)}")], CHAT, 400),
    ("cl-plus", [("Content-Length", f"+{len(CHAT)}")], CHAT, 400),
    ("cl-negative", [("Content-Length", "-1")], CHAT, 400),
    ("cl-hex", [("Content-Length", hex(len(CHAT)))], CHAT, 400),
    ("cl-huge", [("Content-Length", "9" * 30)], CHAT, 413),
    ("te-gzip", [("Transfer-Encoding", "gzip")], CHAT, 400),
    ("te-unknown", [("Transfer-Encoding", "x-custom")], CHAT, 400),
    ("te-twice", [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
     chunked([CHAT]), 400),
    ("te-chunked-identity", [("Transfer-Encoding", "chunked, identity")], chunked([CHAT]), 400),
    ("bad-header-name", [("Bad Header", "x"), ("Content-Length", str(len(CHAT)))], CHAT, 400),
    ("cl-short", [("Content-Length", str(len(CHAT) - 5))], CHAT, 400),  # keygate: not JSON
]


@pytest.mark.parametrize("name,head,raw_body,expected", FRAMING, ids=[f[0] for f in FRAMING])
def test_request_framing(hg, name, head, raw_body, expected):
    data = http1("POST", "/api/chat", canonical_auth(USER.secret) + head, b"",
                 framing="none") + raw_body
    r, line = hg.check(data, "POST", "/api/chat")
    if expected is None:
        # mitmproxy drops the connection without an answer; nothing was forwarded
        assert r.status is None
        assert (line["status"], line["error"]) == (499, "invalid_request")
    elif name in ("chunked-ok", "chunked-ext", "cl-short"):
        assert r.request_id and r.status == expected, r
    else:
        assert r.from_edge and r.status == expected, r
        assert line is not None and line["status"] == expected  # a flow, a line


def test_oversized_chunked_body_is_mitmproxys_413(hg):
    """A chunked body has no length to check at headers time: mitmproxy's body_size_limit
    (max_body_mb + 1 MiB) cuts it off with its own 413; the line says request_too_large.
    Between max_body_mb and that, keygate answers 413 itself once the body is in."""
    big = b'{"model": "llama3.2", "x": "' + b"y" * (MAX_BODY + 2 * 1024 * 1024) + b'"}'
    r, line = hg.check(http1("POST", "/api/chat", canonical_auth(USER.secret), big,
                             framing="chunked"), "POST", "/api/chat")
    assert r.from_edge and r.status == 413
    assert (line["status"], line["error"], line["key"]) == (413, "request_too_large", "user")
    mid = b'{"model": "llama3.2", "x": "' + b"y" * (MAX_BODY + 1000) + b'"}'
    r, line = hg.check(http1("POST", "/api/chat", canonical_auth(USER.secret), mid,
                             framing="chunked"), "POST", "/api/chat")
    assert (r.status, r.error_code) == (413, "request_too_large")
    # No key at all and a huge body: the client gets mitmproxy's 413, and so says the line.
    r, line = hg.check(http1("POST", "/api/chat", [], big), "POST", "/api/chat")
    assert r.status == 413 and (line["status"], line["error"]) == (413, "request_too_large")


def test_chunked_request_with_trailers_crashes_mitmproxys_connection(hg, fake):
    """mitmproxy 11 raises NotImplementedError on HTTP/1 request trailers ("mitmproxy has
    crashed!" with a traceback, for that connection only): the client gets no answer until
    it gives up, and nothing is forwarded. mitmproxy then calls no response or error hook
    for the flow: keygate writes its line when the client leaves (499, never forwarded),
    instead of keeping it "in flight" for ever (which held every graceful stop 8 s)."""
    data = http1("POST", "/api/chat", canonical_auth(USER.secret), b"", framing="none")
    data = data.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n", 1)
    data += b"%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (len(CHAT), CHAT)
    hg.t.mark()
    r = send_raw(hg.gw.port, data, timeout=2)
    assert r.status is None and r.timed_out
    lines = eventually_lines(hg.t, lambda x: x["status"] == 499)
    assert [(x["status"], x["error"], x["key"]) for x in lines] == [
        (499, "invalid_request", "user")]
    hg.t.health(USER.secret)
    assert hg.t.upstream_since_mark()[:-1] == []  # only the health request went up
    assert "HTTP trailers are not implemented yet" in hg.gw.output


def eventually_lines(t: Tracker, pred, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [x for x in t.since_mark() if pred(x)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# -- 4. HTTP/2 ---------------------------------------------------------------------------

H2_CASES = [
    # (method, path, headers, body, expected status, expected x-keygate-error)
    ("GET", "/api/version", [], b"", 401, "invalid_api_key"),
    ("GET", "/api/version", [("authorization", "Bearer sk-wrong-key")], b"", 401,
     "invalid_api_key"),
    ("GET", "/api/version", [("authorization", f"Bearer {USER.secret}")], b"", 200, None),
    ("POST", "/api/chat", [("authorization", f"Bearer {USER.secret}")], CHAT, 200, None),
    ("POST", "/api/chat", [("x-api-key", USER.secret)],
     CHAT.replace(b'"stream": false', b'"stream": true'), 200, None),
    ("POST", "/api/pull", [("authorization", f"Bearer {USER.secret}")], b'{"model":"x"}', 403,
     "permission_denied"),
    ("DELETE", "/api/delete", [("authorization", f"Bearer {USER.secret}")], b'{"model":"x"}', 403,
     "permission_denied"),
    ("POST", "/api/chat", [("authorization", f"Bearer {USER.secret}")],
     CHAT.replace(b"llama3.2", b"qwen2.5:7b"), 403, "permission_denied"),
    ("POST", "//api/pull", [("authorization", f"Bearer {USER.secret}")], b"{}", 404,
     "unknown_endpoint"),
    ("POST", "/api/../api/pull", [("authorization", f"Bearer {USER.secret}")], b"{}", 404,
     "unknown_endpoint"),
    ("post", "/api/chat", [("authorization", f"Bearer {USER.secret}")], CHAT, 404,
     "unknown_endpoint"),
    ("GET", "/api/me", [("authorization", f"Bearer {USER.secret}")], b"", 404, "unknown_endpoint"),
    ("GET", "/api/version", [("authorization", f"Bearer {USER.secret}"),
                             ("authorization", f"Bearer {USER.secret}")], b"", 401,
     "invalid_api_key"),
    ("GET", "/api/version", [("authorization", f"Bearer {USER.secret}"),
                             ("x-api-key", USER2.secret)], b"", 401, "invalid_api_key"),
    ("GET", "/v1/models/qwen2.5:7b", [("authorization", f"Bearer {USER.secret}")], b"", 404,
     "model_not_found"),
    ("POST", "/v1/chat/completions", [("authorization", f"Bearer {USER.secret}")], b"[1]", 400,
     "invalid_request"),
    ("POST", "/v1/messages", [], b"{}", 401, "invalid_api_key"),
]


@pytest.mark.parametrize("method,path,headers,body,status,code", H2_CASES,
                         ids=[f"{c[0]} {c[1]} {len(c[2])}h {c[4]}" for c in H2_CASES])
def test_http2_auth_and_endpoint_table(hg, method, path, headers, body, status, code):
    """mitmproxy serves TLS on the same port; with ALPN h2 the client speaks HTTP/2. The
    same keys, table and shapes hold. (Cleartext HTTP/2 with prior knowledge is not
    supported by mitmproxy: its DisableH2C addon kills such a connection.)"""
    r, line = hg.check(b"", method, path, h2=(method, path, headers, body))
    assert r.status == status, (r, r.body[:300])
    assert r.error_code == code
    assert r.header(":status") == str(status)


@pytest.mark.parametrize("method,path", [("GET", "/api/version"), ("GET", "/api/tags"),
                                         ("HEAD", "/api/version"), ("GET", "/v1/models"),
                                         ("POST", "/api/chat")])
def test_http2_body_cannot_smuggle_a_request(hg, fake, method, path):
    """mitmproxy converts an HTTP/2 request for the HTTP/1 upstream without framing its body
    when the client sent no content-length: the upstream then read the body as a second
    request on its connection. A key without admin scope sent GET /api/version with the
    body "POST /api/pull ..." and the upstream ran the pull. keygate now frames it."""
    inner = b'{"model":"evil:latest"}'
    smuggled = (b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(inner), inner))
    # POST: a JSON body with the smuggled request behind it
    body = CHAT + smuggled if method == "POST" else smuggled
    n = len(fake.requests)
    headers = [("authorization", f"Bearer {USER.secret}")]
    r, line = hg.check(b"", method, path, h2=(method, path, headers, body))
    got = [(x.method, x.path) for x in fake.requests[n:]]
    assert ("POST", "/api/pull") not in got, got
    if method != "POST":
        assert r.status == 200, r
    else:  # the JSON is followed by garbage: not a JSON object, refused before forwarding
        assert (r.status, r.error_code) == (400, "invalid_request")


def test_http2_protocol_violations_keep_the_gateway_healthy(hg):
    """Upper-case header names and a content-length that disagrees with the data are
    HTTP/2 protocol errors: the stream or connection is reset, nothing is forwarded."""
    for headers, body in (([("Authorization", f"Bearer {USER.secret}")], CHAT),
                          ([("authorization", f"Bearer {USER.secret}"),
                            ("content-length", "3")], CHAT),
                          ([("authorization", f"Bearer {USER.secret}"),
                            ("connection", "keep-alive")], CHAT),
                          ([("authorization", f"Bearer {USER.secret}"),
                            ("transfer-encoding", "chunked")], CHAT)):
        r, line = hg.check(b"", "POST", "/api/chat",
                           h2=("POST", "/api/chat", headers, body, False))
        assert r.status != 200, (headers, r)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PUT", "get", "OPTIONS"]),
       target=hostile_target(), who=st.sampled_from(["user", "none", "wrong", "both"]))
def test_http2_hostile_paths(hg, method, target, who):
    text = target.decode("utf-8", "surrogateescape")
    assume(text.startswith("/") and not re.search(r"[\x00-\x20\x7f]", text))
    assume(all(ord(c) < 0x80 for c in text))
    headers = {"user": canonical_auth(USER.secret), "none": [],
               "wrong": [("authorization", "Bearer " + USER.secret[:-1])],
               "both": [("authorization", f"Bearer {USER.secret}"), ("x-api-key", "x")]}[who]
    headers = [(k.lower(), v) for k, v in headers]
    body = CHAT if method == "POST" else b""
    r, line = hg.check(b"", method, target, h2=(method, text, headers, body))
    ep = table_endpoint(method.encode(), seen_path(target))
    if who != "user" and ep != "root":
        assert (r.status, r.error_code) == (401, "invalid_api_key"), (method, text, r)
    elif ep is None:
        assert (r.status, r.error_code) == (404, "unknown_endpoint"), (method, text, r)
    elif ep == "admin":
        assert (r.status, r.error_code) == (403, "permission_denied"), (method, text, r)


# -- 5. secrets --------------------------------------------------------------------------

CHANNEL_SECRET = "sk-channel-" + "c0ffee" * 6


def test_no_secret_in_output_log_errors_or_upstream(tmp_path):
    """At mitmdump's most verbose (flow_detail=4 prints every request's headers and body,
    termlog_verbosity=debug): no client key, nor a near-miss of one, nor a channel's
    api_key_env credential appears in mitmdump's output, the usage log, any answer, or any
    upstream request (the channel's own credential goes to its channel only)."""
    from fakeollama import FakeOllama
    native = FakeOllama(name="native").start()
    remote = FakeOllama(name="remote", kind="openai", prefix="/compat",
                        require_bearer=CHANNEL_SECRET).start()
    admin = KeySpec("admin", settings={"scopes": ["inference", "models", "admin"]})
    keys = {**KEYS, "admin": admin}
    toml = f"""max_body_mb = 0.25
cors_origins = ["https://app.example"]

[[channels]]
name = "local"
kind = "ollama"
base_url = "{native.url}"
models = ["llama3.2:*", "nomic-embed-text:*"]

[[channels]]
name = "remote"
kind = "openai"
base_url = "{remote.url}/compat/v1"
models = ["qwen2.5:*"]
api_key_env = "KG_TEST_CHANNEL_KEY"
[channels.model_map]
"gpt-test" = "qwen2.5:7b"
"""
    gw = Gateway(tmp_path, native.url, keys=keys, gateway_toml=toml,
                 env={"KG_TEST_CHANNEL_KEY": CHANNEL_SECRET},
                 args=["--set", "flow_detail=4", "--set", "termlog_verbosity=debug"])
    near_miss = USER.secret[:-1] + ("0" if USER.secret[-1] != "0" else "1")
    answers: list[bytes] = []
    try:
        gw.start()
        # here "user" may use every model
        mark = len(gw.lines)
        user_keys = {**keys, "user": KeySpec("user", USER.secret, {"models": ["*"]})}
        gw.keys_file.write_text(keys_yaml(user_keys))
        gw.wait_for(r"reloaded configuration", timeout=5, after=mark)

        def go(method, target, headers, body=b"", **kw):
            r = send_raw(gw.port, http1(method, target, headers, body, **kw), timeout=10)
            answers.append(repr(r.headers).encode() + r.body)
            return r

        u = canonical_auth(USER.secret)
        assert go("POST", "/api/chat", u, CHAT).status == 200
        streamed = CHAT.replace(b'"stream": false', b'"stream": true')
        assert go("POST", "/api/chat", u, streamed).status == 200
        gpt = json.dumps({"model": "gpt-test",
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
        assert go("POST", "/v1/chat/completions", u, gpt).status == 200
        assert go("POST", "/v1/chat/completions", u,
                  gpt.replace(b'"hi"}]', b'"hi"}], "stream": true')).status == 200
        assert go("GET", "/v1/models", u).status == 200
        assert go("GET", "/v1/models/gpt-test", u).status == 200
        admin_auth = canonical_auth(admin.secret)
        assert go("POST", "/api/pull", admin_auth, b'{"model": "x"}').status == 200
        for headers in ([("Authorization", f"Bearer {near_miss}")], [("x-api-key", near_miss)],
                        [("Authorization", f"Basic {USER.secret}")],
                        [("Authorization", f"Token {USER.secret}")],
                        [("Authorization", f"bearer  {USER.secret}")],
                        [("Authorization", f"Bearer {USER.secret}")] * 2,
                        [("x-api-key", USER.secret), ("Authorization", f"Bearer {USER2.secret}")],
                        [("Proxy-Authorization", f"Bearer {USER.secret}")]):
            go("POST", "/v1/chat/completions", headers, gpt)
            go("POST", "/v1/messages", headers, b"{}")
            go("GET", "/api/me", headers)
        # refused by keygate with a valid key: scope, model, body, size
        go("POST", "/api/pull", u, b"{}")
        go("POST", "/api/chat", canonical_auth(USER2.secret),
           CHAT.replace(b"llama3.2", b"qwen2.5:7b"))
        go("POST", "/api/chat", u, b"{not json")
        go("POST", "/api/chat", u, b'{"model": "llama3.2", "x": "' + b"y" * 400_000 + b'"}')
        go("POST", "/api/chat", u, b'{"model": "llama3.2", "x": "' + b"y" * 2_000_000 + b'"}',
           framing="chunked")
        # refused by mitmproxy's parser after the head, with a valid key in it
        go("POST", "/api/chat", u + [("Transfer-Encoding", "chunked")], CHAT)
        go("CONNECT", "/api/chat", u)
        # a preflight carrying a key, answered by keygate before it looks at keys
        go("OPTIONS", "/api/chat", u + [("Origin", "https://app.example"),
                                        ("Access-Control-Request-Method", "POST")])
        # failing upstreams: mitmproxy's own error pages, keygate's usage lines
        for fault in ("500", "reset", "midstream", "cut"):
            native.fail = remote.fail = fault
            try:
                go("POST", "/api/chat", u, CHAT.replace(b'"stream": false', b'"stream": true'))
                go("POST", "/v1/chat/completions", u, gpt)
            finally:
                native.fail = remote.fail = None
        # HTTP/2
        for headers in (u, [("x-api-key", USER.secret)],
                        [("authorization", f"Bearer {near_miss}")]):
            r = h2_request(gw.port, "POST", "/api/chat", [(k.lower(), v) for k, v in headers], CHAT)
            answers.append(repr(r.headers).encode() + r.body)
        time.sleep(1.0)
    finally:
        gw.stop()
        native.stop()
        remote.stop()

    assert "flow_detail" in " ".join(gw.args)
    assert "POST /api/chat" in gw.output or "/api/chat" in gw.output  # the dump was on
    logs = b"".join(p.read_bytes() for p in gw.usage_log.parent.glob("usage.jsonl*"))
    client_secrets = [USER.secret, USER2.secret, admin.secret, near_miss]
    for s in client_secrets + [CHANNEL_SECRET]:
        at = gw.output.find(s)
        assert at < 0, f"secret in mitmdump's output:\n{gw.output[max(0, at - 1500):at + 100]}"
        assert s.encode() not in logs
        assert all(s.encode() not in a for a in answers)
    for req in native.requests + remote.requests:
        blob = repr(req.headers) + req.path + req.body.decode("utf-8", "replace")
        for s in client_secrets:
            assert s not in blob
    assert all(CHANNEL_SECRET not in repr(r.headers) + r.body.decode("utf-8", "replace")
               for r in native.requests)
    assert {r.header("authorization") for r in remote.requests} == {f"Bearer {CHANNEL_SECRET}"}


def test_malformed_heads_are_not_logged_verbatim(hg):
    """mitmproxy logs a malformed or unfinished request head as its raw bytes before any
    addon runs ('Invalid header line: b"Authorization Bearer sk-..."' for a header without
    a colon; 'Client closed connection before completing request headers: b"..."'); the
    redact filter leaves the line but not the bytes."""
    secret = USER.secret
    mark = len(hg.gw.lines)
    send_raw(hg.gw.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization Bearer "
             + secret.encode() + b"\r\n\r\n", timeout=3)
    send_raw(hg.gw.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
             + secret.encode() + b"\r\n", timeout=1, half_close=True)
    hg.gw.wait_for(r"Invalid header line: <\d+ characters of the request, not shown>",
                   timeout=5, after=mark)
    hg.gw.wait_for(r"before completing its request head \(\d+ bytes, not shown\)",
                   timeout=5, after=mark)
    assert not any(secret in x for x in hg.gw.lines[mark:])


# -- mitmproxy's unbounded request head ---------------------------------------------------

def test_unterminated_request_head_is_bounded(fake, make_gateway):
    """mitmproxy 11 buffers a request head without any size limit (a FIXME in its
    Http1Server.read_headers) and, when the client leaves, formats the whole buffer's repr
    for its log line. keygate's HTTP/1 edge (keygate/edge/http1.py) answers 431 and closes the
    connection at max_header_kb (64 by default)."""
    gw = make_gateway(fake.url, keys=KEYS).start()
    before = rss_mb(gw.proc.pid)
    import socket
    sent = 0
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        try:
            s.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            for _ in range(64):
                s.sendall(b"a" * (1 << 20))
                sent += 1
        except OSError:
            pass  # closed by keygate
        time.sleep(0.5)
    time.sleep(0.5)
    grown = rss_mb(gw.proc.pid) - before
    assert sent < 64, "the connection was not closed"
    assert grown < 48, f"mitmdump grew by {grown:.0f} MB for one unterminated request head"
    assert max(len(x) for x in gw.lines) < 4000


def test_keygate_survives_many_connections_opened_and_dropped(hg):
    """Half-open and abandoned connections (slowloris-like): each is dropped by its client;
    the gateway keeps serving and writes a line only for requests that became flows."""
    import socket
    socks = []
    hg.t.mark()
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", hg.gw.port))
        s.sendall([b"GET /api/ta",
                   b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{",
                   b"\x16\x03\x01\x00", b""][i % 4])
        socks.append(s)
    hg.t.health(USER.secret)
    for s in socks:
        s.close()
    time.sleep(1.0)
    hg.t.health(USER.secret)
    lines = [x for x in hg.t.since_mark() if x["path"] != "/api/version"]
    # Only the 50 POSTs with a whole head became flows. keygate refused them (no key) at
    # headers time, but that answer waits for the body, which never came: 499, and the
    # line keeps keygate's verdict.
    assert len(lines) == 50 and all((x["status"], x["error"]) == (499, "invalid_api_key")
                                    for x in lines)
    assert hg.gw.proc.poll() is None
    assert os.path.exists(hg.gw.usage_log)
