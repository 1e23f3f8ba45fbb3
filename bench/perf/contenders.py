"""What the bench measures, and how each is started: the fake Ollama upstream (measured
directly too), bare mitmdump, mitmdump streaming every body, mitmdump with the minimal
key-checking addon (bench/minauth.py), and keygate (addons/gateway.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from .common import CHAT, PY, ROOT, SMALL_BODY, BenchError
from .procs import Proc, Procs, free_port

MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
FAKE = str(ROOT / "demo" / "fakeollama.py")
GATEWAY = str(ROOT / "addons" / "gateway.py")
MINAUTH = str(ROOT / "bench" / "minauth.py")
START_TIMEOUT = 60.0
# Bare mitmdump as a streaming proxy: every body over 1 byte is streamed, none buffered.
STREAMING = ("stream_large_bodies=1",)


class Server:
    def __init__(self, name: str, proc: Proc, url: str, config: Path | None = None):
        self.name, self.proc, self.url, self.config = name, proc, url, config
        self.procs = [proc]  # (several: bench/perf/shared.py's bare_workers)

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
