"""The `Config` addon: reads gateway.toml and keys.yaml, and reloads them while running.

Other addons read `config.state`, an immutable snapshot swapped whole: a request sees one
consistent configuration, and an edit that does not parse or validate changes nothing.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx, exceptions

from keygate.model import keyring as keys
from keygate.model.settings import DEFAULT_CONFIG, ConfigError, Settings, load_settings

log = logging.getLogger("keygate")

_frozen = False  # gc.freeze() done (once per process: see Config.running)

POLL_INTERVAL = 0.5  # seconds; an edit takes effect within two polls and a parse
RELOG_INTERVAL = 60.0  # seconds; a reload error that persists is logged again this often


@dataclass(frozen=True)
class State:
    settings: Settings
    keys: keys.KeyRing


def _fingerprint(path: Path | None) -> tuple | None:
    """What changes when a file is edited in place or replaced by rename."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError as e:
        return ("missing", e.errno)
    # ctime too: chmod, chown and ACL changes touch only it, and they can make a file
    # readable that the last read could not open.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unreadable(e: BaseException) -> bool:
    """Whether a reload failed at reading a file rather than at what the file says. Such a
    failure (permission denied, too many open files, a network mount that went away) can
    pass while the file stays exactly as it was, so the watcher reads it again on every
    poll; a file that was read and does not parse or validate is read again only once it
    changes."""
    if isinstance(e, OSError):
        return True
    if not isinstance(e, ConfigError):
        return False
    if isinstance(e.__cause__, OSError):
        return True
    return "cannot read" in str(e) and not isinstance(e.__cause__, UnicodeError)


def _has_content(fp: tuple | None) -> bool:
    return fp is not None and isinstance(fp[0], int) and fp[1] > 0


def _is_empty(fp: tuple | None) -> bool:
    return fp is not None and isinstance(fp[0], int) and fp[1] == 0


def read_state(config_path: str | None, missing_keys_ok: bool,
               cache: keys.EntryCache | None = None) -> State:
    """Parse both files into a State, or raise ConfigError. Pure apart from reading."""
    settings = load_settings(config_path or None)
    if missing_keys_ok and not settings.keys_file.exists():
        log.warning(
            "keygate: %s does not exist: no key is valid, every request will be refused. "
            "Create a key with scripts/keys add NAME.", settings.keys_file)
        return State(settings, keys.EMPTY)
    return State(settings, keys.load_keys(settings.keys_file, cache))


class Config:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.state: State | None = None
        self._watched: tuple = ()
        self._task: asyncio.Task | None = None
        # Only the watcher thread reads through it, one read at a time.
        self._entries = keys.EntryCache()
        # Reloads so far, and when the configuration in force was read (Unix time): for
        # keygate's metrics (stages/metrics.py).
        self.reloads = 0
        self.reload_failures = 0
        self.loaded_at: float | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "keygate_config", str, "",
            "Path of keygate's gateway.toml (default: config/gateway.toml of the checkout). "
            "Relative paths inside it are relative to its folder; keys.yaml and the usage "
            "log are named there. Both files are reloaded when they change.",
        )

    def configure(self, updated: set[str]) -> None:
        if "keygate_config" not in updated and self.state is not None:
            return
        try:
            state = read_state(ctx.options.keygate_config, True, self._entries)
        except ConfigError as e:
            # At start-up this stops mitmdump (fail closed); on a later option change
            # the previous configuration stays in force.
            raise exceptions.OptionsError(f"keygate: {e}") from e
        self._swap(state)

    def running(self) -> None:
        # keygate does the access control block_global stands in for, and a refused
        # request must not open an upstream connection (or wait for a dead upstream).
        wanted = {"connection_strategy": "lazy", "block_global": False}
        changes = {k: v for k, v in wanted.items() if getattr(ctx.options, k) != v}
        if self.state and ctx.options.body_size_limit is None:
            # Bounds what one request can make mitmproxy buffer. keygate itself refuses
            # bodies over max_body_mb with its own 413; the slack lets it see them first.
            changes["body_size_limit"] = str(self.state.settings.max_body_bytes + 1024 * 1024)
        if changes:
            ctx.options.update(**changes)
            log.info("keygate: set %s", ", ".join(f"{k}={v}" for k, v in changes.items()))
        if self.state:
            s = self.state.settings
            log.info(
                "keygate: config %s, keys %s (%d keys), usage log %s, channels: %s",
                s.path or "(defaults)", s.keys_file, len(self.state.keys), s.usage_log,
                ", ".join(f"{c.name} ({c.kind} {c.base_url})" for c in s.channels)
                or "none (mitmdump's reverse target)",
            )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        global _frozen
        if not _frozen:
            # What start-up made (mitmproxy's addons, keys.yaml's keys: ~120,000 objects
            # with 10,000 keys) lives as long as the process. Out of the cyclic collector's
            # sight, its full collections, ~60 ms each here, no longer walk them all again,
            # nor cost more the more keys there are. Once: a later freeze (on a reload of
            # this script) would also freeze the flows then in flight.
            _frozen = True
            gc.freeze()

    def done(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None

    def _config_path(self) -> Path:
        return Path(ctx.options.keygate_config or DEFAULT_CONFIG).expanduser().resolve()

    def _fingerprints(self, state: State) -> tuple:
        try:
            config_path = self._config_path()
        except RuntimeError as e:  # a symlink loop: the watcher must outlive it
            return (("unresolvable", str(e)), _fingerprint(state.settings.keys_file))
        return (_fingerprint(config_path), _fingerprint(state.settings.keys_file))

    def _vanished(self, now: tuple) -> None:
        """Refuse a reload that would drop a file in force: a gateway.toml that had settings
        and is now gone or empty would silently mean all defaults (another usage log, no
        channels), and a keys.yaml emptied no keys at all. Either is far likelier an
        accident or an in-place write caught halfway than what the operator wants."""
        (config_was, keys_was), (config_now, keys_now) = self._watched, now
        if _has_content(config_was) and config_now[:2] == ("missing", errno.ENOENT):
            raise ConfigError(f"{self.state.settings.path}: cannot read: the file is gone")
        if _has_content(config_was) and _is_empty(config_now):
            raise ConfigError(f"{self.state.settings.path}: the file is empty")
        if _has_content(keys_was) and _is_empty(keys_now):
            raise ConfigError(f"{self.state.settings.keys_file}: the file is empty (to "
                              "revoke every key, write 'keys: {}')")

    def _swap(self, state: State) -> None:
        self.state = state
        self.loaded_at = time.time()
        self._watched = self._fingerprints(state)

    async def _watch(self) -> None:
        failed: tuple | None = None  # the fingerprints of the last reload that failed
        retry = False  # it failed reading a file: read again, changed or not
        said: tuple[str, float] | None = None  # the error last logged, and when
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            if self.state is None:
                continue
            # stat() of a file on a mount that went away can hang: off the event loop.
            now = await asyncio.to_thread(self._fingerprints, self.state)
            if now == self._watched:
                failed, retry, said = None, False, None
                continue
            again = now == failed
            if again and not retry:
                continue
            try:
                self._vanished(now)
                # Parsing 10,000 keys takes a moment: keep it off the event loop.
                new = await asyncio.to_thread(
                    read_state, ctx.options.keygate_config, False, self._entries)
            except Exception as e:  # a ConfigError, or a surprise the watcher must outlive
                failed, retry = now, _unreadable(e)
                self.reload_failures += 1
                said = self._failed(e, said if again else None)
                continue
            failed, retry, said = None, False, None
            # The fingerprints taken before the read: an edit made while it was parsed
            # (scripts/keys twice in a row) still differs from them and is read next.
            self.state, self._watched = new, now
            self.reloads += 1
            self.loaded_at = time.time()
            log.info(
                "keygate: reloaded configuration (%d keys, %d channels)",
                len(new.keys), len(new.settings.channels))

    def _failed(self, e: Exception, said: tuple[str, float] | None) -> tuple[str, float]:
        """Log a failed reload, unless a retry of the same files ended in the error `said`
        logged last, less than RELOG_INTERVAL ago: a read retried every poll must not
        write a line every poll. Returns what was logged last, and when."""
        message = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        t = self.clock()
        if said is not None and said[0] == message and t - said[1] < RELOG_INTERVAL:
            return said
        if isinstance(e, ConfigError):
            log.error("keygate: %s; keeping the last good configuration", e)
        else:
            log.exception("keygate: reload failed: %s", e)
        return (message, t)
