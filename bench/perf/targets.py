"""The targets (docs/performance.md), each with its measured value, its floor and its
verdicts, and how much slower than the reference machine this one runs mitmproxy."""

from __future__ import annotations

from .common import SECTIONS
from .stats import rnd

# The reference machine (docs/performance.md#targets): bare mitmdump used ~850 us of CPU per small
# request there.
REFERENCE_BARE_CPU_US = 850.0


def machine_scale(res: dict) -> float:
    """How much slower than the reference machine this one runs mitmproxy: bare
    mitmdump's CPU per small request in this run over the reference's ~850 us."""
    return res["small_requests"]["bare_mitmdump"]["cpu_us_per_request"] / REFERENCE_BARE_CPU_US


def targets(res: dict) -> list[dict]:
    """The targets (docs/performance.md), each with its measured value (informative: never fails
    the run).
    Some also carry `floor`: the same target measured on what keygate cannot be cheaper
    than. For throughput that is bench/minauth.py, the smallest key-checking addon (what
    any addon costs on mitmproxy). For CPU and p50 latency it is bare mitmdump plus
    keygate's own hook time, timed in its process (bench/hooktime.py): keygate's code runs
    on every request's path, on top of everything bare mitmdump does, so keygate cannot
    cost less than that. For the streams it is bare mitmdump streaming every body (what
    mitmproxy costs when it streams); for the cold start-up, bare mitmdump's start plus one
    read of the log's JSON (what a recount of the log cannot skip).

    The targets given in milliseconds or seconds are wall-clock times, set on docs/performance.md
    reference machine; every other target is a ratio in one run. Each of those also carries
    `scaled`: the same limit times machine_scale(), the verdict the target would give on a
    machine that runs mitmproxy as fast as the reference does. Both verdicts are reported."""
    sr, st, sl, ks, su = (res[k] for k in SECTIONS)
    kg, mn = sr["keygate"], sr["minimal_addon"]
    hooks = sr["keygate_hooks"]
    own = "bare_plus_hooks"
    own_cpu = 1 + hooks["c32"]["us_per_request"] / sr["bare_mitmdump"]["cpu_us_per_request"]
    own_p50 = hooks["c1"]["us_per_request"] / 1000
    fl = "mitmdump_streaming"
    rows = [
        (
            "throughput >= 85% of bare mitmdump (c=32)",
            kg["rps_vs_bare"],
            ">=",
            0.85,
            "x",
            ("minimal_addon", mn["rps_vs_bare"]),
        ),
        (
            "CPU per request <= 1.2x bare mitmdump",
            kg["cpu_vs_bare"],
            "<=",
            1.2,
            "x",
            (own, rnd(own_cpu)),
        ),
        (
            "p50 latency (c=1) <= bare + 0.3 ms",
            kg["p50_minus_bare_ms"],
            "<=",
            0.3,
            "ms",
            (own, rnd(own_p50)),
        ),
        (
            "stream first chunk p50 <= direct + 3 ms (c=1)",
            st["c1"]["keygate"]["ttfc_p50_minus_direct_ms"],
            "<=",
            3.0,
            "ms",
            (fl, st["c1"][fl]["ttfc_p50_minus_direct_ms"]),
        ),
        (
            "stream first chunk p50 <= direct + 3 ms (c=100)",
            st["c100"]["keygate"]["ttfc_p50_minus_direct_ms"],
            "<=",
            3.0,
            "ms",
            (fl, st["c100"][fl]["ttfc_p50_minus_direct_ms"]),
        ),
        (
            "100 streams: total p50 within 5% of direct",
            st["c100"]["keygate"]["total_p50_vs_direct"],
            "<=",
            1.05,
            "x",
            (fl, st["c100"][fl]["total_p50_vs_direct"]),
        ),
        (f"{sl['streams']} slow streams all complete", sl["keygate"]["failed"], "<=", 0, "failed"),
        (
            f"{sl['streams']} slow streams: resident memory < 200 MB",
            max(sl["keygate"]["rss_peak_mb"], sl["keygate"]["vmhwm_mb"]),
            "<",
            200,
            "MB",
        ),
        (
            f"{ks['keys']:,} keys: throughput within 5% of 1 key",
            ks["ratio_10k_vs_1"],
            ">=",
            0.95,
            "x",
        ),
        (f"reload of {ks['keys']:,} keys < 1 s", ks["reload_s"], "<", 1.0, "s"),
        (
            f"start-up with {su['log_lines']:,}-line log < 2 s (no cache, key w/o quota)",
            su["keygate_log_cold_plain_s"],
            "<",
            2.0,
            "s",
        ),
        (
            f"start-up with {su['log_lines']:,}-line log < 2 s (no cache, quota key)",
            su["keygate_log_cold_s"],
            "<",
            2.0,
            "s",
            ("bare_plus_json", rnd(su["bare_mitmdump_s"] + su["json_read_s"])),
        ),
        (
            f"start-up with {su['log_lines']:,}-line log < 2 s (ledger cache)",
            su["keygate_log_warm_s"],
            "<",
            2.0,
            "s",
        ),
    ]
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    scale = machine_scale(res)
    out = []
    for t, v, op, lim, u, *floor in rows:
        row = {"target": t, "value": v, "limit": f"{op} {lim}", "unit": u, "ok": ops[op](v, lim)}
        scaled = lim * scale if u in ("ms", "s") else None
        if scaled is not None:
            row["scaled"] = {"limit": f"{op} {scaled:.3g}", "ok": ops[op](v, scaled)}
        if floor:
            proxy, value = floor[0]
            row["floor"] = {"proxy": proxy, "value": value, "ok": ops[op](value, lim)}
            if scaled is not None:
                row["floor"]["scaled_ok"] = ops[op](value, scaled)
        out.append(row)
    return out
