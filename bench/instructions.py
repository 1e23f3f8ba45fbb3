"""scripts/bench --instructions: how many instructions a proxy runs per small request.

CPU time per request (phase 1 of the full run) moves by up to 20 % between runs of the same
proxy on a small shared machine, which is more than the margin the target "CPU per request
at most 1.2x bare mitmdump's" leaves. The instructions a process executes for the same
requests do not move: here each proxy runs under valgrind's callgrind, serves the same small
non-streamed requests one at a time on one kept-alive connection, and callgrind counts the
instructions its threads ran meanwhile. What that leaves out: the kernel's share (the
socket work, the same for every proxy here) and the time lost to cache misses, which
grows with the code a request passes through; CPU time includes both.

The counts cover everything the process runs while the requests are served, including
what it runs on timers (mitmproxy's and keygate's file watchers). Under callgrind a
process runs 30-50x slower, so those timers fire that much more often per request than at full
speed: each proxy is also counted idle for a while, and its idle rate times the duration
of the requests is taken off.

Two runs of the same build agree within 0.2 %; a change of 1 % in what a request runs
shows.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from perf.common import CHAT, PY, SMALL_BODY, BenchError, say
from perf.contenders import MINAUTH, Lab, check_chat, wait_ready
from perf.fixtures import bench_keys, keygate_dir
from perf.procs import Procs, free_port
from perf.report import fmt, table
from perf.stats import rnd
from perf.tools import apt_install

WARMUP = 30  # requests before counting, twice: uninstrumented, then instrumented
REQUESTS = 200
IDLE_SECONDS = 10.0
START_TIMEOUT = 300.0  # keygate parses 10,000 keys at ~1/5 of its usual speed
DUMP_TIMEOUT = 120.0


@dataclass
class Count:
    name: str
    requests: int
    seconds: float  # wall time of the counted requests
    instructions: int  # counted while they were served
    idle_per_second: float  # counted while nothing was asked

    @property
    def per_request(self) -> float:
        return (self.instructions - self.idle_per_second * self.seconds) / self.requests

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "seconds": rnd(self.seconds, 2),
            "instructions": self.instructions,
            "idle_instructions_per_s": round(self.idle_per_second),
            "instructions_per_request": round(self.per_request),
        }


def ensure_valgrind(allow_install: bool) -> tuple[str, str] | None:
    """(valgrind, callgrind_control); installs Debian's package if missing and we may."""

    def found() -> tuple[str, str] | None:
        vg, ctl = shutil.which("valgrind"), shutil.which("callgrind_control")
        return (vg, ctl) if vg and ctl else None

    if found() is None and allow_install:
        apt_install("valgrind", found)
    return found()


class Driver:
    """Small chat requests, one at a time, on one kept-alive connection."""

    def __init__(self, url: str, auth: dict) -> None:
        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        self.headers = {"Content-Type": "application/json", **auth}

    def send(self, n: int) -> float:
        t0 = time.monotonic()
        for _ in range(n):
            self.conn.request("POST", CHAT, SMALL_BODY, self.headers)
            r = self.conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise BenchError(f"{CHAT} answered {r.status}: {body[:300]!r}")
        return time.monotonic() - t0

    def close(self) -> None:
        self.conn.close()


class Callgrind:
    """One proxy under callgrind, instrumented only once it has started and warmed up."""

    def __init__(self, tools: tuple[str, str], out: Path, pid: int) -> None:
        self.valgrind, self.control = tools
        self.out, self.pid = out, pid
        self._dumps = 0

    @staticmethod
    def command(valgrind: str, out: Path, cmd: list[str]) -> list[str]:
        # mitmdump is a Python script: valgrind runs the interpreter, which runs it.
        return [valgrind, "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", PY, *cmd]

    def _ctl(self, *args: str) -> None:
        subprocess.run([self.control, *args, str(self.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=DUMP_TIMEOUT, check=True)

    def instrument(self) -> None:
        self._ctl("--instr=on")

    def zero(self) -> None:
        self._ctl("--zero")

    def dump(self) -> int:
        """Instructions counted since the last zero."""
        self._ctl("--dump")
        self._dumps += 1
        path = Path(f"{self.out}.{self._dumps}")
        deadline = time.monotonic() + DUMP_TIMEOUT
        while time.monotonic() < deadline:
            if path.exists():
                with path.open(errors="replace") as f:
                    for line in f:  # in the header, before megabytes of per-function costs
                        if line.startswith("summary:"):
                            return int(line.split()[1])
                        if line.startswith("fn="):
                            break
            time.sleep(0.1)
        raise BenchError(f"callgrind wrote no dump {path} within {DUMP_TIMEOUT:.0f} s")


def count(lab: Lab, tools: tuple[str, str], name: str, upstream: str,
          config: Path | None, auth: dict, script: str | None = None) -> Count:
    port = free_port()
    out = lab.tmp / f"callgrind-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.out"
    cmd = Callgrind.command(tools[0], out, lab.proxy_cmd(upstream, port, config, (), script))
    p = lab.procs.start(name, cmd, cwd=config.parent if config else lab.tmp)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(p, url, START_TIMEOUT)
        cg = Callgrind(tools, out, p.pid)
        driver = Driver(url, auth)
        try:
            driver.send(WARMUP)
            cg.instrument()
            driver.send(WARMUP)  # valgrind translates code as it first runs: not counted
            cg.zero()
            t0 = time.monotonic()
            time.sleep(IDLE_SECONDS)
            idle = cg.dump() / (time.monotonic() - t0)
            cg.zero()
            seconds = driver.send(REQUESTS)
            counted = cg.dump()
        finally:
            driver.close()
        return Count(name, REQUESTS, seconds, counted, idle)
    finally:
        lab.procs.stop(p)


def measure(procs: Procs, tmp: Path, tools: tuple[str, str]) -> dict:
    lab = Lab(procs, tmp)
    lab.confdir.mkdir(exist_ok=True)
    keys, auth = bench_keys(10_000)
    up = lab.upstream("upstream-fast")
    check_chat(up.url, {})
    kg10k = keygate_dir(tmp / "kg-10k", up.url, keys.big_yaml)
    kg1 = keygate_dir(tmp / "kg-1key", up.url, keys.one_yaml)
    counts = []
    for name, config, a, script in (
        ("bare mitmdump", None, {}, None),
        ("minimal addon (bench/minauth.py)", None, auth, MINAUTH),
        ("keygate (10,000 keys)", kg10k, auth, None),
        ("keygate (1 key)", kg1, auth, None),
    ):
        say(f"counting instructions: {name}")
        counts.append(count(lab, tools, name, up.url, config, a, script))
    bare = counts[0].per_request
    return {
        "requests": REQUESTS,
        "targets": {
            c.name: {**c.as_dict(), "vs_bare": rnd(c.per_request / bare)} for c in counts
        },
    }


def report(res: dict) -> str:
    rows = [
        [name, f"{t['instructions_per_request'] / 1e6:.3f}", fmt(t["vs_bare"], 3),
         f"{t['idle_instructions_per_s'] / 1e6:.2f}", fmt(t["seconds"], 1)]
        for name, t in res["targets"].items()
    ]
    return table(
        f"Instructions per small request (callgrind; {res['requests']} sequential requests "
        "on one connection)",
        ["target", "M instr/req", "vs bare", "idle M instr/s", "seconds"],
        rows,
        [
            "every thread of the proxy, user space only; the idle rate (timers, under "
            "callgrind's slowdown) times the requests' duration is taken off",
            "deterministic where CPU time is not: run again, the same build counts the same "
            "to a fraction of a percent",
        ],
    )
