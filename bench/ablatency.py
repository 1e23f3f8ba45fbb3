"""p50 latency at concurrency 1 of two keygate checkouts, measured interleaved.

    .venv/bin/python bench/ablatency.py OTHER_CHECKOUT [--blocks 12] [--per-block 150]

Two separate scripts/bench runs take their concurrency-1 figures minutes apart, and this
machine drifts by as much as a small change costs (bare mitmdump's own p50 moved by
0.09 ms between two runs). Here both keygates run side by side in front of one demo
upstream, and one keep-alive client alternates blocks of small non-streamed requests
between them, so drift falls on both alike. Prints each one's p50.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "demo")]

from conftest import Gateway, KeySpec  # noqa: E402
from fakeollama import FakeOllama  # noqa: E402

BODY = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                   "stream": False})


def timed(gw: Gateway, key: KeySpec, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    headers = {**key.auth, "Content-Type": "application/json"}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", BODY, headers)
        resp = conn.getresponse()
        resp.read()
        out.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise SystemExit(f"{gw.script}: status {resp.status}")
    conn.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("other", type=Path, help="the other checkout (its addons/gateway.py)")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--per-block", type=int, default=150)
    args = p.parse_args()
    key = KeySpec("bench")
    with tempfile.TemporaryDirectory() as tmp:
        fake = FakeOllama().start()
        started: list[Gateway] = []
        try:
            for name, script in (("here", None),
                                 ("other", args.other.resolve() / "addons" / "gateway.py")):
                gw = Gateway(Path(tmp) / name, fake.url, keys={"bench": key}, script=script)
                started.append(gw)
                gw.start()
            here, other = started
            timed(here, key, 200), timed(other, key, 200)  # warm-up
            a: list[float] = []
            b: list[float] = []
            for i in range(args.blocks):
                # Each goes first in every other block: no order favours either.
                first, second = (here, other) if i % 2 == 0 else (other, here)
                x = timed(first, key, args.per_block)
                y = timed(second, key, args.per_block)
                a += x if first is here else y
                b += y if first is here else x
            print(f"this checkout  p50 {statistics.median(a) * 1e3:.3f} ms  (n={len(a)})")
            print(f"{args.other}  p50 {statistics.median(b) * 1e3:.3f} ms  (n={len(b)})")
        finally:
            for gw in started:
                gw.stop()
            fake.stop()

if __name__ == "__main__":
    main()
