"""How much each run measures: the full run (docs/performance.md figures) and --quick (a smoke
run)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int
    request_rounds: int  # rounds of phase 1: its ratios are the ones most subject to noise
    warmup: int  # s, unmeasured load before each throughput run
    duration: int  # s, measured throughput window (concurrency 32)
    latency_duration: int  # s, concurrency-1 latency window
    stream_chunks: int
    stream_delay_ms: int
    c1_streams: int  # per round and target
    c100_streams: int  # per round and target, 100 at a time
    slow_streams: int
    slow_chunks: int
    slow_delay_ms: int
    slow_ramp: float  # s over which the slow streams start: slower than keygate admits them
    # (~190 requests/s on the 2-core reference machine), and shorter than one stream, so
    # that all of them are in flight at once
    keys: int
    reload_rounds: int
    log_lines: int
    startup_rounds: int
    bursts: int  # rounds of --shared's bursts of 100 streams
    time_limit: int  # s for the whole run


FULL = Profile(
    "full",
    rounds=3,
    request_rounds=5,
    warmup=1,
    duration=5,
    latency_duration=3,
    stream_chunks=50,
    stream_delay_ms=20,
    c1_streams=8,
    c100_streams=200,
    slow_streams=1000,
    slow_chunks=20,
    slow_delay_ms=1000,
    slow_ramp=8.0,
    keys=10_000,
    reload_rounds=3,
    log_lines=1_000_000,
    startup_rounds=3,
    bursts=15,
    time_limit=25 * 60,
)
QUICK = Profile(
    "quick",
    rounds=1,
    request_rounds=1,
    warmup=1,
    duration=2,
    latency_duration=1,
    stream_chunks=50,
    stream_delay_ms=20,
    c1_streams=3,
    c100_streams=100,
    slow_streams=200,
    slow_chunks=10,
    slow_delay_ms=500,
    slow_ramp=1.5,
    keys=10_000,
    reload_rounds=1,
    log_lines=100_000,
    startup_rounds=1,
    bursts=2,
    time_limit=5 * 60,
)
