"""Fail closed: nothing reaches an upstream unless keygate let it through.

Two guards make the same check: a request's headers must have passed every stage of
keygate's pipeline (the Recorder, the last, marks it `keygate.seen`) and its body must have been
admitted by the router (`keygate.admitted`); any other request still unanswered gets 503
`gateway_unavailable` (`GET /` its usual answer).

- `LastStage` is the pipeline's own last step (gateway.py). The Pipeline runs it after
  the stages even when one of them raised: a bug in a stage refuses the request it met
  instead of letting it through half-checked.
- `FailClosed` stands in for the whole pipeline while mitmproxy has none loaded.
  mitmproxy drops every addon of a script whose reload fails (a syntax error in
  addons/gateway.py, say) and then forwards traffic untouched. So when mitmproxy unloads
  a pipeline (its `done`), `LastStage` registers `FailClosed` on the master itself, where
  it outlives the script; when a pipeline loads again (its `load`), it goes. It is not
  there meanwhile because every addon mitmproxy holds costs every event: as a standing
  addon it cost 0.16 M instructions a small request (2 % of bare mitmdump's; callgrind).
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, http

from keygate.model.errors import make_error
from keygate.request import state_of
from keygate.stages.auth import drop_credentials
from keygate.stages.policy import root_response
from keygate.stages.recorder import request_id

log = logging.getLogger("keygate")


class FailClosed:
    name = "keygate_failclosed"
    why = ("keygate: its addons are not loaded (see the errors above); refusing every "
           "request until addons/gateway.py loads again")
    message = "The gateway is not available: its configuration failed to load."

    def __init__(self) -> None:
        self._last_warning = 0.0

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not state_of(flow).seen:
            self._refuse(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not state_of(flow).admitted:
            self._refuse(flow)

    def _refuse(self, flow: http.HTTPFlow) -> None:
        # Auth may not have run: not even a flow dump may show the client's credential.
        drop_credentials(flow)
        if flow.request.method in ("GET", "HEAD") and flow.request.path.split("?")[0] == "/":
            flow.response = root_response(flow.request.method)
        else:
            flow.response = make_error(flow, "gateway_unavailable", self.message)
        flow.response.headers["x-keygate-request-id"] = request_id(flow)
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.error(self.why)


class LastStage(FailClosed):
    """The check as the pipeline's last step, and the keeper of `FailClosed` (above)."""

    why = ("keygate: a stage failed on a request (see the error above); refused it rather "
           "than let it through unchecked")
    message = "The gateway failed while checking this request."

    def load(self, loader) -> None:
        disarm()

    def done(self) -> None:
        arm()


def arm() -> None:
    """Register `FailClosed` on the running master, unless it is there or shutting down."""
    master = getattr(ctx, "master", None)
    if master is None or master.should_exit.is_set():
        return
    if master.addons.get(FailClosed.name) is None:
        master.addons.add(FailClosed())


def disarm() -> None:
    master = getattr(ctx, "master", None)
    guard = master.addons.get(FailClosed.name) if master is not None else None
    if guard is not None:
        master.addons.remove(guard)
