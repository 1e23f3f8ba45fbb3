"""Ollama's wire formats as bytes: how a whole or streamed reply is framed, the error shape of
each API, the texts Go's encoding/json gives for a bad body, and Go's timestamps.

* JSON is written as Go's encoding/json writes it: no spaces, non-ASCII kept as UTF-8.
  Native replies (``/api/*``) go out through Gin's ``c.JSON``: ``application/json;
  charset=utf-8`` and no trailing newline. The OpenAI and Anthropic writers set a plain
  ``application/json`` and use ``json.NewEncoder``, which ends the body with ``"\\n"``.
* Native streams are NDJSON (``application/x-ndjson``): one JSON object per line.
* OpenAI streams are SSE (``text/event-stream``): ``data: <json>\\n\\n`` frames, no ``event:``
  or ``id:`` lines, ended by ``data: [DONE]\\n\\n``. ``/v1/responses`` and ``/v1/messages``
  name every frame: ``event: <type>\\ndata: <json>\\n\\n``.
* Errors: native ``{"error": "<message>"}``; OpenAI's envelope
  ``{"error": {"message", "type", "param": null, "code"}}`` (type ``invalid_request_error``
  for 400, ``not_found_error`` for 404, ``api_error`` otherwise); Anthropic's
  ``{"type": "error", "error": {"type", "message"}, "request_id": "req_..."}``.
* A body that is not JSON is answered with the text Go's decoder would give
  (``invalid character 'x' looking for beginning of value``, ``unexpected EOF``, ...), and a
  value of the wrong kind with ``json: cannot unmarshal <kind> into Go ...``.
* Timestamps are Go's ``time.RFC3339Nano`` in UTC.

An endpoint answers with a `Reply` (a whole body, sent with Content-Length) or a `Stream`
(steps the server sends one per HTTP chunk, each holding whole NDJSON lines or SSE frames).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any, Callable, Iterator

JSON_UTF8 = "application/json; charset=utf-8"  # Gin's c.JSON (native replies)
JSON = "application/json"  # the OpenAI/Anthropic writers override Gin's header
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"


# --------------------------------------------------------------------------- framing


def dumps(obj: Any) -> bytes:
    # Go's encoding/json writes no spaces; match it so byte-level tests see the real shape.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def ndjson(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def sse_event(event: str, obj: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


@dataclasses.dataclass
class Reply:
    """A whole, non-streamed answer (sent with Content-Length)."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = JSON_UTF8
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class Stream:
    """A streamed answer: ``count`` steps, each sent as one HTTP chunk."""

    content_type: str
    steps: Iterator[bytes]
    count: int
    error_frame: Callable[[], bytes]  # what fail="midstream" sends after two steps
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(obj: Any, status: int = 200, content_type: str = JSON_UTF8,
               newline: bool = False) -> Reply:
    # Ollama's OpenAI/Anthropic writers use json.NewEncoder, which ends the body with "\n".
    return Reply(status, dumps(obj) + (b"\n" if newline else b""), content_type)


# --------------------------------------------------------------------------- timestamps


def rfc3339(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: nanoseconds with trailing zeros dropped, and a Z."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def now() -> str:
    return rfc3339(time.time_ns())


# --------------------------------------------------------------------------- Go's JSON


def is_int(value: Any) -> bool:
    """A JSON integer (a Python bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def go_kind(value: Any) -> str:
    """The JSON kind Go names in unmarshal errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def go_json_error(doc: str, err: json.JSONDecodeError) -> str:
    """Translate a Python decode error into the text Go's encoding/json would give."""
    rest = doc[err.pos:]
    if not rest.strip() or err.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    char = rest[0]
    if err.msg.startswith("Expecting property name"):
        return f"invalid character '{char}' looking for beginning of object key string"
    if err.msg == "Extra data":
        return f"invalid character '{char}' after top-level value"
    if err.msg.startswith("Expecting ':'"):
        return f"invalid character '{char}' after object key"
    if err.msg.startswith("Expecting ','"):
        return f"invalid character '{char}' after object key:value pair"
    return f"invalid character '{char}' looking for beginning of value"


# --------------------------------------------------------------------------- error shapes


def native_error(status: int, message: str) -> Reply:
    return json_reply({"error": message}, status)


def openai_error_obj(status: int, message: str, etype: str | None = None,
                     code: str | None = None) -> dict:
    if etype is None:
        etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def openai_error(status: int, message: str, etype: str | None = None,
                 code: str | None = None) -> Reply:
    return json_reply(openai_error_obj(status, message, etype, code), status, JSON)


_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> Reply:
    body = {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        "request_id": f"req_{random.getrandbits(96):024x}",
    }
    return json_reply(body, status, JSON)
