"""Phase 6 (`scripts/bench --shared`): shared state (docs/shared-state.md). keygate with its
limits in Redis (a redis-server on loopback) against keygate alone, small requests at
concurrency 32; `keygate serve --workers 2` against one keygate process with Redis, small
requests at concurrency 32 and the first chunk of a burst of 100 new streams; and Redis'
round trips and script calls per request (from its INFO: reads processed, EVALSHA calls).

The floor of the two --workers ratios, in the same run: bare mitmdump, two processes on
one port (SO_REUSEPORT, as `--workers 2` starts them) against one, measured the same way.
On a 2-core machine the load generator, the fake upstream (and Redis) share the cores
with the proxies, and the kernel spreads a burst's connections over the two processes by
a hash: neither is keygate's, and the floor shows what they leave.

The streams are measured as bursts: each round starts 100 streams at once and takes the
p50 of their first chunks (the median of the rounds is reported), after one burst not
measured. (Phase 2's 200 streams
at concurrency 100 are two populations, a burst and then streams started one by one as
others end, and their p50 falls between the two.)"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from .common import PY, BenchError, say
from .contenders import STREAMING, Server, check_chat, wait_ready
from .procs import free_port
from .stats import median, rnd

if TYPE_CHECKING:
    from .phases import Bench

START_S = 60.0
BURST = 100  # streams started at once


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


def bare_workers(bench: Bench, name: str, upstream: str, n: int,
                 options: tuple[str, ...] = ()) -> Server:
    """n bare mitmdumps on one port, each with its listener opened with SO_REUSEPORT as
    `keygate serve --workers` opens it (keygate/cli/workers.py), without keygate."""
    port = free_port()
    procs = []
    for i in range(n):
        cmd = bench.lab.proxy_cmd(upstream, port, None, options)
        p = bench.procs.start(f"{name} {i + 1}", [PY, "-m", "keygate.cli.workers", *cmd[1:]],
                              cwd=bench.tmp)
        p.wait_for(r"listening at", START_S)
        procs.append(p)
    url = f"http://127.0.0.1:{port}"
    wait_ready(procs[0], url, START_S)
    check_chat(url, {}, procs[0])
    server = Server(name, procs[0], url)
    server.procs = procs
    return server


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
    shared = bench.lab.proxy("keygate+redis", up.url, _cfg(bench, "redis", up.url, rport),
                             bench.auth)
    two = workers(bench, "keygate --workers 2", up.url, _cfg(bench, "workers", up.url, rport),
                  2)
    bare = bench.lab.proxy("bare mitmdump", up.url)
    bare2 = bare_workers(bench, "bare mitmdump x2", up.url, 2)
    out: dict = {}
    order = [("keygate", alone, bench.auth, alone.pid),
             ("keygate_redis", shared, bench.auth, shared.pid),
             ("workers_2", two, bench.auth, None),
             ("bare_mitmdump", bare, {}, bare.pid),
             ("bare_mitmdump_2", bare2, {}, None)]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in order}
    trips: list[float] = []
    scripts: list[float] = []
    for r in range(p.request_rounds):
        for name, server, auth, pid in order if r % 2 == 0 else order[::-1]:
            say(f"  round {r + 1}/{p.request_rounds}: {name}, concurrency 32")
            before = redis_info(rport)
            res = bench.load.requests(server.url, auth, 32, p.duration, p.warmup, pid)
            after = redis_info(rport)
            runs[name].append(res)
            if name == "keygate_redis":
                # (warm-up requests went through Redis too: counted with an estimate)
                n = res["requests"] * (p.duration + p.warmup) / p.duration
                trips.append((after["reads"] - before["reads"]) / max(1, n))
                scripts.append((after["evalsha"] - before["evalsha"]) / max(1, n))
    for name, rs in runs.items():
        out[name] = {"rps_c32": rnd(median(x["rps"] for x in rs), 1),
                     "p99_ms_c32": rnd(median(x["p99_ms"] for x in rs)),
                     "rounds_rps_c32": [rnd(x["rps"], 1) for x in rs]}
        if rs and rs[0].get("cpu_us_per_request"):
            out[name]["cpu_us_per_request"] = rnd(median(x["cpu_us_per_request"] for x in rs), 1)
    out["keygate_redis"]["rps_vs_alone"] = rnd(
        out["keygate_redis"]["rps_c32"] / out["keygate"]["rps_c32"])
    out["workers_2"]["rps_vs_one"] = rnd(
        out["workers_2"]["rps_c32"] / out["keygate_redis"]["rps_c32"])
    out["bare_mitmdump_2"]["rps_vs_one"] = rnd(
        out["bare_mitmdump_2"]["rps_c32"] / out["bare_mitmdump"]["rps_c32"])
    out["redis_round_trips_per_request"] = rnd(median(trips))
    out["redis_scripts_per_request"] = rnd(median(scripts))
    for s in (alone, shared, two, bare, bare2, up):
        _stop(bench, s)
    # Bursts of 100 new streams: one process against two, keygate (with Redis) and bare.
    sup = bench.lab.upstream("upstream-stream", p.stream_chunks, p.stream_delay_ms)
    s2_config = _cfg(bench, "s2", sup.url, rport)
    targets = [
        ("direct", sup, {}),
        ("one_worker", bench.lab.proxy("keygate+redis streams", sup.url,
                                       _cfg(bench, "s1", sup.url, rport), bench.auth),
         bench.auth),
        ("workers_2", workers(bench, "keygate --workers 2 streams", sup.url, s2_config, 2),
         bench.auth),
        ("bare_one", bench.lab.proxy("bare mitmdump streams", sup.url, options=STREAMING), {}),
        ("bare_2", bare_workers(bench, "bare mitmdump x2 streams", sup.url, 2, STREAMING), {}),
    ]
    served_before = _served(s2_config)
    stream_s = (p.stream_chunks - 1) * p.stream_delay_ms / 1000.0
    sruns: dict[str, list[dict]] = {name: [] for name, *_ in targets}
    for name, server, auth in targets:
        # A burst first, not measured: a fresh process's first one is slower (its memory
        # grows to hold 100 streams, connections to Redis open), and it is one per process.
        say(f"  a burst of {BURST} streams, warm-up: {name}")
        bench.load.streams(server.url, auth, BURST, BURST, deadline=30 + stream_s * 4)
    for r in range(p.bursts):
        for name, server, auth in targets if r % 2 == 0 else targets[::-1]:
            say(f"  a burst of {BURST} streams, round {r + 1}/{p.bursts}: {name}")
            sruns[name].append(bench.load.streams(
                server.url, auth, BURST, BURST, deadline=30 + stream_s * 4))
    for name, rs in sruns.items():
        out[f"streams_c100_{name}"] = {
            k: rnd(median(x[k] for x in rs)) for k in ("ttfc_p50_ms", "ttfc_p99_ms",
                                                        "total_p50_ms")}
        out[f"streams_c100_{name}"]["rounds_ttfc_p50_ms"] = [rnd(x["ttfc_p50_ms"]) for x in rs]
    for two_name, one_name in (("workers_2", "one_worker"), ("bare_2", "bare_one")):
        out[f"streams_c100_{two_name}"]["ttfc_p50_vs_one"] = rnd(
            out[f"streams_c100_{two_name}"]["ttfc_p50_ms"]
            / max(0.001, out[f"streams_c100_{one_name}"]["ttfc_p50_ms"]))
    served = _served(s2_config)
    out["streams_c100_workers_2"]["streams_per_worker"] = [
        served.get(f, 0) - served_before.get(f, 0) for f in sorted(served)]
    bench.results["shared"] = out
    for _, server, _ in targets:
        _stop(bench, server)


def _stop(bench: Bench, server: Server) -> None:
    for proc in server.procs:
        bench.procs.stop(proc)


def _served(config) -> dict[str, int]:
    """Lines in each worker's usage log (logs/usage-<instance>.jsonl)."""
    return {f.name: sum(1 for _ in f.open("rb"))
            for f in (config.parent / "logs").glob("usage-*.jsonl")}


def _cfg(bench: Bench, label: str, upstream: str, rport: int):
    cfg = bench.kg_config(label, upstream)
    with_redis(cfg, rport)
    return cfg


def report(results: dict) -> str:
    s = results["shared"]
    w2, b2 = s["streams_c100_workers_2"], s["streams_c100_bare_2"]
    rows = [
        ("keygate alone, c=32 (requests/s)", s["keygate"]["rps_c32"], ""),
        ("keygate + Redis, c=32 (requests/s)", s["keygate_redis"]["rps_c32"],
         f"{s['keygate_redis']['rps_vs_alone']}x alone (target >= 0.9x)"),
        ("--workers 2 + Redis, c=32 (requests/s)", s["workers_2"]["rps_c32"],
         f"{s['workers_2']['rps_vs_one']}x one process (target >= 1.6x)"),
        ("  floor: bare mitmdump x2 on one port, c=32", s["bare_mitmdump_2"]["rps_c32"],
         f"{s['bare_mitmdump_2']['rps_vs_one']}x one bare ({s['bare_mitmdump']['rps_c32']})"),
        (f"first chunk p50, burst of {BURST} streams, upstream direct (ms)",
         s["streams_c100_direct"]["ttfc_p50_ms"], ""),
        (f"first chunk p50, burst of {BURST} streams, one process (ms)",
         s["streams_c100_one_worker"]["ttfc_p50_ms"], ""),
        (f"first chunk p50, burst of {BURST} streams, --workers 2 (ms)", w2["ttfc_p50_ms"],
         f"{w2['ttfc_p50_vs_one']}x one (target <= 0.6x); streams per worker "
         f"{'/'.join(str(n) for n in w2.get('streams_per_worker', []))}"),
        ("  floor: bare mitmdump x2 on one port (ms)", b2["ttfc_p50_ms"],
         f"{b2['ttfc_p50_vs_one']}x one bare ({s['streams_c100_bare_one']['ttfc_p50_ms']} ms)"),
        ("Redis round trips per request", s["redis_round_trips_per_request"],
         "(admission + settlement, pipelined: at most 2)"),
        ("Redis scripts (EVALSHA) per request", s["redis_scripts_per_request"], ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["shared state (scripts/bench --shared)"]
    lines += [f"  {label:<{width}}  {value!s:>9}  {note}".rstrip() for label, value, note in rows]
    return "\n".join(lines)
