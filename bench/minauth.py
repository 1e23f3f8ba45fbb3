"""The smallest API-key gateway on mitmproxy, as scripts/bench's floor for keygate's CPU.

The targets (docs/performance.md) quote "a 30-line auth addon that streams responses" beside bare
mitmdump. This is
that addon, streaming what keygate streams: it checks `Authorization: Bearer <key>`
against the SHA-256 digests in $MINAUTH_KEY_SHA256 (comma-separated), answers 401 to
anything else, keeps the header from the upstream, and streams event streams and NDJSON
(a small JSON answer is buffered, as keygate buffers it: streaming one costs mitmproxy
~0.3 ms more per request on a 2-core machine). No policy, routing, metering, limits or
log: what checking a key costs on mitmproxy is the difference between it and bare
mitmdump; what keygate does beyond that is the difference between keygate and it.

    mitmdump --mode reverse:http://127.0.0.1:11434 -s bench/minauth.py
"""

import hashlib
import os

from mitmproxy import http

DIGESTS = frozenset(
    bytes.fromhex(d) for d in os.environ.get("MINAUTH_KEY_SHA256", "").split(",") if d
)
STREAMED = ("text/event-stream", "application/x-ndjson")


class MinAuth:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.path == "/":  # the bench's readiness probe
            return
        scheme, _, key = flow.request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or hashlib.sha256(key.encode()).digest() not in DIGESTS:
            flow.response = http.Response.make(
                401, b'{"error":"invalid api key"}', {"content-type": "application/json"}
            )
            return
        del flow.request.headers["authorization"]

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        if flow.response.headers.get("content-type", "").startswith(STREAMED):
            flow.response.stream = True


addons = [MinAuth()]
