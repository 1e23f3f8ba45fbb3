"""Throughput of keygate with metrics on and off (docs/performance.md#metrics), interleaved.

    scripts/bench --metrics [--quick] [--json FILE]
    .venv/bin/python bench/metrics_ab.py [--rounds 10] [--duration 5] [--concurrency 32]

Two keygates side by side in front of one demo upstream, configured alike but for
`[gateway] metrics` (on: every request counted for GET /metrics; off: not), each with
the bench's 10,000 keys and three channels. The same load (wrk when installed, else
bench/load.py: small non-streamed requests at concurrency 32) goes to one, then the
other, round after round, in alternating order, so the machine's drift falls on both
alike. Reports each round's requests/s and CPU per request, their medians and the ratio
on/off (the target: at least 0.97).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "bench", ROOT / "tests", ROOT / "demo", ROOT / "addons"):
    if str(_p) not in sys.path:
        sys.path.append(str(_p))

from perf.fixtures import bench_keys, gateway_toml  # noqa: E402
from perf.loader import Loader  # noqa: E402
from perf.procs import Procs  # noqa: E402

TARGET = 0.97


def run(procs: Procs, tmp: Path, load: Loader, rounds: int, duration: int, warmup: int,
        concurrency: int = 32, say=print) -> dict:
    """The interleaved rounds; returns the figures (see `report`)."""
    from conftest import Gateway, KeySpec
    from fakeollama import FakeOllama

    fake = FakeOllama().start()
    started: list = []
    try:
        keys, _ = bench_keys(10_000)
        key = KeySpec("bench-main", secret=keys.main_secret)
        text = gateway_toml(fake.url)
        channels = text[text.index("[[channels]]"):]
        gws = {}
        for label, on in (("on", "true"), ("off", "false")):
            gw = Gateway(tmp / f"kg-metrics-{label}", fake.url, keys={},
                         gateway_toml=f"metrics = {on}\n" + channels)
            gw.keys_file.write_text(keys.big_yaml)
            gw.keys = {key.name: key}
            started.append(gw.start())
            gws[label] = gw
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        order = ["on", "off"]
        for r in range(rounds):
            for label in order if r % 2 == 0 else order[::-1]:
                gw = gws[label]
                res = load.requests(gw.url, key.auth, concurrency, duration, warmup,
                                    gw.proc.pid)
                runs[label].append({k: res[k] for k in ("rps", "cpu_us_per_request")})
                say(f"  round {r + 1}/{rounds}: metrics {label:3} {res['rps']:8.1f} req/s "
                    f"{res['cpu_us_per_request']:7.1f} us CPU/request")
    finally:
        for gw in started:
            gw.stop()
        fake.stop()
    med = {label: {"rps": statistics.median(x["rps"] for x in rs),
                   "cpu_us_per_request": statistics.median(x["cpu_us_per_request"] for x in rs)}
           for label, rs in runs.items()}
    return {"metrics_on_off": {
        "rounds": runs, "median": med, "concurrency": concurrency,
        "rps_on_vs_off": round(med["on"]["rps"] / med["off"]["rps"], 3),
        "cpu_on_vs_off": round(med["on"]["cpu_us_per_request"]
                               / med["off"]["cpu_us_per_request"], 3),
        "target": TARGET, "client": load.version}}


def report(res: dict) -> str:
    r = res["metrics_on_off"]
    on, off = r["median"]["on"], r["median"]["off"]
    met = "met" if r["rps_on_vs_off"] >= TARGET else "missed"
    return "\n".join([
        f"metrics on vs off, small requests at c={r['concurrency']}, "
        f"{len(r['rounds']['on'])} interleaved rounds each ({r['client']})",
        f"  metrics on : {on['rps']:8.1f} req/s  {on['cpu_us_per_request']:7.1f} us CPU/request",
        f"  metrics off: {off['rps']:8.1f} req/s  {off['cpu_us_per_request']:7.1f} us CPU/request",
        f"  throughput on/off {r['rps_on_vs_off']:.3f}x (target >= {TARGET}: {met}); "
        f"CPU per request on/off {r['cpu_on_vs_off']:.3f}x",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--duration", type=int, default=5, help="seconds of load per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    procs = Procs()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            load = Loader(procs, Path(tmp), shutil.which("wrk"), "raw")
            res = run(procs, Path(tmp), load, args.rounds, args.duration, args.warmup,
                      args.concurrency, say=lambda s: print(s, flush=True))
        finally:
            for proc in list(procs.running):
                procs.stop(proc)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
