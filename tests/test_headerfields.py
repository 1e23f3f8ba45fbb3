"""keygate/stages/headerfields.py: header edits on raw fields agree with mitmproxy's Headers API."""

from __future__ import annotations

import gzip

import pytest
from mitmproxy import http

from keygate.stages.headerfields import decoded_body, get_field, has_field, set_fields


def response(*fields: tuple[bytes, bytes], body: bytes = b"") -> http.Response:
    r = http.Response.make(200, body)
    r.headers.fields = tuple(fields)
    return r


def test_has_field_ignores_case_of_the_header_name():
    r = response((b"Content-Type", b"application/json"), (b"X-A", b"1"))
    assert has_field(r.headers, b"content-type")
    assert has_field(r.headers, b"x-a")
    assert not has_field(r.headers, b"content-encoding")
    assert not has_field(response().headers, b"x-a")


def test_get_field_gives_the_first_value_decoded_as_headers_does():
    r = response((b"X-A", b"one"), (b"x-a", b"two"), (b"X-B", b"caf\xc3\xa9\xff"))
    assert get_field(r.headers, b"x-a") == r.headers.get_all("x-a")[0] == "one"
    assert get_field(r.headers, b"x-b") == r.headers.get("x-b") == "café\udcff"
    assert get_field(r.headers, b"x-c") is None


def test_set_fields_appends_new_names_last_and_keeps_the_rest_in_order():
    r = response((b"Date", b"today"), (b"Content-Type", b"text/plain"))
    set_fields(r.headers, {"x-keygate-request-id": "req_1", "x-ratelimit-limit-requests": "60"})
    assert r.headers.fields == (
        (b"Date", b"today"),
        (b"Content-Type", b"text/plain"),
        (b"x-keygate-request-id", b"req_1"),
        (b"x-ratelimit-limit-requests", b"60"),
    )


@pytest.mark.parametrize("present", [b"x-ratelimit-limit-requests", b"X-RateLimit-Limit-Requests"])
def test_set_fields_replaces_every_field_of_a_name_it_sets(present):
    # An upstream's own rate-limit headers must not stand beside keygate's, in any case.
    r = response((present, b"1"), (b"Date", b"today"), (present, b"2"), (b"X-Other", b"x"))
    expected = http.Headers(r.headers.fields)
    expected["x-ratelimit-limit-requests"] = "60"

    set_fields(r.headers, {"x-ratelimit-limit-requests": "60"})

    assert r.headers.fields == (
        (b"Date", b"today"),
        (b"X-Other", b"x"),
        (b"x-ratelimit-limit-requests", b"60"),
    )
    assert r.headers.get_all("x-ratelimit-limit-requests") == ["60"]
    assert {k.lower(): v for k, v in r.headers.items()} == {
        k.lower(): v for k, v in expected.items()}


def test_set_fields_with_nothing_to_set_changes_nothing():
    r = response((b"Date", b"today"))
    set_fields(r.headers, {})
    assert r.headers.fields == ((b"Date", b"today"),)


def test_decoded_body_reads_raw_without_content_encoding_and_decodes_with_it():
    plain = response((b"Content-Type", b"application/json"), body=b'{"a": 1}')
    assert decoded_body(plain) == b'{"a": 1}'

    packed = response((b"Content-Encoding", b"gzip"), body=gzip.compress(b'{"a": 1}'))
    assert decoded_body(packed) == b'{"a": 1}'

    broken = response((b"Content-Encoding", b"gzip"), body=b"not gzip")
    assert decoded_body(broken) == broken.get_content(strict=False)
