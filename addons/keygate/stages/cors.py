"""The `Cors` addon: browser access for the origins in `cors_origins`, and no other.

keygate answers preflight requests itself (they carry no key), names the allowed origin
in every response to it (never `*`), and strips CORS headers an upstream may add, so a
browser page on any other origin cannot read responses.
"""

from __future__ import annotations

from mitmproxy import http

from keygate.request import state_of
from keygate.stages.config import Config
from keygate.stages.headerfields import get_field, has_field

ALLOW_METHODS = "GET, POST, DELETE, HEAD, OPTIONS"
ALLOW_HEADERS = "authorization, content-type, x-api-key, anthropic-version, openai-beta"
EXPOSE_HEADERS = (
    "x-keygate-request-id, x-keygate-error, retry-after, x-ratelimit-limit-requests, "
    "x-ratelimit-remaining-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens"
)


class Cors:
    def __init__(self, config: Config) -> None:
        self.config = config

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        origin = get_field(flow.request.headers, b"origin")
        if not origin or origin.lower() not in self.config.state.settings.cors_origins:
            return
        state_of(flow).origin = origin
        if (flow.request.method == "OPTIONS"
                and "access-control-request-method" in flow.request.headers):
            requested = flow.request.headers.get("access-control-request-headers", "")
            flow.response = http.Response.make(204, b"", {
                "access-control-allow-methods": ALLOW_METHODS,
                "access-control-allow-headers": requested or ALLOW_HEADERS,
                "access-control-max-age": "600",
            })

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if (flow.response is not None and state_of(flow).admitted
                and has_field(flow.response.headers, b"access-control-allow-origin")):
            # Only the upstream's headers: keygate's own preflight answer keeps its own.
            # Without Allow-Origin the others grant nothing, so most responses skip the scan.
            h = flow.response.headers
            for name in [n for n in h.keys() if n.lower().startswith("access-control-")]:
                h.pop(name, None)
        self._allow(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._allow(flow)

    @staticmethod
    def _allow(flow: http.HTTPFlow) -> None:
        st = state_of(flow)
        # Once per response: the response hook follows responseheaders for most.
        if st.origin and flow.response is not None and st.cors_stamped != id(flow.response):
            st.cors_stamped = id(flow.response)
            origin = st.origin
            h = flow.response.headers
            h["access-control-allow-origin"] = origin
            h["access-control-expose-headers"] = EXPOSE_HEADERS
            vary = [v.strip() for v in h.get("vary", "").split(",") if v.strip()]
            if not any(v.lower() == "origin" for v in vary):
                h["vary"] = ", ".join([*vary, "Origin"])
