"""keygate/edge/http1.py: the checks keygate makes on a request head before mitmproxy parses it,
and the answers it sends where mitmproxy would send its own page."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keygate.edge import http1 as wire
from keygate.edge.redact import MAX_MESSAGE, redact

HEAD = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def test_a_clean_head_has_no_problem():
    assert wire.head_problem(HEAD, 0, 1024) is None
    assert wire.head_problem(b"GET / HTTP/1.1\nHost: x\n\n", 0, 1024) is None  # bare LFs


def test_an_incomplete_head_is_fine_until_it_passes_the_limit():
    part = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 900
    assert wire.head_problem(part, 0, 1024) is None
    status, why = wire.head_problem(part + b"a" * 200, 0, 1024)
    assert status == 431 and "1024" in why


def test_a_complete_head_over_the_limit_is_431_even_with_its_body_buffered():
    head = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    assert wire.head_problem(head, 0, 1024)[0] == 431
    # Within the limit, bytes of the body after the head do not count.
    assert wire.head_problem(HEAD + b"x" * 5000, 0, 1024) is None


@pytest.mark.parametrize("line", [b" Transfer-Encoding: chunked", b"\tX: y"])
def test_a_folded_line_is_400(line):
    head = b"GET / HTTP/1.1\r\nX-Foo: a\r\n" + line + b"\r\n\r\n"
    status, why = wire.head_problem(head, 0, 65536)
    assert status == 400 and "fold" in why


@pytest.mark.parametrize("byte", [bytes([b]) for b in (*range(0, 9), *range(11, 32), 127)
                                  if b != 10])
def test_a_control_byte_in_a_header_line_is_400(byte):
    head = b"GET / HTTP/1.1\r\nX-Foo: a" + byte + b"b\r\n\r\n"
    assert wire.head_problem(head, 0, 65536)[0] == 400


def test_tab_and_high_bytes_are_allowed_in_a_value():
    head = b"GET / HTTP/1.1\r\nX-Foo: a\tb \xc3\xa9\xff\r\n\r\n"
    assert wire.head_problem(head, 0, 65536) is None


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_the_search_may_resume_where_it_stopped(data, start):
    """Searching from where an earlier search stopped finds what a full search finds, as
    long as the earlier search saw no end there (h11 resumes the same way)."""
    full = wire.head_problem(data, 0, 10_000)
    end = data.find(b"\n\n")
    end2 = data.find(b"\n\r\n")
    first = min([e for e in (end, end2) if e >= 0], default=None)
    if first is None or start <= first:
        assert wire.head_problem(data, start, 10_000) == full


@pytest.mark.parametrize("path, shape", [
    ("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"), ("/api/chat", "plain"),
    ("", "plain")])
def test_error_response_has_keygates_shape_and_no_server_header(path, shape):
    raw = wire.error_response(431, path, request_id="req_1")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    headers = dict(x.split(": ", 1) for x in lines[1:])
    assert headers["x-keygate-error"] == "headers_too_large"
    assert headers["x-keygate-request-id"] == "req_1"
    assert headers["connection"] == "close" and "server" not in {k.lower() for k in headers}
    assert int(headers["content-length"]) == len(body)
    doc = json.loads(body)
    if shape == "openai":
        assert doc["error"]["code"] == "headers_too_large"
    elif shape == "anthropic":
        assert doc["type"] == "error"
    else:
        assert isinstance(doc["error"], str)


def test_mitmproxys_message_is_never_used():
    raw = wire._replacement_error_response(400, "Invalid header line: b'Authorization sk-x'")
    assert b"sk-x" not in raw and b"mitmproxy" not in raw and b"<html" not in raw


@pytest.mark.parametrize("status, code", [(400, "invalid_request"), (413, "request_too_large"),
                                          (502, "upstream_error"), (504, "upstream_timeout"),
                                          (418, "upstream_error")])
def test_code_of(status, code):
    assert wire.code_of(status)[1] == code


def test_request_line():
    assert wire._request_line(b"GET /api/tags?x=1 HTTP/1.1\r\nHost") == ("GET", "/api/tags")
    assert wire._request_line(b"GET http://h:1/v1/models HTTP/1.1\r\n") == ("GET", "/v1/models")
    assert wire._request_line(b"\x16\x03\x01garbage") == ("", "")


def test_redaction_does_bounded_work_and_never_shows_request_bytes():
    secret = "sk-" + "z" * 40
    for msg in (f"Invalid header line: b'Authorization {secret}'",
                f"x: b'{'a' * 10_000_000}{secret}'",
                f"x: b\"{'q' * 5000} {secret}",  # a literal cut open by the bound
                f"x: b'{secret}"):  # one never closed
        out = redact(msg)
        assert secret not in out and len(out) < MAX_MESSAGE + 100


def test_blank_lines_before_a_request_count_against_the_limit():
    """h11 drops one leading blank line per received chunk and parses nothing: a stream of
    CR LF grew mitmdump by hundreds of MB without a 431."""
    assert wire.head_problem(b"\r\n" * 100, 0, 1024) is None
    assert wire.head_problem(b"\r\n" * 1000, 0, 1024)[0] == 431
    assert wire.head_problem(b"\n" * 2000, 0, 1024)[0] == 431
    assert wire.head_problem(b"\r\n" + HEAD, 0, 1024) is None


def test_a_head_of_many_tiny_lines_is_checked_whole():
    head = b"GET / HTTP/1.1\r\n" + b"a:\r\n" * 16_000 + b"\r\n"
    assert wire.head_problem(head, 0, 100_000) is None
    assert wire.head_problem(head.replace(b"a:\r\n", b"a:\x01\r\n", 1), 0, 100_000)[0] == 400


# -- the upstream edge (keygate/edge/upstream.py) and the request id on edge answers --------

def test_error_parts_is_what_error_response_sends():
    status, code, body = wire.error_parts(504, "/v1/messages?x=1")
    assert (status, code) == (504, "upstream_timeout")
    assert json.loads(body) == {"type": "error", "error": {
        "type": "api_error", "message": "The upstream did not answer in time."}}
    raw = wire.error_response(504, "/v1/messages", request_id="req_1")
    assert raw.endswith(body) and b"x-keygate-request-id: req_1\r\n" in raw


def test_request_id_of_a_flow():
    from mitmproxy.test import tflow

    from keygate.request import state_of

    f = tflow.tflow()
    assert wire.request_id_of(f) is None and wire.request_id_of(None) is None
    state_of(f).id = "req_abc"
    assert wire.request_id_of(f) == "req_abc"


def _stream(**kw):
    """A stand-in for mitmproxy's HttpStream with what `answerable` reads."""
    from types import SimpleNamespace

    from mitmproxy.connection import ConnectionState
    from mitmproxy.test import tflow

    from keygate.request import state_of

    f = tflow.tflow()
    f.live = True
    state_of(f).admitted = True
    s = SimpleNamespace(flow=f, state_done="done", state_wait_for_response_headers="wait",
                        state_consume_response_body="consume", client_state="done",
                        server_state="wait",
                        context=SimpleNamespace(client=SimpleNamespace(
                            state=ConnectionState.OPEN)))
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_answerable_only_while_nothing_went_to_the_client():
    from mitmproxy.connection import ConnectionState
    from mitmproxy.flow import Error

    from keygate.edge.upstream import answerable
    from keygate.request import state_of

    assert answerable(_stream())
    assert answerable(_stream(server_state="consume"))  # an answer's body, not sent yet
    assert not answerable(_stream(server_state="stream"))  # a stream's head went out
    assert not answerable(_stream(client_state="stream"))  # still uploading (a blob)
    s = _stream()
    s.flow.request.stream = True
    assert not answerable(s)
    s = _stream()
    s.flow.error = Error("client disconnected")
    assert not answerable(s)
    s = _stream()
    s.context.client.state = ConnectionState.CAN_READ  # the client can no longer be written to
    assert not answerable(s)
    s = _stream()
    state_of(s.flow).admitted = False  # never keygate's to send on
    assert not answerable(s)
