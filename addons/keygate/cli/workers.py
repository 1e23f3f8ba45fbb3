"""`keygate serve --workers N`: N mitmdump processes accepting on one port
(docs/shared-state.md#workers).

mitmproxy runs on one thread, so one process uses one core. With SO_REUSEPORT (Linux),
several processes listen on the same address and the kernel spreads new connections over
them. mitmproxy 11.0 opens its listener with `asyncio.start_server(handler, host, port)`
(mitmproxy/proxy/mode_servers.py) and no `reuse_port`: each worker runs mitmdump in its
own Python process (`python -m keygate.cli.workers MITMDUMP ARGS`) where that module's
`asyncio` is given a `start_server` that asks for `reuse_port`, before mitmdump starts.
The supervisor also holds a socket bound to the address with SO_REUSEPORT (never
listening, so it gets no connections): the port stays this group's while workers restart,
and port 0 picks one port for all of them.

Every worker gets KEYGATE_WORKER=i (1..N): its `instance` is the host's name (or
[gateway] instance) and "/i", and its usage log is usage-<instance>.jsonl beside the
configured one (model/settings.py `instance_log`). They share limits through Redis: more
than one worker without redis_url is refused (serve.py). PROMETHEUS_MULTIPROC_DIR, for
/metrics over all workers, is a fresh folder of the supervisor's, removed at the end.

A worker that exits while the supervisor is not stopping is started again (after
RESTART_DELAY_S; one that keeps failing within FAILED_START_S of its start FAILED_STARTS
times in a row stops the whole group: a configuration error, not a crash). SIGTERM or
SIGINT to the supervisor is passed on to every worker, each of which drains its requests
and writes its usage lines (stages/recorder.py); one still running after STOP_S is killed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

RESTART_DELAY_S = 0.5
FAILED_START_S = 5.0
FAILED_STARTS = 3
STOP_S = 20.0  # a worker's drain is 8 s (recorder.py DRAIN_SECONDS)


def note(text: str) -> None:
    print(f"keygate serve: {text}", file=sys.stderr, flush=True)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, not listening: the port is taken
    for the workers (port 0: one the OS picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


class Supervisor:
    def __init__(self, workers: int, mitmdump_args: list[str], env: dict[str, str]) -> None:
        self.n = workers
        self.args = mitmdump_args
        self.env = env
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False
        self.code = 0

    def _spawn(self, i: int) -> None:
        env = {**self.env, "KEYGATE_WORKER": str(i)}
        proc = subprocess.Popen([sys.executable, "-m", "keygate.cli.workers", *self.args],
                                env=env, stdin=subprocess.DEVNULL)
        self.procs[i] = proc
        self.started[i] = time.monotonic()
        note(f"worker {i} started (pid {proc.pid})")

    def _stop(self, signum: int | None = None, *_: Any) -> None:
        if not self.stopping:
            self.stopping = True
            if signum is not None:
                note(f"{signal.Signals(signum).name}: stopping the workers (each finishes its "
                     "requests and writes their usage lines)")
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(1, self.n + 1):
                self._spawn(i)
            while not self.stopping:
                time.sleep(0.1)
                for i, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or self.stopping:
                        continue
                    self._exited(i, code)
            deadline = time.monotonic() + STOP_S
            for i, proc in self.procs.items():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    note(f"worker {i} still running {STOP_S:g} s after SIGTERM; killed")
                    proc.kill()
                    proc.wait()
            note("every worker has stopped")
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return self.code

    def _exited(self, i: int, code: int) -> None:
        how = f"killed by signal {-code}" if code < 0 else f"status {code}"
        quick = time.monotonic() - self.started[i] < FAILED_START_S
        self.failures[i] = self.failures.get(i, 0) + 1 if quick else 0
        if quick and self.failures[i] >= FAILED_STARTS:
            note(f"worker {i} exited ({how}) {FAILED_STARTS} times within {FAILED_START_S:g} s "
                 "of its start; stopping")
            self.code = code if code > 0 else 1
            self._stop()
            return
        note(f"worker {i} exited ({how}); starting it again")
        time.sleep(RESTART_DELAY_S)
        if not self.stopping:
            self._spawn(i)


def serve_workers(workers: int, host: str, port: int, make_args) -> int:
    """Run `workers` mitmdump processes on (host, port); `make_args(port)` gives the
    mitmdump command line for the port. Returns the exit status."""
    held = reserve_port(host, port)
    port = held.getsockname()[1]
    metrics = tempfile.mkdtemp(prefix="keygate-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics, "PYTHONUNBUFFERED": "1"}
    note(f"{workers} workers on {host}:{port}, sharing limits through Redis")
    try:
        return Supervisor(workers, make_args(port), env).run()
    finally:
        held.close()
        shutil.rmtree(metrics, ignore_errors=True)


class _ReusePortAsyncio:
    """The `asyncio` mitmproxy's listener sees in a worker: asyncio itself, but for a
    start_server that asks for SO_REUSEPORT."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("reuse_port", True)
        return await asyncio.start_server(*args, **kwargs)


def reuse_port() -> None:
    from mitmproxy.proxy import mode_servers

    mode_servers.asyncio = _ReusePortAsyncio()


def main(argv: list[str]) -> None:
    """One worker: mitmdump with `argv`, its listener opened with SO_REUSEPORT."""
    reuse_port()
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    from mitmproxy.tools.main import mitmdump

    mitmdump(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
