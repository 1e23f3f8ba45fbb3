"""Phase 5: start-up with a big usage log (1,000,000 lines in the full run). Process start
to first served request of bare mitmdump and keygate (empty log; the log without its ledger
cache, by a key without and with quotas; with the cache), and how long keygate's reader
takes to parse the log's JSON alone."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from .common import CHAT, PY, ROOT, SMALL_BODY, BenchError, say
from .contenders import START_TIMEOUT
from .procs import Proc, free_port
from .stats import median, rnd

if TYPE_CHECKING:
    from .phases import Bench


def measure(bench: Bench) -> None:
    p = bench.p
    up = bench.fast_upstream
    say(f"phase 5: start-up with a {p.log_lines:,}-line usage log")
    big = bench.kg_config("startup", up.url)
    t0 = time.monotonic()
    nbytes, files = write_usage_log(big.parent / "logs", p.log_lines, bench.keys.names)
    say(f"  wrote {nbytes / 1e6:.0f} MB in {files} files in {time.monotonic() - t0:.1f} s")
    empty = bench.kg_config("startup-empty", up.url)
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
            plain = {"Authorization": f"Bearer {bench.keys.plain_secret}"}
            t, proc = time_to_serve(
                bench, name, up.url, config, plain if name == "keygate_log_cold_plain" else None
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
        "keys": bench.keys.count,
    }
    for name, ts in times.items():
        out[f"{name}_s"] = rnd(median(ts))
    for name, ts in ledger.items():
        if ts:
            out[f"{name}_ledger_s"] = rnd(median(ts))
    out["json_read_s"] = rnd(median(json_read))
    out["keygate_log_cold_minus_bare_s"] = rnd(out["keygate_log_cold_s"] - out["bare_mitmdump_s"])
    bench.results["startup"] = out
    bench.procs.stop(up.proc)


def time_to_serve(
    bench: Bench,
    name: str,
    upstream: str,
    config: Path | None,
    auth: dict[str, str] | None = None,
) -> tuple[float, Proc]:
    """Seconds from starting mitmdump to its first successful chat request."""
    auth = (auth or bench.auth) if config else {}
    headers = {"content-type": "application/json", **auth}
    port = free_port()
    url = f"http://127.0.0.1:{port}{CHAT}"
    cmd = bench.lab.proxy_cmd(upstream, port, config)
    proc = bench.procs.start(name, cmd, cwd=config.parent if config else bench.tmp)
    t0 = proc.t_start
    try:
        with httpx.Client(timeout=30.0, trust_env=False) as c:
            while time.monotonic() - t0 < START_TIMEOUT:
                if not proc.alive():
                    time.sleep(0.2)
                    raise BenchError(f"{name} exited ({proc.popen.returncode}):\n{proc.output()}")
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
        bench.procs.stop(proc)


def write_usage_log(
    folder: Path, lines: int, names: list[str], max_bytes: int = 100 * 1024 * 1024
) -> tuple[int, int]:
    """`lines` realistic usage-log records over the last four days, split into files the way
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


# Reads every record of a usage log (all its files) with keygate's reader, counting
# nothing: what any recount of the log costs before a single counter is added up.
JSON_READ = """
import sys, time
sys.path.insert(0, sys.argv[1])
from keygate.accounting.log import log_files, read_records
t0 = time.perf_counter()
for path in log_files(sys.argv[2]):
    read_records(path, lambda record: None)
print(time.perf_counter() - t0)
"""


def json_read_seconds(log: Path) -> float:
    """Seconds keygate's log reader takes to parse every line of `log`, in a fresh process."""
    r = subprocess.run(
        [PY, "-c", JSON_READ, str(ROOT / "addons"), str(log)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        raise BenchError(f"reading the usage log failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.strip())
