"""keygate/stages/pipeline.py: the stages called as mitmproxy would call them as separate addons,
through mitmproxy's own addon manager."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from mitmproxy import hooks, http
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import taddons, tflow

from conftest import ROOT
from keygate.stages.pipeline import Pipeline

ADDONS = ROOT / "addons"


class Stage:
    """Records its hook calls in a shared list; optionally answers, waits or fails."""

    def __init__(self, name: str, calls: list, *, answer: bool = False, wait: bool = False,
                 fail: bool = False) -> None:
        self.name, self.calls = name, calls
        self.answer, self.wait, self.fail = answer, wait, fail

    def request(self, flow: http.HTTPFlow):
        self.calls.append((self.name, "request", flow.response is not None))
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        if self.wait:
            return self._later(flow)
        if self.answer:
            flow.response = http.Response.make(418, b"answered")
        return None

    async def _later(self, flow: http.HTTPFlow) -> None:
        await asyncio.sleep(0.01)
        self.calls.append((self.name, "request done", flow.response is not None))
        if self.answer:
            flow.response = http.Response.make(418, b"answered later")

    def response(self, flow: http.HTTPFlow) -> None:
        self.calls.append((self.name, "response", flow.response.status_code))

    def done(self):
        self.calls.append((self.name, "done"))
        return self._closed() if self.wait else None

    async def _closed(self) -> None:
        await asyncio.sleep(0)
        self.calls.append((self.name, "closed"))


class Quiet:
    """No hook at all."""


def run(coro_fn):
    return asyncio.run(coro_fn())


def dispatch(stages: list, flow: http.HTTPFlow, *events: type, last: list = ()) -> http.HTTPFlow:
    """Through mitmproxy's addon manager, one Pipeline of `stages` (and `last`) gets each of
    `events` (hook classes such as HttpRequestHook) for `flow`, in turn. Returns `flow`."""

    async def main():
        with taddons.context() as tctx:
            tctx.master.addons.add(Pipeline(stages, last))
            for event in events:
                await tctx.master.addons.handle_lifecycle(event(flow))

    run(main)
    return flow


def test_stages_run_in_order_and_see_what_earlier_ones_did():
    calls: list = []
    dispatch([Stage("a", calls), Quiet(), Stage("b", calls, answer=True), Stage("c", calls)],
             tflow.tflow(), HttpRequestHook, HttpResponseHook)
    assert calls == [("a", "request", False), ("b", "request", False), ("c", "request", True),
                     ("a", "response", 418), ("b", "response", 418), ("c", "response", 418)]


def test_an_awaitable_finishes_before_the_next_stage_runs():
    calls: list = []
    f = dispatch([Stage("a", calls), Stage("b", calls, wait=True, answer=True),
                  Stage("c", calls)], tflow.tflow(), HttpRequestHook)
    assert calls == [("a", "request", False), ("b", "request", False),
                     ("b", "request done", False), ("c", "request", True)]
    assert f.response.content == b"answered later"


def test_a_failing_stage_ends_the_event_for_later_stages_and_is_logged(caplog):
    calls: list = []
    dispatch([Stage("a", calls, fail=True), Stage("b", calls)], tflow.tflow(resp=True),
             HttpRequestHook, HttpResponseHook)
    # As mitmproxy treats a script's addons: b does not run for that event, the next
    # event reaches every stage again.
    assert calls == [("a", "request", True), ("a", "response", 200), ("b", "response", 200)]
    assert "a failed" in caplog.text


class Last:
    """A last stage: records what the request looked like when it ran."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def request(self, flow: http.HTTPFlow) -> None:
        self.calls.append(("last", "request", flow.response is not None))

    def done(self):
        self.calls.append(("last", "done"))


def test_last_stages_run_after_the_others():
    calls: list = []
    dispatch([Stage("a", calls), Stage("b", calls, answer=True)], tflow.tflow(),
             HttpRequestHook, last=[Last(calls)])
    assert calls == [("a", "request", False), ("b", "request", False), ("last", "request", True)]


def test_last_stages_run_once_an_awaitable_stage_is_done():
    calls: list = []
    dispatch([Stage("a", calls, wait=True, answer=True), Stage("b", calls)], tflow.tflow(),
             HttpRequestHook, last=[Last(calls)])
    assert calls == [("a", "request", False), ("a", "request done", False),
                     ("b", "request", True), ("last", "request", True)]


def test_last_stages_run_also_when_a_stage_raised(caplog):
    calls: list = []
    dispatch([Stage("a", calls, fail=True), Stage("b", calls)], tflow.tflow(),
             HttpRequestHook, last=[Last(calls)])
    assert calls == [("a", "request", False), ("last", "request", False)]
    assert "a failed" in caplog.text  # and the error still reaches mitmproxy's log


def test_last_stages_run_also_when_an_awaited_stage_raised(caplog):
    calls: list = []

    class LateFailure(Stage):
        async def _later(self, flow):
            raise RuntimeError("late failure")

    dispatch([LateFailure("a", calls, wait=True), Stage("b", calls)], tflow.tflow(),
             HttpRequestHook, last=[Last(calls)])
    assert calls == [("a", "request", False), ("last", "request", False)]
    assert "late failure" in caplog.text


def test_last_stages_take_part_in_lifecycle_hooks_and_must_be_plain():
    calls: list = []
    p = Pipeline([Stage("a", calls)], last=[Last(calls)])
    assert p.done() is None and calls == [("a", "done"), ("last", "done")]
    assert "Last" in repr(p)

    class Async:
        async def request(self, flow):
            pass

    with pytest.raises(TypeError, match="plain function"):
        Pipeline([], last=[Async()])


def test_lifecycle_hooks_reach_every_stage_also_where_mitmproxy_does_not_await():
    calls: list = []

    async def main():
        with taddons.context() as tctx:
            p = Pipeline([Stage("a", calls, wait=True), Stage("b", calls)])
            tctx.master.addons.add(p)
            # Shutdown: awaited, so a's coroutine finishes.
            await tctx.master.addons.trigger_event(hooks.DoneHook())
            assert calls == [("a", "done"), ("b", "done"), ("a", "closed")]
            calls.clear()
            # Removal (a script reload): called without awaiting; b is still told.
            res = p.done()
            assert calls == [("a", "done"), ("b", "done")]
            await res

    run(main)


def test_only_the_hooks_some_stage_has_are_exposed():
    p = Pipeline([Stage("a", []), Quiet()])
    assert callable(p.request) and callable(p.response) and callable(p.done)
    for hook in ("requestheaders", "responseheaders", "error", "tcp_message", "configure"):
        assert not hasattr(p, hook), hook
    assert "Stage" in repr(p) and "Quiet" in repr(p)


def test_importing_the_pipeline_alone_knows_every_hook_keygate_uses():
    # The hook registry fills as mitmproxy's modules are imported; the pipeline imports
    # what it needs itself, so no hook of a stage can be missed whatever loaded first.
    code = (
        "import keygate.stages.pipeline\n"
        "from mitmproxy import hooks\n"
        "need = {'load', 'configure', 'running', 'done', 'client_connected',\n"
        "        'client_disconnected', 'requestheaders', 'request', 'responseheaders',\n"
        "        'response', 'error'}\n"
        "missing = need - set(hooks.all_hooks)\n"
        "assert not missing, missing\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ADDONS, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_every_hook_of_keygate_stages_is_dispatched():
    from keygate.stages.auth import Auth
    from keygate.stages.catalog import Catalog
    from keygate.stages.config import Config
    from keygate.stages.cors import Cors
    from keygate.stages.deadlines import Deadlines
    from keygate.stages.limiter import Limiter
    from keygate.stages.metering import Meter
    from keygate.stages.policy import Policy
    from keygate.stages.recorder import Recorder
    from keygate.stages.routing import Router

    classes = [Config, Deadlines, Cors, Auth, Policy, Catalog, Router, Meter, Limiter, Recorder]
    defined = {name for c in classes for name in vars(c) if name in hooks.all_hooks}
    assert {"requestheaders", "request", "response", "error", "load", "running",
            "client_connected", "client_disconnected"} <= defined
    # Methods are looked up only: the stages need not be set up for that.
    p = Pipeline([object.__new__(c) for c in classes])
    assert {name for name in defined if callable(getattr(p, name, None))} == defined


def test_the_gateway_module_gives_mitmproxy_one_addon():
    code = (
        "import sys\n"
        "from mitmproxy.addons.script import load_script\n"
        "ns = load_script(sys.argv[1])\n"
        "assert [type(a).__name__ for a in ns.addons] == ['Pipeline']\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(ADDONS / "gateway.py")], cwd=ADDONS,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
