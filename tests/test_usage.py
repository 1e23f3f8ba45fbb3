"""Unit tests of the Recorder addon's pure parts: timestamps, request ids, and the record."""

from __future__ import annotations

import datetime as dt
import re
import time

from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from helpers.unit import with_state
from keygate.accounting.log import encode
from keygate.request import state_of
from keygate.stages.recorder import (
    MAX_CLIENT_IP,
    MAX_METHOD,
    MAX_MODEL,
    MAX_PATH,
    bounded,
    build_record,
    iso_ms,
    new_request_id,
    request_id,
)


def reference(ts: float) -> str:
    t = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@settings(max_examples=2000)
@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))  # 1970..2100
@example(1764201746.9999995)  # rounds up into the next second
@example(1764201746.0000005)
@example(1764201746.9995)
@example(0.0)
def test_iso_ms_agrees_with_datetime(ts):
    assert iso_ms(ts) == reference(ts)


def test_iso_ms_within_one_second_and_across_seconds():
    base = 1764201746.0
    got = [iso_ms(base + i / 1000) for i in range(0, 2500, 7)]
    assert got == [reference(base + i / 1000) for i in range(0, 2500, 7)]
    assert iso_ms(base + 0.123) == "2025-11-27T00:02:26.123Z"


def test_request_ids_are_distinct_and_shaped_like_20_hex_digits():
    ids = [new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"req_[0-9a-f]{20}", i) for i in ids)


def test_a_flow_keeps_the_request_id_it_was_first_given():
    f = tflow.tflow()
    first = request_id(f)
    assert re.fullmatch(r"req_[0-9a-f]{20}", first)
    assert request_id(f) == first == state_of(f).id
    state_of(f).id = "req_set_elsewhere"
    assert request_id(f) == "req_set_elsewhere"


# --------------------------------------------------------------------------- the record


def test_bounded_cuts_long_strings_and_marks_the_cut():
    assert bounded("abc", 3) == "abc"
    assert bounded("abcdef", 3) == "abc...[3 chars cut]"
    assert bounded("é" * 600_000, 4) == "éééé...[599996 chars cut]"
    assert bounded(None, 3) is None and bounded(12345, 1) == 12345


def record_with(path: str, method: bytes = b"POST", model: str | None = "m",
                client_ip: str = "127.0.0.1") -> dict:
    f = tflow.tflow(resp=True)
    f.request.data.method = method
    with_state(f, id="req_x", path=path, model=model,
                       upstream_model=model, client_ip=client_ip)
    return build_record(f, time.time())


def test_a_line_stays_small_whatever_a_client_sends():
    """A usage line held the path in full: eight 600 KB paths rotated a 1 MB log
    (docs/usage-log.md)."""
    rec = record_with("/" + "a" * 600_000, b"X" * 70_000, "m" * 600_000, "f" * 1000)
    assert rec["path"] == "/" + "a" * (MAX_PATH - 1) + "...[599489 chars cut]"
    assert rec["method"] == "X" * MAX_METHOD + f"...[{70_000 - MAX_METHOD} chars cut]"
    assert rec["model"] == rec["upstream_model"] == "m" * MAX_MODEL + "...[599744 chars cut]"
    assert rec["client_ip"].startswith("f" * MAX_CLIENT_IP + "...[")
    assert len(encode(rec)) < 2048
    # The worst a character can do: JSON escapes a control character in 6 bytes.
    worst = record_with("\x01" * 10_000, b"\x01" * 10_000, "\x01" * 10_000, "\x01" * 10_000)
    assert len(encode(worst)) < 8192


def test_usual_values_are_kept_as_they_came():
    path = "/api/blobs/sha256:" + "0" * 64
    model = "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M"
    rec = record_with(path, b"post", model, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
    assert (rec["path"], rec["method"], rec["model"], rec["client_ip"]) == (
        path, "post", model, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")


def test_every_line_says_whether_its_tokens_are_estimated():
    assert record_with("/api/chat")["tokens_estimated"] is False
    f = tflow.tflow(resp=True)
    with_state(f, tokens_estimated=True, completion_tokens=7,
                       total_tokens=7)
    rec = build_record(f, time.time())
    assert (rec["tokens_estimated"], rec["completion_tokens"], rec["total_tokens"]) == (
        True, 7, 7)
