"""keygate/stages/metering.py: token counts from responses, streamed or not, and the edits keygate
makes to what comes back (docs/configuration.md, docs/endpoints.md, docs/usage-log.md)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons

import keygate.stages.metering as metering
from helpers.unit import make_config, make_flow, with_state
from keygate.request import state_of
from keygate.stages.metering import Meter, StreamMeter, TokenCounts


def dumps(doc) -> bytes:
    # The compact form Ollama and OpenAI-compatible servers write.
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def ndjson(*docs) -> bytes:
    return b"".join(dumps(d) + b"\n" for d in docs)


def sse(*events, sep: bytes = b"\n") -> bytes:
    """events: dicts (data only), (event name, dict) pairs, or raw data strings."""
    out = b""
    for e in events:
        if isinstance(e, tuple):
            name, doc = e
            out += b"event: " + name.encode() + sep
        else:
            doc = e
        data = doc.encode() if isinstance(doc, str) else dumps(doc)
        out += b"data: " + data + sep + sep
    return out


def feed(meter: StreamMeter, chunks) -> bytes:
    """Call the meter as mitmproxy does: once per chunk, then once with b"" at the end."""
    chunks = [c for c in chunks if c]
    out = []
    for i, c in enumerate(chunks + [b""]):
        r = meter(c)
        final = i == len(chunks)
        if isinstance(r, list):
            # b"" sent mid-stream would end a chunked response early.
            assert all(isinstance(x, bytes) and x for x in r), r
            out.extend(r)
        else:
            assert isinstance(r, bytes)
            assert r or final, "b'' returned for a chunk before the end"
            out.append(r)
    return b"".join(out)


def cut(data: bytes, points) -> list[bytes]:
    points = sorted(set(p for p in points if 0 < p < len(data)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# --------------------------------------------------------------------------- streams

T = "2026-01-01T00:00:00.000000Z"


def native_chat(model="llama3.2:1b", prompt=26, completion=298) -> bytes:
    return ndjson(
        {"model": model, "created_at": T, "message": {"role": "assistant", "content": "Hel"},
         "done": False},
        {"model": model, "created_at": T, "message": {"role": "assistant", "content": "lo é ✓"},
         "done": False},
        {"model": model, "created_at": T, "message": {"role": "assistant", "content": ""},
         "done_reason": "stop", "done": True, "total_duration": 123456, "load_duration": 1,
         "prompt_eval_count": prompt, "prompt_eval_duration": 2, "eval_count": completion,
         "eval_duration": 3},
    )


def native_generate(model="llama3.2:1b") -> bytes:
    return ndjson(
        {"model": model, "created_at": T, "response": "The", "done": False},
        {"model": model, "created_at": T, "response": " sky", "done": False},
        {"model": model, "created_at": T, "response": "", "done": True, "done_reason": "stop",
         "context": [1, 2, 3], "prompt_eval_count": 11, "eval_count": 2},
    )


def native_pull() -> bytes:
    return ndjson({"status": "pulling manifest"},
                  {"status": "pulling abc", "digest": "sha256:abc", "total": 10, "completed": 5},
                  {"status": "verifying sha256 digest"}, {"status": "success"})


def chunk(model="qwen2.5:7b", content="Hi", finish=None, usage=dataclasses.MISSING, choices=True):
    doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
           "model": model, "system_fingerprint": "fp_ollama",
           "choices": [{"index": 0, "delta": {"role": "assistant", "content": content},
                        "finish_reason": finish}] if choices else []}
    if usage is not dataclasses.MISSING:
        doc["usage"] = usage
    return doc


USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}


def openai_chat(model="qwen2.5:7b", with_usage=True, sep=b"\n") -> bytes:
    events = [chunk(model, "Hi"), chunk(model, " there"), chunk(model, "", "stop")]
    if with_usage:
        events.append(chunk(model, usage=USAGE, choices=False))
    return sse(*events, "[DONE]", sep=sep)


def openai_chat_usage_everywhere(model="qwen2.5:7b") -> bytes:
    # Some servers put "usage" (null, or running totals) into every chunk.
    return sse(chunk(model, "Hi", usage=None),
               chunk(model, " there", usage={"prompt_tokens": 10, "completion_tokens": 1,
                                             "total_tokens": 11}),
               chunk(model, "", "stop", usage=None),
               chunk(model, usage=USAGE, choices=False), "[DONE]")


def responses_stream(model="qwen2.5:7b") -> bytes:
    resp = {"id": "resp_1", "object": "response", "model": model, "status": "in_progress",
            "usage": None}
    done = {**resp, "status": "completed",
            "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}}
    return sse(
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": resp}),
        ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1,
                                  "response": resp}),
        ("response.output_text.delta", {"type": "response.output_text.delta",
                                        "sequence_number": 2, "item_id": "msg_1",
                                        "output_index": 0, "content_index": 0, "delta": "Hi"}),
        ("response.completed", {"type": "response.completed", "sequence_number": 3,
                                "response": done}),
    )


def messages_stream(model="llama3.2:1b") -> bytes:
    return sse(
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    )


# name -> (api, sse, alias, strip_usage, stream in, expected out, expected tally)
SCENARIOS = {
    "native chat": ("ollama", False, None, False, native_chat(), native_chat(),
                    TokenCounts(26, 298, None, True, False, 2)),
    "native generate": ("ollama", False, None, False, native_generate(), native_generate(),
                        TokenCounts(11, 2, None, True, False, 2)),
    "native pull": ("ollama", False, None, False, native_pull(), native_pull(),
                    TokenCounts(0, 0, None, True, False, 3)),
    "native alias": ("ollama", False, ("qwen2.5:7b", "gpt-4o-mini"), False,
                     native_chat("qwen2.5:7b"), native_chat("gpt-4o-mini"),
                     TokenCounts(26, 298, None, True, False, 2)),
    "openai as sent": ("openai", True, None, False, openai_chat(), openai_chat(),
                       TokenCounts(10, 2, 12, True, False, 3)),
    "openai crlf": ("openai", True, None, False, openai_chat(sep=b"\r\n"),
                    openai_chat(sep=b"\r\n"), TokenCounts(10, 2, 12, True, False, 3)),
    "openai strip usage": ("openai", True, None, True, openai_chat(),
                           openai_chat(with_usage=False), TokenCounts(10, 2, 12, True, False, 3)),
    "openai strip usage crlf": ("openai", True, None, True, openai_chat(sep=b"\r\n"),
                                openai_chat(with_usage=False, sep=b"\r\n"),
                                TokenCounts(10, 2, 12, True, False, 3)),
    "openai strip usage everywhere": (
        "openai", True, None, True, openai_chat_usage_everywhere(),
        openai_chat(with_usage=False), TokenCounts(10, 2, 12, True, False, 3)),
    "openai alias": ("openai", True, ("qwen2.5:7b", "gpt-4o-mini"), False, openai_chat(),
                     openai_chat("gpt-4o-mini"), TokenCounts(10, 2, 12, True, False, 3)),
    "openai alias and strip": ("openai", True, ("qwen2.5:7b", "gpt-4o-mini"), True,
                               openai_chat(), openai_chat("gpt-4o-mini", with_usage=False),
                               TokenCounts(10, 2, 12, True, False, 3)),
    "responses": ("responses", True, None, False, responses_stream(), responses_stream(),
                  TokenCounts(9, 3, 12, True, False, 1)),
    "responses alias": ("responses", True, ("qwen2.5:7b", "gpt-4o-mini"), False,
                        responses_stream(), responses_stream("gpt-4o-mini"),
                        TokenCounts(9, 3, 12, True, False, 1)),
    "messages": ("anthropic", True, None, False, messages_stream(), messages_stream(),
                 TokenCounts(25, 15, None, True, False, 1)),
    "messages alias": ("anthropic", True, ("qwen2.5:7b", "claude-haiku"), False,
                       messages_stream("qwen2.5:7b"), messages_stream("claude-haiku"),
                       TokenCounts(25, 15, None, True, False, 1)),
}


def meter_for(name: str) -> tuple[StreamMeter, bytes, bytes, TokenCounts]:
    api, is_sse, alias, strip, stream, expected, tally = SCENARIOS[name]
    meter = StreamMeter(api, is_sse, TokenCounts(), alias=alias, strip_usage=strip)
    return meter, stream, expected, tally


@pytest.mark.parametrize("name", SCENARIOS)
def test_stream_fed_whole(name):
    meter, stream, expected, tally = meter_for(name)
    assert feed(meter, [stream]) == expected
    assert meter.tally == tally


@pytest.mark.parametrize("name", SCENARIOS)
def test_stream_split_at_every_byte_boundary(name):
    _, stream, expected, tally = meter_for(name)
    for i in range(1, len(stream)):
        meter, *_ = meter_for(name)
        assert feed(meter, [stream[:i], stream[i:]]) == expected, i
        assert meter.tally == tally, i


@pytest.mark.parametrize("name", SCENARIOS)
def test_stream_fed_byte_by_byte(name):
    meter, stream, expected, tally = meter_for(name)
    assert feed(meter, [stream[i:i + 1] for i in range(len(stream))]) == expected
    assert meter.tally == tally


@pytest.mark.parametrize("name", SCENARIOS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_chunking_gives_the_same_bytes_and_counts(name, data):
    meter, stream, expected, tally = meter_for(name)
    points = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=40))
    assert feed(meter, cut(stream, points)) == expected
    assert meter.tally == tally


def test_unedited_streams_pass_chunks_on_at_once():
    # Nothing to change: each chunk leaves as it came, incomplete lines included.
    meter = StreamMeter("ollama", False, TokenCounts())
    data = native_chat()
    for piece in cut(data, range(7, len(data), 13)):
        assert meter(piece) == piece
    assert meter(b"") == b""


def test_edited_streams_hold_only_an_incomplete_frame():
    meter = StreamMeter("ollama", False, TokenCounts(), alias=("qwen2.5:7b", "gpt-4o-mini"))
    line1, line2 = native_chat("qwen2.5:7b").splitlines(keepends=True)[:2]
    assert meter(line1[:10]) == []
    assert b"".join(meter(line1[10:] + line2[:5])) == line1.replace(b"qwen2.5:7b", b"gpt-4o-mini")


def test_unmarked_frames_leave_whole_while_usage_is_taken_out():
    # Stripping usage edits only the frame that carries it: the frames before it leave as
    # soon as they are complete, and only an unfinished one is held back, since its rest
    # could still bring "usage".
    data = openai_chat()
    frames = data.split(b"\n\n")  # three content frames, the usage frame, [DONE], b""
    first_two = frames[0] + b"\n\n" + frames[1] + b"\n\n"
    meter = StreamMeter("openai", True, TokenCounts(), strip_usage=True)

    def sent(chunk: bytes) -> bytes:
        r = meter(chunk)
        return b"".join(r) if isinstance(r, list) else r

    k = frames[3].index(b'"usage"') + 3  # the usage frame, cut inside its marker

    assert sent(first_two + frames[2][:9]) == first_two
    assert sent(frames[2][9:] + b"\n\n" + frames[3][:k]) == frames[2] + b"\n\n"
    assert sent(frames[3][k:] + b"\n\n" + frames[4] + b"\n\n") == frames[4] + b"\n\n"
    assert sent(b"") == b""
    assert meter.tally == TokenCounts(10, 2, 12, True, False, 3)


def test_stream_without_a_final_newline():
    data = native_chat("qwen2.5:7b").rstrip(b"\n")
    meter = StreamMeter("ollama", False, TokenCounts(), alias=("qwen2.5:7b", "gpt-4o-mini"))
    assert feed(meter, [data]) == native_chat("gpt-4o-mini").rstrip(b"\n")
    assert meter.tally.finished and meter.tally.completion_tokens == 298


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")])
def test_native_final_chunk_read_as_json_not_as_bytes(separators):
    # JSON whitespace is insignificant; an Ollama-compatible server may write it.
    lines = [json.dumps(d, separators=separators).encode() + b"\n"
             for d in map(json.loads, native_chat().splitlines())]
    meter = StreamMeter("ollama", False, TokenCounts())
    assert feed(meter, lines) == b"".join(lines)
    assert (meter.tally.prompt_tokens, meter.tally.completion_tokens) == (26, 298)
    assert meter.tally.finished


def test_embed_counts_prompt_eval_count_only():
    t = TokenCounts()
    metering.read_usage("ollama", {"model": "m", "embeddings": [[0.1]], "prompt_eval_count": 7}, t)
    assert (t.prompt_tokens, t.completion_tokens) == (7, 0)


@pytest.mark.parametrize("value, counted", [(5, 5), (0, 0), (-3, 0), (True, 0), ("5", 0),
                                            (None, 0), (2.5, 0)])
def test_only_positive_integers_count(value, counted):
    t = TokenCounts()
    metering.read_usage("openai", {"usage": {"prompt_tokens": value, "completion_tokens": 1}}, t)
    assert t.prompt_tokens == counted


# --------------------------------------------------------------------------- upstream errors


@pytest.mark.parametrize("api, is_sse, stream", [
    ("ollama", False, ndjson({"model": "m", "created_at": T, "response": "a", "done": False},
                             {"error": "an error was encountered while running the model"})),
    ("ollama", False, ndjson({"status": "pulling manifest"},
                             {"error": "pull model manifest: file does not exist"})),
    ("openai", True, sse(chunk(content="a"), {"error": {"message": "boom", "type": "api_error"}})),
    ("openai", True, sse(chunk(content="a"), ("error", {"error": {"message": "boom"}}))),
    ("responses", True, sse(("response.failed", {"type": "response.failed", "response": {
        "id": "r", "status": "failed", "error": {"code": "server_error", "message": "x"}}}))),
    ("responses", True, sse(("error", {"type": "error", "code": "server_error",
                                       "message": "x"}))),
    ("anthropic", True, sse(("message_start", {"type": "message_start", "message": {
        "id": "m", "model": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
        ("error", {"type": "error", "error": {"type": "overloaded_error",
                                              "message": "Overloaded"}}))),
])
@pytest.mark.parametrize("edits", [False, True])
def test_error_line_or_event_marks_upstream_error(api, is_sse, stream, edits):
    meter = StreamMeter(api, is_sse, TokenCounts(), alias=("nobody", "x") if edits else None)
    assert feed(meter, cut(stream, range(9, len(stream), 17))) == stream
    assert meter.tally.upstream_error is True


def test_no_error_in_a_good_stream():
    for name in SCENARIOS:
        meter, stream, _, _ = meter_for(name)
        feed(meter, [stream])
        assert meter.tally.upstream_error is False, name


def test_error_text_inside_content_is_not_an_error():
    stream = ndjson({"model": "m", "created_at": T, "message": {"role": "assistant",
                     "content": '{"error": "x"}'}, "done": False},
                    {"model": "m", "created_at": T, "done": True, "prompt_eval_count": 1,
                     "eval_count": 1})
    meter = StreamMeter("ollama", False, TokenCounts())
    feed(meter, [stream])
    assert meter.tally.upstream_error is False and meter.tally.finished


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("api, is_sse, stream", [
    ("ollama", False, ndjson({"model": "m", "done": False}) + b'{"done":true, oops\n'
     + ndjson({"model": "m", "done": False})),
    ("openai", True, sse(chunk()) + b'data: {"usage": nope\n\n' + sse(chunk(), "[DONE]")),
    ("anthropic", True, sse(("message_start", {"type": "message_start"}))
     + b"event: message_delta\ndata: {not json\n\n" + sse(("message_stop", {}))),
])
@pytest.mark.parametrize("alias, strip", [(None, False), (("nobody", "x"), False),
                                          (None, True), (("nobody", "x"), True)])
def test_malformed_data_flows_on_unchanged(api, is_sse, stream, alias, strip):
    # Nothing here needs an edit, so whatever the chunking, the client gets what was sent.
    for step in (1, 2, 5, 11, 64, len(stream)):
        meter = StreamMeter(api, is_sse, TokenCounts(), alias=alias, strip_usage=strip)
        assert feed(meter, cut(stream, range(step, len(stream), step))) == stream, step


@pytest.mark.parametrize("alias", [None, ("nobody", "x")])
def test_an_exception_inside_never_propagates(monkeypatch, alias):
    def explode(*args, **kwargs):
        raise RuntimeError("bug in the meter")

    monkeypatch.setattr(metering, "read_usage", explode)
    stream = native_chat()
    for step in (1, 3, 40, len(stream)):
        meter = StreamMeter("ollama", False, TokenCounts(), alias=alias)
        assert feed(meter, cut(stream, range(step, len(stream), step))) == stream, step


@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.integers(1, 400), max_size=30))
def test_any_chunking_of_a_broken_stream_loses_nothing(points):
    stream = ndjson({"model": "m", "n": 1}) + b'{"model": oops\n' + native_chat()
    meter = StreamMeter("ollama", False, TokenCounts(), alias=("nobody", "x"))
    assert feed(meter, cut(stream, points)) == stream


# --------------------------------------------------------------------------- the Meter addon


def admitted_flow(method, path, *, model=None, upstream_model=None, key="alice",
                  status=200, ctype="application/json", body=b""):
    f = make_flow(method, path)
    with_state(f, admitted=True, key=key, path=path)
    if model:
        state_of(f).model = model
        state_of(f).upstream_model = upstream_model or model
    f.response = http.Response.make(status, body, {"content-type": ctype})
    return f


def test_streamed_response_gets_a_stream_meter_and_publishes_counts():
    config = make_config()
    meter = Meter(config)
    f = admitted_flow("POST", "/api/chat", model="llama3.2:1b",
                      ctype="application/x-ndjson")
    with taddons.context():
        meter.responseheaders(f)
        assert isinstance(f.response.stream, StreamMeter)
        assert state_of(f).stream is True
        assert feed(f.response.stream, [native_chat()]) == native_chat()
        meter.response(f)
    md = state_of(f)
    assert (md.prompt_tokens, md.completion_tokens,
            md.total_tokens, md.finished) == (26, 298, 324, True)
    assert not md.error


def test_streamed_sse_with_strip_usage():
    config = make_config()
    meter = Meter(config)
    f = admitted_flow("POST", "/v1/chat/completions", model="llama3.2:1b",
                      ctype="text/event-stream; charset=utf-8")
    state_of(f).strip_usage = True
    with taddons.context():
        meter.responseheaders(f)
        assert feed(f.response.stream, [openai_chat()]) == openai_chat(with_usage=False)
        meter.response(f)
    assert state_of(f).total_tokens == 12


def test_stream_that_breaks_publishes_from_the_error_hook():
    config = make_config()
    meter = Meter(config)
    f = admitted_flow("POST", "/api/generate", model="m", ctype="application/x-ndjson")
    with taddons.context():
        meter.responseheaders(f)
        f.response.stream(ndjson({"model": "m", "error": None, "response": "a", "done": False}))
        meter.error(f)
    assert state_of(f).finished is False
    # The counts never came; the one content line that went out counts (docs/usage-log.md).
    assert state_of(f).total_tokens == 1
    assert state_of(f).tokens_estimated is True


def test_upstream_error_line_is_published():
    config = make_config()
    meter = Meter(config)
    f = admitted_flow("POST", "/api/chat", model="m", ctype="application/x-ndjson")
    with taddons.context():
        meter.responseheaders(f)
        feed(f.response.stream, [ndjson({"error": "model crashed"})])
        meter.response(f)
    assert state_of(f).error == "upstream_error"


@pytest.mark.parametrize("path, body, tokens", [
    ("/api/chat", {"model": "m", "message": {}, "done": True, "prompt_eval_count": 4,
                   "eval_count": 6}, (4, 6, 10)),
    ("/api/embed", {"model": "m", "embeddings": [[0.0]], "prompt_eval_count": 8}, (8, 0, 8)),
    ("/v1/chat/completions", {"model": "m", "choices": [],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                        "total_tokens": 7}}, (3, 4, 7)),
    ("/v1/embeddings", {"data": [], "model": "m",
                        "usage": {"prompt_tokens": 5, "total_tokens": 5}}, (5, 0, 5)),
    ("/v1/responses", {"model": "m", "usage": {"input_tokens": 2, "output_tokens": 9,
                                               "total_tokens": 11}}, (2, 9, 11)),
    ("/v1/messages", {"model": "m", "usage": {"input_tokens": 12, "output_tokens": 1}},
     (12, 1, 13)),
])
def test_non_streamed_counts(path, body, tokens):
    meter = Meter(make_config())
    f = admitted_flow("POST", path, model="m", body=dumps(body))
    with taddons.context():
        meter.responseheaders(f)
        assert not f.response.stream
        meter.response(f)
    md = state_of(f)
    assert (md.prompt_tokens, md.completion_tokens,
            md.total_tokens) == tokens
    assert md.stream is False and md.finished is True


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_non_streamed_counts_of_an_encoded_body(encoding):
    # An upstream may compress its answer; the counts are read from the decoded body.
    body = {"model": "m", "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    meter = Meter(make_config())
    f = admitted_flow("POST", "/v1/chat/completions", model="m")
    f.response.headers["content-encoding"] = encoding
    f.response.content = dumps(body)  # encoded as the header says
    assert f.response.raw_content != dumps(body)
    with taddons.context():
        meter.response(f)
    md = state_of(f)
    assert (md.prompt_tokens, md.completion_tokens,
            md.total_tokens) == (3, 4, 7)
    assert f.response.status_code == 200


def test_non_streamed_alias_is_turned_back():
    meter = Meter(make_config())
    body = {"id": "x", "object": "chat.completion", "model": "qwen2.5:7b", "choices": []}
    f = admitted_flow("POST", "/v1/chat/completions", model="gpt-4o-mini",
                      upstream_model="qwen2.5:7b", body=dumps(body))
    with taddons.context():
        meter.response(f)
    assert json.loads(f.response.content)["model"] == "gpt-4o-mini"


def test_upstream_error_bodies_pass_through_untouched():
    meter = Meter(make_config())
    raw = b'{"error": "model \\"qwen2.5:7b\\" not found, try pulling it first"}'
    f = admitted_flow("POST", "/api/chat", model="gpt-4o-mini", upstream_model="qwen2.5:7b",
                      status=404, body=raw)
    with taddons.context():
        meter.response(f)
    assert f.response.content == raw


def test_model_lists_show_only_usable_models():
    meter = Meter(make_config())
    tags = {"models": [{"name": n, "model": n} for n in
                       ("llama3.2:1b", "qwen2.5:7b", "llama3.2:3b", "gpt-oss:120b-cloud")]}
    f = admitted_flow("GET", "/api/tags", key="llama", body=dumps(tags))
    with taddons.context():
        meter.response(f)
    assert [m["name"] for m in json.loads(f.response.content)["models"]] == [
        "llama3.2:1b", "llama3.2:3b"]
    models = {"object": "list", "data": [{"id": n, "object": "model"} for n in
                                         ("llama3.2:1b", "qwen2.5:7b", "x-cloud")]}
    f = admitted_flow("GET", "/v1/models", key="alice", body=dumps(models))
    with taddons.context():
        meter.response(f)
    assert [m["id"] for m in json.loads(f.response.content)["data"]] == ["llama3.2:1b",
                                                                         "qwen2.5:7b"]


def test_running_models_show_only_usable_models():
    """/api/ps names loaded models with their digests and sizes: filtered like /api/tags."""
    meter = Meter(make_config())
    ps = {"models": [{"name": n, "model": n, "digest": "d" + n, "size": 1} for n in
                     ("qwen2.5:7b", "llama3.2:1b", "gpt-oss:120b-cloud")]}
    f = admitted_flow("GET", "/api/ps", key="llama", body=dumps(ps))
    with taddons.context():
        meter.response(f)
    assert json.loads(f.response.content) == {"models": [
        {"name": "llama3.2:1b", "model": "llama3.2:1b", "digest": "dllama3.2:1b", "size": 1}]}
    f = admitted_flow("GET", "/api/ps", key="alice", body=dumps(ps))
    with taddons.context():
        meter.response(f)
    assert [m["name"] for m in json.loads(f.response.content)["models"]] == [
        "qwen2.5:7b", "llama3.2:1b"]


def test_refused_flows_are_not_metered():
    meter = Meter(make_config())
    f = make_flow("POST", "/api/chat")
    f.response = http.Response.make(401, b"{}", {"content-type": "application/x-ndjson"})
    with taddons.context():
        meter.responseheaders(f)
        meter.response(f)
    assert not f.response.stream
    assert not state_of(f).prompt_tokens


# --------------------------------------------------------------------------- streams cut short
#
# A client that leaves before the upstream's counts still consumed what went out
# (docs/usage-log.md):
# the meter counts content frames, and publishes that count as an estimate.

# scenario -> (path, the bytes where the frame with the counts starts)
CUT_BEFORE_COUNTS = {
    "native chat": ("/api/chat", b'{"model":"llama3.2:1b","created_at":"' + T.encode()
                    + b'","message":{"role":"assistant","content":""},"done_reason"'),
    "native generate": ("/api/generate", b'{"model":"llama3.2:1b","created_at":"'
                        + T.encode() + b'","response":"","done":true'),
    "native alias": ("/api/chat", b'{"model":"qwen2.5:7b","created_at":"' + T.encode()
                     + b'","message":{"role":"assistant","content":""},"done_reason"'),
    "openai as sent": ("/v1/chat/completions", b'data: {"id":"chatcmpl-1"'
                       b',"object":"chat.completion.chunk","created":1,"model":"qwen2.5:7b",'
                       b'"system_fingerprint":"fp_ollama","choices":[]'),
    "openai strip usage everywhere": ("/v1/chat/completions", b'data: {"id":"chatcmpl-1"'
                                      b',"object":"chat.completion.chunk","created":1,'
                                      b'"model":"qwen2.5:7b","system_fingerprint":'
                                      b'"fp_ollama","choices":[]'),
    "openai alias": ("/v1/chat/completions", b'data: {"id":"chatcmpl-1"'
                     b',"object":"chat.completion.chunk","created":1,"model":"qwen2.5:7b",'
                     b'"system_fingerprint":"fp_ollama","choices":[]'),
    "responses": ("/v1/responses", b"event: response.completed"),
    "responses alias": ("/v1/responses", b"event: response.completed"),
    "messages": ("/v1/messages", b"event: content_block_stop"),
    "messages alias": ("/v1/messages", b"event: content_block_stop"),
}


def cut_before_counts(name: str) -> bytes:
    stream = SCENARIOS[name][4]
    at = stream.index(CUT_BEFORE_COUNTS[name][1])
    assert at > 0
    return stream[:at]


@pytest.mark.parametrize("name", CUT_BEFORE_COUNTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_stream_cut_before_its_counts_still_counts_its_content(name, data):
    api, is_sse, alias, strip, *_, full = SCENARIOS[name]
    path = CUT_BEFORE_COUNTS[name][0]
    delivered = cut_before_counts(name)
    points = data.draw(st.lists(st.integers(1, len(delivered) - 1), max_size=30))
    meter = Meter(make_config())
    f = admitted_flow("POST", path, model="m",
                      ctype="text/event-stream" if is_sse else "application/x-ndjson")
    with taddons.context():
        meter.responseheaders(f)
        stream = f.response.stream
        stream.alias, stream.strip_usage = alias, strip
        stream.edits = alias is not None or strip
        for chunk in cut(delivered, points):
            stream(chunk)  # then the client leaves: no b"" end call
        meter.error(f)
    md = state_of(f)
    # What the upstream said before the cut: Anthropic's message_start carries the input
    # tokens and a provisional output count; a running usage (on every chunk) its own.
    prompt, so_far = {"anthropic": (25, 1)}.get(api, (0, 0))
    if name == "openai strip usage everywhere":
        prompt, so_far = 10, 1
    assert md.finished is False
    assert md.completion_tokens == max(full.frames, so_far) >= 1
    assert md.tokens_estimated is (full.frames > so_far)
    assert (md.prompt_tokens, md.total_tokens) == (
        prompt, prompt + max(full.frames, so_far))


def test_more_content_than_anthropic_announced_is_estimated():
    meter = Meter(make_config())
    f = admitted_flow("POST", "/v1/messages", model="m", ctype="text/event-stream")
    head, delta = messages_stream().split(b"event: ping")[0], messages_stream().split(
        b"event: content_block_delta")[1].split(b"event: content_block_stop")[0]
    with taddons.context():
        meter.responseheaders(f)
        f.response.stream(head + (b"event: content_block_delta" + delta) * 7)
        meter.error(f)
    md = state_of(f)
    assert (md.prompt_tokens, md.completion_tokens,
            md.total_tokens, md.tokens_estimated) == (25, 7, 32, True)


@pytest.mark.parametrize("lines, frames", [
    (1, 1), (2, 2), (10, 10)])
def test_estimate_is_one_token_a_content_line(lines, frames):
    meter = Meter(make_config())
    f = admitted_flow("POST", "/api/chat", model="m", ctype="application/x-ndjson")
    body = ndjson(*[{"model": "m", "created_at": T, "message": {"role": "assistant",
                                                                "content": f"w{i} "},
                     "done": False} for i in range(lines)])
    with taddons.context():
        meter.responseheaders(f)
        f.response.stream(body)
        meter.response(f)  # the upstream ended without its final line
    md = state_of(f)
    assert (md.completion_tokens, md.total_tokens) == (frames, frames)
    assert md.tokens_estimated is True


def test_a_whole_stream_is_not_an_estimate():
    meter = Meter(make_config())
    f = admitted_flow("POST", "/api/chat", model="m", ctype="application/x-ndjson")
    with taddons.context():
        meter.responseheaders(f)
        feed(f.response.stream, [native_chat()])
        meter.response(f)
    assert state_of(f).completion_tokens == 298
    assert not state_of(f).tokens_estimated


def test_a_stream_cut_before_any_content_counts_nothing():
    meter = Meter(make_config())
    f = admitted_flow("POST", "/v1/messages", model="m", ctype="text/event-stream")
    head = messages_stream().split(b"event: ping")[0]  # message_start, content_block_start
    with taddons.context():
        meter.responseheaders(f)
        f.response.stream(head)
        meter.error(f)
    md = state_of(f)
    # message_start's provisional output count stands: nothing more went out.
    assert (md.prompt_tokens, md.completion_tokens) == (25, 1)
    assert not md.tokens_estimated


def test_a_pull_left_early_counts_no_tokens():
    # Progress lines are not generated text: only inference streams are estimated.
    meter = Meter(make_config())
    f = admitted_flow("POST", "/api/pull", key="admin", ctype="application/x-ndjson")
    with taddons.context():
        meter.responseheaders(f)
        f.response.stream(native_pull().rsplit(b"{", 1)[0])
        meter.error(f)
    md = state_of(f)
    assert md.total_tokens == 0 and not md.tokens_estimated


def test_an_error_frame_is_not_content():
    meter = Meter(make_config())
    f = admitted_flow("POST", "/v1/chat/completions", model="m", ctype="text/event-stream")
    body = sse(chunk(content="Hi"), {"error": {"message": "runner died", "type": "api_error"}})
    with taddons.context():
        meter.responseheaders(f)
        feed(f.response.stream, [body])
        meter.response(f)
    md = state_of(f)
    assert md.error == "upstream_error"
    assert md.completion_tokens == 1 and md.tokens_estimated is True


@pytest.mark.parametrize("alias", [None, ("up", "client")])
def test_a_frame_longer_than_max_frame_is_passed_through_unread(alias):
    """An upstream line without an end must not be held and rescanned without limit."""
    from keygate.stages.metering import MAX_FRAME, StreamMeter, TokenCounts
    meter = StreamMeter("ollama", False, TokenCounts(), alias=alias)
    chunk = b"x" * 65536
    out = b""
    for _ in range(MAX_FRAME // len(chunk) + 3):
        got = meter(chunk)
        out += got if isinstance(got, bytes) else b"".join(got)
    assert meter.broken and meter.pending == b""
    assert out == chunk * (MAX_FRAME // len(chunk) + 3)  # every byte went on, in order
