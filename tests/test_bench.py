"""Smoke test of scripts/bench (SPEC 9): the quick run works end to end and reports every
section with numbers. No timing is asserted: this machine's speed is not the code's."""

from __future__ import annotations

import json
import numbers
import subprocess
from pathlib import Path

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
        [str(ROOT / "scripts" / "bench"), "--quick", "--json", str(out)],
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
    assert results["targets"], "the SPEC 9 summary is missing"
    assert "1. Small non-streamed" in proc.stdout and "SPEC 9 targets" in proc.stdout

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
    floors = [t for t in results["targets"] if "floor" in t]
    assert len(floors) == 3, results["targets"]
    for t in floors:
        assert t["floor"]["proxy"] == "mitmdump_streaming", t
        assert isinstance(t["floor"]["value"], numbers.Real), t
    # Its rows in the printed tables: c=1 and c=100 in 2, one in 3, three floors in SPEC 9's.
    assert proc.stdout.count("mitmdump streaming (stream_large_bodies=1)") == 6, proc.stdout
