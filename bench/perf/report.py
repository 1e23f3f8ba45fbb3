"""What a run prints on stdout: one aligned table per phase, then the targets
(docs/performance.md)."""

from __future__ import annotations

from .common import SECTIONS
from .targets import REFERENCE_BARE_CPU_US, machine_scale

STREAMING_LABEL = "mitmdump streaming (stream_large_bodies=1)"
MINIMAL_LABEL = "minimal addon (bench/minauth.py)"


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> str:
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    out = [title, line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out += [f"  {n}" for n in notes]
    return "\n".join(out) + "\n"


def report(res: dict) -> str:
    m, sr, st, sl, ks, su = res["meta"], *(res[k] for k in SECTIONS)
    parts = [
        f"keygate bench ({m['profile']}): {m['cpus']} CPUs, Python {m['python']}, "
        f"mitmproxy {m['mitmproxy']}, load: {m['client']}; median of {m['request_rounds']} "
        f"round(s) (small requests), {m['rounds']} (streams); {m['seconds']:.0f} s; "
        f"other processes used {m.get('other_processes_cpu_pct', 0):.0f}% of the CPUs "
        "meanwhile\n"
    ]
    names = {
        "direct": "upstream direct",
        "bare_mitmdump": "bare mitmdump",
        "keygate": f"keygate ({ks['keys']:,} keys)",
        "keygate_1key": "keygate (1 key)",
        "mitmdump_streaming": STREAMING_LABEL,
        "minimal_addon": MINIMAL_LABEL,
        "bare_plus_hooks": "bare mitmdump + keygate's hook time",
        "bare_plus_json": "bare mitmdump start + reading the log's JSON",
    }
    hk = sr["keygate_hooks"]
    rows = []
    for k in ("direct", "bare_mitmdump", "minimal_addon", "keygate", "keygate_1key"):
        r = sr[k]
        rows.append(
            [
                names[k],
                r["rps_c32"],
                r.get("rps_vs_bare", 1.0 if k == "bare_mitmdump" else None),
                r["p50_ms_c1"],
                r["p99_ms_c1"],
                r.get("p50_minus_bare_ms"),
                r.get("cpu_us_per_request"),
                r.get("cpu_vs_bare", 1.0 if k == "bare_mitmdump" else None),
            ]
        )
    parts.append(
        table(
            "1. Small non-streamed POST /v1/chat/completions",
            [
                "target",
                "req/s c=32",
                "vs bare",
                "p50 ms c=1",
                "p99 ms c=1",
                "p50-bare ms",
                "CPU us/req",
                "CPU vs bare",
            ],
            rows,
            [
                "CPU: utime+stime of the proxy process (/proc/PID/stat) per request at c=32",
                f"{MINIMAL_LABEL}: the smallest key-checking addon (the targets' '30-line auth "
                "addon'), streaming what keygate streams: what a key check costs, keygate's floor",
                "keygate's hook time, timed in its process (bench/hooktime.py), per request: "
                f"{hk['c1']['us_per_request']:,.0f} us at c=1, {hk['c32']['us_per_request']:,.0f} "
                "us at c=32; largest at c=32: "
                + ", ".join(f"{n} {v:,.0f}" for n, v in list(hk["c32"]["stages_us"].items())[:5]),
            ],
        )
    )
    rows = []
    for label in ("c1", "c100"):
        for k in ("direct", "bare_mitmdump", "mitmdump_streaming", "keygate"):
            r = st[label][k]
            label_ = names[k] + (" (buffers)" if k == "bare_mitmdump" else "")
            rows.append(
                [
                    label_,
                    st[label]["concurrency"],
                    r["ttfc_p50_ms"],
                    r["ttfc_p99_ms"],
                    r.get("ttfc_p50_minus_direct_ms"),
                    r["total_p50_ms"],
                    r["total_p99_ms"],
                    r.get("total_p50_vs_direct"),
                    r.get("cpu_ms_per_stream"),
                    f"{r['completed']}/{r['completed'] + r['failed']}",
                ]
            )
    parts.append(
        table(
            f"2. Streams: POST /v1/chat/completions stream=true, {st['chunks']} chunks "
            f"{st['chunk_delay_ms']} ms apart",
            [
                "target",
                "conc",
                "1st chunk p50",
                "p99",
                "p50-direct",
                "total p50",
                "p99",
                "vs direct",
                "CPU ms/stream",
                "complete",
            ],
            rows,
            [
                "times in ms; bare mitmdump buffers whole responses: its first chunk waits for "
                "the last",
                "mitmdump streaming: bare mitmdump streaming every body: mitmproxy's own cost, "
                "keygate's floor",
                "keygate streams chunk by chunk (and edits SSE frames: it asks for usage, "
                "strips it)",
            ],
        )
    )
    rows = []
    for k in ("direct", "bare_mitmdump", "mitmdump_streaming", "keygate"):
        r = sl[k]
        rows.append(
            [
                names[k] + (" (buffers)" if k == "bare_mitmdump" else ""),
                f"{r['completed']}/{r['completed'] + r['failed']}",
                r["max_in_flight"],
                r["ttfc_p50_ms"],
                r["total_p50_ms"],
                r["total_p99_ms"],
                r.get("cpu_ms_per_stream"),
                r.get("rss_before_mb"),
                r.get("rss_peak_mb"),
                r.get("vmhwm_mb"),
            ]
        )
    parts.append(
        table(
            f"3. {sl['streams']:,} concurrent slow streams ({sl['chunks']} chunks "
            f"{sl['chunk_delay_ms']} ms apart, started over {sl['ramp_s']:g} s)",
            [
                "target",
                "completed",
                "max in flight",
                "1st chunk p50 ms",
                "total p50 ms",
                "p99 ms",
                "CPU ms/stream",
                "RSS before MB",
                "RSS peak MB",
                "VmHWM MB",
            ],
            rows,
            ["RSS: VmRSS of the proxy sampled every 50 ms; VmHWM: its peak since it started"],
        )
    )
    rows = [
        [f"{ks['keys']:,} keys", ks["rps_10k_keys"], ks["cpu_us_10k_keys"]],
        ["1 key", ks["rps_1_key"], ks["cpu_us_1_key"]],
    ]
    parts.append(
        table(
            "4. Key count",
            ["keys.yaml", "req/s c=32", "CPU us/req"],
            rows,
            [
                f"throughput ratio {ks['ratio_10k_vs_1']:.3f}, CPU ratio "
                f"{ks['cpu_ratio_10k_vs_1']:.3f}; reload of {ks['keys']:,} keys: new key "
                f"works after {ks['reload_s']:.3f} s, 'reloaded configuration' logged after "
                f"{ks['reload_logged_s']:.3f} s (watcher polls every 0.5 s)"
            ],
        )
    )
    rows = [
        ["bare mitmdump (no keygate)", su["bare_mitmdump_s"], None],
        ["keygate, empty usage log", su["keygate_empty_log_s"], None],
        [
            "keygate, log, no ledger cache, key without quotas",
            su["keygate_log_cold_plain_s"],
            None,
        ],
        [
            "keygate, log, no ledger cache, key with quotas",
            su["keygate_log_cold_s"],
            su.get("keygate_log_cold_ledger_s"),
        ],
        [
            "keygate, log, ledger cache",
            su["keygate_log_warm_s"],
            su.get("keygate_log_warm_ledger_s"),
        ],
    ]
    parts.append(
        table(
            f"5. Start-up: process start to first served request "
            f"({su['log_lines']:,}-line usage log, "
            f"{su['log_mb']:.0f} MB in {su['log_files']} files; {su['keys']:,} keys)",
            ["start", "seconds", "ledger s"],
            rows,
            [
                "ledger s: keygate's own 'usage counters rebuilt ... in X s' log line",
                f"reading the log's JSON alone (keygate's reader, nothing counted, in a fresh "
                f"process): {su['json_read_s']:.3f} s",
            ],
        )
    )
    rows = []
    for t in res["targets"]:
        sc = t.get("scaled")
        rows.append(
            [
                t["target"],
                fmt(t["value"], 3) + " " + t["unit"],
                t["limit"],
                "ok" if t["ok"] else "MISSED",
                f"{sc['limit']}: {'ok' if sc['ok'] else 'MISSED'}" if sc else "",
            ]
        )
        if "floor" in t:
            f = t["floor"]
            rows.append(
                [
                    f"  floor: {names[f['proxy']]}",
                    fmt(f["value"], 3) + " " + t["unit"],
                    t["limit"],
                    "(ok)" if f["ok"] else "(missed)",
                    ("(ok)" if f["scaled_ok"] else "(missed)") if sc else "",
                ]
            )
    scale, bare_cpu = machine_scale(res), sr["bare_mitmdump"]["cpu_us_per_request"]
    parts.append(
        table(
            "Targets (docs/performance.md)",
            ["target", "measured", "want", "", f"times scaled x{fmt(scale)}"],
            rows,
            [
                "floor: the same target on what keygate cannot beat: the minimal key-checking "
                "addon (throughput); bare mitmdump plus keygate's hook time at c=32 (CPU) and "
                "c=1 (p50); bare mitmdump streaming every body (streams); bare mitmdump's start "
                "plus one read of the log's JSON with keygate's reader (cold start-up)",
                f"times scaled: the targets in ms and s are wall-clock times set on the "
                f"reference machine, where bare mitmdump used ~{REFERENCE_BARE_CPU_US:.0f} us "
                f"of CPU per small request; here it used {bare_cpu:,.0f} us (x{fmt(scale)}), "
                "and the limit is scaled by as much",
            ],
        )
    )
    for n in m["notes"]:
        parts.append(f"note: {n}\n")
    return "\n".join(parts)
