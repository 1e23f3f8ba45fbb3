"""scripts/bench: keygate's performance benchmark (docs/performance.md), ratios measured in one run.

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
Progress goes to stderr. The last table sets the figures against the targets (docs/performance.md);
those
given in ms or s (wall-clock times from the reference machine) also against the limit
scaled by this machine's speed (see perf/targets.py).

`--instructions` runs bench/instructions.py instead: bare mitmdump, the minimal addon and
keygate under valgrind's callgrind, the instructions each runs per small request (CPU work
without the noise of CPU time).

Each part has its module in bench/perf/: the contenders and how each is started, the
load, each phase, the targets, the report (the list is in bench/perf/__init__.py). This
file is the entry point: options, signals, the time limit and the work folder.

Every process started here is stopped by its pid when the run ends, on errors and on Ctrl-C
too, and every step is bounded in time (the whole run by --time-limit).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from perf.common import BenchError, say
from perf.json_output import write_json
from perf.loader import Loader
from perf.phases import Bench
from perf.procs import Procs, cpu_busy_seconds, own_cpu_seconds
from perf.profiles import FULL, QUICK
from perf.report import report
from perf.stats import rnd
from perf.tools import ensure_wrk


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
        "--no-install",
        action="store_true",
        help="install nothing: use wrk only if it is there (the test suite runs the bench "
        "this way; .ci/run installs wrk itself)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: count the instructions per small request of bare mitmdump, the "
        "minimal addon and keygate under valgrind's callgrind (installed with apt-get if "
        "missing; ~7 minutes; bench/instructions.py)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="instead: keygate with [gateway] metrics on vs off, interleaved rounds of small "
        "requests (bench/metrics_ab.py; the target: on >= 0.97x off)",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="instead: shared state (bench/perf/shared.py): keygate with Redis vs alone, "
        "--workers 2 vs one process, Redis round trips per request (needs redis-server)",
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
        wrk = None if args.client == "python" else ensure_wrk(not args.no_install)
        if args.client == "wrk" and not wrk:
            raise BenchError("--client wrk: wrk is not available")
        loader = Loader(procs, tmp, wrk, args.http)
        say(f"{profile.name} run, load from {loader.version}, work folder {tmp}")
        if args.shared:
            return _shared(Bench(profile, procs, tmp, loader), args.json)
        if args.metrics:
            return _metrics(profile, procs, tmp, loader, args.json)
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


def _shared(bench: Bench, json_file: str | None) -> int:
    from perf import shared

    shared.measure(bench)
    signal.alarm(0)
    print(shared.report(bench.results), flush=True)
    write_json(json_file, bench.results)
    return 0


def _metrics(profile, procs: Procs, tmp: Path, loader: Loader, json_file: str | None) -> int:
    import metrics_ab  # bench/metrics_ab.py, beside this file

    say("keygate with metrics on vs off")
    results = metrics_ab.run(procs, tmp, loader, rounds=max(4, 2 * profile.request_rounds),
                             duration=profile.duration, warmup=profile.warmup, say=say)
    signal.alarm(0)
    print(metrics_ab.report(results), flush=True)
    write_json(json_file, results)
    return 0


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
    sys.exit(main())
