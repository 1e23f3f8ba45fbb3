"""`FakeOllama`: the HTTP server, the model catalogue and every endpoint, put together, and
the route table that maps a request to its endpoint.

Routing is Gin's, as Ollama uses it: an exact path, or a ``:param`` route matching one
non-empty path segment; an unknown path is a plain-text ``404 page not found`` and a known
path with another method ``405 method not allowed`` (with ``kind="openai"``, JSON errors
instead, as OpenAI-style servers send).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from .catalogue import DEFAULT_MODELS, Catalogue
from .endpoints.anthropic_compat import AnthropicAPI
from .endpoints.native import NativeAPI
from .endpoints.openai_compat import OpenAIAPI
from .endpoints.responses import ResponsesAPI
from .generation import DEFAULT_CHUNKS
from .server import HTTPServer, Incoming
from .wire import TEXT, Reply, Stream, openai_error


class FakeOllama(NativeAPI, OpenAIAPI, ResponsesAPI, AnthropicAPI, HTTPServer):
    """A fake Ollama (or OpenAI-compatible) HTTP server; see the package docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
        chunk_delay: float = 0.0,
        chunks: int | None = None,
        require_bearer: str | None = None,
        prefix: str = "",
        kind: str = "ollama",
        name: str = "fake",
    ):
        if kind not in ("ollama", "openai"):
            raise ValueError(f"kind must be 'ollama' or 'openai', not {kind!r}")
        super().__init__(host=host, port=port, name=name, prefix=prefix,
                         require_bearer=require_bearer, chunk_delay=chunk_delay)
        self.kind = kind
        self.chunks = DEFAULT_CHUNKS if chunks is None else chunks
        # Stream style; read on every request, so set them any time.
        self.openai_style = "new"  # "new" (Ollama >= 0.32.6) or "legacy"
        self.usage_every_chunk = False
        self.cached_tokens = 0  # OpenAI usage: report this many prompt tokens as cached
        self._catalogue = Catalogue(models)
        self._routes, self._param_routes = self._build_routes()

    def _build_routes(self) -> tuple[dict, list]:
        if self.kind == "openai":
            routes = {
                "/v1/chat/completions": {"POST": self._v1_chat},
                "/v1/completions": {"POST": self._v1_completions},
                "/v1/embeddings": {"POST": self._v1_embeddings},
                "/v1/models": {"GET": self._v1_models},
            }
            return routes, []
        routes = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/status": {"GET": self._status},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": self._generate},
            "/api/chat": {"POST": self._chat},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/v1/chat/completions": {"POST": self._v1_chat},
            "/v1/completions": {"POST": self._v1_completions},
            "/v1/embeddings": {"POST": self._v1_embeddings},
            "/v1/models": {"GET": self._v1_models},
            "/v1/responses": {"POST": self._v1_responses},
            "/v1/messages": {"POST": self._v1_messages},
        }
        # Gin's ":param" matches one non-empty path segment.
        param_routes = [
            ("/api/blobs/", {"HEAD": self._blob_head, "POST": self._blob_upload}),
            ("/v1/models/", {"GET": self._v1_model}),
        ]
        return routes, param_routes

    def _dispatch(self, incoming: Incoming) -> Reply | Stream:
        path, method = incoming.path, incoming.received.method
        methods: Any = self._routes.get(path)
        arg = None
        if methods is None:
            for prefix, candidate in self._param_routes:
                rest = path[len(prefix):]
                if path.startswith(prefix) and rest and "/" not in rest:
                    methods, arg = candidate, unquote(rest)
                    break
        if methods is None:
            return self._unrouted(404, incoming)
        handler = methods.get(method)
        if handler is None:
            return self._unrouted(405, incoming)
        return handler(incoming, arg)

    def _unrouted(self, status: int, incoming: Incoming) -> Reply:
        if self.kind == "openai":  # OpenAI-style servers answer in JSON even here
            what = "Invalid URL" if status == 404 else "Method not allowed"
            target = incoming.received.path.split("?", 1)[0]
            return openai_error(status, f"{what} ({incoming.received.method} {target})",
                                "invalid_request_error")
        # Gin's default bodies, as plain text (not JSON).
        text = b"404 page not found" if status == 404 else b"405 method not allowed"
        return Reply(status, text, TEXT)
