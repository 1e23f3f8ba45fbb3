"""End to end: keygate's usage page in a real headless Chromium, driven as a user would:
it loads from a running keygate with traffic from several keys and models, a key
without `admin` is turned away, an admin key typed into the form shows the charts and
tables, which hold the known totals (the keys table matches `keygate usage`), and a
screenshot is kept under test-artifacts/. The key never appears in a URL, the page's
HTML or mitmdump's output. Also the static file of `keygate usage --html`."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Gateway, KeySpec, default_keys
from helpers.browser import Browser, chromium_path, number

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="needs chromium (scripts/test installs it)")

ARTIFACTS = ROOT / "test-artifacts"
KEYGATE = str(Path(sys.executable).with_name("keygate"))
P = "one two three four"
# A model name a client chose, that would run as markup if the page ever parsed it as HTML.
HOSTILE = "<img src=x onerror=alert(1)></script><!--"


def keys() -> dict[str, KeySpec]:
    k = default_keys()
    k["carol"] = KeySpec("carol", settings={"limits": {"tokens_per_day": 500,
                                                        "tokens_total": 2000}})
    return k


def channels(url: str) -> str:
    return (f'\n[[channels]]\nname = "local"\nkind = "ollama"\nbase_url = "{url}"\n'
            f'[channels.model_map]\n"{HOSTILE}" = "llama3.2"\n'
            f'\n[[channels]]\nname = "compat"\nkind = "openai"\nbase_url = "{url}/v1"\n'
            'models = ["qwen*"]\npriority = 1\n')


@pytest.fixture(scope="module")
def gw(fake, tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("dash"), fake.url, keys=keys(),
                gateway_toml=channels(fake.url)).start()
    traffic = [("alice", "llama3.2", 3), ("carol", "llama3.2", 2), ("carol", "qwen2.5:7b", 4),
               ("admin", "qwen2.5:7b", 1), ("alice", HOSTILE, 1)]
    for who, model, n in traffic:
        for _ in range(n):
            r = httpx.post(g.url + "/v1/chat/completions", headers=g.key(who).auth, timeout=10,
                           json={"model": model, "messages": [{"role": "user", "content": P}]})
            assert r.status_code == 200, r.text
    # Some errors, with codes.
    httpx.post(g.url + "/api/chat", headers=g.key("llama-only").auth, timeout=10,
               json={"model": "qwen2.5:7b", "messages": []})
    httpx.post(g.url + "/api/chat", timeout=10, json={"model": "llama3.2"})
    g.settled_count()
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def cli_rows(log: Path, since: str, until: str, by: str = "key") -> list[dict]:
    out = subprocess.run([KEYGATE, "usage", "--log", str(log), "--since", since, "--until",
                          until, "--by", by, "--format", "json"], capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def page_state(b: Browser) -> dict:
    return b.evaluate("""(function () {
      function rows(sel) {
        return Array.prototype.map.call(document.querySelectorAll(sel + " tr[data-key]"),
          function (tr) { return {key: tr.getAttribute("data-key"),
            cells: Array.prototype.map.call(tr.children, function (td) { return td.textContent; }),
            today: tr.querySelector("td.today").getAttribute("data-used"),
            todayLimit: tr.querySelector("td.today").getAttribute("data-limit"),
            whole: tr.querySelector("td.whole").getAttribute("data-used")}; });
      }
      function segs(id) {
        return Array.prototype.map.call(document.querySelectorAll("#" + id + " rect.seg"),
          function (r) {
            return [r.getAttribute("data-name"), Number(r.getAttribute("data-value"))];
          });
      }
      return {
        requests: document.getElementById("total-requests").textContent,
        tokens: document.getElementById("total-tokens").textContent,
        errors: document.getElementById("total-errors").textContent,
        range: document.getElementById("range").textContent,
        keys: rows("#keys"),
        byKey: segs("chart-tokens-key"), byModel: segs("chart-tokens-model"),
        steps: Array.prototype.map.call(document.querySelectorAll("#chart-requests g.step"),
          function (g) { return [g.getAttribute("data-t"), Number(g.getAttribute("data-requests")),
                                 Number(g.getAttribute("data-errors"))]; }),
        codes: Array.prototype.map.call(document.querySelectorAll("#error-codes tr[data-code]"),
          function (tr) { return [tr.getAttribute("data-code"), tr.children[1].textContent]; }),
        latency: Array.prototype.map.call(document.querySelectorAll("#latency tr[data-channel]"),
          function (tr) { return tr.getAttribute("data-channel"); }),
        channels: Array.prototype.map.call(document.querySelectorAll("#channels tr[data-channel]"),
          function (tr) { return [tr.getAttribute("data-channel"), tr.children[2].textContent]; })
      };
    })()""")


def test_dashboard_in_chromium(gw, browser, tmp_path):
    b = browser
    b.send("Network.enable")
    b.navigate(gw.url + "/keygate/dashboard")
    assert b.evaluate("!document.getElementById('login').hidden")
    assert b.evaluate("document.getElementById('main').hidden")

    # A key without admin: turned away, and not kept.
    b.type_into("#key", gw.key("alice").secret)
    b.click("#login-button")
    b.wait_for("document.getElementById('login-error').textContent.length > 0")
    assert "admin scope" in b.evaluate("document.getElementById('login-error').textContent")
    assert b.evaluate("sessionStorage.getItem('keygate-key')") is None

    # An admin key, typed as a user types it.
    secret = gw.key("admin").secret
    b.type_into("#key", secret)
    b.click("#login-button")
    b.wait_for("!document.getElementById('main').hidden && "
               "!!document.getElementById('total-requests')")
    assert b.evaluate("sessionStorage.getItem('keygate-key')") == secret
    assert b.evaluate("document.getElementById('key').value") == ""
    state = page_state(b)
    ARTIFACTS.mkdir(exist_ok=True)
    b.screenshot(ARTIFACTS / "dashboard.png")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

    # The query's own line lands after its answer: the page shows the log without it.
    gw.settled_count()
    lines = gw.usage()
    query = [x for x in lines if x["path"] == "/keygate/usage" and x["status"] == 200]
    assert len(query) == 1
    log = tmp_path / "usage.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines if x["id"] != query[0]["id"]))
    since, until = state["range"].split("From ")[1].split(" (UTC")[0].split(" to ")
    want = {r["key"]: r for r in cli_rows(log, since, until)}

    # The totals.
    assert number(state["requests"]) == sum(r["requests"] for r in want.values())
    assert number(state["tokens"]) == sum(r["total_tokens"] for r in want.values())
    assert number(state["errors"]) == sum(r["errors"] for r in want.values())

    # The keys table: every key of keys.yaml, with what `keygate usage --by key` says.
    table = {row["key"]: row for row in state["keys"]}
    assert set(table) == set(gw.keys)
    for name, row in table.items():
        w = want.get(name, {"requests": 0, "total_tokens": 0, "errors": 0})
        assert [number(c) for c in row["cells"][1:4]] == [w["requests"], w["total_tokens"],
                                                          w["errors"]], name
    carol = sum(x["total_tokens"] for x in lines if x["key"] == "carol")
    assert carol > 0
    assert (number(table["carol"]["today"]), number(table["carol"]["todayLimit"])) == (carol, 500)
    assert number(table["carol"]["whole"]) == carol
    assert table["alice"]["today"] is None

    # Tokens per day, stacked by key and by model, hold the known totals.
    by_key = collections.Counter()
    for name, v in state["byKey"]:
        by_key[name] += v
    assert dict(by_key) == {k: r["total_tokens"] for k, r in want.items()
                            if r["total_tokens"] and k is not None}
    by_model = collections.Counter()
    for name, v in state["byModel"]:
        by_model[name] += v
    models = collections.Counter()
    for x in lines:
        if x["id"] != query[0]["id"] and x["total_tokens"]:
            models[x["model"]] += x["total_tokens"]
    assert dict(by_model) == dict(models)
    assert set(models) == {"llama3.2", "qwen2.5:7b", HOSTILE}
    # Shown as text, never run as markup.
    assert b.evaluate("document.querySelectorAll('img').length") == 0
    assert HOSTILE in b.evaluate("document.getElementById('chart-tokens-model').textContent")

    # Requests and errors per hour, with the codes.
    assert len(state["steps"]) >= 24
    assert sum(s[1] for s in state["steps"]) == number(state["requests"])
    codes = collections.Counter(x["error"] for x in lines
                                if x["error"] and x["id"] != query[0]["id"])
    assert {c: number(n) for c, n in state["codes"]} == dict(codes)
    assert {"permission_denied", "invalid_api_key"} <= set(codes)

    # Latency by channel, and channel health.
    assert {"local", "compat"} <= set(state["latency"])
    assert sorted(state["channels"]) == [["compat", "up"], ["local", "up"]]

    # The key is in no URL the page asked for, nor in its HTML, nor in mitmdump's output.
    urls = b.urls()
    assert any("/keygate/usage?" in u for u in urls)
    assert not any(secret in u for u in urls)
    assert any(h.get("Authorization") == f"Bearer {secret}" for h in b.request_headers())
    assert secret not in b.evaluate("document.documentElement.outerHTML")
    assert secret not in gw.output
    assert gw.key("alice").secret not in gw.output

    # Another period: the page asks again, with the same header.
    b.click('#period button[data-period="7d"]')
    b.wait_for("document.getElementById('range').textContent.indexOf('" + until + "') >= 0 && "
               "document.querySelectorAll('#chart-requests g.step').length >= 24 * 7")
    assert not any(secret in u for u in b.urls())

    # Logging out forgets the key.
    b.click("#logout")
    assert b.evaluate("sessionStorage.getItem('keygate-key')") is None
    assert b.evaluate("!document.getElementById('login').hidden")


def test_static_html_file(gw, browser, tmp_path):
    """`keygate usage --html FILE`: the same page as one file, its data inside."""
    out = tmp_path / "report.html"
    subprocess.run([KEYGATE, "usage", "--config", str(gw.config), "--since", "2d",
                    "--html", str(out)], check=True, timeout=60, capture_output=True)
    text = out.read_text()
    assert 'id="keygate-data"' in text and "Content-Security-Policy" in text
    assert gw.key("admin").secret not in text
    b = browser
    b.navigate(out.as_uri())
    b.wait_for("!!document.getElementById('total-requests')")
    state = page_state(b)
    since, until = state["range"].split("From ")[1].split(" (UTC")[0].split(" to ")
    want = cli_rows(gw.usage_log, since, until)
    assert number(state["requests"]) == sum(r["requests"] for r in want)
    assert number(state["tokens"]) == sum(r["total_tokens"] for r in want)
    assert b.evaluate("document.getElementById('login').hidden")
    assert b.evaluate("getComputedStyle(document.getElementById('period')).display") == "none"
    assert b.evaluate("document.querySelectorAll('img').length") == 0
    assert HOSTILE in b.evaluate("document.getElementById('chart-tokens-model').textContent")
    b.screenshot(ARTIFACTS / "dashboard-static.png")
