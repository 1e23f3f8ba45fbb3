"""UsageWriter: whole lines, batching, rotation under a tail -F follower, failures."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from keygate.accounting import log as usagelog  # noqa: E402
from keygate.accounting.log import (  # noqa: E402
    LogFile,
    Target,
    UsageWriter,
    encode,
    log_files,
    parse_line,
    read_records,
    rotated_name,
    scan_lines,
)


def rec(i: int, **extra) -> dict:
    r = {"ts": "2026-11-26T22:42:26.123Z", "id": f"req_{i:08d}", "key": "alice",
         "status": 200, "error": None, "path": "/api/chat", "total_tokens": i}
    r.update(extra)
    return r


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def ids_in(paths: list[Path]) -> list[str]:
    out: list[str] = []
    for p in paths:
        for line in lines_of(p):
            assert line.endswith(b"\n")
            out.append(json.loads(line)["id"])
    return out


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# --------------------------------------------------------------------------- format


_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]")


def stdlib_line(record: dict) -> bytes:
    """What the json module writes, with the characters unsafe in a terminal escaped as
    ensure_ascii would escape them."""
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    text = _UNSAFE.sub(lambda m: json.dumps(m.group())[1:-1], text)
    return (text + "\n").encode()


def test_encode_is_one_compact_line():
    r = {"a": "é ü 日本", "b": None, "c": [1, 2], "nl": "x\ny"}
    line = encode(r)
    assert line == stdlib_line(r)
    assert line.count(b"\n") == 1


@given(st.dictionaries(st.text(), st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    # (Python writes 1e-07 where orjson writes 1e-7: the same number, other bytes.)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: "e" not in repr(x))
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8), max_size=6))
def test_encode_writes_what_the_json_module_writes(record):
    assert encode(record) == stdlib_line(record)


def test_encode_exponents_read_back_the_same():
    r = {"a": 1e-07, "b": 1.5e300, "c": 1e16}
    assert json.loads(encode(r)) == r


def test_encode_never_fails_on_odd_values():
    line = encode({"p": Path("/x"), "s": "bad \udc80 surrogate", "big": 1 << 70})
    assert json.loads(line) == {"p": "/x", "s": "bad \udc80 surrogate", "big": 1 << 70}
    assert line.endswith(b"}\n") and line.count(b"\n") == 1


@pytest.mark.parametrize("text, good, bad", [
    (b'{"a":1}\n{"a":2}\n', 2, 0),
    (b'{"a":1}\n\n  \n{"a":2}\n', 2, 0),  # blank lines are not garbage
    (b'{"a":1}\n{"a":\n2}\n', 1, 2),  # a value spread over lines is two bad lines
    (b'  {"a":1} \r\n', 1, 0),  # surrounding whitespace, as json.loads allows
    (b'[1]\n5\nnull\n"x"\n', 0, 4),  # JSON, but not objects
    (b'{"a":1}{"a":2}\n{"a":1},{"a":2}\n', 0, 2),
    (b'{"a":1}\n{"ts":"2026-11-26T22:4\n', 1, 1),  # torn
    (b'{"a":NaN}\n{"a":1e400}\n{"a":"\\ud800"}\n', 3, 0),  # the json module reads these
    (b'\xef\xbb\xbf{"a":1}\n{"a":"\xff"}\n\x0c{"a":1}\n', 0, 3),  # BOM, bad UTF-8, form feed
    (b"[" * 100_000 + b"\n" + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n", 0, 2),  # too deep
])
def test_scan_lines_agrees_with_json_loads(text, good, bad):
    got: list[dict] = []
    assert scan_lines(text, got.append) == bad
    assert len(got) == good


def test_scan_lines_keeps_integers_beyond_64_bits():
    data = b"".join(b'{"id":"r%d","total_tokens":%d}\n' % (i, v)
                    for i, v in enumerate([1 << 70, -(1 << 63) - 1, 7, (1 << 64) - 1, 10**30]))
    got: list[dict] = []
    assert scan_lines(data, got.append) == 0
    assert [r["total_tokens"] for r in got] == [1 << 70, -(1 << 63) - 1, 7, (1 << 64) - 1, 10**30]
    assert all(type(r["total_tokens"]) is int for r in got)


_json_bits = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\\", b"\\u",
                              b"d800", b"dc00", b"0", b"-", b"1", b"e", b".", b"9" * 19, b"NaN",
                              b"true", b"null", b'"k"', b"\xc3\xa9", b"\xff", b"\r", b"\t"])


@given(st.lists(st.lists(_json_bits, max_size=12).map(b"".join) | st.just(b'{"a":1}'),
                max_size=12))
def test_scan_lines_is_parse_line_on_every_line(lines):
    data = b"".join(line + b"\n" for line in lines)
    got: list[dict] = []
    bad = scan_lines(data, got.append)
    want = [parse_line(line) for line in lines]
    assert repr(got) == repr([r for r in want if r is not None])  # (NaN != NaN)
    assert bad == sum(1 for line, r in zip(lines, want) if r is None and line.strip())


def test_read_records_includes_unterminated_last_line_only_if_whole(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(encode(rec(1)) + encode(rec(2)) + encode(rec(3))[:-1])
    got: list[dict] = []
    assert read_records(p, got.append) == 0
    assert [r["id"] for r in got] == ["req_00000001", "req_00000002", "req_00000003"]
    p.write_bytes(encode(rec(1)) + encode(rec(2))[:30])
    got.clear()
    assert read_records(p, got.append) == 1
    assert len(got) == 1


def test_log_files_order(tmp_path):
    p = tmp_path / "usage.jsonl"
    for k in (1, 2, 3, 11):
        rotated_name(p, k).write_text("")
    p.write_text("")
    (tmp_path / "usage.jsonl.ledger").write_text("")
    assert [f.name for f in log_files(p, 2)] == ["usage.jsonl.2", "usage.jsonl.1", "usage.jsonl"]
    assert [f.name for f in log_files(p)] == [
        "usage.jsonl.11", "usage.jsonl.3", "usage.jsonl.2", "usage.jsonl.1", "usage.jsonl"]
    assert log_files(tmp_path / "missing" / "usage.jsonl") == []


# --------------------------------------------------------------------------- writer basics


def test_writes_lines_and_creates_folder(tmp_path):
    p = tmp_path / "a" / "b" / "usage.jsonl"
    w = UsageWriter(p, 10_000_000, 3)
    records = [rec(i) for i in range(100)]
    for r in records:
        w.write(r)
    w.close()
    assert lines_of(p) == [encode(r) for r in records]


def test_lines_appear_without_close(tmp_path):
    # tail -f must see a line at once: nothing waits in a buffer.
    p = tmp_path / "usage.jsonl"
    w = UsageWriter(p, 10_000_000, 3)
    try:
        w.write(rec(1))
        wait_for(lambda: lines_of(p) == [encode(rec(1))])
    finally:
        w.close()


def test_500_concurrent_writers_give_500_whole_lines(tmp_path):
    p = tmp_path / "usage.jsonl"
    w = UsageWriter(p, 10_000_000, 3)
    start = threading.Barrier(500)

    def one(i: int) -> None:
        start.wait()
        w.write(rec(i, payload="x" * (i % 50) * 20))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    ids = ids_in([p])
    assert sorted(ids) == sorted(f"req_{i:08d}" for i in range(500))


def test_queued_records_go_out_in_few_writes(tmp_path, monkeypatch):
    p = tmp_path / "usage.jsonl"
    calls: list[int] = []
    real_write = os.write
    gate = threading.Event()

    def counting_write(fd, data):
        gate.wait(5)
        calls.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(usagelog.os, "write", counting_write)
    w = UsageWriter(p, 10_000_000, 3)
    for i in range(1000):
        w.write(rec(i))
    gate.set()
    w.close()
    assert len(lines_of(p)) == 1000
    assert len(calls) < 50  # batched; the first write may hold only a few lines


def test_reconfigure_applies_between_lines(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "sub" / "b.jsonl"
    w = UsageWriter(a, 10_000_000, 3)
    for i in range(10):
        w.write(rec(i))
    w.reconfigure(b, 10_000_000, 3)
    for i in range(10, 20):
        w.write(rec(i))
    w.close()
    assert ids_in([a]) == [f"req_{i:08d}" for i in range(10)]
    assert ids_in([b]) == [f"req_{i:08d}" for i in range(10, 20)]


def test_write_after_close_and_bad_records_never_raise(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    w = UsageWriter(p, 10_000_000, 3)
    circular: dict = {"id": "loop"}
    circular["self"] = circular
    w.write(circular)
    w.write(rec(1))
    w.close()
    w.write(rec(2))
    w.close()  # twice is fine
    assert ids_in([p]) == ["req_00000001"]
    assert "cannot be serialised" in caplog.text


def test_torn_last_line_is_terminated_before_appending(tmp_path):
    p = tmp_path / "usage.jsonl"
    p.write_bytes(encode(rec(1)) + encode(rec(2))[:25])  # a crash mid-line
    w = UsageWriter(p, 10_000_000, 3)
    w.write(rec(3))
    w.close()
    got: list[dict] = []
    assert read_records(p, got.append) == 1  # the torn fragment, alone on its line
    assert [r["id"] for r in got] == ["req_00000001", "req_00000003"]


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_files_under_max_and_drops_beyond_keep(tmp_path):
    p = tmp_path / "usage.jsonl"
    size = len(encode(rec(0, total_tokens=7)))  # every line this long
    w = UsageWriter(p, size * 10 + 5, 3)
    for i in range(95):
        w.write(rec(i, total_tokens=7))
    w.close()
    files = log_files(p, 10)
    assert [f.name for f in files] == ["usage.jsonl.3", "usage.jsonl.2", "usage.jsonl.1",
                                      "usage.jsonl"]
    assert all(f.stat().st_size <= size * 10 + 5 for f in files)
    assert ids_in(files) == [f"req_{i:08d}" for i in range(60, 95)]


def test_rotation_removes_files_left_by_a_larger_keep(tmp_path):
    p = tmp_path / "usage.jsonl"
    for k in range(1, 6):
        rotated_name(p, k).write_bytes(encode(rec(1000 + k)))
    p.write_bytes(encode(rec(0)))
    f = LogFile(Target(p, len(encode(rec(0))) + 1, 2))
    f.append(deque([encode(rec(1))]))
    f.close()
    assert sorted(x.name for x in tmp_path.iterdir()) == [
        "usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]
    assert ids_in([rotated_name(p, 1), p]) == ["req_00000000", "req_00000001"]


def test_keep_zero_keeps_only_the_live_file(tmp_path):
    p = tmp_path / "usage.jsonl"
    w = UsageWriter(p, len(encode(rec(0))) * 2, 0)
    for i in range(7):
        w.write(rec(i))
    w.close()
    assert [x.name for x in tmp_path.iterdir()] == ["usage.jsonl"]
    assert ids_in([p]) == ["req_00000006"]


def test_a_line_bigger_than_max_bytes_is_written_alone(tmp_path):
    p = tmp_path / "usage.jsonl"
    w = UsageWriter(p, 100, 5)
    for i in range(3):
        w.write(rec(i, blob="y" * 300))
    w.close()
    assert ids_in(log_files(p, 5)) == ["req_00000000", "req_00000001", "req_00000002"]
    assert all(len(lines_of(f)) == 1 for f in log_files(p, 5))


def test_checkpoint_hook_after_rotation_and_on_close(tmp_path):
    p = tmp_path / "usage.jsonl"
    calls: list[tuple] = []

    def hook(path, keep):
        calls.append((path, keep, path.exists() and len(lines_of(path))))

    w = UsageWriter(p, len(encode(rec(0))) * 3, 4, checkpoint=hook, checkpoint_interval=60)
    for i in range(2):
        w.write(rec(i))
    wait_for(lambda: len(lines_of(p)) == 2)
    assert calls == []
    for i in range(2, 5):
        w.write(rec(i))
    wait_for(lambda: len(calls) >= 1)
    w.close()
    assert calls[-1] == (p, 4, 2)
    assert all(c[:2] == (p, 4) for c in calls)


def test_checkpoint_hook_runs_periodically_and_its_errors_are_contained(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    calls = []

    def hook(path, keep):
        calls.append(1)
        raise RuntimeError("boom")

    w = UsageWriter(p, 10_000_000, 3, checkpoint=hook, checkpoint_interval=0.05)
    w.write(rec(1))
    wait_for(lambda: calls)
    w.write(rec(2))
    w.close()
    assert ids_in([p]) == ["req_00000001", "req_00000002"]
    assert "checkpoint failed: boom" in caplog.text


# --------------------------------------------------------------------------- rotation hook
#
# Rotation changes no quota: it runs through the ledger's hook, which counts the files it
# drops before they go (here: a hook that records what it was handed).


def recording_hook(calls: list):
    def rotate(path, keep, dropped, renames):
        # What a dropped file holds when the hook gets it: it still exists, whole.
        calls.append((path, keep, {d.name: ids_in([d]) for d in dropped}))
        for d in dropped:
            d.unlink()
        renames()
    return rotate


def test_rotation_runs_through_the_hook_with_the_files_it_drops(tmp_path):
    p = tmp_path / "usage.jsonl"
    calls: list = []
    w = UsageWriter(p, len(encode(rec(0))) * 2, 2, rotate=recording_hook(calls))
    for i in range(8):
        w.write(rec(i))
    w.close()
    assert [c[2] for c in calls] == [
        {}, {},  # .1, then .2 made
        {"usage.jsonl.2": ["req_00000000", "req_00000001"]},
    ]
    assert all(c[:2] == (p, 2) for c in calls)
    # Every line is either still on disk or was handed over before it was deleted.
    assert ids_in(log_files(p, 2)) == [f"req_{i:08d}" for i in range(2, 8)]


def test_the_hook_gets_files_left_by_a_larger_keep_and_keep_zero(tmp_path):
    p = tmp_path / "usage.jsonl"
    for k in range(1, 5):
        rotated_name(p, k).write_bytes(encode(rec(100 + k)))
    p.write_bytes(encode(rec(0)))
    calls: list = []
    f = LogFile(Target(p, len(encode(rec(0))) + 1, 2),
                rotate=lambda dropped, renames: recording_hook(calls)(p, 2, dropped, renames))
    f.append(deque([encode(rec(1))]))
    f.close()
    assert calls[0][2] == {"usage.jsonl.3": ["req_00000103"], "usage.jsonl.4": ["req_00000104"],
                           "usage.jsonl.2": ["req_00000102"]}
    assert ids_in([rotated_name(p, 2), rotated_name(p, 1), p]) == [
        "req_00000101", "req_00000000", "req_00000001"]
    q = tmp_path / "zero.jsonl"
    calls.clear()
    w = UsageWriter(q, len(encode(rec(0))), 0, rotate=recording_hook(calls))
    for i in range(3):
        w.write(rec(i))
    w.close()
    assert [c[2] for c in calls] == [{"zero.jsonl": ["req_00000000"]},
                                     {"zero.jsonl": ["req_00000001"]}]


def test_a_torn_line_is_ended_before_its_file_rotates(tmp_path):
    # The ledger counts a file up to its last newline: a rotated file ends with one.
    p = tmp_path / "usage.jsonl"
    whole = encode(rec(0))
    p.write_bytes(whole + whole[:-1])  # a crash left the last line without its newline
    w = UsageWriter(p, len(whole) * 2, 3)
    w.write(rec(1))
    w.close()
    assert rotated_name(p, 1).read_bytes() == whole + whole[:-1] + b"\n"
    assert ids_in([p]) == ["req_00000001"]


def test_a_failing_hook_still_rotates_once(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    calls = []

    def broken(path, keep, dropped, renames):
        calls.append(len(dropped))
        if len(calls) % 2:
            renames()  # a bug after the renames: they must not happen twice
        raise RuntimeError("ledger bug")

    w = UsageWriter(p, len(encode(rec(0))), 1, rotate=broken)
    for i in range(4):
        w.write(rec(i))
    w.close()
    assert calls == [0, 1, 1]
    assert ids_in([rotated_name(p, 1), p]) == ["req_00000002", "req_00000003"]
    assert "failed in a rotation (ledger bug); the counts of usage.jsonl.1" in caplog.text


def test_without_a_hook_the_checkpoint_counts_a_file_before_it_goes(tmp_path):
    p = tmp_path / "usage.jsonl"
    seen: list = []

    def checkpoint(path, keep):
        seen.append(sorted(x.name for x in tmp_path.iterdir()))

    w = UsageWriter(p, len(encode(rec(0))), 1, checkpoint=checkpoint, checkpoint_interval=60)
    for i in range(3):
        w.write(rec(i))
    w.close()
    # Before .1 (req 0) was dropped for req 1's file, a checkpoint saw it.
    assert ["usage.jsonl", "usage.jsonl.1"] in seen
    assert ids_in([rotated_name(p, 1), p]) == ["req_00000001", "req_00000002"]


FOLLOWER = r"""
import os, sys, time
path, out, stop = sys.argv[1:4]
# Reads like `tail -F`: follows the name; when the name points at a new file, reads the old
# one to its end first (the writer is done with it before it renames it).
f, buf, lines, switches = None, b"", [], 0
def drain(f, buf):
    while chunk := f.read(1 << 16):
        buf += chunk
        *whole, buf = buf.split(b"\n")
        lines.extend(w + b"\n" for w in whole)
    return buf
while True:
    stopping = os.path.exists(stop)
    if f is None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            time.sleep(0.0005)
            continue
    buf = drain(f, buf)
    try:
        renamed = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        renamed = True
    if renamed:
        buf = drain(f, buf)
        assert buf == b"", "a rotated file ended in a partial line"
        f.close()
        f, switches = None, switches + 1
        continue
    if stopping:
        break
    time.sleep(0.0005)
with open(out, "wb") as o:
    o.write(b"%d\n" % switches + b"".join(lines))
"""


def test_rotation_under_load_with_a_tail_F_follower(tmp_path):
    p = tmp_path / "usage.jsonl"
    out, stop = tmp_path / "followed", tmp_path / "stop"
    line = len(encode(rec(0, w=0)))
    w = UsageWriter(p, line * 300, 1000)
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(p), str(out), str(stop)])

    def produce(t: int) -> None:
        for i in range(600):
            w.write(rec(t * 1000 + i, w=t))
            time.sleep(0.002)  # a busy gateway (~2,000 lines/s), not a flood

    try:
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        w.close()
        stop.touch()
        assert follower.wait(30) == 0
    finally:
        follower.kill()
    switches, *followed = out.read_bytes().splitlines(keepends=True)
    ids = [json.loads(x)["id"] for x in followed]
    assert len(ids) == 2400 and len(set(ids)) == 2400  # every line exactly once
    assert int(switches) >= 7
    files = log_files(p, 1000)
    assert ids_in(files) == ids  # in the order of the files
    assert all(f.stat().st_size <= line * 300 for f in files)


# --------------------------------------------------------------------------- failures


def test_log_path_is_a_directory_then_fixed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "keygate")
    p = tmp_path / "usage.jsonl"
    p.mkdir()
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.05)
    for i in range(5):
        w.write(rec(i))
    wait_for(lambda: "cannot write usage log" in caplog.text)
    time.sleep(0.2)  # a few retries: still one error message for the streak
    assert caplog.text.count("cannot write usage log") == 1
    p.rmdir()
    for i in range(5, 8):
        w.write(rec(i))
    wait_for(lambda: len(lines_of(p)) == 8)
    w.close()
    assert ids_in([p]) == [f"req_{i:08d}" for i in range(8)]
    assert "writable again" in caplog.text


def test_folder_cannot_be_created_then_fixed(tmp_path, caplog):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the folder should be")
    p = blocker / "usage.jsonl"
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.05)
    w.write(rec(1))
    wait_for(lambda: "cannot write usage log" in caplog.text)
    blocker.unlink()
    w.write(rec(2))
    wait_for(lambda: len(lines_of(p)) == 2)
    w.close()
    assert ids_in([p]) == ["req_00000001", "req_00000002"]


def test_live_file_replaced_by_a_directory(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.05)
    w.write(rec(1))
    wait_for(lambda: len(lines_of(p)) == 1)
    p.rename(tmp_path / "moved.jsonl")
    p.mkdir()
    w.write(rec(2))
    wait_for(lambda: "cannot write usage log" in caplog.text)
    p.rmdir()
    wait_for(lambda: len(lines_of(p)) == 1)
    w.close()
    assert ids_in([tmp_path / "moved.jsonl", p]) == ["req_00000001", "req_00000002"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_folder_then_fixed(tmp_path, caplog):
    d = tmp_path / "logs"
    d.mkdir()
    d.chmod(0o555)
    p = d / "usage.jsonl"
    try:
        w = UsageWriter(p, 10_000_000, 3, retry_interval=0.05)
        w.write(rec(1))
        wait_for(lambda: "cannot write usage log" in caplog.text)
    finally:
        d.chmod(0o755)
    wait_for(lambda: len(lines_of(p)) == 1)
    w.close()


def test_backlog_is_bounded_and_drops_the_oldest(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    p.mkdir()
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.05, backlog_limit=10)
    for i in range(25):
        w.write(rec(i))
    wait_for(lambda: "backlog full" in caplog.text and "cannot write" in caplog.text)
    p.rmdir()
    wait_for(lambda: len(lines_of(p)) == 10)
    w.close()
    assert ids_in([p]) == [f"req_{i:08d}" for i in range(15, 25)]
    assert "15 older records were dropped" in caplog.text


def test_close_gives_up_after_its_timeout(tmp_path, caplog):
    p = tmp_path / "usage.jsonl"
    p.mkdir()
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.05)
    w.write(rec(1))
    t0 = time.monotonic()
    w.close(timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert "1 records could not be written" in caplog.text


def _fake_disk(monkeypatch, path: Path, script: list[str]):
    """Make os.write on `path` follow `script`: "half" writes half and returns the short
    count (what a full disk does), "enospc" raises without writing, "ok" writes."""
    real_write = os.write
    steps = deque(script)

    def write(fd, data):
        try:
            is_log = os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            is_log = False
        step = steps.popleft() if is_log and steps else "ok"
        if step == "half":
            return real_write(fd, data[: max(1, len(data) // 2)])
        if step == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(usagelog.os, "write", write)
    return steps


@pytest.mark.parametrize("script", [
    ["half", "enospc", "enospc", "half"],
    ["enospc"],
    ["ok", "half", "ok", "half", "half"],
])
def test_disk_full_never_leaves_a_torn_line(tmp_path, monkeypatch, caplog, script):
    p = tmp_path / "usage.jsonl"
    p.write_bytes(encode(rec(-1)))
    steps = _fake_disk(monkeypatch, p, script)
    # gather=0: a write per wake-up, so the script's failures land between records.
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.02, gather=0)
    for i in range(200):
        w.write(rec(i, pad="z" * (i % 7)))
        if i % 40 == 0:
            time.sleep(0.01)
    wait_for(lambda: not steps)
    w.close()
    assert ids_in([p]) == ["req_-0000001"] + [f"req_{i:08d}" for i in range(200)]
    assert "cannot write usage log" in caplog.text


def test_disk_full_between_single_records(tmp_path, monkeypatch):
    p = tmp_path / "usage.jsonl"
    p.write_bytes(b"")
    _fake_disk(monkeypatch, p, ["ok", "half", "enospc", "ok", "half"])
    w = UsageWriter(p, 10_000_000, 3, retry_interval=0.02, gather=0)
    for i in range(100):
        w.write(rec(i))
        time.sleep(0.001)
    w.close()
    assert ids_in([p]) == [f"req_{i:08d}" for i in range(100)]


def test_lines_arriving_together_share_one_write(tmp_path, monkeypatch):
    """Under load the writer gathers what arrives within `gather` seconds into one
    write(); each line still reaches the file within about that time."""
    p = tmp_path / "usage.jsonl"
    sizes = []
    real_write = os.write

    def write(fd, data):
        sizes.append(data.count(b"\n"))
        return real_write(fd, data)

    monkeypatch.setattr(usagelog.os, "write", write)
    w = UsageWriter(p, 10_000_000, 3, gather=0.05)
    for i in range(50):
        w.write(rec(i))
    wait_for(lambda: len(lines_of(p)) == 50, timeout=2.0)
    t0 = time.monotonic()
    w.write(rec(50))
    wait_for(lambda: len(lines_of(p)) == 51, timeout=2.0)
    waited = time.monotonic() - t0
    w.close()
    assert ids_in([p]) == [f"req_{i:08d}" for i in range(51)]
    assert sizes[0] == 50 and sizes[1:] == [1]
    assert 0.04 <= waited < 1.0


@pytest.mark.parametrize("text", ["\x7f", "\x85", "\x9b[2J", "\u2028", "\u2029", "\u202e",
                                  "\u2066x\u2069", "\u200f", "\u061c"])
def test_characters_unsafe_in_a_terminal_are_escaped_in_the_line(text):
    """A client chooses the model name; the line is read with tail -f in a terminal and
    split at line ends: C1 controls, DEL, line separators and bidi controls are escaped."""
    record = {"model": f"llama{text}3", "path": "/api/chat"}
    line = encode(record)
    assert line.isascii() and line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == record


def test_other_unicode_is_written_as_it_is():
    record = {"model": "qwen\u00e9\u4e2d\u6587"}
    assert encode(record) == json.dumps(record, ensure_ascii=False,
                                        separators=(",", ":")).encode() + b"\n"


def test_del_is_escaped_though_it_is_ascii():
    line = encode({"model": "llama\x7f3"})
    assert b"\x7f" not in line and json.loads(line) == {"model": "llama\x7f3"}
