"""End to end: a model name is any string a valid key sends, and it reaches the usage log;
`keygate usage` must show it without letting it act on the operator's terminal (retitle the
window, clear the screen, forge a TOTAL row) or flood it (a 1 MB name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

FORGED_TOTAL = "TOTAL   999,999   0   0   0   0"
HOSTILE = [
    "\x1b]0;pwned\x07",  # OSC: sets the window title, BEL ends it
    "llama\x1b[2J\x1b[H",  # clears the screen, cursor home
    "x\n" + FORGED_TOTAL,  # a row of its own
    "\r" + FORGED_TOTAL,  # the same over the start of the line
    "\x9b2J\x7f\t",  # C1 CSI (8-bit ESC [), DEL and TAB
    "\u202egpt-4o\u2066",  # bidi override and isolate
    "m" * 1_000_000,
]
# C0 but the line feed, DEL, C1, bidi embeddings, overrides and isolates
RAW = {*map(chr, range(0x20)), *map(chr, range(0x7f, 0xa0)), *map(chr, range(0x202a, 0x202f)),
       *map(chr, range(0x2066, 0x206a))} - {"\n"}


def report(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`keygate usage` as it runs, a process of its own writing to a pipe: `python -m
    keygate.cli.main usage` with addons/ on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "addons")}
    return subprocess.run([sys.executable, "-m", "keygate.cli.main", "usage",
                           "--config", str(config), *args], capture_output=True, env=env,
                          timeout=120)


def assert_terminal_safe(out: bytes) -> str:
    text = out.decode("utf-8")  # strict: a lone surrogate could not have been printed
    raw = sorted({c for c in text if c in RAW})
    assert not raw, f"raw control characters in the output: {raw}"
    return text


@pytest.fixture
def hostile_log(make_gateway, fake):
    """A keygate whose usage log holds a line for each hostile model name, sent with a
    valid key that may use every model (the fake upstream answers 404 to them)."""
    gw = make_gateway(fake.url).start()
    with httpx.Client(base_url=gw.url, headers=gw.key("alice").auth, timeout=30) as client:
        ids = []
        for model in [*HOSTILE, "llama3.2"]:
            r = client.post("/api/chat", json={
                "model": model, "stream": False,
                "messages": [{"role": "user", "content": "hi"}]})
            ids.append(r.headers["x-keygate-request-id"])
        # a lone surrogate: JSON can spell one, and a report that prints it raw fails
        r = client.post("/api/chat", headers={"Content-Type": "application/json"},
                        content=b'{"model": "bad\\ud800name", "stream": false, "messages": []}')
        ids.append(r.headers["x-keygate-request-id"])
    for request_id in ids:
        gw.usage_for(request_id, timeout=10)
    return gw


def test_usage_table_cannot_act_on_the_terminal(hostile_log):
    gw = hostile_log
    logged = {r["model"] for r in gw.usage()}
    assert "\x1b]0;pwned\x07" in logged and "x\n" + FORGED_TOTAL in logged  # they got through

    for by in ("model", "key,model", "model,channel,day"):
        done = report(gw.config, "--by", by)
        assert done.returncode == 0, done.stderr
        text = assert_terminal_safe(done.stdout)
        lines = text.splitlines()
        assert [i for i, line in enumerate(lines) if line.startswith("TOTAL")] == [len(lines) - 1]
        assert lines[-1].split()[1] == str(len(HOSTILE) + 2)  # every request, one TOTAL
        assert len(done.stdout) < 20_000, f"{len(done.stdout)} bytes of table"
        assert max(len(line) for line in lines) < 300
        assert "\\x1b]0;pwned\\x07" in text and "x\\nTOTAL" in text and "\\u202egpt-4o" in text
        assert len({len(line) for line in lines}) == 1  # still aligned: numbers right

    done = report(gw.config)  # no groups: only the TOTAL row
    assert done.returncode == 0
    assert assert_terminal_safe(done.stdout).splitlines()[-1].split()[:2] == [
        "TOTAL", str(len(HOSTILE) + 2)]


def test_usage_json_and_toml_keep_the_names_and_stay_safe(hostile_log):
    gw = hostile_log
    done = report(gw.config, "--by", "model", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(assert_terminal_safe(done.stdout))
    models = {r["model"] for r in rows}
    assert {"\x1b]0;pwned\x07", "x\n" + FORGED_TOTAL, "\x9b2J\x7f\t",
            "\u202egpt-4o\u2066"} <= models  # the same names, escaped

    done = report(gw.config, "--by", "model", "--format", "toml")
    assert done.returncode == 0, done.stderr
    models = {r["model"] for r in tomllib.loads(assert_terminal_safe(done.stdout))["rows"]}
    assert {"\x1b]0;pwned\x07", "\x9b2J\x7f\t", "\u202egpt-4o\u2066"} <= models
