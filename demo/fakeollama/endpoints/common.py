"""What every endpoint shares: the API a path belongs to and its error shape, decoding a JSON
body into the errors Ollama gives for it, model lookups, and generating a reply.

Which API a path belongs to decides its error shape: ``/v1/messages`` is Anthropic's,
any other ``/v1/*`` path OpenAI's, the rest native; with ``kind="openai"`` every path is
OpenAI's. An empty body is ``missing request body`` on the native API (Ollama's handlers
map io.EOF to it) and ``EOF`` elsewhere (Gin's binder does not).
"""

from __future__ import annotations

from typing import Any

from ..catalogue import Catalogue, Model
from ..generation import Turn
from ..server import Incoming
from ..wire import Reply, anthropic_error, go_kind, native_error, openai_error


class Endpoints:
    """The base of the endpoint mixins; `FakeOllama` sets these attributes."""

    kind: str  # "ollama" or "openai"
    chunks: int  # content pieces per reply
    _catalogue: Catalogue

    def _family(self, path: str) -> str:
        if self.kind == "openai":
            return "openai"
        if path == "/v1/messages":
            return "anthropic"
        return "openai" if path.startswith("/v1/") else "native"

    def _error(self, path: str, status: int, message: str) -> Reply:
        family = self._family(path)
        if family == "anthropic":
            return anthropic_error(status, message)
        if family == "openai":
            return openai_error(status, message)
        return native_error(status, message)

    def _body(self, incoming: Incoming, go_type: str) -> tuple[dict, Reply | None]:
        """The JSON object body, or the error reply Ollama gives for this body."""
        path = incoming.path
        native = self._family(path) == "native"
        if incoming.json_error is not None:
            return {}, self._error(path, 400, incoming.json_error)
        if not incoming.received.body.strip():
            # Ollama's handlers map io.EOF to this text; Gin's binder (OpenAI side) does not.
            return {}, self._error(path, 400, "missing request body" if native else "EOF")
        body = incoming.received.json
        if body is None:  # JSON null decodes into the zero request
            body = {}
        if not isinstance(body, dict):
            message = f"json: cannot unmarshal {go_kind(body)} into Go value of type {go_type}"
            return {}, self._error(path, 400, message)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            struct_name = go_type.rsplit(".", 1)[-1]
            message = (f"json: cannot unmarshal {go_kind(model)} into Go struct field "
                       f"{struct_name}.model of type string")
            return {}, self._error(path, 400, message)
        return body, None

    def _lookup(self, name: str) -> Model | None:
        return self._catalogue.lookup(name)

    def _openai_model(self, name: str) -> tuple[Model | None, Reply | None]:
        """The model of an OpenAI-style request (chat/completions, responses), or its error."""
        if not name:
            return None, openai_error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return None, openai_error(404, f"model '{name}' not found")
        return model, None

    def _turn(self, model: Model, name: str, texts: list[Any], limit: Any = None) -> Turn:
        """Generate the deterministic reply for a request (see fakeollama.generation)."""
        self._catalogue.mark_loaded(model)
        return Turn.generate(name, texts, self.chunks, limit)
