"""keygate/request.py's InFlight: flows in flight by id, and by client connection, so a
client that leaves finds its flows without a scan of all of them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tflow

from keygate.request import InFlight

CLIENTS = [tflow.tclient_conn() for _ in range(3)]


def flow_of(client_index: int):
    f = tflow.tflow()
    f.client_conn = CLIENTS[client_index]
    return f


@given(st.lists(st.tuples(st.sampled_from(["add", "pop", "del", "pop-missing"]),
                          st.integers(0, 2), st.integers(0, 7)), max_size=60))
def test_of_client_is_the_scan_it_replaces(ops):
    inflight, flows = InFlight(), {}
    for op, client, slot in ops:
        key = (client, slot)
        if op == "add" and key not in flows:
            flows[key] = flow_of(client)
            inflight[flows[key].id] = flows[key]
        elif op == "pop" and key in flows:
            assert inflight.pop(flows.pop(key).id) is not None
        elif op == "del" and key in flows:
            del inflight[flows.pop(key).id]
        elif op == "pop-missing":
            assert inflight.pop("no such flow", None) is None
        for c in CLIENTS:
            scan = {f.id for f in inflight.values() if f.client_conn.id == c.id}
            assert {f.id for f in inflight.of_client(c.id)} == scan
        assert len(inflight) == len(flows)
    for f in list(inflight.values()):
        inflight.pop(f.id)
    assert not inflight and not inflight._by_client  # nothing kept for a client gone
