"""One bench run: what its phases share (the processes, the keys, the results), the phases
in order, and what the run was measured on."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from pathlib import Path

from . import slow_streams, small_requests, startup, streams
from .common import say
from .contenders import Lab, Server
from .fixtures import bench_keys, keygate_dir
from .loader import Loader
from .procs import Procs
from .profiles import Profile
from .stats import rnd
from .targets import machine_scale, targets


class Bench:
    def __init__(self, profile: Profile, procs: Procs, tmp: Path, loader: Loader):
        self.p = profile
        self.procs = procs
        self.tmp = tmp
        self.lab = Lab(procs, tmp)
        self.load = loader
        say(f"generating {profile.keys} keys")
        self.keys, self.auth = bench_keys(profile.keys)
        self.results: dict = {}
        self.notes: list[str] = []
        self.fast_upstream: Server | None = None  # phase 1's, kept for 1b and 5
        self._n = 0

    def kg_config(self, label: str, upstream: str, one_key: bool = False) -> Path:
        """A keygate folder of its own (10,000 keys, or `main` alone); its gateway.toml."""
        self._n += 1
        return keygate_dir(
            self.tmp / f"kg{self._n}-{label}",
            upstream,
            self.keys.one_yaml if one_key else self.keys.big_yaml,
        )

    def run(self) -> dict:
        t0 = time.monotonic()
        small_requests.measure(self)  # also 4 (keys), and leaves the fast upstream for 1b and 5
        small_requests.hook_time(self)
        streams.measure(self)
        slow_streams.measure(self)
        startup.measure(self)
        self.results["meta"] = {
            "profile": self.p.name,
            "rounds": self.p.rounds,
            "request_rounds": self.p.request_rounds,
            "client": self.load.version,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "mitmproxy": mitmproxy_version(),
            "machine": platform.machine(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": rnd(time.monotonic() - t0, 1),
            "machine_scale": rnd(machine_scale(self.results)),
            "notes": self.notes,
        }
        self.results["targets"] = targets(self.results)
        return self.results


def mitmproxy_version() -> str:
    try:
        from importlib.metadata import version

        return version("mitmproxy")
    except Exception:
        return "?"
