"""`keygate usage` (keygate.cli.usage over keygate.accounting.totals, scripts/usage): grouping,
time filters, formats, rotated files, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "addons"))

from keygate.accounting.log import encode, rotated_name  # noqa: E402
from keygate.accounting.totals import (  # noqa: E402
    Row,
    Totals,
    aggregate,
    canonical,
    parse_by,
    record_ts,
)
from keygate.cli.main import main as keygate  # noqa: E402
from keygate.cli.usage import format_table  # noqa: E402
from keygate.times import parse_when  # noqa: E402

NOW = datetime(2026, 11, 26, 12, 0, 0, 500_000, tzinfo=timezone.utc)


def rec(ts: str, key="alice", model="llama3.2", channel="local", error=None,
        prompt=1, completion=2, total=None) -> dict:
    return {"ts": ts, "id": f"req_{ts}", "key": key, "status": 200, "error": error,
            "method": "POST", "path": "/api/chat", "model": model, "upstream_model": model,
            "channel": channel, "stream": False, "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion if total is None else total,
            "duration_ms": 1.0, "client_ip": "127.0.0.1", "completed": True}


RECORDS = [
    rec("2026-11-24T10:00:00.000Z", prompt=10, completion=5),
    rec("2026-11-25T10:00:00.000Z", key="bob", model="qwen2.5:7b", prompt=100, completion=50),
    rec("2026-11-25T23:59:59.999Z", error="upstream_error", prompt=0, completion=0),
    rec("2026-11-26T00:00:00.000Z", key=None, model=None, channel=None,
        error="invalid_api_key", prompt=0, completion=0),
    rec("2026-11-26T11:45:00.000Z", model="qwen2.5:7b", prompt=7, completion=3),
]


@pytest.fixture
def log(tmp_path) -> Path:
    """RECORDS spread over two rotated files and the live one, with a torn last line."""
    p = tmp_path / "logs" / "usage.jsonl"
    p.parent.mkdir()
    rotated_name(p, 2).write_bytes(encode(RECORDS[0]))
    rotated_name(p, 1).write_bytes(encode(RECORDS[1]) + encode(RECORDS[2]))
    torn = encode(rec("2026-11-26T11:59:00.000Z"))[:50]
    p.write_bytes(encode(RECORDS[3]) + encode(RECORDS[4]) + torn)
    return p


def main(argv: list[str]) -> int:
    """`keygate usage ...`, in this process: its exit status; output to capsys."""
    return keygate(["usage", *argv])


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("30m", NOW - timedelta(minutes=30)),
    ("24h", NOW - timedelta(hours=24)),
    ("7d", NOW - timedelta(days=7)),
    ("90s", NOW - timedelta(seconds=90)),
    ("2w", NOW - timedelta(days=14)),
    ("2026-11-25", datetime(2026, 11, 25, tzinfo=timezone.utc)),
    ("2026-11-25T08:30", datetime(2026, 11, 25, 8, 30, tzinfo=timezone.utc)),
    ("2026-11-25T08:30:00Z", datetime(2026, 11, 25, 8, 30, tzinfo=timezone.utc)),
    ("2026-11-25T10:30:00+02:00", datetime(2026, 11, 25, 8, 30, tzinfo=timezone.utc)),
])
def test_parse_when(text, expected):
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "30", "5y", "2026-13-01", "-3d", ""])
def test_parse_when_rejects(text):
    with pytest.raises(ValueError, match="duration like 30m"):
        parse_when(text, NOW)


def test_parse_by():
    assert parse_by(["key,model", "day", "key"]) == ("key", "model", "day")
    assert parse_by([]) == ()
    assert parse_by(["channel,"]) == ("channel",)
    with pytest.raises(ValueError, match="cannot group by 'status'"):
        parse_by(["key,status"])


def test_canonical_rounds_up_to_the_millisecond():
    assert canonical(datetime(2026, 1, 2, 3, 4, 5, 123_000, tzinfo=timezone.utc)) == \
        "2026-01-02T03:04:05.123Z"
    assert canonical(datetime(2026, 1, 2, 3, 4, 5, 123_001, tzinfo=timezone.utc)) == \
        "2026-01-02T03:04:05.124Z"
    assert canonical(datetime(2026, 1, 2, 23, 59, 59, 999_500, tzinfo=timezone.utc)) == \
        "2026-01-03T00:00:00.000Z"


@pytest.mark.parametrize("ts, expected", [
    ("2026-11-26T22:42:26.123Z", "2026-11-26T22:42:26.123Z"),
    ("2026-11-26T23:42:26.123+01:00", "2026-11-26T22:42:26.123Z"),
    ("2026-11-26T22:42:26", "2026-11-26T22:42:26.000Z"),
    ("junk", None),
    (None, None),
])
def test_record_ts(ts, expected):
    assert record_ts({"ts": ts}) == expected


# --------------------------------------------------------------------------- counting


def test_aggregate_without_groups_is_one_row():
    (row,) = aggregate(RECORDS, ())
    assert row == Row((), Totals(requests=5, prompt_tokens=117, completion_tokens=58,
                                 total_tokens=175, errors=2))
    assert aggregate([], ()) == [Row((), Totals())]
    assert aggregate([], ("key",)) == []


def test_aggregate_by_key_and_day():
    rows = aggregate(RECORDS, ("key", "day"))
    assert [(r.group, r.totals.requests, r.totals.total_tokens, r.totals.errors)
            for r in rows] == [
        ((None, "2026-11-26"), 1, 0, 1),
        (("alice", "2026-11-24"), 1, 15, 0),
        (("alice", "2026-11-25"), 1, 0, 1),
        (("alice", "2026-11-26"), 1, 10, 0),
        (("bob", "2026-11-25"), 1, 150, 0),
    ]


@pytest.mark.parametrize("by, groups", [
    (("model",), [(None,), ("llama3.2",), ("qwen2.5:7b",)]),
    (("channel", "model"), [(None, None), ("local", "llama3.2"), ("local", "qwen2.5:7b")]),
    (("day",), [("2026-11-24",), ("2026-11-25",), ("2026-11-26",)]),
])
def test_aggregate_groups(by, groups):
    rows = aggregate(RECORDS, by)
    assert [r.group for r in rows] == groups
    assert sum(r.totals.requests for r in rows) == 5


def test_since_inclusive_until_exclusive():
    def n(since, until):
        return aggregate(RECORDS, (), since, until)[0].totals.requests

    assert n("2026-11-25T10:00:00.000Z", None) == 4
    assert n(None, "2026-11-25T10:00:00.000Z") == 1
    assert n("2026-11-25T10:00:00.000Z", "2026-11-26T00:00:00.000Z") == 2
    assert n("2026-11-27T00:00:00.000Z", None) == 0


def test_records_without_a_time_are_counted_only_when_no_window_is_asked():
    rs = [{"key": "a"}, {"ts": "garbage", "key": "a"}]
    assert aggregate(rs, ())[0].totals.requests == 2
    assert aggregate(rs, (), "2000-01-01T00:00:00.000Z", None)[0].totals.requests == 0


def test_odd_values_do_not_break_counting():
    rs = [{"ts": "2026-11-26T00:00:00.000Z", "key": ["x"], "model": 5, "total_tokens": "9",
           "prompt_tokens": True, "error": 0}]
    (row,) = aggregate(rs, ("key", "model"))
    assert row.group == ('["x"]', "5")
    assert row.totals == Totals(requests=1, errors=1)


def test_table_layout():
    rows = aggregate(RECORDS, ("key",))
    lines = format_table(rows, ("key",)).splitlines()
    assert lines[0].split() == ["key", "requests", "prompt_tokens", "completion_tokens",
                                "total_tokens", "errors", "cost"]
    assert lines[1].split() == ["-", "1", "0", "0", "0", "1", "-"]
    assert lines[-1].split() == ["TOTAL", "5", "117", "58", "175", "2", "-"]
    ends = {len(line) for line in lines}
    assert len(ends) == 1  # right-aligned numbers: every line ends in the same column
    assert lines[1].index("1") == lines[0].index("requests") + len("requests") - 1


def test_table_thousands_and_no_groups():
    rows = [Row((), Totals(requests=1234567, total_tokens=5))]
    lines = format_table(rows, ()).splitlines()
    assert len(lines) == 2 and lines[1].split() == ["TOTAL", "1,234,567", "0", "0", "5", "0",
                                                 "-"]


# --------------------------------------------------------------------------- hostile names

# Model names a client chose: they reach the log as sent (or cut there, but the report must
# not count on it).
HOSTILE = [
    "\x1b]0;pwned\x07",
    "llama\x1b[2J\x1b[H",
    "x\nTOTAL   999   0   0   0   0",
    "\r\x00\x9b2J\x7f\t",
    "\u202egpt-4o\u2066",
    "bad\udcffname",
    "m" * 1_000_000,
]
RAW_CONTROLS = {*map(chr, range(0x20)), *map(chr, range(0x7f, 0xa0)),
                *map(chr, range(0x202a, 0x202f)), *map(chr, range(0x2066, 0x206a))} - {"\n"}


@pytest.fixture
def hostile_log(tmp_path) -> Path:
    p = tmp_path / "usage.jsonl"
    ts = "2026-11-26T10:00:00.000Z"
    p.write_bytes(b"".join(encode(rec(ts, model=m)) for m in HOSTILE)
                  + encode(rec(ts, key="k" * 128, model="llama3.2")))
    return p


@pytest.mark.parametrize("by", ["model", "key,model", "model,channel,day"])
def test_table_of_hostile_model_names_is_safe_and_bounded(capsys, hostile_log, by):
    code, out, _ = run(capsys, "--log", str(hostile_log), "--by", by)
    assert code == 0
    assert not RAW_CONTROLS & set(out)
    assert all(line.isprintable() for line in out.splitlines())
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("TOTAL")] == [lines[-1]]
    assert lines[-1].split()[:2] == ["TOTAL", str(len(HOSTILE) + 1)]
    assert len(lines) == 2 + len(HOSTILE) + 1  # header, one row each, TOTAL
    assert len(out) < 5_000 and max(len(line) for line in lines) < 300
    assert len({len(line) for line in lines}) == 1  # aligned: numbers right, one width
    assert "\\x1b]0;pwned\\x07" in out and "x\\nTOTAL" in out and "\\u202egpt-4o" in out
    assert "bad\\udcffname" in out
    assert "m" * 50 + "…(+999950)" in out  # cut, marked with what was left out
    if "key" in by:
        assert "k" * 128 + "  " in out  # a key name is never cut


def test_table_width_can_be_changed():
    rows = aggregate([rec("2026-11-26T10:00:00.000Z", model="m" * 100)], ("model",))
    assert "m" * 14 + "…(+86)" in format_table(rows, ("model",), max_width=20)
    assert "m" * 100 + "  " in format_table(rows, ("model",), max_width=None)


def test_json_and_toml_of_hostile_model_names(capsys, hostile_log):
    code, out, _ = run(capsys, "--log", str(hostile_log), "--by", "model", "--format", "json")
    assert code == 0 and not RAW_CONTROLS & set(out)
    assert {r["model"] for r in json.loads(out)} == {*HOSTILE, "llama3.2"}  # nothing lost

    code, out, _ = run(capsys, "--log", str(hostile_log), "--by", "model", "--format", "toml")
    assert code == 0 and not RAW_CONTROLS & set(out)
    models = {r["model"] for r in tomllib.loads(out)["rows"]}
    assert {*HOSTILE, "llama3.2"} - models == {"bad\udcffname"}
    assert "bad\\udcffname" in models  # TOML has no lone surrogates: shown as text


# --------------------------------------------------------------------------- the command


def test_reads_rotated_files_and_skips_the_torn_line(capsys, log):
    code, out, err = run(capsys, "--log", str(log), "--format", "json")
    assert code == 0
    assert json.loads(out) == [{"requests": 5, "prompt_tokens": 117, "completion_tokens": 58,
                                "total_tokens": 175, "errors": 2, "cost": None}]
    assert "skipped 1 line of" in err


def test_json_groups_keep_nulls(capsys, log):
    code, out, _ = run(capsys, "--log", str(log), "--by", "key", "--by", "model",
                       "--format", "json")
    rows = json.loads(out)
    assert rows[0] == {"key": None, "model": None, "requests": 1, "prompt_tokens": 0,
                       "completion_tokens": 0, "total_tokens": 0, "errors": 1, "cost": None}
    assert [(r["key"], r["model"]) for r in rows] == [
        (None, None), ("alice", "llama3.2"), ("alice", "qwen2.5:7b"), ("bob", "qwen2.5:7b")]


def test_toml_omits_nulls(capsys, log):
    code, out, _ = run(capsys, "--log", str(log), "--by", "key,channel", "--format", "toml")
    doc = tomllib.loads(out)
    assert doc["rows"][0] == {"requests": 1, "prompt_tokens": 0, "completion_tokens": 0,
                              "total_tokens": 0, "errors": 1}
    assert doc["rows"][1]["key"] == "alice" and doc["rows"][1]["channel"] == "local"
    assert main(["--help"]) == 0
    assert "TOML has no null" in capsys.readouterr().out


def test_table_with_filters(capsys, log, monkeypatch):
    code, out, _ = run(capsys, "--log", str(log), "--since", "2026-11-25",
                       "--until", "2026-11-26T00:00:00Z", "--by", "day")
    lines = out.splitlines()
    assert lines[1].split() == ["2026-11-25", "2", "100", "50", "150", "1", "-"]
    assert lines[2].split() == ["TOTAL", "2", "100", "50", "150", "1", "-"]
    assert len(lines) == 3


def test_relative_since_counts_back_from_now(capsys, tmp_path):
    p = tmp_path / "usage.jsonl"
    now = datetime.now(timezone.utc)
    ago = [canonical(now - timedelta(minutes=m)) for m in (5, 50, 500)]
    p.write_bytes(b"".join(encode(rec(ts)) for ts in ago))
    _, out, _ = run(capsys, "--log", str(p), "--since", "1h", "--format", "json")
    assert json.loads(out)[0]["requests"] == 2


def test_missing_log_is_an_empty_report(capsys, tmp_path):
    code, out, err = run(capsys, "--log", str(tmp_path / "none" / "usage.jsonl"), "--by", "key")
    assert code == 0 and err == ""
    assert out.splitlines()[-1].split() == ["TOTAL", "0", "0", "0", "0", "0", "-"]
    _, out, _ = run(capsys, "--log", str(tmp_path / "none.jsonl"), "--by", "key",
                    "--format", "json")
    assert json.loads(out) == []


@pytest.mark.parametrize("argv, message", [
    (["--since", "yesterday"], "'yesterday' is neither a duration"),
    (["--by", "status"], "cannot group by 'status'"),
    (["--format", "csv"], "invalid choice: 'csv'"),
    (["--since", "2026-11-26", "--until", "2026-11-25"], "--since is after --until"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_user_errors_are_one_line(capsys, tmp_path, argv, message):
    assert main(["--log", str(tmp_path / "u.jsonl"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("usage: error:")


def test_config_names_the_log(capsys, tmp_path, log):
    cfg = tmp_path / "etc" / "gateway.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[gateway]\nusage_log = "{log}"\n')
    _, out, _ = run(capsys, "--config", str(cfg), "--format", "json")
    assert json.loads(out)[0]["requests"] == 5


def test_bad_config_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nusage_log = "u.jsonl"\nusage_log_keep = "ten"\n')
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:3: usage_log_keep must be a number" in err and "Traceback" not in err


def test_python_m_and_the_script_wrapper(tmp_path, log):
    # scripts/usage sources scripts/lib/env.sh (which may install into .venv); run it in a
    # copy whose env.sh only sets what the real one exports, with a `keygate` command first
    # on PATH that runs this checkout's.
    (tmp_path / "kg" / "scripts" / "lib").mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    shutil.copy(ROOT / "scripts" / "usage", tmp_path / "kg" / "scripts" / "usage")
    (tmp_path / "bin" / "keygate").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m keygate.cli.main "$@"\n')
    (tmp_path / "bin" / "keygate").chmod(0o755)
    (tmp_path / "kg" / "scripts" / "lib" / "env.sh").write_text(
        f'KEYGATE_PY="{sys.executable}"\nPYTHONPATH="{ROOT / "addons"}"\n'
        f'PATH="{tmp_path / "bin"}:$PATH"\nexport PATH PYTHONPATH\n')
    assert os.access(ROOT / "scripts" / "usage", os.X_OK)
    out = subprocess.run([str(tmp_path / "kg" / "scripts" / "usage"), "--log", str(log),
                          "--by", "channel"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].split() == ["TOTAL", "5", "117", "58", "175", "2",
                                                   "-"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "addons"))
    out = subprocess.run([sys.executable, "-m", "keygate.cli.main", "usage", "--log", str(log),
                          "--since", "nonsense"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
