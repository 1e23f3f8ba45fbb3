"""End to end: per-key limits and quotas under a running mitmdump (docs/limits.md), and
scripts/keys operating on the keys.yaml a running keygate watches."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time

import httpx
import pytest

from conftest import ROOT, KeySpec, default_keys

GEN = {"model": "llama3.2", "prompt": "a b c", "stream": False}  # 3 + 5 = 8 tokens


def limited(**limits) -> dict:
    keys = default_keys()
    keys["lim"] = KeySpec("lim", settings={"limits": limits})
    return keys


def post(gw, name="lim", body=GEN, path="/api/generate"):
    return httpx.post(gw.url + path, json=body, headers=gw.key(name).auth, timeout=10)


def test_a_streamed_upload_over_its_limit_gets_its_429(fake, make_gateway):
    """Blob uploads stream upstream as they arrive; refusing one after Policy set it to
    stream (here: the Limiter) must still answer, not hang the client."""
    keys = default_keys()
    keys["adm"] = KeySpec("adm", settings={"scopes": ["inference", "models", "admin"],
                                           "limits": {"rpm": 1}})
    gw = make_gateway(fake.url, keys=keys).start()
    blob = b"x" * 1000
    url = gw.url + "/api/blobs/sha256:" + hashlib.sha256(blob).hexdigest()
    first = httpx.post(url, content=blob, headers=gw.key("adm").auth, timeout=10)
    assert first.status_code < 400
    r = httpx.post(url, content=blob, headers=gw.key("adm").auth, timeout=10)
    assert r.status_code == 429 and r.headers["x-keygate-error"] == "rate_limit_exceeded"
    rec = gw.usage_for(r.headers["x-keygate-request-id"])
    assert rec["status"] == 429 and rec["completed"] is True
    assert "NotImplementedError" not in gw.output


def test_rpm_refuses_exactly_the_next_request(fake, make_gateway):
    gw = make_gateway(fake.url, keys=limited(rpm=3)).start()
    before = len(fake.requests)
    ok = [post(gw) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "3"
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
    r = post(gw)
    assert r.status_code == 429 and r.headers["x-keygate-error"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len(fake.requests) == before + 3
    # other keys are not affected
    assert post(gw, "alice").status_code == 200
    rec = gw.usage_for(r.headers["x-keygate-request-id"])
    assert rec["status"] == 429 and rec["channel"] is None


def test_refused_requests_do_not_count(fake, make_gateway):
    gw = make_gateway(fake.url, keys=limited(rpm=2)).start()
    for _ in range(5):  # refused by policy: not forwarded, so not counted
        assert post(gw, body={"model": "x-cloud"}).status_code == 403
    assert [post(gw).status_code for _ in range(3)] == [200, 200, 429]


def test_tpm_and_quotas_cross_then_refuse(fake, make_gateway):
    gw = make_gateway(fake.url, keys=limited(tpm=20)).start()
    codes = [post(gw).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]  # 8, 16, 24 (crossing completes), refused
    r = post(gw)
    assert r.headers["x-keygate-error"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_daily_quotas(fake, make_gateway):
    keys = default_keys()
    keys["req"] = KeySpec("req", settings={"limits": {"requests_per_day": 2}})
    keys["tok"] = KeySpec("tok", settings={"limits": {"tokens_per_day": 9}})
    gw = make_gateway(fake.url, keys=keys).start()
    assert [post(gw, "req").status_code for _ in range(3)] == [200, 200, 429]
    r = post(gw, "req")
    assert r.headers["x-keygate-error"] == "insufficient_quota"
    until_midnight = 86400 - (time.time() % 86400)
    assert abs(int(r.headers["retry-after"]) - until_midnight) <= 2
    assert [post(gw, "tok").status_code for _ in range(3)] == [200, 200, 429]


def test_concurrent_limit_with_held_streams(fake, make_gateway):
    gw = make_gateway(fake.url, keys=limited(concurrent=2)).start()
    gate = threading.Event()
    fake.gate = gate
    clients = [httpx.Client(timeout=15) for _ in range(2)]
    streams = []
    try:
        for c in clients:
            cm = c.stream("POST", gw.url + "/api/chat", headers=gw.key("lim").auth,
                          json={"model": "llama3.2",
                                "messages": [{"role": "user", "content": "x"}]})
            r = cm.__enter__()
            lines = r.iter_lines()
            next(lines)  # the stream is open and held by the upstream
            streams.append((cm, lines))
        third = post(gw, path="/api/chat", body={"model": "llama3.2", "stream": False,
                                                 "messages": [{"role": "user", "content": "x"}]})
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert third.headers["x-keygate-error"] == "rate_limit_exceeded"
    finally:
        gate.set()
        fake.gate = None
        for cm, lines in streams:
            for _ in lines:
                pass
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    # both streams ended: room again
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and post(gw).status_code != 200:
        time.sleep(0.1)
    assert post(gw).status_code == 200


def test_limit_edit_applies_without_resetting_counters(fake, make_gateway):
    keys = limited(requests_per_day=10)
    gw = make_gateway(fake.url, keys=keys).start()
    assert [post(gw).status_code for _ in range(3)] == [200, 200, 200]
    from conftest import keys_yaml
    keys["lim"] = KeySpec("lim", keys["lim"].secret, {"limits": {"requests_per_day": 4}})
    gw.keys_file.write_text(keys_yaml(keys))
    gw.wait_for(r"reloaded configuration", timeout=5)
    assert [post(gw).status_code for _ in range(2)] == [200, 429]


def keys_cli(gw, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "keys"), "--config", str(gw.config), *args],
                          capture_output=True, text=True, timeout=60)


def test_scripts_keys_against_a_running_gateway(fake, make_gateway):
    keys = limited(tokens_total=20)
    gw = make_gateway(fake.url, keys=keys).start()
    # add: the key alone on stdout, working within 2 s
    res = keys_cli(gw, "add", "carol", "--models", "llama3.2:*", "--rpm", "100")
    assert res.returncode == 0, res.stderr
    carol = res.stdout.strip()
    assert carol.startswith("sk-") and len(carol) == 51 and "\n" not in carol
    assert carol not in gw.keys_file.read_text()
    assert hashlib.sha256(carol.encode()).hexdigest() in gw.keys_file.read_text()

    def call(secret, body=GEN):
        return httpx.post(gw.url + "/api/generate", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {secret}"})

    deadline = time.monotonic() + 2.5
    while call(carol).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call(carol).status_code == 200
    assert call(carol, {"model": "qwen2.5:7b", "prompt": "x"}).status_code == 403

    # rotate keeps the name, so the counters: lim has used 16 of 20 tokens
    assert [post(gw).status_code for _ in range(2)] == [200, 200]
    res = keys_cli(gw, "rotate", "lim")
    assert res.returncode == 0, res.stderr
    new = res.stdout.strip()
    def version(secret):  # forwarded, but uses no tokens
        return httpx.get(gw.url + "/api/version", timeout=10,
                         headers={"Authorization": f"Bearer {secret}"}).status_code

    deadline = time.monotonic() + 2.5
    while version(new) == 401 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call(keys["lim"].secret).status_code == 401
    r = call(new)  # 16 + 8 = 24: crosses, completes
    assert r.status_code == 200, r.text
    r = call(new)
    assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"

    # revoke within 2 s
    assert keys_cli(gw, "revoke", "carol").returncode == 0
    deadline = time.monotonic() + 2.5
    while call(carol).status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert call(carol).status_code == 401

    listing = keys_cli(gw, "list")
    assert "carol" in listing.stdout and "lim" in listing.stdout
    for secret in (carol, new, keys["lim"].secret):
        assert secret not in listing.stdout and secret not in gw.output


@pytest.mark.parametrize("bad", [["add", "alice"], ["add", "x", "--allow-ips", "10.0.0.0/33"],
                                 ["add", "y", "--expires", "someday"],
                                 ["add", "z", "--scopes", "root"]])
def test_scripts_keys_refusals_leave_the_file_alone(fake, make_gateway, bad):
    gw = make_gateway(fake.url)
    before = gw.keys_file.read_bytes()
    res = keys_cli(gw, *bad)
    assert res.returncode != 0 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert gw.keys_file.read_bytes() == before
