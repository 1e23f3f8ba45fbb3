"""What every part of the bench uses: paths, the requests sent, errors and progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

MODEL = "llama3.2:latest"
CHAT = "/v1/chat/completions"
SMALL_BODY = json.dumps(
    {
        "model": MODEL,
        "stream": False,
        "messages": [{"role": "user", "content": "Say hello in five words"}],
    }
)
STREAM_BODY = json.dumps(
    {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a short story"}],
    }
)
# The results' sections, one per phase (1-5), as targets() and report() read them.
SECTIONS = ("small_requests", "streams", "slow_streams", "keys", "startup")


class BenchError(RuntimeError):
    """Something the bench could not measure; the run fails with this message."""


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
