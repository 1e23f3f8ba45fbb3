"""Unit: the Pages stage (keygate/stages/pages.py) with test flows: health and its
readiness checks (the hook shared state registers), the page's Content-Security-Policy,
and what reaches it unanswered."""

from __future__ import annotations

import base64
import hashlib
import json
import re

from helpers.unit import make_config, make_flow
from keygate import pages
from keygate.request import state_of
from keygate.stages.pages import Pages
from keygate.stages.routing import Router


class Writer:
    failing = False


class Recorder:
    def __init__(self, writer=None) -> None:
        self.writer = writer
        self.ledger = None


def stage(writer=None) -> Pages:
    config = make_config()
    return Pages(config, Recorder(writer), Router(config))


def test_live_and_ready():
    p = stage(Writer())
    f = make_flow("GET", "/keygate/health/live")
    p.requestheaders(f)
    assert f.response.status_code == 200 and json.loads(f.response.content) == {
        "status": "live"}
    f = make_flow("GET", "/keygate/health/ready")
    p.requestheaders(f)
    assert f.response.status_code == 200


def test_not_ready_before_the_log_is_open():
    p = stage(None)  # the counters are still being rebuilt: no writer yet
    f = make_flow("GET", "/keygate/health/ready")
    p.requestheaders(f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content) == {"status": "unavailable", "failed": ["usage_log"]}
    assert f.response.headers["x-keygate-error"] == "gateway_unavailable"
    assert state_of(f).error == "gateway_unavailable"


def test_a_registered_check_that_fails():
    """The hook for shared state: gateway.py registers `redis` (Shared.reachable)."""
    p = stage(Writer())
    p.checks["redis"] = lambda: False
    p.checks["broken"] = lambda: 1 / 0
    p.checks["fine"] = lambda: True
    f = make_flow("GET", "/keygate/health/ready")
    p.requestheaders(f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["failed"] == ["redis", "broken"]


def test_already_answered_and_other_paths_are_left_alone():
    p = stage(Writer())
    f = make_flow("GET", "/api/tags")
    assert p.requestheaders(f) is None and f.response is None
    f = make_flow("POST", "/keygate/health/live")
    assert p.requestheaders(f) is None and f.response is None
    f = make_flow("GET", "/keygate/me")
    f.kill()
    assert p.requestheaders(f) is None and f.response is None


def test_csp_allows_exactly_the_inline_script_and_style():
    page, policy = pages.page_html()
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*)</style>", page, re.S).group(1)

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert f"script-src {sha(script)};" in policy
    assert f"style-src {sha(style)};" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy
    assert len(re.findall(r"<script", page)) == 1  # no data, no other script


def test_static_page_embeds_data_safely():
    data = {"since": "x", "evil": "</script><script>alert(1)</script><!--"}
    page, policy = pages.page_html(data)
    assert "</script><script>alert" not in page
    m = re.search(r'<script type="application/json" id="keygate-data">(.*?)</script>', page,
                  re.S)
    assert "<" not in m.group(1) and json.loads(m.group(1)) == data
    assert "connect-src 'none'" in policy
    assert f'content="{policy}"' in page
