"""The endpoint table of docs/endpoints.md: the only requests keygate forwards.

Paths are compared exactly as sent (no percent-decoding, no slash folding, case kept), so
`//api/pull`, `/api/../api/pull`, `/API/pull` and `%2Fapi%2Fpull` are simply not in the
table. Each entry says which scope opens it and how keygate treats its body. keygate's
own endpoints (health, usage page, /keygate/me, billing, /metrics) are in it too, marked
`own`: answered by keygate, never forwarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from keygate.request import state_of

# Answered by keygate itself, never forwarded (docs/endpoints.md#keygates-own-endpoints).
OWN_KINDS = frozenset({"root", "health", "page", "usage", "me", "billing", "metrics"})


@dataclass(frozen=True)
class Endpoint:
    path: str  # the table's name for it, e.g. "/api/chat" or "/v1/models/{model}"
    scope: str | None  # None: answered by keygate without a key
    api: str  # "ollama", "openai", "responses", "anthropic": error shape, stream and usage format
    kind: str  # "root", "inference", "show", "list", "model", "read", "admin", "upload"
    streams_by_default: bool = False

    @property
    def own(self) -> bool:
        """Answered by keygate itself, never forwarded (docs/endpoints.md)."""
        return self.kind in OWN_KINDS

    @property
    def native(self) -> bool:
        """Served only by ollama channels (docs/endpoints.md)."""
        return self.api in ("ollama", "anthropic")


ROOT = Endpoint("/", None, "ollama", "root")
ANY_KEY = "key"  # the scope of keygate's own endpoints that any valid key may use


def _table() -> dict[tuple[str, str], Endpoint]:
    t: dict[tuple[str, str], Endpoint] = {("GET", "/"): ROOT, ("HEAD", "/"): ROOT}

    def add(methods: str, path: str, scope: str, api: str, kind: str, streams: bool = False):
        for m in methods.split():
            t[(m, path)] = Endpoint(path, scope, api, kind, streams)

    for p in ("/api/chat", "/api/generate"):
        add("POST", p, "inference", "ollama", "inference", streams=True)
    for p in ("/api/embed", "/api/embeddings"):
        add("POST", p, "inference", "ollama", "inference")
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        add("POST", p, "inference", "openai", "inference")
    add("POST", "/v1/responses", "inference", "responses", "inference")
    add("POST", "/v1/messages", "inference", "anthropic", "inference")

    add("GET HEAD", "/api/tags", "models", "ollama", "list")
    add("GET", "/api/ps", "models", "ollama", "read")
    add("GET HEAD", "/api/version", "models", "ollama", "read")
    add("POST", "/api/show", "models", "ollama", "show")
    add("GET", "/v1/models", "models", "openai", "list")

    for p in ("/api/pull", "/api/push", "/api/create"):
        add("POST", p, "admin", "ollama", "admin", streams=True)
    add("POST", "/api/copy", "admin", "ollama", "admin")
    add("DELETE", "/api/delete", "admin", "ollama", "admin")

    # keygate's own endpoints (docs/endpoints.md#keygates-own-endpoints): answered by
    # keygate/stages/pages.py and keygate/stages/metrics.py, never forwarded.
    for p in ("/keygate/health/live", "/keygate/health/ready"):
        t[("GET", p)] = Endpoint(p, None, "keygate", "health")
    t[("GET", "/keygate/dashboard")] = Endpoint("/keygate/dashboard", None, "keygate", "page")
    add("GET", "/keygate/usage", "admin", "keygate", "usage")
    add("GET", "/keygate/me", ANY_KEY, "keygate", "me")
    for p in ("/v1/dashboard/billing/subscription", "/v1/dashboard/billing/usage"):
        add("GET", p, ANY_KEY, "openai", "billing")
    add("GET", "/metrics", "metrics", "keygate", "metrics")
    return t


TABLE = _table()
MODEL = Endpoint("/v1/models/{model}", "models", "openai", "model")
BLOB_HEAD = Endpoint("/api/blobs/{digest}", "admin", "ollama", "admin")
BLOB_UPLOAD = Endpoint("/api/blobs/{digest}", "admin", "ollama", "upload")
_DIGEST = re.compile(r"sha256[:-][0-9a-f]{64}")
_MODEL_SEGMENT = re.compile(r"[^/?#]+")


def classify(method: str, path: str) -> Endpoint | None:
    """The endpoint for `method` and `path` (query removed), or None: not forwarded."""
    ep = TABLE.get((method, path))
    if ep is not None:
        return ep
    if path.startswith("/v1/models/") and method == "GET":
        name = path[11:]
        return MODEL if _MODEL_SEGMENT.fullmatch(name) and name not in (".", "..") else None
    if path.startswith("/api/blobs/") and _DIGEST.fullmatch(path[11:]):
        if method == "HEAD":
            return BLOB_HEAD
        if method == "POST":
            return BLOB_UPLOAD
    return None


def classify_request(flow) -> Endpoint | None:
    """classify() for a flow's request as the client sent it. Methods are matched as sent:
    mitmproxy upper-cases `.method` but forwards the method as received, and upstreams
    route methods case-sensitively, so "get" is not GET, nor in the table."""
    raw = flow.request.data.method
    if raw != raw.upper():
        return None
    return classify(flow.request.method, client_path(flow))


def client_path(flow) -> str:
    """The path the client asked for, without the query: Auth records it before the
    router rewrites flow.request.path."""
    return state_of(flow).path or flow.request.path.split("?", 1)[0]


def path_model(path: str) -> str:
    """The model named by GET /v1/models/{model}."""
    return unquote(path[11:])
