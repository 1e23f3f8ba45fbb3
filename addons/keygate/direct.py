"""The HTTP requests keygate makes to an upstream itself, outside mitmproxy: the model lists
the Catalog merges, and `keygate channels test`.

Both go the way the gateway's own traffic goes: straight to the channel's base_url, with
no proxy from the environment (HTTP_PROXY and the like), and never after a redirect.
urllib follows a redirect with every header of the request, the channel's Authorization
included, to whatever host the redirect names.
"""

from __future__ import annotations

import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx comes back as an HTTPError


def opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
