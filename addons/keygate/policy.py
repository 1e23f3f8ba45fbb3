"""The `Policy` addon: what a key may do with the endpoint it asked for (SPEC 4).

At headers time it classifies the request against the endpoint table (deny by default),
checks the key's scopes and the declared body size; once the body is in, it checks the
JSON body, the model against the key's patterns and the cloud rule, and removes the body
fields that would let one key disturb everyone else on a shared GPU.
"""

from __future__ import annotations

import json
import re

from mitmproxy import http

from . import endpoints
from .config import cloud_allowed
from .configuration import Config
from .errors import refuse
from .headerfields import decoded_body, get_field

ROOT_TEXT = b"keygate is running\n"


def root_response(method: str) -> http.Response:
    """keygate's own answer to GET / and HEAD / (not Ollama's fingerprint string)."""
    body = b"" if method == "HEAD" else ROOT_TEXT
    return http.Response.make(200, body, {"content-type": "text/plain; charset=utf-8"})
_ZERO_DURATION = re.compile(r"\+?(0+(\.0*)?(ns|us|\u00b5s|ms|s|m|h)?)+")


def keep_alive_is_disruptive(value: object) -> bool:
    """A keep_alive that unloads the model (zero) or pins it in memory (negative)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value <= 0
    if isinstance(value, str):
        s = value.strip()
        return s.startswith("-") or bool(_ZERO_DURATION.fullmatch(s))
    return False


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
        key = self.config.state.keys.by_name.get(flow.metadata.get("keygate.key"))
        if key is None:  # only reachable if keys.yaml dropped the key a moment ago
            refuse(flow, "invalid_api_key", "Invalid API key.")
            return
        if ep is None:
            refuse(flow, "unknown_endpoint", f"Unknown endpoint: {flow.request.method} {path}")
            return
        if ep.scope not in key.scopes:
            refuse(flow, "permission_denied",
                   f"This API key may not use {flow.request.method} {ep.path}: "
                   f"it needs the '{ep.scope}' scope.")
            return
        limit = self.config.state.settings.max_body_bytes
        declared = get_field(flow.request.headers, b"content-length") or ""
        if declared.isdigit() and int(declared) > limit and ep.kind != "upload":
            refuse(flow, "request_too_large",
                   f"Request body is larger than this gateway accepts ({limit} bytes).")
            return
        if ep.kind == "model":
            model = endpoints.path_model(path)
            flow.metadata["keygate.model"] = model
            if not key.may_use(model) or not self._cloud_ok(model):
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
            doc = json.loads(decoded_body(flow.request) or b"")
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
        flow.metadata["keygate.model"] = model
        key = self.config.state.keys.by_name.get(flow.metadata.get("keygate.key"))
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
            flow.metadata["keygate.wants_stream"] = (
                stream is not False if ep.streams_by_default else stream is True)
            changed = "_debug_render_only" in doc
            doc.pop("_debug_render_only", None)
            if "keep_alive" in doc and "admin" not in key.scopes and keep_alive_is_disruptive(
                    doc["keep_alive"]):
                del doc["keep_alive"]
                changed = True
            if changed:
                flow.metadata["keygate.body_changed"] = True
        # Parsed once here; the router edits and serialises it (and drops it from metadata).
        flow.metadata["keygate.body"] = doc

    def _cloud_ok(self, model: str) -> bool:
        return cloud_allowed(model, self.config.state.settings.channels)
