"""keygate/stages/config.py: the Config addon reading gateway.toml and keys.yaml at start-up
and reloading them while running (docs/architecture.md#where-is-it-decided, Config reload):
a bad file at start-up is an OptionsError (mitmdump stops); a good edit is swapped in whole;
one that does not parse, or a file that had content and is gone or empty, keeps the last
good configuration and says why, naming file and line. The watcher runs as `running` starts
it, polling every 10 ms instead of 0.5 s."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.addons.block import Block
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from helpers.unit import keys_yaml, secret_of
from keygate.model import keyring
from keygate.model.settings import MB
from keygate.stages import config as configuration
from keygate.stages.config import Config, State

GATEWAY = """[gateway]
keys_file = "keys.yaml"
usage_log = "usage.jsonl"
max_body_mb = 4

[[channels]]
name = "local"
base_url = "http://127.0.0.1:11434"
"""

# (text, line): edits that do not parse or validate, and the line their error names
BAD_GATEWAY = [
    ("[gateway]\nmax_body_mb = \n", 2),
    ('[gateway]\nkeys_file = "keys.yaml"\nmax_body_mb = "big"\n', 3),
    (GATEWAY + 'priority = "high"\n', 6),  # a channel's errors name its [[channels]]
]
BAD_KEYS = [
    ("keys:\n  alice:\n    key: short\n", 3),
    ("keys:\n  alice:\n    key: sk-alice-0123456789\n    enabled: maybe\n", 4),
    ("keys:\n  alice:\n    key: sk-alice-0123456789\n  bob: [\n", 5),
]


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    gateway, keys = tmp_path / "gateway.toml", tmp_path / "keys.yaml"
    gateway.write_text(GATEWAY)
    keys.write_text(keys_yaml({"alice": {}}))
    return gateway, keys


def replace(path: Path, text: str) -> None:
    """Write as scripts/keys does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def key_names(state: State) -> set[str]:
    return set(state.keys.by_name)


def valid(state: State, name: str) -> bool:
    """Whether `name`'s secret is a key of this state that is enabled."""
    key = state.keys.lookup(secret_of(name))
    return key is not None and key.name == name and key.enabled


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "keygate" and r.levelno >= logging.ERROR]


def reloads(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "keygate" and "reloaded configuration" in r.getMessage()]


async def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def start(tctx: taddons.context, config: Config, gateway: Path) -> None:
    """Load `config` as mitmdump loads gateway.py: keygate_config set on the command line
    before the addon exists (mitmproxy defers it), the addon's load (which applies it),
    then configure with every option."""
    tctx.options.set(f"keygate_config={gateway}", defer=True)
    tctx.master.addons.add(config)
    tctx.master.addons.invoke_addon_sync(config, hooks.ConfigureHook(set(tctx.options.keys())))


def watching(gateway: Path, monkeypatch, scenario) -> None:
    """Start Config on `gateway` as mitmdump does (configure, then running, which starts
    the watcher, polling every 10 ms), run `await scenario(config)`, then stop it (done)."""
    monkeypatch.setattr(configuration, "POLL_INTERVAL", 0.01)
    monkeypatch.setattr(configuration, "_frozen", True)  # no gc.freeze() in the tests

    async def main():
        with taddons.context(Proxyserver(), Block()) as tctx:
            config = Config()
            start(tctx, config, gateway)
            config.running()
            try:
                await scenario(config)
            finally:
                config.done()

    asyncio.run(main())


# --------------------------------------------------------------------------- start-up


def test_the_first_read_at_configure(files):
    gateway, keys = files
    with taddons.context() as tctx:
        config = Config()
        start(tctx, config, gateway)
        s = config.state.settings
        assert s.path == gateway.resolve()
        assert (s.keys_file, s.usage_log) == (keys.resolve(), gateway.parent / "usage.jsonl")
        assert s.max_body_bytes == 4 * MB
        assert [c.name for c in s.channels] == ["local"]
        assert key_names(config.state) == {"alice"} and valid(config.state, "alice")


def test_a_missing_keys_file_at_start_up_means_no_key(files, caplog):
    gateway, keys = files
    keys.unlink()
    with taddons.context() as tctx, caplog.at_level(logging.WARNING, logger="keygate"):
        config = Config()
        start(tctx, config, gateway)
    assert len(config.state.keys) == 0 and not valid(config.state, "alice")
    assert any(f"{keys.resolve()} does not exist: no key is valid" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("which, text, line", [("gateway", t, n) for t, n in BAD_GATEWAY]
                         + [("keys", t, n) for t, n in BAD_KEYS])
def test_a_bad_file_at_start_up_is_an_options_error(files, which, text, line):
    gateway, keys = files
    bad = gateway if which == "gateway" else keys
    bad.write_text(text)
    with taddons.context() as tctx:
        config = Config()
        with pytest.raises(exceptions.OptionsError) as info:
            start(tctx, config, gateway)
        assert str(info.value).startswith(f"keygate: {bad.resolve()}:{line}: ")
        assert config.state is None  # nothing in force: mitmdump stops


def test_a_later_change_of_the_option_to_a_bad_file_keeps_the_configuration(files, tmp_path):
    gateway, _ = files
    other = tmp_path / "other.toml"
    other.write_text(BAD_GATEWAY[0][0])
    with taddons.context() as tctx:
        config = Config()
        start(tctx, config, gateway)
        with pytest.raises(exceptions.OptionsError, match=f"{other}:2: "):
            tctx.configure(config, keygate_config=str(other))
        # The option rolled back, and the configuration in force is the first file's.
        assert tctx.options.keygate_config == str(gateway)
        assert config.state.settings.path == gateway.resolve()
        assert config.state.settings.max_body_bytes == 4 * MB
        assert key_names(config.state) == {"alice"} and valid(config.state, "alice")


# --------------------------------------------------------------------------- the watcher


def test_a_good_edit_is_swapped_in_whole(files, monkeypatch, caplog):
    """gateway.toml now names another keys file: no moment shows the new settings with the
    old keys, or the other way round, and a request holding the old state keeps it whole.
    (The watcher reads the files twice here: the new keys file's fingerprint differs from
    the old one's it recorded. Both reads give the same configuration.)"""
    gateway, keys = files
    team = gateway.parent / "team.yaml"
    team.write_text(keys_yaml({"bob": {}, "carol": {"enabled": False}}))

    async def scenario(config):
        old = config.state
        replace(gateway, GATEWAY.replace('"keys.yaml"', '"team.yaml"')
                .replace("max_body_mb = 4", "max_body_mb = 8")
                .replace('name = "local"', 'name = "gpu"'))
        # What every turn of the event loop (every request hook) would find, until the
        # reload and for five polls after it.
        seen, deadline, settled = [old], time.monotonic() + 5, None
        while settled is None or time.monotonic() < settled:
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0)
            if config.state is not seen[-1]:
                seen.append(config.state)
                settled = time.monotonic() + 0.05
        new = config.state
        assert seen[0] is old and len(seen) <= 3
        for state in seen[1:]:  # every state after the old one is the new one, whole
            assert state.settings.keys_file == team.resolve()
            assert key_names(state) == {"bob", "carol"}
        assert new.settings.keys_file == team.resolve() and new.settings.max_body_bytes == 8 * MB
        assert [c.name for c in new.settings.channels] == ["gpu"]
        assert key_names(new) == {"bob", "carol"} and valid(new, "bob")
        assert not valid(new, "alice") and not valid(new, "carol")
        # The state a request took before the reload is as it was.
        assert old.settings.keys_file == keys.resolve() and old.settings.max_body_bytes == 4 * MB
        assert [c.name for c in old.settings.channels] == ["local"]
        assert key_names(old) == {"alice"} and valid(old, "alice")

    with caplog.at_level(logging.INFO, logger="keygate"):
        watching(gateway, monkeypatch, scenario)
    assert reloads(caplog)[0] == "keygate: reloaded configuration (2 keys, 1 channels)"
    assert errors(caplog) == []


def test_keys_yaml_edits_are_picked_up(files, monkeypatch, caplog):
    gateway, keys = files

    async def scenario(config):
        keys.write_text(keys_yaml({"alice": {}, "bob": {}}))  # in place
        await until(lambda: valid(config.state, "bob"))
        assert valid(config.state, "alice")
        keys.write_text(keys_yaml({"alice": {"enabled": False}, "bob": {}}))
        await until(lambda: not valid(config.state, "alice"))
        assert valid(config.state, "bob")
        replace(keys, keys_yaml({"bob": {"models": ["llama3.2:*"]}}))  # renamed over it
        await until(lambda: "alice" not in config.state.keys.by_name)
        assert config.state.keys.by_name["bob"].may_use("llama3.2:1b")
        assert not config.state.keys.by_name["bob"].may_use("qwen2.5:7b")
        replace(keys, "keys: {}\n")  # every key revoked, as the refusal below suggests
        await until(lambda: len(config.state.keys) == 0)
        # gateway.toml, untouched, is in force all along
        assert config.state.settings.max_body_bytes == 4 * MB

    with caplog.at_level(logging.INFO, logger="keygate"):
        watching(gateway, monkeypatch, scenario)
    assert errors(caplog) == []
    assert len(reloads(caplog)) == 4


def test_an_edit_made_while_the_last_is_read_is_read_next(files, monkeypatch):
    """scripts/keys twice in a row: the second write lands while the watcher parses the
    first. The watcher must not take the second for what it has read."""
    gateway, keys = files
    load_keys = keyring.load_keys
    reading, resume = threading.Event(), threading.Event()

    def slow_first_read(path, cache=None):
        ring = load_keys(path, cache)
        if not reading.is_set():
            reading.set()
            resume.wait(5)
        return ring

    async def scenario(config):
        monkeypatch.setattr(keyring, "load_keys", slow_first_read)
        keys.write_text(keys_yaml({"alice": {}, "bob": {}}))
        await until(reading.is_set)
        keys.write_text(keys_yaml({"alice": {}, "bob": {}, "carol": {}}))
        resume.set()
        await until(lambda: valid(config.state, "carol"))

    watching(gateway, monkeypatch, scenario)


@pytest.mark.parametrize("which, text, line", [("gateway", t, n) for t, n in BAD_GATEWAY]
                         + [("keys", t, n) for t, n in BAD_KEYS])
def test_an_edit_that_does_not_parse_keeps_the_last_good_configuration(
        files, monkeypatch, caplog, which, text, line):
    gateway, keys = files
    bad = gateway if which == "gateway" else keys

    async def scenario(config):
        before = config.state
        bad.write_text(text)
        await until(lambda: errors(caplog))
        assert config.state is before and valid(config.state, "alice")
        (message,) = errors(caplog)
        assert message.startswith(f"keygate: {bad.resolve()}:{line}: ")
        assert message.endswith("; keeping the last good configuration")
        # Fixed: read and in force.
        replace(keys, keys_yaml({"alice": {}, "bob": {}}))
        if which == "gateway":
            replace(gateway, GATEWAY)
        await until(lambda: valid(config.state, "bob"))
        assert config.state.settings.max_body_bytes == 4 * MB

    with caplog.at_level(logging.INFO, logger="keygate"):
        watching(gateway, monkeypatch, scenario)
    assert len(errors(caplog)) == 1


@pytest.mark.parametrize("which, edit, error", [
    ("gateway", Path.unlink, "{path}: cannot read: the file is gone"),
    ("gateway", lambda p: p.write_text(""), "{path}: the file is empty"),
    ("keys", lambda p: p.write_text(""),
     "{path}: the file is empty (to revoke every key, write 'keys: {{}}')"),
    ("keys", Path.unlink, "{path}: cannot read: No such file or directory"),
])
def test_a_file_in_force_gone_or_emptied_is_refused(files, monkeypatch, caplog, which, edit,
                                                    error):
    """Far likelier an accident, or a write caught halfway, than what the operator wants:
    a gateway.toml gone or empty would mean all defaults (another usage log, no channels),
    a keys.yaml emptied or gone no key at all."""
    gateway, keys = files
    path = gateway if which == "gateway" else keys

    async def scenario(config):
        before = config.state
        edit(path)
        await until(lambda: errors(caplog))
        await asyncio.sleep(0.05)  # five more polls: refused, not merely late
        assert config.state is before
        assert valid(config.state, "alice")
        assert [c.name for c in config.state.settings.channels] == ["local"]
        assert errors(caplog) == [
            f"keygate: {error.format(path=path.resolve())}; keeping the last good "
            "configuration"]
        # Written again: in force.
        replace(path, GATEWAY if which == "gateway" else keys_yaml({"bob": {}}))
        await until(lambda: config.state is not before)
        assert valid(config.state, "bob") is (which == "keys")
        assert config.state.settings.max_body_bytes == 4 * MB

    with caplog.at_level(logging.INFO, logger="keygate"):
        watching(gateway, monkeypatch, scenario)


def test_a_gateway_toml_without_settings_may_go(files, monkeypatch, caplog):
    """An empty gateway.toml means the defaults; removing it loses nothing, and is read."""
    gateway, keys = files
    gateway.write_text("")

    async def scenario(config):
        before = config.state
        assert before.settings.channels == () and before.settings.keys_file == keys.resolve()
        gateway.unlink()
        await until(lambda: config.state is not before)
        assert config.state.settings.keys_file == keys.resolve()
        assert valid(config.state, "alice")

    with caplog.at_level(logging.INFO, logger="keygate"):
        watching(gateway, monkeypatch, scenario)
    assert errors(caplog) == []


def test_the_watcher_stops_when_done(files, monkeypatch):
    gateway, keys = files

    async def scenario(config):
        config.done()
        before = config.state
        keys.write_text(keys_yaml({"alice": {}, "bob": {}}))
        await asyncio.sleep(0.1)  # ten polls
        assert config.state is before

    watching(gateway, monkeypatch, scenario)
