"""Phase 6 (`scripts/bench --shared`): shared state (docs/shared-state.md). keygate with its
limits in Redis (a redis-server on loopback) against keygate alone, small requests at
concurrency 32; `keygate serve --workers 2` against one keygate process with Redis, small
requests at concurrency 32 and the first chunk of 100 concurrent streams; and Redis' round
trips and script calls per request (from its INFO: reads processed, EVALSHA calls)."""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from .common import PY, BenchError, say
from .contenders import Server, check_chat, wait_ready
from .procs import free_port
from .stats import median, rnd

if TYPE_CHECKING:
    from .phases import Bench


def redis_info(port: int) -> dict[str, int]:
    """INFO's counters this phase reads: reads processed (one per round trip a client
    makes, however many commands it pipelines) and EVALSHA calls."""
    import redis

    c = redis.Redis(host="127.0.0.1", port=port)
    try:
        stats = c.info("stats")
        cmds = c.info("commandstats")
    finally:
        c.close()
    return {"reads": int(stats.get("total_reads_processed", 0)),
            "evalsha": int(cmds.get("cmdstat_evalsha", {}).get("calls", 0))}


def start_redis(bench: Bench) -> int:
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("--shared needs redis-server (Debian: apt-get install redis-server)")
    port = free_port()
    folder = bench.tmp / "redis"
    folder.mkdir(exist_ok=True)
    p = bench.procs.start("redis-server", [exe, "--port", str(port), "--bind", "127.0.0.1",
                                           "--dir", str(folder), "--save", "",
                                           "--appendonly", "no"])
    p.wait_for(r"Ready to accept connections", 20)
    return port


def with_redis(config, port: int) -> None:
    text = config.read_text().replace(
        "[gateway]\n", f'[gateway]\nredis_url = "redis://127.0.0.1:{port}/0"\n', 1)
    config.write_text(text)


def workers(bench: Bench, name: str, upstream: str, config, n: int) -> Server:
    port = free_port()
    p = bench.procs.start(name, [PY, "-m", "keygate.cli.main", "serve", "--workers", str(n),
                                 "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
                                 "--config", str(config), "--", "--set", "flow_detail=0"],
                          cwd=config.parent)
    url = f"http://127.0.0.1:{port}"
    wait_ready(p, url, 60)
    time.sleep(2.0)  # every worker listening, not only the first
    check_chat(url, bench.auth, p)
    return Server(name, p, url, config)


def measure(bench: Bench) -> None:
    p = bench.p
    say("phase 6: shared state (Redis, --workers)")
    rport = start_redis(bench)
    up = bench.lab.upstream("upstream-fast")
    alone = bench.lab.proxy("keygate", up.url, bench.kg_config("alone", up.url), bench.auth)
    cfg = bench.kg_config("redis", up.url)
    with_redis(cfg, rport)
    shared = bench.lab.proxy("keygate+redis", up.url, cfg, bench.auth)
    cfg2 = bench.kg_config("workers", up.url)
    with_redis(cfg2, rport)
    two = workers(bench, "keygate --workers 2", up.url, cfg2, 2)
    out: dict = {}
    runs: dict[str, list[dict]] = {"keygate": [], "keygate_redis": [], "workers_2": []}
    trips: list[float] = []
    scripts: list[float] = []
    order = [("keygate", alone, alone.pid), ("keygate_redis", shared, shared.pid),
             ("workers_2", two, None)]
    for r in range(p.request_rounds):
        for name, server, pid in order if r % 2 == 0 else order[::-1]:
            say(f"  round {r + 1}/{p.request_rounds}: {name}, concurrency 32")
            before = redis_info(rport)
            res = bench.load.requests(server.url, bench.auth, 32, p.duration, p.warmup, pid)
            after = redis_info(rport)
            runs[name].append(res)
            if name == "keygate_redis":
                # (warm-up requests went through Redis too: counted with an estimate)
                n = res["requests"] * (p.duration + p.warmup) / p.duration
                trips.append((after["reads"] - before["reads"]) / max(1, n))
                scripts.append((after["evalsha"] - before["evalsha"]) / max(1, n))
    for name, rs in runs.items():
        out[name] = {"rps_c32": rnd(median(x["rps"] for x in rs), 1),
                     "p99_ms_c32": rnd(median(x["p99_ms"] for x in rs))}
        if rs and "cpu_us_per_request" in rs[0] and rs[0].get("cpu_us_per_request"):
            out[name]["cpu_us_per_request"] = rnd(median(x["cpu_us_per_request"] for x in rs), 1)
    out["keygate_redis"]["rps_vs_alone"] = rnd(
        out["keygate_redis"]["rps_c32"] / out["keygate"]["rps_c32"])
    out["workers_2"]["rps_vs_one"] = rnd(
        out["workers_2"]["rps_c32"] / out["keygate_redis"]["rps_c32"])
    out["redis_round_trips_per_request"] = rnd(median(trips))
    out["redis_scripts_per_request"] = rnd(median(scripts))
    for s in (alone,):
        bench.procs.stop(s.proc)
    # 100 concurrent new streams: one process with Redis against two workers.
    sup = bench.lab.upstream("upstream-stream", p.stream_chunks, p.stream_delay_ms)
    one_s = bench.lab.proxy("keygate+redis streams", sup.url, _cfg(bench, "s1", sup.url, rport),
                            bench.auth)
    two_s = workers(bench, "keygate --workers 2 streams", sup.url,
                    _cfg(bench, "s2", sup.url, rport), 2)
    stream_s = (p.stream_chunks - 1) * p.stream_delay_ms / 1000.0
    sruns: dict[str, list[dict]] = {"direct": [], "one_worker": [], "workers_2": []}
    for r in range(p.rounds):
        for name, server in (("direct", sup), ("one_worker", one_s), ("workers_2", two_s)):
            say(f"  100 concurrent streams, round {r + 1}/{p.rounds}: {name}")
            sruns[name].append(bench.load.streams(
                server.url, bench.auth, 100, p.c100_streams,
                deadline=30 + p.c100_streams / 100 * stream_s * 4))
    for name, rs in sruns.items():
        out[f"streams_c100_{name}"] = {
            k: rnd(median(x[k] for x in rs))
            for k in ("ttfc_p50_ms", "ttfc_p99_ms", "total_p50_ms")}
    out["streams_c100_workers_2"]["ttfc_p50_vs_one"] = rnd(
        out["streams_c100_workers_2"]["ttfc_p50_ms"]
        / max(0.001, out["streams_c100_one_worker"]["ttfc_p50_ms"]))
    bench.results["shared"] = out
    for s in (one_s, two_s, sup, shared, two, up):
        bench.procs.stop(s.proc)


def _cfg(bench: Bench, label: str, upstream: str, rport: int):
    cfg = bench.kg_config(label, upstream)
    with_redis(cfg, rport)
    return cfg


def report(results: dict) -> str:
    s = results["shared"]
    rows = [
        ("keygate alone, c=32 (requests/s)", s["keygate"]["rps_c32"], ""),
        ("keygate + Redis, c=32 (requests/s)", s["keygate_redis"]["rps_c32"],
         f"{s['keygate_redis']['rps_vs_alone']}x alone (target >= 0.9x)"),
        ("--workers 2 + Redis, c=32 (requests/s)", s["workers_2"]["rps_c32"],
         f"{s['workers_2']['rps_vs_one']}x one process (target >= 1.6x)"),
        ("first chunk p50, 100 streams, upstream direct (ms)",
         s["streams_c100_direct"]["ttfc_p50_ms"], ""),
        ("first chunk p50, 100 streams, one process (ms)",
         s["streams_c100_one_worker"]["ttfc_p50_ms"], ""),
        ("first chunk p50, 100 streams, --workers 2 (ms)",
         s["streams_c100_workers_2"]["ttfc_p50_ms"],
         f"{s['streams_c100_workers_2']['ttfc_p50_vs_one']}x one (target <= 0.6x)"),
        ("Redis round trips per request", s["redis_round_trips_per_request"],
         "(admission + settlement, pipelined: at most 2)"),
        ("Redis scripts (EVALSHA) per request", s["redis_scripts_per_request"], ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["shared state (scripts/bench --shared)"]
    lines += [f"  {label:<{width}}  {value!s:>9}  {note}".rstrip() for label, value, note in rows]
    return "\n".join(lines)

