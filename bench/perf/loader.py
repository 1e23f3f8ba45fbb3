"""The load on the proxies, from processes of its own: wrk for the non-streamed requests
when it is there, bench/load.py (asyncio) for the rest."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from .common import CHAT, PY, ROOT, SMALL_BODY, STREAM_BODY, BenchError
from .procs import Procs, cpu_seconds

LOAD = str(ROOT / "bench" / "load.py")

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
