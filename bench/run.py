"""scripts/bench: keygate's performance benchmark (SPEC 9), ratios measured in one run.

On 127.0.0.1 with ports the OS picks, it starts fake Ollama upstreams (demo/fakeollama.py),
bare `mitmdump --mode reverse:...` (no keygate) and keygate with a realistic configuration
(3 channels, 10,000 keys, limits set, usage log on), then measures each of them and the
upstream directly. The stream phases (2, 3) also measure bare mitmdump with
`--set stream_large_bodies=1`, which streams every body instead of buffering it: what
mitmproxy itself costs when it streams, the floor under keygate's stream figures. Phase 1
also measures bare mitmdump running bench/minauth.py, the smallest key-checking addon: what
any addon costs on mitmproxy, the floor under keygate's throughput. Then keygate runs once
more with its hooks timed (bench/hooktime.py): what its own code costs per request in the
process, at concurrency 1 and 32, the floor under its CPU and latency.

  1. small non-streamed POST /v1/chat/completions: requests/s at concurrency 32, p50/p99
     latency at concurrency 1, CPU time per request of the proxy process (/proc/PID/stat);
  2. streams (50 chunks 20 ms apart) at concurrency 1 and 100: time to first chunk and
     total time (bare mitmdump buffers whole responses: its first chunk comes at the end;
     the streaming mitmdump is the reference for keygate);
  3. 1,000 concurrent slow streams: completions and the proxy's peak resident memory;
  4. 10,000 keys vs 1 key: throughput ratio, and how long a keys.yaml edit takes to apply;
  5. start-up with a 1,000,000-line usage log: process start to first served request, and
     how long keygate's reader takes to parse the log's JSON alone (the floor of a recount).

Load comes from a separate process: `wrk` when it is installed (the script installs it with
apt-get when it can), else bench/load.py (asyncio + httpx). Each measurement is repeated
(3 rounds, 5 for the small requests; `--quick`: 1, with smaller counts) and the median is
reported. Output: an aligned table on stdout; with `--json FILE` the same numbers as JSON.
Progress goes to stderr. The last table sets the figures against SPEC 9's targets; those
given in ms or s (wall-clock times from SPEC 9's reference machine) also against the limit
scaled by this machine's speed (see targets()).

`--instructions` runs bench/instructions.py instead: bare mitmdump, the minimal addon and
keygate under valgrind's callgrind, the instructions each runs per small request (CPU work
without the noise of CPU time).

Every process started here is stopped by its pid when the run ends, on errors and on Ctrl-C
too, and every step is bounded in time (the whole run by --time-limit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
LOAD = str(ROOT / "bench" / "load.py")
FAKE = str(ROOT / "demo" / "fakeollama.py")
GATEWAY = str(ROOT / "addons" / "gateway.py")
MINAUTH = str(ROOT / "bench" / "minauth.py")
HOOKTIME = str(ROOT / "bench" / "hooktime.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
START_TIMEOUT = 60.0
# Bare mitmdump as a streaming proxy: every body over 1 byte is streamed, none buffered.
STREAMING = ("stream_large_bodies=1",)
STREAMING_LABEL = "mitmdump streaming (stream_large_bodies=1)"
MINIMAL_LABEL = "minimal addon (bench/minauth.py)"
SECTIONS = ("small_requests", "streams", "slow_streams", "keys", "startup")


class BenchError(RuntimeError):
    """Something the bench could not measure; the run fails with this message."""


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int
    request_rounds: int  # rounds of phase 1: its ratios are the ones most subject to noise
    warmup: int  # s, unmeasured load before each throughput run
    duration: int  # s, measured throughput window (concurrency 32)
    latency_duration: int  # s, concurrency-1 latency window
    stream_chunks: int
    stream_delay_ms: int
    c1_streams: int  # per round and target
    c100_streams: int  # per round and target, 100 at a time
    slow_streams: int
    slow_chunks: int
    slow_delay_ms: int
    slow_ramp: float  # s over which the slow streams start: slower than keygate admits them
    # (~190 requests/s on the 2-core reference machine), and shorter than one stream, so
    # that all of them are in flight at once
    keys: int
    reload_rounds: int
    log_lines: int
    startup_rounds: int
    time_limit: int  # s for the whole run


FULL = Profile(
    "full",
    rounds=3,
    request_rounds=5,
    warmup=1,
    duration=5,
    latency_duration=3,
    stream_chunks=50,
    stream_delay_ms=20,
    c1_streams=8,
    c100_streams=200,
    slow_streams=1000,
    slow_chunks=20,
    slow_delay_ms=1000,
    slow_ramp=8.0,
    keys=10_000,
    reload_rounds=3,
    log_lines=1_000_000,
    startup_rounds=3,
    time_limit=25 * 60,
)
QUICK = Profile(
    "quick",
    rounds=1,
    request_rounds=1,
    warmup=1,
    duration=2,
    latency_duration=1,
    stream_chunks=50,
    stream_delay_ms=20,
    c1_streams=3,
    c100_streams=100,
    slow_streams=200,
    slow_chunks=10,
    slow_delay_ms=500,
    slow_ramp=1.5,
    keys=10_000,
    reload_rounds=1,
    log_lines=100_000,
    startup_rounds=1,
    time_limit=5 * 60,
)


# --------------------------------------------------------------------------- processes


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


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


# --------------------------------------------------------------------------- keys & config


@dataclass
class KeySet:
    """The bench's keys: `main` is in both files with the same settings and is the one the
    load uses; the big file adds `count - 1` more of every kind a real file has."""

    count: int
    main_secret: str
    big_yaml: str
    one_yaml: str
    names: list[str] = field(repr=False)
    plain_secret: str = field(default="", repr=False)  # a key with no limits at all
    main_sha256: str = ""  # keys.yaml's key_sha256 of `main`


def _key_entry(name: str, secret: str, i: int) -> str:
    lines = [f"  {name}:", f'    key_sha256: "{hashlib.sha256(secret.encode()).hexdigest()}"']
    if i % 50 == 49:
        lines.append("    enabled: false")
    if i % 13 == 3:
        lines.append("    expires_at: 2031-01-01")
    if i % 7 == 2:
        lines.append('    models: ["llama3.2:*", "gpt-4o-mini"]')
    if i % 11 == 5:
        lines.append("    scopes: [inference, models, admin]")
    if i % 17 == 4:
        lines.append('    allow_ips: ["127.0.0.0/8", "::1"]')
    if i % 4 == 1:
        lines += [
            "    limits:",
            "      rpm: 600",
            "      concurrent: 8",
            "      tokens_per_day: 5000000",
        ]
    return "\n".join(lines) + "\n"


MAIN_ENTRY = """  bench-main:
    key_sha256: "{digest}"
    models: ["llama3.2:*", "qwen2.5:*", "gpt-4o-mini"]
    allow_ips: ["127.0.0.0/8", "::1"]
    expires_at: 2031-01-01
    limits:                 # high enough never to trigger during the bench
      rpm: 1000000
      tpm: 1000000000000
      concurrent: 100000
      requests_per_day: 1000000000
      tokens_per_day: 1000000000000
      tokens_total: 1000000000000000
"""


def make_keys(count: int) -> KeySet:
    main = "sk-bench-" + secrets.token_urlsafe(30)
    main_sha256 = hashlib.sha256(main.encode()).hexdigest()
    main_entry = MAIN_ENTRY.format(digest=main_sha256)
    head = "# keygate bench: generated keys (secrets are not kept)\nkeys:\n"
    names, parts = ["bench-main"], [head]
    for i in range(count - 1):
        name = f"user-{i:05d}"
        names.append(name)
        parts.append(_key_entry(name, "sk-" + secrets.token_urlsafe(36), i))
        if i == (count - 1) // 2:
            parts.append(main_entry)  # somewhere in the middle, as in a real file
    if count == 1:
        parts.append(main_entry)
    # A key without quotas: at start-up it is served before the usage counters are loaded.
    plain = "sk-bench-" + secrets.token_urlsafe(30)
    digest = hashlib.sha256(plain.encode()).hexdigest()
    parts.append(f'  bench-plain:\n    key_sha256: "{digest}"\n')
    names.append("bench-plain")
    return KeySet(count, main, "".join(parts), head + main_entry, names, plain, main_sha256)


def bench_keys(count: int) -> tuple[KeySet, dict]:
    """`count` keys, and the request header of the main one, which bench/minauth.py is
    also set up to accept (by its digest: no secret in the environment)."""
    keys = make_keys(count)
    os.environ["MINAUTH_KEY_SHA256"] = keys.main_sha256
    return keys, {"Authorization": f"Bearer {keys.main_secret}"}


def gateway_toml(upstream: str) -> str:
    return f"""# keygate bench: three channels on one fake upstream
[gateway]
usage_log = "logs/usage.jsonl"

[[channels]]
name = "gpu-a"
kind = "ollama"
base_url = "{upstream}"
models = ["llama3.2:*", "qwen2.5:*"]
priority = 10
weight = 3

[[channels]]
name = "gpu-b"
kind = "ollama"
base_url = "{upstream}"
models = ["llama3.2:*", "nomic-embed-text:*"]
priority = 10
weight = 1

[[channels]]
name = "spare"
kind = "ollama"
base_url = "{upstream}"
models = ["*"]
priority = 0
[channels.model_map]
"gpt-4o-mini" = "qwen2.5:7b"
"""


def keygate_dir(path: Path, upstream: str, keys_yaml: str) -> Path:
    """A folder with gateway.toml, keys.yaml and logs/; returns gateway.toml's path."""
    (path / "logs").mkdir(parents=True, exist_ok=True)
    (path / "keys.yaml").write_text(keys_yaml)
    config = path / "gateway.toml"
    config.write_text(gateway_toml(upstream))
    return config


def write_usage_log(
    folder: Path, lines: int, names: list[str], max_bytes: int = 100 * 1024 * 1024
) -> tuple[int, int]:
    """`lines` realistic SPEC 6 records over the last four days, split into files the way
    keygate's writer rotates them at the default 100 MB. Returns (bytes, files)."""
    rng = random.Random(6)
    end = time.time() - 60
    start = end - 4 * 86400
    step = (end - start) / max(1, lines)
    paths = ["/v1/chat/completions"] * 5 + ["/api/chat"] * 3 + ["/api/generate", "/v1/embeddings"]
    models = [
        ("llama3.2:latest", "llama3.2:latest", "gpu-a"),
        ("llama3.2:latest", "llama3.2:latest", "gpu-b"),
        ("qwen2.5:7b", "qwen2.5:7b", "gpu-a"),
        ("gpt-4o-mini", "qwen2.5:7b", "spare"),
    ]
    ips = ["127.0.0.1", "10.0.3.17", "10.0.3.22", "192.168.1.40", "::1"]
    key_names = names[: min(len(names), 2000)]
    parts: list[Path] = []
    out = None
    size = total = 0
    cached_sec, prefix = -1, ""
    buf: list[str] = []

    def flush() -> None:
        nonlocal size
        data = "".join(buf).encode()
        out.write(data)
        size += len(data)
        buf.clear()

    for i in range(lines):
        if out is None or size >= max_bytes:
            if out is not None:
                out.close()
            parts.append(folder / f"part{len(parts)}")
            out = open(parts[-1], "wb")
            size = 0
        ts = start + i * step
        sec = int(ts)
        if sec != cached_sec:
            cached_sec, prefix = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        r = rng.random()
        model, upstream_model, channel = models[i % 4]
        path = paths[i % 10]
        stream = "true" if i % 3 else "false"
        if r < 0.05:
            rec = (
                f'{{"ts":"{prefix}.{int((ts % 1) * 1000):03d}Z",'
                f'"id":"req_{rng.getrandbits(80):020x}","key":null,"status":401,"error":"invalid_api_key","method":"POST","path":"{path}",'
                f'"model":null,"upstream_model":null,"channel":null,"stream":false,"prompt_tokens":0,'
                f'"completion_tokens":0,"total_tokens":0,"duration_ms":{rng.random():.3f},'
                f'"client_ip":"{ips[i % 5]}","completed":true}}\n'
            )
        else:
            key = key_names[rng.randrange(len(key_names))]
            status, error = (
                (429, '"rate_limit_exceeded"')
                if r < 0.08
                else ((502, '"upstream_error"') if r < 0.09 else (200, "null"))
            )
            p = rng.randrange(10, 2000) if status == 200 else 0
            c = rng.randrange(1, 800) if status == 200 else 0
            ch = f'"{channel}"' if status != 429 else "null"
            um = f'"{upstream_model}"' if status != 429 else "null"
            rec = (
                f'{{"ts":"{prefix}.{int((ts % 1) * 1000):03d}Z",'
                f'"id":"req_{rng.getrandbits(80):020x}","key":"{key}","status":{status},"error":{error},"method":"POST","path":"{path}",'
                f'"model":"{model}","upstream_model":{um},"channel":{ch},"stream":{stream},'
                f'"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{p + c},'
                f'"duration_ms":{rng.random() * 9000:.3f},"client_ip":"{ips[i % 5]}",'
                f'"completed":true}}\n'
            )
        buf.append(rec)
        total += len(rec)
        if len(buf) >= 5000:
            flush()
    if buf:
        flush()
    out.close()
    live = folder / "usage.jsonl"
    for k, part in enumerate(reversed(parts)):
        part.rename(live if k == 0 else folder / f"usage.jsonl.{k}")
    return total, len(parts)


# --------------------------------------------------------------------------- servers


class Server:
    def __init__(self, name: str, proc: Proc, url: str, config: Path | None = None):
        self.name, self.proc, self.url, self.config = name, proc, url, config

    @property
    def pid(self) -> int:
        return self.proc.pid


class Lab:
    """Starts and stops the upstreams and proxies of the run."""

    def __init__(self, procs: Procs, tmp: Path):
        self.procs = procs
        self.tmp = tmp
        self.confdir = tmp / "confdir"

    def upstream(self, name: str, chunks: int = 5, delay_ms: float = 0.0) -> Server:
        p = self.procs.start(
            name,
            [
                PY,
                FAKE,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--chunks",
                str(chunks),
                "--chunk-delay-ms",
                str(delay_ms),
            ],
        )
        _, m = p.wait_for(r"fakeollama listening on (http://\S+)", 30)
        return Server(name, p, m.group(1))

    def proxy_cmd(
        self,
        upstream: str,
        port: int,
        config: Path | None,
        options: tuple[str, ...] = (),
        script: str | None = None,
    ) -> list[str]:
        """mitmdump's command line; `options` are extra `--set name=value` settings;
        `script` another addon script than keygate's gateway.py (given `config`, one that
        runs keygate: bench/hooktime.py)."""
        cmd = [
            MITMDUMP,
            "--mode",
            f"reverse:{upstream}",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            f"confdir={self.confdir}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "block_global=false",
            "--set",
            "flow_detail=0",
        ]
        for option in options:
            cmd += ["--set", option]
        if config is not None:
            cmd += ["-s", script or GATEWAY, "--set", f"keygate_config={config}"]
        elif script is not None:
            cmd += ["-s", script]
        return cmd

    def proxy(
        self,
        name: str,
        upstream: str,
        config: Path | None = None,
        auth: dict | None = None,
        options: tuple[str, ...] = (),
        script: str | None = None,
    ) -> Server:
        """bare mitmdump (config None, no script), another addon script, or keygate, with
        `options` (extra --set settings), ready: GET / answers 200 and one small chat
        request (with `auth`) succeeds."""
        self.confdir.mkdir(exist_ok=True)
        for attempt in range(3):
            port = free_port()
            p = self.procs.start(
                name,
                self.proxy_cmd(upstream, port, config, options, script),
                cwd=config.parent if config else self.tmp,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(p, url, START_TIMEOUT)
            except BenchError:
                if p.alive() or attempt == 2 or "address already in use" not in p.output().lower():
                    self.procs.stop(p)
                    raise
                self.procs.stop(p)  # someone took the port meanwhile: another one
                continue
            check_chat(url, auth or {}, p)
            return Server(name, p, url, config)
        raise AssertionError("unreachable")


def wait_ready(p: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        while time.monotonic() < deadline:
            if not p.alive():
                time.sleep(0.2)
                raise BenchError(f"{p.name} exited ({p.popen.returncode}):\n{p.output()}")
            try:
                if c.get(url + "/").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise BenchError(f"{p.name} not ready within {timeout:.0f} s:\n{p.output()}")


def check_chat(url: str, auth: dict, p: Proc | None = None) -> None:
    with httpx.Client(timeout=10.0, trust_env=False) as c:
        r = c.post(
            url + CHAT, content=SMALL_BODY, headers={"content-type": "application/json", **auth}
        )
    if r.status_code != 200:
        where = f"\n{p.output()}" if p else ""
        raise BenchError(f"{url}{CHAT} answered {r.status_code}: {r.text[:300]}{where}")


# --------------------------------------------------------------------------- load


def apt_install(package: str, present: Callable[[], object]) -> bool:
    """Install Debian's `package` with apt-get (as root; an index update if the first try
    fails) until `present()` says it is there. False where that cannot be done here."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (
        ["apt-get", "install", "-y", "-q", package],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", package],
    ):
        say(f"installing {package}: {' '.join(step)}")
        try:
            subprocess.run(
                step,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=300,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except (subprocess.TimeoutExpired, OSError) as e:
            say(f"  failed: {e}")
            continue
        if step[1] == "install" and present():
            return True
    return False


def ensure_wrk(allow_install: bool) -> str | None:
    """wrk's path; installs Debian's package when missing and we may (root, apt-get)."""
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if apt_install("wrk", lambda: shutil.which("wrk")):
        return shutil.which("wrk")
    say("could not install wrk; using the Python client (bench/load.py)")
    return None


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


class Loader:
    """Runs the load processes: wrk (non-streamed requests) or bench/load.py."""

    def __init__(self, procs: Procs, tmp: Path, wrk: str | None, http: str):
        self.procs = procs
        self.tmp = tmp
        self.wrk = wrk
        self.http = http
        python = f"bench/load.py ({'raw asyncio HTTP/1.1' if http == 'raw' else 'httpx'})"
        self.version = python
        if wrk:
            out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
            m = re.search(r"wrk (\S+)", out.stdout + out.stderr)
            self.version = f"wrk {m.group(1) if m else '?'} (requests), {python} (streams)"

    def _lua(self, auth: dict) -> Path:
        body = SMALL_BODY
        assert "]]" not in body
        lines = [
            'wrk.method = "POST"',
            f"wrk.body = [[{body}]]",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
        for k, v in auth.items():
            lines.append(f'wrk.headers["{k}"] = "{v}"')
        path = self.tmp / f"wrk-{hashlib.sha1(repr(auth).encode()).hexdigest()[:8]}.lua"
        path.write_text("\n".join(lines) + "\n")
        return path

    def requests(
        self, url: str, auth: dict, concurrency: int, duration: int, warmup: int, pid: int | None
    ) -> dict:
        """Closed-loop small POSTs: rps, latency percentiles, proxy CPU per request."""
        if self.wrk:
            return self._wrk(url, auth, concurrency, duration, warmup, pid)
        cmd = [
            PY,
            LOAD,
            "requests",
            "--http",
            self.http,
            "--url",
            url,
            "--path",
            CHAT,
            "--body",
            SMALL_BODY,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
        ]
        for k, v in auth.items():
            cmd += ["--header", f"{k}: {v}"]
        if pid:
            cmd += ["--pid", str(pid)]
        res = json.loads(
            self.procs.run("load", cmd, timeout=duration + warmup + 90).splitlines()[-1]
        )
        return self._checked(res, url)

    def _wrk(
        self, url: str, auth: dict, concurrency: int, duration: int, warmup: int, pid: int | None
    ) -> dict:
        script = str(self._lua(auth))
        base = [self.wrk, "-t1", f"-c{concurrency}", "--timeout", "10s", "-s", script]
        if warmup:
            self.procs.run("wrk", base + [f"-d{warmup}s", url + CHAT], timeout=warmup + 60)
        cpu0 = cpu_seconds(pid) if pid else None
        out = self.procs.run(
            "wrk", base + ["--latency", f"-d{duration}s", url + CHAT], timeout=duration + 60
        )
        cpu1 = cpu_seconds(pid) if pid else None
        m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
        if not m:
            raise BenchError(f"cannot read wrk's output:\n{out}")
        total = int(m.group(1))
        elapsed = float(m.group(2)) * _UNITS[m.group(3)] / 1000.0
        bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        errors = sum(int(x) for x in sock.groups()) if sock else 0
        pct = {
            p: float(v) * _UNITS[u]
            for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        }
        done = total - bad
        res = {
            "requests": done,
            "elapsed_s": elapsed,
            "rps": done / elapsed if elapsed else 0.0,
            "p50_ms": pct.get("50"),
            "p99_ms": pct.get("99"),
            "statuses": {"non-2xx": bad} if bad else {"200": done},
            "errors": {"socket": errors} if errors else {},
        }
        if cpu0 is not None and cpu1 is not None and done:
            res["cpu_s"] = cpu1 - cpu0
            res["cpu_us_per_request"] = (cpu1 - cpu0) / done * 1e6
        return self._checked(res, url)

    @staticmethod
    def _checked(res: dict, url: str) -> dict:
        bad = sum(v for k, v in res.get("statuses", {}).items() if k != "200")
        errors = sum(res.get("errors", {}).values())
        if (
            not res.get("requests")
            or bad > 0.01 * res["requests"]
            or errors > 0.01 * res["requests"]
        ):
            raise BenchError(f"load on {url} failed: {json.dumps(res)}")
        return res

    def streams(
        self,
        url: str,
        auth: dict,
        concurrency: int,
        count: int,
        pid: int | None = None,
        ramp: float = 0.0,
        deadline: float = 120.0,
    ) -> dict:
        cmd = [
            PY,
            LOAD,
            "streams",
            "--http",
            self.http,
            "--url",
            url,
            "--path",
            CHAT,
            "--body",
            STREAM_BODY,
            "--concurrency",
            str(concurrency),
            "--count",
            str(count),
            "--ramp",
            str(ramp),
            "--deadline",
            str(deadline),
            "--timeout",
            str(deadline),
        ]
        for k, v in auth.items():
            cmd += ["--header", f"{k}: {v}"]
        if pid:
            cmd += ["--pid", str(pid)]
        res = json.loads(self.procs.run("load", cmd, timeout=deadline + 60).splitlines()[-1])
        if not res["completed"]:
            raise BenchError(f"no stream completed on {url}: {json.dumps(res)}")
        return res


# --------------------------------------------------------------------------- statistics


def median(values) -> float:
    vals = [v for v in values if v is not None]
    if not vals:
        raise BenchError("no value to take the median of")
    return statistics.median(vals)


def rnd(v: float, digits: int = 3) -> float:
    return round(float(v), digits)


# --------------------------------------------------------------------------- the phases


class Bench:
    def __init__(self, profile: Profile, procs: Procs, tmp: Path, loader: Loader):
        self.p = profile
        self.procs = procs
        self.tmp = tmp
        self.lab = Lab(procs, tmp)
        self.load = loader
        say(f"generating {profile.keys} keys")
        self.keys, self.auth = bench_keys(profile.keys)
        self.results: dict = {}
        self.notes: list[str] = []
        self._n = 0

    def _kg_config(self, label: str, upstream: str, one_key: bool = False) -> Path:
        self._n += 1
        return keygate_dir(
            self.tmp / f"kg{self._n}-{label}",
            upstream,
            self.keys.one_yaml if one_key else self.keys.big_yaml,
        )

    # 1 + 4a ------------------------------------------------------------------

    def small_requests(self) -> None:
        p = self.p
        say("phase 1: small non-streamed requests")
        up = self.lab.upstream("upstream-fast")
        check_chat(up.url, {})
        bare = self.lab.proxy("bare mitmdump", up.url)
        minimal = self.lab.proxy("minimal addon", up.url, auth=self.auth, script=MINAUTH)
        kg = self.lab.proxy("keygate", up.url, self._kg_config("10k", up.url), self.auth)
        kg1 = self.lab.proxy(
            "keygate 1 key", up.url, self._kg_config("1key", up.url, True), self.auth
        )
        targets = [
            ("direct", up, {}, None),
            ("bare_mitmdump", bare, {}, bare.pid),
            ("minimal_addon", minimal, self.auth, minimal.pid),
            ("keygate", kg, self.auth, kg.pid),
            ("keygate_1key", kg1, self.auth, kg1.pid),
        ]
        runs: dict[str, list[tuple[dict, dict]]] = {name: [] for name, *_ in targets}
        for r in range(p.request_rounds):
            # Every other round in reverse order: no target always runs right after
            # another (10,000 keys and 1 key above all, whose ratio is a target).
            for name, server, auth, pid in targets if r % 2 == 0 else targets[::-1]:
                say(f"  round {r + 1}/{p.request_rounds}: {name}")
                tput = self.load.requests(server.url, auth, 32, p.duration, p.warmup, pid)
                lat = self.load.requests(server.url, auth, 1, p.latency_duration, 0, None)
                runs[name].append((tput, lat))
        out: dict[str, dict] = {}
        for name, *_ in targets:
            rs = runs[name]
            row = {
                "rps_c32": rnd(median(t["rps"] for t, _ in rs), 1),
                "p50_ms_c1": rnd(median(lat["p50_ms"] for _, lat in rs)),
                "p99_ms_c1": rnd(median(lat["p99_ms"] for _, lat in rs)),
                "p99_ms_c32": rnd(median(t["p99_ms"] for t, _ in rs)),
                "requests_measured": sum(t["requests"] + lat["requests"] for t, lat in rs),
            }
            if name != "direct":
                row["cpu_us_per_request"] = rnd(median(t["cpu_us_per_request"] for t, _ in rs), 1)
            out[name] = row
        b = out["bare_mitmdump"]
        for name in ("minimal_addon", "keygate", "keygate_1key"):
            row = out[name]
            row["rps_vs_bare"] = rnd(row["rps_c32"] / b["rps_c32"])
            row["cpu_vs_bare"] = rnd(row["cpu_us_per_request"] / b["cpu_us_per_request"])
            row["p50_minus_bare_ms"] = rnd(row["p50_ms_c1"] - b["p50_ms_c1"])
        out["rounds_rps_c32"] = {
            name: [rnd(t["rps"], 1) for t, _ in runs[name]] for name, *_ in targets
        }
        self.results["small_requests"] = out
        self.results["keys"] = {
            "keys": self.keys.count,
            "rps_10k_keys": out["keygate"]["rps_c32"],
            "rps_1_key": out["keygate_1key"]["rps_c32"],
            "ratio_10k_vs_1": rnd(out["keygate"]["rps_c32"] / out["keygate_1key"]["rps_c32"]),
            "cpu_us_10k_keys": out["keygate"]["cpu_us_per_request"],
            "cpu_us_1_key": out["keygate_1key"]["cpu_us_per_request"],
            "cpu_ratio_10k_vs_1": rnd(
                out["keygate"]["cpu_us_per_request"] / out["keygate_1key"]["cpu_us_per_request"]
            ),
        }
        self.reload(kg)
        for s in (kg1, kg, minimal, bare):
            self.procs.stop(s.proc)
        self.fast_upstream = up

    # 1b ----------------------------------------------------------------------

    def hook_time(self) -> None:
        """keygate's own code per request, timed inside its process (bench/hooktime.py):
        the part of keygate's latency and CPU no key check on mitmproxy can take away."""
        p = self.p
        say("phase 1: keygate's hooks, timed in its process")
        up = self.fast_upstream
        kg = self.lab.proxy(
            "keygate, hooks timed", up.url, self._kg_config("timed", up.url), self.auth,
            script=HOOKTIME,
        )
        out: dict = {}
        with httpx.Client(timeout=10.0, trust_env=False) as c:

            def probe() -> dict:
                return c.get(kg.url + "/.bench/hooktime").json()

            for label, conc, secs in (
                ("c1", 1, p.latency_duration * 2),
                ("c32", 32, p.duration),
            ):
                before = probe()
                self.load.requests(kg.url, self.auth, conc, secs, 0, None)
                after = probe()
                n = after["requests"] - before["requests"]
                if n <= 0:
                    raise BenchError(f"no request reached the timed keygate:\n{kg.proc.output()}")
                stages = {
                    name: rnd((t - before["stages"].get(name, 0.0)) / n * 1e6, 1)
                    for name, t in after["stages"].items()
                }
                out[label] = {
                    "requests": n,
                    "us_per_request": rnd((after["seconds"] - before["seconds"]) / n * 1e6, 1),
                    "stages_us": dict(sorted(stages.items(), key=lambda kv: -kv[1])),
                }
        self.procs.stop(kg.proc)
        self.results["small_requests"]["keygate_hooks"] = out

    # 4b ----------------------------------------------------------------------

    def reload(self, kg: Server) -> None:
        say("phase 4: reloading keys.yaml with 10,000 keys")
        keys_file = kg.config.parent / "keys.yaml"
        key_times, log_times = [], []
        with httpx.Client(timeout=5.0, trust_env=False) as c:
            for r in range(self.p.reload_rounds):
                secret = "sk-reload-" + secrets.token_urlsafe(30)
                entry = (
                    f"  reload-{r}:\n    key_sha256: "
                    f'"{hashlib.sha256(secret.encode()).hexdigest()}"\n'
                )
                text = self.keys.big_yaml + entry
                headers = {"content-type": "application/json", "Authorization": f"Bearer {secret}"}
                if c.post(kg.url + CHAT, content=SMALL_BODY, headers=headers).status_code != 401:
                    raise BenchError("a key not yet in keys.yaml was accepted")
                time.sleep(1.2)  # let the watcher settle on the previous file
                tmp = keys_file.with_name(".keys.yaml.bench")
                tmp.write_text(text)
                t0 = time.monotonic()
                os.replace(tmp, keys_file)  # as editors and scripts/keys write it
                deadline = t0 + 20
                t_key = None
                while time.monotonic() < deadline:
                    if (
                        c.post(kg.url + CHAT, content=SMALL_BODY, headers=headers).status_code
                        == 200
                    ):
                        t_key = time.monotonic()
                        break
                    time.sleep(0.005)
                if t_key is None:
                    raise BenchError(f"a new key did not work within 20 s:\n{kg.proc.output()}")
                t_log, _ = kg.proc.wait_for(r"keygate: reloaded configuration", 10, since=t0)
                key_times.append(t_key - t0)
                log_times.append(t_log - t0)
                say(
                    f"  round {r + 1}: new key works after {t_key - t0:.3f} s, "
                    f"logged after {t_log - t0:.3f} s"
                )
        self.results["keys"].update(
            {
                "reload_s": rnd(median(key_times)),
                "reload_logged_s": rnd(median(log_times)),
                "reload_rounds_s": [rnd(x) for x in key_times],
            }
        )

    # 2 -----------------------------------------------------------------------

    def streams(self) -> None:
        p = self.p
        say(f"phase 2: streams ({p.stream_chunks} chunks, {p.stream_delay_ms} ms apart)")
        up = self.lab.upstream("upstream-stream", p.stream_chunks, p.stream_delay_ms)
        bare = self.lab.proxy("bare mitmdump", up.url)
        streaming = self.lab.proxy("mitmdump streaming", up.url, options=STREAMING)
        kg = self.lab.proxy("keygate", up.url, self._kg_config("streams", up.url), self.auth)
        targets = [
            ("direct", up, {}, None),
            ("bare_mitmdump", bare, {}, bare.pid),
            ("mitmdump_streaming", streaming, {}, streaming.pid),
            ("keygate", kg, self.auth, kg.pid),
        ]
        stream_s = (p.stream_chunks - 1) * p.stream_delay_ms / 1000.0
        out: dict[str, dict] = {}
        for label, conc, count in (("c1", 1, p.c1_streams), ("c100", 100, p.c100_streams)):
            runs: dict[str, list[dict]] = {name: [] for name, *_ in targets}
            for r in range(p.rounds):
                for name, server, auth, pid in targets:
                    say(f"  concurrency {conc}, round {r + 1}/{p.rounds}: {name}")
                    deadline = 30 + count / conc * stream_s * 4
                    runs[name].append(
                        self.load.streams(server.url, auth, conc, count, pid=pid, deadline=deadline)
                    )
            sec: dict[str, dict] = {}
            for name, *_ in targets:
                rs = runs[name]
                sec[name] = {
                    k: rnd(median(x[k] for x in rs))
                    for k in ("ttfc_p50_ms", "ttfc_p99_ms", "total_p50_ms", "total_p99_ms")
                }
                sec[name]["completed"] = sum(x["completed"] for x in rs)
                sec[name]["failed"] = sum(x["failed"] for x in rs)
                if name != "direct":
                    sec[name]["cpu_ms_per_stream"] = rnd(
                        median(x["cpu_ms_per_stream"] for x in rs), 2
                    )
            d = sec["direct"]
            for name in ("bare_mitmdump", "mitmdump_streaming", "keygate"):
                sec[name]["ttfc_p50_minus_direct_ms"] = rnd(
                    sec[name]["ttfc_p50_ms"] - d["ttfc_p50_ms"]
                )
                sec[name]["total_p50_vs_direct"] = rnd(
                    sec[name]["total_p50_ms"] / d["total_p50_ms"]
                )
            sec["concurrency"] = conc
            sec["streams_per_round"] = count
            out[label] = sec
        out["chunks"] = p.stream_chunks
        out["chunk_delay_ms"] = p.stream_delay_ms
        self.results["streams"] = out
        for s in (kg, streaming, bare, up):
            self.procs.stop(s.proc)

    # 3 -----------------------------------------------------------------------

    def slow_streams(self) -> None:
        p = self.p
        n = p.slow_streams
        say(
            f"phase 3: {n} concurrent slow streams "
            f"({p.slow_chunks} chunks, {p.slow_delay_ms} ms apart)"
        )
        up = self.lab.upstream("upstream-slow", p.slow_chunks, p.slow_delay_ms)
        out: dict = {
            "streams": n,
            "chunks": p.slow_chunks,
            "chunk_delay_ms": p.slow_delay_ms,
            "ramp_s": p.slow_ramp,
        }
        stream_s = (p.slow_chunks - 1) * p.slow_delay_ms / 1000.0
        deadline = 60 + stream_s * 3 + p.slow_ramp
        # Fresh proxies, one at a time, so that VmHWM is this test's peak alone.
        for name in ("direct", "bare_mitmdump", "mitmdump_streaming", "keygate"):
            say(f"  {name}")
            if name == "direct":
                server, auth = up, {}
            elif name == "bare_mitmdump":
                server, auth = self.lab.proxy("bare mitmdump", up.url), {}
            elif name == "mitmdump_streaming":
                server = self.lab.proxy("mitmdump streaming", up.url, options=STREAMING)
                auth = {}
            else:
                server = self.lab.proxy(
                    "keygate", up.url, self._kg_config("slow", up.url), self.auth
                )
                auth = self.auth
            res = self.load.streams(
                server.url, auth, n, n, pid=server.pid, ramp=p.slow_ramp, deadline=deadline
            )
            row = {
                "completed": res["completed"],
                "failed": res["failed"],
                "max_in_flight": res["max_in_flight"],
                "ttfc_p50_ms": rnd(res["ttfc_p50_ms"]),
                "total_p50_ms": rnd(res["total_p50_ms"]),
                "total_p99_ms": rnd(res["total_p99_ms"]),
            }
            if name != "direct":
                mem = memory_mb(server.pid)
                row.update(
                    cpu_ms_per_stream=res["cpu_ms_per_stream"],
                    rss_before_mb=res["rss_before_mb"],
                    rss_peak_mb=res["rss_peak_mb"],
                    vmhwm_mb=mem.get("VmHWM", res["hwm_mb"]),
                    rss_after_mb=mem.get("VmRSS", 0.0),
                )
                self.procs.stop(server.proc)
            out[name] = row
            if res["failed"]:
                self.notes.append(
                    f"slow streams via {name}: {res['failed']} failed ({res['failures']})"
                )
        self.procs.stop(up.proc)
        self.results["slow_streams"] = out

    # 5 -----------------------------------------------------------------------

    def startup(self) -> None:
        p = self.p
        up = self.fast_upstream
        say(f"phase 5: start-up with a {p.log_lines:,}-line usage log")
        big = self._kg_config("startup", up.url)
        t0 = time.monotonic()
        nbytes, files = write_usage_log(big.parent / "logs", p.log_lines, self.keys.names)
        say(f"  wrote {nbytes / 1e6:.0f} MB in {files} files in {time.monotonic() - t0:.1f} s")
        empty = self._kg_config("startup-empty", up.url)
        sidecar = big.parent / "logs" / "usage.jsonl.ledger"
        times: dict[str, list[float]] = {
            "bare_mitmdump": [],
            "keygate_empty_log": [],
            # A key without quotas first: it stops keygate before the counters are loaded,
            # so it leaves no ledger cache; the quota key's run then writes the cache that
            # the warm run reads.
            "keygate_log_cold_plain": [],
            "keygate_log_cold": [],
            "keygate_log_warm": [],
        }
        ledger: dict[str, list[float]] = {"keygate_log_cold": [], "keygate_log_warm": []}
        json_read: list[float] = []
        for r in range(p.startup_rounds):
            for name in times:
                if name in ("keygate_log_cold", "keygate_log_cold_plain"):
                    sidecar.unlink(missing_ok=True)
                config = {"bare_mitmdump": None, "keygate_empty_log": empty}.get(name, big)
                plain = {"Authorization": f"Bearer {self.keys.plain_secret}"}
                t, proc = self.time_to_serve(
                    name, up.url, config, plain if name == "keygate_log_cold_plain" else None
                )
                times[name].append(t)
                hit = proc.find(r"usage counters rebuilt from .* in ([\d.]+) s")
                if name in ledger and hit:
                    ledger[name].append(float(hit[1].group(1)))
                say(f"  round {r + 1}/{p.startup_rounds}: {name}: {t:.3f} s")
            json_read.append(json_read_seconds(big.parent / "logs" / "usage.jsonl"))
            say(f"  round {r + 1}/{p.startup_rounds}: the log's JSON read: {json_read[-1]:.3f} s")
        out: dict = {
            "log_lines": p.log_lines,
            "log_mb": rnd(nbytes / 1e6, 1),
            "log_files": files,
            "keys": self.keys.count,
        }
        for name, ts in times.items():
            out[f"{name}_s"] = rnd(median(ts))
        for name, ts in ledger.items():
            if ts:
                out[f"{name}_ledger_s"] = rnd(median(ts))
        out["json_read_s"] = rnd(median(json_read))
        out["keygate_log_cold_minus_bare_s"] = rnd(
            out["keygate_log_cold_s"] - out["bare_mitmdump_s"]
        )
        self.results["startup"] = out
        self.procs.stop(up.proc)

    def time_to_serve(
        self, name: str, upstream: str, config: Path | None, auth: dict[str, str] | None = None
    ) -> tuple[float, Proc]:
        """Seconds from starting mitmdump to its first successful chat request."""
        auth = (auth or self.auth) if config else {}
        headers = {"content-type": "application/json", **auth}
        port = free_port()
        url = f"http://127.0.0.1:{port}{CHAT}"
        cmd = self.lab.proxy_cmd(upstream, port, config)
        proc = self.procs.start(name, cmd, cwd=config.parent if config else self.tmp)
        t0 = proc.t_start
        try:
            with httpx.Client(timeout=30.0, trust_env=False) as c:
                while time.monotonic() - t0 < START_TIMEOUT:
                    if not proc.alive():
                        time.sleep(0.2)
                        raise BenchError(
                            f"{name} exited ({proc.popen.returncode}):\n{proc.output()}"
                        )
                    try:
                        r = c.post(url, content=SMALL_BODY, headers=headers)
                        if r.status_code == 200:
                            return time.monotonic() - t0, proc
                        if r.status_code not in (502, 503):
                            raise BenchError(f"{name}: {r.status_code} {r.text[:200]}")
                    except httpx.TransportError:
                        pass
                    time.sleep(0.01)
            raise BenchError(f"{name} did not serve within {START_TIMEOUT:.0f} s:\n{proc.output()}")
        finally:
            self.procs.stop(proc)

    # -------------------------------------------------------------------------

    def run(self) -> dict:
        t0 = time.monotonic()
        self.small_requests()  # also 4 (keys), and leaves the fast upstream for 1b and 5
        self.hook_time()
        self.streams()
        self.slow_streams()
        self.startup()
        self.results["meta"] = {
            "profile": self.p.name,
            "rounds": self.p.rounds,
            "request_rounds": self.p.request_rounds,
            "client": self.load.version,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "mitmproxy": mitmproxy_version(),
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": rnd(time.monotonic() - t0, 1),
            "machine_scale": rnd(machine_scale(self.results)),
            "notes": self.notes,
        }
        self.results["targets"] = targets(self.results)
        return self.results


# Reads every record of a usage log (all its files) with keygate's reader, counting
# nothing: what any recount of the log costs before a single counter is added up.
JSON_READ = """
import sys, time
sys.path.insert(0, sys.argv[1])
from keygate.usagelog import log_files, read_records
t0 = time.perf_counter()
for path in log_files(sys.argv[2]):
    read_records(path, lambda record: None)
print(time.perf_counter() - t0)
"""


def json_read_seconds(log: Path) -> float:
    """Seconds keygate's log reader takes to parse every line of `log`, in a fresh process."""
    r = subprocess.run(
        [PY, "-c", JSON_READ, str(ROOT / "addons"), str(log)],
        capture_output=True, text=True, timeout=300,
    )
    if r.returncode != 0:
        raise BenchError(f"reading the usage log failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.strip())


def mitmproxy_version() -> str:
    try:
        from importlib.metadata import version

        return version("mitmproxy")
    except Exception:
        return "?"


# --------------------------------------------------------------------------- SPEC 9


# SPEC 9's reference machine: bare mitmdump used ~850 us of CPU per small request there.
REFERENCE_BARE_CPU_US = 850.0


def machine_scale(res: dict) -> float:
    """How much slower than SPEC 9's reference machine this one runs mitmproxy: bare
    mitmdump's CPU per small request in this run over the reference's ~850 us."""
    return res["small_requests"]["bare_mitmdump"]["cpu_us_per_request"] / REFERENCE_BARE_CPU_US


def targets(res: dict) -> list[dict]:
    """SPEC 9's targets, each with its measured value (informative: never fails the run).
    Some also carry `floor`: the same target measured on what keygate cannot be cheaper
    than. For throughput that is bench/minauth.py, the smallest key-checking addon (what
    any addon costs on mitmproxy). For CPU and p50 latency it is bare mitmdump plus
    keygate's own hook time, timed in its process (bench/hooktime.py): keygate's code runs
    on every request's path, on top of everything bare mitmdump does, so keygate cannot
    cost less than that. For the streams it is bare mitmdump streaming every body (what
    mitmproxy costs when it streams); for the cold start-up, bare mitmdump's start plus one
    read of the log's JSON (what a recount of the log cannot skip).

    The targets given in milliseconds or seconds are wall-clock times, set on SPEC 9's
    reference machine; every other target is a ratio in one run. Each of those also carries
    `scaled`: the same limit times machine_scale(), the verdict the target would give on a
    machine that runs mitmproxy as fast as the reference does. Both verdicts are reported."""
    sr, st, sl, ks, su = (res[k] for k in SECTIONS)
    kg, mn = sr["keygate"], sr["minimal_addon"]
    hooks = sr["keygate_hooks"]
    own = "bare_plus_hooks"
    own_cpu = 1 + hooks["c32"]["us_per_request"] / sr["bare_mitmdump"]["cpu_us_per_request"]
    own_p50 = hooks["c1"]["us_per_request"] / 1000
    fl = "mitmdump_streaming"
    rows = [
        (
            "throughput >= 85% of bare mitmdump (c=32)",
            kg["rps_vs_bare"],
            ">=",
            0.85,
            "x",
            ("minimal_addon", mn["rps_vs_bare"]),
        ),
        (
            "CPU per request <= 1.2x bare mitmdump",
            kg["cpu_vs_bare"],
            "<=",
            1.2,
            "x",
            (own, rnd(own_cpu)),
        ),
        (
            "p50 latency (c=1) <= bare + 0.3 ms",
            kg["p50_minus_bare_ms"],
            "<=",
            0.3,
            "ms",
            (own, rnd(own_p50)),
        ),
        (
            "stream first chunk p50 <= direct + 3 ms (c=1)",
            st["c1"]["keygate"]["ttfc_p50_minus_direct_ms"],
            "<=",
            3.0,
            "ms",
            (fl, st["c1"][fl]["ttfc_p50_minus_direct_ms"]),
        ),
        (
            "stream first chunk p50 <= direct + 3 ms (c=100)",
            st["c100"]["keygate"]["ttfc_p50_minus_direct_ms"],
            "<=",
            3.0,
            "ms",
            (fl, st["c100"][fl]["ttfc_p50_minus_direct_ms"]),
        ),
        (
            "100 streams: total p50 within 5% of direct",
            st["c100"]["keygate"]["total_p50_vs_direct"],
            "<=",
            1.05,
            "x",
            (fl, st["c100"][fl]["total_p50_vs_direct"]),
        ),
        (f"{sl['streams']} slow streams all complete", sl["keygate"]["failed"], "<=", 0, "failed"),
        (
            f"{sl['streams']} slow streams: resident memory < 200 MB",
            max(sl["keygate"]["rss_peak_mb"], sl["keygate"]["vmhwm_mb"]),
            "<",
            200,
            "MB",
        ),
        (
            f"{ks['keys']:,} keys: throughput within 5% of 1 key",
            ks["ratio_10k_vs_1"],
            ">=",
            0.95,
            "x",
        ),
        (f"reload of {ks['keys']:,} keys < 1 s", ks["reload_s"], "<", 1.0, "s"),
        (
            f"start-up with {su['log_lines']:,}-line log < 2 s (no cache, key w/o quota)",
            su["keygate_log_cold_plain_s"],
            "<",
            2.0,
            "s",
        ),
        (
            f"start-up with {su['log_lines']:,}-line log < 2 s (no cache, quota key)",
            su["keygate_log_cold_s"],
            "<",
            2.0,
            "s",
            ("bare_plus_json", rnd(su["bare_mitmdump_s"] + su["json_read_s"])),
        ),
        (
            f"start-up with {su['log_lines']:,}-line log < 2 s (ledger cache)",
            su["keygate_log_warm_s"],
            "<",
            2.0,
            "s",
        ),
    ]
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    scale = machine_scale(res)
    out = []
    for t, v, op, lim, u, *floor in rows:
        row = {"target": t, "value": v, "limit": f"{op} {lim}", "unit": u, "ok": ops[op](v, lim)}
        scaled = lim * scale if u in ("ms", "s") else None
        if scaled is not None:
            row["scaled"] = {"limit": f"{op} {scaled:.3g}", "ok": ops[op](v, scaled)}
        if floor:
            proxy, value = floor[0]
            row["floor"] = {"proxy": proxy, "value": value, "ok": ops[op](value, lim)}
            if scaled is not None:
                row["floor"]["scaled_ok"] = ops[op](value, scaled)
        out.append(row)
    return out


# --------------------------------------------------------------------------- report


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> str:
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    out = [title, line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out += [f"  {n}" for n in notes]
    return "\n".join(out) + "\n"


def report(res: dict) -> str:
    m, sr, st, sl, ks, su = res["meta"], *(res[k] for k in SECTIONS)
    parts = [
        f"keygate bench ({m['profile']}): {m['cpus']} CPUs, Python {m['python']}, "
        f"mitmproxy {m['mitmproxy']}, load: {m['client']}; median of {m['request_rounds']} "
        f"round(s) (small requests), {m['rounds']} (streams); {m['seconds']:.0f} s; "
        f"other processes used {m.get('other_processes_cpu_pct', 0):.0f}% of the CPUs "
        "meanwhile\n"
    ]
    names = {
        "direct": "upstream direct",
        "bare_mitmdump": "bare mitmdump",
        "keygate": f"keygate ({ks['keys']:,} keys)",
        "keygate_1key": "keygate (1 key)",
        "mitmdump_streaming": STREAMING_LABEL,
        "minimal_addon": MINIMAL_LABEL,
        "bare_plus_hooks": "bare mitmdump + keygate's hook time",
        "bare_plus_json": "bare mitmdump start + reading the log's JSON",
    }
    hk = sr["keygate_hooks"]
    rows = []
    for k in ("direct", "bare_mitmdump", "minimal_addon", "keygate", "keygate_1key"):
        r = sr[k]
        rows.append(
            [
                names[k],
                r["rps_c32"],
                r.get("rps_vs_bare", 1.0 if k == "bare_mitmdump" else None),
                r["p50_ms_c1"],
                r["p99_ms_c1"],
                r.get("p50_minus_bare_ms"),
                r.get("cpu_us_per_request"),
                r.get("cpu_vs_bare", 1.0 if k == "bare_mitmdump" else None),
            ]
        )
    parts.append(
        table(
            "1. Small non-streamed POST /v1/chat/completions",
            [
                "target",
                "req/s c=32",
                "vs bare",
                "p50 ms c=1",
                "p99 ms c=1",
                "p50-bare ms",
                "CPU us/req",
                "CPU vs bare",
            ],
            rows,
            [
                "CPU: utime+stime of the proxy process (/proc/PID/stat) per request at c=32",
                f"{MINIMAL_LABEL}: the smallest key-checking addon (SPEC 9's '30-line auth "
                "addon'), streaming what keygate streams: what a key check costs, keygate's floor",
                "keygate's hook time, timed in its process (bench/hooktime.py), per request: "
                f"{hk['c1']['us_per_request']:,.0f} us at c=1, {hk['c32']['us_per_request']:,.0f} "
                "us at c=32; largest at c=32: "
                + ", ".join(f"{n} {v:,.0f}" for n, v in list(hk["c32"]["stages_us"].items())[:5]),
            ],
        )
    )
    rows = []
    for label in ("c1", "c100"):
        for k in ("direct", "bare_mitmdump", "mitmdump_streaming", "keygate"):
            r = st[label][k]
            label_ = names[k] + (" (buffers)" if k == "bare_mitmdump" else "")
            rows.append(
                [
                    label_,
                    st[label]["concurrency"],
                    r["ttfc_p50_ms"],
                    r["ttfc_p99_ms"],
                    r.get("ttfc_p50_minus_direct_ms"),
                    r["total_p50_ms"],
                    r["total_p99_ms"],
                    r.get("total_p50_vs_direct"),
                    r.get("cpu_ms_per_stream"),
                    f"{r['completed']}/{r['completed'] + r['failed']}",
                ]
            )
    parts.append(
        table(
            f"2. Streams: POST /v1/chat/completions stream=true, {st['chunks']} chunks "
            f"{st['chunk_delay_ms']} ms apart",
            [
                "target",
                "conc",
                "1st chunk p50",
                "p99",
                "p50-direct",
                "total p50",
                "p99",
                "vs direct",
                "CPU ms/stream",
                "complete",
            ],
            rows,
            [
                "times in ms; bare mitmdump buffers whole responses: its first chunk waits for "
                "the last",
                "mitmdump streaming: bare mitmdump streaming every body: mitmproxy's own cost, "
                "keygate's floor",
                "keygate streams chunk by chunk (and edits SSE frames: it asks for usage, "
                "strips it)",
            ],
        )
    )
    rows = []
    for k in ("direct", "bare_mitmdump", "mitmdump_streaming", "keygate"):
        r = sl[k]
        rows.append(
            [
                names[k] + (" (buffers)" if k == "bare_mitmdump" else ""),
                f"{r['completed']}/{r['completed'] + r['failed']}",
                r["max_in_flight"],
                r["ttfc_p50_ms"],
                r["total_p50_ms"],
                r["total_p99_ms"],
                r.get("cpu_ms_per_stream"),
                r.get("rss_before_mb"),
                r.get("rss_peak_mb"),
                r.get("vmhwm_mb"),
            ]
        )
    parts.append(
        table(
            f"3. {sl['streams']:,} concurrent slow streams ({sl['chunks']} chunks "
            f"{sl['chunk_delay_ms']} ms apart, started over {sl['ramp_s']:g} s)",
            [
                "target",
                "completed",
                "max in flight",
                "1st chunk p50 ms",
                "total p50 ms",
                "p99 ms",
                "CPU ms/stream",
                "RSS before MB",
                "RSS peak MB",
                "VmHWM MB",
            ],
            rows,
            ["RSS: VmRSS of the proxy sampled every 50 ms; VmHWM: its peak since it started"],
        )
    )
    rows = [
        [f"{ks['keys']:,} keys", ks["rps_10k_keys"], ks["cpu_us_10k_keys"]],
        ["1 key", ks["rps_1_key"], ks["cpu_us_1_key"]],
    ]
    parts.append(
        table(
            "4. Key count",
            ["keys.yaml", "req/s c=32", "CPU us/req"],
            rows,
            [
                f"throughput ratio {ks['ratio_10k_vs_1']:.3f}, CPU ratio "
                f"{ks['cpu_ratio_10k_vs_1']:.3f}; reload of {ks['keys']:,} keys: new key "
                f"works after {ks['reload_s']:.3f} s, 'reloaded configuration' logged after "
                f"{ks['reload_logged_s']:.3f} s (watcher polls every 0.5 s)"
            ],
        )
    )
    rows = [
        ["bare mitmdump (no keygate)", su["bare_mitmdump_s"], None],
        ["keygate, empty usage log", su["keygate_empty_log_s"], None],
        [
            "keygate, log, no ledger cache, key without quotas",
            su["keygate_log_cold_plain_s"],
            None,
        ],
        [
            "keygate, log, no ledger cache, key with quotas",
            su["keygate_log_cold_s"],
            su.get("keygate_log_cold_ledger_s"),
        ],
        [
            "keygate, log, ledger cache",
            su["keygate_log_warm_s"],
            su.get("keygate_log_warm_ledger_s"),
        ],
    ]
    parts.append(
        table(
            f"5. Start-up: process start to first served request "
            f"({su['log_lines']:,}-line usage log, "
            f"{su['log_mb']:.0f} MB in {su['log_files']} files; {su['keys']:,} keys)",
            ["start", "seconds", "ledger s"],
            rows,
            [
                "ledger s: keygate's own 'usage counters rebuilt ... in X s' log line",
                f"reading the log's JSON alone (keygate's reader, nothing counted, in a fresh "
                f"process): {su['json_read_s']:.3f} s",
            ],
        )
    )
    rows = []
    for t in res["targets"]:
        sc = t.get("scaled")
        rows.append(
            [
                t["target"],
                fmt(t["value"], 3) + " " + t["unit"],
                t["limit"],
                "ok" if t["ok"] else "MISSED",
                f"{sc['limit']}: {'ok' if sc['ok'] else 'MISSED'}" if sc else "",
            ]
        )
        if "floor" in t:
            f = t["floor"]
            rows.append(
                [
                    f"  floor: {names[f['proxy']]}",
                    fmt(f["value"], 3) + " " + t["unit"],
                    t["limit"],
                    "(ok)" if f["ok"] else "(missed)",
                    ("(ok)" if f["scaled_ok"] else "(missed)") if sc else "",
                ]
            )
    scale, bare_cpu = machine_scale(res), sr["bare_mitmdump"]["cpu_us_per_request"]
    parts.append(
        table(
            "SPEC 9 targets",
            ["target", "measured", "want", "", f"times scaled x{fmt(scale)}"],
            rows,
            [
                "floor: the same target on what keygate cannot beat: the minimal key-checking "
                "addon (throughput); bare mitmdump plus keygate's hook time at c=32 (CPU) and "
                "c=1 (p50); bare mitmdump streaming every body (streams); bare mitmdump's start "
                "plus one read of the log's JSON with keygate's reader (cold start-up)",
                f"times scaled: the targets in ms and s are wall-clock times set on SPEC 9's "
                f"reference machine, where bare mitmdump used ~{REFERENCE_BARE_CPU_US:.0f} us "
                f"of CPU per small request; here it used {bare_cpu:,.0f} us (x{fmt(scale)}), "
                "and the limit is scaled by as much",
            ],
        )
    )
    for n in m["notes"]:
        parts.append(f"note: {n}\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: smaller counts, one round (under 2 minutes)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load for non-streamed requests: wrk (installed with apt-get "
        "if missing) or the Python client; default auto",
    )
    parser.add_argument(
        "--http",
        choices=("raw", "httpx"),
        default="raw",
        help="HTTP client of bench/load.py: a minimal asyncio one (default; "
        "a quarter of httpx's CPU per chunk) or httpx",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: count the instructions per small request of bare mitmdump, the "
        "minimal addon and keygate under valgrind's callgrind (installed with apt-get if "
        "missing; ~7 minutes; bench/instructions.py)",
    )
    parser.add_argument(
        "--time-limit",
        type=int,
        default=0,
        help="abort after this many seconds (default 300 quick, 1500 full, 1200 "
        "--instructions)",
    )
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    limit = args.time_limit or (1200 if args.instructions else profile.time_limit)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # 1,000 streams = 2,000+ fds

    caught = {"signal": signal.SIGINT}

    def on_signal(signum, _frame):
        caught["signal"] = signum
        raise KeyboardInterrupt

    def on_alarm(_signum, _frame):
        raise BenchError(f"time limit of {limit} s reached")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)  # also where a shell started us with SIGINT ignored
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    rc = 0
    try:
        if args.instructions:
            return _instructions(procs, tmp, args.json)
        wrk = None if args.client == "python" else ensure_wrk(True)
        if args.client == "wrk" and not wrk:
            raise BenchError("--client wrk: wrk is not available")
        loader = Loader(procs, tmp, wrk, args.http)
        say(f"{profile.name} run, load from {loader.version}, work folder {tmp}")
        busy0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.monotonic()
        results = Bench(profile, procs, tmp, loader).run()
        signal.alarm(0)
        procs.stop_all()  # before counting: their CPU time is known once they are reaped
        wall = time.monotonic() - wall0
        others = (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0)
        share = max(0.0, 100.0 * others / (wall * (os.cpu_count() or 1)))
        results["meta"]["other_processes_cpu_pct"] = rnd(share, 1)
        if share > 10:
            results["meta"]["notes"].append(
                f"other processes kept {share:.0f}% of the machine's CPU busy during the run: "
                "expect noisy numbers (ratios within a round are the robust part)"
            )
        print(report(results), flush=True)
        write_json(args.json, results)
    except BenchError as e:
        say(f"error: {e}")
        rc = 1
    except KeyboardInterrupt:
        say(f"stopped by {signal.Signals(caught['signal']).name}; stopping what was started")
        rc = 128 + caught["signal"]
    finally:
        signal.alarm(0)
        procs.stop_all()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
        say(f"results written to {path}")


def _instructions(procs: Procs, tmp: Path, json_file: str | None) -> int:
    import instructions  # bench/instructions.py, beside this file

    tools = instructions.ensure_valgrind(True)
    if tools is None:
        raise BenchError("--instructions needs valgrind (Debian: apt-get install valgrind)")
    say(f"instruction counts under callgrind, work folder {tmp}")
    results = instructions.measure(procs, tmp, tools)
    signal.alarm(0)
    print(instructions.report(results), flush=True)
    write_json(json_file, results)
    return 0


if __name__ == "__main__":
    # Run as the module `run`, the one bench/instructions.py imports: one BenchError, one
    # Procs, not a second copy of this file under the name __main__.
    import run

    sys.exit(run.main())
