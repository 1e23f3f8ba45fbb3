"""keygate with its own work timed, for scripts/bench: what keygate's hooks cost per request
inside the running process, the part of its latency and CPU that is its own code.

    mitmdump --mode reverse:http://127.0.0.1:11434 -s bench/hooktime.py \
        --set keygate_config=config/gateway.toml

It runs addons/gateway.py's stages behind the same Pipeline, with each stage's flow and
connection hooks wrapped in a timer (two perf_counter reads: about 10 us per request for
the ~25 stage calls). `GET /.bench/hooktime`, answered here before keygate sees it, returns
the totals since start as JSON:

    {"requests": 1234, "seconds": 0.51, "stages": {"Auth.requestheaders": 0.062, ...}}

A hook that returns an awaitable is timed up to its return (on the bench's chat requests
none does). Everything else is keygate as gateway.py loads it, fail-closed guard included.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

from mitmproxy import http

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from keygate.stages.pipeline import LIFECYCLE, Pipeline, implemented  # noqa: E402

gateway = importlib.import_module("gateway")

PROBE = "/.bench/hooktime"


class Clock:
    def __init__(self) -> None:
        self.requests = 0
        self.stages: Counter[str] = Counter()

    def report(self) -> dict:
        return {
            "requests": self.requests,
            "seconds": sum(self.stages.values()),
            "stages": dict(self.stages),
        }


class Timed:
    """A stage whose flow and connection hooks add their running time to the clock."""

    def __init__(self, stage, clock: Clock) -> None:
        self._stage = stage
        for hook, fn in implemented(stage).items():
            if hook not in LIFECYCLE:
                setattr(self, hook, self._timer(f"{type(stage).__name__}.{hook}", fn, clock))

    @staticmethod
    def _timer(name: str, fn, clock: Clock):
        stages, now = clock.stages, time.perf_counter

        def timed(*args):
            t0 = now()
            try:
                return fn(*args)
            finally:
                stages[name] += now() - t0

        return timed

    def __getattr__(self, name: str):
        return getattr(self._stage, name)  # lifecycle hooks and anything else: the stage's


class Probe:
    """Answers the bench's probe and counts every other request."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.path == PROBE:
            flow.response = http.Response.make(
                200, json.dumps(self.clock.report()), {"content-type": "application/json"}
            )
        else:
            self.clock.requests += 1


clock = Clock()
addons = [Probe(clock), Pipeline([Timed(s, clock) for s in gateway.stages])]
