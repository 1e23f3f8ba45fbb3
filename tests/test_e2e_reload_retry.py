"""End to end: an edit of keys.yaml that keygate could not read when it was made takes
effect within 2 s of the file becoming readable (docs/configuration.md), whether or not the file
itself
changes meanwhile: a failed read is tried again until it succeeds."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from conftest import Gateway, KeySpec, default_keys, eventually, keys_yaml

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
CANNOT_READ = r"(keys\.yaml|gateway\.toml): cannot read: .*{}.*; keeping the last good"


def chat(gw, name: str) -> int:
    return httpx.post(gw.url + "/api/chat", json=CHAT, timeout=10,
                      headers=gw.key(name).auth).status_code


def with_bob() -> dict[str, KeySpec]:
    return {**default_keys(), "bob": KeySpec("bob")}


def revoked(keys: dict[str, KeySpec], name: str) -> dict[str, KeySpec]:
    return {**keys, name: KeySpec(name, keys[name].secret, {"enabled": False})}


def lines_matching(gw, pattern: str, after: int) -> list[str]:
    return [x for x in gw.lines[after:] if re.search(pattern, x)]


@pytest.mark.skipif(not (hasattr(__import__("resource"), "prlimit")
                          and os.path.isdir("/proc/self/fd")), reason="needs prlimit(2), /proc")
def test_a_revocation_read_while_out_of_file_descriptors_takes_effect_afterwards(
        fake, make_gateway):
    """keygate runs out of file descriptors (a busy gateway under a low `ulimit -n`) just as
    a revocation is written: the read fails, and nothing about keys.yaml changes when
    descriptors are free again. The watcher must read it again by itself."""
    import resource

    keys = with_bob()
    gw = make_gateway(fake.url, keys=keys).start()
    assert chat(gw, "bob") == 200
    gw.settled_count()  # its usage line written: nothing else to open meanwhile
    pid = gw.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
    mark = len(gw.lines)
    try:
        # No descriptor free below the limit: every open() fails with EMFILE.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        gw.keys_file.write_text(keys_yaml(revoked(keys, "bob")))
        gw.wait_for(CANNOT_READ.format("Too many open files"), timeout=5, after=mark)
        stat = gw.keys_file.stat()
        # Several polls while the read keeps failing: the error is logged once, not on
        # every poll.
        eventually(lambda: False, timeout=1.6)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    freed = len(gw.lines)
    after = gw.keys_file.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (
        stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    assert len(lines_matching(gw, "cannot read", mark)) == 1, gw.output

    assert eventually(lambda: chat(gw, "bob") == 401, timeout=2.5), gw.output[-2000:]
    assert lines_matching(gw, r"reloaded configuration \(9 keys", freed)
    assert chat(gw, "alice") == 200


def unprivileged_user() -> pwd.struct_passwd | None:
    for name in ("nobody", "daemon"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    return None


@pytest.fixture
def as_unprivileged(monkeypatch):
    """A directory an unprivileged user owns, and conftest's Gateway made to run mitmdump
    as that user, where keygate's file permissions hold (root reads any file)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run mitmdump as another user")
    user, setpriv = unprivileged_user(), shutil.which("setpriv")
    if user is None or setpriv is None:
        pytest.skip("needs an unprivileged user (nobody) and setpriv")
    home = Path(tempfile.mkdtemp(prefix="keygate-unpriv-"))
    try:
        os.chmod(home, 0o755)
        conftest = sys.modules[Gateway.__module__]
        wrapper = home / "mitmdump"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"exec {setpriv} --reuid={user.pw_uid} --regid={user.pw_gid} --clear-groups "
            f'-- {conftest.MITMDUMP} "$@"\n')
        wrapper.chmod(0o755)
        env = {"HOME": str(home)}  # mitmproxy reads ~/.mitmproxy: not root's
        probe = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True,
                               timeout=60, env={**os.environ, **env}, cwd=home)
        if probe.returncode != 0:
            pytest.skip(f"mitmdump does not run as {user.pw_name}: {probe.stderr[-300:]}")
        monkeypatch.setattr(conftest, "MITMDUMP", str(wrapper))

        def workdir(name: str) -> Path:
            d = home / name
            for sub in (d, d / "logs", d / "confdir"):
                sub.mkdir()
                os.chown(sub, user.pw_uid, user.pw_gid)
            return d

        yield workdir, env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_revocation_unreadable_at_first_takes_effect_once_readable(fake, as_unprivileged):
    """The operator writes a revocation with a umask that leaves keys.yaml unreadable to
    the user keygate runs as, sees "Permission denied" in the log, and fixes the mode."""
    workdir, env = as_unprivileged
    keys = with_bob()
    gw = Gateway(workdir("gw"), fake.url, keys=keys, env=env)
    try:
        gw.start()
        assert chat(gw, "bob") == 200
        mark = len(gw.lines)
        tmp = gw.keys_file.with_name("keys.yaml.tmp")
        tmp.write_text(keys_yaml(revoked(keys, "bob")))
        tmp.chmod(0o600)  # root's, unreadable to keygate
        tmp.replace(gw.keys_file)
        gw.wait_for(CANNOT_READ.format("Permission denied"), timeout=5, after=mark)
        eventually(lambda: False, timeout=1.2)  # a few polls of the same unreadable file
        assert chat(gw, "bob") == 200  # the last good configuration stays in force
        assert len(lines_matching(gw, "cannot read", mark)) == 1, gw.output

        gw.keys_file.chmod(0o644)  # only the mode changes: not content, size or mtime
        assert eventually(lambda: chat(gw, "bob") == 401, timeout=2.5), gw.output[-2000:]
        assert chat(gw, "alice") == 200
    finally:
        gw.stop()
