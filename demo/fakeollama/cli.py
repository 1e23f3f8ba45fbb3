"""The command line: serve a fake Ollama in the foreground, print one line
(``fakeollama listening on http://HOST:PORT``) once listening, stop cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse

from .app import FakeOllama
from .catalogue import DEFAULT_MODELS
from .generation import DEFAULT_CHUNKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake Ollama (demo upstream for keygate).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--kind", choices=("ollama", "openai"), default="ollama")
    parser.add_argument("--prefix", default="", help="path prefix (kind=openai), e.g. /compat")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="pause between stream chunks")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                        help="content pieces per reply")
    parser.add_argument("--require-bearer", default=None,
                        help="only accept 'Authorization: Bearer X'")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model names")
    args = parser.parse_args(argv)

    fake = FakeOllama(
        host=args.host, port=args.port, kind=args.kind, prefix=args.prefix,
        chunk_delay=args.chunk_delay_ms / 1000.0, chunks=args.chunks,
        require_bearer=args.require_bearer,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
    )
    fake.serve_forever(lambda: print(f"fakeollama listening on {fake.url}", flush=True))
    return 0
