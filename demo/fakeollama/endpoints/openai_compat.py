"""Ollama's OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models`` and ``/v1/models/{model}``; with ``kind="openai"`` these
are all the fake serves, as a plain OpenAI-compatible server (like DeepSeek's) would.

* ``stream`` is a plain bool: absent means a whole ``application/json`` body ending ``"\\n"``.
  A stream is SSE ``data:`` frames ending ``data: [DONE]``; ``usage`` comes only with
  ``stream_options.include_usage``, on a last frame with empty ``choices``.
* Chat chunks have ids ``chatcmpl-<0..998>`` and ``system_fingerprint`` ``"fp_ollama"``
  (``"fp_fake"`` with ``kind="openai"``); one ``created`` is pinned across a chat stream.
* ``openai_style = "new" | "legacy"`` and ``usage_every_chunk`` choose the chat SSE variant:
  "new" (Ollama >= 0.32.6) puts the role on the first delta only and the finish reason on a
  separate chunk with an empty delta; "legacy" puts the role on every delta and the finish
  reason on a last empty-content chunk. ``usage_every_chunk`` sends ``"usage": null`` on
  every chunk when usage was asked for, as some other servers do.
* Ollama's ``/v1/completions`` stream with ``include_usage`` puts a zeroed usage on every
  chunk (a known quirk); an empty model list is ``"data": null`` (a Go nil slice), where
  real OpenAI servers send ``[]``.
* Errors are the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import random
import struct
import time
from typing import Any, Iterator

from ..catalogue import owned_by
from ..generation import Turn, embed_dims, embedding, message_texts
from ..server import RUNNER_ERROR, Incoming
from ..wire import (
    JSON,
    SSE,
    Reply,
    Stream,
    go_kind,
    json_reply,
    openai_error,
    openai_error_obj,
    sse,
)
from .common import Endpoints


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class OpenAIAPI(Endpoints):
    """The OpenAI-compatible ``/v1/*`` endpoints; see the module docstring."""

    openai_style: str  # "new" (Ollama >= 0.32.6) or "legacy"
    usage_every_chunk: bool

    def _usage(self, turn: Turn) -> dict:
        """``usage`` of a reply; with ``cached_tokens`` set, that many of its prompt tokens
        (at most all of them) are reported as read from a cache, as OpenAI reports them."""
        usage = turn.usage()
        cached = getattr(self, "cached_tokens", 0)
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": min(cached, turn.prompt_tokens)}
        return usage

    @property
    def _fingerprint(self) -> str:
        return "fp_ollama" if self.kind == "ollama" else "fp_fake"

    # ------------------------------------------------------------------ chat completions

    def _v1_chat(self, incoming: Incoming, _: Any) -> Reply | Stream:
        body, error = self._body(incoming, "openai.ChatCompletionRequest")
        if error:
            return error
        messages = body.get("messages")
        if not messages:  # checked by the middleware before the model is looked at
            return openai_error(400, "[] is too short - 'messages'")
        if not isinstance(messages, list):
            return openai_error(400, f"json: cannot unmarshal {go_kind(messages)} into Go "
                                     "struct field ChatCompletionRequest.messages of type "
                                     "[]openai.Message")
        name = body.get("model") or ""
        model, error = self._openai_model(name)
        if error:
            return error
        if model.embedding:
            return openai_error(400, f'"{name}" does not support chat')
        turn = self._turn(model, name, message_texts(messages), body.get("max_tokens"))
        completion_id = f"chatcmpl-{random.randrange(999)}"
        if body.get("stream") is not True:  # a plain bool in Ollama: absent means false
            return json_reply(self._chat_completion(completion_id, turn), content_type=JSON,
                              newline=True)
        return self._chat_stream(completion_id, turn, _include_usage(body))

    def _chat_completion(self, completion_id: str, turn: Turn) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": turn.model,
            "system_fingerprint": self._fingerprint,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": turn.text},
                "finish_reason": turn.done_reason,
            }],
            "usage": self._usage(turn),
        }

    def _chat_stream(self, completion_id: str, turn: Turn, include_usage: bool) -> Stream:
        created = int(time.time())  # one value pinned across the stream
        legacy = self.openai_style == "legacy"
        null_usage = include_usage and self.usage_every_chunk

        def chunk(choices: list, usage: Any = ...) -> bytes:
            obj = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": turn.model,
                "system_fingerprint": self._fingerprint,
                "choices": choices,
            }
            if usage is not ...:
                obj["usage"] = usage
            elif null_usage:
                obj["usage"] = None
            return sse(obj)

        def choice(delta: dict, finish: str | None) -> list:
            return [{"index": 0, "delta": delta, "finish_reason": finish}]

        # Legacy (< 0.32.6): role on every delta, finish_reason on a last empty-content chunk.
        # New: role only on the first delta (a wholly empty reply still opens with one),
        # then a separate finish chunk with an empty delta.
        if legacy:
            pieces = turn.pieces
            deltas = [{"role": "assistant", "content": p} for p in pieces]
            finish = chunk(choice({"role": "assistant", "content": ""}, turn.done_reason))
        else:
            pieces = turn.pieces or [""]
            deltas = [{"role": "assistant", "content": p} if i == 0 else {"content": p}
                      for i, p in enumerate(pieces)]
            finish = chunk(choice({}, turn.done_reason))

        def frames() -> Iterator[bytes]:
            for delta in deltas:
                yield chunk(choice(delta, None))
            tail = finish
            if include_usage:
                tail += chunk([], self._usage(turn))
            yield tail + b"data: [DONE]\n\n"

        return Stream(SSE, frames(), len(deltas) + 1,
                      lambda: sse(openai_error_obj(500, RUNNER_ERROR)))

    # ------------------------------------------------------------------ completions

    def _v1_completions(self, incoming: Incoming, _: Any) -> Reply | Stream:
        body, error = self._body(incoming, "openai.CompletionRequest")
        if error:
            return error
        prompt = body.get("prompt")
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            return openai_error(400, f"json: cannot unmarshal {go_kind(prompt)} into Go struct "
                                     "field CompletionRequest.prompt of type string")
        name = body.get("model") or ""
        model = self._lookup(name)
        if model is None:
            return openai_error(404, f"model '{name}' not found")
        if model.embedding:
            return openai_error(400, f'"{name}" does not support generate')
        turn = self._turn(model, name, [prompt], body.get("max_tokens"))
        if not prompt:  # Ollama answers an empty prompt with its "load" reply
            turn = Turn(name, 0, [], "load")
        completion_id = f"cmpl-{random.randrange(999)}"
        if body.get("stream") is not True:
            return json_reply(self._completion(completion_id, turn), content_type=JSON,
                              newline=True)
        return self._completion_stream(completion_id, turn, _include_usage(body))

    def _completion(self, completion_id: str, turn: Turn) -> dict:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": turn.model,
            "system_fingerprint": self._fingerprint,
            "choices": [{"text": turn.text, "index": 0, "finish_reason": turn.done_reason}],
            "usage": self._usage(turn),
        }

    def _completion_stream(self, completion_id: str, turn: Turn, include_usage: bool) -> Stream:
        # With include_usage Ollama puts a zeroed usage on every chunk (a known quirk);
        # usage_every_chunk instead sends "usage": null, as some other servers do.
        per_chunk: Any = ...
        if include_usage and self.usage_every_chunk:
            per_chunk = None
        elif include_usage and self.kind == "ollama":
            per_chunk = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

        def chunk(choices: list, usage: Any) -> bytes:
            obj = {
                "id": completion_id,
                "object": "text_completion",
                "created": int(time.time()),
                "choices": choices,
                "model": turn.model,
                "system_fingerprint": self._fingerprint,
            }
            if usage is not ...:
                obj["usage"] = usage
            return sse(obj)

        def frames() -> Iterator[bytes]:
            for piece in turn.pieces:
                yield chunk([{"text": piece, "index": 0, "finish_reason": None}], per_chunk)
            tail = chunk([{"text": "", "index": 0, "finish_reason": turn.done_reason}], per_chunk)
            if include_usage:
                tail += chunk([], self._usage(turn))
            yield tail + b"data: [DONE]\n\n"

        return Stream(SSE, frames(), len(turn.pieces) + 1,
                      lambda: sse(openai_error_obj(500, RUNNER_ERROR)))

    # ------------------------------------------------------------------ embeddings and models

    def _v1_embeddings(self, incoming: Incoming, _: Any) -> Reply:
        body, error = self._body(incoming, "openai.EmbedRequest")
        if error:
            return error
        encoding = body.get("encoding_format") or ""
        if not isinstance(encoding, str) or (
            encoding and encoding.lower() not in ("float", "base64")
        ):
            return openai_error(400, f"Invalid value for 'encoding_format' = {encoding}. "
                                     "Supported values: ['float', 'base64'].")
        value = body.get("input")
        if value == "":
            value = [""]
        if value is None or value == []:
            return openai_error(400, "invalid input")
        inputs = [value] if isinstance(value, str) else value
        if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
            return openai_error(400, "invalid input type")
        name = body.get("model") or ""
        model = self._lookup(name)
        if model is None:
            return openai_error(404, f'model "{name}" not found, try pulling it first')
        dims = embed_dims(body.get("dimensions"))
        tokens = self._turn(model, name, inputs, 0).prompt_tokens
        data = []
        for index, text in enumerate(inputs):
            vector: Any = embedding(text, dims)
            if encoding.lower() == "base64":
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": vector, "index": index})
        reply = {"object": "list", "data": data, "model": name,
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return json_reply(reply, content_type=JSON, newline=True)

    def _v1_models(self, incoming: Incoming, _: Any) -> Reply:
        data: list | None = [
            {"id": m.name, "object": "model", "created": m.modified_ns // 1_000_000_000,
             "owned_by": owned_by(m.name)}
            for m in self._catalogue.newest_first()
        ]
        # Ollama encodes an empty Go nil slice: "data": null. Real OpenAI servers send [].
        if not data and self.kind == "ollama":
            data = None
        return json_reply({"object": "list", "data": data}, content_type=JSON, newline=True)

    def _v1_model(self, incoming: Incoming, name: str) -> Reply:
        model = self._lookup(name)
        if model is None:
            return openai_error(404, f"model '{name}' not found")
        reply = {"id": name, "object": "model", "created": model.modified_ns // 1_000_000_000,
                 "owned_by": owned_by(name)}
        return json_reply(reply, content_type=JSON, newline=True)
