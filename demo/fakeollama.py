"""A faithful fake Ollama server (stdlib only) for tests, demos and benchmarks.

It speaks Ollama's real wire formats: the native ``/api/*`` API with NDJSON streams,
the OpenAI-compatible ``/v1/*`` endpoints with SSE streams, ``/v1/responses`` and the
Anthropic-compatible ``/v1/messages``. With ``kind="openai"`` it instead plays a plain
OpenAI-compatible server (like DeepSeek's) under an optional path prefix.

It runs on asyncio streams: HTTP/1.1 keep-alive, ``Content-Length`` for whole bodies,
chunked transfer encoding for streams (one HTTP chunk per step, and every chunk holds whole
NDJSON lines or SSE frames), no thread per request.

Usage::

    fake = FakeOllama().start()          # background thread, own event loop
    ... talk to fake.url ...
    fake.stop()

    python demo/fakeollama.py --port 11434   # foreground demo upstream

Determinism rules (tests compute expected numbers from these)
--------------------------------------------------------------
* ``count_tokens(text)`` is the number of whitespace-separated words in ``text``, and at
  least 1 when ``text`` is not empty (so ``""`` counts 0 and ``" "`` counts 1).
* **Prompt tokens** = ``count_tokens`` of the non-empty prompt texts of the request joined
  with single spaces. The prompt texts are: ``system`` and ``prompt`` (``/api/generate``,
  ``/v1/completions``); every message's ``content`` (``/api/chat``,
  ``/v1/chat/completions``, ``/v1/messages``: a string, or the ``text`` of each content
  part/block) plus Anthropic's ``system``; ``instructions`` and ``input`` (a string, or the
  text/content/output strings of its items) on ``/v1/responses``; the ``input`` string(s)
  on ``/api/embed`` and ``/v1/embeddings``.
* **The reply** is ``chunks`` pieces (default 5), piece ``i`` being
  ``REPLY_WORDS[i % len(REPLY_WORDS)] + " "``: "Hello ", "from ", "the ", "fake ", "model ",
  "this ", ... **Completion tokens** = the number of pieces.
* A token limit smaller than ``chunks`` cuts the reply to that many pieces and the
  finish reason becomes ``"length"`` (Anthropic: ``"max_tokens"``); otherwise it is
  ``"stop"`` (``"end_turn"``). Limits: ``options.num_predict`` (native), ``max_tokens``
  (chat/completions/messages), ``max_output_tokens`` (responses). Negative limits mean
  "no limit", as in Ollama.
* A streamed reply sends one content piece per step, then a final step (native: the
  ``done:true`` line with the counts; SSE: finish/usage frames and ``[DONE]``).
  ``chunk_delay`` seconds pass between steps, not before the first.
* An empty ``prompt`` (generate) or ``messages`` (chat) is a "load the model" call: one
  JSON object with ``done_reason: "load"`` (``"unload"`` with ``keep_alive: 0``).
* Embeddings have ``EMBED_DIM`` (64) dimensions unless ``dimensions`` asks otherwise; the
  values are derived from a hash of the text and L2-normalised.

Fault injection (attributes, settable at any time from another thread; they act before
the ``require_bearer`` check, on every request once its body has been read and recorded):

* ``fail = "500"``: status 500 with ``RUNNER_ERROR`` in the endpoint's error shape
  (native ``{"error": ...}``, the OpenAI envelope on ``/v1/*``, Anthropic's on ``/v1/messages``).
* ``fail = "reset"``: the socket is closed with an RST and no answer.
* ``fail = "stall"``: no answer at all until the server stops.
* ``fail = "midstream"``: a stream sends two steps, then an error frame, then ends cleanly
  (native ``{"error": ...}`` line; ``data: {"error": {...}}`` on chat/completions, no
  ``[DONE]``; ``event: error`` on ``/v1/responses`` and ``/v1/messages``). A stream with fewer
  steps sends all but its final step first. Non-streamed replies are unaffected.
* ``fail = "cut"``: like midstream, but the connection is closed after the two steps,
  without the chunked-encoding end marker.
* ``gate = threading.Event()``: every stream sends its first step, then waits for the event.
* ``hold_final = threading.Event()``: every stream sends all its content steps, then waits
  for the event before its final step (the one with the counts), so a client can leave
  having received the whole reply but not the counts.
* ``openai_style = "new" | "legacy"`` and ``usage_every_chunk`` choose the chat SSE variant.
* ``byte_at_a_time = True``: streams go out one byte per HTTP chunk, so every line and
  event arrives split across chunk boundaries.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import http
import itertools
import json
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from email.utils import formatdate
from typing import Any, Callable, Iterator
from urllib.parse import unquote

OLLAMA_VERSION = "0.33.0"
DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5:7b", "nomic-embed-text:latest")
DEFAULT_CHUNKS = 5
EMBED_DIM = 64
REPLY_WORDS = (
    "Hello", "from", "the", "fake", "model", "this", "reply", "is", "deterministic",
    "and", "every", "word", "counts", "as", "one", "token",
)
# The message a crashed llama runner produces; used for every injected failure.
RUNNER_ERROR = "llama runner process has terminated: exit status 2"
FAIL_MODES = (None, "500", "reset", "stall", "midstream", "cut")

JSON_UTF8 = "application/json; charset=utf-8"  # Gin's c.JSON (native replies)
JSON = "application/json"  # the OpenAI/Anthropic writers override Gin's header
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain; charset=utf-8"

# Fixed "modified_at" of the first configured model; later ones are an hour older each,
# so the configured order is also /api/tags' newest-first order.
_EPOCH_NS = 1746405464_706015396


def count_tokens(text: str) -> int:
    """Words in ``text``; at least 1 for any non-empty text."""
    words = len(text.split())
    return words if words else (1 if text else 0)


@dataclasses.dataclass
class Received:
    """One request as the fake received it."""

    method: str
    path: str  # raw request target, query included, exactly as sent
    headers: list[tuple[str, str]]  # as received, case and order kept
    body: bytes
    json: Any = None  # the parsed body, or None when it is not JSON

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found


# --------------------------------------------------------------------------- helpers


def _dumps(obj: Any) -> bytes:
    # Go's encoding/json writes no spaces; match it so byte-level tests see the real shape.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _ndjson(obj: Any) -> bytes:
    return _dumps(obj) + b"\n"


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _sse_event(event: str, obj: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _rfc3339(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: nanoseconds with trailing zeros dropped, and a Z."""
    seconds, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{frac:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def _now() -> str:
    return _rfc3339(time.time_ns())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _go_kind(value: Any) -> str:
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


def _go_json_error(doc: str, err: json.JSONDecodeError) -> str:
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


def _texts(value: Any) -> list[str]:
    """Prompt text inside a content value: a string, or parts/blocks/items holding text."""
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                for key in ("text", "content", "output"):
                    out.extend(_texts(part.get(key)))
    return out


def _message_texts(messages: Any) -> list[str]:
    out: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            out.extend(_texts(message.get("content")))
    return out


def _unloads(keep_alive: Any) -> bool:
    """keep_alive 0 (number or a zero duration string) asks Ollama to unload the model."""
    if _is_int(keep_alive) or isinstance(keep_alive, float):
        return keep_alive == 0
    if isinstance(keep_alive, str):
        return re.fullmatch(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?", keep_alive.strip()) is not None
    return False


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        raw.extend(b / 127.5 - 1.0 for b in digest)
        counter += 1
    raw = raw[:dims]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 7) for x in raw]


def _owned_by(name: str) -> str:
    """The namespace Ollama's model.ParseName finds: "library" for plain names."""
    parts = name.split(":")[0].split("/")
    return "library" if len(parts) == 1 else parts[-2]


# --------------------------------------------------------------------------- models


@dataclasses.dataclass
class _Model:
    name: str
    modified_ns: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def embedding(self) -> bool:
        return "embed" in self.name.split("/")[-1]

    @property
    def size(self) -> int:
        return 250_000_000 + int(self.digest[:7], 16) * 100

    @property
    def family(self) -> str:
        if self.embedding:
            return "nomic-bert"
        base = self.name.split("/")[-1].split(":")[0]
        match = re.match(r"[a-z]+", base.lower())
        return match.group(0) if match else "llama"

    @property
    def details(self) -> dict:
        tag = self.name.rsplit(":", 1)[-1]
        size = re.fullmatch(r"(\d+(?:\.\d+)?)b", tag.lower())
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": f"{size.group(1)}B" if size else ("137M" if self.embedding else "3.2B"),
            "quantization_level": "F16" if self.embedding else "Q4_K_M",
        }

    def tag_entry(self) -> dict:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": _rfc3339(self.modified_ns),
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


def _full_name(name: str) -> str:
    """The name as Ollama lists it: the tag defaults to "latest"."""
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _model_key(name: str) -> str:
    """Ollama matches names case-insensitively, with ":latest" as the default tag."""
    key = name.strip().lower()
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key


# --------------------------------------------------------------------------- replies


@dataclasses.dataclass
class _Reply:
    """A whole, non-streamed answer (sent with Content-Length)."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = JSON_UTF8
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class _Stream:
    """A streamed answer: ``count`` steps, each sent as one HTTP chunk."""

    content_type: str
    steps: Iterator[bytes]
    count: int
    error_frame: Callable[[], bytes]  # what fail="midstream" sends after two steps
    headers: tuple[tuple[str, str], ...] = ()


def _json_reply(obj: Any, status: int = 200, content_type: str = JSON_UTF8, newline: bool = False) -> _Reply:
    # Ollama's OpenAI/Anthropic writers use json.NewEncoder, which ends the body with "\n".
    return _Reply(status, _dumps(obj) + (b"\n" if newline else b""), content_type)


def _native_error(status: int, message: str) -> _Reply:
    return _json_reply({"error": message}, status)


def _openai_error_obj(status: int, message: str, etype: str | None = None, code: str | None = None) -> dict:
    if etype is None:
        etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def _openai_error(status: int, message: str, etype: str | None = None, code: str | None = None) -> _Reply:
    return _json_reply(_openai_error_obj(status, message, etype, code), status, JSON)


_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error",
}


def _anthropic_error(status: int, message: str) -> _Reply:
    body = {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        "request_id": f"req_{random.getrandbits(96):024x}",
    }
    return _json_reply(body, status, JSON)


@dataclasses.dataclass
class _Turn:
    """One generated reply: what every inference endpoint formats in its own shape."""

    model: str  # the request's model string, echoed back unchanged
    prompt_tokens: int
    pieces: list[str]
    done_reason: str  # "stop" | "length" | "load" | "unload"
    started_ns: int = dataclasses.field(default_factory=time.monotonic_ns)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def metrics(self) -> dict:
        """Ollama's final-chunk metrics: integer nanoseconds and the two counts."""
        load = 1_250_000
        prompt_eval = 40_000 * max(self.prompt_tokens, 1)
        elapsed = time.monotonic_ns() - self.started_ns
        evaluation = max(elapsed - load - prompt_eval, 0) + 1_000_000 * max(self.completion_tokens, 1)
        return {
            "total_duration": load + prompt_eval + evaluation,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt_eval,
            "eval_count": self.completion_tokens,
            "eval_duration": evaluation,
        }


@dataclasses.dataclass
class _Incoming:
    received: Received
    path: str  # path without query string and without the configured prefix
    json_error: str | None  # Go-style decode error text, when the body is not JSON
    keep_alive: bool
    is_head: bool


# --------------------------------------------------------------------------- server


class FakeOllama:
    """A fake Ollama (or OpenAI-compatible) HTTP server; see the module docstring."""

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
        self.host = host
        self.kind = kind
        self.name = name
        self.prefix = prefix.rstrip("/")
        self.require_bearer = require_bearer
        self.chunk_delay = chunk_delay
        self.chunks = DEFAULT_CHUNKS if chunks is None else chunks
        # Fault injection and stream style; read on every request, so set them any time.
        self.fail: str | None = None
        self.gate: threading.Event | None = None
        self.hold_final: threading.Event | None = None
        self.openai_style = "new"  # "new" (Ollama >= 0.32.6) or "legacy"
        self.usage_every_chunk = False
        self.byte_at_a_time = False  # streams sent one byte per chunk

        self._requested_port = port
        self._port = 0
        self._models = {
            _model_key(m): _Model(m, _EPOCH_NS - i * 3_600_000_000_000) for i, m in enumerate(models)
        }
        self._loaded: dict[str, int] = {}  # model key -> last use (ns), for /api/ps
        self._blobs: set[str] = set()
        self._requests: list[Received] = []
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._routes, self._param_routes = self._build_routes()

    # ------------------------------------------------------------------ public API

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def requests(self) -> list[Received]:
        """A snapshot of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def start(self) -> "FakeOllama":
        """Serve from a daemon thread with its own event loop; return once listening."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._closing = asyncio.Event()
            await self._run(ready.set)

        def target() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:  # e.g. the port is taken: report it to start()
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=target, name=f"fakeollama-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start within 10 s")
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and join the thread (at most ~5 s)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._request_stop()
        thread.join(timeout=5)

    def __enter__(self) -> "FakeOllama":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ lifecycle

    def _request_stop(self) -> None:
        loop, closing = self._loop, self._closing
        if loop is None or closing is None:
            return
        try:
            loop.call_soon_threadsafe(closing.set)
        except RuntimeError:  # the loop is already closed
            pass

    async def _run(self, on_ready: Callable[[], None]) -> None:
        """Listen until ``self._closing`` is set, then tear everything down."""
        assert self._closing is not None
        self._loop = asyncio.get_running_loop()
        # A large backlog: the benchmark opens ~1000 connections at once.
        server = await asyncio.start_server(
            self._serve_connection, self.host, self._requested_port, backlog=4096, limit=1 << 20
        )
        self._port = server.sockets[0].getsockname()[1]
        on_ready()
        try:
            await self._closing.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    # ------------------------------------------------------------------ HTTP layer

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                incoming = await self._read_request(reader, writer)
                if incoming is None:
                    break
                with self._lock:
                    self._requests.append(incoming.received)
                if not await self._answer(incoming, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
            pass  # the client went away or sent garbage (e.g. a bad chunk size): drop it
        except asyncio.CancelledError:
            # Shutdown cancels connection tasks. Ending quietly matters on Python 3.11,
            # whose StreamReaderProtocol logs a traceback for a cancelled handler task.
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.close()

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Incoming | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the client closed the connection between requests
        except asyncio.LimitOverrunError:
            await self._write_reply(writer, _Reply(431, b"", None), head_only=False, keep_alive=False)
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._write_reply(writer, _Reply(400, b"400 Bad Request", TEXT), head_only=False, keep_alive=False)
            return None
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers.append((key, value.strip()))
        lower = {k.lower(): v for k, v in headers}
        if lower.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in lower.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        else:
            length_text = lower.get("content-length") or "0"
            if not length_text.isdigit():
                await self._write_reply(writer, _Reply(400, b"400 Bad Request", TEXT), head_only=False,
                                        keep_alive=False)
                return None
            length = int(length_text)
            body = await reader.readexactly(length) if length else b""
        connection = lower.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"

        parsed, json_error = None, None
        if body.strip():
            text = body.decode("utf-8", errors="replace")
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                json_error = _go_json_error(text, exc)
        path = target.split("?", 1)[0]
        if self.prefix:
            path = path[len(self.prefix):] if path.startswith(self.prefix + "/") else ""
        return _Incoming(
            Received(method, target, headers, body, parsed), path, json_error, keep_alive, method == "HEAD"
        )

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)

    async def _answer(self, incoming: _Incoming, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return whether the connection may carry another."""
        fail = self.fail
        if fail == "reset":
            self._reset(writer)
            return False
        if fail == "stall":
            assert self._closing is not None
            await self._closing.wait()
            return False
        # Faults come before the key check: a broken upstream is broken for every caller.
        reply = self._error(incoming.path, 500, RUNNER_ERROR) if fail == "500" else self._auth_error(incoming)
        if reply is None:
            try:
                reply = self._dispatch(incoming)
            except Exception as exc:  # a bug in the fake must not look like a network fault
                traceback.print_exc(file=sys.stderr)
                reply = _native_error(500, f"fakeollama internal error: {exc}")
        if isinstance(reply, _Stream):  # no streaming endpoint answers HEAD
            return await self._write_stream(writer, reply, incoming.keep_alive)
        await self._write_reply(writer, reply, incoming.is_head, incoming.keep_alive)
        return incoming.keep_alive

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        # SO_LINGER 0 makes close() send an RST, like a crashed upstream.
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        writer.transport.abort()

    _date_cache: tuple[int, str] = (0, "")

    @classmethod
    def _date(cls) -> str:
        now = int(time.time())
        if cls._date_cache[0] != now:  # formatting a date per request costs real time
            cls._date_cache = (now, formatdate(now, usegmt=True))
        return cls._date_cache[1]

    def _head(self, status: int, content_type: str | None, extra: tuple, keep_alive: bool, length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.extend(f"{k}: {v}" for k, v in extra)
        lines.append(f"Date: {self._date()}")
        lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _write_reply(
        self, writer: asyncio.StreamWriter, reply: _Reply, head_only: bool, keep_alive: bool
    ) -> None:
        head = self._head(reply.status, reply.content_type, reply.headers, keep_alive, len(reply.body))
        writer.write(head if head_only else head + reply.body)
        await writer.drain()

    async def _write_stream(self, writer: asyncio.StreamWriter, stream: _Stream, keep_alive: bool) -> bool:
        fail = self.fail
        broken = fail in ("midstream", "cut")
        # A broken stream never reaches its final step, so clients always see it end early.
        limit = min(2, stream.count - 1) if broken else stream.count
        writer.write(self._head(200, stream.content_type, stream.headers, keep_alive, None))
        for index, step in enumerate(stream.steps):
            if index >= limit:
                break
            if index == 1:
                await self._wait_gate()
            if index == stream.count - 1:
                await self._wait_event(self.hold_final)
            if index > 0 and self.chunk_delay > 0:
                await asyncio.sleep(self.chunk_delay)
            if self.byte_at_a_time:
                # Every byte its own HTTP chunk and TCP segment: frames split anywhere.
                for i in range(len(step)):
                    writer.write(b"1\r\n%s\r\n" % step[i:i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.0005)
            else:
                writer.write(b"%x\r\n%s\r\n" % (len(step), step))
                await writer.drain()
        if fail == "cut":
            writer.close()  # flushes the two chunks, then FIN without the last-chunk marker
            return False
        if fail == "midstream":
            frame = stream.error_frame()
            writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep_alive

    async def _wait_gate(self) -> None:
        await self._wait_event(self.gate)

    async def _wait_event(self, gate: threading.Event | None) -> None:
        if gate is None:
            return
        assert self._closing is not None
        # threading.Event cannot wake an event loop, so poll it.
        while not gate.is_set() and not self._closing.is_set():
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ routing

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

    def _dispatch(self, incoming: _Incoming) -> _Reply | _Stream:
        path, method = incoming.path, incoming.received.method
        methods, arg = self._routes.get(path), None
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

    def _unrouted(self, status: int, incoming: _Incoming) -> _Reply:
        if self.kind == "openai":  # OpenAI-style servers answer in JSON even here
            what = "Invalid URL" if status == 404 else "Method not allowed"
            target = incoming.received.path.split("?", 1)[0]
            return _openai_error(status, f"{what} ({incoming.received.method} {target})", "invalid_request_error")
        # Gin's default bodies, as plain text (not JSON).
        text = b"404 page not found" if status == 404 else b"405 method not allowed"
        return _Reply(status, text, TEXT)

    def _family(self, path: str) -> str:
        if self.kind == "openai":
            return "openai"
        if path == "/v1/messages":
            return "anthropic"
        return "openai" if path.startswith("/v1/") else "native"

    def _error(self, path: str, status: int, message: str) -> _Reply:
        family = self._family(path)
        if family == "anthropic":
            return _anthropic_error(status, message)
        if family == "openai":
            return _openai_error(status, message)
        return _native_error(status, message)

    def _auth_error(self, incoming: _Incoming) -> _Reply | None:
        if self.require_bearer is None:
            return None
        if incoming.received.header("authorization") == f"Bearer {self.require_bearer}":
            return None
        return _openai_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    def _body(self, incoming: _Incoming, go_type: str) -> tuple[dict, _Reply | None]:
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
            message = f"json: cannot unmarshal {_go_kind(body)} into Go value of type {go_type}"
            return {}, self._error(path, 400, message)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            struct_name = go_type.rsplit(".", 1)[-1]
            message = (f"json: cannot unmarshal {_go_kind(model)} into Go struct field "
                       f"{struct_name}.model of type string")
            return {}, self._error(path, 400, message)
        return body, None

    # ------------------------------------------------------------------ model state

    def _lookup(self, name: str) -> _Model | None:
        return self._models.get(_model_key(name)) if name else None

    def _sorted_models(self) -> list[_Model]:
        return sorted(self._models.values(), key=lambda m: m.modified_ns, reverse=True)

    def _add_model(self, name: str) -> None:
        # Ollama lists what it stores under the full name, ":latest" included.
        self._models[_model_key(name)] = _Model(_full_name(name), time.time_ns())

    def _turn(self, model: _Model, name: str, texts: list[Any], limit: Any = None) -> _Turn:
        """Generate the deterministic reply for a request (see the module docstring)."""
        self._loaded[_model_key(model.name)] = time.time_ns()
        prompt = " ".join(t for t in texts if isinstance(t, str) and t)
        count, reason = max(self.chunks, 0), "stop"
        if _is_int(limit) and 0 <= limit < count:
            count, reason = limit, "length"
        pieces = [REPLY_WORDS[i % len(REPLY_WORDS)] + " " for i in range(count)]
        return _Turn(name, count_tokens(prompt), pieces, reason)

    # ------------------------------------------------------------------ native: read endpoints

    def _root(self, incoming: _Incoming, _: Any) -> _Reply:
        return _Reply(200, b"Ollama is running", TEXT)

    def _version(self, incoming: _Incoming, _: Any) -> _Reply:
        return _json_reply({"version": OLLAMA_VERSION})

    def _status(self, incoming: _Incoming, _: Any) -> _Reply:
        return _json_reply({"cloud": {"disabled": False, "source": "default"}})

    def _tags(self, incoming: _Incoming, _: Any) -> _Reply:
        return _json_reply({"models": [m.tag_entry() for m in self._sorted_models()]})

    def _ps(self, incoming: _Incoming, _: Any) -> _Reply:
        running = []
        for key, used_ns in sorted(self._loaded.items(), key=lambda kv: kv[1], reverse=True):
            model = self._models.get(key)
            if model is None:
                continue
            running.append({
                "name": model.name,
                "model": model.name,
                "size": model.size,
                "digest": model.digest,
                "details": model.details,
                "expires_at": _rfc3339(used_ns + 300_000_000_000),  # default keep_alive: 5 min
                "size_vram": model.size,
                "context_length": 4096,
            })
        return _json_reply({"models": running})

    def _show(self, incoming: _Incoming, _: Any) -> _Reply:
        body, error = self._body(incoming, "api.ShowRequest")
        if error:
            return error
        name = body.get("model") or body.get("name") or ""
        if not isinstance(name, str) or not name:
            return _native_error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return _native_error(404, f"model '{name}' not found")
        family = model.family
        return _json_reply({
            "modelfile": ("# Modelfile generated by \"ollama show\"\n"
                          f"FROM /root/.ollama/models/blobs/sha256-{model.digest}\n"),
            "parameters": "stop                           \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": model.details,
            "model_info": {
                "general.architecture": family,
                "general.parameter_count": model.size // 2,
                f"{family}.context_length": 131072,
            },
            "capabilities": ["embedding"] if model.embedding else ["completion", "tools"],
            "modified_at": _rfc3339(model.modified_ns),
        })

    # ------------------------------------------------------------------ native: inference

    def _generate(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, error = self._body(incoming, "api.GenerateRequest")
        if error:
            return error
        name = body.get("model") or ""
        model = self._lookup(name)
        if model is None:  # a missing model is a 404 here, unlike /api/chat
            return _native_error(404, f"model '{name}' not found")
        if model.embedding:
            return _native_error(400, f'"{name}" does not support generate')
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return self._load_reply(body, name, {"response": ""})
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        turn = self._turn(model, name, [body.get("system"), prompt], options.get("num_predict"))
        if body.get("stream") is False:
            return _json_reply(self._native_final(turn, "generate", full=True))
        return self._native_stream(turn, "generate")

    def _chat(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, error = self._body(incoming, "api.ChatRequest")
        if error:
            return error
        name = body.get("model") or ""
        if not name:
            return _native_error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return _native_error(404, f"model '{name}' not found")
        if model.embedding:
            return _native_error(400, f'"{name}" does not support chat')
        messages = body.get("messages")
        if not messages:
            return self._load_reply(body, name, {"message": {"role": "assistant", "content": ""}})
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        turn = self._turn(model, name, _message_texts(messages), options.get("num_predict"))
        if body.get("stream") is False:
            return _json_reply(self._native_final(turn, "chat", full=True))
        return self._native_stream(turn, "chat")

    @staticmethod
    def _load_reply(body: dict, name: str, empty: dict) -> _Reply:
        # Sent as one object even when streaming is on, as Ollama does.
        reason = "unload" if _unloads(body.get("keep_alive")) else "load"
        return _json_reply({"model": name, "created_at": _now(), **empty, "done": True, "done_reason": reason})

    @staticmethod
    def _native_piece(turn: _Turn, api: str, piece: str) -> dict:
        if api == "generate":
            return {"model": turn.model, "created_at": _now(), "response": piece, "done": False}
        message = {"role": "assistant", "content": piece}
        return {"model": turn.model, "created_at": _now(), "message": message, "done": False}

    @staticmethod
    def _native_final(turn: _Turn, api: str, full: bool) -> dict:
        """The done:true object; ``full`` carries the whole text (non-streamed replies)."""
        text = turn.text if full else ""
        out: dict[str, Any] = {"model": turn.model, "created_at": _now()}
        if api == "generate":
            out["response"] = text
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["done"] = True
        out["done_reason"] = turn.done_reason
        if api == "generate":
            out["context"] = list(range(1, turn.prompt_tokens + turn.completion_tokens + 1))
        out.update(turn.metrics())
        return out

    def _native_stream(self, turn: _Turn, api: str) -> _Stream:
        def lines() -> Iterator[bytes]:
            for piece in turn.pieces:
                yield _ndjson(self._native_piece(turn, api, piece))
            yield _ndjson(self._native_final(turn, api, full=False))

        return _Stream(NDJSON, lines(), len(turn.pieces) + 1, lambda: _ndjson({"error": RUNNER_ERROR}))

    @staticmethod
    def _embed_inputs(value: Any) -> list[str] | None:
        """/api/embed's input as a list of strings; None when its type is invalid."""
        if isinstance(value, str):
            return [value] if value else []
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return None

    def _embed(self, incoming: _Incoming, _: Any) -> _Reply:
        body, error = self._body(incoming, "api.EmbedRequest")
        if error:
            return error
        name = body.get("model") or ""
        model = self._lookup(name)
        if model is None:
            message = f"model '{name}' not found" if not name else f'model "{name}" not found, try pulling it first'
            return _native_error(404, message)
        inputs = self._embed_inputs(body.get("input"))
        if inputs is None:
            return _native_error(400, "invalid input type")
        if not inputs:
            return _json_reply({"model": name, "embeddings": []})
        dims = body.get("dimensions") if _is_int(body.get("dimensions")) and body["dimensions"] > 0 else EMBED_DIM
        turn = self._turn(model, name, inputs, 0)
        metrics = turn.metrics()
        return _json_reply({
            "model": name,
            "embeddings": [_embedding(text, dims) for text in inputs],
            "total_duration": metrics["total_duration"],
            "load_duration": metrics["load_duration"],
            "prompt_eval_count": turn.prompt_tokens,
        })

    def _embeddings(self, incoming: _Incoming, _: Any) -> _Reply:
        body, error = self._body(incoming, "api.EmbeddingRequest")
        if error:
            return error
        name = body.get("model") or ""
        if not name:
            return _native_error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return _native_error(404, f'model "{name}" not found, try pulling it first')
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _json_reply({"embedding": []})
        self._turn(model, name, [prompt])
        return _json_reply({"embedding": _embedding(prompt, EMBED_DIM)})

    # ------------------------------------------------------------------ native: admin

    def _progress(self, statuses: list[dict], body: dict, on_success: Callable[[], None]) -> _Reply | _Stream:
        """A pull/push/create progress stream ending {"status":"success"}."""
        if body.get("stream") is False:
            on_success()
            return _json_reply({"status": "success"})

        def lines() -> Iterator[bytes]:
            for status in statuses:
                yield _ndjson(status)
            on_success()
            yield _ndjson({"status": "success"})

        return _Stream(NDJSON, lines(), len(statuses) + 1, lambda: _ndjson({"error": RUNNER_ERROR}))

    def _admin_name(self, incoming: _Incoming, go_type: str) -> tuple[dict, str, _Reply | None]:
        body, error = self._body(incoming, go_type)
        if error:
            return body, "", error
        name = body.get("model") or body.get("name") or ""  # "name" is the deprecated alias
        if not isinstance(name, str) or not name:
            return body, "", _native_error(400, "invalid model name")
        return body, name, None

    def _pull(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, name, error = self._admin_name(incoming, "api.PullRequest")
        if error:
            return error
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        statuses = [
            {"status": "pulling manifest"},
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 2019393189, "completed": 2019393189},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
        ]
        return self._progress(statuses, body, lambda: self._add_model(name))

    def _push(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, name, error = self._admin_name(incoming, "api.PushRequest")
        if error:
            return error
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        statuses = [
            {"status": "retrieving manifest"},
            {"status": "pushing " + digest[7:19], "digest": digest, "total": 2019393189, "completed": 2019393189},
            {"status": "pushing manifest"},
        ]
        return self._progress(statuses, body, lambda: None)

    def _create(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, name, error = self._admin_name(incoming, "api.CreateRequest")
        if error:
            return error
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        statuses = [
            {"status": "gathering model components"},
            {"status": f"using existing layer {digest}"},
            {"status": "writing manifest"},
        ]
        return self._progress(statuses, body, lambda: self._add_model(name))

    def _copy(self, incoming: _Incoming, _: Any) -> _Reply:
        body, error = self._body(incoming, "api.CopyRequest")
        if error:
            return error
        source, destination = body.get("source") or "", body.get("destination") or ""
        model = self._lookup(source) if isinstance(source, str) else None
        if model is None:
            return _native_error(404, f'model "{source}" not found')
        if not isinstance(destination, str) or not destination:
            return _native_error(400, f'destination "{destination}" is invalid')
        self._add_model(destination)
        return _Reply(200, b"", None)

    def _delete(self, incoming: _Incoming, _: Any) -> _Reply:
        body, error = self._body(incoming, "api.DeleteRequest")
        if error:
            return error
        name = body.get("model") or body.get("name") or ""
        if not isinstance(name, str) or self._lookup(name) is None:
            return _native_error(404, f"model '{name}' not found")
        self._models.pop(_model_key(name), None)
        self._loaded.pop(_model_key(name), None)
        return _Reply(200, b"", None)

    def _blob_head(self, incoming: _Incoming, digest: str) -> _Reply:
        if digest in self._blobs:
            return _Reply(200, b"", None)
        return _native_error(404, f'blob "{digest}" not found')

    def _blob_upload(self, incoming: _Incoming, digest: str) -> _Reply:
        actual = "sha256:" + hashlib.sha256(incoming.received.body).hexdigest()
        if actual != digest:
            return _native_error(400, f'digest mismatch, expected "{digest}", got "{actual}"')
        self._blobs.add(digest)
        return _Reply(201, b"", None)

    # ------------------------------------------------------------------ OpenAI-compatible

    @property
    def _fingerprint(self) -> str:
        return "fp_ollama" if self.kind == "ollama" else "fp_fake"

    def _openai_model(self, name: str) -> tuple[_Model | None, _Reply | None]:
        if not name:
            return None, _openai_error(400, "model is required")
        model = self._lookup(name)
        if model is None:
            return None, _openai_error(404, f"model '{name}' not found")
        return model, None

    def _v1_chat(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, error = self._body(incoming, "openai.ChatCompletionRequest")
        if error:
            return error
        messages = body.get("messages")
        if not messages:  # checked by the middleware before the model is looked at
            return _openai_error(400, "[] is too short - 'messages'")
        if not isinstance(messages, list):
            return _openai_error(400, f"json: cannot unmarshal {_go_kind(messages)} into Go struct field "
                                      "ChatCompletionRequest.messages of type []openai.Message")
        name = body.get("model") or ""
        model, error = self._openai_model(name)
        if error:
            return error
        if model.embedding:
            return _openai_error(400, f'"{name}" does not support chat')
        turn = self._turn(model, name, _message_texts(messages), body.get("max_tokens"))
        completion_id = f"chatcmpl-{random.randrange(999)}"
        if body.get("stream") is not True:  # a plain bool in Ollama: absent means false
            return _json_reply(self._chat_completion(completion_id, turn), content_type=JSON, newline=True)
        return self._chat_stream(completion_id, turn, _include_usage(body))

    def _chat_completion(self, completion_id: str, turn: _Turn) -> dict:
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
            "usage": turn.usage(),
        }

    def _chat_stream(self, completion_id: str, turn: _Turn, include_usage: bool) -> _Stream:
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
            return _sse(obj)

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
            deltas = [{"role": "assistant", "content": p} if i == 0 else {"content": p} for i, p in enumerate(pieces)]
            finish = chunk(choice({}, turn.done_reason))

        def frames() -> Iterator[bytes]:
            for delta in deltas:
                yield chunk(choice(delta, None))
            tail = finish
            if include_usage:
                tail += chunk([], turn.usage())
            yield tail + b"data: [DONE]\n\n"

        return _Stream(SSE, frames(), len(deltas) + 1, lambda: _sse(_openai_error_obj(500, RUNNER_ERROR)))

    def _v1_completions(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, error = self._body(incoming, "openai.CompletionRequest")
        if error:
            return error
        prompt = body.get("prompt")
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            return _openai_error(400, f"json: cannot unmarshal {_go_kind(prompt)} into Go struct field "
                                      "CompletionRequest.prompt of type string")
        name = body.get("model") or ""
        model = self._lookup(name)
        if model is None:
            return _openai_error(404, f"model '{name}' not found")
        if model.embedding:
            return _openai_error(400, f'"{name}" does not support generate')
        turn = self._turn(model, name, [prompt], body.get("max_tokens"))
        if not prompt:  # Ollama answers an empty prompt with its "load" reply
            turn = _Turn(name, 0, [], "load")
        completion_id = f"cmpl-{random.randrange(999)}"
        if body.get("stream") is not True:
            return _json_reply(self._completion(completion_id, turn), content_type=JSON, newline=True)
        return self._completion_stream(completion_id, turn, _include_usage(body))

    def _completion(self, completion_id: str, turn: _Turn) -> dict:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": turn.model,
            "system_fingerprint": self._fingerprint,
            "choices": [{"text": turn.text, "index": 0, "finish_reason": turn.done_reason}],
            "usage": turn.usage(),
        }

    def _completion_stream(self, completion_id: str, turn: _Turn, include_usage: bool) -> _Stream:
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
            return _sse(obj)

        def frames() -> Iterator[bytes]:
            for piece in turn.pieces:
                yield chunk([{"text": piece, "index": 0, "finish_reason": None}], per_chunk)
            tail = chunk([{"text": "", "index": 0, "finish_reason": turn.done_reason}], per_chunk)
            if include_usage:
                tail += chunk([], turn.usage())
            yield tail + b"data: [DONE]\n\n"

        return _Stream(SSE, frames(), len(turn.pieces) + 1, lambda: _sse(_openai_error_obj(500, RUNNER_ERROR)))

    def _v1_embeddings(self, incoming: _Incoming, _: Any) -> _Reply:
        body, error = self._body(incoming, "openai.EmbedRequest")
        if error:
            return error
        encoding = body.get("encoding_format") or ""
        if not isinstance(encoding, str) or (encoding and encoding.lower() not in ("float", "base64")):
            return _openai_error(400, f"Invalid value for 'encoding_format' = {encoding}. "
                                      "Supported values: ['float', 'base64'].")
        value = body.get("input")
        if value == "":
            value = [""]
        if value is None or value == []:
            return _openai_error(400, "invalid input")
        inputs = [value] if isinstance(value, str) else value
        if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
            return _openai_error(400, "invalid input type")
        name = body.get("model") or ""
        model = self._lookup(name)
        if model is None:
            return _openai_error(404, f'model "{name}" not found, try pulling it first')
        dims = body.get("dimensions") if _is_int(body.get("dimensions")) and body["dimensions"] > 0 else EMBED_DIM
        tokens = self._turn(model, name, inputs, 0).prompt_tokens
        data = []
        for index, text in enumerate(inputs):
            vector: Any = _embedding(text, dims)
            if encoding.lower() == "base64":
                vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": vector, "index": index})
        reply = {"object": "list", "data": data, "model": name,
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return _json_reply(reply, content_type=JSON, newline=True)

    def _v1_models(self, incoming: _Incoming, _: Any) -> _Reply:
        data = [
            {"id": m.name, "object": "model", "created": m.modified_ns // 1_000_000_000, "owned_by": _owned_by(m.name)}
            for m in self._sorted_models()
        ]
        # Ollama encodes an empty Go nil slice: "data": null. Real OpenAI servers send [].
        if not data and self.kind == "ollama":
            data = None
        return _json_reply({"object": "list", "data": data}, content_type=JSON, newline=True)

    def _v1_model(self, incoming: _Incoming, name: str) -> _Reply:
        model = self._lookup(name)
        if model is None:
            return _openai_error(404, f"model '{name}' not found")
        reply = {"id": name, "object": "model", "created": model.modified_ns // 1_000_000_000,
                 "owned_by": _owned_by(name)}
        return _json_reply(reply, content_type=JSON, newline=True)

    # ------------------------------------------------------------------ /v1/responses

    def _v1_responses(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, error = self._body(incoming, "openai.ResponsesRequest")
        if error:
            return error
        value = body.get("input")
        if value is not None and not isinstance(value, (str, list)):
            return _openai_error(400, f"input must be a string or array: json: cannot unmarshal "
                                      f"{_go_kind(value)} into Go value of type []json.RawMessage")
        name = body.get("model") or ""
        model, error = self._openai_model(name)
        if error:
            return error
        instructions = body.get("instructions") if isinstance(body.get("instructions"), str) else ""
        turn = self._turn(model, name, [instructions, *_texts(value)], body.get("max_output_tokens"))
        response_id = f"resp_{random.randrange(999999)}"
        item_id = f"msg_{random.randrange(999999)}"
        if body.get("stream") is not True:
            response = self._response_object(response_id, body, turn, "completed",
                                              [self._message_item(item_id, turn.text)], self._responses_usage(turn))
            response["completed_at"] = int(time.time())
            return _json_reply(response, content_type=JSON, newline=True)
        return self._responses_stream(response_id, item_id, body, turn)

    @staticmethod
    def _responses_usage(turn: _Turn) -> dict:
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
    def _response_object(response_id: str, request: dict, turn: _Turn, status: str, output: list, usage: Any) -> dict:
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

    def _responses_stream(self, response_id: str, item_id: str, request: dict, turn: _Turn) -> _Stream:
        sequence = itertools.count()

        def event(etype: str, **fields: Any) -> bytes:
            return _sse_event(etype, {"type": etype, **fields, "sequence_number": next(sequence)})

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
                        + event("response.output_item.done", output_index=0, item=self._message_item(item_id, text)))
                output = [self._message_item(item_id, text)]
            final = response("completed", output, self._responses_usage(turn))
            final["completed_at"] = int(time.time())
            yield head + tail + event("response.completed", response=final)

        def error_frame() -> bytes:
            return event("error", code="api_error", message=RUNNER_ERROR, param=None)

        return _Stream(SSE, frames(), len(turn.pieces) + 1, error_frame, (("Cache-Control", "no-cache"),))

    # ------------------------------------------------------------------ /v1/messages (Anthropic)

    def _v1_messages(self, incoming: _Incoming, _: Any) -> _Reply | _Stream:
        body, error = self._body(incoming, "anthropic.MessagesRequest")
        if error:
            return error
        name = body.get("model") or ""
        if not name:
            return _anthropic_error(400, "model is required")
        max_tokens = body.get("max_tokens")
        if not _is_int(max_tokens) or max_tokens <= 0:
            return _anthropic_error(400, "max_tokens is required and must be positive")
        messages = body.get("messages")
        if not messages or not isinstance(messages, list):
            return _anthropic_error(400, "messages is required")
        model = self._lookup(name)
        if model is None:
            return _anthropic_error(404, f"model '{name}' not found")
        turn = self._turn(model, name, [*_texts(body.get("system")), *_message_texts(messages)], max_tokens)
        message_id = f"msg_{random.getrandbits(96):024x}"
        stop_reason = "max_tokens" if turn.done_reason == "length" else "end_turn"
        if body.get("stream") is not True:
            content = [{"type": "text", "text": turn.text}] if turn.pieces else []
            return _json_reply({
                "id": message_id, "type": "message", "role": "assistant", "model": name,
                "content": content, "stop_reason": stop_reason, "stop_sequence": None,
                "usage": {"input_tokens": turn.prompt_tokens, "output_tokens": turn.completion_tokens},
            }, content_type=JSON, newline=True)
        return self._messages_stream(message_id, turn, stop_reason)

    def _messages_stream(self, message_id: str, turn: _Turn, stop_reason: str) -> _Stream:
        def event(etype: str, **fields: Any) -> bytes:
            return _sse_event(etype, {"type": etype, **fields})

        def frames() -> Iterator[bytes]:
            head = event("message_start", message={
                "id": message_id, "type": "message", "role": "assistant", "model": turn.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": turn.prompt_tokens, "output_tokens": 0},
            })
            tail = b""
            if turn.pieces:
                head += event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                for index, piece in enumerate(turn.pieces):
                    delta = event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
                    yield head + delta if index == 0 else delta
                head = b""
                tail = event("content_block_stop", index=0)
            tail += event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": None},
                          usage={"input_tokens": turn.prompt_tokens, "output_tokens": turn.completion_tokens})
            yield head + tail + event("message_stop")

        def error_frame() -> bytes:
            return event("error", error={"type": "api_error", "message": RUNNER_ERROR})

        return _Stream(SSE, frames(), len(turn.pieces) + 1, error_frame, (("Cache-Control", "no-cache"),))


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake Ollama (demo upstream for keygate).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--kind", choices=("ollama", "openai"), default="ollama")
    parser.add_argument("--prefix", default="", help="path prefix (kind=openai), e.g. /compat")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause between stream chunks")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="content pieces per reply")
    parser.add_argument("--require-bearer", default=None, help="only accept 'Authorization: Bearer X'")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    args = parser.parse_args(argv)

    fake = FakeOllama(
        host=args.host, port=args.port, kind=args.kind, prefix=args.prefix,
        chunk_delay=args.chunk_delay_ms / 1000.0, chunks=args.chunks, require_bearer=args.require_bearer,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
    )

    async def serve() -> None:
        fake._closing = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, fake._closing.set)
        await fake._run(lambda: print(f"fakeollama listening on {fake.url}", flush=True))

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
