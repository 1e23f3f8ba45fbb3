"""A real redis-server for a test: on a free loopback port, in a folder of its own, stopped
by its process id. Tests that need one skip when redis-server is not installed
(scripts/test and .ci/run install it)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.servers import stop_process

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None, password: str | None = None,
                 aof: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.password = password
        self.aof = aof
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--save", "",
                "--appendonly", "yes" if self.aof else "no", "--daemonize", "no",
                "--logfile", str(self.folder / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"redis-server exited: "
                                         f"{(self.folder / 'redis.log').read_text()}")
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
