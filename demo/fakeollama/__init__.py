"""A faithful fake Ollama server (stdlib only) for tests, demos and benchmarks.

It speaks Ollama's real wire formats: the native ``/api/*`` API with NDJSON streams,
the OpenAI-compatible ``/v1/*`` endpoints with SSE streams, ``/v1/responses`` and the
Anthropic-compatible ``/v1/messages``. With ``kind="openai"`` it instead plays a plain
OpenAI-compatible server (like DeepSeek's) under an optional path prefix.

Usage::

    fake = FakeOllama().start()          # background thread, own event loop
    ... talk to fake.url ...
    fake.stop()

    python demo/fakeollama.py --port 11434   # foreground demo upstream
    python -m fakeollama --port 11434        # the same, with demo/ on the path

The parts, each documenting what it imitates:

* `server`: the HTTP server (asyncio connections, request parsing, chunked bodies) and
  the fault injection and gates (``fail``, ``gate``, ``hold_final``, ``byte_at_a_time``);
* `wire`: the wire formats (NDJSON and SSE framing, each API's error shape, Go's JSON
  error texts, timestamps);
* `catalogue`: the models (names, digests, details) and the loaded ones;
* `generation`: the determinism rules, i.e. how prompts are counted and what the replies
  are (tests compute expected numbers from these);
* `endpoints`: native ``/api/*``, OpenAI ``/v1/*``, ``/v1/responses``, ``/v1/messages``;
* `app`: `FakeOllama`, all of it put together, and the routes; `cli`: the command line.
"""

from .app import FakeOllama
from .catalogue import DEFAULT_MODELS
from .cli import main
from .endpoints.native import OLLAMA_VERSION
from .generation import DEFAULT_CHUNKS, EMBED_DIM, REPLY_WORDS, count_tokens
from .server import FAIL_MODES, RUNNER_ERROR, Received
from .wire import JSON, JSON_UTF8, NDJSON, SSE, TEXT

__all__ = [
    "DEFAULT_CHUNKS", "DEFAULT_MODELS", "EMBED_DIM", "FAIL_MODES", "JSON", "JSON_UTF8", "NDJSON",
    "OLLAMA_VERSION", "REPLY_WORDS", "RUNNER_ERROR", "SSE", "TEXT", "FakeOllama", "Received",
    "count_tokens", "main",
]
