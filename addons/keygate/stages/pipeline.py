"""The `Pipeline`: keygate's addons behind one dispatch point.

mitmproxy looks every hook up by name on every addon it holds, for every event, whether
the addon has that hook or not. keygate is ten addons and a request passes about ten
events, so as separate addons that lookup ran about a hundred times per request. Timed in
mitmproxy's addon manager with its default addons on a 2-core machine, four flow events
cost 1,670 us behind ten addons, 1,560 us behind one, 1,530 us with none (README,
Performance). The Pipeline is the one addon mitmproxy sees. It keeps, per hook, the list
of its stages' methods that implement it, in stage order, and calls them as mitmproxy
would call them as separate addons:

- flow and connection hooks (`requestheaders`, `request`, `response`, `error`, ...): in
  order, each awaitable awaited before the next stage runs (a stage may answer the request
  and the stages after it see the response);
- lifecycle hooks (`load`, `configure`, `running`, `done`), which mitmproxy also calls
  outside the event loop where it does not await: every stage is called, in order, and the
  awaitables returned are awaited afterwards, in order, when the caller awaits.

An exception in a stage ends that event for the stages after it, and mitmproxy logs it, as
it does for a script's addons; only the `last` stages still run (gateway.py's is the
fail-closed check, keygate/stages/failclosed.py). The stages stay what they are: one class per
concern, testable alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import mitmproxy.addonmanager  # noqa: F401  (the hook registry: load)
import mitmproxy.proxy.layers  # noqa: F401  (flow and connection hooks)
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import hooks

LIFECYCLE = frozenset({"load", "configure", "running", "done"})


def _in_order(calls: list[Callable], last: list[Callable]) -> Callable:
    """One hook: the calls in order, an awaitable finished before the next call; then the
    `last` calls (plain functions), whatever happened before them."""
    if len(calls) == 1 and not last:
        return calls[0]

    def hook(*args):
        try:
            for i, call in enumerate(calls):
                res = call(*args)
                if res is not None and inspect.isawaitable(res):
                    return _finish(res, calls[i + 1:], last, args)
        except BaseException:
            _run(last, args)
            raise
        _run(last, args)
        return None

    return hook


async def _finish(pending: Awaitable, calls: list[Callable], last: list[Callable],
                  args: tuple) -> None:
    try:
        await pending
        for call in calls:
            res = call(*args)
            if res is not None and inspect.isawaitable(res):
                await res
    finally:
        _run(last, args)


def _run(last: list[Callable], args: tuple) -> None:
    for call in last:
        call(*args)


def _each(calls: list[Callable]) -> Callable:
    """One lifecycle hook: every call, then the awaitables they returned, in order."""

    def hook(*args):
        pending = [res for call in calls
                   if (res := call(*args)) is not None and inspect.isawaitable(res)]
        return _all(pending) if pending else None

    return hook


async def _all(pending: list[Awaitable]) -> None:
    for res in pending:
        await res


def implemented(stage: object) -> dict[str, Callable]:
    """The hooks `stage` implements: {hook name: its method}, in mitmproxy's hook order."""
    return {hook: fn for hook in hooks.all_hooks
            if callable(fn := getattr(stage, hook, None))}


class Pipeline:
    """keygate's addons (the stages) as one mitmproxy addon; see the module docstring.

    `last`: stages whose flow and connection hooks run after all the others' also when
    one of those raised (the exception then goes on to mitmproxy), as a `finally` would;
    their lifecycle hooks run last like any stage's. Their hooks must be plain functions.
    """

    name = "keygate"

    def __init__(self, stages: list, last: list = ()) -> None:
        self.stages = list(stages)
        self.last = list(last)
        stage_hooks = [implemented(s) for s in self.stages]
        last_hooks = [implemented(s) for s in self.last]
        for hook in hooks.all_hooks:
            calls = [h[hook] for h in stage_hooks if hook in h]
            finals = [h[hook] for h in last_hooks if hook in h]
            if not (calls or finals):
                continue
            if any(inspect.iscoroutinefunction(f) for f in finals):
                raise TypeError(f"a last stage's {hook} must be a plain function")
            # Instance attributes: mitmproxy's getattr finds them at once.
            setattr(self, hook, _each(calls + finals) if hook in LIFECYCLE
                    else _in_order(calls, finals))

    def __repr__(self) -> str:
        names = [type(s).__name__ for s in self.stages + self.last]
        return f"Pipeline({', '.join(names)})"
