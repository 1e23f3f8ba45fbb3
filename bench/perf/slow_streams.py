"""Phase 3: many concurrent slow streams (1,000 in the full run), all in flight at once.
Completions, and each proxy's CPU per stream and peak resident memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import say
from .contenders import STREAMING
from .stats import rnd

if TYPE_CHECKING:
    from .phases import Bench


def measure(bench: Bench) -> None:
    p = bench.p
    n = p.slow_streams
    say(
        f"phase 3: {n} concurrent slow streams ({p.slow_chunks} chunks, {p.slow_delay_ms} ms apart)"
    )
    up = bench.lab.upstream("upstream-slow", p.slow_chunks, p.slow_delay_ms)
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
            server, auth = bench.lab.proxy("bare mitmdump", up.url), {}
        elif name == "mitmdump_streaming":
            server = bench.lab.proxy("mitmdump streaming", up.url, options=STREAMING)
            auth = {}
        else:
            server = bench.lab.proxy("keygate", up.url, bench.kg_config("slow", up.url), bench.auth)
            auth = bench.auth
        res = bench.load.streams(
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
            bench.procs.stop(server.proc)
        out[name] = row
        if res["failed"]:
            bench.notes.append(
                f"slow streams via {name}: {res['failed']} failed ({res['failures']})"
            )
    bench.procs.stop(up.proc)
    bench.results["slow_streams"] = out


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = round(int(value.split()[0]) / 1024, 1)
    return out
