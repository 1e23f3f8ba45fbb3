"""The fake's HTTP server: connections, request parsing, reply framing, fault injection, gates.

It runs on asyncio streams: HTTP/1.1 keep-alive, ``Content-Length`` for whole bodies,
chunked transfer encoding for streams (one HTTP chunk per step, and every chunk holds whole
NDJSON lines or SSE frames), no thread per request. Request bodies may come with a
``Content-Length`` or chunked (trailers are read and dropped); ``Expect: 100-continue`` is
answered. A request head over 1 MiB gets 431, a malformed request line or length 400, and
both close the connection.

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
* ``byte_at_a_time = True``: streams go out one byte per HTTP chunk, so every line and
  event arrives split across chunk boundaries.

What a request gets is up to the subclass: `HTTPServer._dispatch` answers it and
`HTTPServer._error` gives an error in the shape of the API a path belongs to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import json
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from email.utils import formatdate
from typing import Any, Callable, Self

from .wire import TEXT, Reply, Stream, go_json_error, native_error, openai_error

# The message a crashed llama runner produces; used for every injected failure.
RUNNER_ERROR = "llama runner process has terminated: exit status 2"
FAIL_MODES = (None, "500", "reset", "stall", "midstream", "cut")


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


@dataclasses.dataclass
class Incoming:
    received: Received
    path: str  # path without query string and without the configured prefix
    json_error: str | None  # Go-style decode error text, when the body is not JSON
    keep_alive: bool
    is_head: bool


class HTTPServer:
    """The HTTP side of the fake: lifecycle, connections, faults; see the module docstring."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        name: str,
        prefix: str,
        require_bearer: str | None,
        chunk_delay: float,
    ):
        self.host = host
        self.name = name
        self.prefix = prefix.rstrip("/")
        self.require_bearer = require_bearer
        self.chunk_delay = chunk_delay
        # Fault injection; read on every request, so set them any time.
        self.fail: str | None = None
        self.gate: threading.Event | None = None
        self.hold_final: threading.Event | None = None
        self.byte_at_a_time = False  # streams sent one byte per chunk

        self._requested_port = port
        self._port = 0
        self._requests: list[Received] = []
        self._lock = threading.Lock()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ what subclasses answer

    def _dispatch(self, incoming: Incoming) -> Reply | Stream:
        """The answer to one request (its body read, faults and the key check passed)."""
        raise NotImplementedError

    def _error(self, path: str, status: int, message: str) -> Reply:
        """An error reply in the shape of the API ``path`` belongs to."""
        raise NotImplementedError

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

    def start(self) -> Self:
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

    def serve_forever(self, on_ready: Callable[[], None]) -> None:
        """Serve in the foreground, in this thread, until SIGTERM or SIGINT."""

        async def serve() -> None:
            self._closing = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._closing.set)
            await self._run(on_ready)

        asyncio.run(serve())

    def __enter__(self) -> Self:
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

    # ------------------------------------------------------------------ requests

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
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
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError,
                ValueError):
            pass  # the client went away or sent garbage (e.g. a bad chunk size): drop it
        except asyncio.CancelledError:
            # Shutdown cancels connection tasks. Ending quietly matters on Python 3.11,
            # whose StreamReaderProtocol logs a traceback for a cancelled handler task.
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Incoming | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the client closed the connection between requests
        except asyncio.LimitOverrunError:
            await self._write_reply(writer, Reply(431, b"", None), head_only=False,
                                    keep_alive=False)
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._write_reply(writer, Reply(400, b"400 Bad Request", TEXT), head_only=False,
                                    keep_alive=False)
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
                await self._write_reply(writer, Reply(400, b"400 Bad Request", TEXT),
                                        head_only=False, keep_alive=False)
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
                json_error = go_json_error(text, exc)
        path = target.split("?", 1)[0]
        if self.prefix:
            path = path[len(self.prefix):] if path.startswith(self.prefix + "/") else ""
        return Incoming(
            Received(method, target, headers, body, parsed), path, json_error, keep_alive,
            method == "HEAD",
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

    async def _answer(self, incoming: Incoming, writer: asyncio.StreamWriter) -> bool:
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
        if fail == "500":
            reply: Reply | Stream | None = self._error(incoming.path, 500, RUNNER_ERROR)
        else:
            reply = self._auth_error(incoming)
        if reply is None:
            try:
                reply = self._dispatch(incoming)
            except Exception as exc:  # a bug in the fake must not look like a network fault
                traceback.print_exc(file=sys.stderr)
                reply = native_error(500, f"fakeollama internal error: {exc}")
        if isinstance(reply, Stream):  # no streaming endpoint answers HEAD
            return await self._write_stream(writer, reply, incoming.keep_alive)
        await self._write_reply(writer, reply, incoming.is_head, incoming.keep_alive)
        return incoming.keep_alive

    def _auth_error(self, incoming: Incoming) -> Reply | None:
        if self.require_bearer is None:
            return None
        if incoming.received.header("authorization") == f"Bearer {self.require_bearer}":
            return None
        return openai_error(401, "Incorrect API key provided.", "invalid_request_error",
                            "invalid_api_key")

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

    # ------------------------------------------------------------------ replies

    _date_cache: tuple[int, str] = (0, "")

    @classmethod
    def _date(cls) -> str:
        now = int(time.time())
        if cls._date_cache[0] != now:  # formatting a date per request costs real time
            cls._date_cache = (now, formatdate(now, usegmt=True))
        return cls._date_cache[1]

    def _head(self, status: int, content_type: str | None, extra: tuple, keep_alive: bool,
              length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.extend(f"{k}: {v}" for k, v in extra)
        lines.append(f"Date: {self._date()}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        else:
            lines.append("Transfer-Encoding: chunked")
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _write_reply(
        self, writer: asyncio.StreamWriter, reply: Reply, head_only: bool, keep_alive: bool
    ) -> None:
        head = self._head(reply.status, reply.content_type, reply.headers, keep_alive,
                          len(reply.body))
        writer.write(head if head_only else head + reply.body)
        await writer.drain()

    async def _write_stream(self, writer: asyncio.StreamWriter, stream: Stream,
                            keep_alive: bool) -> bool:
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
