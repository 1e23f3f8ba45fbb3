"""Shared fixtures: a fake Ollama in-process, and real mitmdump processes running keygate.

Every server here listens on 127.0.0.1 with a port the OS picks, is bounded in time, and
is stopped by the fixture that started it (by its own process id).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# Property tests draw the same examples on every run, so a CI result is reproducible;
# `scripts/test --hypothesis-profile=fuzz` draws new ones each time, to look further.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)
settings.load_profile("repeatable")

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "addons", ROOT / "demo", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from fakeollama import FakeOllama  # noqa: E402
from helpers.servers import stop_process  # noqa: E402

MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
START_TIMEOUT = 30.0


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run long load and soak tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long-running; use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def new_secret() -> str:
    return "sk-test-" + secrets.token_hex(16)


@dataclass
class KeySpec:
    name: str
    secret: str = field(default_factory=new_secret, repr=False)
    settings: dict = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def default_keys() -> dict[str, KeySpec]:
    return {k.name: k for k in [
        KeySpec("alice"),
        KeySpec("admin", settings={"scopes": ["inference", "models", "admin"]}),
        KeySpec("llama-only", settings={"models": ["llama3.2:*"]}),
        KeySpec("disabled", settings={"enabled": False}),
        KeySpec("expired", settings={"expires_at": "2020-01-01"}),
        KeySpec("elsewhere", settings={"allow_ips": ["203.0.113.0/24"]}),
        KeySpec("reader", settings={"scopes": ["models"]}),
        KeySpec("plain", settings={"plaintext": True}),
    ]}


def keys_yaml(keys: dict[str, KeySpec]) -> str:
    import hashlib

    doc = {}
    for k in keys.values():
        entry = dict(k.settings)
        if entry.pop("plaintext", False):
            entry["key"] = k.secret
        else:
            entry["key_sha256"] = hashlib.sha256(k.secret.encode()).hexdigest()
        doc[k.name] = entry
    return "# test keys\n" + yaml.safe_dump({"keys": doc}, default_flow_style=False,
                                          sort_keys=False)


class Output:
    """What a process writes to one pipe, line by line, read by a thread as it comes
    (appended to `lines`, which may be a list kept across restarts)."""

    def __init__(self, name: str, proc: subprocess.Popen, pipe,
                 lines: list[str] | None = None) -> None:
        self.name = name
        self.proc = proc
        self.lines = lines if lines is not None else []
        self._reader = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._reader.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT, after: int = 0) -> str:
        """The first line from index `after` on that matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if rx.search(line):
                    return line
            if self.proc.poll() is not None and not any(rx.search(x) for x in self.lines[after:]):
                time.sleep(0.2)  # let the reader thread drain
                if not any(rx.search(x) for x in self.lines[after:]):
                    raise AssertionError(
                        f"{self.name} exited ({self.proc.returncode}) before {pattern!r}:\n"
                        + self.text)
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.text}")

    def all(self, timeout: float = 10.0) -> str:
        """Everything, once the pipe has closed (whatever held it open has exited)."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"{self.name}'s output is still open"
        return self.text


class Gateway:
    """A real `mitmdump -s addons/gateway.py` in front of an upstream."""

    def __init__(self, workdir: Path, upstream: str, keys: dict[str, KeySpec] | None = None,
                 gateway_toml: str = "", script: Path | None = None, env: dict | None = None,
                 cwd: Path | None = None, pass_config: bool = True,
                 args: list[str] | None = None):
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.keys = keys if keys is not None else default_keys()
        self.config = workdir / "gateway.toml"
        self.keys_file = workdir / "keys.yaml"
        self.usage_log = workdir / "logs" / "usage.jsonl"
        self.script = script or ROOT / "addons" / "gateway.py"
        self.env = env
        self.cwd = cwd or workdir
        self.pass_config = pass_config
        self.args = list(args or [])  # more mitmdump options (a flow_detail replaces 0)
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.config.write_text(
            '[gateway]\nusage_log = "logs/usage.jsonl"\n' + gateway_toml)
        self.keys_file.write_text(keys_yaml(self.keys))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self, name: str) -> KeySpec:
        return self.keys[name]

    def start(self, wait: bool = True) -> "Gateway":
        confdir = self.dir / "confdir"
        confdir.mkdir(exist_ok=True)
        config = ["--set", f"keygate_config={self.config}"] if self.pass_config else []
        self.proc = subprocess.Popen(
            [MITMDUMP, "--mode", f"reverse:{self.upstream}", "--listen-host", "127.0.0.1",
             "--listen-port", "0", "-s", str(self.script), *config,
             "--set", f"confdir={confdir}", *self._detail(), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.cwd,
            env={**os.environ, **(self.env or {})},
        )
        self.out = Output("mitmdump", self.proc, self.proc.stdout, self.lines)
        if wait:
            self.wait_for(r"listening at .*:(\d+)")
            self.port = int(re.search(r"listening at .*:(\d+)", self.output).group(1))
            self.wait_for(r"keygate: config ")
            self.wait_for(r"keygate: usage counters rebuilt")
        return self

    def _detail(self) -> list[str]:
        # mitmdump refuses an option given twice
        if any(a.startswith("flow_detail=") for a in self.args):
            return []
        return ["--set", "flow_detail=0"]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT, after: int = 0) -> str:
        return self.out.wait_for(pattern, timeout, after)

    def usage(self) -> list[dict]:
        if not self.usage_log.exists():
            return []
        # Lines end at "\n" alone: a model name may hold U+0085 or U+2028, which
        # str.splitlines() would take for line ends too.
        return [json.loads(x) for x in self.usage_log.read_text().split("\n") if x.strip()]

    def usage_for(self, request_id: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.usage():
                if rec["id"] == request_id:
                    return rec
            time.sleep(0.05)
        raise AssertionError(f"no usage line for {request_id}; log: {self.usage()[-5:]}")

    def settled_count(self, quiet: float = 0.15, timeout: float = 5.0) -> int:
        """How many lines the log has once the requests already answered have theirs:
        a line lands a moment after its request ends (the writer gathers lines for
        ~20 ms), so wait until the file has stopped growing for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.usage_log.stat().st_size if self.usage_log.exists() else 0
            if now != size:
                size, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.02)
        return len(self.usage())

    def usage_after(self, n: int, timeout: float = 5.0) -> dict:
        """The line written after the first n: lines land when a request has ended,
        which can be a moment after the client has read the last byte."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.usage()
            if len(lines) > n:
                return lines[n]
            time.sleep(0.02)
        raise AssertionError(f"no usage line after {n}; log: {self.usage()[-3:]}")

    def stop(self) -> int | None:
        return stop_process(self.proc)


@pytest.fixture(scope="module")
def fake():
    f = FakeOllama().start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def gateway(fake, tmp_path_factory):
    """One keygate for a module, in front of `fake`, with default_keys()."""
    gw = Gateway(tmp_path_factory.mktemp("gw"), fake.url).start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def make_gateway(tmp_path):
    """Build keygates with custom settings (call .start()); all stop after the test."""
    made: list[Gateway] = []

    def make(upstream: str, **kw) -> Gateway:
        gw = Gateway(tmp_path / f"gw{len(made)}", upstream, **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


def eventually(check, timeout: float = 5.0, interval: float = 0.05):
    """Poll `check` until it returns something true or `timeout` passes; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def copy_checkout(dest: Path, serve: bool = False) -> Path:
    """A copy of addons/ for tests that edit gateway.py under a running mitmdump; with
    `serve`, also what scripts/serve runs from (scripts/, demo/, the config examples,
    pyproject.toml), and no config of its own. Returns the copy's gateway.py."""
    dirs = ("addons", "scripts", "demo") if serve else ("addons",)
    for d in dirs:
        shutil.copytree(ROOT / d, dest / d, ignore=shutil.ignore_patterns("__pycache__"))
    if serve:
        (dest / "config").mkdir()
        for f in ("gateway.example.toml", "keys.example.yaml"):
            shutil.copy(ROOT / "config" / f, dest / "config" / f)
        shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest / "addons" / "gateway.py"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A redis-server of this test module's own on a free loopback port (skipped where
    redis-server is not installed; CI installs it)."""
    from helpers.redisserver import RedisServer, needs_redis

    if needs_redis.args[0]:
        pytest.skip("redis-server is not installed")
    r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield r
    finally:
        r.stop()
