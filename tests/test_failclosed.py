"""keygate/stages/failclosed.py: nothing unchecked goes through, whether a stage fails on a
request (LastStage) or mitmproxy has no keygate pipeline loaded at all (FailClosed)."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.test import taddons, tflow

from helpers.unit import make_config, with_state
from keygate.request import state_of
from keygate.stages.failclosed import FailClosed, LastStage
from keygate.stages.limiter import Limiter
from keygate.stages.pipeline import Pipeline

SECRET = "sk-failclosed-test-0123456789"


class Broken:
    """A stage with a bug."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        raise KeyError("bug")


def chat_flow() -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.method, f.request.path = "POST", "/v1/chat/completions"
    f.request.headers["authorization"] = f"Bearer {SECRET}"
    return f


def assert_refused(f: http.HTTPFlow, message: str) -> None:
    assert f.response.status_code == 503
    assert f.response.headers["x-keygate-error"] == "gateway_unavailable"
    assert json.loads(f.response.content)["error"]["message"] == message
    assert f.response.headers["x-keygate-request-id"] == state_of(f).id
    assert "authorization" not in f.request.headers  # not even a flow dump shows the key


def test_a_request_a_stage_failed_on_is_refused_not_forwarded(caplog):
    f = chat_flow()

    async def main():
        with taddons.context() as tctx:
            tctx.master.addons.add(Pipeline([Broken()], last=[LastStage()]))
            await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))

    asyncio.run(main())
    assert_refused(f, LastStage.message)
    assert "KeyError: 'bug'" in caplog.text and "a stage failed on a request" in caplog.text


def test_what_the_stages_let_through_or_answered_is_left_alone():
    guard = LastStage()
    passed = chat_flow()
    with_state(passed, seen=True, admitted=True)
    answered = chat_flow()
    answered.response = http.Response.make(401, b"no")
    for f in (passed, answered):
        guard.requestheaders(f)
        guard.request(f)
    assert passed.response is None and "authorization" in passed.request.headers
    assert answered.response.status_code == 401
    # Seen by every stage but never admitted by the router: refused at the body.
    half = chat_flow()
    state_of(half).seen = True
    guard.requestheaders(half)
    assert half.response is None
    guard.request(half)
    assert_refused(half, LastStage.message)


def test_failclosed_stands_in_while_mitmproxy_has_no_pipeline_loaded(caplog):
    async def main():
        with taddons.context() as tctx:
            addons = tctx.master.addons
            first = Pipeline([], last=[LastStage()])
            addons.add(first)
            assert addons.get(FailClosed.name) is None  # loaded: no standing addon
            # A reload of gateway.py unloads the pipeline first; a broken one loads none.
            addons.remove(first)
            assert isinstance(addons.get(FailClosed.name), FailClosed)
            f = chat_flow()
            await addons.handle_lifecycle(HttpRequestHeadersHook(f))
            assert_refused(f, FailClosed.message)
            root = tflow.tflow()
            root.request.method, root.request.path = "GET", "/"
            await addons.handle_lifecycle(HttpRequestHook(root))
            assert root.response.status_code == 200
            # A good gateway.py loads a pipeline again, and the stand-in goes.
            addons.add(Pipeline([], last=[LastStage()]))
            assert addons.get(FailClosed.name) is None
            # At shutdown nothing is armed any more.
            tctx.master.should_exit.set()
            LastStage().done()
            assert addons.get(FailClosed.name) is None

    asyncio.run(main())
    assert "addons are not loaded" in caplog.text


@pytest.mark.parametrize("where", ["check", "shared counters"])
def test_a_limiter_that_fails_while_counting_refuses_rather_than_forwards(where, caplog):
    """A key with limits: the request is admitted only once it is counted, so an error
    on the way (in the check, or in the shared counters' answer) leaves it unadmitted,
    and the last stage refuses it."""
    config = make_config(keys={"k": {"limits": {"rpm": 5}}})

    class Usage:
        ledger = None

    class BrokenCounters:
        async def admit(self, *args):
            raise RuntimeError("bug in the shared counters")

    class Shared:
        counters = BrokenCounters()
        failure = "closed"

    lim = Limiter(config, Usage(), shared=Shared() if where == "shared counters" else None)
    if where == "check":
        def bug(*args):
            raise ZeroDivisionError("bug in the check")
        lim.check = bug
    f = chat_flow()
    with_state(f, seen=True, admitted=True, key="k")

    async def main():
        with taddons.context() as tctx:
            tctx.master.addons.add(Pipeline([lim], last=[LastStage()]))
            await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))

    asyncio.run(main())
    assert_refused(f, LastStage.message)
    assert not state_of(f).counted and not lim.counted
    assert f"bug in the {where}" in caplog.text
