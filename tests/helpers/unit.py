"""Helpers for keygate's unit tests: configuration state without files, and test flows.

Not a test module. Every addon test builds a `Config` whose `state` is set directly from
`parse_settings` / `parse_keys`, and flows from `tflow.tflow()` set up as reverse-mode
requests from 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from keygate.model.keyring import parse_keys
from keygate.model.settings import parse_settings
from keygate.request import state_of
from keygate.stages.config import Config, State

CONFIG_PATH = Path("/tmp/x/gateway.toml")
REVERSE = "reverse:http://127.0.0.1:11434"


def secret_of(name: str) -> str:
    """A distinct, recognisable secret per key name."""
    return f"sk-unit-{name}-" + hashlib.sha256(name.encode()).hexdigest()[:24]


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# name -> settings (besides the secret). "plain" stores its key in plaintext.
DEFAULT_KEYS: dict[str, dict] = {
    "alice": {},
    "admin": {"scopes": ["inference", "models", "admin"]},
    "adminonly": {"scopes": ["admin"]},
    "llama": {"models": ["llama3.2:*"]},
    "disabled": {"enabled": False},
    "expired": {"expires_at": "2020-01-01"},
    "future": {"expires_at": "2999-01-01T00:00:00Z"},
    "elsewhere": {"allow_ips": ["203.0.113.0/24"]},
    "reader": {"scopes": ["models"]},
    "plain": {"plaintext": True},
}


def keys_yaml(keys: dict[str, dict] | None = None) -> str:
    doc = {}
    for name, settings in (DEFAULT_KEYS if keys is None else keys).items():
        entry = dict(settings)
        if entry.pop("plaintext", False):
            entry["key"] = secret_of(name)
        else:
            entry["key_sha256"] = sha256_hex(secret_of(name))
        doc[name] = entry
    return json.dumps({"keys": doc}, indent=2) + "\n"  # JSON is YAML


def make_config(toml: str = "", keys: dict[str, dict] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    settings = parse_settings(toml, CONFIG_PATH, environ=environ or {})
    ring = parse_keys(keys_yaml(keys), "keys.yaml")
    config = Config()
    config.state = State(settings, ring)
    return config


def make_flow(method: str = "GET", path: str = "/", headers: dict | list | None = None,
              body: bytes | dict | list | None = None, key: str | None = None,
              peer: str = "127.0.0.1") -> http.HTTPFlow:
    """A live reverse-mode flow as keygate's hooks see it on arrival."""
    f = tflow.tflow()
    f.client_conn.peername = (peer, 5000)
    f.client_conn.proxy_mode = ProxyMode.parse(REVERSE)
    f.request.method = method
    f.request.scheme = "http"
    f.request.host = "127.0.0.1"
    f.request.port = 11434
    f.request.path = path
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    f.request.headers = http.Headers([(k.encode(), v.encode()) for k, v in items])
    if key is not None:
        f.request.headers["authorization"] = f"Bearer {secret_of(key)}"
    if body is None:
        f.request.raw_content = b""
    else:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            f.request.headers["content-type"] = "application/json"
        f.request.content = body
    return f


def run_request(flow: http.HTTPFlow, *addons) -> http.HTTPFlow:
    """Call the request-phase hooks in mitmproxy's order: every requestheaders, then every
    request hook (mitmproxy calls both even when an earlier addon set a response)."""
    for hook in ("requestheaders", "request"):
        for addon in addons:
            fn = getattr(addon, hook, None)
            if fn is not None:
                fn(flow)
    return flow


def response_json(flow: http.HTTPFlow) -> object:
    assert flow.response is not None
    return json.loads(flow.response.content)


def request_json(flow: http.HTTPFlow) -> object:
    return json.loads(flow.request.content)


def with_state(flow: http.HTTPFlow, **fields) -> http.HTTPFlow:
    """Set fields of the flow's RequestState, as the stages before the one under test
    would have."""
    st = state_of(flow)
    for name, value in fields.items():
        setattr(st, name, value)
    return flow
