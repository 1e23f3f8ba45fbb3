"""The `Policy` addon: what a key may do with the endpoint it asked for (docs/endpoints.md).

At headers time it classifies the request against the endpoint table (deny by default),
checks the key's scopes and the declared body size; once the body is in, it checks the
JSON body, the model against the key's patterns and the cloud rule, and removes the body
fields that would let one key disturb everyone else on a shared GPU.
"""

from __future__ import annotations

import json
import math
import re

from mitmproxy import http

from keygate.model import endpoints
from keygate.model.errors import refuse
from keygate.model.settings import cloud_allowed, model_name_problem
from keygate.request import state_of
from keygate.stages.config import Config
from keygate.stages.headerfields import get_field

ROOT_TEXT = b"keygate is running\n"


def root_response(method: str) -> http.Response:
    """keygate's own answer to GET / and HEAD / (not Ollama's fingerprint string)."""
    body = b"" if method == "HEAD" else ROOT_TEXT
    return http.Response.make(200, body, {"content-type": "text/plain; charset=utf-8"})
# Go's time.ParseDuration, which Ollama uses for a keep_alive string: a sign, then one
# or more <number><unit>, a number being digits with an optional fraction.
_GO_UNITS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000,
             "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_GO_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]+)")
_GO_MAX = (1 << 63) - 1
_GO_MAX_TEXT = 64  # characters; "2562047h47m16.854775807s" (the longest in range) has 24


def go_duration_ns(text: str) -> int | None:
    """Nanoseconds of a Go duration string as time.ParseDuration reads it, or None where
    it fails (Ollama then refuses the request). Exact: integers, as Go computes it, so
    "0.1ns" is 0 and "999999h" is what it says."""
    if len(text) > _GO_MAX_TEXT:
        # Go would read a longer one, but only as an overflow or a duration made of many
        # parts; reading it here would cost time a client chooses (and int() refuses
        # more than 4,300 digits). None: not a keep_alive keygate lets through.
        return None
    s = text
    neg = s[:1] == "-"
    if s[:1] in "-+" and s:
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        return None
    total, pos = 0, 0
    while pos < len(s):
        m = _GO_PART.match(s, pos)
        if m is None:
            return None
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac or unit not in _GO_UNITS:
            return None
        scale = _GO_UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        if total > _GO_MAX + (1 if neg else 0):
            return None  # Go: "invalid duration" (overflow)
        pos = m.end()
    return -total if neg else total


def keep_alive_seconds(value: object) -> float | None:
    """How long Ollama keeps a model loaded for this keep_alive, in seconds: a negative
    number means for ever (so does any negative duration); None where Ollama would refuse
    the value. A JSON number is whole seconds, truncated (Go's int(float64)); a string is
    a Go duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if value != value:  # NaN
            return None
        if value < 0:
            return -1.0
        if value >= 1e18:  # longer than any limit (and float() of a 400-digit int raises)
            return math.inf
        return float(math.trunc(value))
    if isinstance(value, str):
        ns = go_duration_ns(value)
        if ns is None:
            return None
        return -1.0 if ns < 0 else ns / 1e9
    return None


def keep_alive_allowed(value: object, max_seconds: float) -> bool:
    """Whether a key without `admin` may send this keep_alive (docs/endpoints.md): it must come to
    at least one second (0 unloads the model for everyone at once, as good as a few
    nanoseconds do) and at most `max_seconds` (a negative one pins the model for ever).
    Anything Ollama would not read is not allowed either."""
    seconds = keep_alive_seconds(value)
    return seconds is not None and 1 <= seconds <= max_seconds


# Fields keygate reads or removes. Ollama decodes bodies with Go's encoding/json, which
# matches field names case-insensitively: "MODEL" would be Ollama's model while keygate
# checked "model". Bodies that spell these any other way are refused.
INSPECTED = frozenset({"model", "name", "stream", "stream_options", "keep_alive",
                       "_debug_render_only"})
_INSPECTED_LENGTHS = frozenset(len(n) for n in INSPECTED)


def _folds_onto(key: str, name: str) -> bool:
    """Whether Go could take `key` for the field `name`. It folds case rune by rune with
    Unicode rules, so a non-ASCII rune may stand for a letter ("keep_al\u0131ve" with a
    dotless i, "\u017ftream" with a long s): any such rune counts as a match here."""
    return len(key) == len(name) and all(
        a.lower() == b or not a.isascii() for a, b in zip(key, name))


def miscased_field(doc: dict) -> str | None:
    """The first top-level field that is an inspected name in other letter case."""
    for k in doc:
        if k not in INSPECTED and len(k) in _INSPECTED_LENGTHS and any(
                _folds_onto(k, name) for name in INSPECTED):
            return k
    return None


def body_model(doc: dict, kind: str) -> object:
    """The model a body names; /api/show still honours the deprecated `name`."""
    model = doc.get("model")
    if kind == "show" and not model:
        model = doc.get("name")
    return model


def encoded_body(headers: http.Headers) -> str | None:
    """The request's Content-Encoding, or None when it has none (or only "identity")."""
    values = [v.strip().lower() for f in headers.fields if f[0].lower() == b"content-encoding"
              for v in f[1].decode("latin-1").split(",")]
    coded = [v for v in values if v not in ("", "identity")]
    return ", ".join(coded) if coded else None


class Policy:
    def __init__(self, config: Config) -> None:
        self.config = config

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        path = endpoints.client_path(flow)
        ep = endpoints.classify_request(flow)
        if ep is not None and ep.kind == "root":
            flow.response = root_response(flow.request.method)
            return
        if ep is not None and ep.scope is None:
            return  # keygate's own pages that need no key: stages/pages.py answers them
        key = self.config.state.keys.by_name.get(state_of(flow).key)
        if key is None:  # only reachable if keys.yaml dropped the key a moment ago
            refuse(flow, "invalid_api_key", "Invalid API key.")
            return
        if ep is None:
            refuse(flow, "unknown_endpoint", f"Unknown endpoint: {flow.request.method} {path}")
            return
        if ep.scope not in key.scopes and ep.scope != endpoints.ANY_KEY:
            refuse(flow, "permission_denied",
                   f"This API key may not use {flow.request.method} {ep.path}: "
                   f"it needs the '{ep.scope}' scope.")
            return
        encoding = encoded_body(flow.request.headers)
        if encoding is not None and ep.kind != "upload":
            # keygate checks exactly the bytes it forwards, and upstreams read request
            # bodies as they are (Ollama ignores Content-Encoding): an encoded body would
            # be one request to keygate and another upstream.
            refuse(flow, "invalid_request",
                   f"Request bodies with Content-Encoding {encoding!r} are not accepted: "
                   "send the body uncompressed.")
            return
        limit = self.config.state.settings.max_body_bytes
        declared = get_field(flow.request.headers, b"content-length") or ""
        if declared.isdigit() and int(declared) > limit and ep.kind != "upload":
            refuse(flow, "request_too_large",
                   f"Request body is larger than this gateway accepts ({limit} bytes).")
            return
        if ep.kind == "model":
            model = endpoints.path_model(path)
            state_of(flow).model = model
            if model_name_problem(model) is not None or not key.may_use(
                    model) or not self._cloud_ok(model):
                # As if it did not exist: the key must not learn what else is installed.
                refuse(flow, "model_not_found", f"The model '{model}' does not exist.")
        elif ep.kind == "upload":
            # Model blobs are gigabytes: pass them through, never buffer them.
            flow.request.stream = True

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        ep = endpoints.classify(flow.request.method, endpoints.client_path(flow))
        if ep is None or ep.kind not in ("inference", "show"):
            return
        limit = self.config.state.settings.max_body_bytes
        raw = flow.request.raw_content or b""
        if len(raw) > limit:  # chunked bodies have no length to check up front
            refuse(flow, "request_too_large",
                   f"Request body is larger than this gateway accepts ({limit} bytes).")
            return
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested ~1000 deep
            refuse(flow, "invalid_request", "Request body must be a JSON object.")
            return
        if not isinstance(doc, dict):
            refuse(flow, "invalid_request", "Request body must be a JSON object.")
            return
        odd = miscased_field(doc)
        if odd is not None:
            refuse(flow, "invalid_request",
                   f"Field names are case-sensitive here: write "
                   f"{next(n for n in INSPECTED if _folds_onto(odd, n))!r}, not {odd!r}.")
            return
        model = body_model(doc, ep.kind)
        if not isinstance(model, str) or not model:
            refuse(flow, "invalid_request",
                   "The request body must name a model (\"model\": string).")
            return
        state_of(flow).model = model
        problem = model_name_problem(model)
        if problem is not None:
            refuse(flow, "invalid_request", f"The model name {problem}.")
            return
        key = self.config.state.keys.by_name.get(state_of(flow).key)
        if key is None:
            refuse(flow, "invalid_api_key", "Invalid API key.")
            return
        if not key.may_use(model):
            refuse(flow, "permission_denied", f"This API key may not use the model '{model}'.")
            return
        if not self._cloud_ok(model):
            refuse(flow, "permission_denied",
                   f"The model '{model}' runs on ollama.com, which this gateway does not allow.")
            return
        if ep.kind == "inference":
            stream = doc.get("stream")
            state_of(flow).wants_stream = (
                stream is not False if ep.streams_by_default else stream is True)
            changed = "_debug_render_only" in doc
            doc.pop("_debug_render_only", None)
            if "keep_alive" in doc and "admin" not in key.scopes and not keep_alive_allowed(
                    doc["keep_alive"], self.config.state.settings.max_keep_alive):
                del doc["keep_alive"]
                changed = True
            if changed:
                state_of(flow).body_changed = True
        # Parsed once here; the router edits and serialises it (and drops it from metadata).
        state_of(flow).body = doc

    def _cloud_ok(self, model: str) -> bool:
        return cloud_allowed(model, self.config.state.settings.channels)
