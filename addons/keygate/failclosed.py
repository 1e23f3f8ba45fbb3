"""The `FailClosed` guard: nothing reaches an upstream unless keygate let it through.

mitmproxy drops every addon of a script whose reload fails (a syntax error in
addons/gateway.py, say) and then forwards traffic untouched. This guard is therefore not
in gateway.py's addon list: gateway.py registers it on the master itself, once, so it
outlives any reload of the script. It runs after all of keygate's addons and refuses every
request they have not marked: with keygate loaded that never happens; without it,
everything but `GET /` gets 503 `gateway_unavailable` until a good reload.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, http

from .authentication import drop_credentials
from .errors import make_error
from .policy import root_response
from .usage import new_request_id

log = logging.getLogger("keygate")


class FailClosed:
    name = "keygate_failclosed"

    def __init__(self) -> None:
        self._last_warning = 0.0

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not flow.metadata.get("keygate.seen"):
            self._refuse(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if not flow.metadata.get("keygate.admitted"):
            self._refuse(flow)

    def _refuse(self, flow: http.HTTPFlow) -> None:
        # Auth did not run: not even a flow dump may show the client's credential.
        drop_credentials(flow)
        if flow.request.method in ("GET", "HEAD") and flow.request.path.split("?")[0] == "/":
            flow.response = root_response(flow.request.method)
        else:
            flow.response = make_error(
                flow, "gateway_unavailable",
                "The gateway is not available: its configuration failed to load.")
        flow.response.headers["x-keygate-request-id"] = new_request_id()
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.error("keygate: its addons are not loaded (see the errors above); "
                      "refusing every request until addons/gateway.py loads again")


def install() -> None:
    """Register the guard on the running master, unless an earlier load already did."""
    master = getattr(ctx, "master", None)
    if master is not None and master.addons.get(FailClosed.name) is None:
        master.addons.add(FailClosed())
