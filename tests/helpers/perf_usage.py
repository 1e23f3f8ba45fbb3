"""How long the usage page's queries take over a big usage log (docs/performance.md#usage-queries).

Run by hand (not collected by pytest):

    .venv/bin/python tests/helpers/perf_usage.py [--lines 1000000] [--dir /tmp/keygate-perf-usage]

Generates (once, then reuses) a log like tests/helpers/perf_ledger.py's (~380 bytes a
line, 50 keys, 4 models, 1.7 requests a second, ending now), then times: building the
hourly totals from it (what a start-up does in the background), and the answer of
`GET /keygate/usage` (keygate.pages.usage_answer) for 24 h, 7 days, 30 days and 365 days
grouped by key, key and model, and day. For comparison: one `keygate usage` read of the
whole log (keygate.accounting.totals.Summer), which every query would cost without the
hourly totals.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parents[2] / "addons"), str(HERE.parent)]

from perf_ledger import generate  # noqa: E402

from keygate import pages  # noqa: E402
from keygate.accounting.hourly import Hourly  # noqa: E402
from keygate.accounting.totals import Summer, read_into  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/keygate-perf-usage"))
    args = p.parse_args()
    log = args.dir / f"usage-{args.lines}.jsonl"
    now = dt.datetime.now(dt.timezone.utc)
    if not log.exists():
        t0 = now - dt.timedelta(milliseconds=600 * args.lines)
        print(f"generating {args.lines:,} lines into {log} ...", flush=True)
        generate(log, args.lines, True, t0)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    hourly = Hourly()
    bad = read_into(log, hourly.add)
    built = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"hourly totals built from {args.lines:,} lines in {built:.2f} s "
          f"({hourly.groups:,} groups, {len(hourly.hours):,} hours; peak RSS "
          f"{rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MB, {bad} bad lines)")

    for since in ("24h", "7d", "30d", "365d"):
        for by in ("key", "key,model", "day"):
            t = time.perf_counter()
            start, end, groups = pages.parse_period(since, None, by, now)
            doc = pages.usage_answer(hourly, start, end, groups, now=now)
            took = time.perf_counter() - t
            print(f"  /keygate/usage?since={since:5}&by={by:10} {took * 1000:8.1f} ms "
                  f"({doc['total']['requests']:,} requests, {len(doc['rows'])} rows)")

    t = time.perf_counter()
    summer = Summer(("key",))
    read_into(log, summer.add)
    print(f"for comparison, one keygate usage --by key read of the whole log: "
          f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
