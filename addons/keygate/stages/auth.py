"""The `Auth` addon: who is asking (client address, key), decided from headers alone.

Three outcomes, kept apart: no usable credential (401), a credential that is not a valid
key (401), and a key, published as its *name* in the request state (`key`) for the
stages after this one. The secret itself is dropped from the request here, so nothing
later can forward or log it.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
from urllib.parse import unquote, unquote_plus

from mitmproxy import http

from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.model.keyring import KeyRing
from keygate.request import state_of
from keygate.stages.config import Config
from keygate.stages.headerfields import text


def client_address(peer: str, forwarded_for: list[str], trusted: tuple) -> str:
    """docs/endpoints.md#authentication: the TCP peer, unless it is a trusted proxy; then the
    right-most
    X-Forwarded-For address that is not itself a trusted proxy."""
    addr = _normalize(peer)
    if not trusted or not _in(addr, trusted):
        return addr
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    for hop in reversed(hops):
        hop_addr = _normalize(hop)
        try:
            ipaddress.ip_address(hop_addr)
        except ValueError:
            break  # garbage in the chain: trust nothing further left
        if not _in(hop_addr, trusted):
            return hop_addr
        addr = hop_addr
    return addr


@functools.lru_cache(maxsize=4096)  # the same few peers ask again and again
def _normalize(ip: str) -> str:
    try:
        a = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return ip.strip()
    if a.version == 6 and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(a)


def _in(ip: str, nets: tuple) -> bool:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(a in n for n in nets)


def key_of(auth: list[str], xkey: list[str]) -> str | None:
    """The key the Authorization and x-api-key values present, or None.

    More than one credential header, or two that disagree, is no credential at all:
    a request must not be able to be one key to keygate and another to something else.
    """
    if len(auth) > 1 or len(xkey) > 1:
        return None
    key = None
    if auth:
        scheme, _, value = auth[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        key = value.strip()
    if xkey:
        x = xkey[0].strip()
        if not x or (key is not None and x != key):
            return None
        key = x
    return key


# Never forwarded: the credential headers; Proxy-Authorization, addressed to this proxy,
# which does not use it; api-key and x-goog-api-key, where Azure- and Gemini-style
# clients put a key; and Origin (docs/endpoints.md#authentication; Cors has read it before this
# runs).
DROPPED_HEADERS = frozenset({b"authorization", b"x-api-key", b"proxy-authorization",
                             b"api-key", b"x-goog-api-key", b"origin"})
# keygate's own headers are keygate's to set: a client's never go upstream (docs/endpoints.md).
OWN_PREFIX = b"x-keygate-"
# Header names under which a client may have put a key of keys.yaml other than the one it
# presents: their values are searched for any valid key (each token hashed once). Other
# headers are searched only for the presented key, a plain substring test: hashing every
# token of every header would let one request with a large head cost seconds.
_CREDENTIAL_NAME = re.compile(rb"key|token|auth|secret|credential|passw|cookie|session")


def credential_name(name: bytes) -> bool:
    """Whether a header name (lower case) looks like a credential's. Names of usual length
    are remembered (the same few come with every request); a long one, which only a client
    making them up sends, is not kept."""
    return _credential_name(name) if len(name) <= 64 else bool(_CREDENTIAL_NAME.search(name))


@functools.lru_cache(maxsize=1024)
def _credential_name(name: bytes) -> bool:
    return _CREDENTIAL_NAME.search(name) is not None


def take_credentials(headers: http.Headers, keys: KeyRing | None) -> tuple[str | None, bool]:
    """Remove the credential from the request headers and return (the presented key or
    None, whether an Authorization or x-api-key header was there).

    Also removed, so that no key a client copied elsewhere reaches the upstream: every
    header of DROPPED_HEADERS and every x-keygate-* header; every other header whose value
    holds the presented key; and (given `keys`) every header with a credential's name
    (_CREDENTIAL_NAME) whose value holds any valid key of keys.yaml as a token (keys are
    8+ characters). One pass over the raw fields: this runs for every request.
    """
    auth, xkey, kept = [], [], []
    for field in headers.fields:
        name = field[0].lower()
        if name in DROPPED_HEADERS:
            if name == b"authorization":
                auth.append(text(field[1]))
            elif name == b"x-api-key":
                xkey.append(text(field[1]))
        elif not name.startswith(OWN_PREFIX):
            kept.append(field)
    secret = key_of(auth, xkey)
    if keys is not None:
        raw = secret.encode("utf-8", "surrogateescape") if secret else None
        kept = [f for f in kept if not ((raw and raw in f[1]) or (
            credential_name(f[0].lower()) and keys.holds_key(f[1])))]
    if len(kept) != len(headers.fields):
        headers.fields = tuple(kept)
    return secret, bool(auth or xkey)


def without_key_in_query(path: str, secret: str, keys: KeyRing) -> str:
    """`path` (with its query) less every query parameter that holds the presented key or
    any valid key of keys.yaml, percent-encoded or not. The rest of the query is kept
    byte for byte (it is forwarded unchanged: docs/endpoints.md)."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    kept = []
    for part in query.split("&"):
        if len(part) < 8:  # a key is 8+ characters, and unquoting only shortens
            kept.append(part)
            continue
        plain = unquote_plus(part)
        if secret in part or secret in plain or keys.holds_key(
                plain.encode("utf-8", "surrogateescape")):
            continue
        kept.append(part)
    return base + "?" + "&".join(kept) if kept else base


def drop_credentials(flow: http.HTTPFlow) -> None:
    take_credentials(flow.request.headers, None)


class Auth:
    def __init__(self, config: Config) -> None:
        self.config = config

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            # Answered before keygate looked (a preflight, mitmproxy's own 400): the
            # credential still goes no further, not even into mitmdump's flow dump.
            drop_credentials(flow)
            return
        st = state_of(flow)
        # As received, before routing rewrites it; the query stays out of the log.
        st.path = flow.request.path.split("?", 1)[0]
        state = self.config.state
        settings = state.settings
        ip = client_address(
            flow.client_conn.peername[0],
            # (Only read when it can matter.)
            flow.request.headers.get_all("x-forwarded-for") if settings.trusted_proxies else [],
            settings.trusted_proxies,
        )
        st.client_ip = ip

        # The client's credential never goes further than this hook, nor does any other
        # header a client also put a key in.
        secret, had_header = take_credentials(flow.request.headers, state.keys)

        ep = endpoints.classify_request(flow)
        if ep is not None and ep.scope is None:
            return  # answered by keygate without a key (GET /)

        if secret is None:
            refuse(flow, "invalid_api_key", "Malformed API key header." if had_header else
                   "No API key given: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
            return
        if secret in unquote(st.path):
            refuse(flow, "invalid_request",
                   "The API key must not be part of the URL path: send it in a header.")
            return
        key = state.keys.lookup(secret)
        if key is not None and "?" in flow.request.path:
            # A key copied into the URL too must not leave keygate there either. (Only for
            # a valid key: nothing else is forwarded, and the search hashes tokens.)
            clean = without_key_in_query(flow.request.path, secret, state.keys)
            if clean != flow.request.path:
                flow.request.path = clean
        del secret
        if key is None:
            refuse(flow, "invalid_api_key", "Invalid API key.")
        elif not key.enabled:
            refuse(flow, "invalid_api_key", "This API key has been revoked.")
        elif key.expired(dt.datetime.now(dt.timezone.utc)):
            refuse(flow, "invalid_api_key", "This API key has expired.")
        else:
            # From here on the key is valid; its name (never the secret) is the identity.
            st.key = key.name
            if not key.allows_ip(ip):
                refuse(flow, "permission_denied", f"This API key may not be used from {ip}.")
