"""keygate/stages/deadlines.py: slow clients lose their connection (request head and body
deadlines).

The hooks are called directly in mitmproxy's order with a clock the test moves; `check()`
is what the periodic timer runs. mitmproxy's proxyserver is stood in for by `FakeServer`,
which records which client connections keygate asked it to close.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from mitmproxy import connection, http
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow

from helpers.unit import CONFIG_PATH, make_config, make_flow, with_state
from keygate.model.settings import ConfigError, parse_settings
from keygate.request import state_of
from keygate.stages.config import State
from keygate.stages.deadlines import MIN_TICK, TICK, Deadlines
from keygate.stages.recorder import build_record


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered


class FakeHandler:
    """What Deadlines uses of mitmproxy's ConnectionHandler."""

    def __init__(self, client: connection.Client) -> None:
        self.client = client
        self.transport = FakeTransport()
        self.transports = {client: SimpleNamespace(handler=object(),
                                                   writer=SimpleNamespace(
                                                       transport=self.transport))}
        self.hook_tasks: set = set()
        self.closed: list[connection.Connection] = []

    def close_connection(self, conn: connection.Connection, half_close: bool = False) -> None:
        self.closed.append(conn)


class FakeServer:
    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[str, FakeHandler] = {}

    def connect(self, client: connection.Client) -> FakeHandler:
        self.connections[client.id] = FakeHandler(client)
        return self.connections[client.id]


TOML = "[gateway]\nclient_header_timeout_s = 10\nclient_body_timeout_s = 30\n"


@pytest.fixture
def env():
    """(Deadlines, clock, FakeServer, taddons context) with head 10 s, body 30 s."""
    clock = Clock()
    d = Deadlines(make_config(TOML), clock=clock)
    server = FakeServer()
    with taddons.context(d) as tctx:
        tctx.master.addons.add(server)
        yield d, clock, server, tctx


@pytest.fixture
def conn(env):
    """(Deadlines, clock, client, its FakeHandler): `env` with one client connected."""
    d, clock, server, _ = env
    c, handler = connect(d, server)
    return d, clock, c, handler


def client(peer: str = "203.0.113.9") -> connection.Client:
    c = tflow.tclient_conn()
    c.peername = (peer, 40000)
    return c


def body_flow(c: connection.Client, method: str = "POST", path: str = "/api/chat",
              key: str | None = "alice") -> http.HTTPFlow:
    """A flow whose headers are in and whose body is not (timestamp_end unset)."""
    f = make_flow(method, path, body={"model": "llama3.2"}, key=key)
    f.client_conn = c
    f.request.timestamp_end = None
    return f


def connect(d: Deadlines, server: FakeServer, peer: str = "203.0.113.9"):
    c = client(peer)
    handler = server.connect(c)
    d.client_connected(c)
    return c, handler


def headers_in(d: Deadlines, f: http.HTTPFlow) -> None:
    d.requestheaders(f)


def body_in(d: Deadlines, f: http.HTTPFlow) -> None:
    f.request.timestamp_end = 1.0
    d.request(f)


def sent(d: Deadlines, c: connection.Client) -> http.HTTPFlow:
    """A request on `c` whose head and body are both in."""
    f = body_flow(c)
    headers_in(d, f)
    body_in(d, f)
    return f


def later(d: Deadlines, clock: Clock, seconds: float = 0.0) -> None:
    """Move the clock on by `seconds` and run the periodic check."""
    clock.t += seconds
    d.check()


def answered(d: Deadlines, f: http.HTTPFlow) -> None:
    f.response = http.Response.make(200, b"{}")
    d.response(f)


# --------------------------------------------------------------------------- settings


def test_defaults_and_settings():
    s = parse_settings("", CONFIG_PATH)
    assert (s.client_header_timeout, s.client_body_timeout) == (60.0, 120.0)
    s = parse_settings(TOML, CONFIG_PATH)
    assert (s.client_header_timeout, s.client_body_timeout) == (10.0, 30.0)


@pytest.mark.parametrize("name", ["client_header_timeout_s", "client_body_timeout_s"])
@pytest.mark.parametrize("value", ["0", "-1", '"60"', "true", "[]"])
def test_bad_timeouts_name_file_and_line(name, value):
    with pytest.raises(ConfigError) as info:
        parse_settings(f"[gateway]\nmax_body_mb = 1\n\n{name} = {value}\n", CONFIG_PATH)
    assert str(info.value).startswith(f"{CONFIG_PATH}:4: {name} must be a number >= 0.001")


def test_fractional_timeouts_are_allowed():
    s = parse_settings("[gateway]\nclient_header_timeout_s = 0.5\nclient_body_timeout_s = 2.5\n",
                       CONFIG_PATH)
    assert (s.client_header_timeout, s.client_body_timeout) == (0.5, 2.5)


# --------------------------------------------------------------------------- the head


def test_head_deadline_counts_from_the_connection(conn):
    d, clock, c, handler = conn
    later(d, clock, 9.5)
    assert handler.closed == []
    later(d, clock, 0.5)
    assert handler.closed == [c]
    assert c.id not in d.conns
    later(d, clock)
    assert handler.closed == [c]  # once


def test_warning_names_peer_and_reason_only(env, caplog):
    d, clock, server, _ = env
    with caplog.at_level(logging.WARNING, logger="keygate"):
        connect(d, server, "198.51.100.4")
        later(d, clock, 11)
    assert [r.getMessage() for r in caplog.records if r.name == "keygate"] == [
        "keygate: closed connection from 198.51.100.4: request head not complete within 10 s"]


def test_no_head_deadline_while_a_request_is_in_flight(conn):
    d, clock, c, handler = conn
    clock.t += 5
    sent(d, c)
    later(d, clock, 1000)  # the upstream takes its time: not the client's doing
    assert handler.closed == []


def test_keep_alive_idle_counts_from_the_end_of_the_last_request(conn):
    d, clock, c, handler = conn
    clock.t += 8
    f = sent(d, c)
    clock.t += 100
    answered(d, f)
    assert d.conns[c.id].idle_since == clock.t
    later(d, clock, 9)
    assert handler.closed == []
    later(d, clock, 1)
    assert handler.closed == [c]


def test_an_answer_still_being_written_postpones_the_idle_deadline(conn):
    d, clock, c, handler = conn
    f = sent(d, c)
    answered(d, f)
    handler.transport.buffered = 1 << 20  # the client reads its answer slowly
    later(d, clock, 50)
    assert handler.closed == [] and d.conns[c.id].idle_since == clock.t
    handler.transport.buffered = 0
    later(d, clock, 9)
    assert handler.closed == []
    later(d, clock, 1)
    assert handler.closed == [c]


def test_a_hook_on_its_way_postpones_the_close(conn):
    d, clock, c, handler = conn
    handler.hook_tasks.add("requestheaders")
    later(d, clock, 11)
    assert handler.closed == []
    handler.hook_tasks.clear()
    later(d, clock)
    assert handler.closed == [c]


def test_connection_already_gone_is_forgotten(env):
    d, clock, server, _ = env
    c, handler = connect(d, server)
    del server.connections[c.id]
    later(d, clock, 11)
    assert c.id not in d.conns and handler.closed == []


def test_disconnect_forgets_everything(conn):
    d, clock, c, handler = conn
    f = body_flow(c)
    headers_in(d, f)
    d.client_disconnected(c)
    assert d.conns == {} and d.bodies == {}
    d.error(f)  # mitmproxy's error hook may come after the disconnect
    later(d, clock, 1000)
    assert handler.closed == [] and d.conns == {}


def test_connection_from_before_a_reload_is_picked_up_by_its_next_request(env):
    d, clock, server, _ = env
    c = client()
    handler = server.connect(c)  # no client_connected: the addon was loaded later
    f = sent(d, c)
    answered(d, f)
    later(d, clock, 10)
    assert handler.closed == [c]


# --------------------------------------------------------------------------- the body


def test_body_deadline_counts_from_the_headers(conn):
    d, clock, c, handler = conn
    clock.t += 9  # head complete just in time
    f = body_flow(c)
    headers_in(d, f)
    assert f.id in d.bodies
    later(d, clock, 29.5)
    assert handler.closed == []
    later(d, clock, 0.5)
    assert handler.closed == [c]
    assert state_of(f).error == "request_timeout"


def test_body_timeout_usage_record_is_408_request_timeout(conn):
    d, clock, c, _ = conn
    f = body_flow(c)
    with_state(f, key="alice", id="req_x")
    headers_in(d, f)
    later(d, clock, 31)
    # What mitmproxy reports once the connection is closed mid-body.
    f.error = Error("HTTP/1 protocol error: peer closed connection without sending "
                    "complete message body: received 3 bytes, expected 1000")
    d.error(f)
    rec = build_record(f, f.request.timestamp_start + 31)
    assert (rec["status"], rec["error"], rec["key"], rec["completed"]) == (
        408, "request_timeout", "alice", False)


def test_body_timeout_replaces_a_refusal_that_was_never_sent(conn):
    # Refused at headers time (no key): the answer waits for the body, which never came.
    d, clock, c, _ = conn
    f = body_flow(c, key=None)
    f.response = http.Response.make(401)
    state_of(f).error = "invalid_api_key"
    headers_in(d, f)
    later(d, clock, 31)
    f.error = Error("Client disconnected.")
    rec = build_record(f, f.request.timestamp_start + 31)
    assert (rec["status"], rec["error"]) == (408, "request_timeout")


def test_complete_body_ends_the_body_deadline(conn):
    d, clock, c, handler = conn
    f = body_flow(c)
    headers_in(d, f)
    clock.t += 29
    body_in(d, f)
    assert d.bodies == {}
    later(d, clock, 100)
    assert handler.closed == []


def test_body_in_but_request_hook_still_on_its_way(conn):
    d, clock, c, handler = conn
    f = body_flow(c)
    headers_in(d, f)
    f.request.timestamp_end = 12345.0  # mitmproxy has the body; our request hook is queued
    later(d, clock, 31)
    assert handler.closed == [] and d.bodies == {}


def test_streamed_upload_is_exempt(conn):
    d, clock, c, handler = conn
    f = body_flow(c, path="/api/blobs/sha256:" + "a" * 64, key="admin")
    headers_in(d, f)
    f.request.stream = True  # set by Policy, after Deadlines' requestheaders
    later(d, clock, 3600)
    assert handler.closed == [] and d.bodies == {}
    assert not state_of(f).error


def test_head_refused_by_mitmproxy_has_no_body_deadline(conn):
    d, clock, c, handler = conn
    f = body_flow(c)
    f.error = Error("malformed")
    headers_in(d, f)
    assert d.bodies == {}


def test_no_body_deadline_once_answered_or_failed(conn):
    d, clock, c, handler = conn
    f, g = body_flow(c), body_flow(c)
    headers_in(d, f)
    headers_in(d, g)
    f.error = Error("Client disconnected.")
    d.error(f)
    answered(d, g)
    assert d.bodies == {} and d.conns[c.id].flows == set()


# --------------------------------------------------------------------------- HTTP/2


def test_http2_head_deadline_only_while_no_stream_is_in_flight(conn):
    d, clock, c, handler = conn
    f1 = sent(d, c)
    clock.t += 5
    f2 = sent(d, c)
    clock.t += 20
    answered(d, f1)  # f2 still in flight: no head deadline
    later(d, clock, 20)
    assert handler.closed == []
    answered(d, f2)
    later(d, clock, 9.5)
    assert handler.closed == []
    later(d, clock, 0.5)
    assert handler.closed == [c]


def test_http2_body_deadlines_are_per_stream(conn):
    d, clock, c, handler = conn
    done, slow = body_flow(c), body_flow(c)
    headers_in(d, done)
    clock.t += 20
    headers_in(d, slow)
    body_in(d, done)
    later(d, clock, 15)  # 35 s after `done`'s headers, 15 after `slow`'s
    assert handler.closed == []
    later(d, clock, 15)
    assert handler.closed == [c]
    assert state_of(slow).error == "request_timeout"
    assert not state_of(done).error


def test_several_late_streams_one_close(conn):
    d, clock, c, handler = conn
    flows = [body_flow(c) for _ in range(3)]
    for f in flows:
        headers_in(d, f)
    later(d, clock, 31)
    assert handler.closed == [c]
    assert all(state_of(f).error == "request_timeout" for f in flows)


def test_other_connections_are_left_alone(env):
    d, clock, server, _ = env
    slow, h_slow = connect(d, server, "203.0.113.1")
    clock.t += 5
    fine, h_fine = connect(d, server, "203.0.113.2")
    f = body_flow(fine)
    headers_in(d, f)
    later(d, clock, 5)
    assert h_slow.closed == [slow] and h_fine.closed == []
    assert fine.id in d.conns


# --------------------------------------------------------------------------- reloads


def test_reload_applies_new_timeouts_to_existing_connections(conn):
    d, clock, c, handler = conn
    later(d, clock, 5)
    assert handler.closed == []
    d.config.state = State(parse_settings("[gateway]\nclient_header_timeout_s = 2\n",
                                          CONFIG_PATH), d.config.state.keys)
    later(d, clock)
    assert handler.closed == [c]


# --------------------------------------------------------------------------- the timer


def test_one_timer_armed_while_something_is_tracked():
    clock = Clock()
    d = Deadlines(make_config("[gateway]\nclient_header_timeout_s = 1\n"), clock=clock)

    async def main():
        with taddons.context(d):
            d.running()
            assert d._timer is None  # nothing to watch yet
            c = client()
            d.client_connected(c)
            first = d._timer
            assert first is not None
            assert first.when() - asyncio.get_running_loop().time() == pytest.approx(0.25, abs=0.05)
            d.client_connected(client("203.0.113.10"))
            assert d._timer is first  # one timer, not one per connection
            f = body_flow(c)
            d.requestheaders(f)
            assert d._timer is first
            await asyncio.sleep(0.35)  # ticked (nothing due), re-armed
            assert d._timer is not None and d._timer is not first
            d.conns.clear()
            d.bodies.clear()
            await asyncio.sleep(0.35)
            assert d._timer is None  # nothing tracked: not re-armed
            d.done()

    asyncio.run(main())


def test_tick_interval_is_bounded():
    for toml, every in [("", TICK), ("[gateway]\nclient_body_timeout_s = 0.4\n", 0.1),
                        ("[gateway]\nclient_header_timeout_s = 0.001\n", MIN_TICK)]:
        d = Deadlines(make_config(toml))

        async def main():
            d.running()
            d.client_connected(client())
            delay = d._timer.when() - asyncio.get_running_loop().time()
            d.done()
            return delay

        with taddons.context(d):
            assert asyncio.run(main()) == pytest.approx(every, abs=0.03)


def test_a_failing_check_keeps_the_timer(monkeypatch, caplog):
    d = Deadlines(make_config())

    async def main():
        with taddons.context(d):
            d.running()
            d.client_connected(client())
            monkeypatch.setattr(d, "check", lambda: 1 / 0)
            d._tick()
            assert d._timer is not None
            d.done()

    with caplog.at_level(logging.ERROR, logger="keygate"):
        asyncio.run(main())
    assert "checking client deadlines failed" in caplog.text
