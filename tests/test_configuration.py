"""keygate/stages/config.py: the Config addon's start-up work."""

from __future__ import annotations

import asyncio
import errno
import logging
import time

import pytest
from mitmproxy.addons.block import Block
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from keygate.model import keyring as keys
from keygate.model.settings import ConfigError
from keygate.stages import config as configuration
from keygate.stages.config import Config


def test_start_up_objects_are_frozen_once_per_process(monkeypatch, tmp_path):
    (tmp_path / "keys.yaml").write_text("keys:\n  alice:\n    key: sk-alice-0123456789\n")
    (tmp_path / "gateway.toml").write_text('[gateway]\nkeys_file = "keys.yaml"\n')
    frozen: list[int] = []
    monkeypatch.setattr(configuration.gc, "freeze", lambda: frozen.append(len(frozen)))
    monkeypatch.setattr(configuration, "_frozen", False)

    async def main():
        with taddons.context(Proxyserver(), Block()) as tctx:
            config = Config()
            tctx.master.addons.add(config)
            tctx.configure(config, keygate_config=str(tmp_path / "gateway.toml"))
            config.running()
            assert frozen == [0]  # after the keys were read: they are part of what is frozen
            assert len(config.state.keys) == 1
            config.done()
            tctx.master.addons.remove(config)
            # A reload of gateway.py makes a new Config and runs it: no second freeze,
            # which would also freeze the flows then in flight.
            again = Config()
            tctx.master.addons.add(again)
            tctx.configure(again, keygate_config=str(tmp_path / "gateway.toml"))
            again.running()
            again.done()

    asyncio.run(main())
    assert frozen == [0]


# --------------------------------------------------------------------------- the watcher


def test_fingerprint_sees_a_change_of_mode(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys: {}\n")
    before = configuration._fingerprint(f)
    deadline = time.monotonic() + 2
    while configuration._fingerprint(f) == before and time.monotonic() < deadline:
        time.sleep(0.01)  # the ctime clock ticks coarsely
        f.chmod(0o600 if f.stat().st_mode & 0o044 else 0o644)
    after = configuration._fingerprint(f)
    assert after != before and after[:3] == before[:3]  # inode, size, mtime unchanged


@pytest.mark.parametrize("error, unreadable", [
    (PermissionError(13, "Permission denied"), True),
    (ConfigError("keys.yaml: cannot read: not a regular file"), True),
    (ConfigError("gateway.toml: cannot read: the file is gone"), True),
    (ConfigError("keys.yaml:3: key 'alice': key_sha256 must be 64 hex digits"), False),
    (ConfigError("keys.yaml: the file is empty (to revoke every key, write 'keys: {}')"), False),
    (ValueError("surprise"), False),
])
def test_unreadable(error, unreadable):
    assert configuration._unreadable(error) is unreadable


def test_unreadable_by_cause():
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as e:
            raise ConfigError("keys.yaml: Too many open files") from e
    except ConfigError as e:
        assert configuration._unreadable(e)
    try:
        try:
            b"\xff".decode()
        except UnicodeDecodeError as e:
            raise ConfigError(f"gateway.toml: cannot read: {e}") from e
    except ConfigError as e:
        assert not configuration._unreadable(e)  # it was read: what it holds is wrong


KEYS = "keys:\n  alice:\n    key: sk-alice-0123456789\n"
REVOKED = "keys:\n  alice:\n    key: sk-alice-0123456789\n    enabled: false\n"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def watch(tmp_path, monkeypatch, scenario) -> None:
    """Run Config's watcher, polling every 10 ms, through `scenario(config, clock, reads)`;
    `reads` lists the outcome of each read of keys.yaml, and `reads.fail` set to an
    OSError makes reads fail with it, as keys.load_keys reports one."""
    (tmp_path / "keys.yaml").write_text(KEYS)
    (tmp_path / "gateway.toml").write_text('[gateway]\nkeys_file = "keys.yaml"\n')
    monkeypatch.setattr(configuration, "POLL_INTERVAL", 0.01)
    monkeypatch.setattr(configuration, "_frozen", True)
    load_keys = keys.load_keys

    class Reads(list):
        fail: OSError | None = None

    reads = Reads()

    def reading(path, cache=None):
        if reads.fail is not None:
            reads.append("failed")
            raise ConfigError(f"{path}: cannot read: {reads.fail.strerror}") from reads.fail
        try:
            ring = load_keys(path, cache)
        except ConfigError:
            reads.append("invalid")
            raise
        reads.append("read")
        return ring

    monkeypatch.setattr(keys, "load_keys", reading)

    async def main():
        with taddons.context() as tctx:
            clock = Clock()
            config = Config(clock=clock)
            tctx.master.addons.add(config)
            tctx.configure(config, keygate_config=str(tmp_path / "gateway.toml"))
            reads.clear()
            task = asyncio.get_running_loop().create_task(config._watch())
            try:
                await scenario(config, clock, reads)
            finally:
                task.cancel()

    asyncio.run(main())


async def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def alice_enabled(config: Config) -> bool:
    return config.state.keys.by_name["alice"].enabled


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name == "keygate"]


def test_a_failed_read_is_retried_while_the_file_stays_the_same(tmp_path, monkeypatch, caplog):
    keys_file = tmp_path / "keys.yaml"

    async def scenario(config, clock, reads):
        assert alice_enabled(config)
        reads.fail = OSError(errno.EMFILE, "Too many open files")
        keys_file.write_text(REVOKED)
        fingerprint = configuration._fingerprint(keys_file)
        await until(lambda: len(reads) >= 5)
        assert set(reads) == {"failed"} and alice_enabled(config)
        # Retried on every poll, logged once (then once a minute while it lasts).
        assert errors(caplog) == [
            f"keygate: {keys_file}: cannot read: Too many open files; "
            "keeping the last good configuration"]
        clock.t += configuration.RELOG_INTERVAL
        await until(lambda: len(errors(caplog)) == 2)
        n = len(reads)
        await until(lambda: len(reads) >= n + 3)
        assert len(errors(caplog)) == 2
        # Readable again, the file as it was all along: the revocation takes effect.
        assert configuration._fingerprint(keys_file) == fingerprint
        reads.fail = None
        await until(lambda: not alice_enabled(config))
        assert reads[-1] == "read"
        n = len(reads)
        await asyncio.sleep(0.1)
        assert len(reads) == n  # read once: nothing more to read

    with caplog.at_level(logging.INFO, logger="keygate"):
        watch(tmp_path, monkeypatch, scenario)
    assert any("reloaded configuration (1 keys" in r.getMessage() for r in caplog.records)


def test_an_invalid_file_is_read_again_only_when_it_changes(tmp_path, monkeypatch, caplog):
    keys_file = tmp_path / "keys.yaml"
    bad = "keys:\n  alice:\n    key: short\n"

    async def scenario(config, clock, reads):
        keys_file.write_text(bad)
        await until(lambda: reads == ["invalid"])
        await asyncio.sleep(0.15)  # 15 polls
        assert reads == ["invalid"] and len(errors(caplog)) == 1
        # Written again, even with the same mistake: read again and said again.
        time.sleep(0.01)
        keys_file.write_text(bad)
        await until(lambda: reads == ["invalid", "invalid"])
        assert len(errors(caplog)) == 2 and errors(caplog)[0] == errors(caplog)[1]
        keys_file.write_text(REVOKED)
        await until(lambda: not alice_enabled(config))
        assert reads == ["invalid", "invalid", "read"]

    with caplog.at_level(logging.INFO, logger="keygate"):
        watch(tmp_path, monkeypatch, scenario)

