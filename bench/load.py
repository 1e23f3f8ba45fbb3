"""keygate's load generator, run as its own process so that its CPU time is never counted
against the proxy it measures. It prints one JSON object on stdout.

    python bench/load.py requests --url http://127.0.0.1:PORT --path /v1/chat/completions \
        --body '{"model": ...}' --header 'Authorization: Bearer sk-...' \
        --concurrency 32 --duration 5 --warmup 1 [--pid PROXY_PID]

    python bench/load.py streams --url ... --concurrency 100 --count 200 [--ramp 1] [--pid PID]

`requests`: closed loop, `concurrency` workers each sending one request after another on its
own keep-alive connection. Only the measurement window (after `warmup`) counts: requests
finished in it, their latencies, and, with `--pid`, the CPU time (utime + stime from
/proc/PID/stat) that process used in exactly that window.

`streams`: `count` streamed requests, at most `concurrency` at a time (the first ones started
evenly over `ramp` seconds, so 1,000 connections do not all knock at once). Per stream: time
from sending the request to the first body bytes, total time, and whether it ended properly
(status 200 and the stream's end marker: `data: [DONE]` for SSE, `"done":true` for NDJSON).
With `--pid`, that process's resident memory is sampled every 50 ms (peak VmRSS) and its
CPU time over the run is reported.

Two HTTP clients, both asyncio with one keep-alive connection per worker:
- `--http raw` (default): a minimal HTTP/1.1 client on asyncio streams (Content-Length,
  chunked and read-to-close bodies). It costs about a quarter of httpx's CPU per chunk, which
  matters on a 2-core machine where the client shares the cores with the proxy.
- `--http httpx`: httpx.AsyncClient, one per worker (httpcore's pool slows down with
  hundreds of connections in one client).

Every run is bounded: `--timeout` per request, and streams by `--deadline`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import ssl
import statistics
import sys
import time
from urllib.parse import urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB ({} if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


def parse_headers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"--header {item!r}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------- clients


class Reply:
    __slots__ = ("status", "first", "tail")

    def __init__(self, status: int, first: float | None, tail: bytes):
        self.status = status  # HTTP status
        self.first = first  # perf_counter() when the first body bytes arrived (None: no body)
        self.tail = tail  # the last bytes of the body


class RawConnection:
    """One keep-alive HTTP/1.1 connection; POSTs a fixed body, reads the reply's framing."""

    def __init__(self, url: str, timeout: float):
        u = urlsplit(url)
        if u.scheme != "http":
            raise SystemExit("--http raw speaks plain http:// only")
        self.host, self.port = u.hostname, u.port or 80
        self.netloc = u.netloc
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request_bytes(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.netloc}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, raw: bytes) -> Reply:
        return await asyncio.wait_for(self._send(raw), self.timeout)

    async def _send(self, raw: bytes) -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(raw)
            return await self._read()
        except BaseException:
            self.close()
            raise

    async def _read(self) -> Reply:
        r = self.reader
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        h = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            h[k.strip().lower()] = v.strip()
        first, tail = None, b""
        keep = h.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if "chunked" in h.get("transfer-encoding", "").lower():
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await r.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                data = await r.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter()
                tail = (tail + data[:-2])[-256:]
        elif "content-length" in h:
            n = int(h["content-length"])
            while n > 0:
                data = await r.read(min(n, 1 << 16))
                if not data:
                    raise ConnectionError("connection closed inside the body")
                if first is None:
                    first = time.perf_counter()
                n -= len(data)
                tail = (tail + data)[-256:]
        else:
            keep = False
            while data := await r.read(1 << 16):
                if first is None:
                    first = time.perf_counter()
                tail = (tail + data)[-256:]
        if not keep:
            self.close()
        return Reply(int(status), first, tail)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class RawClient:
    name = "raw asyncio HTTP/1.1"

    def __init__(self, url: str, path: str, headers: dict, body: bytes, timeout: float):
        self.conn = RawConnection(url, timeout)
        self.raw = self.conn.request_bytes(path, headers, body)

    async def post(self) -> Reply:
        return await self.conn.send(self.raw)

    async def close(self) -> None:
        self.conn.close()


_SSL: ssl.SSLContext | None = None


class HttpxClient:
    name = "httpx"

    def __init__(self, url: str, path: str, headers: dict, body: bytes, timeout: float):
        import httpx

        global _SSL
        if _SSL is None:  # each client would otherwise load the CA bundle again (~30 ms)
            _SSL = ssl.create_default_context()
        self.url = url.rstrip("/") + path
        self.headers, self.body = headers, body
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(timeout),
            http2=False,
            trust_env=False,
            verify=_SSL,
        )

    async def post(self) -> Reply:
        first, tail = None, b""
        async with self.client.stream(
            "POST", self.url, content=self.body, headers=self.headers
        ) as r:
            async for chunk in r.aiter_raw():
                if chunk:
                    if first is None:
                        first = time.perf_counter()
                    tail = (tail + chunk)[-256:]
            return Reply(r.status_code, first, tail)

    async def close(self) -> None:
        await self.client.aclose()


CLIENTS = {"raw": RawClient, "httpx": HttpxClient}


def error_name(e: BaseException) -> str:
    return "Timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__


def make_client(args):
    headers = {"Content-Type": "application/json", **parse_headers(args.header)}
    return CLIENTS[args.http](args.url, args.path, headers, args.body.encode(), args.timeout)


# --------------------------------------------------------------------------- requests


async def run_requests(args) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    state = {"measuring": False, "done": 0, "stop": False}

    async def worker() -> None:
        c = make_client(args)
        try:
            while not state["stop"]:
                t0 = time.perf_counter()
                try:
                    status = (await c.post()).status
                except Exception as e:  # connection errors, timeouts, garbage
                    status = None
                    if state["measuring"]:
                        errors[error_name(e)] = errors.get(error_name(e), 0) + 1
                t1 = time.perf_counter()
                if state["measuring"] and status is not None:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if status == 200:
                        state["done"] += 1
                        latencies.append(t1 - t0)
                if status != 200:
                    await asyncio.sleep(0.01)  # do not spin on a refusing server
        finally:
            await c.close()

    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    try:
        await asyncio.sleep(args.warmup)
        cpu0 = cpu_seconds(args.pid) if args.pid else None
        t0 = time.perf_counter()
        state["measuring"] = True
        await asyncio.sleep(args.duration)
        state["measuring"] = False
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds(args.pid) if args.pid else None
        done = state["done"]
    finally:
        state["stop"] = True
        await asyncio.wait(tasks, timeout=args.timeout + 5)
        for t in tasks:
            t.cancel()
    result = {
        "mode": "requests",
        "client": CLIENTS[args.http].name,
        "concurrency": args.concurrency,
        "elapsed_s": round(elapsed, 4),
        "requests": done,
        "rps": round(done / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "mean_ms": ms(statistics.fmean(latencies)) if latencies else None,
        "statuses": statuses,
        "errors": errors,
    }
    if cpu0 is not None and cpu1 is not None:
        result["cpu_s"] = round(cpu1 - cpu0, 4)
        result["cpu_us_per_request"] = round((cpu1 - cpu0) / done * 1e6, 1) if done else None
    return result


# --------------------------------------------------------------------------- streams


def ended(tail: bytes) -> bool:
    return b"[DONE]" in tail or b'"done":true' in tail.replace(b" ", b"")


async def run_streams(args) -> dict:
    ttfc: list[float] = []
    totals: list[float] = []
    failures: dict[str, int] = {}
    peak = {"rss_kb": 0, "in_flight": 0, "max_in_flight": 0}
    base = memory_kb(args.pid) if args.pid else {}
    next_index = iter(range(args.count))
    done_event = asyncio.Event()

    def fail(reason: str) -> None:
        failures[reason] = failures.get(reason, 0) + 1

    async def worker(index: int) -> None:
        if args.ramp > 0 and args.concurrency > 1:
            await asyncio.sleep(args.ramp * index / args.concurrency)
        c = make_client(args)
        try:
            for _ in next_index:
                t0 = time.perf_counter()
                peak["in_flight"] += 1
                peak["max_in_flight"] = max(peak["max_in_flight"], peak["in_flight"])
                try:
                    reply = await c.post()
                except Exception as e:
                    fail(error_name(e))
                    continue
                finally:
                    peak["in_flight"] -= 1
                end = time.perf_counter()
                if reply.status != 200:
                    fail(f"status {reply.status}")
                elif not ended(reply.tail):
                    fail("no end marker")
                else:
                    ttfc.append((reply.first or end) - t0)
                    totals.append(end - t0)
        finally:
            await c.close()

    async def sample() -> None:
        while not done_event.is_set():
            peak["rss_kb"] = max(peak["rss_kb"], memory_kb(args.pid).get("VmRSS", 0))
            try:
                await asyncio.wait_for(done_event.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    t0 = time.perf_counter()
    cpu0 = cpu_seconds(args.pid) if args.pid else None
    sampler = asyncio.create_task(sample()) if args.pid else None
    tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    done_event.set()
    if sampler:
        await sampler
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(args.pid) if args.pid else None
    result = {
        "mode": "streams",
        "client": CLIENTS[args.http].name,
        "concurrency": args.concurrency,
        "count": args.count,
        "completed": len(totals),
        "failed": args.count - len(totals),
        "failures": failures,
        "max_in_flight": peak["max_in_flight"],
        "elapsed_s": round(elapsed, 3),
        "ttfc_p50_ms": ms(percentile(ttfc, 50)),
        "ttfc_p99_ms": ms(percentile(ttfc, 99)),
        "total_p50_ms": ms(percentile(totals, 50)),
        "total_p99_ms": ms(percentile(totals, 99)),
    }
    if args.pid:
        end = memory_kb(args.pid)
        result["rss_before_mb"] = round(base.get("VmRSS", 0) / 1024, 1)
        result["rss_peak_mb"] = round(max(peak["rss_kb"], end.get("VmRSS", 0)) / 1024, 1)
        result["hwm_mb"] = round(end.get("VmHWM", 0) / 1024, 1)
        if cpu0 is not None and cpu1 is not None:
            result["cpu_s"] = round(cpu1 - cpu0, 3)
            result["cpu_ms_per_stream"] = round((cpu1 - cpu0) * 1000 / args.count, 3)
    return result


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("requests", "streams"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
        p.add_argument("--path", default="/v1/chat/completions")
        p.add_argument("--body", required=True, help="JSON request body (POST)")
        p.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
        p.add_argument("--concurrency", type=int, default=1)
        p.add_argument("--pid", type=int, default=0, help="process to measure (CPU or memory)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
        p.add_argument("--http", choices=sorted(CLIENTS), default="raw", help="HTTP client")
    r = sub.choices["requests"]
    r.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    r.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    s = sub.choices["streams"]
    s.add_argument("--count", type=int, default=100, help="streams in all")
    s.add_argument("--ramp", type=float, default=0.0, help="seconds over which workers start")
    s.add_argument("--deadline", type=float, default=120.0, help="give up after this long")
    args = parser.parse_args(argv)
    run = run_requests if args.mode == "requests" else run_streams
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
