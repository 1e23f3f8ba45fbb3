"""Smoke test of scripts/bench (docs/performance.md): the quick run works end to end and reports
every
section with numbers. No timing is asserted: this machine's speed is not the code's."""

from __future__ import annotations

import json
import numbers
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("small_requests", "streams", "slow_streams", "keys", "startup")


def leaves(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def test_bench_quick_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        # No test installs system packages: wrk when it is there, else bench/load.py.
        [str(ROOT / "scripts" / "bench"), "--quick", "--no-install", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    for section in SECTIONS:
        assert isinstance(results.get(section), dict) and results[section], section
        values = list(leaves(results[section], section))
        assert values, section
        for where, v in values:
            assert isinstance(v, numbers.Real) and not isinstance(v, bool), (where, v)
    for section in ("streams", "slow_streams"):  # every stream accounted for, none lost
        assert any(where.endswith(".completed") for where, _ in leaves(results[section]))
    assert results["targets"], "the targets summary is missing"
    assert "1. Small non-streamed" in proc.stdout and "Targets (docs/performance.md)" in proc.stdout

    # The streaming mitmdump baseline (stream_large_bodies=1): in both stream phases, with
    # its streams accounted for, and as the floor of the three stream targets.
    for row in (
        results["streams"]["c1"]["mitmdump_streaming"],
        results["streams"]["c100"]["mitmdump_streaming"],
        results["slow_streams"]["mitmdump_streaming"],
    ):
        assert {"completed", "failed", "ttfc_p50_ms", "total_p50_ms"} <= row.keys(), row
        assert row["completed"] > 0, row
    for label in ("c1", "c100"):
        row = results["streams"][label]["mitmdump_streaming"]
        assert {"ttfc_p50_minus_direct_ms", "total_p50_vs_direct", "cpu_ms_per_stream"} <= (
            row.keys()
        ), row
    floors = {t["target"]: t["floor"] for t in results["targets"] if "floor" in t}
    assert len(floors) == 7, results["targets"]
    for target, floor in floors.items():
        if "stream" in target:
            want = "mitmdump_streaming"
        elif target.startswith("throughput"):
            want = "minimal_addon"
        elif target.startswith(("CPU", "p50")):
            want = "bare_plus_hooks"
        else:
            assert "quota key" in target, target
            want = "bare_plus_json"
        assert floor["proxy"] == want, (target, floor)
        assert isinstance(floor["value"], numbers.Real), (target, floor)
    # Its rows in the printed tables: c=1 and c=100 in 2, one in 3, three floors in
    # docs/performance.md.
    assert proc.stdout.count("mitmdump streaming (stream_large_bodies=1)") == 6, proc.stdout

    # The minimal key-checking addon (bench/minauth.py), the floor of the small-request
    # targets: measured like keygate, with ratios against bare mitmdump.
    row = results["small_requests"]["minimal_addon"]
    assert {"rps_c32", "rps_vs_bare", "cpu_us_per_request", "cpu_vs_bare",
            "p50_minus_bare_ms"} <= row.keys(), row
    assert row["rps_c32"] > 0 and row["cpu_us_per_request"] > 0, row
    # Its row and note in table 1, the throughput floor in docs/performance.md.
    assert proc.stdout.count("minimal addon (bench/minauth.py)") == 3, proc.stdout

    # keygate's own hook time, timed in its process (bench/hooktime.py), at c=1 and c=32:
    # the floor of the CPU and latency targets, with the stages it comes from.
    hooks = results["small_requests"]["keygate_hooks"]
    for label in ("c1", "c32"):
        assert hooks[label]["requests"] > 0 and hooks[label]["us_per_request"] > 0, hooks
        stages = hooks[label]["stages_us"]
        assert {"Auth.requestheaders", "Policy.request", "Recorder.response"} <= stages.keys()
        assert sum(stages.values()) == pytest.approx(hooks[label]["us_per_request"], abs=3)
    by_target = {t["target"]: t for t in results["targets"]}
    p50 = by_target["p50 latency (c=1) <= bare + 0.3 ms"]["floor"]["value"]
    assert p50 == pytest.approx(hooks["c1"]["us_per_request"] / 1000, abs=0.001)
    assert proc.stdout.count("bare mitmdump + keygate's hook time") == 2, proc.stdout
    # The cold start-up's floor: bare mitmdump's start plus one read of the log's JSON.
    assert results["startup"]["json_read_s"] > 0
    assert proc.stdout.count("bare mitmdump start + reading the log's JSON") == 1

    # The targets in ms and s (wall-clock times, set on the reference machine) also
    # get a verdict with the limit scaled by how much slower bare mitmdump runs here.
    scale = results["meta"]["machine_scale"]
    bare_cpu = results["small_requests"]["bare_mitmdump"]["cpu_us_per_request"]
    assert scale == pytest.approx(bare_cpu / 850, abs=0.001)
    timed = [t for t in results["targets"] if t["unit"] in ("ms", "s")]
    assert len(timed) == 7, results["targets"]
    for t in results["targets"]:
        if t not in timed:
            assert "scaled" not in t, t
            continue
        op, limit = t["limit"].split()
        scaled_op, scaled_limit = t["scaled"]["limit"].split()
        assert scaled_op == op, t
        assert float(scaled_limit) == pytest.approx(float(limit) * scale, rel=0.006), t
        assert isinstance(t["scaled"]["ok"], bool), t
        if "floor" in t:
            assert isinstance(t["floor"]["scaled_ok"], bool), t
    # (The JSON keeps the scale rounded to 3 places: its 2-place form may round the other way.)
    shown = re.search(r"times scaled x(\d+\.\d\d)", proc.stdout)
    assert shown and float(shown[1]) == pytest.approx(scale, abs=0.0051), proc.stdout


def test_the_minimal_addon_checks_the_key(monkeypatch):
    import hashlib
    import importlib.util

    from mitmproxy import http
    from mitmproxy.test import tflow

    monkeypatch.setenv("MINAUTH_KEY_SHA256", hashlib.sha256(b"sk-right").hexdigest())
    spec = importlib.util.spec_from_file_location("minauth", ROOT / "bench" / "minauth.py")
    minauth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minauth)
    addon = minauth.MinAuth()

    def flow(auth: str | None) -> http.HTTPFlow:
        f = tflow.tflow()
        f.request.path = "/v1/chat/completions"
        if auth is not None:
            f.request.headers["authorization"] = auth
        addon.requestheaders(f)
        return f

    for refused in (None, "Bearer sk-wrong", "Basic sk-right", "Bearer "):
        f = flow(refused)
        assert f.response is not None and f.response.status_code == 401, refused
    f = flow("bearer sk-right")
    assert f.response is None and "authorization" not in f.request.headers
    # It streams what keygate streams, and buffers a small JSON answer as keygate does.
    for ctype, streamed in (("text/event-stream", True), ("application/x-ndjson", True),
                            ("application/json; charset=utf-8", False)):
        f.response = http.Response.make(200, b"{}", {"content-type": ctype})
        addon.responseheaders(f)
        assert f.response.stream is streamed, ctype


@pytest.fixture
def instructions(monkeypatch):
    """bench/instructions.py (scripts/bench --instructions), imported as run.py imports it."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import instructions

    return instructions


def test_instruction_counts_are_read_from_callgrind_dumps(instructions, tmp_path):
    out = tmp_path / "callgrind.out"
    # callgrind_control asks the process for a dump; callgrind writes out.1, out.2, ...
    for part, total in ((1, 4_000_000), (2, 1_900_000_000)):
        Path(f"{out}.{part}").write_text(
            f"# callgrind format\nversion: 1\npid: 4242\npart: {part}\n\nevents: Ir\n"
            f"summary: {total}\n\nfn=(1) main\n0 {total}\n\ntotals: {total}\n")
    cg = instructions.Callgrind(("valgrind", "true"), out, 4242)  # `true`: a no-op control
    idle, counted = cg.dump(), cg.dump()
    assert (idle, counted) == (4_000_000, 1_900_000_000)
    c = instructions.Count("keygate", requests=200, seconds=25.0, instructions=counted,
                           idle_per_second=idle / 10.0)
    # What the timers ran meanwhile (the idle rate over the requests' 25 s) is taken off.
    assert c.per_request == pytest.approx((1_900_000_000 - 400_000 * 25.0) / 200)
    assert c.as_dict()["instructions_per_request"] == 9_450_000


def test_instruction_count_command_and_report(instructions):
    cmd = instructions.Callgrind.command("/usr/bin/valgrind", Path("/tmp/x.out"),
                                         ["mitmdump", "--mode", "reverse:http://127.0.0.1:1"])
    assert cmd[:4] == ["/usr/bin/valgrind", "--tool=callgrind", "--instr-atstart=no",
                       "--callgrind-out-file=/tmp/x.out"]
    assert cmd[5:] == ["mitmdump", "--mode", "reverse:http://127.0.0.1:1"]  # after python
    res = {"requests": 200, "targets": {
        "bare mitmdump": {"instructions_per_request": 7_969_000, "vs_bare": 1.0,
                          "idle_instructions_per_s": 1000, "seconds": 25.7},
        "keygate (10,000 keys)": {"instructions_per_request": 9_020_000, "vs_bare": 1.132,
                                  "idle_instructions_per_s": 950_000, "seconds": 27.6},
    }}
    text = instructions.report(res)
    assert "200 sequential requests" in text
    row = next(line for line in text.splitlines() if line.startswith("keygate"))
    assert row.split()[-4:] == ["9.020", "1.132", "0.95", "27.6"], row


def test_bench_shared_quick_reports_the_ratios_and_their_floor(tmp_path):
    from helpers.redisserver import needs_redis

    if needs_redis.args[0]:
        pytest.skip("redis-server is not installed")
    out = tmp_path / "shared.json"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--shared", "--quick", "--no-install", "--json",
         str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s = json.loads(out.read_text())["shared"]
    for where, v in leaves(s, "shared"):
        assert isinstance(v, numbers.Real) and not isinstance(v, bool), (where, v)
    for name in ("keygate", "keygate_redis", "workers_2", "bare_mitmdump", "bare_mitmdump_2"):
        assert s[name]["rps_c32"] > 0, name
    assert s["keygate_redis"]["rps_vs_alone"] > 0
    assert s["workers_2"]["rps_vs_one"] > 0 and s["bare_mitmdump_2"]["rps_vs_one"] > 0
    for name in ("direct", "one_worker", "workers_2", "bare_one", "bare_2"):
        assert s[f"streams_c100_{name}"]["ttfc_p50_ms"] > 0, name
    # Both workers served the bursts (a warm-up and 2 rounds of 100 streams), and no
    # stream is missing.
    per_worker = s["streams_c100_workers_2"]["streams_per_worker"]
    assert len(per_worker) == 2 and min(per_worker) > 0 and sum(per_worker) == 300
    assert s["redis_round_trips_per_request"] > 0 and s["redis_scripts_per_request"] >= 1
    assert "floor: bare mitmdump x2 on one port" in proc.stdout
