"""Phase 4: 10,000 keys vs 1 key. The throughput and CPU ratio of phase 1's two keygates
(4a), and how long an edit of keys.yaml with 10,000 keys takes to apply (4b)."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from typing import TYPE_CHECKING

import httpx

from .common import CHAT, SMALL_BODY, BenchError, say
from .contenders import Server
from .stats import median, rnd

if TYPE_CHECKING:
    from .phases import Bench


def key_count(bench: Bench, out: dict) -> None:
    """The keys section from phase 1's figures (`out`): keygate with 10,000 keys and 1."""
    bench.results["keys"] = {
        "keys": bench.keys.count,
        "rps_10k_keys": out["keygate"]["rps_c32"],
        "rps_1_key": out["keygate_1key"]["rps_c32"],
        "ratio_10k_vs_1": rnd(out["keygate"]["rps_c32"] / out["keygate_1key"]["rps_c32"]),
        "cpu_us_10k_keys": out["keygate"]["cpu_us_per_request"],
        "cpu_us_1_key": out["keygate_1key"]["cpu_us_per_request"],
        "cpu_ratio_10k_vs_1": rnd(
            out["keygate"]["cpu_us_per_request"] / out["keygate_1key"]["cpu_us_per_request"]
        ),
    }


def reload(bench: Bench, kg: Server) -> None:
    say("phase 4: reloading keys.yaml with 10,000 keys")
    keys_file = kg.config.parent / "keys.yaml"
    key_times, log_times = [], []
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        for r in range(bench.p.reload_rounds):
            secret = "sk-reload-" + secrets.token_urlsafe(30)
            entry = (
                f'  reload-{r}:\n    key_sha256: "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
            )
            text = bench.keys.big_yaml + entry
            headers = {"content-type": "application/json", "Authorization": f"Bearer {secret}"}
            if c.post(kg.url + CHAT, content=SMALL_BODY, headers=headers).status_code != 401:
                raise BenchError("a key not yet in keys.yaml was accepted")
            time.sleep(1.2)  # let the watcher settle on the previous file
            tmp = keys_file.with_name(".keys.yaml.bench")
            tmp.write_text(text)
            t0 = time.monotonic()
            os.replace(tmp, keys_file)  # as editors and scripts/keys write it
            deadline = t0 + 20
            t_key = None
            while time.monotonic() < deadline:
                if c.post(kg.url + CHAT, content=SMALL_BODY, headers=headers).status_code == 200:
                    t_key = time.monotonic()
                    break
                time.sleep(0.005)
            if t_key is None:
                raise BenchError(f"a new key did not work within 20 s:\n{kg.proc.output()}")
            t_log, _ = kg.proc.wait_for(r"keygate: reloaded configuration", 10, since=t0)
            key_times.append(t_key - t0)
            log_times.append(t_log - t0)
            say(
                f"  round {r + 1}: new key works after {t_key - t0:.3f} s, "
                f"logged after {t_log - t0:.3f} s"
            )
    bench.results["keys"].update(
        {
            "reload_s": rnd(median(key_times)),
            "reload_logged_s": rnd(median(log_times)),
            "reload_rounds_s": [rnd(x) for x in key_times],
        }
    )
