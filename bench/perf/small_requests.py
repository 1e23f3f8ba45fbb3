"""Phase 1: small non-streamed requests. Throughput at concurrency 32, latency at 1, and the
proxy's CPU time per request, of the upstream direct, bare mitmdump, the minimal addon and
keygate (10,000 keys and 1 key: phase 4's ratio). Then (1b) keygate's hooks, timed inside
its process (bench/hooktime.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from . import keys
from .common import ROOT, BenchError, say
from .contenders import MINAUTH, check_chat
from .stats import median, rnd

if TYPE_CHECKING:
    from .phases import Bench

HOOKTIME = str(ROOT / "bench" / "hooktime.py")


def measure(bench: Bench) -> None:
    p = bench.p
    say("phase 1: small non-streamed requests")
    up = bench.lab.upstream("upstream-fast")
    check_chat(up.url, {})
    bare = bench.lab.proxy("bare mitmdump", up.url)
    minimal = bench.lab.proxy("minimal addon", up.url, auth=bench.auth, script=MINAUTH)
    kg = bench.lab.proxy("keygate", up.url, bench.kg_config("10k", up.url), bench.auth)
    kg1 = bench.lab.proxy(
        "keygate 1 key", up.url, bench.kg_config("1key", up.url, True), bench.auth
    )
    targets = [
        ("direct", up, {}, None),
        ("bare_mitmdump", bare, {}, bare.pid),
        ("minimal_addon", minimal, bench.auth, minimal.pid),
        ("keygate", kg, bench.auth, kg.pid),
        ("keygate_1key", kg1, bench.auth, kg1.pid),
    ]
    runs: dict[str, list[tuple[dict, dict]]] = {name: [] for name, *_ in targets}
    for r in range(p.request_rounds):
        # Every other round in reverse order: no target always runs right after
        # another (10,000 keys and 1 key above all, whose ratio is a target).
        for name, server, auth, pid in targets if r % 2 == 0 else targets[::-1]:
            say(f"  round {r + 1}/{p.request_rounds}: {name}")
            tput = bench.load.requests(server.url, auth, 32, p.duration, p.warmup, pid)
            lat = bench.load.requests(server.url, auth, 1, p.latency_duration, 0, None)
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
    bench.results["small_requests"] = out
    keys.key_count(bench, out)
    keys.reload(bench, kg)
    for s in (kg1, kg, minimal, bare):
        bench.procs.stop(s.proc)
    bench.fast_upstream = up


def hook_time(bench: Bench) -> None:
    """keygate's own code per request, timed inside its process (bench/hooktime.py):
    the part of keygate's latency and CPU no key check on mitmproxy can take away."""
    p = bench.p
    say("phase 1: keygate's hooks, timed in its process")
    up = bench.fast_upstream
    kg = bench.lab.proxy(
        "keygate, hooks timed",
        up.url,
        bench.kg_config("timed", up.url),
        bench.auth,
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
            bench.load.requests(kg.url, bench.auth, conc, secs, 0, None)
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
    bench.procs.stop(kg.proc)
    bench.results["small_requests"]["keygate_hooks"] = out
