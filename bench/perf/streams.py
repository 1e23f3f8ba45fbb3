"""Phase 2: streams at concurrency 1 and 100. Time to the first chunk and total time of the
upstream direct, bare mitmdump (which buffers), mitmdump streaming and keygate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import say
from .contenders import STREAMING
from .stats import median, rnd

if TYPE_CHECKING:
    from .phases import Bench


def measure(bench: Bench) -> None:
    p = bench.p
    say(f"phase 2: streams ({p.stream_chunks} chunks, {p.stream_delay_ms} ms apart)")
    up = bench.lab.upstream("upstream-stream", p.stream_chunks, p.stream_delay_ms)
    bare = bench.lab.proxy("bare mitmdump", up.url)
    streaming = bench.lab.proxy("mitmdump streaming", up.url, options=STREAMING)
    kg = bench.lab.proxy("keygate", up.url, bench.kg_config("streams", up.url), bench.auth)
    targets = [
        ("direct", up, {}, None),
        ("bare_mitmdump", bare, {}, bare.pid),
        ("mitmdump_streaming", streaming, {}, streaming.pid),
        ("keygate", kg, bench.auth, kg.pid),
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
                    bench.load.streams(server.url, auth, conc, count, pid=pid, deadline=deadline)
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
                sec[name]["cpu_ms_per_stream"] = rnd(median(x["cpu_ms_per_stream"] for x in rs), 2)
        d = sec["direct"]
        for name in ("bare_mitmdump", "mitmdump_streaming", "keygate"):
            sec[name]["ttfc_p50_minus_direct_ms"] = rnd(sec[name]["ttfc_p50_ms"] - d["ttfc_p50_ms"])
            sec[name]["total_p50_vs_direct"] = rnd(sec[name]["total_p50_ms"] / d["total_p50_ms"])
        sec["concurrency"] = conc
        sec["streams_per_round"] = count
        out[label] = sec
    out["chunks"] = p.stream_chunks
    out["chunk_delay_ms"] = p.stream_delay_ms
    bench.results["streams"] = out
    for s in (kg, streaming, bare, up):
        bench.procs.stop(s.proc)
