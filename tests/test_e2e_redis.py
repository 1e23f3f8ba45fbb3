"""End to end: limits shared through a real Redis by several keygate processes
(docs/shared-state.md, docs/limits.md): three mitmdump instances on three ports, one
redis-server, 64 concurrent clients; restarts, a flushed Redis, a Redis that dies under
load, `keygate serve --workers 2`, and bad Redis settings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Gateway, KeySpec, default_keys, eventually, free_port, keys_yaml
from helpers.redisserver import RedisServer, needs_redis

pytestmark = needs_redis

CLIENTS = 64
LIMITS = {
    "rpm": {"rpm": 20},
    "rpd": {"requests_per_day": 25},
    "tpd": {"tokens_per_day": 40},
    "total": {"tokens_total": 60},
    "tpm": {"tpm": 50},
    "conc": {"concurrent": 4},
}


def shared_keys() -> dict[str, KeySpec]:
    keys = default_keys()
    for name, limits in LIMITS.items():
        keys[name] = KeySpec(name, settings={"limits": limits})
    return keys


def body(tag: str, stream: bool = False) -> dict:
    # 3 prompt words + the fake's 5 reply words: 8 tokens; the first word tells the key.
    return {"model": "llama3.2", "prompt": f"{tag} b c", "stream": stream}


def reached(fake, tag: str, since: int = 0) -> int:
    """Requests of `tag` the upstream received."""
    return sum(1 for r in fake.requests[since:]
               if isinstance(r.json, dict) and str(r.json.get("prompt", "")).startswith(tag + " "))


@pytest.fixture
def redis(tmp_path):
    r = RedisServer(tmp_path / "redis").start()
    try:
        yield r
    finally:
        r.stop()


def cluster(tmp_path: Path, upstream: str, url: str, n: int = 3, keys=None,
            extra: str = "") -> list[Gateway]:
    """n keygate instances sharing `url` and one log folder (each its own file)."""
    keys = keys or shared_keys()
    logs = tmp_path / "logs"
    gws = []
    for i in range(n):
        gw = Gateway(tmp_path / f"gw{i}", upstream, keys=keys,
                     gateway_toml=f'redis_url = "{url}"\n{extra}',
                     env={"KEYGATE_WORKER": str(i + 1)})
        gw.config.write_text(f'[gateway]\nusage_log = "{logs}/usage.jsonl"\n'
                             f'redis_url = "{url}"\n{extra}')
        gws.append(gw)
    for gw in gws:
        gw.start()
    return gws


def restart(gw: Gateway) -> Gateway:
    """Start a stopped instance again (a new port: the one in its newest lines)."""
    n = len(gw.lines)
    gw.start(wait=False)
    line = gw.wait_for(r"listening at .*:(\d+)", after=n)
    gw.port = int(re.search(r"listening at .*:(\d+)", line).group(1))
    gw.wait_for(r"keygate: usage counters rebuilt", after=n)
    return gw


def stop_all(gws: list[Gateway]) -> None:
    for gw in gws:
        gw.stop()


def lines(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("usage*.jsonl")):
        out += [json.loads(x) for x in p.read_text().split("\n") if x.strip()]
    return out


def storm(gws: list[Gateway], key: KeySpec, tag: str, n: int = CLIENTS,
          stream: bool = False) -> list[httpx.Response]:
    """n requests at once from n clients, spread over the instances."""
    start = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with httpx.Client(timeout=30) as c:
            start.wait()
            return c.post(gws[i % len(gws)].url + "/api/generate", json=body(tag, stream),
                          headers=key.auth)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def codes(responses) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def test_three_instances_hold_every_limit_and_carry_on_after_restarts(fake, redis, tmp_path):
    gws = cluster(tmp_path, fake.url, redis.url)
    keys = gws[0].keys
    try:
        # rpm, requests_per_day: exactly the limit of 64 at once, whichever instance.
        for tag, limit in (("rpm", 20), ("rpd", 25)):
            before = len(fake.requests)
            got = storm(gws, keys[tag], tag)
            assert codes(got) == {200: limit, 429: CLIENTS - limit}, (tag, codes(got))
            assert reached(fake, tag, before) == limit
        # concurrent: 64 streams held open by the upstream; exactly 4 get through.
        fake.gate = threading.Event()
        try:
            before = len(fake.requests)
            pool = ThreadPoolExecutor(CLIENTS)
            futures = [pool.submit(lambda i=i: httpx.post(
                gws[i % 3].url + "/api/generate", json=body("conc", True),
                headers=keys["conc"].auth, timeout=30)) for i in range(CLIENTS)]
            assert eventually(lambda: sum(f.done() for f in futures) >= CLIENTS - 4, 20)
            time.sleep(0.3)
            assert sum(f.done() for f in futures) == CLIENTS - 4
            assert all(f.result().status_code == 429 for f in futures if f.done())
        finally:
            fake.gate.set()
            fake.gate = None
        assert codes([f.result() for f in futures]) == {200: 4, 429: CLIENTS - 4}
        pool.shutdown()
        assert reached(fake, "conc", before) == 4
        # The slots are free again once they ended.
        assert httpx.post(gws[1].url + "/api/generate", json=body("conc"),
                          headers=keys["conc"].auth, timeout=10).status_code == 200
        # Token quotas: the crossing request completes, the next is refused; over all three
        # instances the quota is exceeded by at most the last request's tokens less one.
        for tag, limit in (("tpd", 40), ("total", 60), ("tpm", 50)):
            before = len(fake.requests)
            for _ in range(4):
                storm(gws, keys[tag], tag, n=16)
                time.sleep(0.2)
            used = 8 * reached(fake, tag, before)
            assert limit <= used <= limit + 7, (tag, used)
            final = httpx.post(gws[2].url + "/api/generate", json=body(tag),
                               headers=keys[tag].auth, timeout=10)
            assert final.status_code == 429
        # Restart every instance: the counters carry on.
        stop_all(gws)
        for gw in gws:
            restart(gw)
        for tag in ("rpd", "tpd", "total"):
            r = httpx.post(gws[0].url + "/api/generate", json=body(tag),
                           headers=keys[tag].auth, timeout=10)
            assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
        assert httpx.post(gws[0].url + "/api/generate", json=body("a"),
                          headers=keys["alice"].auth, timeout=10).status_code == 200
        # Every instance served, and named itself in its lines.
        instances = {rec["instance"] for rec in lines(tmp_path / "logs")}
        assert len(instances) == 3 and all(re.search(r"/[123]$", i) for i in instances)
    finally:
        stop_all(gws)


def restore(config: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keygate.cli.main", "usage", "--config",
                           str(config), "--restore-counters"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, **(env or {}),
                                                     "PYTHONPATH": str(ROOT / "addons")})


def test_flushed_redis_gets_day_and_total_quotas_back_from_the_logs(fake, redis, tmp_path):
    keys = default_keys()
    keys["rpd"] = KeySpec("rpd", settings={"limits": {"requests_per_day": 5}})
    keys["total"] = KeySpec("total", settings={"limits": {"tokens_total": 30}})
    gws = cluster(tmp_path, fake.url, redis.url, n=2, keys=keys)
    try:
        for i in range(5):
            assert httpx.post(gws[i % 2].url + "/api/generate", json=body("rpd"),
                              headers=keys["rpd"].auth, timeout=10).status_code == 200
        assert [httpx.post(gws[i % 2].url + "/api/generate", json=body("total"),
                           headers=keys["total"].auth, timeout=10).status_code
                for i in range(5)] == [200, 200, 200, 200, 429]
        time.sleep(0.5)  # the lines land
        client = redis.client()
        # Flushed while keygate runs: it sees the marker gone and rebuilds the counters.
        n = [len(gw.lines) for gw in gws]
        client.flushall()
        assert eventually(lambda: any("rebuilt from the usage logs" in "".join(gw.lines[i:])
                                      for gw, i in zip(gws, n)), 10)
        assert client.hget("keygate:{rpd}:all", "t") == str(5 * 8)
        assert client.hget("keygate:{total}:all", "t") == str(4 * 8)
        for gw in gws:
            r = httpx.post(gw.url + "/api/generate", json=body("rpd"),
                           headers=keys["rpd"].auth, timeout=10)
            assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
        # Flushed again: keygate usage --restore-counters puts them back too.
        client.flushall()
        out = restore(gws[0].config)
        assert out.returncode == 0, out.stderr
        assert "rebuilt" in out.stderr
        assert client.hget("keygate:{rpd}:all", "t") == str(5 * 8)
        assert client.hget("keygate:{total}:all", "t") == str(4 * 8)
        for gw in gws:
            r = httpx.post(gw.url + "/api/generate", json=body("rpd"),
                           headers=keys["rpd"].auth, timeout=10)
            assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
            r = httpx.post(gw.url + "/api/generate", json=body("total"),
                           headers=keys["total"].auth, timeout=10)
            assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
        # Lost again, and a keygate starts: it rebuilds them itself (the marker is gone).
        stop_all(gws)
        client.flushall()
        n = len(gws[0].lines)
        restart(gws[0])
        gws[0].wait_for(r"rebuilt from the usage logs", after=n)
        r = httpx.post(gws[0].url + "/api/generate", json=body("total"),
                       headers=keys["total"].auth, timeout=10)
        assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
    finally:
        stop_all(gws)


def load(gws, key: KeySpec, tag: str, stop: threading.Event, results: list) -> None:
    i = 0
    with httpx.Client(timeout=10) as c:
        while not stop.is_set():
            try:
                r = c.post(gws[i % len(gws)].url + "/api/generate", json=body(tag),
                           headers=key.auth)
                results.append((time.monotonic(), r.status_code,
                                r.headers.get("x-keygate-error"),
                                r.headers.get("x-keygate-request-id")))
            except httpx.HTTPError as e:
                results.append((time.monotonic(), 0, type(e).__name__, None))
            i += 1


@pytest.mark.parametrize("failure", ["closed", "local"])
def test_redis_dies_under_load(fake, redis, tmp_path, failure):
    keys = default_keys()
    keys["lim"] = KeySpec("lim", settings={"limits": {"rpm": 100000}})
    gws = cluster(tmp_path, fake.url, redis.url, n=2, keys=keys,
                  extra=f'redis_failure = "{failure}"\n')
    stop = threading.Event()
    results: list = []
    free: list = []
    threads = [threading.Thread(target=load, args=(gws, keys["lim"], "lim", stop, results))
               for _ in range(6)]
    threads.append(threading.Thread(target=load, args=(gws, keys["alice"], "free", stop,
                                                        free)))
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        redis.kill()
        down = time.monotonic()
        time.sleep(3)
        back = time.monotonic()
        redis.start()  # same port, no data
        up = time.monotonic()
        time.sleep(6)
        stop.set()
        for t in threads:
            t.join(20)
        during = [r for r in results if down + 1.2 < r[0] < back]
        after = [r for r in results if r[0] > up + 5]
        assert during and after
        if failure == "closed":
            assert {r[1] for r in during} == {503}
            assert {r[2] for r in during} == {"gateway_unavailable"}
        else:
            assert {r[1] for r in during} == {200}
            assert any("limits are counted by this process alone" in gw.output
                       or "Redis unreachable" in gw.output for gw in gws)
        assert {r[1] for r in after} == {200}
        assert {r[1] for r in free} == {200}  # keys without limits never waited on Redis
        # Every answer has its line.
        time.sleep(1)
        ids = {rec["id"] for rec in lines(tmp_path / "logs")}
        answered = [r[3] for r in results + free if r[3]]
        assert len(answered) == len(results) + len(free)
        assert set(answered) <= ids
        for gw in gws:
            assert gw.proc.poll() is None
            assert "Traceback" not in gw.output
        # Redis came back empty: its day counter was rebuilt from the logs, and counted
        # on: exact but for the requests of the moment it came back (one per client in
        # flight; those logged while the rebuild read the logs count twice).
        admitted = len([rec for rec in lines(tmp_path / "logs")
                        if rec["key"] == "lim" and rec["status"] == 200])
        day = time.strftime("%Y-%m-%d", time.gmtime())
        counted = int(redis.client().hget(f"keygate:{{lim}}:d:{day}", "r") or 0)
        assert admitted - 6 <= counted <= admitted + 24, (counted, admitted)
    finally:
        stop.set()
        stop_all(gws)


@contextlib.contextmanager
def not_redis():
    """A TCP server that answers whatever it is sent as a web server does."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.settimeout(2)
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        t.join(2)
        server.close()


def start_failing(tmp_path: Path, upstream: str, url: str) -> tuple[int, str]:
    gw = Gateway(tmp_path, upstream, gateway_toml=f'redis_url = "{url}"\n')
    gw.start(wait=False)
    try:
        code = gw.proc.wait(30)
    except subprocess.TimeoutExpired:
        gw.stop()
        raise AssertionError("keygate kept running:\n" + gw.output)
    return code, gw.output


def test_bad_redis_settings_stop_start_up_and_are_refused_on_reload(fake, tmp_path):
    pw = RedisServer(tmp_path / "pw", password="right-one").start()
    try:
        code, out = start_failing(tmp_path / "a", fake.url,
                                  f"redis://:wrong-one@127.0.0.1:{pw.port}/0")
        assert code != 0 and "credentials" in out and "wrong-one" not in out
        # A web server, not Redis: it answers a Redis command with an HTTP 400.
        with not_redis() as port:
            code, out = start_failing(tmp_path / "b", fake.url, f"redis://127.0.0.1:{port}/0")
        assert code != 0 and "does not answer as Redis" in out
        code, out = start_failing(tmp_path / "c", fake.url, "redis://127.0.0.1:notaport/0")
        assert code != 0 and "redis_url: the Redis URL does not parse" in out
        # Reload: a bad URL is refused, the last good one stays in force.
        keys = default_keys()
        keys["lim"] = KeySpec("lim", settings={"limits": {"requests_per_day": 2}})
        gw = Gateway(tmp_path / "d", fake.url, keys=keys,
                     gateway_toml=f'redis_url = "{pw.url}"\n').start()
        try:
            assert httpx.post(gw.url + "/api/generate", json=body("x"),
                              headers=keys["lim"].auth, timeout=10).status_code == 200
            n = len(gw.lines)
            gw.config.write_text(gw.config.read_text().replace("right-one", "bad-pass"))
            gw.wait_for(r"redis_url: Redis refused the credentials", after=n, timeout=10)
            assert "bad-pass" not in gw.output
            got = [httpx.post(gw.url + "/api/generate", json=body("x"),
                              headers=keys["lim"].auth, timeout=10).status_code
                   for _ in range(2)]
            assert got == [200, 429]
            assert pw.client().hget("keygate:{lim}:all", "r") == "2"
        finally:
            gw.stop()
    finally:
        pw.stop()


def test_serve_workers_share_one_port(fake, redis, tmp_path):
    keys = default_keys()
    keys["rpd"] = KeySpec("rpd", settings={"limits": {"requests_per_day": 30}})
    keys["conc"] = KeySpec("conc", settings={"limits": {"concurrent": 6}})
    config = tmp_path / "gateway.toml"
    (tmp_path / "keys.yaml").write_text(keys_yaml(keys))
    config.write_text(f'[gateway]\nusage_log = "logs/usage.jsonl"\nredis_url = "{redis.url}"\n')
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "addons"), "PYTHONUNBUFFERED": "1"}
    # Without redis_url: refused.
    plain = tmp_path / "plain.toml"
    plain.write_text('[gateway]\nkeys_file = "keys.yaml"\n')
    out = subprocess.run([sys.executable, "-m", "keygate.cli.main", "serve", "--workers", "2",
                          "--config", str(plain), "--listen", f"127.0.0.1:{port}",
                          "--upstream", fake.url], capture_output=True, text=True, timeout=60,
                         env=env, cwd=tmp_path)
    assert out.returncode != 0 and "redis_url" in out.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "keygate.cli.main", "serve", "--workers", "2", "--config",
         str(config), "--listen", f"127.0.0.1:{port}", "--upstream", fake.url, "--",
         "--set", "flow_detail=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        start_new_session=True)
    from conftest import Output

    output = Output("serve", proc, proc.stdout)
    try:
        for _ in range(2):
            output.wait_for(r"usage counters rebuilt", timeout=60)
        assert eventually(lambda: len(re.findall(r"usage counters rebuilt", output.text)) >= 2,
                          30)
        # Many connections: the kernel spreads them over both workers.
        got = storm([type("G", (), {"url": f"http://127.0.0.1:{port}"})()], keys["rpd"], "w",
                    n=CLIENTS)
        assert codes(got) == {200: 30, 429: CLIENTS - 30}
        for _ in range(40):
            httpx.post(f"http://127.0.0.1:{port}/api/generate", json=body("a"),
                       headers=keys["alice"].auth, timeout=10)
        # A worker that dies is started again.
        time.sleep(0.5)  # (the lines of the requests answered are written)
        pids = [int(m) for m in re.findall(r"worker \d+ started \(pid (\d+)\)", output.text)]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        output.wait_for(r"worker 1 exited .*again", timeout=30)
        assert eventually(lambda: len(re.findall(r"usage counters rebuilt", output.text)) >= 3,
                          60)
        sent = 0
        for _ in range(20):
            r = httpx.post(f"http://127.0.0.1:{port}/api/generate", json=body("a"),
                           headers=keys["alice"].auth, timeout=10)
            sent += r.status_code == 200
        assert sent == 20
        # SIGTERM while six streams are held open: they finish during the drain, and
        # leave nothing counted in flight in Redis.
        fake.gate = threading.Event()
        pool = ThreadPoolExecutor(6)
        since = len(fake.requests)
        held = [pool.submit(lambda: httpx.post(
            f"http://127.0.0.1:{port}/api/generate", json=body("conc", True),
            headers=keys["conc"].auth, timeout=30)) for _ in range(6)]
        assert eventually(lambda: reached(fake, "conc", since) == 6, 10)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        fake.gate.set()
        assert [f.result().status_code for f in held] == [200] * 6
        pool.shutdown()
    finally:
        fake.gate = None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = output.all()
    assert proc.returncode == 0, text
    # The operator is told what SIGTERM does, and when it is done.
    assert "SIGTERM: stopping the workers" in text
    assert text.rstrip().endswith("keygate serve: every worker has stopped"), text[-500:]
    # Nothing is left running, and every answer has its line.
    for pid in [int(m) for m in re.findall(r"started \(pid (\d+)\)", text)]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()
    recs = lines(tmp_path / "logs")
    alice = [r for r in recs if r["key"] == "alice"]
    assert len(alice) == 60
    assert len([r for r in recs if r["key"] == "rpd"]) == CLIENTS
    assert len({r["instance"] for r in recs}) >= 2
    assert len([r for r in recs if r["key"] == "conc" and r["status"] == 200]) == 6
    assert redis.client().zcard("keygate:{conc}:fl") == 0


def test_a_redis_not_up_yet_is_waited_for_not_fatal(fake, tmp_path):
    """compose starts Redis and keygate together: keygate starts, applies redis_failure,
    and uses Redis once it answers."""
    keys = default_keys()
    keys["lim"] = KeySpec("lim", settings={"limits": {"rpm": 1000}})
    r = RedisServer(tmp_path / "redis")
    gw = Gateway(tmp_path / "gw", fake.url, keys=keys,
                 gateway_toml=f'redis_url = "{r.url}"\n').start()
    try:
        assert "starting with redis_failure = 'closed'" in gw.output, gw.output
        got = httpx.post(gw.url + "/api/generate", json=body("x"), headers=keys["lim"].auth,
                         timeout=10)
        assert got.status_code == 503 and got.headers["x-keygate-error"] == "gateway_unavailable"
        assert httpx.post(gw.url + "/api/generate", json=body("x"),
                          headers=keys["alice"].auth, timeout=10).status_code == 200
        r.start()
        up = time.monotonic()
        assert eventually(lambda: httpx.post(
            gw.url + "/api/generate", json=body("x"), headers=keys["lim"].auth,
            timeout=10).status_code == 200, 10)
        assert time.monotonic() - up < 5
        assert r.client().hget("keygate:{lim}:all", "r") == "1"
    finally:
        gw.stop()
        r.stop()
