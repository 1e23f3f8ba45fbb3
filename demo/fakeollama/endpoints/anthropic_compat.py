"""Ollama's Anthropic-compatible ``/v1/messages``.

* ``model``, a positive ``max_tokens`` and non-empty ``messages`` are required (400
  otherwise). The prompt is the ``system`` text plus every message's content.
* Not streamed (``stream`` absent or false): one ``message`` object with a ``text`` content
  block (none for an empty reply), ``stop_reason`` ``"end_turn"`` or ``"max_tokens"``, and
  ``usage`` as ``input_tokens``/``output_tokens``.
* Streamed: named SSE events (``event: <type>`` then ``data:``, every payload carrying its
  ``type``): ``message_start`` (usage with the input tokens); then, only when there is text,
  ``content_block_start`` and one ``content_block_delta`` per piece (the first step holds
  all of these up to the first delta) and ``content_block_stop``; and last
  ``message_delta`` (stop reason and usage) and ``message_stop``. Sent with
  ``Cache-Control: no-cache``.
* Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}, "request_id"}``;
  a failure mid-stream is an ``event: error`` frame of that ``error`` object.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from ..generation import Turn, message_texts, texts
from ..server import RUNNER_ERROR, Incoming
from ..wire import JSON, SSE, Reply, Stream, anthropic_error, is_int, json_reply, sse_event
from .common import Endpoints


class AnthropicAPI(Endpoints):
    """``/v1/messages``; see the module docstring."""

    def _v1_messages(self, incoming: Incoming, _: Any) -> Reply | Stream:
        body, error = self._body(incoming, "anthropic.MessagesRequest")
        if error:
            return error
        name = body.get("model") or ""
        if not name:
            return anthropic_error(400, "model is required")
        max_tokens = body.get("max_tokens")
        if not is_int(max_tokens) or max_tokens <= 0:
            return anthropic_error(400, "max_tokens is required and must be positive")
        messages = body.get("messages")
        if not messages or not isinstance(messages, list):
            return anthropic_error(400, "messages is required")
        model = self._lookup(name)
        if model is None:
            return anthropic_error(404, f"model '{name}' not found")
        prompt_texts = [*texts(body.get("system")), *message_texts(messages)]
        turn = self._turn(model, name, prompt_texts, max_tokens)
        message_id = f"msg_{random.getrandbits(96):024x}"
        stop_reason = "max_tokens" if turn.done_reason == "length" else "end_turn"
        if body.get("stream") is not True:
            content = [{"type": "text", "text": turn.text}] if turn.pieces else []
            return json_reply({
                "id": message_id, "type": "message", "role": "assistant", "model": name,
                "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                "usage": {"input_tokens": turn.prompt_tokens,
                          "output_tokens": turn.completion_tokens},
            }, content_type=JSON, newline=True)
        return self._messages_stream(message_id, turn, stop_reason)

    def _messages_stream(self, message_id: str, turn: Turn, stop_reason: str) -> Stream:
        def event(etype: str, **fields: Any) -> bytes:
            return sse_event(etype, {"type": etype, **fields})

        def frames() -> Iterator[bytes]:
            head = event("message_start", message={
                "id": message_id, "type": "message", "role": "assistant", "model": turn.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": turn.prompt_tokens, "output_tokens": 0},
            })
            tail = b""
            if turn.pieces:
                head += event("content_block_start", index=0,
                              content_block={"type": "text", "text": ""})
                for index, piece in enumerate(turn.pieces):
                    delta = event("content_block_delta", index=0,
                                  delta={"type": "text_delta", "text": piece})
                    yield head + delta if index == 0 else delta
                head = b""
                tail = event("content_block_stop", index=0)
            tail += event("message_delta",
                          delta={"stop_reason": stop_reason, "stop_sequence": None},
                          usage={"input_tokens": turn.prompt_tokens,
                                 "output_tokens": turn.completion_tokens})
            yield head + tail + event("message_stop")

        def error_frame() -> bytes:
            return event("error", error={"type": "api_error", "message": RUNNER_ERROR})

        return Stream(SSE, frames(), len(turn.pieces) + 1, error_frame,
                      (("Cache-Control", "no-cache"),))
