"""The processes the bench starts, each stopped by its pid at the end, and their CPU time."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from .common import BenchError, say

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the bench itself dies (even by kill -9)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Proc:
    """A child process whose output lines are kept, with the time each arrived."""

    def __init__(self, name: str, cmd: list[str], cwd: Path | None = None):
        self.name = name
        self.cmd = cmd
        self.lines: deque[tuple[float, str]] = deque(maxlen=20_000)
        self.t_start = time.monotonic()
        self.popen = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.popen.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def output(self, last: int = 40) -> str:
        return "\n".join(line for _, line in list(self.lines)[-last:])

    def find(self, pattern: str, since: float = 0.0) -> tuple[float, re.Match] | None:
        rx = re.compile(pattern)
        for t, line in list(self.lines):
            if t >= since:
                m = rx.search(line)
                if m:
                    return t, m
        return None

    def wait_for(self, pattern: str, timeout: float, since: float = 0.0) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = self.find(pattern, since)
            if hit:
                return hit
            if self.popen.poll() is not None:
                time.sleep(0.2)
                hit = self.find(pattern, since)
                if hit:
                    return hit
                raise BenchError(
                    f"{self.name} exited ({self.popen.returncode}) before "
                    f"{pattern!r}:\n{self.output()}"
                )
            time.sleep(0.02)
        raise BenchError(f"{self.name}: no {pattern!r} within {timeout:.0f} s:\n{self.output()}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self._reader.join(2)


class Procs:
    """Every process the bench starts, so that all of them are stopped at the end."""

    def __init__(self) -> None:
        self.running: list[Proc] = []

    def start(self, name: str, cmd: list[str], cwd: Path | None = None) -> Proc:
        p = Proc(name, cmd, cwd)
        self.running.append(p)
        return p

    def stop(self, p: Proc) -> None:
        p.stop()
        if p in self.running:
            self.running.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.running)):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                say(f"could not stop {p.name} (pid {p.pid}): {e}")

    def run(self, name: str, cmd: list[str], timeout: float) -> str:
        """Run a short-lived child to its end (bounded); its output."""
        p = self.start(name, cmd)
        try:
            p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} did not finish within {timeout:.0f} s") from None
        finally:
            self.stop(p)
        out = "\n".join(line for _, line in p.lines)
        if p.popen.returncode != 0:
            raise BenchError(f"{name} failed ({p.popen.returncode}):\n{out[-3000:]}")
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_busy_seconds() -> float:
    """CPU time the whole machine spent not idle since boot (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK  # minus idle and iowait


def own_cpu_seconds() -> float:
    """This process and every child it has waited for."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
