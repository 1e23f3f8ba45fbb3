"""How long the gateway's start-up spends rebuilding quota counters from a big usage log.

Run by hand (not collected by pytest):

    .venv/bin/python tests/helpers/perf_ledger.py [--lines 1000000] [--dir /tmp/keygate-perf]
                                                  [--single] [--baseline]

Generates (once, then reuses) a log of realistic usage-log records (~380 bytes a line),
rotated at 100 MB like the default gateway.toml (or one file with --single), and times:
cold load (no sidecar), warm load (sidecar valid), warm load after 10,000 more lines (what
a kill -9 can leave uncounted), and the writer-side checkpoint of those lines.
--baseline also times a plain `json.loads` scan, for comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "addons"))

from keygate.accounting.ledger import Ledger, sidecar_path  # noqa: E402
from keygate.accounting.log import log_files, rotated_name  # noqa: E402

MAX_BYTES = 100 * 1024 * 1024
KEEP = 10

LINE = ('{"ts":"%s","id":"req_%020x","key":%s,"status":%d,"error":%s,"method":"POST",'
        '"path":"/v1/chat/completions","model":"%s","upstream_model":"%s","channel":"local",'
        '"stream":true,"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,'
        '"duration_ms":%.3f,"client_ip":"203.0.113.%d","completed":true}\n')


def lines(n: int, start: int, t0: datetime):
    """n log lines, ~1.7 requests a second, 50 keys, some refused, some anonymous."""
    rnd = random.Random(start)
    keys = ['"user%d"' % i for i in range(50)] + ["null"]
    errors = ["null"] * 20 + ['"rate_limit_exceeded"', '"upstream_error"', '"invalid_api_key"']
    models = ["llama3.2:3b", "qwen2.5:7b", "gpt-4o-mini", "nomic-embed-text"]
    for i in range(start, start + n):
        ts = t0 + timedelta(milliseconds=600 * i)
        p, c = rnd.randint(5, 3000), rnd.randint(0, 2000)
        err = rnd.choice(errors)
        yield LINE % (ts.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (ts.microsecond // 1000),
                      rnd.getrandbits(80), rnd.choice(keys), 200 if err == "null" else 429, err,
                      rnd.choice(models), rnd.choice(models), p, c, p + c,
                      rnd.uniform(5, 30000), rnd.randint(1, 254))


def generate(path: Path, n: int, single: bool, t0: datetime) -> None:
    """Write n lines as the writer would: rotating at MAX_BYTES (unless single)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    out, size = open(path.with_suffix(".part0"), "w"), 0
    parts.append(Path(out.name))
    for line in lines(n, 0, t0):
        if not single and size + len(line) > MAX_BYTES:
            out.close()
            out, size = open(path.with_suffix(f".part{len(parts)}"), "w"), 0
            parts.append(Path(out.name))
        out.write(line)
        size += len(line)
    out.close()
    # part0 is the oldest: it becomes .N, the last part the live file.
    for k, part in enumerate(reversed(parts)):
        part.rename(path if k == 0 else rotated_name(path, k))


def timed(label: str, fn):
    t = time.perf_counter()
    result = fn()
    print(f"{label:<48} {time.perf_counter() - t:8.3f} s")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/keygate-perf"))
    ap.add_argument("--single", action="store_true", help="one file, no rotation")
    ap.add_argument("--baseline", action="store_true", help="also time a json.loads scan")
    args = ap.parse_args()

    path = args.dir / f"{args.lines}{'-single' if args.single else ''}" / "usage.jsonl"
    t0 = datetime(2026, 11, 20, tzinfo=timezone.utc)
    if not path.exists():
        timed(f"generate {args.lines:,} lines", lambda: generate(path, args.lines, args.single, t0))
    files = log_files(path, KEEP)
    total = sum(f.stat().st_size for f in files)
    print(f"log: {path} ({len(files)} files, {total / 1e6:,.0f} MB)")

    if args.baseline:
        def plain() -> int:
            n = 0
            for f in files:
                with open(f, "rb") as fh:
                    for line in fh:
                        json.loads(line)
                        n += 1
            return n
        timed("plain json.loads scan (no counting)", plain)

    sidecar_path(path).unlink(missing_ok=True)
    cold = timed("Ledger.load, cold (no sidecar)", lambda: Ledger.load(path, KEEP))
    warm = timed("Ledger.load, warm (sidecar valid)", lambda: Ledger.load(path, KEEP))
    assert warm.snapshot() == cold.snapshot()

    size = path.stat().st_size
    with open(path, "a") as f:  # 10 s of traffic at 1,000 requests/s, not yet checkpointed
        f.writelines(lines(10_000, args.lines, t0))
    tail = timed("Ledger.load, sidecar + 10,000 new lines", lambda: Ledger.load(path, KEEP))
    with open(path, "a") as f:
        f.writelines(lines(10_000, args.lines + 10_000, t0))
    timed("Ledger.checkpoint of 10,000 new lines", tail.checkpoint)
    print(f"stats of the last load: {tail.stats}")
    # Leave the generated log as it was for the next run.
    with open(path, "rb+") as f:
        f.truncate(size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
