"""Ollama's ``/v1/responses`` (the OpenAI Responses API).

* Not streamed (``stream`` absent or false): the full response object, ``status:
  "completed"``, echoing the request's settings (instructions, tools, truncation, top_p,
  temperature, max_output_tokens, background), with one assistant message item holding an
  ``output_text`` part, and usage as ``input_tokens``/``output_tokens``/``total_tokens`` with
  their details.
* Streamed: named SSE events (``event: <type>`` then ``data:``), every payload carrying its
  ``type`` and a ``sequence_number`` counting from 0: ``response.created`` and
  ``response.in_progress``; then, only when there is text, ``response.output_item.added``,
  ``response.content_part.added`` and one ``response.output_text.delta`` per piece (the
  first step holds all of these up to the first delta), ``response.output_text.done``,
  ``response.content_part.done`` and ``response.output_item.done``; and last
  ``response.completed`` with the usage. Sent with ``Cache-Control: no-cache``.
* A failure mid-stream is an ``event: error`` frame with ``code``, ``message`` and ``param``.
* Errors before the reply are the OpenAI envelope.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any, Iterator

from ..generation import Turn, texts
from ..server import RUNNER_ERROR, Incoming
from ..wire import JSON, SSE, Reply, Stream, go_kind, json_reply, openai_error, sse_event
from .common import Endpoints


class ResponsesAPI(Endpoints):
    """``/v1/responses``; see the module docstring."""

    def _v1_responses(self, incoming: Incoming, _: Any) -> Reply | Stream:
        body, error = self._body(incoming, "openai.ResponsesRequest")
        if error:
            return error
        value = body.get("input")
        if value is not None and not isinstance(value, (str, list)):
            return openai_error(400, f"input must be a string or array: json: cannot unmarshal "
                                     f"{go_kind(value)} into Go value of type []json.RawMessage")
        name = body.get("model") or ""
        model, error = self._openai_model(name)
        if error:
            return error
        instructions = body.get("instructions") if isinstance(body.get("instructions"), str) else ""
        turn = self._turn(model, name, [instructions, *texts(value)], body.get("max_output_tokens"))
        response_id = f"resp_{random.randrange(999999)}"
        item_id = f"msg_{random.randrange(999999)}"
        if body.get("stream") is not True:
            response = self._response_object(response_id, body, turn, "completed",
                                              [self._message_item(item_id, turn.text)],
                                              self._responses_usage(turn))
            response["completed_at"] = int(time.time())
            return json_reply(response, content_type=JSON, newline=True)
        return self._responses_stream(response_id, item_id, body, turn)

    @staticmethod
    def _responses_usage(turn: Turn) -> dict:
        p, c = turn.prompt_tokens, turn.completion_tokens
        return {
            "input_tokens": p, "output_tokens": c, "total_tokens": p + c,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    @staticmethod
    def _message_item(item_id: str, text: str) -> dict:
        return {
            "id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    @staticmethod
    def _response_object(response_id: str, request: dict, turn: Turn, status: str, output: list,
                         usage: Any) -> dict:
        """The full response object Ollama's ResponsesWriter sends (echoing request settings)."""
        def number(key: str) -> Any:
            value = request.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0

        return {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": turn.model,
            "previous_response_id": None,
            "instructions": request.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": request.get("tools") or [],
            "tool_choice": "auto",
            "truncation": request.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}},
            "top_p": number("top_p"),
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": number("temperature"),
            "reasoning": None,
            "usage": usage,
            "max_output_tokens": request.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": bool(request.get("background")),
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def _responses_stream(self, response_id: str, item_id: str, request: dict,
                          turn: Turn) -> Stream:
        sequence = itertools.count()

        def event(etype: str, **fields: Any) -> bytes:
            return sse_event(etype, {"type": etype, **fields, "sequence_number": next(sequence)})

        def response(status: str, output: list, usage: Any) -> dict:
            return self._response_object(response_id, request, turn, status, output, usage)

        def part(text: str) -> dict:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def frames() -> Iterator[bytes]:
            head = (event("response.created", response=response("in_progress", [], None))
                    + event("response.in_progress", response=response("in_progress", [], None)))
            output: list = []
            tail = b""
            if turn.pieces:  # Ollama opens the message item only once there is text
                head += event("response.output_item.added", output_index=0,
                              item={"id": item_id, "type": "message", "status": "in_progress",
                                    "role": "assistant", "content": []})
                head += event("response.content_part.added", **where, part=part(""))
                for index, piece in enumerate(turn.pieces):
                    delta = event("response.output_text.delta", **where, delta=piece, logprobs=[])
                    yield head + delta if index == 0 else delta
                head = b""
                text = turn.text
                tail = (event("response.output_text.done", **where, text=text, logprobs=[])
                        + event("response.content_part.done", **where, part=part(text))
                        + event("response.output_item.done", output_index=0,
                                item=self._message_item(item_id, text)))
                output = [self._message_item(item_id, text)]
            final = response("completed", output, self._responses_usage(turn))
            final["completed_at"] = int(time.time())
            yield head + tail + event("response.completed", response=final)

        def error_frame() -> bytes:
            return event("error", code="api_error", message=RUNNER_ERROR, param=None)

        return Stream(SSE, frames(), len(turn.pieces) + 1, error_frame,
                      (("Cache-Control", "no-cache"),))
