"""Unit tests of the Usage addon's pure parts: timestamps and request ids."""

from __future__ import annotations

import datetime as dt
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from keygate.usage import iso_ms, new_request_id, request_id


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
    assert request_id(f) == first == f.metadata["keygate.id"]
    f.metadata["keygate.id"] = "req_set_elsewhere"
    assert request_id(f) == "req_set_elsewhere"
