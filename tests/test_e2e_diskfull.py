"""The usage log on a disk that fills up: a real small tmpfs under a real mitmdump.

Needs permission to mount (root, as in CI's container); skipped elsewhere. Unit tests of
the writer (tests/test_usagelog.py) cover ENOSPC and short writes without a mount.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import Gateway, KeySpec, eventually

SIZE = 256 * 1024
BODY = {"model": "llama3.2", "prompt": "x", "stream": False}


def _mount(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)],
                       capture_output=True, timeout=10)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    logs = tmp_path / "gw" / "logs"
    if os.geteuid() != 0 or not _mount(logs):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield logs
    subprocess.run(["umount", "-l", str(logs)], capture_output=True, timeout=10)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 64, 8, 1):
            while True:
                try:
                    if os.write(fd, b"\0" * size) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def lines_of(path: Path) -> list[dict]:
    raw = path.read_bytes() if path.exists() else b""
    assert raw == b"" or raw.endswith(b"\n"), "torn last line"
    return [json.loads(x) for x in raw.splitlines()]


def test_full_disk_keeps_serving_and_loses_no_line(small_disk, fake, tmp_path):
    quota = 80
    keys = {"q": KeySpec("q", settings={"limits": {"requests_per_day": quota}})}
    gw = Gateway(tmp_path / "gw", fake.url, keys=keys).start()
    try:
        with httpx.Client(timeout=10, headers=keys["q"].auth) as h:
            ids = [h.post(gw.url + "/api/generate", json=BODY).headers["x-keygate-request-id"]
                   for _ in range(2)]
            assert eventually(lambda: len(lines_of(gw.usage_log)) == 2)

            filler = fill(small_disk)
            # Served while nothing can be written. (The log's last page may still take a few
            # lines: tmpfs allocates whole pages, so keep going until a write fails.)
            for _ in range(60):
                r = h.post(gw.url + "/api/generate", json=BODY)
                assert r.status_code == 200
                ids.append(r.headers["x-keygate-request-id"])
                if any("cannot write usage log" in x for x in gw.lines):
                    break
            gw.wait_for(r"cannot write usage log .*(No space left on device|short write)",
                        timeout=5)
            for _ in range(3):
                r = h.post(gw.url + "/api/generate", json=BODY)
                assert r.status_code == 200
                ids.append(r.headers["x-keygate-request-id"])
            written = lines_of(gw.usage_log)  # whole lines only, never a torn one
            assert len(written) < len(ids)
            assert [x["id"] for x in written] == ids[:len(written)]

            filler.unlink()  # space again: the held lines go out, in order, whole
            assert eventually(lambda: len(lines_of(gw.usage_log)) == len(ids), timeout=10)
            gw.wait_for(r"writable again: wrote \d+ held records", timeout=5)
            assert [x["id"] for x in lines_of(gw.usage_log)] == ids
            assert len(ids) < quota

            # The quota counted every request, the ones held in memory included.
            for _ in range(quota - len(ids)):
                assert h.post(gw.url + "/api/generate", json=BODY).status_code == 200
            r = h.post(gw.url + "/api/generate", json=BODY)
            assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
    finally:
        gw.stop()

    # After a restart the counters come from the log, and still agree.
    gw2 = Gateway(tmp_path / "gw", fake.url, keys=keys).start()
    try:
        with httpx.Client(timeout=10, headers=keys["q"].auth) as h:
            r = h.post(gw2.url + "/api/generate", json=BODY)
        assert r.status_code == 429 and r.headers["x-keygate-error"] == "insufficient_quota"
        recs = lines_of(gw2.usage_log)
        assert sum(1 for x in recs if x["key"] == "q" and x["error"] is None) == quota
    finally:
        gw2.stop()
